"""Commands say what they did (issue #23): store summaries, true labels beside predictions, fit's ending."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
from lightning.pytorch import Trainer, seed_everything

from biofm.platform.cli import main
from biofm.platform.lightning import BiofmDataModule, BiofmModule, PredictionWriter

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_info_counts_splits_labels_modalities_and_bytes(cohort_store, capsys):
    main(["info", cohort_store.url, "--json"])
    summary = json.loads(capsys.readouterr().out)
    split = cohort_store.index("split")
    assert sum(summary["splits"].values()) == summary["samples"] == cohort_store.n
    labels = cohort_store.labels("risk_score")
    for name in ("train", "val", "test"):
        expected = int((~np.isnan(labels) & (split == name)).sum())
        assert summary["tasks"]["risk_score"]["labelled"][name] == expected
    assert summary["tasks"]["risk_score"]["missing_fraction"] == round(float(np.isnan(labels).mean()), 4)
    assert 0 < summary["tasks"]["event"]["prevalence"] < 1 and summary["tasks"]["subtype"]["classes"]
    assert summary["modalities"]["text"] == round(float(cohort_store.present("text").mean()), 4)
    assert all(a["bytes"] > 0 for a in summary["arrays"].values())
    assert summary["bytes_on_disk"] >= sum(a["bytes"] for a in summary["arrays"].values())
    main(["info", cohort_store.url])  # the readable form
    text = capsys.readouterr().out
    assert "risk_score" in text and "present in" in text and "on disk" in text


def test_predictions_carry_the_true_label_beside_the_prediction(cohort_store, tmp_path):
    seed_everything(0, verbose=False)
    data = BiofmDataModule([cohort_store.url], batch_size=64)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2)
    trainer = Trainer(
        max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
        callbacks=[PredictionWriter(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.predict(module, datamodule=data, return_predictions=False)
    written = pd.read_parquet(tmp_path / "predictions.parquet").set_index("sample_id")
    ids = cohort_store.index("sample_id")
    truth = pd.Series(cohort_store.labels("risk_score"), index=ids).loc[written.index]
    assert np.allclose(written["risk_score/true"].to_numpy(float), truth.to_numpy(), equal_nan=True)
    classes = data.schema["tasks"]["subtype"]["classes"]
    codes = pd.Series(cohort_store.labels("subtype"), index=ids).loc[written.index]
    expected = [None if np.isnan(c) else classes[int(c)] for c in codes]
    assert written["subtype/true"].tolist() == expected
    assert any(c.startswith("findings/true/") for c in written.columns)


def test_fit_ends_with_the_best_epochs_table_and_where_the_checkpoints_are(cohort_store, tmp_path, capsys):
    run = tmp_path / "run"
    main(
        [
            "fit",
            "--trainer", str(CONFIGS / "trainer" / "cpu.yaml"),
            "--model", str(CONFIGS / "model" / "tiny.yaml"),
            "--data", str(CONFIGS / "data" / "synthetic.yaml"),
            "--data.stores", f"[{cohort_store.url}]",
            "--trainer.default_root_dir", str(run),
            "--trainer.max_epochs", "2",
            "--trainer.enable_progress_bar", "false",
            "--trainer.logger", "false",
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    best = next(run.glob("checkpoints/best-*.ckpt"))
    assert f"best checkpoint (by val/macro/score): {best}" in out
    assert f"last checkpoint (the state at the end of training): {run / 'checkpoints' / 'last.ckpt'}" in out
    assert "validation (best epoch" in out and "macro/score" in out
