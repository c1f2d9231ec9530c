"""Training end to end: the CLI round trip, fusion, fine-tuning, DDP, safe checkpoints, clean run dirs,
and config errors caught before any training starts."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from biofm.datasets.synthetic import cohort, prepare_synthetic
from biofm.platform.checkpoint import UnsafeCheckpointError, load_pretrained, safe_load
from biofm.platform.cli import main
from biofm.platform.lightning import BiofmDataModule, BiofmModule, ConfigError
from biofm.platform.store import StoreWriter
from biofm.recipes.runs import fit_and_test

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BIOFM = str(Path(sys.executable).with_name("biofm"))


def _cli(*args: str) -> None:
    main(list(args))


def _base(store_url: str, run_dir: Path) -> list[str]:
    return [
        "--trainer",
        str(CONFIGS / "trainer" / "cpu.yaml"),
        "--model",
        str(CONFIGS / "model" / "tiny.yaml"),
        "--data",
        str(CONFIGS / "data" / "synthetic.yaml"),
        "--data.stores",
        f"[{store_url}]",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
    ]


def test_fit_test_predict_round_trip_through_the_cli(cohort_store, tmp_path):
    run = tmp_path / "run"
    _cli("fit", *_base(cohort_store.url, run), "--trainer.max_epochs", "2")
    last = run / "checkpoints" / "last.ckpt"
    assert last.exists() and (run / "logs" / "fit" / "metrics.csv").exists()

    _cli("test", *_base(cohort_store.url, run), "--ckpt_path", str(last))
    metrics = json.loads((run / "test_metrics.json").read_text())
    for key in (
        "event/auroc",
        "event/auprc",
        "subtype/accuracy",
        "risk_score/rmse",
        "risk_score/mae",
        "risk_score/r2",
        "grade/accuracy",
        "findings/auroc",
        "macro/score",
    ):
        assert np.isfinite(metrics[key]), key
    assert (run / "logs" / "fit" / "metrics.csv").exists()  # testing keeps the training log

    _cli("predict", *_base(cohort_store.url, run), "--ckpt_path", str(last))
    predictions = pd.read_parquet(run / "predictions.parquet")
    test_ids = set(cohort_store.index("sample_id")[cohort_store.index("split") == "test"])
    assert set(predictions["sample_id"]) == test_ids and len(predictions) == len(test_ids)
    assert set(predictions["subtype"]) <= {"luminal", "basal", "mixed"}
    probs = predictions[[f"subtype/prob/{c}" for c in ("luminal", "basal", "mixed")]].sum(axis=1)
    np.testing.assert_allclose(probs, 1.0, rtol=1e-5)
    # regression comes back in original units (the synthetic risk score is centred near 10)
    assert 5 < predictions["risk_score"].mean() < 15


def test_print_config_composes_the_pieces(cohort_store, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        _cli("fit", *_base(cohort_store.url, tmp_path), "--print_config")
    assert done.value.code == 0
    printed = capsys.readouterr().out
    assert "d_model: 32" in printed and "accelerator: cpu" in printed and cohort_store.url in printed


@pytest.fixture(scope="module")
def fusion_store(tmp_path_factory):
    return prepare_synthetic(str(tmp_path_factory.mktemp("fusion") / "cohort.zarr"), n=1500, seed=11)


def test_the_fused_model_beats_every_single_modality_model_and_degrades_gracefully(fusion_store, tmp_path):
    kwargs = {"epochs": 10, "loggers": False, "model": {"d_model": 48, "depth": 2, "latents": 6}}
    fused = fit_and_test([fusion_store.url], tmp_path / "fused", test_without=["text", "tabular"], **kwargs)
    singles = {m: fit_and_test([fusion_store.url], tmp_path / m, modalities=[m], **kwargs) for m in ("tabular", "text")}
    print(
        {
            "fused": fused["macro/score"],
            **{m: s["macro/score"] for m, s in singles.items()},
            "fused without text": fused["without:text"]["macro/score"],
            "fused without tabular": fused["without:tabular"]["macro/score"],
        }
    )
    for modality, single in singles.items():
        assert fused["macro/score"] > single["macro/score"] + 0.08, modality
        assert fused["event/auroc"] > single["event/auroc"] + 0.04, modality
        assert fused["risk_score/r2"] > single["risk_score/r2"] + 0.1, modality
    # leaving a modality out at test time still gives finite, better-than-chance predictions
    for dropped in ("text", "tabular"):
        reduced = fused[f"without:{dropped}"]
        assert all(np.isfinite(v) for v in reduced.values())
        assert 0.55 < reduced["event/auroc"] and reduced["macro/score"] < fused["macro/score"]


def test_fine_tuning_loads_encoders_and_trunk_and_adds_a_fresh_head(cohort_store, tmp_path):
    from lightning.pytorch import Trainer

    data = BiofmDataModule([cohort_store.url], tasks=["event", "subtype"], batch_size=32)
    pretrained = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2)
    trainer = Trainer(
        max_steps=4,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(pretrained, datamodule=data)
    ckpt = tmp_path / "pretrained.ckpt"
    trainer.save_checkpoint(ckpt)

    new_data = BiofmDataModule([cohort_store.url], tasks=["event", "risk_score"], batch_size=32)
    tuned = BiofmModule(
        new_data.schema, d_model=16, depth=1, heads=2, latents=2, init_from=str(ckpt), freeze_encoders=True
    )
    old, new = pretrained.model.state_dict(), tuned.model.state_dict()
    for key in (
        "trunk.0.attn.q.weight",
        "encoders.text.tokens.weight",
        "resamplers.tabular.latents",
        "heads.event.weight",
        "queries.event",
    ):
        torch.testing.assert_close(new[key], old[key])
    assert "heads.risk_score.weight" in new and "heads.subtype.weight" not in new
    assert not any(p.requires_grad for p in tuned.model.encoders.parameters())
    fresh = BiofmModule(new_data.schema, d_model=16, depth=1, heads=2, latents=2, init_from=str(ckpt), fresh_heads=True)
    assert not torch.equal(fresh.model.state_dict()["heads.event.weight"], old["heads.event.weight"])
    Trainer(
        max_steps=3,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    ).fit(tuned, datamodule=new_data)
    assert torch.isfinite(tuned.model.heads["risk_score"].weight).all()
    # the encoders did not move while frozen
    torch.testing.assert_close(
        tuned.model.state_dict()["encoders.text.tokens.weight"], old["encoders.text.tokens.weight"]
    )


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_with_a_planted_pickle_payload_is_refused(cohort_store, tmp_path, capsys):
    """Every entry point that reads a checkpoint refuses it before the payload can run: the loader, fine-tuning,
    the Lightning commands, the SDK (a file or a run directory), cohort inference and the slide heatmap."""
    import biofm
    from biofm.modalities.wsi.heatmap import slide_heatmap
    from biofm.platform.cohort import predict_cohort

    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"schema": {}}, "payload": _Payload(marker)}, evil)
    run = tmp_path / "evil-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "best-epoch=0.ckpt").write_bytes(evil.read_bytes())
    manifest = tmp_path / "cohort.csv"
    manifest.write_text("sample_id,smiles\nC1,CCO\n")
    slide = tmp_path / "slide.tiff"
    slide.write_bytes(b"not read: the checkpoint is refused first")
    calls = {
        "safe_load": lambda: safe_load(evil),
        "fine-tuning": lambda: load_pretrained(BiofmModule(BiofmDataModule([cohort_store.url]).schema).model, evil),
        "biofm.load(file)": lambda: biofm.load(evil),
        "biofm.load(run dir)": lambda: biofm.load(run),
        "predict_cohort": lambda: predict_cohort(str(evil), str(manifest), str(tmp_path / "out"), progress=False),
        "slide_heatmap": lambda: slide_heatmap(str(evil), str(slide), tmp_path / "heat.png"),
    }
    for name, call in calls.items():
        with pytest.raises(UnsafeCheckpointError, match="refusing to load checkpoint .*evil"):
            call()
        assert not marker.exists(), f"{name} ran the payload"
    commands = {
        "biofm test --ckpt_path": ["test", *_base(cohort_store.url, tmp_path / "run"), "--ckpt_path", str(evil)],
        "biofm fit --model.init_from": [
            "fit",
            *_base(cohort_store.url, tmp_path / "run"),
            "--model.init_from",
            str(evil),
        ],
        "biofm predict-cohort": [
            "predict-cohort",
            "--checkpoint",
            str(run),
            "--manifest",
            str(manifest),
            "--out",
            str(tmp_path / "out2"),
        ],
        "biofm heatmap": [
            "heatmap",
            "--checkpoint",
            str(evil),
            "--slide",
            str(slide),
            "--out",
            str(tmp_path / "heat.png"),
        ],
    }
    for name, argv in commands.items():
        with pytest.raises(SystemExit) as done:
            _cli(*argv)
        assert done.value.code == 2 and "refusing to load checkpoint" in capsys.readouterr().err, name
        assert not marker.exists(), f"{name} ran the payload"
    # the payload is real: unpickled without the guard, it runs
    torch.load(evil, weights_only=False)
    assert marker.exists()


def _identifiers(store) -> list[bytes]:
    raw = cohort(store.n, seed=3)
    values = list(store.index("sample_id")) + list(store.index("subject_id"))
    values += [r for r in raw["report"] if r]
    return [v.encode() for v in values]


def _vocabulary(store) -> list[bytes]:
    """Words of the tokenizer vocabulary learned from the cohort's reports (long ones, not metric names)."""
    vocab = json.loads(store.modalities["text"]["tokenizer"])["model"]["vocab"]
    names = " ".join(list(store.tasks) + ["auroc", "auprc", "accuracy", "score", "macro", "pretext"])
    return [w.encode() for w in vocab if len(w) >= 6 and w.isalpha() and w not in names]


def test_a_run_directory_holds_no_sample_or_subject_id_or_report_text(cohort_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # the real tracker, writing its files in the run dir
    run = tmp_path / "run"
    fit_and_test([cohort_store.url], run, epochs=1, model={"d_model": 16, "depth": 1, "heads": 2, "latents": 2})
    files = [p for p in run.rglob("*") if p.is_file()]
    assert any(p.name == "metrics.csv" for p in files)
    # W&B (offline) recorded the per-task metrics, but no checkpoint unless asked
    wandb_runs = list((run / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) == 1, f"expected one offline W&B run, found {wandb_runs}"
    recorded = sorted(p.name for p in (wandb_runs[0] / "files").iterdir())
    assert not any(name.endswith(".ckpt") for name in recorded), f"a checkpoint in the W&B run files: {recorded}"
    assert b"val/event/auroc" in next(wandb_runs[0].glob("*.wandb")).read_bytes(), "metrics not in the W&B run"
    needles = _identifiers(cohort_store)
    assert len(needles) > 1000
    for path in files:
        content = path.read_bytes()
        leaked = [n for n in needles if n in content]
        assert not leaked, f"{path} holds {len(leaked)} identifiers or report texts"
    # no tokenizer vocabulary outside the checkpoints, and no store path in what W&B would upload
    vocabulary = _vocabulary(cohort_store)
    assert len(vocabulary) > 20
    for path in files:
        if path.suffix == ".ckpt":
            assert sum(w in path.read_bytes() for w in vocabulary) > len(vocabulary) // 2  # the scan can find them
            continue
        content = path.read_bytes()
        found = [w for w in vocabulary if w in content]
        assert len(found) <= len(vocabulary) // 20, f"{path} holds {len(found)} vocabulary words, e.g. {found[:5]}"
        if "wandb" in path.parts:
            assert cohort_store.url.encode() not in content, f"{path} names the store's path"
    # the scan finds ids where they are meant to be (predictions), so it can fail
    fit_and_test(
        [cohort_store.url],
        tmp_path / "with-predictions",
        epochs=1,
        loggers=False,
        predict=True,
        model={"d_model": 16, "depth": 1, "heads": 2, "latents": 2},
    )
    content = (tmp_path / "with-predictions" / "predictions.parquet").read_bytes()
    assert any(n in content for n in needles)


def test_the_tracker_files_of_a_cli_run_name_no_store_path(cohort_store, tmp_path):
    """W&B records the command line (with the store paths) and the program in its run metadata, which
    `wandb sync` uploads: biofm turns that collection off."""
    run = tmp_path / "run"
    done = subprocess.run(
        [BIOFM, "fit", *_base(cohort_store.url, run), "--trainer.max_epochs", "1"],
        capture_output=True,
        text=True,
        env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    files = [p for p in (run / "wandb").rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files)
    for path in files:
        assert cohort_store.url.encode() not in path.read_bytes(), f"{path} names the store's path"


def test_the_checkpoint_reaches_the_tracker_only_when_asked(cohort_store, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    fit_and_test(
        [cohort_store.url],
        tmp_path / "run",
        epochs=1,
        checkpoint_artifact=True,
        model={"d_model": 16, "depth": 1, "heads": 2, "latents": 2},
    )
    wandb_run = next((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert any(p.suffix == ".ckpt" for p in (wandb_run / "files").iterdir())


def _bad_label_store(path: str) -> str:
    writer = StoreWriter(
        path,
        source="bad",
        modalities={"tabular": {"numeric": {"x": [0.0, 1.0]}, "categorical": {}}},
        tasks={"grade": {"kind": "multiclass", "classes": ["a", "b", "c"]}},
    )
    writer.write_batch(
        0,
        sample_id=[f"s{i}" for i in range(20)],
        subject_id=[f"p{i}" for i in range(20)],
        labels={"grade": np.arange(20) % 5},
        arrays={"tabular/numeric": np.zeros((20, 1), np.float32)},
    )
    return writer.finalize().url


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.tasks", "[mortality]"], r"task 'mortality' is in no store; the stores have \['event'"),
        (["--data.modalities", "[retina]"], r"could not resolve modality 'retina' among choices"),
        (
            ["--data.tasks", "{event: regression}"],
            r"asks for a regression head for task 'event', but its labels .* binary",
        ),
        (["--model.balancing", "gradnorm"], r"could not resolve balancing strategy 'gradnorm'"),
    ],
)
def test_bad_configs_give_one_clear_error_before_training(cohort_store, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as done:
        _cli("fit", *_base(cohort_store.url, tmp_path / "run"), *extra)
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert "Traceback" not in err and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data.batch_size", "0"], r"data.batch_size must be a whole number of at least 1, got 0"),
        (
            ["--model.d_model", "30", "--model.heads", "4"],
            r"model.d_model \(30\) must be divisible by model.heads \(4\)",
        ),
        (["--model.lr", "-0.1"], r"model.lr must be a number above 0, got -0.1"),
        (["--model.dropout", "1.5"], r"model.dropout must be in \[0, 1\), got 1.5"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_any_data_is_read(tmp_path, capsys, extra, message):
    missing = tmp_path / "not-prepared-yet.zarr"  # the settings are refused before the store is even opened
    with pytest.raises(SystemExit) as done:
        _cli("fit", *_base(str(missing), tmp_path / "run"), *extra)
    err = capsys.readouterr().err
    assert done.value.code == 2 and re.search(message, err), err
    assert "no store at this path" not in err and "Traceback" not in err


def test_ckpt_path_names_the_model_settings_of_the_command_line_it_replaces(cohort_store, tmp_path, capsys):
    run = tmp_path / "run"
    _cli("fit", *_base(cohort_store.url, run), "--trainer.max_epochs", "1")
    capsys.readouterr()
    _cli(
        "test",
        *_base(cohort_store.url, run),
        "--ckpt_path",
        str(run / "checkpoints" / "last.ckpt"),
        "--model.lr",
        "0.05",
        "--model.depth",
        "3",
    )
    err = capsys.readouterr().err
    warning = next(line for line in err.splitlines() if line.startswith("biofm: warning: --ckpt_path"))
    assert "model.lr 0.05 → 0.003" in warning and "model.depth 3 → 1" in warning
    assert "d_model" not in warning  # not given on the command line: nothing to say


@pytest.mark.parametrize(
    "kind, words",
    [
        ("truncated", "the checkpoint is truncated or damaged"),
        ("text", "the file is readable characters, not a checkpoint"),
    ],
)
def test_a_file_that_is_not_a_checkpoint_stops_test_and_fine_tuning_with_one_error(
    cohort_store, tmp_path, capsys, kind, words
):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(64, 64)}, "hyper_parameters": {}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2] if kind == "truncated" else b"lr: 0.1\n")
    for extra in (["test", "--ckpt_path", str(bad)], ["fit", "--model.init_from", str(bad)]):
        with pytest.raises(SystemExit) as done:
            _cli(extra[0], *_base(cohort_store.url, tmp_path / "run"), *extra[1:])
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("biofm: error:")]
        assert done.value.code == 2 and len(lines) == 1 and words in lines[0], err
        assert "Traceback" not in err and "unpickling" not in err


def test_labels_that_do_not_fit_their_head_stop_the_run_before_training(tmp_path):
    url = _bad_label_store(str(tmp_path / "bad.zarr"))
    with pytest.raises(
        ConfigError,
        match=r"bad.zarr labels/grade: labels of task 'grade' do not fit a multiclass "
        r"head: expected class indices 0..2",
    ):
        BiofmDataModule([url])


@pytest.mark.slow
def test_a_two_process_ddp_fit_on_cpu(cohort_store, tmp_path):
    """Two gloo ranks through Lightning: each epoch the ranks train disjoint halves that cover the training
    split once, in the same number of steps, and end with the same weights."""
    run, rows = tmp_path / "ddp", tmp_path / "rows-{rank}.txt"
    args = [
        BIOFM,
        "fit",
        *_base(cohort_store.url, run),
        "--trainer",
        str(CONFIGS / "trainer" / "ddp-cpu.yaml"),
        "--trainer.default_root_dir",
        str(run),
        "--trainer.max_epochs",
        "2",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        "--trainer.callbacks",
        f"[{{class_path: biofm.testing.RowLog, init_args: {{path: '{rows}', epoch: true}}}}, "
        f"{{class_path: biofm.testing.WeightChecksum, init_args: {{out_dir: '{tmp_path}'}}}}]",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    done = subprocess.run(args, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (
        "world_size: 2" in done.stderr + done.stdout
        or "Initializing distributed: GLOBAL_RANK: 1" in done.stderr + done.stdout
    )
    log = pd.read_csv(run / "logs" / "fit" / "metrics.csv")
    assert log["val/macro/score"].dropna().size == 2 and np.isfinite(log["train/loss"].dropna()).all()
    assert (run / "checkpoints" / "last.ckpt").exists()
    per_rank = [
        [list(map(int, line.split())) for line in Path(str(rows).format(rank=r)).read_text().splitlines()]
        for r in (0, 1)
    ]
    train_rows = set(np.flatnonzero(cohort_store.index("split") == "train").tolist())
    for epoch in (0, 1):
        seen = [[r for line in lines if line[0] == epoch for r in line[2:]] for lines in per_rank]
        steps = [sum(line[0] == epoch for line in lines) for lines in per_rank]
        assert steps[0] == steps[1] > 0
        assert not set(seen[0]) & set(seen[1]) and set(seen[0]) | set(seen[1]) == train_rows
        assert len(seen[0]) + len(seen[1]) == len(train_rows)
    weights = [float((tmp_path / f"weights-rank{r}.txt").read_text()) for r in (0, 1)]
    assert weights[0] == pytest.approx(weights[1], rel=1e-6)  # the ranks stayed in step


@pytest.mark.slow
def test_the_demo_runs_end_to_end(tmp_path, monkeypatch):
    from biofm.recipes.demo import run_demo

    summary = run_demo(str(tmp_path / "demo"), n=300, epochs=1, slides=20)
    fused = summary["test"]["fused"]
    assert "event/auroc" in fused and "without:text" in fused
    assert any(k.startswith("freesolv_hydration_free_energy/") for k in fused)  # the molecule sources joined
    run = tmp_path / "demo" / "runs" / "fused"
    for produced in ("training_curves.png", "predictions.parquet", "test_metrics.json"):
        assert (run / produced).exists(), produced
    predictions = pd.read_parquet(run / "predictions.parquet")
    assert {"synthetic", "freesolv", "solubility"} <= set(predictions["source"])
    biobank = summary["test"]["biobank"]  # slides + report + case → slide metadata, with and without slides
    assert "stain/auroc" in biobank["slides + report + case"] and "site/auroc" in biobank["report + case"]
    assert (tmp_path / "demo" / "biobank" / "heatmap.png").exists()
    assert "glaucoma/auroc" in summary["test"]["oct"]


def test_pseudo_labels_fill_only_missing_labels_the_model_is_confident_about_and_reach_the_loss():
    schema = {
        "modalities": {"tabular": {"version": 1, "numeric": {"age": [60.0, 10.0]}, "categorical": {}}},
        "tasks": {"flag": {"kind": "binary"}, "grade": {"kind": "multiclass", "classes": ["a", "b", "c"]}},
    }
    module = BiofmModule(
        schema,
        d_model=8,
        depth=1,
        heads=2,
        latents=2,
        pseudo_labels={"threshold": 0.9, "start_epoch": 0, "tasks": ["flag"]},
    )
    nan = float("nan")
    batch = {
        "row": torch.arange(4),
        "labels": {"flag": torch.tensor([1.0, nan, nan, nan]), "grade": torch.tensor([nan, nan, 0.0, 1.0])},
    }
    out = {
        "logits": {
            "flag": torch.tensor([[-5.0], [5.0], [-5.0], [0.1]]),  # p = .007, .993, .007, .52
            "grade": torch.tensor([[9.0, 0, 0]] * 4),
        }
    }
    from biofm.platform.losses import pseudo_label, task_losses

    options = module._pseudo_options()
    filled, added = pseudo_label(
        module.model.kinds, batch["labels"], out["logits"], options["tasks"], options["threshold"]
    )
    # kept, confident 1, confident 0, unsure (left missing); grade is not a pseudo-labelled task
    assert filled["flag"][:3].tolist() == [1.0, 1.0, 0.0] and torch.isnan(filled["flag"][3]) and added == 2
    assert torch.equal(torch.isnan(filled["grade"]), torch.isnan(batch["labels"]["grade"]))
    plain = task_losses(module.model.kinds, batch["labels"], out["logits"])["flag"].loss
    pseudo = task_losses(module.model.kinds, filled, out["logits"])["flag"].loss
    assert not torch.isclose(plain, pseudo)
    module.hparams.pseudo_labels["start_epoch"] = 1  # before start_epoch nothing is filled
    assert module._pseudo_options() is None


@pytest.mark.parametrize("balancing", ["equal", "pcgrad"])
def test_batches_without_any_label_train_through(tmp_path, balancing):
    """Sparse labels: some batches carry no label at all (a source with missing cells); the step has nothing
    to learn from them but must not fail, and the labelled batches still train."""
    from lightning.pytorch import Trainer

    from biofm.platform.modality import MODALITIES
    from biofm.testing import fake_raw

    raw = fake_raw("tabular", 64)
    tabular = MODALITIES.resolve("tabular")()
    tabular.fit(raw)
    writer = StoreWriter(
        tmp_path / "sparse.zarr",
        source="sparse",
        modalities={"tabular": tabular.config()},
        tasks={"flag": {"kind": "binary"}},
    )
    labels = np.full(64, np.nan, np.float32)
    labels[:8] = np.arange(8) % 2  # a few labelled samples; most batches of eight hold no label at all
    writer.write_batch(
        0,
        sample_id=[f"s{i}" for i in range(64)],
        subject_id=[f"p{i}" for i in range(64)],
        labels={"flag": labels},
        split=["train"] * 64,
        arrays=tabular.featurise(raw),
    )
    data = BiofmDataModule([writer.finalize().url], batch_size=8, buffer_size=0)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2, balancing=balancing)
    before = module.model.heads["flag"].weight.detach().clone()
    Trainer(
        max_epochs=1,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        accelerator="cpu",
        enable_checkpointing=False,
        enable_model_summary=False,
    ).fit(module, datamodule=data)
    assert not torch.equal(module.model.heads["flag"].weight, before)


def test_weight_decay_spares_norms_biases_embeddings_and_learned_tokens(cohort_store):
    """One AdamW step with zero gradients moves only what weight decay applies to: the weights of linear
    layers shrink by lr · weight_decay, and norms, biases, embeddings, [CLS], task queries and resampler
    latents stay where they were (AdamW decayed every parameter before)."""
    data = BiofmDataModule([cohort_store.url], batch_size=16)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2, lr=0.1, weight_decay=0.5)
    optimiser = module.configure_optimizers()
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    for p in module.parameters():
        p.grad = torch.zeros_like(p)
    optimiser.step()
    moved = {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}
    embeddings = {f"model.{n}.weight" for n, m in module.model.named_modules() if isinstance(m, torch.nn.Embedding)}
    norms = {
        f"model.{n}.{w}"
        for n, m in module.model.named_modules()
        if isinstance(m, torch.nn.LayerNorm)
        for w in ("weight", "bias")
    }
    tokens = {
        "model.cls",
        *(f"model.queries.{t}" for t in module.model.queries),
        *(f"model.resamplers.{m}.latents" for m in module.model.resamplers),
    }
    biases = {n for n in before if n.endswith(".bias")}
    linear = {f"model.{n}.weight" for n, m in module.model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert embeddings and norms and linear
    assert not moved & (embeddings | norms | tokens | biases)
    assert linear <= moved
    name = sorted(linear)[0]
    torch.testing.assert_close(dict(module.named_parameters())[name].detach(), before[name] * (1 - 0.1 * 0.5))
