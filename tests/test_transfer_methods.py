"""Methods against negative transfer (issue #21): task experts, per-task flat minima, Rep-MTL, LoRA/SMoRA."""

import copy

import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

from biofm.platform.experts import TaskExperts, expert_options
from biofm.platform.lightning import BiofmDataModule, BiofmModule
from biofm.platform.lora import LoRALinear, merge_lora, merge_lora_checkpoint

TINY = dict(d_model=16, depth=2, heads=2, latents=2, dropout=0.0)


def _trainer(tmp_path, steps=4, **kw):
    return Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        log_every_n_steps=1,
        **kw,
    )


def _fit(store, tmp_path, tasks=None, steps=4, seed=0, **settings):
    seed_everything(seed, verbose=False)
    data = BiofmDataModule([store.url], batch_size=32, tasks=tasks, seed=seed)
    module = BiofmModule(data.schema, **{**TINY, **settings})
    _trainer(tmp_path, steps).fit(module, datamodule=data)
    return module, data


def _one_batch(data):
    data.setup("fit")
    return next(iter(data.train_dataloader()))


def _state(module):
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _first_task(store):
    data = BiofmDataModule([store.url], batch_size=32)
    return next(t for t, s in data.schema["tasks"].items() if s["kind"] == "regression")


# ---- with one task, each method is plain training -------------------------------------------------------------


def test_rep_mtl_with_one_task_is_equal_weighting_exactly(cohort_store, tmp_path):
    task = _first_task(cohort_store)
    equal, _ = _fit(cohort_store, tmp_path / "a", tasks=[task])
    rep, _ = _fit(cohort_store, tmp_path / "b", tasks=[task], balancing="rep-mtl")
    a, b = _state(equal), _state(rep)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rep_mtl_regularisers_train_with_several_tasks(cohort_store, tmp_path):
    module, _ = _fit(cohort_store, tmp_path, balancing="rep-mtl", steps=3)
    assert set(module.balancer.last) == {"tsr", "csa"}
    tsr = float(module.balancer.last["tsr"])
    assert 0.0 < tsr <= 1.0 + 1e-6  # entropy normalised by log T


def test_rep_mtl_regularisers_change_the_update(cohort_store, tmp_path):
    """Against the same run with both weights 0 (the same kernels and steps, the regularisers weigh
    nothing, so the two runs would be identical if the regularisers never reached the update)."""
    off, _ = _fit(cohort_store, tmp_path / "b", balancing="rep-mtl", balancing_options={"tsr": 0.0, "csa": 0.0})
    on, _ = _fit(cohort_store, tmp_path / "c", balancing="rep-mtl", balancing_options={"tsr": 1.0, "csa": 1.0})
    b, c = _state(off), _state(on)
    assert max(float((b[k] - c[k]).abs().max()) for k in b) > 1e-4


def test_rep_mtl_regulariser_is_the_entropy_of_task_shares():
    """Two tasks that read disjoint channels of Z: each channel has one task, so the entropy term is 0; two
    tasks reading the same channels equally: it is 1 (log 2 / log 2)."""
    from biofm.platform.balancing import make_balancer

    z = torch.randn(8, 3, 4, requires_grad=True)
    balancer = make_balancer("rep-mtl", ["a", "b"], {"tsr": 1.0, "csa": 0.0})
    disjoint = {"a": z[..., :2].sum(), "b": z[..., 2:].sum()}
    assert float(balancer.regulariser(disjoint, [z])) == pytest.approx(0.0, abs=1e-6)
    same = {"a": z.sum(), "b": 2 * z.sum()}
    assert float(balancer.regulariser(same, [z])) == pytest.approx(1.0, abs=1e-5)


def test_flat_with_no_perturbation_is_its_base_balancer(cohort_store, tmp_path):
    pcgrad, _ = _fit(cohort_store, tmp_path / "a", balancing="pcgrad")
    flat, _ = _fit(cohort_store, tmp_path / "b", balancing="flat", balancing_options={"base": "pcgrad", "rho": 0.0})
    a, b = _state(pcgrad), _state(flat)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_flat_with_no_perturbation_keeps_a_loss_based_bases_weights(cohort_store, tmp_path):
    """Uncertainty weights set apart from 1: the gradient flat (ρ = 0) over uncertainty steps with is
    uncertainty's own, not the unweighted sum's."""
    from lightning.pytorch import Callback

    class Gradients(Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            self.grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}

    def first_gradient(balancing, options=None, weighted=True):
        seed_everything(0, verbose=False)
        data = BiofmDataModule([cohort_store.url], batch_size=32, seed=0)
        module = BiofmModule(data.schema, **TINY, balancing=balancing, balancing_options=options)
        if weighted:
            balancer = module.balancer.base if balancing == "flat" else module.balancer
            with torch.no_grad():
                for i, log_var in enumerate(balancer.log_vars.values()):
                    log_var.fill_(1.5 * (i % 3) - 1.5)
        seen = Gradients()
        _trainer(tmp_path / balancing, steps=1, callbacks=[seen]).fit(module, datamodule=data)
        return seen.grads

    def distance(a, b):
        return max(float((a[k] - b[k]).norm() / a[k].norm().clamp_min(1e-12)) for k in a if a[k].norm() > 0)

    plain = first_gradient("uncertainty")
    flat = first_gradient("flat", {"base": "uncertainty", "rho": 0.0})
    unweighted = first_gradient("uncertainty", weighted=False)
    assert distance(plain, flat) < 1e-4 < 0.1 < distance(plain, unweighted)


def test_flat_with_one_task_takes_the_sharpness_aware_gradient(cohort_store, tmp_path):
    """One task: the update is ∇L(θ + ρ g/‖g‖), computed here by hand on the same batch."""
    task = _first_task(cohort_store)
    seed_everything(0, verbose=False)
    data = BiofmDataModule([cohort_store.url], batch_size=32, tasks=[task])
    module = BiofmModule(data.schema, **TINY, balancing="flat", balancing_options={"rho": 0.5})
    batch = _one_batch(data)
    params = [p for p in module.parameters() if p.requires_grad]
    loss = module._losses(batch).terms()[task]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None))
    by_hand = copy.deepcopy(module)
    hand_params = [p for p in by_hand.parameters() if p.requires_grad]
    with torch.no_grad():
        for p, g in zip(hand_params, grads):
            if g is not None:
                p.add_(0.5 * g / norm)
    expected = torch.autograd.grad(by_hand._losses(batch).terms()[task], hand_params, allow_unused=True)
    sharp = module._sharpness_gradients(batch, [task], [grads], params, 0.5)[0]
    for e, s, p0, p1 in zip(expected, sharp, params, [p for p in module.parameters() if p.requires_grad]):
        if e is not None:
            assert torch.allclose(e, s, atol=1e-5)
    # and the parameters are restored after the perturbation
    fresh = [p for p in BiofmModule(data.schema, **TINY).parameters()]
    assert len(fresh) == len(params)
    assert torch.allclose(module._losses(batch).terms()[task], loss, atol=1e-6)


def test_flat_trains_over_each_kind_of_base(cohort_store, tmp_path):
    for base in ("equal", "uncertainty", "pcgrad"):
        module, _ = _fit(cohort_store, tmp_path / base, balancing="flat", balancing_options={"base": base}, steps=2)
        assert all(torch.isfinite(p).all() for p in module.parameters())


def test_one_expert_for_one_task_is_a_plain_block_with_the_expert_as_its_mlp():
    torch.manual_seed(0)
    experts = TaskExperts(16, ["t"], expert_options({"shared": 1, "per_group": 0, "own_floor": 0.0}))
    x = torch.randn(4, 6, 16)
    expected = experts.shared[0](x)
    assert torch.allclose(experts(x, ["t"]), expected, atol=1e-6)


def test_experts_model_with_one_task_trains(cohort_store, tmp_path):
    task = _first_task(cohort_store)
    module, _ = _fit(cohort_store, tmp_path, tasks=[task], experts={"blocks": [0, 1]})
    assert len(module.model.expert_blocks()) == 2
    assert all(torch.isfinite(p).all() for p in module.parameters())


# ---- task experts ---------------------------------------------------------------------------------------------


def _gate_separation(conflict: bool, seed: int = 0) -> float:
    """Two tasks read the same input through 2 shared experts and one shared read-out; their targets are
    opposite (conflict) or the same. Returns the mean over inputs of the total-variation distance between the
    two tasks' gates (the gates are input-dependent: they may separate per input and still average ½ each)."""
    torch.manual_seed(seed)
    d = 8
    experts = TaskExperts(d, ["a", "b"], expert_options({"shared": 2, "per_group": 0, "own_floor": 0.0}))
    readout = torch.nn.Linear(d, 1)
    w = torch.randn(d)
    optimiser = torch.optim.Adam([*experts.parameters(), *readout.parameters()], lr=1e-2)
    for _ in range(300):
        x = torch.randn(64, d)
        tokens = torch.stack([torch.zeros_like(x), x, x], dim=1)  # [CLS], task a, task b
        out = experts(tokens, ["a", "b"])
        target_a = torch.tanh(x @ w)
        target_b = -target_a if conflict else target_a
        loss = (readout(out[:, 1]).squeeze(-1) - target_a).square().mean()
        loss = loss + (readout(out[:, 2]).squeeze(-1) - target_b).square().mean()
        optimiser.zero_grad()
        (loss + 0.01 * experts.aux).backward()
        optimiser.step()
    with torch.no_grad():
        x = torch.randn(256, d)
        pa = torch.softmax(experts.gates["a"](x), -1)
        pb = torch.softmax(experts.gates["b"](x), -1)
    return float((pa - pb).abs().sum(-1).mean() / 2)


def test_gates_of_two_conflicting_tasks_learn_to_separate():
    assert _gate_separation(conflict=True) > 0.3
    assert _gate_separation(conflict=False) < 0.1


def test_expert_subset_inference_gives_the_full_models_predictions(cohort_store):
    data = BiofmDataModule([cohort_store.url], batch_size=32)
    module = BiofmModule(data.schema, **TINY, experts={"blocks": [0, 1], "top_k": 2, "memory": True}).eval()
    batch = _one_batch(data)
    tasks = list(data.schema["tasks"])
    subset = tasks[1:3]
    with torch.no_grad():
        for p in module.model.memory.parameters():  # a trained memory, not the zero start
            p.normal_(0, 0.1)
        full = module.model(batch["inputs"])["logits"]
        part = module.model(batch["inputs"], tasks=subset)["logits"]
    assert set(part) == set(subset)
    for t in subset:
        assert torch.allclose(full[t], part[t], atol=1e-5)
    assert module.model.expert_flops(subset) < module.model.expert_flops()


def test_experts_log_gate_mass_and_dead_units(cohort_store, tmp_path):
    module, _ = _fit(cohort_store, tmp_path, experts={"blocks": [-1]}, steps=3)
    experts = module.model.expert_blocks()[0]
    assert set(experts.stats["own_mass"]) <= set(module.model.kinds)
    mass = torch.stack(list(experts.stats["own_mass"].values()))
    assert (mass >= 0.1 - 1e-6).all()  # own_floor: no task collapses onto the shared experts
    dead = experts.dead_fractions()
    assert dead and max(float(v) for v in dead.values()) <= 0.9


def test_unknown_expert_option_is_refused():
    from biofm.platform.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown options"):
        BiofmModule({"modalities": {"tabular": {}}, "tasks": {"a": {"kind": "regression"}}}, experts={"k": 1})


# ---- LoRA / SMoRA ---------------------------------------------------------------------------------------------


def _pretrained(cohort_store, tmp_path):
    seed_everything(0, verbose=False)
    data = BiofmDataModule([cohort_store.url], batch_size=32)
    module = BiofmModule(data.schema, **TINY)
    trainer = _trainer(tmp_path / "pre", steps=3)
    trainer.fit(module, datamodule=data)
    path = tmp_path / "pre.ckpt"
    trainer.save_checkpoint(path)
    return path, data


@pytest.mark.parametrize("smora", [None, 2])
def test_lora_trains_only_adapters_and_heads(cohort_store, tmp_path, smora):
    path, data = _pretrained(cohort_store, tmp_path)
    module = BiofmModule(data.schema, **TINY, init_from=str(path), lora={"rank": 4, "experts": smora})
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("heads.", "queries.")) or ".lora_" in n or ".gate." in n for n in trainable)
    assert any(".lora_b" in n for n in trainable)
    before = _state(module)
    _trainer(tmp_path / "ft", steps=4).fit(module, datamodule=data)
    after = _state(module)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("heads.", "queries.")) or ".lora_" in k or ".gate." in k for k in changed)
    assert any(".lora_" in k for k in changed)
    assert not module.model.encoders.training  # frozen parts stay in evaluation mode (no statistics change)


def test_merged_lora_checkpoint_loads_in_the_sdk_with_the_same_predictions(cohort_store, tmp_path):
    import biofm
    from biofm.testing import fake_raw

    path, data = _pretrained(cohort_store, tmp_path)
    module = BiofmModule(data.schema, **TINY, init_from=str(path), lora={"rank": 4})
    trainer = _trainer(tmp_path / "ft", steps=4)
    trainer.fit(module, datamodule=data)
    adapted = tmp_path / "lora.ckpt"
    trainer.save_checkpoint(adapted)
    merged = merge_lora_checkpoint(adapted, tmp_path / "merged.ckpt")
    state = torch.load(merged, weights_only=True)
    assert not any(".lora_" in k for k in state["state_dict"]) and state["hyper_parameters"]["lora"] is None
    from biofm.platform.sdk import keywords

    argument = {name: keyword for keyword, name in keywords().items()}
    inputs = {argument[m]: fake_raw(m, 5) for m in data.schema["modalities"]}
    expected = biofm.load(adapted, quiet=True).predict(**inputs)
    got = biofm.load(merged, quiet=True).predict(**inputs)
    numeric = [c for c in expected.columns if expected[c].dtype.kind == "f"]
    assert numeric
    assert (expected[numeric] - got[numeric]).abs().max().max() < 1e-4
    with pytest.raises(FileExistsError):
        merge_lora_checkpoint(adapted, merged)  # nothing already written is replaced


def test_merge_lora_folds_the_update_into_the_weight():
    torch.manual_seed(0)
    layer = torch.nn.Sequential(LoRALinear(torch.nn.Linear(8, 4), rank=2, alpha=4.0))
    torch.nn.init.normal_(layer[0].lora_b)
    x = torch.randn(3, 8)
    expected = layer(x)
    assert merge_lora(layer) == 1 and isinstance(layer[0], torch.nn.Linear)
    assert torch.allclose(layer(x), expected, atol=1e-6)


def test_modality_dropout_hides_modalities_but_never_all_of_a_sample():
    from biofm.platform.module import drop_modalities

    torch.manual_seed(0)
    present = torch.rand(500, 3) < 0.7
    inputs = {f"m{j}": {"present": present[:, j].float(), "x": torch.zeros(500)} for j in range(3)}
    out = drop_modalities(inputs, 0.5)
    kept = torch.stack([out[f"m{j}"]["present"].bool() for j in range(3)], 1)
    assert not (kept & ~present).any()  # nothing absent becomes present
    assert (kept.any(1) == present.any(1)).all()  # a sample with a modality keeps at least one
    assert 0.3 < kept.sum() / present.sum() < 0.8  # about half hidden
    assert out["m0"]["present"].dtype == torch.float32 and out["m0"]["x"] is inputs["m0"]["x"]


@pytest.mark.parametrize("name", ["pretrain", "pretrain-descriptors", "experts", "finetune", "lora"])
def test_each_transfer_config_composes(name, capsys):
    from pathlib import Path

    from biofm.platform.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "transfer" / f"{name}.yaml"
    with pytest.raises(SystemExit) as done:
        main(["fit", "-c", str(config), "--print_config"])
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "molecule:" in printed and "stores:" in printed
    if name == "experts":
        assert "per_group: 1" in printed and "tox21:" in printed
    if name == "lora":
        assert "rank: 8" in printed and "init_from: runs/transfer-pretrain" in printed
    if name == "pretrain-descriptors":
        assert "descriptors: {}" in printed


def test_sdk_predicts_a_subset_of_tasks_with_the_full_models_values(cohort_store, tmp_path):
    import biofm
    from biofm.platform.sdk import keywords
    from biofm.testing import fake_raw

    seed_everything(0, verbose=False)
    data = BiofmDataModule([cohort_store.url], batch_size=32)
    module = BiofmModule(data.schema, **TINY, experts={"blocks": [-1], "top_k": 1})
    trainer = _trainer(tmp_path, steps=3)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "experts.ckpt")
    model = biofm.load(tmp_path / "experts.ckpt", quiet=True)
    argument = {name: keyword for keyword, name in keywords().items()}
    inputs = {argument[m]: fake_raw(m, 6) for m in data.schema["modalities"]}
    task = list(data.schema["tasks"])[0]
    full = model.predict(**inputs)
    part = model.predict(tasks=[task], **inputs)
    assert not [c for c in part.columns if c.startswith(tuple(t for t in data.schema["tasks"] if t != task))]
    shared = [c for c in part.columns if c.startswith(task) and part[c].dtype.kind == "f"]
    assert shared and (full[shared] - part[shared]).abs().max().max() < 1e-5
    with pytest.raises(ValueError, match="does not predict"):
        model.predict(tasks=["no such task"], **inputs)
