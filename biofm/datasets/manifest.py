"""Manifests of per-sample files (slides, OCT volumes) and label tables: reading them, and label columns
as tasks."""

from __future__ import annotations

import numpy as np
import pandas as pd

from biofm.platform.errors import StoreError
from biofm.platform.tables import missing_as_nan, read_table
from biofm.registry import RegistryError
from biofm.tasks.kinds import TASK_KINDS, LabelError, infer_kind


def read_manifest(path: str, path_column: str = "slide_path", encoding: str = "utf-8") -> pd.DataFrame:
    """A manifest (CSV, TSV or parquet) with `path_column`, `sample_id` and `subject_id`; ids must be present
    and sample ids unique."""
    frame = read_table(path, "manifest", encoding)
    missing = [c for c in (path_column, "sample_id", "subject_id") if c not in frame.columns]
    if missing:
        raise StoreError(f"{path}: the manifest needs columns {missing}; it has {list(frame.columns)}")
    for column in ("sample_id", "subject_id"):
        blank = np.flatnonzero(frame[column].isna().to_numpy())
        if len(blank):
            raise StoreError(f"{path}: row {blank[0] + 1}: '{column}' is empty; every sample needs one")
    repeated = frame["sample_id"].duplicated(keep=False).to_numpy()
    if repeated.any():
        rows = np.flatnonzero(repeated)[:5] + 1
        raise StoreError(f"{path}: rows {rows.tolist()} repeat a sample_id; every sample needs its own")
    return frame.reset_index(drop=True)


def label_tasks(
    frame: pd.DataFrame, columns: list[str], where: str, kinds: dict[str, str] | None = None
) -> tuple[dict, dict[str, np.ndarray]]:
    """Task specs and float32 labels (NaN = missing) from manifest columns: numbers in {0, 1} → binary,
    other numbers → regression, text → multiclass over its sorted values; `kinds` overrides per column."""
    tasks, labels = {}, {}
    for column in columns:
        raw = missing_as_nan(frame[column])  # NA, N/A, nan, null, blank, …: a missing label
        if not raw.notna().any():
            raise StoreError(
                f"{where}: label column '{column}' has no value in any row (every cell is empty or "
                "a missing-value spelling such as NA); leave it out of the label columns"
            )
        numbers = pd.to_numeric(raw, errors="coerce")
        numeric = numbers.notna().sum() == raw.notna().sum()
        kind = (kinds or {}).get(column) or (
            infer_kind(numbers.to_numpy(dtype=np.float64)) if numeric else "multiclass"
        )
        try:
            tasks[column], values = TASK_KINDS.resolve(kind).from_column(column, raw)
        except RegistryError:
            raise StoreError(
                f"{where}: label '{column}': labels are {', '.join(TASK_KINDS.names())}, got {kind!r}"
            ) from None
        except LabelError as err:
            raise StoreError(f"{where}: {err} (or name the column's kind with --task-types)") from None
        labels[column] = values
    return tasks, labels
