"""Honest training and evaluation: `last.ckpt` is the last state and a resume loses nothing, a metric that
cannot be computed is NaN (never 0, never the checkpoint's judge), results per source, tasks of different
sources share a head only when declared, a task is predicted only where it applies, the tracker says what
the files say."""

import glob
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import biofm
from biofm.platform.checkpoint import default_checkpoint, safe_load
from biofm.platform.cli import main
from biofm.platform.errors import ConfigError
from biofm.platform.lightning import BiofmDataModule
from biofm.platform.store import StoreWriter
from biofm.tasks.kinds import task_kind
from biofm.tasks.metrics import TaskMetrics
from biofm.testing import FAKE_FLAG, wandb_summary, write_fake_modality_store, write_flag_store

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def _fit_args(stores: list[str], run: Path, *extra: str) -> list[str]:
    return [
        "--trainer",
        str(CONFIGS / "trainer" / "cpu.yaml"),
        "--model",
        str(CONFIGS / "model" / "tiny.yaml"),
        "--data",
        str(CONFIGS / "data" / "synthetic.yaml"),
        "--data.stores",
        f"[{','.join(stores)}]",
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.enable_model_summary",
        "false",
        *extra,
    ]


def _train_rows(run: Path) -> pd.DataFrame:
    log = pd.read_csv(run / "logs" / "fit" / "metrics.csv")
    return log.dropna(subset=["train/loss"])


# --------------------------------------------------------------------------------- 1–2. last is last


def test_last_ckpt_is_the_final_state_and_a_resume_from_it_trains_nothing_again(cohort_store, tmp_path, capsys):
    run = tmp_path / "run"
    # a learning rate of ~0: validation never improves after the first epoch, so only epoch 0 is "best"
    frozen = ["--model.lr", "1e-12", "--model.weight_decay", "0", "--model.dropout", "0"]
    main(["fit", *_fit_args([cohort_store.url], run, "--trainer.max_epochs", "3", *frozen)])
    last = safe_load(run / "checkpoints" / "last.ckpt")
    steps = _train_rows(run)["step"].max()
    assert last["epoch"] == 2 and last["global_step"] >= steps  # the end of the third epoch, not the first
    assert [p.name for p in (run / "checkpoints").glob("best-*.ckpt")] == ["best-epoch=0.ckpt"]
    rows = len(_train_rows(run))
    # resuming a finished run from last.ckpt trains nothing again, and the log keeps its rows
    main(["fit", *_fit_args([cohort_store.url], run, "--trainer.max_epochs", "3", "--ckpt_path", "last", *frozen)])
    assert len(_train_rows(run)) == rows
    assert safe_load(run / "checkpoints" / "last.ckpt")["global_step"] == last["global_step"]
    # one more epoch: the first run's rows are still there, the new epoch's rows follow them
    main(["fit", *_fit_args([cohort_store.url], run, "--trainer.max_epochs", "4", "--ckpt_path", "last", *frozen)])
    epochs = sorted(_train_rows(run)["epoch"].unique())
    assert epochs == [0, 1, 2, 3] and len(_train_rows(run)) > rows
    capsys.readouterr()
    # biofm.load takes the best checkpoint by default and says so; which="last" the last state
    assert biofm.load(run).checkpoint.name == "best-epoch=0.ckpt"
    assert "best-epoch=0.ckpt (the best checkpoint by validation" in capsys.readouterr().err
    assert biofm.load(run, which="last", quiet=True).checkpoint.name == "last.ckpt"


def test_ckpt_path_last_without_a_checkpoint_is_an_error(cohort_store, tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        main(["fit", *_fit_args([cohort_store.url], tmp_path / "run", "--ckpt_path", "last")])
    err = capsys.readouterr().err
    assert done.value.code == 2 and "--ckpt_path last:" in err and "holds no last.ckpt" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_last_ckpt_is_also_written_within_an_epoch(cohort_store, tmp_path):
    from lightning.pytorch import Callback, Trainer

    from biofm.platform.lightning import BiofmModule

    seen = []

    class Watch(Callback):  # before each step: the step of the last.ckpt on disk
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            path = tmp_path / "run" / "checkpoints" / "last.ckpt"
            seen.append(safe_load(path)["global_step"] if path.exists() else None)

    data = BiofmDataModule([cohort_store.url], batch_size=32)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2)
    Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[Watch(), default_checkpoint(str(tmp_path / "run"), every_minutes=None, every_n_steps=3)],
        default_root_dir=tmp_path,
    ).fit(module, datamodule=data)
    steps = len(seen)
    assert steps > 6
    assert [s for s in seen if s is not None][:3] == [3, 3, 3]  # saved after step 3, mid-epoch
    assert max(s for s in seen if s is not None) == 3 * ((steps - 1) // 3)


# ---------------------------------------------------------------------------------- 3. NaN, not 0


def _scores(values: list[float], labels: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    p = torch.tensor(values)
    return torch.log(p / (1 - p)).unsqueeze(1), torch.tensor(labels)


def test_a_metric_that_cannot_be_computed_is_nan_and_left_out_of_the_macro_means():
    kinds = {
        "one_class": task_kind("one_class", {"kind": "binary"}),
        "fine": task_kind("fine", {"kind": "binary"}),
        "kinds": task_kind("kinds", {"kind": "multiclass", "classes": ["a", "b", "c"]}),
        "tags": task_kind("tags", {"kind": "multilabel", "classes": ["x", "y"]}),
        "flat": task_kind("flat", {"kind": "regression"}),
    }
    metrics = TaskMetrics(kinds, "test")
    metrics.update("one_class", *_scores([0.9, 0.2, 0.6, 0.7], [1, 1, 1, 1]))  # positives only
    metrics.update("fine", *_scores([0.9, 0.2, 0.6, 0.3], [1, 0, 1, 0]))  # perfectly ranked
    # class "c" never occurs: AUROC is the mean over a and b only (both perfectly ranked)
    metrics.update(
        "kinds", torch.tensor([[5.0, 0, 0], [0, 5.0, 0], [4.0, 0, 0], [0, 4.0, 0]]), torch.tensor([0.0, 1.0, 0.0, 1.0])
    )
    # label y is positive everywhere: its AUROC is undefined, x is perfectly ranked
    metrics.update("tags", torch.tensor([[3.0, 1.0], [-3.0, 2.0]]), torch.tensor([[1.0, 1.0], [0.0, 1.0]]))
    metrics.update("flat", torch.tensor([[0.1], [0.4], [0.2]]), torch.tensor([2.0, 2.0, 2.0]))  # no variance
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = metrics.compute()
    assert math.isnan(results["one_class/auroc"]) and math.isfinite(results["one_class/accuracy"])
    assert results["one_class/auprc"] == pytest.approx(1.0)  # precision is defined with positives only
    assert results["kinds/auroc"] == pytest.approx(1.0) and results["tags/auroc"] == pytest.approx(1.0)
    assert math.isnan(results["flat/r2"]) and math.isfinite(results["flat/rmse"])
    # the macro means leave the undefined ones out, and say how many tasks entered
    assert results["macro/auroc"] == pytest.approx(1.0) and results["macro/auroc_n"] == 3
    assert results["macro/score"] == pytest.approx(1.0) and results["macro/score_n"] == 3
    said = [str(w.message) for w in caught]
    assert any(
        "test split: task 'one_class' has 0 of class 0, 4 of class 1: its auroc is undefined" in m for m in said
    ), said
    assert any("task 'flat' has 3 labels: its r2 is undefined" in m for m in said)
    metrics.reset()
    metrics.update("one_class", *_scores([0.9, 0.2], [1, 1]))
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        metrics.compute()
    assert not any("one_class" in str(w.message) for w in again)  # named once per run


def test_few_labels_are_a_note_not_a_warning_and_an_undefined_metric_stays_a_warning():
    kinds = {"few": task_kind("few", {"kind": "binary"}), "none": task_kind("none", {"kind": "binary"})}
    metrics = TaskMetrics(kinds, "test")
    metrics.update("few", *_scores([0.9, 0.2, 0.6, 0.3], [1, 0, 1, 0]))  # 2 of each class: defined, noisy
    metrics.update("none", *_scores([0.9, 0.2], [1, 1]))  # positives only: AUROC undefined
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = metrics.compute()
    said = [str(w.message) for w in caught]
    assert math.isfinite(results["few/auroc"])
    assert not any("'few'" in m for m in said), said  # a defined value: no warning
    assert any("'none'" in m and "undefined" in m for m in said), said
    assert (
        metrics.notes["few"] == "test split: task 'few' has 2 of class 0, 2 of class 1: its metrics rest on few labels"
    )
    assert "undefined" in metrics.notes["none"]
    metrics.forget()
    assert not metrics.notes


def _one_class_validation_store(path: str) -> str:
    """A store whose validation split holds one class of its only task (and test both)."""

    def one_class_validation(x):
        flag = (x[:, 0] > 0).astype(np.float32)
        flag[80:100] = 1.0
        return flag

    return write_flag_store(path, one_class_validation, source="skewed")


def test_an_undefined_validation_score_never_selects_a_checkpoint(tmp_path):
    url = _one_class_validation_store(str(tmp_path / "skewed.zarr"))
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main(["fit", *_fit_args([url], run, "--trainer.max_epochs", "2", "--data.batch_size", "16")])
    log = pd.read_csv(run / "logs" / "fit" / "metrics.csv")
    assert log["val/flag/auroc"].dropna().size == 0 or log["val/flag/auroc"].isna().all()
    assert not list((run / "checkpoints").glob("best-*.ckpt"))  # nothing to choose by
    assert (run / "checkpoints" / "last.ckpt").exists()
    assert biofm.load(run, quiet=True).checkpoint.name == "last.ckpt"


# ------------------------------------------------------------------ 4 & 6. per source, where it applies


@pytest.fixture(scope="module")
def fused(cohort_store, tmp_path_factory):
    """A tiny model trained on the synthetic cohort and a molecule store (two sources, no shared task)."""
    folder = tmp_path_factory.mktemp("fused")
    molecules = write_fake_modality_store(str(folder / "molecules.zarr"), "molecule", n=120).url
    run = folder / "run"
    main(["fit", *_fit_args([cohort_store.url, molecules], run, "--trainer.max_epochs", "1")])
    return {"run": run, "stores": [cohort_store.url, molecules]}


def test_a_two_store_test_reports_each_source_and_pooled(fused, capsys):
    main(["test", *_fit_args(fused["stores"], fused["run"]), "--ckpt_path", "best"])
    out = capsys.readouterr().out
    metrics = json.loads((fused["run"] / "test_metrics.json").read_text())
    assert "synthetic/event/auroc" in metrics and "fake-molecule/flag/auroc" in metrics
    assert "flag/auroc" in metrics and "event/auroc" in metrics and "synthetic/macro/score" in metrics
    assert metrics["flag/auroc"] == pytest.approx(metrics["fake-molecule/flag/auroc"])  # flag: one source only
    header = next(line for line in out.splitlines() if "all sources" in line)
    assert "synthetic" in header and "fake-molecule" in header


def test_a_task_is_predicted_only_for_samples_with_a_modality_it_was_trained_on(fused, cohort_store):
    from biofm.datasets.synthetic import cohort

    model = biofm.load(fused["run"], quiet=True)
    assert model.tasks["event"]["applies"] == {"modalities": ["tabular", "text"], "sources": ["synthetic"]}
    assert model.tasks["flag"]["applies"]["modalities"] == ["molecule"]
    ethanol = model.predict(smiles=["CCO"])
    assert ethanol["flag/applies"].all() and ethanol["flag"].notna().all()
    for task in ("event", "subtype", "grade", "risk_score"):
        assert not ethanol[f"{task}/applies"].any() and ethanol[task].isna().all(), task
    assert (
        ethanol["event/prob/1"].isna().all()
        and ethanol[[c for c in ethanol if c.startswith("findings/") and "/applies" not in c]].isna().all().all()
    )
    raw = cohort(4, seed=3)
    patient = model.predict(reports=[r or "no report" for r in raw["report"][:4]])
    for task in ("event", "subtype", "grade", "risk_score"):
        assert patient[f"{task}/applies"].all() and patient[task].notna().all(), task
    assert not patient["flag/applies"].any() and patient["flag"].isna().all()
    # biofm predict on the stores: each source's samples get only their own tasks
    main(["predict", *_fit_args(fused["stores"], fused["run"]), "--ckpt_path", "best"])
    written = pd.read_parquet(fused["run"] / "predictions.parquet")
    cohort_rows, molecule_rows = (
        written[written["source"] == "synthetic"],
        written[written["source"] == "fake-molecule"],
    )
    assert len(cohort_rows) and len(molecule_rows)
    assert cohort_rows["event/applies"].all() and not cohort_rows["flag/applies"].any()
    # (a fake molecule row may hold no molecule at all: then nothing applies to it)
    assert molecule_rows["flag/applies"].sum() > len(molecule_rows) / 2 and not molecule_rows["event/applies"].any()
    assert (
        molecule_rows["event"].isna().all() and molecule_rows.loc[~molecule_rows["flag/applies"], "flag"].isna().all()
    )


# ------------------------------------------------------------------------------- 5. sharing is declared


def test_a_task_two_stores_define_differently_stops_the_run_unless_declared_shared(tmp_path):
    a = write_fake_modality_store(str(tmp_path / "a.zarr"), "molecule", n=60).url
    b = str(tmp_path / "b.zarr")
    from biofm.platform.modality import MODALITIES
    from biofm.testing import fake_raw

    mod = MODALITIES.resolve("tabular")()
    raw = fake_raw("tabular", 60)
    mod.fit(raw)
    writer = StoreWriter(
        b,
        source="other-site",
        modalities={"tabular": mod.config()},
        tasks={"flag": {"kind": "binary", "definition": "death within 30 days"}},
    )
    writer.write_batch(
        0,
        sample_id=[f"B{i}" for i in range(60)],
        subject_id=[f"BP{i}" for i in range(60)],
        labels={"flag": (np.arange(60) % 2).astype(np.float32)},
        arrays=mod.featurise(raw),
    )
    writer.finalize()
    with pytest.raises(
        ConfigError,
        match=r"task 'flag' is in stores .*a.zarr \(source fake-molecule\) and "
        r".*b.zarr \(source other-site\), which do not state the same "
        r"definition.*--data.shared_tasks '\[flag\]'",
    ):
        BiofmDataModule([a, b])
    shared = BiofmDataModule([a, b], shared_tasks=["flag"])  # declared: one head
    assert shared.schema["tasks"]["flag"]["applies"]["sources"] == ["fake-molecule", "other-site"]
    same = write_fake_modality_store(str(tmp_path / "c.zarr"), "oct", n=60).url  # states FAKE_FLAG too
    assert "flag" in BiofmDataModule([a, same]).schema["tasks"] and FAKE_FLAG


# ------------------------------------------------------------------- 7. the tracker says what files say


def test_the_tracker_summary_holds_the_full_model_test_and_extra_evaluations_apart(cohort_store, tmp_path, monkeypatch):
    from biofm.recipes.runs import fit_and_test

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    results = fit_and_test(
        [cohort_store.url],
        run,
        epochs=1,
        test_without=["text"],
        model={"d_model": 16, "depth": 1, "heads": 2, "latents": 2},
    )
    summary = wandb_summary(next(iter(glob.glob(str(run / "wandb" / "offline-run-*" / "*.wandb")))))
    written = json.loads((run / "test_metrics.json").read_text())
    full = {k[len("test/") :]: v for k, v in summary.items() if k.startswith("test/") and "without:" not in k}
    assert full.keys() == written.keys()
    for key, value in written.items():
        assert (value is None and math.isnan(full[key])) or full[key] == pytest.approx(value), key
    without = {k[len("test/without:text/") :]: v for k, v in summary.items() if k.startswith("test/without:text/")}
    assert without and without["macro/score"] == pytest.approx(results["without:text"]["macro/score"])
    assert without["event/auroc"] != pytest.approx(full["event/auroc"], abs=1e-9)  # another evaluation


def test_a_task_without_training_labels_is_said_before_training(tmp_path):
    import logging

    from biofm.platform.data import BiofmDataModule

    n = 60
    x = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    split = np.array(["train"] * 40 + ["val"] * 10 + ["test"] * 10)
    late = np.where(split == "train", np.nan, 1.0).astype(np.float32)  # labelled only outside training
    writer = StoreWriter(
        str(tmp_path / "s.zarr"),
        source="late",
        tasks={"flag": {"kind": "binary"}, "late": {"kind": "binary"}},
        modalities={"tabular": {"numeric": {"a": [0.0, 1.0], "b": [0.0, 1.0]}, "categorical": {}}},
    )
    writer.write_batch(
        0,
        sample_id=[f"s{i}" for i in range(n)],
        subject_id=[f"p{i}" for i in range(n)],
        labels={"flag": (x[:, 0] > 0).astype(np.float32), "late": late},
        split=split,
        arrays={"tabular/numeric": x, "tabular/categorical": np.zeros((n, 0), np.int32)},
    )
    said = []
    handler = logging.Handler()
    handler.emit = lambda record: said.append(record.getMessage())
    logging.getLogger("biofm").addHandler(handler)
    try:
        BiofmDataModule([writer.finalize().url], batch_size=16).train_dataloader()
    finally:
        logging.getLogger("biofm").removeHandler(handler)
    assert [m for m in said if "no label in any training sample" in m] == [
        "warning: task 'late' has no label in any training sample: its head is not trained and its predictions "
        "mean nothing (its store's train split holds no label for it)"
    ]
