"""`biofm prepare slides`: a manifest of whole slides (+ reports + case data) → a slide store.

The manifest (CSV or parquet) has `slide_path` (relative paths are relative to the manifest), `sample_id`,
`subject_id`, the label columns, and optionally `mpp`, `report` (free text → the `text` modality), `split`
and case columns (→ the `tabular` modality; by default every column that is none of the above).

A slide's tiles, features and other inputs are committed together (with the slides before it, up to
`commit_tiles` tiles, `commit_bytes` of raw tiles or `commit_seconds` of work), then its status (done, or failed with the reason) is
written atomically to `<out>.status/<row>.json`. A rerun skips the slides already done and retries the
failed ones; a broken slide never stops the run. At the end
`<out>.slides.csv` lists every slide's status and `<out>.rejects.csv` the failed ones.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from biofm.commands import add_columns_argument, columns_of, comma_list, preparer
from biofm.datasets.manifest import label_tasks, read_manifest
from biofm.datasets.outputs import rejects_path, track, write_atomically, write_rejects
from biofm.platform.modality import MODALITIES
from biofm.platform.store import Store, StoreError, StoreWriter, unfinished_settings
from biofm.platform.writing import prepares

RESERVED = ("slide_path", "sample_id", "subject_id", "mpp", "split", "channels")


def status_dir(out: str) -> str:
    return str(out).rstrip("/") + ".status"


def slides_path(out: str) -> str:
    """`<out>.slides.csv`: every slide of the manifest with its status and facts."""
    return str(out).rstrip("/") + ".slides.csv"


@dataclass
class SlidesResult:
    store: Store | None
    done: int = 0
    failed: int = 0
    skipped: int = 0  # done by an earlier run
    tiles: int = 0
    seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


@prepares
def prepare_slides(
    manifest: str,
    out: str,
    *,
    label_columns: list[str] | None = None,
    case_columns: list[str] | None = None,
    task_types: dict[str, str] | None = None,
    report_column: str = "report",
    target_mpp: float = 0.5,
    tile_size: int = 224,
    min_tissue: float = 0.25,
    thumbnail_mpp: float = 8.0,
    patch_encoder: str = "default",
    patch_weights: str | None = None,
    store_tiles: bool = False,
    assume_mpp: float | None = None,
    channels: list[str] | None = None,
    source: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = False,
    commit_tiles: int = 4096,
    commit_bytes: int = 256 << 20,
    commit_seconds: float = 30.0,
    read_threads: int = 2,
    encoding: str = "utf-8",
) -> SlidesResult:
    """Prepare a slide store from a manifest; see the module's doc. Returns counts and the store (None when
    no slide could be prepared)."""
    from biofm.modalities.wsi import SlideError, SlideRef
    from biofm.modalities.wsi.slide import channel_list

    start = time.perf_counter()
    frame = read_manifest(manifest, encoding=encoding)
    where = manifest
    has_report = report_column in frame.columns and frame[report_column].notna().any()
    reserved = set(RESERVED) | {report_column}
    if label_columns is None:
        raise StoreError(f"{where}: name the label columns with --label-columns")
    missing = [c for c in label_columns + list(case_columns or []) if c not in frame.columns]
    if missing:
        raise StoreError(f"{where}: no column {missing}; the manifest has {list(frame.columns)}")
    if case_columns is None:
        case_columns = [c for c in frame.columns if c not in reserved and c not in label_columns]
    tasks, labels = label_tasks(frame, label_columns, where, task_types)

    wsi = MODALITIES.resolve("wsi")(
        target_mpp=target_mpp,
        tile_size=tile_size,
        min_tissue=min_tissue,
        thumbnail_mpp=thumbnail_mpp,
        patch_encoder=patch_encoder,
        patch_weights=patch_weights,
        store_tiles=store_tiles,
        **({"channels": list(channels)} if channels else {}),
    )
    wsi.read_threads = read_threads
    wsi.fit()
    modalities = {"wsi": wsi}
    case_rows = None
    if case_columns:
        case_rows = frame[case_columns].to_dict("records")
        for row in case_rows:
            for k, v in row.items():
                number = pd.to_numeric(v, errors="coerce") if isinstance(v, str) else v
                row[k] = number if pd.notna(number) else v  # numbers from a CSV read as text
        modalities["tabular"] = MODALITIES.resolve("tabular")()
    reports = None
    if has_report:
        reports = [str(r) if pd.notna(r) else None for r in frame[report_column]]
        modalities["text"] = MODALITIES.resolve("text")(max_length=96, vocab_size=2000)
    # a resumed prepare keeps the case and report settings it fitted first (tokenizer training breaks ties
    # arbitrarily); the writer still checks that everything else is unchanged
    earlier = (unfinished_settings(out) or {}).get("modalities", {}) if not overwrite else {}
    for name, raw in (("tabular", case_rows), ("text", reports)):
        if name not in modalities:
            continue
        if name in earlier:
            modalities[name] = MODALITIES.resolve(name).from_config(earlier[name])
        else:
            modalities[name].fit(raw)

    base = Path(manifest).parent
    paths = [
        None if pd.isna(p) else str(p if "://" in str(p) or Path(str(p)).is_absolute() else base / str(p))
        for p in frame["slide_path"]
    ]
    slide_channels = [channel_list(v) for v in frame.get("channels", [None] * len(frame))]
    mpps = (
        pd.to_numeric(frame["mpp"], errors="coerce").to_numpy()
        if "mpp" in frame.columns
        else np.full(len(frame), np.nan)
    )
    splits = frame["split"].astype(str).str.strip().str.lower().to_numpy() if "split" in frame.columns else None

    writer = StoreWriter(
        out,
        source=source or Path(manifest).stem,
        seed=seed,
        overwrite=overwrite,
        modalities={n: m.config() for n, m in modalities.items()},
        tasks=tasks,
        codecs={"wsi/tiles": "none"},
    )  # pixels barely compress losslessly; zstd halves the rate
    if overwrite:
        _clear_statuses(out)
    statuses = _read_statuses(out)
    done_ids = writer.committed_sample_ids()
    sample_ids = frame["sample_id"].astype(str).to_numpy()
    done = {i for i, sid in enumerate(sample_ids) if sid in done_ids}
    result = SlidesResult(store=None, skipped=len(done))
    pending: list[tuple[int, dict, dict]] = []  # slides processed but not yet committed
    next_key = max(writer.committed(), default=-1) + 1
    since = time.perf_counter()

    def commit() -> None:
        # slides are committed together (a zarr part costs ~0.1 s whatever its size): at most `commit_tiles`
        # tiles or `commit_seconds` of work is redone after an interruption
        nonlocal next_key, since
        if not pending:
            return
        rows = [i for i, _, _ in pending]
        batch = wsi.stack([arrays for _, arrays, _ in pending])
        if case_rows is not None:
            batch.update(modalities["tabular"].featurise([case_rows[i] for i in rows]))
        if reports is not None:
            batch.update(modalities["text"].featurise([reports[i] for i in rows]))
        writer.write_batch(
            next_key,
            sample_id=sample_ids[rows],
            subject_id=frame["subject_id"].to_numpy()[rows],
            labels={t: v[rows] for t, v in labels.items()},
            arrays=batch,
            split=None if splits is None else splits[rows],
        )
        next_key += 1
        for i, _, status in pending:
            _write_status(out, i, status)
            statuses[i] = status
        pending.clear()
        since = time.perf_counter()

    for i in track(range(len(frame)), progress, len(frame), "slides"):
        if i in done:
            continue
        began = time.perf_counter()
        status = {"row": i + 1, "sample_id": sample_ids[i], "slide_path": paths[i]}
        try:
            if paths[i] is None:
                raise SlideError("the manifest row has no slide_path")
            ref = SlideRef(
                paths[i],
                mpp=None if np.isnan(mpps[i]) else float(mpps[i]),
                assume_mpp=assume_mpp,
                channels=slide_channels[i],
            )
            arrays, facts = wsi.process(ref)
        except SlideError as err:
            status.update(status="failed", reason=str(err))
        except Exception as err:  # noqa: BLE001 — one broken slide never takes the run down
            status.update(status="failed", reason=f"{type(err).__name__}: {err}")
        status["seconds"] = round(time.perf_counter() - began, 3)
        if status.get("status") == "failed":
            _write_status(out, i, status)
            statuses[i] = status
            result.failed += 1
            kind = status["reason"].split(" (")[0].split(":")[0]
            result.reasons[kind] = result.reasons.get(kind, 0) + 1
            continue
        status.update(status="done", **facts)
        pending.append((i, arrays, status))
        result.done += 1
        result.tiles += facts["tiles"]
        if (
            sum(a["features"].shape[0] for _, a, _ in pending) >= commit_tiles
            or sum(a.get("tiles", a["features"]).nbytes for _, a, _ in pending) >= commit_bytes
            or time.perf_counter() - since >= commit_seconds
        ):
            commit()
    commit()

    table = pd.DataFrame(
        [
            statuses.get(
                i, {"row": i + 1, "sample_id": frame["sample_id"].iloc[i], "slide_path": paths[i], "status": "done"}
            )
            for i in range(len(frame))
        ]
    )
    write_atomically(slides_path(out), lambda handle: table.to_csv(handle, index=False))
    failed = table[table["status"] == "failed"]
    write_rejects(
        out,
        failed[["row", "sample_id", "slide_path", "reason"]]
        if len(failed)
        else pd.DataFrame(columns=["row", "sample_id", "slide_path", "reason"]),
    )
    if writer.committed():
        result.store = writer.finalize()
    result.seconds = time.perf_counter() - start
    return result


def _status_file(out: str, key: int) -> str:
    return f"{status_dir(out)}/{key:08d}.json"


def _write_status(out: str, key: int, status: dict) -> None:
    write_atomically(_status_file(out, key), lambda handle: json.dump(status, handle))


def _read_statuses(out: str) -> dict[int, dict]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(status_dir(out))
    if not fs.exists(root):
        return {}
    statuses = {}
    for path in fs.glob(root.rstrip("/") + "/*.json"):
        with fs.open(path) as handle:
            status = json.load(handle)
        statuses[int(status["row"]) - 1] = status
    return statuses


def _clear_statuses(out: str) -> None:
    """Remove the status files of an earlier prepare (`<out>.status/<row>.json`), and nothing else."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(status_dir(out))
    if not fs.exists(root):
        return
    for path in fs.ls(root, detail=False):
        name = str(path).rstrip("/").rsplit("/", 1)[-1]
        if name.endswith(".json") and name[:-5].isdigit():
            fs.rm(path)


def print_summary(result: SlidesResult, out: str) -> None:
    """Counts only: no slide path or sample id reaches the console (statuses are in the files)."""
    if result.store is not None:
        print(result.store.describe())
    reasons = ", ".join(f"{n} × {why}" for why, n in sorted(result.reasons.items()))
    print(
        f"slides: {result.done} done, {result.skipped} done by an earlier run, {result.failed} failed"
        + (f" ({reasons}); reasons per slide in {rejects_path(out)}" if result.failed else "")
        + f"; {result.tiles} tiles in {result.seconds:.1f} s; statuses in {slides_path(out)}"
    )


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--manifest",
        required=True,
        help="CSV or parquet: slide_path, sample_id, subject_id, labels, optional mpp, report, split and case columns",
    )
    p.add_argument("--out", required=True, help="store to write (path or fsspec URL)")
    add_columns_argument(p, "--label-columns", required=True, help="comma-separated label columns")
    add_columns_argument(
        p,
        "--case-columns",
        default=None,
        help="comma-separated case columns (default: every column "
        "that is not an id, path, mpp, report, split or label)",
    )
    p.add_argument(
        "--task-types", default=None, help="COLUMN=KIND,… (binary, multiclass, ordinal, regression; default: inferred)"
    )
    p.add_argument(
        "--report-column", default="report", help="manifest column with each slide's report (default report)"
    )
    p.add_argument("--target-mpp", type=float, default=0.5, help="µm per pixel of the tiles (default 0.5)")
    p.add_argument("--tile-size", type=int, default=224)
    p.add_argument("--min-tissue", type=float, default=0.25, help="least tissue fraction of a kept tile")
    p.add_argument(
        "--patch-encoder", default="default", help="'default' (MONAI ResNet, no download) or package.module:factory"
    )
    p.add_argument("--patch-weights", default=None, help="local weights file for the patch encoder")
    p.add_argument("--store-tiles", action="store_true", help="also store the raw tiles (uint8)")
    p.add_argument(
        "--assume-mpp",
        type=float,
        default=None,
        help="µm/px for slides whose metadata and manifest give none usable (default: such a slide fails)",
    )
    p.add_argument(
        "--channels",
        default=None,
        help="fluorescence channels the patch encoder sees as red, green, blue (names or 0-based indices, up to "
        "3; default: the nuclear channel and the next two); a manifest column `channels` (a;b;c) sets one slide's",
    )
    p.add_argument("--read-threads", type=int, default=2, help="tiles read in parallel (default 2)")
    p.add_argument("--encoding", default="utf-8", help="text encoding of a CSV manifest (default utf-8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true")


@preparer("slides", _arguments)
def _run(args: argparse.Namespace) -> None:
    """Whole slides (+ reports + case data) listed in a manifest → a slide store."""
    kinds = dict(item.split("=", 1) for item in comma_list(args.task_types) or [])
    result = prepare_slides(
        args.manifest,
        args.out,
        label_columns=columns_of(args, "label_columns"),
        case_columns=columns_of(args, "case_columns"),
        task_types=kinds,
        report_column=args.report_column,
        target_mpp=args.target_mpp,
        tile_size=args.tile_size,
        min_tissue=args.min_tissue,
        patch_encoder=args.patch_encoder,
        patch_weights=args.patch_weights,
        store_tiles=args.store_tiles,
        assume_mpp=args.assume_mpp,
        channels=comma_list(args.channels),
        seed=args.seed,
        overwrite=args.overwrite,
        read_threads=args.read_threads,
        encoding=args.encoding,
        progress=True,
    )
    print_summary(result, args.out)
    if result.store is None:
        raise StoreError(f"no slide could be prepared; see {rejects_path(args.out)}")
