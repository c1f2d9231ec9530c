"""`biofm merge` (issue #22): one multi-task model from specialists fine-tuned from one base."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything

import biofm
from biofm.platform.lightning import BiofmDataModule, BiofmModule
from biofm.platform.merge import MergeError, calibration, merge
from biofm.platform.sdk import keywords, load_module
from biofm.testing import fake_raw

TINY = dict(d_model=16, depth=2, heads=2, latents=2, dropout=0.0)
LEARNED = {"steps": 40, "lr": 0.01}
METHODS = ["average", "task_arithmetic", "ties", "breadcrumbs", "adamerging", "atlas", "twin"]
KEEP_ALL = {"ties": {"density": 1.0}, "breadcrumbs": {"density": 1.0, "outliers": 0.0}}  # no sparsification


def _fit(data, path: Path, steps: int = 4, **settings) -> Path:
    seed_everything(0, verbose=False)
    module = BiofmModule(data.schema, **{**TINY, **settings})
    trainer = Trainer(
        max_steps=steps,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=path.parent,
    )
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(path)
    return path


@pytest.fixture(scope="module")
def zoo(cohort_store, tmp_path_factory):
    """A base trained on every cohort task and three specialists fine-tuned from it on task subsets."""
    root = tmp_path_factory.mktemp("zoo")
    url = cohort_store.url
    base = _fit(BiofmDataModule([url], batch_size=32), root / "base.ckpt")
    groups = {"regression": ["risk_score"], "binary": ["event", "findings"], "classes": ["subtype", "grade"]}
    specialists = {
        name: _fit(BiofmDataModule([url], batch_size=32, tasks=tasks), root / f"{name}.ckpt", init_from=str(base))
        for name, tasks in groups.items()
    }
    return {"base": base, "url": url, "root": root, **specialists}


def _batch(url: str, schema: dict) -> dict:
    return calibration(schema, [url], max_samples=64).batches[0]


def _logits(checkpoint: Path, batch: dict) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return load_module(checkpoint).model(batch["inputs"])["logits"]


def _options(method: str, zoo) -> dict:
    learned = {**LEARNED, "calibration_stores": [zoo["url"]]} if method in ("adamerging", "atlas", "twin") else {}
    return {**KEEP_ALL.get(method, {}), **learned}


@pytest.mark.parametrize("method", METHODS)
def test_merging_copies_of_one_model_gives_that_model(zoo, tmp_path, method):
    """Three copies of one specialist. Its task is a regression: for the learned methods the surrogate (the
    difference from the specialist's prediction) is 0 at the model itself, so the coefficients stay put up to
    the optimiser's step; entropy has no such fixed point."""
    copies = []
    for i in range(3):
        copies.append(tmp_path / f"copy{i}.ckpt")
        copies[-1].write_bytes(zoo["regression"].read_bytes())
    out = tmp_path / "merged.ckpt"
    merge(copies, base=zoo["base"], method=method, out=out, progress=False, **_options(method, zoo))
    module = load_module(out)
    batch = _batch(zoo["url"], module.model.schema)
    got, expected = _logits(out, batch), _logits(zoo["regression"], batch)
    tolerance = 5e-3 if method in ("adamerging", "atlas") else 1e-5
    assert set(got) == set(expected) == {"risk_score"}
    assert torch.allclose(got["risk_score"], expected["risk_score"], atol=tolerance)


def test_task_arithmetic_with_scale_one_and_one_specialist_is_the_specialist(zoo, tmp_path):
    out = merge([zoo["binary"]], base=zoo["base"], method="task_arithmetic", scale=1.0, out=tmp_path / "m.ckpt")
    merged = torch.load(out["out"], weights_only=True)["state_dict"]
    specialist = torch.load(zoo["binary"], weights_only=True)["state_dict"]
    model_keys = [k for k in specialist if k.startswith("model.")]
    assert model_keys and all(torch.allclose(merged[k].float(), specialist[k].float(), atol=1e-6) for k in model_keys)


def test_task_arithmetic_with_one_specialist_is_wise_ft_interpolation(zoo, tmp_path):
    """WiSE-FT (Wortsman et al. 2022): (1 − α)·pretrained + α·fine-tuned over the shared weights; the fine-tuned
    model's own heads are its own."""
    out = merge([zoo["binary"]], base=zoo["base"], method="task_arithmetic", scale=0.4, out=tmp_path / "w.ckpt")
    merged = torch.load(out["out"], weights_only=True)["state_dict"]
    tuned = torch.load(zoo["binary"], weights_only=True)["state_dict"]
    base = torch.load(zoo["base"], weights_only=True)["state_dict"]
    trunk = [k for k in tuned if k.startswith("model.trunk.") and tuned[k].is_floating_point()]
    moved = [k for k in trunk if not torch.allclose(tuned[k], base[k])]
    assert moved  # fine-tuning changed the trunk, so the test can tell interpolation from either end
    for k in moved:
        assert torch.allclose(merged[k].float(), torch.lerp(base[k].float(), tuned[k].float(), 0.4), atol=1e-6), k
    heads = [k for k in tuned if k.startswith("model.heads.")]
    assert heads and all(torch.equal(merged[k], tuned[k]) for k in heads)


def test_breadcrumbs_at_full_density_without_outlier_cut_is_task_arithmetic(zoo, tmp_path):
    models = [zoo["binary"], zoo["classes"]]
    common = dict(base=zoo["base"], scale=0.7)
    merge(models, method="task_arithmetic", out=tmp_path / "ta.ckpt", **common)
    merge(models, method="breadcrumbs", density=1.0, outliers=0.0, out=tmp_path / "bc.ckpt", **common)
    merge(models, method="breadcrumbs", out=tmp_path / "bc-default.ckpt", **common)  # 0.9 kept, 1 % outliers
    ta, bc, sparse = (
        torch.load(tmp_path / f, weights_only=True)["state_dict"] for f in ("ta.ckpt", "bc.ckpt", "bc-default.ckpt")
    )
    assert all(torch.allclose(ta[k], bc[k], atol=1e-6) for k in ta)
    assert any(not torch.allclose(ta[k], sparse[k]) for k in ta if ".trunk." in k)  # the masks do act


def test_ties_keeps_only_the_entries_that_agree_with_the_elected_sign():
    from biofm.platform.merge import trim

    tau = torch.tensor([0.1, -3.0, 0.2, 2.0, -0.05])
    assert torch.equal(trim(tau, 0.4), torch.tensor([0.0, -3.0, 0.0, 2.0, 0.0]))  # the 40 % largest
    assert torch.equal(trim(tau, 1.0), tau)


def test_adamerging_lowers_the_calibration_entropy(zoo, tmp_path):
    """Classification specialists only, so the objective is the entropy alone; measured here over every
    calibration input, independently of the merge's own record, against task arithmetic at λ = 1/N (where
    AdaMerging starts)."""
    models, url = [zoo["binary"], zoo["classes"]], zoo["url"]
    ta = tmp_path / "ta.ckpt"
    merge(models, base=zoo["base"], method="task_arithmetic", out=ta)
    ada = tmp_path / "ada.ckpt"
    summary = merge(
        models,
        base=zoo["base"],
        method="adamerging",
        out=ada,
        calibration_stores=[url],
        steps=60,
        lr=0.02,
        progress=False,
    )
    assert summary["objective"]["end"] < summary["objective"]["start"]

    def entropy(checkpoint):
        module = load_module(checkpoint)
        total, count = 0.0, 0
        for batch in calibration(module.model.schema, [url]).batches:
            with torch.no_grad():
                logits = module.model(batch["inputs"])["logits"]
            for task, kind in module.model.kinds.items():
                probs = kind.predict(logits[task])["probs"].clamp(1e-6, 1 - 1e-6)
                if kind.multilabel:
                    h = -(probs * probs.log() + (1 - probs) * (1 - probs).log()).sum(1)
                else:
                    h = -(probs * probs.log()).sum(1)
                total, count = total + float(h.sum()), count + len(h)
        return total / count

    assert entropy(ada) < entropy(ta)
    saved = torch.load(ada, weights_only=True)["hyper_parameters"]["merged"]
    assert saved["method"] == "adamerging" and set(saved["coefficients"]) == {"binary", "classes"}


def test_atlas_learns_one_coefficient_per_parameter_block_and_uses_labels(zoo, tmp_path):
    summary = merge(
        [zoo["binary"], zoo["regression"]],
        base=zoo["base"],
        method="atlas",
        out=tmp_path / "atlas.ckpt",
        calibration_stores=[zoo["url"]],
        labelled_fraction=0.5,
        progress=False,
        **LEARNED,
    )
    blocks = summary["coefficients"]["binary"]
    assert any(k.endswith(".weight") for k in blocks) and any(k.endswith(".bias") for k in blocks)
    assert summary["labelled_fraction"] == 0.5 and summary["objective"]["end"] < summary["objective"]["start"]


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "breadcrumbs", "twin"])
def test_a_specialist_merged_alone_predicts_as_it_did_in_the_sdk(zoo, tmp_path, method):
    out = tmp_path / "alone.ckpt"
    merge([zoo["binary"]], base=zoo["base"], method=method, out=out, progress=False, **_options(method, zoo))
    argument = {name: keyword for keyword, name in keywords().items()}
    schema = torch.load(zoo["binary"], weights_only=True)["hyper_parameters"]["schema"]
    inputs = {argument[m]: fake_raw(m, 6) for m in schema["modalities"]}
    expected = biofm.load(zoo["binary"], quiet=True).predict(**inputs)
    got = biofm.load(out, quiet=True).predict(**inputs)
    numeric = [c for c in expected.columns if expected[c].dtype.kind == "f"]
    assert numeric and list(got.columns) == list(expected.columns)
    assert (expected[numeric] - got[numeric]).abs().max().max() < 1e-4


def test_each_task_keeps_the_head_of_the_model_that_trained_it(zoo, tmp_path):
    out = tmp_path / "m.ckpt"
    summary = merge([zoo["binary"], zoo["classes"], zoo["regression"]], base=zoo["base"], method="ties", out=out)
    assert set(summary["tasks"]) == {"event", "findings", "subtype", "grade", "risk_score"}
    merged = torch.load(out, weights_only=True)["state_dict"]
    for name, tasks in (("binary", ["event", "findings"]), ("classes", ["subtype", "grade"])):
        own = torch.load(zoo[name], weights_only=True)["state_dict"]
        for task in tasks:
            assert torch.equal(merged[f"model.heads.{task}.weight"], own[f"model.heads.{task}.weight"])
            assert torch.equal(merged[f"model.queries.{task}"], own[f"model.queries.{task}"])


def test_data_free_merges_hold_no_more_than_two_models_at_once(zoo, tmp_path):
    models = [zoo["binary"], zoo["classes"], zoo["regression"]]
    for method in ("task_arithmetic", "ties", "breadcrumbs"):
        summary = merge(models, base=zoo["base"], method=method, out=tmp_path / f"{method}.ckpt")
        assert summary["models_held_at_once"] == 2  # the base and one specialist


def test_merging_another_architecture_is_refused_naming_the_difference(zoo, tmp_path):
    other = _fit(BiofmDataModule([zoo["url"]], batch_size=32, tasks=["event"]), tmp_path / "wide.ckpt", d_model=32)
    with pytest.raises(MergeError, match="d_model"):
        merge([zoo["binary"], other], base=zoo["base"], method="ties", out=tmp_path / "m.ckpt")
    assert not (tmp_path / "m.ckpt").exists()


def test_merging_other_featuriser_settings_is_refused_naming_the_modality(zoo, tmp_path):
    checkpoint = torch.load(zoo["classes"], weights_only=True)
    text = checkpoint["hyper_parameters"]["schema"]["modalities"]["text"]
    text["max_length"] = int(text.get("max_length", 48)) + 16
    torch.save(checkpoint, tmp_path / "other.ckpt")
    with pytest.raises(MergeError, match=r"modality 'text'.*max_length"):
        merge([zoo["binary"], tmp_path / "other.ckpt"], base=zoo["base"], method="average", out=tmp_path / "m.ckpt")


def test_twin_at_full_rank_routed_to_one_specialist_predicts_as_that_specialist(zoo, tmp_path):
    """Exclusive parts kept whole (a rank above every matrix's size), the router forced to specialist 0:
    θ_shared + Δ_0 = θ_0, so its tasks' logits are the specialist's; routed elsewhere they are not."""
    out = tmp_path / "twin.ckpt"
    merge(
        [zoo["binary"], zoo["classes"]],
        base=zoo["base"],
        method="twin",
        out=out,
        rank=10_000,
        calibration_stores=[zoo["url"]],
        progress=False,
        **LEARNED,
    )
    module = load_module(out)
    batch = _batch(zoo["url"], module.model.schema)
    last = module.model.router[-1]
    expected = _logits(zoo["binary"], batch)
    for chosen in (0, 1):
        with torch.no_grad():
            last.weight.zero_()
            last.bias.copy_(torch.tensor([1.0, 0.0]) if chosen == 0 else torch.tensor([0.0, 1.0]))
            out_ = module.model(batch["inputs"])
        assert bool((out_["expert"] == chosen).all())
        close = all(torch.allclose(out_["logits"][t], expected[t], atol=1e-5) for t in expected)
        assert close == (chosen == 0)


def test_merged_checkpoint_tests_fine_tunes_and_merges_from_the_command_line(zoo, tmp_path, capsys):
    from biofm.platform.cli import main

    out = tmp_path / "twin.ckpt"
    main(
        [
            "merge",
            "--base", str(zoo["base"]),
            "--models", str(zoo["binary"]), str(zoo["regression"]),
            "--method", "twin",
            "--calibration", zoo["url"],
            "--steps", "20",
            "--out", str(out),
        ]
    )  # fmt: skip
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["method"] == "twin" and Path(summary["out"]) == out
    with pytest.raises(SystemExit):  # nothing already written is replaced
        main(["merge", "--base", str(zoo["base"]), "--models", str(zoo["binary"]), "--out", str(out)])
    configs = Path(__file__).resolve().parents[1] / "configs"
    run = tmp_path / "run"
    main(
        [
            "test",
            "--trainer", str(configs / "trainer" / "cpu.yaml"),
            "--data", str(configs / "data" / "synthetic.yaml"),
            "--data.stores", f"[{zoo['url']}]",
            "--trainer.default_root_dir", str(run),
            "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false",
            "--ckpt_path", str(out),
        ]
    )  # fmt: skip
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert any(k.startswith("event/") for k in metrics) and any(k.startswith("risk_score/") for k in metrics)
    data = BiofmDataModule([zoo["url"]], batch_size=32, tasks=["risk_score"])
    module = BiofmModule(data.schema, **TINY, init_from=str(out))  # fine-tuning from the merged model
    assert torch.equal(module.model.cls, load_module(out).model.cls)


def test_twin_routed_by_task_at_full_rank_predicts_every_task_as_its_specialist(zoo, tmp_path):
    """No router: each task's group takes its own specialist's exclusive part, so at a rank above every
    matrix's size each task's logits are its specialist's (the shared part alone's are not)."""
    models = [zoo["binary"], zoo["classes"]]
    out = tmp_path / "twin-task.ckpt"
    summary = merge(models, base=zoo["base"], method="twin", route="task", rank=10_000, out=out, progress=False)
    assert summary["route"] == "task" and "router_accuracy" not in summary  # no calibration needed
    module = load_module(out)
    batch = _batch(zoo["url"], module.model.schema)
    with torch.no_grad():
        got = module.model(batch["inputs"])["logits"]
        shared = module.model(batch["inputs"], route=False)["logits"]
    for specialist in models:
        expected = _logits(specialist, batch)
        for task in expected:
            assert torch.allclose(got[task], expected[task], atol=1e-5), task
    assert not all(torch.allclose(shared[t], got[t], atol=1e-3) for t in got)


@pytest.fixture(scope="module")
def molecule_zoo(tmp_path_factory):
    """A molecule base (GINE with batch norm) and two specialists fine-tuned from it."""
    from biofm.testing import write_fake_modality_store

    root = tmp_path_factory.mktemp("molecules")
    store = write_fake_modality_store(str(root / "mol.zarr"), "molecule", n=200)
    data = BiofmDataModule([store.url], batch_size=32)
    base = _fit(data, root / "base.ckpt")
    a = _fit(data, root / "a.ckpt", steps=6, init_from=str(base), lr=0.01)
    b = _fit(data, root / "b.ckpt", steps=3, init_from=str(base), lr=0.01)
    return store, base, a, b


def test_renormalise_measures_batch_norm_statistics_of_the_merged_model(molecule_zoo, tmp_path):
    """A molecule model (GINE with batch norm): after `renormalise`, the first norm's running mean is the
    mean over the calibration batches of its inputs' batch means, in the merged model."""
    store, base, a, b = molecule_zoo
    plain = merge([a, b], base=base, method="average", out=tmp_path / "plain.ckpt")
    summary = merge(
        [a, b], base=base, method="average", out=tmp_path / "renormalised.ckpt", renormalise=True,
        calibration_stores=[store.url], calibration_samples=96,
    )  # fmt: skip
    assert summary["renormalised"] == 4 and "renormalised" not in plain  # the encoder's four norms
    module = load_module(tmp_path / "renormalised.ckpt")
    norm = module.model.encoders["molecule"].norms[0]
    means = []
    norm.register_forward_pre_hook(lambda m, args: means.append(args[0].mean(dim=0)))
    with torch.no_grad():
        for batch in calibration(module.model.schema, [store.url], max_samples=96).batches:
            module.model(batch["inputs"])
    assert torch.allclose(norm.running_mean, torch.stack(means).mean(dim=0), atol=1e-4)
    averaged = torch.load(tmp_path / "plain.ckpt", weights_only=True)["state_dict"]
    assert not torch.allclose(averaged["model.encoders.molecule.norms.0.running_mean"], norm.running_mean, atol=1e-4)


def test_a_merged_model_predicts_a_cohort_manifest_as_the_sdk_does(molecule_zoo, tmp_path):
    from biofm.platform.cohort import predict_cohort

    store, base, a, b = molecule_zoo
    out = tmp_path / "twin.ckpt"
    merge([a, b], base=base, method="twin", route="task", rank=4, out=out, progress=False)
    smiles = ["CCO", "c1ccccc1O", "CC(=O)O", "CCN"]
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame({"sample_id": [f"M{i}" for i in range(4)], "smiles": smiles}).to_csv(manifest, index=False)
    summary = predict_cohort(str(out), str(manifest), str(tmp_path / "preds"), batch_size=2, progress=False)
    assert summary["predicted"] == 4
    cohort = pd.read_parquet(tmp_path / "preds" / "predictions.parquet").set_index("sample_id")
    sdk = biofm.load(out, quiet=True).predict(smiles=smiles)
    assert np.allclose(cohort["flag/prob/1"].to_numpy(float), sdk["flag/prob/1"].to_numpy(float), atol=1e-5)


def test_specialists_saved_as_last_ckpt_get_distinct_names():
    from biofm.platform.merge import model_names

    paths = ["runs/esol/checkpoints/last.ckpt", "runs/tox21/checkpoints/last.ckpt", "models/freesolv.ckpt"]
    assert model_names(paths) == ["esol/last", "tox21/last", "freesolv"]
    assert model_names(["a/x.ckpt", "a/x.ckpt"]) == ["a/x#1", "a/x#2"]
