"""What every `biofm prepare` writes beside its store, and its progress bars."""

from __future__ import annotations

import json
import os

import pandas as pd


def rejects_path(out: str) -> str:
    """`<out>.rejects.csv`: the rows or samples left out, with their reasons."""
    return str(out).rstrip("/") + ".rejects.csv"


def report_path(out: str) -> str:
    """`<out>.report.json`: counts of what was dropped or changed, by reason."""
    return str(out).rstrip("/") + ".report.json"


def write_atomically(path: str, write) -> None:
    """`write(handle)` into `<path>.tmp`, then moved: a reader never sees half a file (paths or fsspec URLs)."""
    import fsspec

    fs, local = fsspec.core.url_to_fs(path)
    fs.makedirs(os.path.dirname(local) or ".", exist_ok=True)
    with fs.open(local + ".tmp", "w") as handle:
        write(handle)
    fs.mv(local + ".tmp", local)


def write_rejects(out: str, table: pd.DataFrame) -> None:
    write_atomically(rejects_path(out), lambda handle: table.to_csv(handle, index=False))


def write_report(out: str, counts: dict[str, int]) -> None:
    write_atomically(report_path(out), lambda handle: json.dump(dict(sorted(counts.items())), handle, indent=2))


def track(items, enabled: bool, total: int | None, description: str):
    """`items` with a rich progress bar when `enabled`."""
    if not enabled:
        return items
    from rich.progress import track as rich_track

    return rich_track(items, total=total, description=description)
