"""Predictions for MEDS data: `predict_meds` (SDK) and `biofm predict-meds` (a cohort) from the subjects' events
at given prediction times, and `biofm export meds` of `biofm predict`'s output — all in the MEDS prediction
format."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd
import polars as pl

from biofm.commands import add_cohort_arguments, cohort_options, command, exporter, print_summary
from biofm.datasets.ehr.meds import meds_sequences
from biofm.platform import tables
from biofm.platform.store import Store, StoreError


def predict_meds(
    model, meds, prediction_times, *, task: str | None = None, codes: str | None = None, batch_size: int = 64
) -> pd.DataFrame:
    """MEDS events (a folder, a parquet file or a frame) at the given prediction times (a frame with
    subject_id and prediction_time) → `model.predict`'s columns plus the MEDS prediction format:
    `subject_id`, `prediction_time`, `predicted_boolean_value`, `predicted_boolean_probability` (for `task`,
    default the model's only binary task). Only events at or before each time are used; `codes` names the
    codes.parquet the store was prepared with when `meds` is not a MEDS folder. `model`: `biofm.load(…)`.

        >>> from biofm.datasets.ehr import predict_meds
        >>> predict_meds(biofm.load("runs/a"), "MEDS_DIR", times)
    """
    if "ehr" not in model.schema["modalities"]:
        raise ValueError(f"the model was not trained with EHR inputs (it has {model.modalities})")
    rows, sequences = meds_sequences(meds, prediction_times, _max_events(model), codes)
    frame = model.predict(ehr=sequences, ids=rows["sample_id"].to_list(), batch_size=batch_size)
    missing = [s is None for s in sequences]
    frame.loc[missing, "error"] = "no event at or before its prediction_time"
    return add_meds_columns(frame, rows.to_pandas(), model.tasks, task)


def _max_events(model) -> int:
    return int(model.schema["modalities"]["ehr"].get("max_events", 128))


def meds_task(tasks: dict, task: str | None, required: bool = True) -> str | None:
    """The binary task whose probability becomes MEDS's predicted boolean: `task`, or the model's only binary
    one; with several and none named, a ConfigError (`required`) or None."""
    from biofm.platform.errors import ConfigError

    binary = [t for t, spec in tasks.items() if spec["kind"] == "binary"]
    if task is not None and task not in binary:
        raise ConfigError(f"MEDS predictions need a binary task; '{task}' is not one; binary tasks are {binary}")
    if task is None and len(binary) == 1:
        return binary[0]
    if task is None and required:
        raise ConfigError(
            f"the model has {len(binary)} binary tasks {binary}: name the one MEDS's predicted boolean is for "
            "with --task"
        )
    return task


def add_meds_columns(frame: pd.DataFrame, rows: pd.DataFrame, tasks: dict, task: str | None) -> pd.DataFrame:
    """`subject_id`, `prediction_time` and, for a binary task, MEDS's predicted boolean value and probability."""
    task = meds_task(tasks, task, required=False)
    out = frame.copy()
    out.insert(1, "subject_id", rows["subject_id"].to_numpy())
    out.insert(2, "prediction_time", rows["prediction_time"].to_numpy())
    if task is not None:
        probability = out[f"{task}/prob/1"].astype(float)
        out["predicted_boolean_probability"] = probability
        out["predicted_boolean_value"] = (probability >= 0.5).where(probability.notna())
    return out


def predict_meds_cohort(
    checkpoint: str,
    times: str,
    meds: str,
    out: str,
    *,
    codes: str | None = None,
    encoding: str = "utf-8",
    task: str | None = None,
    **options,
) -> dict:
    """`predict_cohort` over the rows of a prediction-time file (subject_id, prediction_time: a MEDS label
    file), each row's EHR input its subject's events up to that time; also writes
    `<out>/predictions_meds.parquet` in the MEDS prediction format. `options` go to `predict_cohort`."""
    from biofm.platform.cohort import predict_cohort

    table = tables.read_table(times, "prediction-time manifest", encoding)  # named before the model is loaded
    kept: dict = {}

    def rows(model, _manifest):
        kept["task"] = meds_task(model.tasks, task)  # before anything is predicted
        frame, sequences = meds_sequences(meds, table, _max_events(model), codes)
        kept["frame"], kept["tasks"] = frame.to_pandas(), model.tasks
        return kept["frame"], {"ehr": sequences}

    summary = predict_cohort(checkpoint, times, out, rows=rows, run={"meds": str(meds)}, **options)
    if summary:
        predictions = add_meds_columns(
            pd.read_parquet(Path(out) / "predictions.parquet"), kept["frame"], kept["tasks"], kept["task"]
        )
        columns = ["subject_id", "prediction_time", "predicted_boolean_value", "predicted_boolean_probability"]
        predictions[[c for c in columns if c in predictions]].to_parquet(
            Path(out) / "predictions_meds.parquet", index=False
        )
    return summary


def meds_predictions(predictions: str, store: str, task: str | None = None) -> pl.DataFrame:
    """`biofm predict`'s predictions.parquet for a MEDS store → the MEDS evaluation format: subject_id,
    prediction_time, boolean_value, predicted_boolean_value, predicted_boolean_probability."""
    opened = Store(store)
    binary = [t for t, s in opened.tasks.items() if s["kind"] == "binary"]
    task = task or (binary[0] if len(binary) == 1 else None)
    if task is None or task not in opened.tasks:
        raise StoreError(f"{store}: name the task with --task; binary tasks are {binary}")
    frame = pl.read_parquet(predictions)
    prob = f"{task}/prob/1"
    if prob not in frame.columns:
        raise StoreError(f"{predictions}: no column '{prob}'; was the model trained on task '{task}'?")
    truth = pl.DataFrame({"sample_id": opened.index("sample_id").astype(str), "boolean_value": opened.labels(task)})
    frame = frame.join(truth, on="sample_id", how="left")
    parts = pl.col("sample_id").str.split_exact("@", 1)
    out = frame.select(
        parts.struct.field("field_0").alias("subject_id"),
        parts.struct.field("field_1").str.to_datetime("%Y-%m-%dT%H:%M:%S%.6f", time_unit="us").alias("prediction_time"),
        pl.when(pl.col("boolean_value").is_nan())
        .then(None)
        .otherwise(pl.col("boolean_value") > 0.5)
        .alias("boolean_value"),
        (pl.col(prob) >= 0.5).alias("predicted_boolean_value"),
        pl.col(prob).cast(pl.Float32).alias("predicted_boolean_probability"),
    )
    subject = out["subject_id"].cast(pl.Int64, strict=False)
    if subject.null_count() == 0:
        out = out.with_columns(subject.alias("subject_id"))
    return out.sort(["subject_id", "prediction_time"])


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--predictions", required=True, help="predictions.parquet written by `biofm predict`")
    p.add_argument("--store", required=True, help="the MEDS store the predictions are for")
    p.add_argument("--task", default=None)
    p.add_argument("--out", required=True, help="parquet file in the MEDS evaluation format")


@exporter("meds", _export_arguments)
def _run_export(args: argparse.Namespace) -> None:
    """Predictions → the MEDS evaluation format (one row per label)."""
    frame = meds_predictions(args.predictions, args.store, args.task)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    frame.write_parquet(args.out)
    print(f"wrote {len(frame)} predictions to {args.out}")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    add_cohort_arguments(
        p,
        "prediction times: subject_id, prediction_time (a MEDS label file, parquet or CSV)",
        "predictions.parquet, predictions_meds.parquet",
    )
    p.add_argument("--meds", required=True, help="MEDS folder or parquet file of the subjects' events")
    p.add_argument("--codes", default=None, help="codes.parquet, when --meds is not a MEDS folder")
    p.add_argument(
        "--task", default=None, help="the binary task of MEDS's predicted boolean (default: the model's only one)"
    )


@command("predict-meds", _predict_arguments)
def _run_predict(args: argparse.Namespace) -> None:
    """predict a MEDS cohort at its prediction times, also in the MEDS prediction format"""
    options = cohort_options(args)
    encoding = options.pop("encoding")
    summary = predict_meds_cohort(
        args.checkpoint,
        args.manifest,
        args.meds,
        args.out,
        codes=args.codes,
        encoding=encoding,
        task=args.task,
        **options,
    )
    print_summary(summary, args.out, "predictions_meds.parquet")
