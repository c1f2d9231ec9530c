"""Self-supervised pretext tasks, pretrain → fine-tune, and gradient-based balancing."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from biofm.platform.balancing import make_balancer
from biofm.platform.checkpoint import safe_load
from biofm.platform.lightning import BiofmDataModule, BiofmModule, ConfigError
from biofm.testing import write_fake_modality_store

TINY = {"d_model": 16, "depth": 1, "heads": 2, "latents": 2, "dropout": 0.0}
ENCODERS = {"oct": {"oct": {"grid": 4, "layers": 1}}}


def _cases() -> list[tuple[str, str]]:
    """Every registered pretext with the modality it corrupts, and those that take any modality (two views of
    one input) with every registered modality; cross_modal needs two modalities and has its own test."""
    from biofm.platform.modality import MODALITIES
    from biofm.platform.pretext import PRETEXTS

    cases = []
    for name in PRETEXTS.names():
        modality = PRETEXTS.resolve(name).modality
        if name != "cross_modal":
            cases += [(modality, name)] if modality else [(m, name) for m in MODALITIES.names()]
    return cases


CASES = _cases()


@pytest.fixture(scope="module")
def fake_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretext")
    small = {"oct": {"shape": [16, 16, 16], "enface_shape": [16, 16]}, "molecule": {"descriptors": True}}
    return {
        m: write_fake_modality_store(str(root / f"{m}.zarr"), m, n=24, seed=1, settings=small.get(m)).url
        for m in {m for m, _ in CASES}
    }


def _fixed_batch(url: str) -> dict:
    data = BiofmDataModule([url], tasks=[], batch_size=12, predict_split="all")
    return next(iter(data.predict_dataloader()))


def _train(module: BiofmModule, batch: dict, steps: int, lr: float = 3e-3) -> list[float]:
    optimiser = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        loss = sum(module._pretext_losses(batch["inputs"]).values())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("modality,pretext", CASES)
def test_each_pretext_task_trains_with_finite_decreasing_loss(fake_stores, modality, pretext):
    torch.manual_seed(0)
    batch = _fixed_batch(fake_stores[modality])
    module = BiofmModule(
        BiofmDataModule([fake_stores[modality]], tasks=[]).schema,
        pretext={pretext: {}},
        encoders=ENCODERS.get(modality),
        **TINY,
    )
    losses = _train(module, batch, 30)
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.9 * first, (pretext, losses)


def test_cross_modal_contrast_trains_and_needs_two_modalities(cohort_store, fake_stores):
    torch.manual_seed(0)
    data = BiofmDataModule([cohort_store.url], tasks=[], batch_size=32, predict_split="all")
    batch = next(iter(data.predict_dataloader()))
    # a contrastive loss starts on a plateau at log(batch) where every embedding looks alike: a wider model
    # and a gentler rate leave it reliably
    module = BiofmModule(data.schema, pretext={"cross_modal": {}}, **{**TINY, "d_model": 32})
    losses = _train(module, batch, 60, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    with pytest.raises(ConfigError, match="cross_modal' needs two or more modalities"):
        BiofmModule(BiofmDataModule([fake_stores["molecule"]], tasks=[]).schema, pretext={"cross_modal": {}})
    with pytest.raises(ConfigError, match="'masked_tiles' needs the wsi modality"):
        BiofmModule(data.schema, pretext={"masked_tiles": {}})
    with pytest.raises(ConfigError, match="nothing to train"):
        BiofmModule(data.schema)
    plain = BiofmDataModule([fake_stores["tabular"]]).schema
    plain["modalities"] = {"molecule": {"max_atoms": 150}}
    with pytest.raises(ConfigError, match="prepared with --descriptors"):
        BiofmModule(plain, pretext={"descriptors": {}})


def test_descriptor_targets_do_not_depend_on_the_batch_a_molecule_comes_in(fake_stores):
    """The descriptors pretext standardises by running statistics over every training batch (a batch is one
    source, so per-batch statistics gave one molecule different targets in different sources' batches):
    after two batches of unlike distributions the statistics are those of both together, a molecule's
    target is the same in either batch, and a checkpoint saved before the statistics existed still loads."""
    module = BiofmModule(
        BiofmDataModule([fake_stores["molecule"]], tasks=[]).schema, pretext={"descriptors": {}}, **TINY
    )
    pretext = module.pretexts["descriptors"]
    generator = torch.Generator().manual_seed(0)
    width = pretext.mean.numel()
    small = torch.randn(40, width, generator=generator)
    large = 50 + 10 * torch.randn(24, width, generator=generator)  # another source: other molecules
    pretext.train()
    pretext.targets(small), pretext.targets(large)
    both = torch.cat([small, large])
    torch.testing.assert_close(pretext.mean, both.mean(dim=0))
    torch.testing.assert_close((pretext.m2 / (pretext.seen - 1)).sqrt(), both.std(dim=0), rtol=1e-4, atol=1e-4)
    pretext.eval()
    alone = pretext.targets(small[:1])
    mixed = pretext.targets(torch.cat([small[:1], large]))[:1]
    torch.testing.assert_close(alone, mixed)
    per_batch = (small - small.mean(dim=0)) / small.std(dim=0)
    assert not torch.allclose(pretext.targets(small), per_batch, atol=0.1)  # not the batch's own statistics
    old = {
        k: v
        for k, v in module.state_dict().items()
        if not (k.startswith("pretexts.descriptors.") and k.rsplit(".", 1)[1] in ("seen", "mean", "m2"))
    }
    fresh = BiofmModule(
        BiofmDataModule([fake_stores["molecule"]], tasks=[]).schema, pretext={"descriptors": {}}, **TINY
    )
    fresh.load_state_dict(old)
    assert float(fresh.pretexts["descriptors"].seen) == 0.0


def test_hidden_parts_are_hidden_from_the_encoder(fake_stores):
    """A masked atom's attributes, a masked tile's features and a masked patch's voxels do not reach the
    encoder: changing them leaves its output unchanged."""
    torch.manual_seed(0)
    for modality, pretext, ratio, change in [
        ("molecule", "masked_atoms", 0.5, lambda b, s: {**b, "atoms": torch.where(s[0][:, None], 0, b["atoms"])}),
        (
            "wsi",
            "masked_tiles",
            0.5,
            lambda b, s: {**b, "features": b["features"].masked_fill(b["tile_mask"][..., None], 9.0)},
        ),
        ("oct", "masked_patches", 1.0, lambda b, s: {**b, "volume": torch.rand_like(b["volume"])}),
    ]:
        batch = _fixed_batch(fake_stores[modality])["inputs"]
        module = BiofmModule(
            BiofmDataModule([fake_stores[modality]], tasks=[]).schema,
            pretext={pretext: {"ratio": ratio}},
            encoders=ENCODERS.get(modality),
            **TINY,
        ).eval()
        corrupted, state = module.pretexts[pretext].corrupt(batch[modality])
        encoder = module.model.encoders[modality]
        with torch.no_grad():
            before, mask = encoder(corrupted)
            after, _ = encoder(change(corrupted, state))
            unmasked, _ = encoder(batch[modality])
        torch.testing.assert_close(before[mask], after[mask])
        assert not torch.allclose(before[mask], unmasked[mask])  # the mask did change what the encoder saw


def test_pretrain_then_fine_tune_round_trip_through_the_cli(fake_stores, tmp_path):
    store = fake_stores["molecule"]
    pre_dir, tune_dir = tmp_path / "pre", tmp_path / "tune"
    common = [
        "--trainer.accelerator",
        "cpu",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--data.stores",
        json.dumps([store]),
        "--data.batch_size",
        "8",
        "--model.d_model",
        "16",
        "--model.depth",
        "1",
        "--model.heads",
        "2",
        "--model.latents",
        "2",
        "--model.encoders",
        '{"molecule": {"layers": 2}}',
    ]
    run = lambda *args: subprocess.run(
        [sys.executable, "-m", "biofm", "fit", *args],
        capture_output=True,  # noqa: E731
        text=True,
        timeout=600,
    )
    pre = run(
        "-c",
        "configs/pretrain/molecules.yaml",
        *common,
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(pre_dir),
    )
    assert pre.returncode == 0, pre.stderr[-3000:]
    checkpoint = pre_dir / "checkpoints" / "last.ckpt"
    saved = safe_load(checkpoint)
    assert saved["hyper_parameters"]["schema"]["tasks"] == {}
    assert set(saved["hyper_parameters"]["pretext"]) == {"masked_atoms", "masked_bonds", "two_view", "descriptors"}

    tune = run(
        "-c",
        "configs/finetune/molecules.yaml",
        *common,
        "--trainer.max_epochs",
        "2",
        "--trainer.default_root_dir",
        str(tune_dir),
        "--model.init_from",
        str(checkpoint),
        "--model.freeze_encoders",
        "true",
        "--data.tasks",
        '["flag"]',
    )
    assert tune.returncode == 0, tune.stderr[-3000:]
    tuned = safe_load(tune_dir / "checkpoints" / "last.ckpt")
    pretrained = saved["state_dict"]
    encoder_keys = [k for k in pretrained if k.startswith("model.encoders.")]
    assert encoder_keys
    for key in encoder_keys:  # frozen encoders: still the pretrained weights after fine-tuning
        torch.testing.assert_close(tuned["state_dict"][key], pretrained[key], msg=key)
    trunk = "model.trunk.0.attn.q.weight"
    assert not torch.equal(tuned["state_dict"][trunk], pretrained[trunk])  # the trunk was fine-tuned
    assert "model.heads.flag.weight" in tuned["state_dict"]
    assert not any(k.startswith("pretexts.") for k in tuned["state_dict"])

    wrong = run(
        "-c",
        "configs/finetune/molecules.yaml",
        *common,
        "--model.d_model",
        "32",
        "--trainer.max_epochs",
        "1",
        "--trainer.default_root_dir",
        str(tmp_path / "wrong"),
        "--model.init_from",
        str(checkpoint),
        "--data.tasks",
        '["flag"]',
    )
    assert wrong.returncode == 2 and "another architecture" in wrong.stderr


def _one_task_run(balancing: str, store: str, steps: int = 4) -> dict:
    from lightning.pytorch import Trainer, seed_everything

    seed_everything(0, verbose=False)
    data = BiofmDataModule([store], batch_size=8, seed=0)
    module = BiofmModule(data.schema, balancing=balancing, lr=1e-2, **TINY)
    Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(module, datamodule=data)
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def test_pcgrad_matches_equal_weighting_with_one_task(fake_stores):
    equal = _one_task_run("equal", fake_stores["tabular"])
    pcgrad = _one_task_run("pcgrad", fake_stores["tabular"])
    start = BiofmModule(BiofmDataModule([fake_stores["tabular"]]).schema, **TINY).model.state_dict()
    moved = [k for k in equal if equal[k].is_floating_point() and not torch.equal(equal[k], start[k])]
    assert moved  # training changed the weights…
    for key in equal:  # …and both strategies changed them identically
        torch.testing.assert_close(pcgrad[key], equal[key], rtol=1e-5, atol=1e-6)


def test_pcgrad_removes_conflicts_between_task_gradients():
    balancer = make_balancer("pcgrad", ["a", "b"])
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    combined = balancer.combine_gradients([g1, g2])
    # each projected gradient lost its component along the other: g1' = [0.5, 0.5], g2' = [0, 1]
    torch.testing.assert_close(combined, torch.tensor([0.5, 1.5]))
    # agreeing gradients are summed unchanged
    torch.testing.assert_close(balancer.combine_gradients([g1, 2 * g1]), 3 * g1)


def test_pcgrad_trains_pretext_and_supervised_tasks_together(fake_stores):
    from lightning.pytorch import Trainer

    data = BiofmDataModule([fake_stores["molecule"]], batch_size=8)
    module = BiofmModule(
        data.schema, balancing="pcgrad", pretext={"masked_atoms": {}}, schedule="cosine", warmup_steps=1, **TINY
    )
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(module, datamodule=data)
    after = module.model.state_dict()
    assert not torch.equal(after["heads.flag.weight"], before["heads.flag.weight"])
    assert not torch.equal(after["encoders.molecule.mask_atom"], before["encoders.molecule.mask_atom"])
    assert all(torch.isfinite(v).all() for v in after.values() if v.is_floating_point())


def test_layer_decay_and_linear_probe(fake_stores):
    schema = BiofmDataModule([fake_stores["molecule"]]).schema
    module = BiofmModule(schema, d_model=16, depth=2, heads=2, latents=2, lr=1.0, layer_decay=0.5)
    lrs = {}
    for group in module._parameter_groups():
        for p in group["params"]:
            lrs[id(p)] = group["lr"]
    model = module.model
    assert lrs[id(model.heads["flag"].weight)] == 1.0
    assert lrs[id(model.trunk[1].attn.q.weight)] == 0.5
    assert lrs[id(model.trunk[0].attn.q.weight)] == 0.25
    assert lrs[id(model.cls)] == lrs[id(next(model.encoders.parameters()))] == 0.125
    probe = BiofmModule(schema, linear_probe=True, **TINY)
    trainable = {n for n, p in probe.model.named_parameters() if p.requires_grad}
    assert trainable == {"heads.flag.weight", "heads.flag.bias", "queries.flag"}


def test_train_fraction_keeps_the_same_subset_of_training_samples(fake_stores):
    def rows(fraction, seed):
        data = BiofmDataModule([fake_stores["tabular"]], batch_size=4, seed=seed, train_fraction=fraction)
        stream = data._stream(next(iter(data.stores.values())), "train", shuffle=True)
        return stream.n_selected, {(c, int(r)) for c, rs in enumerate(stream.chunk_rows) for r in rs}

    n_all, all_rows = rows(1.0, 0)
    n_quarter, quarter = rows(0.25, 0)
    assert n_quarter == round(0.25 * n_all) and quarter < all_rows
    assert rows(0.25, 0)[1] == quarter and rows(0.25, 1)[1] != quarter
    with pytest.raises(ConfigError, match="train_fraction"):
        BiofmDataModule([fake_stores["tabular"]], train_fraction=0.0)


@pytest.mark.slow
def test_pcgrad_with_a_pretext_task_under_two_process_ddp_keeps_ranks_in_step(cohort_store, tmp_path):
    """Each rank projects its own task gradients; DDP averages the projected gradient, so both ranks end
    with the same weights."""
    run, sums = tmp_path / "ddp", tmp_path / "sums"
    extra = tmp_path / "callbacks.yaml"
    extra.write_text(
        f"trainer:\n  callbacks:\n    - class_path: biofm.testing.WeightChecksum\n"
        f"      init_args: {{out_dir: {sums}}}\n"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "biofm",
            "fit",
            "--trainer",
            "configs/trainer/ddp-cpu.yaml",
            "-c",
            str(extra),
            "--trainer.default_root_dir",
            str(run),
            "--trainer.max_epochs",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
            "--data.stores",
            json.dumps([cohort_store.url]),
            "--data.tasks",
            '["event", "subtype", "risk_score"]',
            "--data.batch_size",
            "32",
            "--model.d_model",
            "16",
            "--model.depth",
            "1",
            "--model.heads",
            "2",
            "--model.latents",
            "2",
            "--model.balancing",
            "pcgrad",
            "--model.pretext",
            '{"cross_modal": {}}',
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = sorted(sums.glob("weights-rank*.txt"))
    assert len(ranks) == 2
    assert ranks[0].read_text() == ranks[1].read_text()


def test_an_unlabelled_pool_stores_no_labels_and_rdkit_descriptors(tmp_path):
    from rdkit import Chem
    from rdkit.Chem import Descriptors

    from biofm.datasets.molecules import prepare_molecules

    smiles = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "not a smiles", "OCC(O)CO", "C1CCCCC1N"]
    (tmp_path / "pool.csv").write_text("smiles,activity\n" + "\n".join(f"{s},{i}" for i, s in enumerate(smiles)))
    store, rejected = prepare_molecules(
        str(tmp_path / "pool.csv"), str(tmp_path / "pool.zarr"), label_columns=[], descriptors=True
    )
    assert rejected == 1 and store.n == 5 and store.tasks == {}
    assert store.modalities["molecule"]["descriptors"] is True
    logp = sorted(float(v) for v in store.root["molecule/descriptors"][:, 0])
    expected = sorted(Descriptors.MolLogP(Chem.MolFromSmiles(s)) for s in smiles if s != "not a smiles")
    assert logp == pytest.approx(expected, rel=1e-5)
    with pytest.raises(Exception, match="no label columns"):
        prepare_molecules(
            str(tmp_path / "pool.csv"),
            str(tmp_path / "none.zarr"),
            label_columns=None,
            smiles_column="smiles",
            id_column="activity",
        )


@pytest.mark.parametrize(
    "config",
    sorted(
        str(p.relative_to(p.parents[2]))
        for folder in ("pretrain", "finetune")
        for p in (Path(__file__).resolve().parents[1] / "configs" / folder).glob("*.yaml")
    ),
)
def test_every_pretrain_and_finetune_config_parses(config):
    done = subprocess.run(
        [sys.executable, "-m", "biofm", "fit", "-c", config, "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    if "pretrain" in config:
        assert "pretext:" in done.stdout and "tasks: []" in done.stdout


@pytest.mark.slow
def test_plain_ddp_trains_sources_whose_batches_leave_encoders_unused(fake_stores, tmp_path):
    """Two sources with different modalities: each batch leaves the other encoder without a gradient; every
    parameter gets a zero one instead, so plain `ddp` (no find_unused_parameters) runs."""
    run = tmp_path / "ddp"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "biofm",
            "fit",
            "--trainer",
            "configs/trainer/ddp-cpu.yaml",
            "--model",
            "configs/model/tiny.yaml",
            "--data.stores",
            json.dumps([fake_stores["molecule"], fake_stores["tabular"]]),
            "--data.batch_size",
            "4",
            "--trainer.max_epochs",
            "1",
            "--trainer.limit_val_batches",
            "0",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.logger",
            "false",
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "WANDB_MODE": "disabled"},
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").exists()


def test_a_step_encodes_each_modality_once_for_the_supervised_and_contrastive_losses(cohort_store):
    data = BiofmDataModule([cohort_store.url], tasks=["event"], batch_size=16, predict_split="all")
    batch = next(iter(data.predict_dataloader()))
    module = BiofmModule(data.schema, pretext={"cross_modal": {}, "two_view": {}}, **TINY)
    calls = {name: 0 for name in module.model.encoders}
    for name, encoder in module.model.encoders.items():
        encoder.register_forward_hook(lambda *_, name=name: calls.__setitem__(name, calls[name] + 1))
    losses = module._losses(batch).terms()
    assert {"event", "pretext/cross_modal", "pretext/two_view"} <= set(losses)
    # the supervised pass's encoder outputs serve cross-modal contrast and the token-subset views
    assert calls == {"tabular": 1, "text": 1}, calls


def test_mask_fraction_hides_at_least_one_valid_entry_even_when_the_draw_hides_none():
    from biofm.platform.pretext import mask_fraction

    valid = torch.tensor([[False, True, False], [False, False, True]])
    for _ in range(20):
        chosen = mask_fraction(valid, 0.0)  # the random draw hides nothing: one valid entry is still chosen
        assert int(chosen.sum()) == 1 and bool((chosen & ~valid).sum() == 0)
    assert not mask_fraction(torch.zeros(2, 3, dtype=torch.bool), 0.5).any()
