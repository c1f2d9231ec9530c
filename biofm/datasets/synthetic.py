"""The synthetic multimodal cohort: subjects with case data (tabular) and a report (text), each subject
missing some modalities, and labels whose signal is split across the modalities.

Two latent factors drive everything: `a` is visible only in the case data (age, markers, stage) and `b`
only in the report's wording (severity, margins). Every task depends on both, so a model that sees one
modality reaches part of the signal and only a model that fuses them reaches the best score. Each
modality issue adds its own generator here (molecules, EHR, slides, OCT) driven by the same factors.
"""

from __future__ import annotations

import argparse

import numpy as np
import pandas as pd

from biofm.commands import preparer
from biofm.platform.modality import MODALITIES
from biofm.platform.store import Store, StoreWriter
from biofm.platform.writing import prepares

TASKS = {
    "event": {"kind": "binary"},
    "subtype": {"kind": "multiclass", "classes": ["luminal", "basal", "mixed"]},
    "risk_score": {"kind": "regression", "unit": "points"},
    "grade": {"kind": "ordinal", "classes": ["G1", "G2", "G3", "G4"]},
    "findings": {"kind": "multilabel", "classes": ["necrosis", "invasion", "calcification"]},
}

SEVERITY = ["unremarkable", "mild", "moderate", "marked", "severe"]
FILLER = [
    "specimen received in formalin",
    "sections examined at multiple levels",
    "clinical history noted",
    "gross description attached",
    "immunostains reviewed",
    "frozen section correlated",
    "specimen oriented with sutures",
    "tissue submitted entirely",
]


def cohort(n: int, seed: int = 0, p_missing: float = 0.2) -> dict:
    """Raw cohort: ids, a case-data frame, report texts (None where missing) and labels."""
    rng = np.random.default_rng(seed)
    n_subjects = max(1, int(round(n * 0.85)))
    subject = np.sort(rng.integers(0, n_subjects, size=n))  # some subjects have two samples
    a_subject, b_subject = rng.standard_normal(n_subjects), rng.standard_normal(n_subjects)
    a = a_subject[subject] + 0.3 * rng.standard_normal(n)
    b = b_subject[subject] + 0.3 * rng.standard_normal(n)

    case = pd.DataFrame(
        {
            "age": np.round(60 + 8 * a + 4 * rng.standard_normal(n), 1),
            "marker_1": a + 0.4 * rng.standard_normal(n),
            "marker_2": rng.standard_normal(n),  # noise
            "bmi": np.round(26 + 3 * rng.standard_normal(n), 1),
            "stage": np.array(["I", "II", "III"])[np.digitize(a + 0.5 * rng.standard_normal(n), [-0.6, 0.6])],
            "site": rng.choice(["north", "south", "east", "west"], size=n),  # noise
        }
    )
    case = case.mask(rng.random(case.shape) < 0.08)  # missing cells

    level = np.clip(np.digitize(b + 0.35 * rng.standard_normal(n), [-1.1, -0.35, 0.35, 1.1]), 0, 4)
    reports = []
    for i in range(n):
        margins = "margins involved" if b[i] + 0.5 * rng.standard_normal() > 0.3 else "margins clear"
        filler = rng.choice(FILLER, size=2, replace=False)
        parts = [filler[0], f"{SEVERITY[level[i]]} atypia", margins, filler[1]]
        rng.shuffle(parts)
        reports.append(". ".join(parts) + ".")

    # which modalities each sample has: never neither
    drop = rng.random(n)
    has_case = drop >= p_missing
    has_report = ~((drop >= p_missing) & (drop < 2 * p_missing))

    noise = rng.standard_normal((5, n))
    labels = {
        "event": (1 / (1 + np.exp(-(1.6 * a + 1.6 * b))) > rng.random(n)).astype(np.float32),
        "subtype": np.argmax(np.stack([a + b, a - b, -a + 0.2 * noise[0]]), axis=0).astype(np.float32),
        "risk_score": (10 + 3 * a + 3 * b + 0.8 * noise[1]).astype(np.float32),
        "grade": np.digitize(a + b + 0.4 * noise[2], [-1.0, 0.0, 1.0]).astype(np.float32),
        "findings": np.stack([a + 0.3 * noise[3] > 0.4, b + 0.3 * noise[4] > 0.4, a + b > 0.8], axis=1).astype(
            np.float32
        ),
    }
    labels["risk_score"][rng.random(n) < 0.3] = np.nan  # a sparse task
    labels["findings"][rng.random(n) < 0.2] = np.nan
    return {
        "sample_id": [f"SYN-{seed}-{i:06d}" for i in range(n)],
        "subject_id": [f"PT-{seed}-{s:06d}" for s in subject],
        "case": case,
        "has_case": has_case,
        "report": [r if keep else None for r, keep in zip(reports, has_report)],
        "labels": labels,
    }


@prepares
def prepare_synthetic(
    out: str, n: int = 2000, seed: int = 0, batch_size: int = 512, overwrite: bool = False, progress: bool = False
) -> Store:
    """Write the synthetic cohort as a store (tabular + text modalities, five tasks)."""
    raw = cohort(n, seed)
    tabular = MODALITIES.resolve("tabular")()
    text = MODALITIES.resolve("text")(max_length=48, vocab_size=600)
    case_rows = [row if keep else None for row, keep in zip(raw["case"].to_dict("records"), raw["has_case"])]
    tabular.fit(case_rows)
    text.fit(raw["report"])
    writer = StoreWriter(
        out,
        source="synthetic",
        seed=seed,
        overwrite=overwrite,
        modalities={"tabular": tabular.config(), "text": text.config()},
        tasks=TASKS,
    )
    done = writer.committed()
    for key, start in enumerate(_progress(range(0, n, batch_size), progress, "writing synthetic cohort")):
        if key in done:
            continue
        sl = slice(start, start + batch_size)
        writer.write_batch(
            key,
            sample_id=raw["sample_id"][sl],
            subject_id=raw["subject_id"][sl],
            labels={task: values[sl] for task, values in raw["labels"].items()},
            arrays={**tabular.featurise(case_rows[sl]), **text.featurise(raw["report"][sl])},
        )
    return writer.finalize()


def _progress(items, enabled: bool, description: str):
    if not enabled:
        return items
    from rich.progress import track

    return track(list(items), description=description)


def _synthetic_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="store to write (path or fsspec URL)")
    p.add_argument("--n", type=int, default=2000, help="number of samples (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace a complete store at --out")


@preparer("synthetic", _synthetic_arguments)
def _prepare_synthetic(args: argparse.Namespace) -> None:
    """The synthetic multimodal cohort (tabular + text, five task kinds)."""
    store = prepare_synthetic(args.out, n=args.n, seed=args.seed, overwrite=args.overwrite, progress=True)
    print(store.describe())
