"""Train / val / test splits by subject: every sample of a subject in one split."""

from __future__ import annotations

import math

import numpy as np

from biofm.platform.errors import StoreError
from biofm.platform.store.format import (
    SPLITS,
)


def subject_splits(
    subject_ids: np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> np.ndarray:
    """Assign every sample the split of its subject; subjects are shuffled with `seed`."""
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise StoreError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    subjects, inverse = np.unique(np.asarray(subject_ids, dtype=str), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(subjects))
    bounds = np.round(np.cumsum(fractions) * len(subjects)).astype(int)
    subject_split = np.empty(len(subjects), dtype=object)
    for name, lo, hi in zip(SPLITS, [0, bounds[0], bounds[1]], bounds):
        subject_split[order[lo:hi]] = name
    return subject_split[inverse].astype(str)


def check_subject_splits(subject_ids: np.ndarray, splits: np.ndarray, where: str) -> None:
    bad = sorted(set(np.unique(splits)) - set(SPLITS))
    if bad:
        raise StoreError(f"{where}: split values must be one of {SPLITS}, found {bad[:3]}")
    seen: dict[str, str] = {}
    for subject, split in zip(np.asarray(subject_ids, dtype=str), splits):
        if seen.setdefault(subject, split) != split:
            # the message names no subject: ids never reach a log
            raise StoreError(
                f"{where}: one subject has samples in both '{seen[subject]}' and '{split}'; "
                "splits must be by subject so no patient is on two sides"
            )
