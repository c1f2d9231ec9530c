"""What the EHR sources share: the report of what was dropped, events → per-sample sequences, the sharded
writer that tokenises and writes them, the work folder, and the `prepare` options they have in common."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import polars as pl

from biofm.datasets.outputs import report_path, track, write_rejects, write_report
from biofm.modalities.ehr import EHR, EventSequence
from biofm.platform.store import Store, StoreError, StoreWriter, is_local

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
        pl.element().filter(pl.element().struct.field("value").str.strip_chars().str.len_chars() > 0)
    )


def to_sequences(events: pl.DataFrame, max_events: int) -> tuple[list[str], list[str], list[EventSequence]]:
    """Per sample (in order of first appearance): its latest `max_events` events, oldest first, static
    facts (NaN hours) before them."""
    events = events.with_columns(pl.col("hours").is_nan().alias("_static")).sort(
        ["sample_id", "_static", "hours"], descending=[False, True, False], maintain_order=True
    )
    grouped = events.group_by("sample_id", maintain_order=True).agg(
        pl.col("subject_id").first(),
        pl.col("hours").tail(max_events),
        pl.col("table").tail(max_events),
        pl.col("fields").tail(max_events),
    )
    samples, subjects, sequences = [], [], []
    for sample, subject, hours, tables, fields in grouped.iter_rows():
        samples.append(sample)
        subjects.append(subject)
        sequences.append(
            EventSequence(
                np.asarray(hours, np.float32),
                list(tables),
                [[(f["column"], f["value"]) for f in row] for row in fields],
            )
        )
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

    def write(
        self,
        modality: EHR,
        *,
        source: str,
        tasks: dict,
        labels: pl.DataFrame,
        splits: dict | None,
        seed: int,
        overwrite: bool,
        progress: bool,
    ) -> Store:
        """`labels`: sample_id plus one column per task (already coded: floats, class indices)."""
        writer = StoreWriter(
            self.out, source=source, modalities={"ehr": modality.config()}, tasks=tasks, seed=seed, overwrite=overwrite
        )
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
            writer.write_batch(
                shard,
                sample_id=samples,
                subject_id=subjects,
                labels={t: values[:, j] for j, t in enumerate(tasks)},
                arrays=modality.featurise([sequences[i] for i in keep]),
                split=split,
            )
        return writer.finalize()


def write_outputs(out: str, report: Report, rejects: list[tuple[str, str]]) -> None:
    import pandas as pd

    write_report(out, report.counts)
    write_rejects(out, pd.DataFrame(rejects, columns=["sample_id", "reason"]))


def shards_of(subjects: list, shard_subjects: int) -> list[list]:
    return [subjects[i : i + shard_subjects] for i in range(0, len(subjects), shard_subjects)]


WORK_MARK = ".biofm-work"


def work_dir(out: str) -> Path:
    """`<out>.work` beside a local store (a temporary folder for a remote one), emptied first only when an
    earlier prepare made it (it holds `WORK_MARK`): a folder of the user's of that name is never removed."""
    if not is_local(out):
        return Path(tempfile.mkdtemp(prefix="biofm-ehr-"))
    work = Path(str(out).removeprefix("file://").rstrip("/") + ".work")
    if work.exists():
        if not (work / WORK_MARK).exists() and (not work.is_dir() or any(work.iterdir())):
            raise StoreError(
                f"{work} exists and was not made by biofm prepare; prepare keeps its work files "
                "there and would replace it: move it away or choose another --out"
            )
        shutil.rmtree(work)
    work.mkdir(parents=True)
    (work / WORK_MARK).touch()
    return work


# ------------------------------------------------------------------------------------------------- MEDS


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--tokenizer-from",
        default=None,
        help="reuse the ehr tokenizer and caps of this store (to train stores together)",
    )
    p.add_argument("--vocab-size", type=int, default=4000)
    p.add_argument("--shard-subjects", type=int, default=2000, help="subjects per shard (bounds memory)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


def print_prepared(store: Store, report: Report, out: str) -> None:
    print(store.describe())
    print(f"prepared {store.n} samples; what was dropped or changed (also in {report_path(out)}):")
    print("\n".join(report.lines()) or "  nothing")
