"""Multi-task against single-task molecule models, measured in the same run.

    python benchmarks/molecules_multitask.py [--seeds 1] [--epochs 25]

Prepares ESOL, FreeSolv, Tox21, micro QM9 and micro ZINC (as configs/data/molecules-multitask.yaml) with a
random split per seed, trains one model on all five sources jointly (a batch comes from one source,
sources drawn in proportion to their size), and, as the baseline, one model per ESOL, FreeSolv and Tox21
alone, with the same epochs and settings. Prints
each benchmark task's test metric for both and the ratio; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.datasets.molecules import prepare_molecules  # noqa: E402
from biofm.recipes.runs import fit_and_test  # noqa: E402
from biofm.testing import SHARED_DATA  # noqa: E402 — ../shared/data, or BIOFM_SHARED_DATA

MOL = SHARED_DATA / "mol"
SOURCES = {  # name: (file, smiles column, label columns, fragments)
    "esol": (MOL / "esol.csv", "smiles", ["logp=esol_log_solubility"], "keep"),
    "freesolv": (MOL / "freesolv.csv", "smiles", ["freesolv"], "keep"),
    "tox21": (MOL / "tox21.csv", "smiles", None, "keep"),
    "qm9": (MOL / "graphium" / "micro_qm9.csv", "smiles", ["mu", "alpha", "homo", "lumo", "gap", "cv"], "keep"),
    "zinc": (
        MOL / "graphium" / "micro_ZINC.csv",
        "SMILES",
        ["SA=zinc_sa", "logp=zinc_logp", "score=zinc_score"],
        "keep",
    ),
}
# what each benchmark source is judged by: (metric key, lower is better)
JUDGED = {
    "esol": ("esol_log_solubility/rmse", True),
    "freesolv": ("freesolv/rmse", True),
    "tox21": ("tox21 mean auroc", False),
}
TOX21 = [
    "NR-AR",
    "NR-AR-LBD",
    "NR-AhR",
    "NR-Aromatase",
    "NR-ER",
    "NR-ER-LBD",
    "NR-PPAR-gamma",
    "SR-ARE",
    "SR-ATAD5",
    "SR-HSE",
    "SR-MMP",
    "SR-p53",
]


def judged(metrics: dict, source: str) -> float:
    key, _ = JUDGED[source]
    if key == "tox21 mean auroc":
        return float(np.mean([metrics[f"{t}/auroc"] for t in TOX21]))
    return metrics[key]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    model = {
        "d_model": 128,
        "depth": 2,
        "latents": 8,
        "dropout": 0.0,
        "lr": 1e-3,
        "weight_decay": 0.0,
        "schedule": "cosine",
        "encoders": {"molecule": {"layers": 4}},
    }
    single = {s: [] for s in JUDGED}
    joint = {s: [] for s in JUDGED}
    with tempfile.TemporaryDirectory(prefix="biofm-mt-") as tmp:
        for seed in range(args.seeds):
            stores = {}
            for name, (path, smiles, labels, fragments) in SOURCES.items():
                stores[name], _ = prepare_molecules(
                    str(path),
                    f"{tmp}/{name}{seed}.zarr",
                    smiles_column=smiles,
                    label_columns=labels,
                    fragments=fragments,
                    seed=seed,
                )
            for name in JUDGED:
                metrics = fit_and_test(
                    [stores[name].url],
                    f"{tmp}/single-{name}{seed}",
                    epochs=args.epochs,
                    batch_size=args.batch_size,
                    model=model,
                    seed=seed,
                    loggers=False,
                )
                single[name].append(judged(metrics, name))
            metrics = fit_and_test(
                [s.url for s in stores.values()],
                f"{tmp}/joint{seed}",
                epochs=args.epochs,
                batch_size=args.batch_size,
                model=model,
                seed=seed,
                loggers=False,
            )
            for name in JUDGED:
                joint[name].append(judged(metrics, name))
            print(
                f"seed {seed}: "
                + ", ".join(f"{n} single {single[n][-1]:.3f} joint {joint[n][-1]:.3f}" for n in JUDGED),
                flush=True,
            )
    result = {}
    for name, (key, lower) in JUDGED.items():
        s, j = float(np.mean(single[name])), float(np.mean(joint[name]))
        ratio = s / j if lower else j / s  # > 1: multi-task is better
        result[name] = {
            "metric": key,
            "single_task": round(s, 4),
            "multi_task": round(j, 4),
            "multi_vs_single": round(ratio, 3),
        }
        print(f"{name:>9} {key}: single-task {s:.3f}, multi-task {j:.3f} ({ratio:.2f}× as good)")
    result["settings"] = vars(args)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
