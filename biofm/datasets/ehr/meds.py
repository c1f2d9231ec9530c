"""`biofm prepare meds`: MEDS data shards + `metadata/codes.parquet` + `subject_splits.parquet` + a MEDS label
file → one sample per label row, built from the subject's events at or before its `prediction_time`; and the
same events as model inputs at any prediction times (`meds_sequences`, used by `predict.py`)."""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl

from biofm.commands import comma_list, preparer
from biofm.datasets.ehr.common import (
    Report,
    ShardedWriter,
    common_arguments,
    fields_expr,
    print_prepared,
    shards_of,
    to_sequences,
    work_dir,
    write_outputs,
)
from biofm.datasets.ehr.meds_schema import check_dataset_json, check_meds_schema, check_parquet_schema
from biofm.datasets.outputs import track
from biofm.platform import tables
from biofm.platform.store import Store, StoreError, subject_splits
from biofm.platform.writing import prepares

SPLITS = {"train": "train", "tuning": "val", "val": "val", "held_out": "test", "test": "test"}


def read_meds_labels(path: str, task: str, report: Report, cast_types: bool = False) -> tuple[pl.DataFrame, dict]:
    """A MEDS label file → (subject_id, prediction_time, sample_id, <task>) and the task's spec; checked
    against MEDS's label schema first (`meds_schema`; a CSV's types as polars reads them)."""
    if not Path(path).exists():
        raise StoreError(f"{path}: label file does not exist")
    if path.endswith(".parquet"):
        check_parquet_schema(tables.check_parquet(path, "MEDS label file"), "labels", report.counts, cast_types)
        frame = pl.read_parquet(path)
    else:
        try:
            frame = pl.read_csv(path, try_parse_dates=True)
        except Exception as err:  # noqa: BLE001 — polars raises NoDataError, ComputeError, …
            raise tables.read_failure(path, err, "MEDS label file") from None
        tables.check_columns(path, tables.header(path), "MEDS label file")
        if len(frame):
            check_meds_schema(path, frame.to_arrow().schema, "labels", report.counts, cast_types)
    if not len(frame):
        raise StoreError(f"{path}: the MEDS label file has a header but no data rows")
    for column in ("subject_id", "prediction_time"):
        if column not in frame.columns:
            raise StoreError(f"{path}: a MEDS label file needs '{column}'; columns are {frame.columns}")
    value = next(
        (
            c
            for c in ("boolean_value", "integer_value", "float_value", "categorical_value")
            if c in frame.columns and frame[c].null_count() < len(frame)
        ),
        None,
    )
    if value is None:
        raise StoreError(f"{path}: no boolean_value, integer_value, float_value or categorical_value with values")
    frame = frame.with_columns(
        pl.col("subject_id").cast(pl.String), _as_datetime(frame, "prediction_time").alias("prediction_time")
    )
    bad_time = frame["prediction_time"].is_null()
    report.add("label rows with a missing or unparseable prediction_time (dropped)", bad_time.sum())
    no_subject = frame["subject_id"].is_null()
    report.add("label rows without a subject_id (dropped)", no_subject.sum())
    frame = frame.filter(~bad_time & ~no_subject)
    before = len(frame)
    frame = frame.unique(["subject_id", "prediction_time"], keep="first", maintain_order=True)
    report.add("duplicate label rows (same subject and prediction_time; first kept)", before - len(frame))
    if value == "boolean_value":
        spec, coded = {"kind": "binary"}, frame[value].cast(pl.Float32)
    elif value == "float_value":
        spec, coded = {"kind": "regression"}, frame[value].cast(pl.Float32)
    else:
        classes = sorted(str(v) for v in frame[value].drop_nulls().unique().to_list())
        spec = {"kind": "multiclass", "classes": classes}
        index = {c: float(i) for i, c in enumerate(classes)}
        coded = frame[value].cast(pl.String).replace_strict(index, default=None, return_dtype=pl.Float32)
    frame = frame.with_columns(coded.alias(task), sample_id_expr().alias("sample_id"))
    return frame.select(["subject_id", "prediction_time", "sample_id", task]), spec


def sample_id_expr() -> pl.Expr:
    """`<subject>@<prediction time>`: unique per label row, and turned back into MEDS columns on export."""
    return pl.col("subject_id") + "@" + pl.col("prediction_time").dt.strftime("%Y-%m-%dT%H:%M:%S%.6f")


def _as_datetime(frame: pl.DataFrame, column: str) -> pl.Expr:
    if frame.schema[column] == pl.String:
        return pl.col(column).str.to_datetime(strict=False, time_unit="us")
    return pl.col(column).cast(pl.Datetime("us"), strict=False)


def meds_files(input: str) -> list[str]:
    path = Path(input)
    if path.is_file():
        return [tables.check_parquet(str(path), "MEDS data file")]
    if not path.exists():
        raise StoreError(f"{input}: MEDS input does not exist")
    files = sorted(str(p) for p in (path / "data").rglob("*.parquet")) if (path / "data").is_dir() else []
    if not files:
        raise StoreError(f"{input}: no MEDS data shards (data/**/*.parquet)")
    return [tables.check_parquet(f, "MEDS data shard") for f in files]


def meds_events(
    scan: pl.LazyFrame,
    subjects: list[str],
    labels: pl.DataFrame,
    codes: pl.DataFrame | None,
    drop: set[str],
    report: Report,
) -> tuple[pl.DataFrame, set[str]]:
    """One shard's events, as-of joined to its label rows: each label sees its subject's events at or before
    its prediction time, plus static facts (rows without a time)."""
    raw = scan.filter(pl.col("subject_id").cast(pl.String).is_in(subjects)).collect()
    raw = raw.with_columns(pl.col("subject_id").cast(pl.String))
    with_data = set(raw["subject_id"].unique().to_list())
    if "numeric_value" not in raw.columns and "value" in raw.columns:
        raw = raw.rename({"value": "numeric_value"})  # the shared demo's all-subjects file names it `value`
    for column in ("subject_id", "time", "code"):
        if column not in raw.columns:
            raise StoreError(f"MEDS data has no '{column}' column; columns are {raw.columns}")
    timed = raw["time"].is_not_null()
    time = raw.select(_as_datetime(raw, "time")).to_series()
    report.add("events with an unparseable time (dropped)", (timed & time.is_null()).sum())
    report.add("static facts (no time; kept for every sample of the subject)", (~timed).sum())
    raw = raw.with_columns(time.alias("time")).filter(~(timed & time.is_null()))
    null_code = raw["code"].is_null()
    report.add("events without a code (dropped)", null_code.sum())
    raw = raw.filter(~null_code)
    if "numeric_value" in raw.columns and raw.schema["numeric_value"] == pl.String:
        parsed = raw["numeric_value"].str.strip_chars().cast(pl.Float64, strict=False)
        report.add(
            "unparseable numeric_value (left out)", (parsed.is_null() & raw["numeric_value"].is_not_null()).sum()
        )
        raw = raw.with_columns(parsed.alias("numeric_value"))
    before = len(raw)
    raw = raw.unique(maintain_order=True)
    report.add("duplicate event rows (dropped)", before - len(raw))
    if codes is not None:
        raw = raw.join(codes, on="code", how="left")
        report.add("events whose code is not in codes.parquet (raw code used)", raw["_known"].is_null().sum())
        raw = raw.drop("_known")
    else:
        raw = raw.with_columns(pl.lit(None, pl.String).alias("description"))
    code_text = pl.coalesce(pl.col("description"), pl.col("code").str.replace_all("//", " ", literal=True))
    extras = [
        c
        for c in raw.columns
        if c not in {"subject_id", "time", "code", "description", "numeric_value", "text_value", "table"} | drop
        and not c.endswith(("_id", "_seq", "_ID"))
    ]
    raw = raw.with_columns(code_text.alias("_code"), pl.col("code").str.split("//").list.first().alias("table"))
    events = raw.select(
        "subject_id",
        "time",
        "table",
        fields_expr(
            [
                "_code",
                *(["numeric_value"] if "numeric_value" in raw.columns else []),
                *(["text_value"] if "text_value" in raw.columns else []),
                *extras,
            ]
        )
        .list.eval(
            pl.element().struct.with_fields(
                pl.field("column").replace({"_code": "code", "numeric_value": "value", "text_value": "text"})
            )
        )
        .alias("fields"),
    )
    joined = labels.select("subject_id", "prediction_time", "sample_id").join(events, on="subject_id", how="inner")
    joined = joined.filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
    hours = (pl.col("time") - pl.col("prediction_time")).dt.total_microseconds() / 3.6e9
    return joined.select(
        "sample_id", "subject_id", hours.fill_null(float("nan")).cast(pl.Float32).alias("hours"), "table", "fields"
    ), with_data


_REASONS = {
    "no event at or before its prediction_time": "samples with no event at or before their prediction_time (dropped)",
    "subject has no events in the data": "samples whose subject has no events in the data (dropped)",
}


def read_codes(path: str | None, report: Report | None = None, cast_types: bool = False) -> pl.DataFrame | None:
    """MEDS `codes.parquet` (code → description), or None when there is none; with `report`, checked against
    MEDS's code metadata schema first."""
    if not path or not Path(path).exists():
        return None
    tables.check_parquet(path, "MEDS codes file")
    if report is not None:
        check_parquet_schema(path, "codes", report.counts, cast_types)
    import pyarrow.parquet as pq

    if "description" not in pq.read_schema(path).names:
        return (
            pl.read_parquet(path, columns=["code"])
            .unique("code")
            .with_columns(pl.lit(None, pl.String).alias("description"), pl.lit(True).alias("_known"))
        )
    return (
        pl.read_parquet(path, columns=["code", "description"])
        .unique("code", keep="first")
        .with_columns(pl.lit(True).alias("_known"))
    )


def meds_sequences(input, prediction_times, max_events: int, codes: str | None = None) -> tuple[pl.DataFrame, list]:
    """MEDS events (a folder, a parquet file, or a polars / pandas frame) and prediction times (subject_id,
    prediction_time) → the prediction rows (subject_id, prediction_time, sample_id) and, per row, its event
    sequence (None when the subject has no event at or before that time), for inference. `codes`: a
    codes.parquet (default: the folder's metadata/codes.parquet), as at prepare time."""
    root = Path(input) if isinstance(input, (str, Path)) and Path(input).is_dir() else None
    code_frame = read_codes(codes or (str(root / "metadata" / "codes.parquet") if root else None))
    if isinstance(input, (str, Path)):
        scan = pl.scan_parquet(meds_files(str(input)))
    else:
        scan = (input if isinstance(input, pl.DataFrame) else pl.from_pandas(input)).lazy()
    rows = prediction_times if isinstance(prediction_times, pl.DataFrame) else pl.from_pandas(prediction_times)
    for column in ("subject_id", "prediction_time"):
        if column not in rows.columns:
            raise StoreError(f"prediction times need '{column}'; columns are {rows.columns}")
    rows = rows.with_columns(
        pl.col("subject_id").cast(pl.String), _as_datetime(rows, "prediction_time").alias("prediction_time")
    )
    bad = rows.with_row_index("_row").filter(pl.col("subject_id").is_null() | pl.col("prediction_time").is_null())
    if len(bad):
        raise StoreError(
            f"prediction times: rows {bad['_row'].head(5).to_list()} have no subject_id or no "
            "(parseable) prediction_time; every row needs both"
        )
    rows = rows.with_columns(sample_id_expr().alias("sample_id")).select("subject_id", "prediction_time", "sample_id")
    subjects = sorted(rows["subject_id"].drop_nulls().unique().to_list())
    events, _ = meds_events(scan, subjects, rows, code_frame, set(), Report())
    samples, _, sequences = to_sequences(events, max_events)
    by_sample = dict(zip(samples, sequences))
    return rows, [by_sample.get(s) for s in rows["sample_id"]]


@prepares
def prepare_meds(
    input: str,
    labels: str,
    out: str,
    *,
    task: str | None = None,
    codes: str | None = None,
    splits: str | None = None,
    max_events: int = 128,
    max_event_tokens: int = 48,
    vocab_size: int = 4000,
    tokenizer_from: str | None = None,
    drop_columns: Iterable[str] = (),
    shard_subjects: int = 5000,
    source: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    cast_types: bool = False,
) -> tuple[Store, Report]:
    """Prepare a MEDS dataset and label file; returns the store and the report of what was dropped. Every
    file is checked against the MEDS 0.4 schemas first (`meds_schema`); `cast_types` converts columns of
    another type instead of stopping."""
    report = Report()
    files = meds_files(input)
    for file in files:
        check_parquet_schema(file, "data", report.counts, cast_types)
    root = Path(input) if Path(input).is_dir() else None
    if root is not None:
        check_dataset_json(root / "metadata" / "dataset.json", report.counts)
    task = task or Path(labels).name.split(".")[0].removesuffix("_labels")
    label_frame, spec = read_meds_labels(labels, task, report, cast_types)
    code_frame = read_codes(codes or (str(root / "metadata" / "codes.parquet") if root else None), report, cast_types)
    splits = splits or (str(root / "metadata" / "subject_splits.parquet") if root else None)
    split_of = None
    if splits and Path(splits).exists():
        check_parquet_schema(
            tables.check_parquet(splits, "MEDS subject_splits file"), "splits", report.counts, cast_types
        )
        frame = pl.read_parquet(splits).with_columns(pl.col("subject_id").cast(pl.String))
        split_of = {s: SPLITS.get(v, "train") for s, v in frame.select("subject_id", "split").iter_rows()}
    scan = pl.scan_parquet(files)
    subjects = sorted(label_frame["subject_id"].unique().to_list())
    if split_of is not None:
        unknown = [s for s in subjects if s not in split_of]
        if unknown:  # subjects missing from the split file get a seeded split of their own
            for s, v in zip(unknown, subject_splits(np.array(unknown, dtype=object), seed=seed)):
                split_of[s] = str(v)
            report.add("subjects not in subject_splits.parquet (split assigned by seed)", len(unknown))
    work = work_dir(out)
    writer = ShardedWriter(out, work, report)
    rejects: list[tuple[str, str]] = []
    for shard, group in enumerate(
        track(shards_of(subjects, shard_subjects), progress, -(-len(subjects) // shard_subjects), "reading events")
    ):
        shard_labels = label_frame.filter(pl.col("subject_id").is_in(group))
        events, with_data = meds_events(scan, group, shard_labels, code_frame, set(drop_columns), report)
        timed = events.filter(~pl.col("hours").is_nan())["sample_id"].unique().implode()
        empty = shard_labels.filter(~pl.col("sample_id").is_in(timed)).select("sample_id", "subject_id")
        for sample, subject in empty.iter_rows():
            reason = (
                "no event at or before its prediction_time"
                if subject in with_data
                else "subject has no events in the data"
            )
            rejects.append((sample, reason))
            report.add(_REASONS[reason], 1)
        writer.add(shard, events.filter(~pl.col("sample_id").is_in(empty["sample_id"].implode())))
    settings = {"vocab_size": vocab_size, "max_events": max_events, "max_event_tokens": max_event_tokens}
    modality = writer.modality(settings, tokenizer_from)
    if not len(label_frame) or len(rejects) == len(label_frame):
        raise StoreError(f"{labels}: no label row has events at or before its prediction_time")
    store = writer.write(
        modality,
        source=source or f"meds-{task}",
        tasks={task: spec},
        labels=label_frame,
        splits=split_of,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )
    write_outputs(out, report, rejects)
    shutil.rmtree(work, ignore_errors=True)
    return store, report


def _meds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="MEDS folder (data/**/*.parquet, metadata/) or one parquet file")
    p.add_argument("--labels", required=True, help="MEDS label file (parquet or CSV)")
    p.add_argument("--out", required=True, help="store to write")
    p.add_argument("--task", default=None, help="task name (default: from the label file's name)")
    p.add_argument("--codes", default=None, help="codes.parquet (default: <input>/metadata/codes.parquet)")
    p.add_argument("--splits", default=None, help="subject_splits.parquet (default: <input>/metadata/…)")
    common_arguments(p)
    p.add_argument("--max-events", type=int, default=128, help="latest events kept per sample")
    p.add_argument("--max-event-tokens", type=int, default=48, help="tokens per event")
    p.add_argument("--drop-columns", default="", help="comma-separated extra columns to leave out of the text")
    p.add_argument(
        "--cast-types",
        action="store_true",
        help="read columns whose type is not MEDS's (text times or numbers) by converting them; what does not "
        "convert is counted and dropped (default: stop, naming the file and column)",
    )


@preparer("meds", _meds_arguments)
def _run_meds(args: argparse.Namespace) -> None:
    """MEDS data + a MEDS label file → an EHR store (events as hierarchical text)."""
    store, report = prepare_meds(
        args.input,
        args.labels,
        args.out,
        task=args.task,
        codes=args.codes,
        splits=args.splits,
        max_events=args.max_events,
        max_event_tokens=args.max_event_tokens,
        vocab_size=args.vocab_size,
        tokenizer_from=args.tokenizer_from,
        drop_columns=comma_list(args.drop_columns) or [],
        shard_subjects=args.shard_subjects,
        seed=args.seed,
        overwrite=args.overwrite,
        progress=True,
        cast_types=args.cast_types,
    )
    print_prepared(store, report, args.out)
