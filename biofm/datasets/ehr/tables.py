"""`biofm prepare ehr-tables`: raw relational tables described by a schema YAML (event tables, their time
columns, how they link to the stays, columns to drop, dictionaries that name codes) → one sample per stay,
built from the events of its observation window; labels from a CSV keyed by the stay id and/or the built-in
MIMIC-IV ICU tasks (`biofm.datasets.ehr.mimic`).

Raw tables are first streamed block by block into per-shard parquet files, so memory follows a shard, not
the database. Every dropped row or sample is counted with its reason (printed, and written to
`<out>.report.json`; dropped samples to `<out>.rejects.csv`).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import polars as pl

from biofm.commands import preparer
from biofm.datasets.ehr import mimic
from biofm.datasets.ehr.common import (
    FIELDS,
    Report,
    ShardedWriter,
    common_arguments,
    fields_expr,
    print_prepared,
    work_dir,
    write_outputs,
)
from biofm.datasets.ehr.schema import (
    OFFSET_ZERO,
    Schema,
    check_columns,
    check_times,
    first_values,
    read_small,
    stream_table,
    time_expr,
)
from biofm.datasets.outputs import track
from biofm.platform import tables
from biofm.platform.store import Store, StoreError
from biofm.platform.writing import prepares


def partition_tables(
    schema: Schema, root: str, stays: pl.DataFrame, shard_of: dict[str, int], work: Path, report: Report, progress: bool
) -> None:
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
            raise StoreError(
                f"{schema.path}: table '{table}' links by '{link}', which the stays table does not "
                f"have; add it to stays.keys"
            )
        link_to_shard = (
            stays.select(pl.col(link).cast(pl.String), pl.col("_subject"))
            .drop_nulls()
            .unique(link)
            .with_columns(pl.col("_subject").replace_strict(shard_of, return_dtype=pl.Int32).alias("_shard"))
            .select(link, "_shard")
        )
        writers: dict[int, pq.ParquetWriter] = {}
        out_dir = work / table.replace("/", "__")
        out_dir.mkdir(parents=True, exist_ok=True)
        seen = 0
        for block in track(stream_table(path, columns, encoding=schema.encoding), progress, None, f"reading {table}"):
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


def table_events(
    schema: Schema,
    spec: dict,
    part: pl.DataFrame,
    stays: pl.DataFrame,
    dictionaries: dict[str, pl.DataFrame],
    report: Report,
) -> pl.DataFrame:
    """One table's rows of one shard → events (sample_id, subject_id, hours, table, fields) in the window."""
    table, time_col, link = spec["table"], spec["time"], spec["link"]
    label = table.split("/")[-1]
    part = part.with_columns(time_expr(time_col, schema.unit_of(spec)).alias("_time"))
    bad = part["_time"].is_null()
    report.add(f"{label}: rows with a missing or unparseable {time_col} (dropped)", bad.sum())
    part = part.filter(~bad)
    windows = stays.select(pl.col(link).cast(pl.String), "_sample", "_subject", "_start", "_prediction")
    part = part.join(windows, on=link, how="inner")
    joined = len(part)
    part = part.filter((pl.col("_time") >= pl.col("_start")) & (pl.col("_time") <= pl.col("_prediction")))
    report.add(f"{label}: rows before the stay's start or after its prediction time (not used)", joined - len(part))
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
    return part.select(
        pl.col("_sample").alias("sample_id"),
        pl.col("_subject").alias("subject_id"),
        hours.cast(pl.Float32).alias("hours"),
        pl.lit(label).alias("table"),
        fields_expr(keep).alias("fields"),
    )


def read_stays(schema: Schema, root: str) -> pl.DataFrame:
    """The stays table with `_sample`, `_subject`, `_start` and `_prediction` (the window's end); stops when
    most start times do not parse as the schema says (`check_times`)."""
    s = schema.stays
    offset_zero = not isinstance(s["start"], str)  # `start: 0`: every stay starts at the offsets' zero
    columns = list(
        dict.fromkeys(
            [
                s["id"],
                s["subject"],
                *([] if offset_zero else [s["start"]]),
                *([s["end"]] if s.get("end") else []),
                *s.get("keys", []),
            ]
        )
    )
    frame = read_small(schema, root, s["table"], columns)
    if not len(frame):
        raise StoreError(f"{schema.file(root, s['table'])}: the stays table has a header but no data rows")
    if offset_zero:
        start = pl.lit(OFFSET_ZERO, dtype=pl.Datetime("us"))
    else:
        check_times(schema, f"stays table '{s['table']}'", s["start"], frame[s["start"]], schema.start_unit, "in stays")
        start = time_expr(s["start"], schema.start_unit)
    frame = frame.with_columns(
        pl.col(s["id"]).alias("_sample"), pl.col(s["subject"]).alias("_subject"), start.alias("_start")
    )
    frame = frame.with_columns(
        (pl.col("_start") + pl.duration(minutes=int(schema.observation_hours * 60))).alias("_prediction")
    )
    return frame


@prepares
def prepare_ehr_tables(
    input: str,
    schema: str,
    out: str,
    *,
    labels: str | None = None,
    tokenizer_from: str | None = None,
    vocab_size: int = 4000,
    shard_subjects: int = 2000,
    source: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    encoding: str | None = None,
) -> tuple[Store, Report]:
    """Prepare raw relational EHR tables described by `schema`; returns the store and the report.
    `encoding`: of the CSV tables and the label CSV (default: the schema's `encoding`, else utf-8)."""
    if not Path(input).is_dir():
        raise StoreError(f"{input}: input folder does not exist")
    spec = Schema(schema, encoding)
    report = Report()
    try:
        return _prepare(
            spec,
            input,
            out,
            report,
            labels=labels,
            tokenizer_from=tokenizer_from,
            vocab_size=vocab_size,
            shard_subjects=shard_subjects,
            source=source,
            seed=seed,
            overwrite=overwrite,
            progress=progress,
        )
    except Exception as err:
        failed(out, report, err)
        raise


def failed(out: str, report: Report, err: Exception) -> None:
    """A prepare that stops still writes `<out>.report.json` (what it counted, and why it stopped) — unless a
    store is already there, whose report is kept — and leaves no work folder behind."""
    from biofm.datasets.ehr.common import WORK_MARK
    from biofm.datasets.outputs import write_report
    from biofm.platform.store import is_local

    if not is_local(out):
        return
    local = Path(str(out).removeprefix("file://").rstrip("/"))
    work = Path(f"{local}.work")
    if (work / WORK_MARK).exists():
        shutil.rmtree(work, ignore_errors=True)
    if not local.exists():
        write_report(str(local), {"stopped": str(err), **report.counts})


def check_event_times(schema: Schema, root: str) -> None:
    """Each event table's time column, on its first block, before any table is streamed (`check_times`)."""
    for i, spec in enumerate(schema.tables):
        path = schema.file(root, spec["table"])
        check_columns(schema, path, spec["table"], [spec["time"]])
        where = f"table '{spec['table']}'"
        check_times(
            schema,
            where,
            spec["time"],
            first_values(schema, path, spec["time"]),
            schema.unit_of(spec),
            f"on tables[{i}] (or at the schema's top for every table)",
        )


def _prepare(
    spec: Schema,
    input: str,
    out: str,
    report: Report,
    *,
    labels,
    tokenizer_from,
    vocab_size: int,
    shard_subjects: int,
    source,
    seed: int,
    overwrite: bool,
    progress: bool,
) -> tuple[Store, Report]:
    schema = spec.path
    stays = read_stays(spec, input)
    check_event_times(spec, input)
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
    work = work_dir(out)
    partition_tables(spec, input, stays, shard_of, work, report, progress)
    dictionaries = {}
    for t in spec.tables:
        for d in t.get("dictionaries", []):
            if d["table"] not in dictionaries:
                names = read_small(spec, input, d["table"], [d["key"], d["name"]])
                dictionaries[d["table"]] = names.select(
                    pl.col(d["key"]).alias("_key"), pl.col(d["name"]).alias("_name")
                ).unique("_key")
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
        events = (
            pl.concat(parts, how="vertical")
            if parts
            else pl.DataFrame(
                schema={
                    "sample_id": pl.String,
                    "subject_id": pl.String,
                    "hours": pl.Float32,
                    "table": pl.String,
                    "fields": FIELDS,
                }
            )
        )
        have = set(events["sample_id"].unique().to_list())
        empty = [s for s in shard_stays["_sample"].to_list() if s not in have]
        rejects += [(s, "no event in the observation window") for s in empty]
        report.add("stays with no event in the observation window (dropped)", len(empty))
        writer.add(shard, events)
    if len(rejects) == len(stays):
        raise StoreError(f"{input}: no stay has events in its observation window")
    settings = {"vocab_size": vocab_size, "max_events": spec.max_events, "max_event_tokens": spec.max_event_tokens}
    modality = writer.modality(settings, tokenizer_from)
    store = writer.write(
        modality,
        source=source or spec.name,
        tasks=tasks,
        labels=label_frame,
        splits=None,
        seed=seed,
        overwrite=overwrite,
        progress=progress,
    )
    write_outputs(out, report, rejects)
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
    return pl.DataFrame(
        {
            "sample_id": frame[id_column].astype(str).to_list(),
            **{c: pl.Series(c, v, dtype=pl.Float32) for c, v in labels.items()},
        }
    ), specs


def _tables_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", required=True, help="folder of the database's tables")
    p.add_argument("--schema", required=True, help="schema YAML (e.g. configs/ehr/mimic-iv.yaml)")
    p.add_argument("--out", required=True, help="store to write")
    p.add_argument("--labels", default=None, help="CSV of labels keyed by the stay id")
    p.add_argument(
        "--encoding",
        default=None,
        help="text encoding of the CSV tables and labels (default: the schema's `encoding`, else utf-8)",
    )
    common_arguments(p)


@preparer("ehr-tables", _tables_arguments)
def _run_tables(args: argparse.Namespace) -> None:
    """Raw EHR tables of any schema → an EHR store (events as hierarchical text)."""
    store, report = prepare_ehr_tables(
        args.input,
        args.schema,
        args.out,
        labels=args.labels,
        tokenizer_from=args.tokenizer_from,
        vocab_size=args.vocab_size,
        shard_subjects=args.shard_subjects,
        seed=args.seed,
        overwrite=args.overwrite,
        encoding=args.encoding,
        progress=True,
    )
    print_prepared(store, report, args.out)
