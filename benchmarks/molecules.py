"""Molecular property prediction on MoleculeNet-style files: random split per seed, test-set metrics.

    python benchmarks/molecules.py --input ../shared/data/mol/esol.csv --smiles-column smiles \\
        --label-columns logp --seeds 3 [--epochs 40]

For each seed the file is prepared with a random split (80/10/10 by molecule) and a model is trained and
tested on it. Prints per-task mean ± sd over seeds, the published reference figures where known, and last
one JSON line: {task: {metric: mean, ..., "sd": {metric: sd}}, "macro": {...}, "settings": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.datasets.molecules import prepare_molecules  # noqa: E402
from biofm.recipes.runs import fit_and_test  # noqa: E402

# chemprop D-MPNN, random split, test set (README of ../shared/data/mol)
REFERENCES = {"esol": ("rmse", 0.555), "freesolv": ("rmse", 1.075), "tox21": ("auroc", 0.851)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--smiles-column", default="smiles")
    parser.add_argument("--label-columns", default=None)
    parser.add_argument("--task-types", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's (on linear and conv weights)")
    parser.add_argument("--fragments", default="keep", help="salts: keep (as chemprop), largest or reject")
    parser.add_argument("--dropout", type=float, default=0.0, help="in the trunk and the GNN")
    parser.add_argument("--rw-steps", type=int, default=0, help="random-walk positional encoding (0 = off)")
    parser.add_argument("--global-attention", action="store_true", help="GPS-style attention between atoms")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    split = lambda v: v.split(",") if v else None  # noqa: E731
    model = {
        "d_model": args.d_model,
        "depth": 2,
        "latents": 8,
        "dropout": args.dropout,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "schedule": "cosine",
        "encoders": {
            "molecule": {"layers": args.layers, "dropout": args.dropout, "global_attention": args.global_attention}
        },
    }
    runs, seconds = [], []
    with tempfile.TemporaryDirectory(prefix="biofm-mol-bench-") as tmp:
        for seed in range(args.seeds):
            start = time.perf_counter()
            store, rejected = prepare_molecules(
                args.input,
                f"{tmp}/s{seed}.zarr",
                smiles_column=args.smiles_column,
                label_columns=split(args.label_columns),
                task_types=split(args.task_types),
                split="random",
                seed=seed,
                fragments=args.fragments,
                rw_steps=args.rw_steps,
            )
            metrics = fit_and_test(
                [store.url],
                f"{tmp}/run{seed}",
                epochs=args.epochs,
                batch_size=args.batch_size,
                model=model,
                seed=seed,
                loggers=False,
            )
            seconds.append(time.perf_counter() - start)
            runs.append(metrics)
            print(
                f"seed {seed}: {store.n} molecules ({rejected} rejected), {seconds[-1]:.0f} s: "
                + ", ".join(
                    f"{k} {v:.3f}"
                    for k, v in sorted(metrics.items())
                    if k.startswith("macro/") or k.endswith(("/rmse", "/auroc"))
                ),
                flush=True,
            )
    tasks = sorted({k.split("/")[0] for k in runs[0] if "/" in k})
    result: dict = {}
    for task in tasks:
        names = sorted(k.split("/", 1)[1] for k in runs[0] if k.startswith(task + "/"))
        values = {m: np.array([r[f"{task}/{m}"] for r in runs]) for m in names}
        result[task] = {m: round(float(v.mean()), 4) for m, v in values.items()}
        result[task]["sd"] = {m: round(float(v.std(ddof=1)) if len(v) > 1 else 0.0, 4) for m, v in values.items()}
        if task != "macro":
            print(
                f"{task:>16}: " + "  ".join(f"{m} {result[task][m]:.3f} ± {result[task]['sd'][m]:.3f}" for m in names)
            )
    name = Path(args.input).name.split(".")[0].lower()
    if name in REFERENCES:
        metric, value = REFERENCES[name]
        ours = (
            result["macro"]["auroc"]
            if metric == "auroc"
            else next(result[t][metric] for t in tasks if t != "macro" and metric in result[t])
        )
        print(
            f"chemprop D-MPNN {metric} {value}: biofm {ours:.3f} ({'better' if (ours < value) == (metric == 'rmse') else 'worse'})"
        )
        result["reference"] = {"chemprop": {metric: value}}
    result["settings"] = {
        "seeds": args.seeds,
        "epochs": args.epochs,
        "seconds_per_seed": round(float(np.mean(seconds)), 1),
        **{k: v for k, v in vars(args).items() if k not in ("input",)},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
