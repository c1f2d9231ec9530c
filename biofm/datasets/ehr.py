"""EHR sources → stores of hierarchical-text events (the `ehr` modality), GenHPF style.

`biofm prepare meds`: MEDS data shards + `metadata/codes.parquet` + `subject_splits.parquet` + a MEDS label
file → one sample per label row, built from the subject's events at or before its `prediction_time`.

`biofm prepare ehr-tables`: raw relational tables described by a schema YAML (event tables, their time
columns, how they link to the stays, columns to drop, dictionaries that name codes) → one sample per stay,
built from the events of its observation window; labels from a CSV keyed by the stay id and/or the built-in
MIMIC-IV ICU tasks (`biofm.datasets.mimic`).

Both run shard by shard over subjects, so memory follows a shard, not the database: raw tables are first
streamed block by block into per-shard parquet files. Every dropped row or sample is counted with its
reason (printed, and written to `<out>.report.json`; dropped samples to `<out>.rejects.csv`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import yaml

from biofm.platform import tables
from biofm.modalities.ehr import EHR, EventSequence
from biofm.platform.cli import comma_list, exporter, preparer
from biofm.datasets.outputs import report_path, track, write_rejects, write_report
from biofm.platform.store import Store, StoreError, StoreWriter, is_local, subject_splits
from biofm.platform.writing import prepares

SPLITS = {"train": "train", "tuning": "val", "val": "val", "held_out": "test", "test": "test"}
EVENT_COLUMNS = ["sample_id", "subject_id", "hours", "table", "fields"]
FIELDS = pl.List(pl.Struct({"column": pl.String, "value": pl.String}))


class Report:
    """Counts of what was dropped or changed, by reason; never names a subject, sample or value."""

    def __init__(self):
        self.counts: Counter[str] = Counter()

    def add(self, reason: str, n: int) -> None:
        if n:
            self.counts[reason] += int(n)

    def lines(self) -> list[str]:
        return [f"{n:>9,}  {reason}" for reason, n in sorted(self.counts.items())]


# ------------------------------------------------------------------------------------------ events → fields
def fields_expr(columns: list[str]) -> pl.Expr:
    """(column, value) pairs of the non-empty cells of `columns`, in order."""
    if not columns:
        return pl.lit([], dtype=FIELDS)
    pairs = [pl.struct(pl.lit(c).alias("column"), pl.col(c).cast(pl.String).alias("value")) for c in columns]
    return pl.concat_list(pairs).list.eval(
        pl.element().filter(pl.element().struct.field("value").str.strip_chars().str.len_chars() > 0))


def to_sequences(events: pl.DataFrame, max_events: int) -> tuple[list[str], list[str], list[EventSequence]]:
    """Per sample (in order of first appearance): its latest `max_events` events, oldest first, static
    facts (NaN hours) before them."""
    events = (events.with_columns(pl.col("hours").is_nan().alias("_static"))
              .sort(["sample_id", "_static", "hours"], descending=[False, True, False], maintain_order=True))
    grouped = events.group_by("sample_id", maintain_order=True).agg(
        pl.col("subject_id").first(), pl.col("hours").tail(max_events), pl.col("table").tail(max_events),
        pl.col("fields").tail(max_events))
    samples, subjects, sequences = [], [], []
    for sample, subject, hours, tables, fields in grouped.iter_rows():
        samples.append(sample)
        subjects.append(subject)
        sequences.append(EventSequence(np.asarray(hours, np.float32), list(tables),
                                       [[(f["column"], f["value"]) for f in row] for row in fields]))
    return samples, subjects, sequences


def strings_of(events: pl.DataFrame) -> Iterable[str]:
    """The distinct strings of an events frame (tables, columns, values): the tokenizer's corpus."""
    yield from events["table"].unique().to_list()
    exploded = events.select(pl.col("fields").explode()).unnest("fields").drop_nulls()
    yield from exploded["column"].unique().to_list()
    yield from exploded["value"].unique().to_list()


# ------------------------------------------------------------------------------------------------ writing
class ShardedWriter:
    """Per shard: an events frame written to a work folder (pass 1, which also gathers the tokenizer's
    corpus), then featurised and written to the store (pass 2, resumable shard by shard)."""

    def __init__(self, out: str, work: Path, report: Report):
        self.out, self.work, self.report = out, work, report
        self.strings: set[str] = set()
        self.n_shards = 0

    def add(self, shard: int, events: pl.DataFrame) -> None:
        self.strings.update(strings_of(events))
        events.write_parquet(self.work / f"events-{shard:05d}.parquet")
        self.n_shards = max(self.n_shards, shard + 1)

    def modality(self, settings: dict, tokenizer_from: str | None) -> EHR:
        if tokenizer_from:
            config = Store(tokenizer_from).modalities.get("ehr")
            if config is None:
                raise StoreError(f"{tokenizer_from}: --tokenizer-from names a store without an ehr modality")
            return EHR.from_config(config)
        modality = EHR(**settings)
        modality.fit(sorted(self.strings))
        return modality

    def write(self, modality: EHR, *, source: str, tasks: dict, labels: pl.DataFrame, splits: dict | None,
              seed: int, overwrite: bool, progress: bool) -> Store:
        """`labels`: sample_id plus one column per task (already coded: floats, class indices)."""
        writer = StoreWriter(self.out, source=source, modalities={"ehr": modality.config()}, tasks=tasks,
                             seed=seed, overwrite=overwrite)
        done = writer.committed()
        label_of = {row[0]: row[1:] for row in labels.select(["sample_id", *tasks]).iter_rows()}
        cap = modality.settings["max_events"]
        for shard in track(range(self.n_shards), progress, self.n_shards, "featurising"):
            if shard in done:  # committed by an earlier, interrupted run
                continue
            samples, subjects, sequences = to_sequences(pl.read_parquet(self.work / f"events-{shard:05d}.parquet"), cap)
            keep = [i for i, s in enumerate(samples) if s in label_of]
            if not keep:
                continue
            samples = [samples[i] for i in keep]
            subjects = [subjects[i] for i in keep]
            values = np.array([label_of[s] for s in samples], dtype=np.float32).reshape(len(samples), len(tasks))
            split = None
            if splits is not None:
                split = np.array([splits.get(s, "train") for s in subjects], dtype=object)
            writer.write_batch(shard, sample_id=samples, subject_id=subjects,
                               labels={t: values[:, j] for j, t in enumerate(tasks)},
                               arrays=modality.featurise([sequences[i] for i in keep]), split=split)
        return writer.finalize()


def _write_outputs(out: str, report: Report, rejects: list[tuple[str, str]]) -> None:
    import pandas as pd
    write_report(out, report.counts)
    write_rejects(out, pd.DataFrame(rejects, columns=["sample_id", "reason"]))


def _shards(subjects: list, shard_subjects: int) -> list[list]:
    return [subjects[i:i + shard_subjects] for i in range(0, len(subjects), shard_subjects)]


WORK_MARK = ".biofm-work"


def _work_dir(out: str) -> Path:
    """`<out>.work` beside a local store (a temporary folder for a remote one), emptied first only when an
    earlier prepare made it (it holds `WORK_MARK`): a folder of the user's of that name is never removed."""
    if not is_local(out):
        return Path(tempfile.mkdtemp(prefix="biofm-ehr-"))
    work = Path(str(out).removeprefix("file://").rstrip("/") + ".work")
    if work.exists():
        if not (work / WORK_MARK).exists() and (not work.is_dir() or any(work.iterdir())):
            raise StoreError(f"{work} exists and was not made by biofm prepare; prepare keeps its work files "
                             "there and would replace it: move it away or choose another --out")
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARK).touch()
    return work


# ------------------------------------------------------------------------------------------------- MEDS
def read_meds_labels(path: str, task: str, report: Report) -> tuple[pl.DataFrame, dict]:
    """A MEDS label file → (subject_id, prediction_time, sample_id, <task>) and the task's spec."""
    if not Path(path).exists():
        raise StoreError(f"{path}: label file does not exist")
    if path.endswith(".parquet"):
        frame = pl.read_parquet(tables.check_parquet(path, "MEDS label file"))
    else:
        try:
            frame = pl.read_csv(path, try_parse_dates=True)
        except Exception as err:  # noqa: BLE001 — polars raises NoDataError, ComputeError, …
            raise tables.read_failure(path, err, "MEDS label file") from None
        tables.check_columns(path, tables.header(path), "MEDS label file")
    if not len(frame):
        raise StoreError(f"{path}: the MEDS label file has a header but no data rows")
    for column in ("subject_id", "prediction_time"):
        if column not in frame.columns:
            raise StoreError(f"{path}: a MEDS label file needs '{column}'; columns are {frame.columns}")
    value = next((c for c in ("boolean_value", "integer_value", "float_value", "categorical_value")
                  if c in frame.columns and frame[c].null_count() < len(frame)), None)
    if value is None:
        raise StoreError(f"{path}: no boolean_value, integer_value, float_value or categorical_value with values")
    frame = frame.with_columns(pl.col("subject_id").cast(pl.String),
                               _as_datetime(frame, "prediction_time").alias("prediction_time"))
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


def meds_events(scan: pl.LazyFrame, subjects: list[str], labels: pl.DataFrame, codes: pl.DataFrame | None,
                drop: set[str], report: Report) -> tuple[pl.DataFrame, set[str]]:
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
        report.add("unparseable numeric_value (left out)", (parsed.is_null() & raw["numeric_value"].is_not_null()).sum())
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
    extras = [c for c in raw.columns if c not in {"subject_id", "time", "code", "description", "numeric_value",
                                                   "text_value", "table"} | drop
              and not c.endswith(("_id", "_seq", "_ID"))]
    raw = raw.with_columns(code_text.alias("_code"), pl.col("code").str.split("//").list.first().alias("table"))
    events = raw.select("subject_id", "time", "table",
                        fields_expr(["_code", *(["numeric_value"] if "numeric_value" in raw.columns else []),
                                     *(["text_value"] if "text_value" in raw.columns else []), *extras])
                        .list.eval(pl.element().struct.with_fields(
                            pl.field("column").replace({"_code": "code", "numeric_value": "value",
                                                        "text_value": "text"})))
                        .alias("fields"))
    joined = labels.select("subject_id", "prediction_time", "sample_id").join(events, on="subject_id", how="inner")
    joined = joined.filter(pl.col("time").is_null() | (pl.col("time") <= pl.col("prediction_time")))
    hours = (pl.col("time") - pl.col("prediction_time")).dt.total_microseconds() / 3.6e9
    return joined.select("sample_id", "subject_id", hours.fill_null(float("nan")).cast(pl.Float32).alias("hours"),
                         "table", "fields"), with_data


_REASONS = {"no event at or before its prediction_time":
            "samples with no event at or before their prediction_time (dropped)",
            "subject has no events in the data": "samples whose subject has no events in the data (dropped)"}


def read_codes(path: str | None) -> pl.DataFrame | None:
    """MEDS `codes.parquet` (code → description), or None when there is none."""
    if not path or not Path(path).exists():
        return None
    return (pl.read_parquet(tables.check_parquet(path, "MEDS codes file"), columns=["code", "description"])
            .unique("code", keep="first").with_columns(pl.lit(True).alias("_known")))


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
    rows = rows.with_columns(pl.col("subject_id").cast(pl.String),
                             _as_datetime(rows, "prediction_time").alias("prediction_time"))
    bad = rows.with_row_index("_row").filter(pl.col("subject_id").is_null() | pl.col("prediction_time").is_null())
    if len(bad):
        raise StoreError(f"prediction times: rows {bad['_row'].head(5).to_list()} have no subject_id or no "
                         "(parseable) prediction_time; every row needs both")
    rows = rows.with_columns(sample_id_expr().alias("sample_id")).select("subject_id", "prediction_time", "sample_id")
    subjects = sorted(rows["subject_id"].drop_nulls().unique().to_list())
    events, _ = meds_events(scan, subjects, rows, code_frame, set(), Report())
    samples, _, sequences = to_sequences(events, max_events)
    by_sample = dict(zip(samples, sequences))
    return rows, [by_sample.get(s) for s in rows["sample_id"]]


@prepares
def prepare_meds(input: str, labels: str, out: str, *, task: str | None = None, codes: str | None = None,
                 splits: str | None = None, max_events: int = 128, max_event_tokens: int = 48,
                 vocab_size: int = 4000, tokenizer_from: str | None = None, drop_columns: Iterable[str] = (),
                 shard_subjects: int = 5000, source: str | None = None, seed: int = 0, overwrite: bool = False,
                 progress: bool = False) -> tuple[Store, Report]:
    """Prepare a MEDS dataset and label file; returns the store and the report of what was dropped."""
    report = Report()
    files = meds_files(input)
    root = Path(input) if Path(input).is_dir() else None
    task = task or Path(labels).name.split(".")[0].removesuffix("_labels")
    label_frame, spec = read_meds_labels(labels, task, report)
    code_frame = read_codes(codes or (str(root / "metadata" / "codes.parquet") if root else None))
    splits = splits or (str(root / "metadata" / "subject_splits.parquet") if root else None)
    split_of = None
    if splits and Path(splits).exists():
        frame = pl.read_parquet(tables.check_parquet(splits, "MEDS subject_splits file")).with_columns(
            pl.col("subject_id").cast(pl.String))
        split_of = {s: SPLITS.get(v, "train") for s, v in frame.select("subject_id", "split").iter_rows()}
    scan = pl.scan_parquet(files)
    subjects = sorted(label_frame["subject_id"].unique().to_list())
    if split_of is not None:
        unknown = [s for s in subjects if s not in split_of]
        if unknown:  # subjects missing from the split file get a seeded split of their own
            for s, v in zip(unknown, subject_splits(np.array(unknown, dtype=object), seed=seed)):
                split_of[s] = str(v)
            report.add("subjects not in subject_splits.parquet (split assigned by seed)", len(unknown))
    work = _work_dir(out)
    writer = ShardedWriter(out, work, report)
    rejects: list[tuple[str, str]] = []
    for shard, group in enumerate(track(_shards(subjects, shard_subjects), progress,
                                         -(-len(subjects) // shard_subjects), "reading events")):
        shard_labels = label_frame.filter(pl.col("subject_id").is_in(group))
        events, with_data = meds_events(scan, group, shard_labels, code_frame, set(drop_columns), report)
        timed = events.filter(~pl.col("hours").is_nan())["sample_id"].unique().implode()
        empty = shard_labels.filter(~pl.col("sample_id").is_in(timed)).select("sample_id", "subject_id")
        for sample, subject in empty.iter_rows():
            reason = "no event at or before its prediction_time" if subject in with_data else \
                "subject has no events in the data"
            rejects.append((sample, reason))
            report.add(_REASONS[reason], 1)
        writer.add(shard, events.filter(~pl.col("sample_id").is_in(empty["sample_id"].implode())))
    settings = {"vocab_size": vocab_size, "max_events": max_events, "max_event_tokens": max_event_tokens}
    modality = writer.modality(settings, tokenizer_from)
    if not len(label_frame) or len(rejects) == len(label_frame):
        raise StoreError(f"{labels}: no label row has events at or before its prediction_time")
    store = writer.write(modality, source=source or f"meds-{task}", tasks={task: spec}, labels=label_frame,
                            splits=split_of, seed=seed, overwrite=overwrite, progress=progress)
    _write_outputs(out, report, rejects)
    shutil.rmtree(work, ignore_errors=True)
    return store, report


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
    truth = pl.DataFrame({"sample_id": opened.index("sample_id").astype(str),
                          "boolean_value": opened.labels(task)})
    frame = frame.join(truth, on="sample_id", how="left")
    parts = pl.col("sample_id").str.split_exact("@", 1)
    out = frame.select(
        parts.struct.field("field_0").alias("subject_id"),
        parts.struct.field("field_1").str.to_datetime("%Y-%m-%dT%H:%M:%S%.6f", time_unit="us").alias("prediction_time"),
        pl.when(pl.col("boolean_value").is_nan()).then(None).otherwise(pl.col("boolean_value") > 0.5)
        .alias("boolean_value"),
        (pl.col(prob) >= 0.5).alias("predicted_boolean_value"),
        pl.col(prob).cast(pl.Float32).alias("predicted_boolean_probability"))
    subject = out["subject_id"].cast(pl.Int64, strict=False)
    if subject.null_count() == 0:
        out = out.with_columns(subject.alias("subject_id"))
    return out.sort(["subject_id", "prediction_time"])


# ----------------------------------------------------------------------------------------- raw tables
class Schema:
    """The YAML that describes a database (see configs/ehr/mimic-iv.yaml and docs/ehr-schema.md)."""

    def __init__(self, path: str, encoding: str | None = None):
        self.path = path
        if not Path(path).exists():
            raise StoreError(f"{path}: schema file does not exist")
        try:
            spec = yaml.safe_load(Path(path).read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as err:
            detail = str(err).replace("\n", " ")[:200]
            raise StoreError(f"{path}: the schema is not valid YAML ({detail})") from None
        if not isinstance(spec, dict):
            raise StoreError(f"{path}: the schema must be a mapping with 'stays' and 'tables', got a "
                             f"{type(spec).__name__}")
        self.spec = spec
        for key in ("stays", "tables"):
            if key not in spec:
                raise StoreError(f"{path}: the schema has no '{key}' section")
        self.name = str(spec.get("name", Path(path).stem))
        self.files = str(spec.get("files", "{name}.csv.gz"))
        self.stays = spec["stays"]
        if not isinstance(self.stays, dict):
            raise StoreError(f"{path}: 'stays' must be a mapping (table, id, subject, start)")
        for key in ("table", "id", "subject", "start"):
            if key not in self.stays:
                raise StoreError(f"{path}: stays needs '{key}'")
        self.tables = spec["tables"]
        if not isinstance(self.tables, list):
            raise StoreError(f"{path}: 'tables' must be a list of tables (each with table, time, link)")
        for i, table in enumerate(self.tables):
            if not isinstance(table, dict):
                raise StoreError(f"{path}: tables[{i}] must be a mapping with table, time and link")
            for key in ("table", "time", "link"):
                if key not in table:
                    raise StoreError(f"{path}: tables[{i}] needs '{key}'")
        numbers = {}
        for key, default, kind in (("observation_hours", 12, float), ("max_events", 128, int),
                                   ("max_event_tokens", 48, int)):
            try:
                numbers[key] = kind(spec.get(key, default))
            except (TypeError, ValueError):
                raise StoreError(f"{path}: '{key}' must be a number, got {spec.get(key)!r}") from None
        self.observation_hours, self.max_events, self.max_event_tokens = (
            numbers["observation_hours"], numbers["max_events"], numbers["max_event_tokens"])
        self.tasks = spec.get("tasks")
        self.encoding = str(encoding or spec.get("encoding", "utf-8"))  # of the CSV tables

    def file(self, root: str, table: str) -> Path:
        """The file of `table` under `root`, trying the schema's pattern, then .csv.gz, .csv, .parquet."""
        candidates = [self.files.format(name=table)] + [f"{table}{ext}" for ext in (".csv.gz", ".csv", ".parquet")]
        for candidate in candidates:
            if (Path(root) / candidate).exists():
                return Path(root) / candidate
        raise StoreError(f"{self.path}: table '{table}' is not in {root} (looked for {candidates[0]})")


def header_of(path: Path, encoding: str = "utf-8") -> list[str]:
    """A table's column names; a file that cannot be read (empty, truncated gzip, another encoding, a
    damaged parquet, two columns of one name) is one StoreError naming it."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            names = list(pq.read_schema(path).names)
        else:
            import pyarrow.csv as pacsv
            with pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(block_size=1 << 16,
                                                                           encoding=encoding)) as reader:
                names = list(reader.schema.names)
    except Exception as err:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError, EOFError, …
        raise tables.read_failure(str(path), err, "table", encoding) from None
    tables.check_columns(str(path), names, "table")
    return names


def stream_table(path: Path, columns: list[str], block_bytes: int = 16 << 20,
                 encoding: str = "utf-8") -> Iterator[pl.DataFrame]:
    """A table's `columns` as text, block by block (CSV, CSV.gz or parquet): never the whole file. A block
    that cannot be read (a truncated gzip, a line in another encoding) is a StoreError naming the file."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            for batch in pq.ParquetFile(path).iter_batches(columns=columns, batch_size=1 << 17):
                yield pl.from_arrow(batch).with_columns(pl.all().cast(pl.String))
            return
        import pyarrow as pa
        import pyarrow.csv as pacsv
        convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                       strings_can_be_null=True)
        with pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(block_size=block_bytes, encoding=encoding),
                            convert_options=convert) as reader:
            for batch in reader:
                yield pl.from_arrow(batch)
    except StoreError:
        raise
    except Exception as err:  # noqa: BLE001 — pyarrow raises ArrowInvalid, OSError, EOFError, …
        raise tables.read_failure(str(path), err, "table", encoding) from None


def check_columns(schema: Schema, path: Path, table: str, wanted: Iterable[str]) -> list[str]:
    header = header_of(path, schema.encoding)
    missing = [c for c in wanted if c and c not in header]
    if missing:
        raise StoreError(f"{schema.path}: table '{table}' ({path}) has no column {missing}; its columns are {header}")
    return header


def read_small(schema: Schema, root: str, table: str, columns: list[str]) -> pl.DataFrame:
    path = schema.file(root, table)
    check_columns(schema, path, table, columns)
    if not columns:
        return pl.DataFrame()
    blocks = list(stream_table(path, columns, encoding=schema.encoding))
    return pl.concat(blocks, how="vertical") if blocks else pl.DataFrame(schema={c: pl.String for c in columns})


def partition_tables(schema: Schema, root: str, stays: pl.DataFrame, shard_of: dict[str, int], work: Path,
                     report: Report, progress: bool) -> None:
    """Stream every event table once; rows of cohort stays go to `work/<table>/<shard>.parquet`."""
    import pyarrow.parquet as pq
    for spec in schema.tables:
        table = spec["table"]
        path = schema.file(root, table)
        header = check_columns(schema, path, table, [spec["time"], spec["link"], *spec.get("numeric", [])])
        for d in spec.get("dictionaries", []):
            if d["key"] not in header:
                raise StoreError(f"{schema.path}: table '{table}' has no column '{d['key']}' for its dictionary")
        drop = set(spec.get("drop", []))
        columns = [c for c in header if c not in drop or c in (spec["time"], spec["link"])]
        link = spec["link"]
        if link not in stays.columns:
            raise StoreError(f"{schema.path}: table '{table}' links by '{link}', which the stays table does not "
                             f"have; add it to stays.keys")
        link_to_shard = (stays.select(pl.col(link).cast(pl.String), pl.col("_subject"))
                         .drop_nulls().unique(link)
                         .with_columns(pl.col("_subject").replace_strict(shard_of, return_dtype=pl.Int32)
                                       .alias("_shard")).select(link, "_shard"))
        writers: dict[int, pq.ParquetWriter] = {}
        out_dir = work / table.replace("/", "__")
        out_dir.mkdir(parents=True, exist_ok=True)
        seen = 0
        for block in track(stream_table(path, columns, encoding=schema.encoding), progress, None,
                           f"reading {table}"):
            seen += len(block)
            block = block.join(link_to_shard, on=link, how="inner")
            for (shard,), part in block.partition_by("_shard", as_dict=True).items():
                arrow = part.drop("_shard").to_arrow()
                if shard not in writers:
                    writers[shard] = pq.ParquetWriter(out_dir / f"{shard:05d}.parquet", arrow.schema)
                writers[shard].write_table(arrow)
        for w in writers.values():
            w.close()
        report.add(f"rows read from {table}", seen)


def table_events(schema: Schema, spec: dict, part: pl.DataFrame, stays: pl.DataFrame,
                 dictionaries: dict[str, pl.DataFrame], report: Report) -> pl.DataFrame:
    """One table's rows of one shard → events (sample_id, subject_id, hours, table, fields) in the window."""
    table, time_col, link = spec["table"], spec["time"], spec["link"]
    label = table.split("/")[-1]
    time = pl.col(time_col).str.strip_chars().str.to_datetime(strict=False, time_unit="us")
    part = part.with_columns(time.alias("_time"))
    bad = part["_time"].is_null()
    report.add(f"{label}: rows with a missing or unparseable {time_col} (dropped)", bad.sum())
    part = part.filter(~bad)
    windows = stays.select(pl.col(link).cast(pl.String), "_sample", "_subject", "_start", "_prediction")
    part = part.join(windows, on=link, how="inner")
    part = part.filter((pl.col("_time") >= pl.col("_start")) & (pl.col("_time") <= pl.col("_prediction")))
    for numeric in spec.get("numeric", []):
        value = pl.col(numeric).str.strip_chars()
        parsed = value.cast(pl.Float64, strict=False)
        bad = part.select((parsed.is_null() & value.is_not_null() & (value.str.len_chars() > 0)).sum()).item()
        report.add(f"{label}: unparseable numbers in {numeric} (left out)", bad)
        part = part.with_columns(parsed.cast(pl.String).alias(numeric))
    for d in spec.get("dictionaries", []):
        names = dictionaries[d["table"]]
        key = d["key"]
        part = part.join(names.rename({"_name": "_name_" + key}), left_on=key, right_on="_key", how="left")
        unknown = part["_name_" + key].is_null() & part[key].is_not_null()
        report.add(f"{label}: {key} codes not in {d['table']} (raw code used)", unknown.sum())
        part = part.with_columns(pl.coalesce("_name_" + key, key).alias(key)).drop("_name_" + key)
    drop = set(spec.get("drop", [])) | {time_col, link, schema.stays["id"], schema.stays["subject"]}
    keep = [c for c in part.columns if not c.startswith("_") and c not in drop]
    before = len(part)
    part = part.unique(subset=["_sample", "_time", *keep], maintain_order=True)
    report.add(f"{label}: duplicate rows (dropped)", before - len(part))
    report.add(f"{label}: events in an observation window", len(part))
    hours = (pl.col("_time") - pl.col("_prediction")).dt.total_microseconds() / 3.6e9
    return part.select(pl.col("_sample").alias("sample_id"), pl.col("_subject").alias("subject_id"),
                       hours.cast(pl.Float32).alias("hours"), pl.lit(label).alias("table"),
                       fields_expr(keep).alias("fields"))


def read_stays(schema: Schema, root: str) -> pl.DataFrame:
    s = schema.stays
    columns = list(dict.fromkeys([s["id"], s["subject"], s["start"], *([s["end"]] if s.get("end") else []),
                                  *s.get("keys", [])]))
    frame = read_small(schema, root, s["table"], columns)
    if not len(frame):
        raise StoreError(f"{schema.file(root, s['table'])}: the stays table has a header but no data rows")
    start = pl.col(s["start"]).str.to_datetime(strict=False, time_unit="us")
    frame = frame.with_columns(pl.col(s["id"]).alias("_sample"), pl.col(s["subject"]).alias("_subject"),
                               start.alias("_start"))
    frame = frame.with_columns((pl.col("_start") + pl.duration(minutes=int(schema.observation_hours * 60)))
                               .alias("_prediction"))
    return frame


@prepares
def prepare_ehr_tables(input: str, schema: str, out: str, *, labels: str | None = None,
                       tokenizer_from: str | None = None, vocab_size: int = 4000, shard_subjects: int = 2000,
                       source: str | None = None, seed: int = 0, overwrite: bool = False, progress: bool = False,
                       encoding: str | None = None) -> tuple[Store, Report]:
    """Prepare raw relational EHR tables described by `schema`; returns the store and the report.
    `encoding`: of the CSV tables and the label CSV (default: the schema's `encoding`, else utf-8)."""
    from biofm.datasets import mimic
    if not Path(input).is_dir():
        raise StoreError(f"{input}: input folder does not exist")
    spec = Schema(schema, encoding)
    report = Report()
    stays = read_stays(spec, input)
    bad_start = stays["_start"].is_null()
    report.add("stays with a missing or unparseable start time (dropped)", bad_start.sum())
    no_id = stays["_sample"].is_null() | stays["_subject"].is_null()
    report.add("stays without a stay or subject id (dropped)", no_id.sum())
    duplicate = stays["_sample"].is_duplicated() & ~no_id
    report.add("stays whose id appears twice (all its rows dropped)", duplicate.sum())
    stays = stays.filter(~bad_start & ~no_id & ~duplicate)
    tasks: dict[str, dict] = {}
    label_frame = stays.select(pl.col("_sample").alias("sample_id"))
    if spec.tasks:
        kind = spec.tasks.get("kind")
        if kind != "mimic-iv-icu":
            raise StoreError(f"{schema}: tasks.kind {kind!r} is unknown; built in: mimic-iv-icu")
        cohort, task_specs = mimic.icu_tasks(spec, input, stays, report)
        stays = stays.filter(pl.col("_sample").is_in(cohort["sample_id"].implode()))
        label_frame = cohort
        tasks.update(task_specs)
    if labels:
        extra, extra_specs = read_label_csv(labels, spec.stays["id"], spec.encoding)
        label_frame = label_frame.join(extra, on="sample_id", how="left")
        tasks.update(extra_specs)
    if not tasks:
        raise StoreError(f"{schema}: no tasks: pass --labels CSV or name built-in tasks in the schema")
    label_frame = label_frame.with_columns([pl.col(t).cast(pl.Float32) for t in tasks])
    subjects = sorted(stays["_subject"].unique().to_list())
    shard_of = {s: i // shard_subjects for i, s in enumerate(subjects)}
    work = _work_dir(out)
    partition_tables(spec, input, stays, shard_of, work, report, progress)
    dictionaries = {}
    for t in spec.tables:
        for d in t.get("dictionaries", []):
            if d["table"] not in dictionaries:
                names = read_small(spec, input, d["table"], [d["key"], d["name"]])
                dictionaries[d["table"]] = names.select(pl.col(d["key"]).alias("_key"),
                                                        pl.col(d["name"]).alias("_name")).unique("_key")
    writer = ShardedWriter(out, work, report)
    rejects: list[tuple[str, str]] = []
    n_shards = max(shard_of.values(), default=-1) + 1
    for shard in range(n_shards):
        shard_stays = stays.filter(pl.col("_subject").replace_strict(shard_of, default=-1) == shard)
        parts = []
        for t in spec.tables:
            path = work / t["table"].replace("/", "__") / f"{shard:05d}.parquet"
            if path.exists():
                parts.append(table_events(spec, t, pl.read_parquet(path), shard_stays, dictionaries, report))
        events = pl.concat(parts, how="vertical") if parts else pl.DataFrame(schema={
            "sample_id": pl.String, "subject_id": pl.String, "hours": pl.Float32, "table": pl.String, "fields": FIELDS})
        have = set(events["sample_id"].unique().to_list())
        empty = [s for s in shard_stays["_sample"].to_list() if s not in have]
        rejects += [(s, "no event in the observation window") for s in empty]
        report.add("stays with no event in the observation window (dropped)", len(empty))
        writer.add(shard, events)
    if len(rejects) == len(stays):
        raise StoreError(f"{input}: no stay has events in its observation window")
    settings = {"vocab_size": vocab_size, "max_events": spec.max_events, "max_event_tokens": spec.max_event_tokens}
    modality = writer.modality(settings, tokenizer_from)
    store = writer.write(modality, source=source or spec.name, tasks=tasks, labels=label_frame, splits=None,
                            seed=seed, overwrite=overwrite, progress=progress)
    _write_outputs(out, report, rejects)
    shutil.rmtree(work, ignore_errors=True)
    return store, report


def read_label_csv(path: str, id_column: str, encoding: str = "utf-8") -> tuple[pl.DataFrame, dict]:
    """Labels keyed by the stay id: 0/1 columns are binary, other numbers regression, text multiclass (the
    rule of every label table, `label_tasks`)."""
    from biofm.datasets.manifest import label_tasks
    frame = tables.read_table(path, "label table", encoding)
    if id_column not in frame.columns:
        raise StoreError(f"{path}: no id column '{id_column}'; columns are {list(frame.columns)}")
    specs, labels = label_tasks(frame, [c for c in frame.columns if c != id_column], path)
    return pl.DataFrame({"sample_id": frame[id_column].astype(str).to_list(),
                         **{c: pl.Series(c, v, dtype=pl.Float32) for c, v in labels.items()}}), specs


# ------------------------------------------------------------------------------------------------- CLI
def _meds_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="MEDS folder (data/**/*.parquet, metadata/) or one parquet file")
    p.add_argument("--labels", required=True, help="MEDS label file (parquet or CSV)")
    p.add_argument("--out", required=True, help="store to write")
    p.add_argument("--task", default=None, help="task name (default: from the label file's name)")
    p.add_argument("--codes", default=None, help="codes.parquet (default: <input>/metadata/codes.parquet)")
    p.add_argument("--splits", default=None, help="subject_splits.parquet (default: <input>/metadata/…)")
    _common(p)
    p.add_argument("--max-events", type=int, default=128, help="latest events kept per sample")
    p.add_argument("--max-event-tokens", type=int, default=48, help="tokens per event")
    p.add_argument("--drop-columns", default="", help="comma-separated extra columns to leave out of the text")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer-from", default=None,
                   help="reuse the ehr tokenizer and caps of this store (to train stores together)")
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--shard-subjects", type=int, default=2000, help="subjects per shard (bounds memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def _print(store: Store, report: Report, out: str) -> None:
    print(store.describe())
    print(f"prepared {store.n} samples; what was dropped or changed (also in {report_path(out)}):")
    print("\n".join(report.lines()) or "  nothing")


@preparer("meds", _meds_arguments)
def _run_meds(args: argparse.Namespace) -> None:
    """MEDS data + a MEDS label file → an EHR store (events as hierarchical text)."""
    store, report = prepare_meds(
        args.input, args.labels, args.out, task=args.task, codes=args.codes, splits=args.splits,
        max_events=args.max_events, max_event_tokens=args.max_event_tokens, vocab_size=args.vocab_size,
        tokenizer_from=args.tokenizer_from, drop_columns=comma_list(args.drop_columns) or [],
        shard_subjects=args.shard_subjects, seed=args.seed, overwrite=args.overwrite, progress=True)
    _print(store, report, args.out)


def _tables_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of the database's tables")
    p.add_argument("--schema", required=True, help="schema YAML (e.g. configs/ehr/mimic-iv.yaml)")
    p.add_argument("--out", required=True, help="store to write")
    p.add_argument("--labels", default=None, help="CSV of labels keyed by the stay id")
    p.add_argument("--encoding", default=None, help="text encoding of the CSV tables and labels (default: the "
                                                    "schema's `encoding`, else utf-8)")
    _common(p)


@preparer("ehr-tables", _tables_arguments)
def _run_tables(args: argparse.Namespace) -> None:
    """Raw EHR tables of any schema → an EHR store (events as hierarchical text)."""
    store, report = prepare_ehr_tables(args.input, args.schema, args.out, labels=args.labels,
                                       tokenizer_from=args.tokenizer_from, vocab_size=args.vocab_size,
                                       shard_subjects=args.shard_subjects, seed=args.seed,
                                       overwrite=args.overwrite, encoding=args.encoding, progress=True)
    _print(store, report, args.out)


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
