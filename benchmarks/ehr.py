"""EHR prepare throughput against only reading the same tables with polars (the limit), with peak memory.

    python benchmarks/ehr.py [--input ../shared/data/ehr/mimic-iv-demo-2.2] [--copies 1 4]
                             [--shard-subjects 100]

For each database size (the MIMIC-IV demo, and the demo repeated `copies` times with fresh ids, written to a
temporary folder), in a fresh process each:
  - read:    polars reads the schema's event tables whole (`pl.read_csv`): no cohort, no text — the limit;
  - prepare: `biofm prepare ehr-tables` with configs/ehr/mimic-iv.yaml: cohort, the 11 ICU tasks, events as
             hierarchical text, tokenizer training, featurising, the store.
Events/s counts the event-table rows read. Peak memory is the process's max RSS (`import_peak_mib`: importing the code alone, torch included). The last line is JSON with
both rates, `vs_read` (prepare / read) and peak MiB per size; `prepare_seconds_demo` is the whole demo.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# biofm.testing.SHARED_DATA's rule, spelled here: importing biofm.testing would load Lightning before the
# memory figures are taken
DEFAULT_INPUT = (
    Path(os.environ.get("BIOFM_SHARED_DATA") or ROOT.parent / "shared" / "data") / "ehr" / "mimic-iv-demo-2.2"
)
SCHEMA = ROOT / "configs" / "ehr" / "mimic-iv.yaml"
EVENT_TABLES = ["hosp/labevents", "hosp/prescriptions", "icu/inputevents"]
COPIED = EVENT_TABLES + ["icu/icustays", "hosp/patients", "hosp/admissions", "icu/procedureevents"]
DICTIONARIES = ["hosp/d_labitems", "icu/d_items"]
IDS = ("subject_id", "hadm_id", "stay_id")

READ = """
import resource, sys, time, polars as pl
start = time.perf_counter(); rows = 0
for path in sys.argv[1:]:
    rows += len(pl.read_csv(path, infer_schema=False))
print(rows, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

PREPARE = """
import resource, sys, time
from biofm.datasets.ehr import prepare_ehr_tables
start = time.perf_counter()
store, report = prepare_ehr_tables(sys.argv[1], sys.argv[2], sys.argv[3], shard_subjects=int(sys.argv[4]))
rows = sum(v for k, v in report.counts.items() if k.startswith("rows read from"))
print(rows, time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, store.n)
"""


IMPORT = """
import resource
import biofm.datasets.ehr  # noqa: F401 — torch and polars, before any data
print(0, 0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def repeat_database(source: Path, out: Path, copies: int) -> None:
    """The demo `copies` times: copy k prefixes every subject, admission and stay id with k (so ids stay
    numbers and never collide); dictionaries are shared."""
    import polars as pl

    for table in COPIED:
        frame = pl.read_csv(source / f"{table}.csv.gz", infer_schema=False)
        parts = [
            frame.with_columns([(pl.lit(str(k)) + pl.col(c)).alias(c) for c in IDS if c in frame.columns])
            for k in range(1, copies + 1)
        ]
        (out / table).parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(out / f"{table}.csv.gz", "wb", compresslevel=1) as handle:
            pl.concat(parts).write_csv(handle)
    for table in DICTIONARIES:
        (out / table).parent.mkdir(parents=True, exist_ok=True)
        (out / f"{table}.csv.gz").write_bytes((source / f"{table}.csv.gz").read_bytes())


def run(code: str, *args: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    return [float(x) for x in result.stdout.strip().splitlines()[-1].split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(DEFAULT_INPUT))
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--shard-subjects", type=int, default=100)
    args = parser.parse_args()
    source = Path(args.input)
    if not source.exists():
        raise SystemExit(f"MIMIC-IV demo not found at {source}; pass --input")
    figures: dict[str, float] = {"cpus": os.cpu_count() or 1, "shard_subjects": args.shard_subjects}
    figures["import_peak_mib"] = round(run(IMPORT)[2] / 1024, 1)
    print(f"importing biofm's EHR code alone (torch, polars): {figures['import_peak_mib']:.0f} MiB", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for copies in args.copies:
            if copies == 1:
                root = source
            else:
                root = Path(tmp) / f"x{copies}"
                repeat_database(source, root, copies)
            files = [str(root / f"{t}.csv.gz") for t in EVENT_TABLES]
            rows, read_s, read_kib = run(READ, *files)
            p_rows, prep_s, prep_kib, samples = run(
                PREPARE, str(root), str(SCHEMA), str(Path(tmp) / f"s{copies}.zarr"), str(args.shard_subjects)
            )
            assert int(rows) == int(p_rows), (rows, p_rows)
            key = f"x{copies}"
            figures.update(
                {
                    f"events_{key}": int(rows),
                    f"samples_{key}": int(samples),
                    f"read_events_per_s_{key}": round(rows / read_s, 1),
                    f"prepare_events_per_s_{key}": round(rows / prep_s, 1),
                    f"vs_read_{key}": round(read_s / prep_s, 4),
                    f"read_peak_mib_{key}": round(read_kib / 1024, 1),
                    f"prepare_peak_mib_{key}": round(prep_kib / 1024, 1),
                    f"prepare_seconds_{key}": round(prep_s, 2),
                }
            )
            print(
                f"{copies}× demo: {int(rows):,} event rows, {int(samples)} samples; read {rows / read_s:,.0f}/s "
                f"({read_kib / 1024:.0f} MiB peak), prepare {rows / prep_s:,.0f}/s ({prep_kib / 1024:.0f} MiB "
                f"peak, {prep_s:.1f} s): prepare/read = {read_s / prep_s:.3f}",
                flush=True,
            )
    figures["prepare_seconds_demo"] = figures.get("prepare_seconds_x1", float("nan"))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
