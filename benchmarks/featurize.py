"""Molecule featuriser throughput against torch_geometric.utils.from_smiles, on the same molecules.

    python benchmarks/featurize.py [--input ../shared/data/mol/tox21.csv] [--n 2000] [--repeats 3]

Times, over the same N SMILES (best of `repeats`):
  - from_smiles:  PyG's featuriser, one molecule at a time (what a PyG user writes);
  - biofm:        `featurise_smiles` in one process (canonical atom order, more atom features);
  - biofm-prepare: the same split over processes, as `biofm prepare molecules` runs it.
The last line is JSON with molecules/s of each and the ratios `vs_from_smiles` (one process) and
`vs_from_smiles_prepare`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.modalities.molecule.featurise import featurise_smiles  # noqa: E402
from biofm.testing import SHARED_DATA  # noqa: E402 — ../shared/data, or BIOFM_SHARED_DATA

DEFAULT_INPUT = SHARED_DATA / "mol" / "tox21.csv"


def _ours(smiles):
    return featurise_smiles(smiles, fragments="keep")[1]


def best_rate(fn, n: int, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return n / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(DEFAULT_INPUT))
    parser.add_argument("--smiles-column", default="smiles")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    from torch_geometric.utils import from_smiles

    smiles = pd.read_csv(args.input)[args.smiles_column].dropna().astype(str).tolist()[: args.n]
    n = len(smiles)
    pyg = best_rate(lambda: [from_smiles(s) for s in smiles], n, args.repeats)
    ours = best_rate(lambda: _ours(smiles), n, args.repeats)
    chunk = max(1, n // (4 * args.workers))
    with ProcessPoolExecutor(args.workers) as pool:
        list(pool.map(_ours, [smiles[:10]] * args.workers))  # start the processes before timing
        parallel = best_rate(
            lambda: list(pool.map(_ours, [smiles[i : i + chunk] for i in range(0, n, chunk)])), n, args.repeats
        )
    print(f"{n} molecules from {Path(args.input).name}")
    print(f"  from_smiles       {pyg:8,.0f} molecules/s")
    print(f"  biofm (1 process) {ours:8,.0f} molecules/s   {ours / pyg:.2f}× from_smiles")
    print(
        f"  biofm prepare ({args.workers} processes) {parallel:8,.0f} molecules/s   {parallel / pyg:.2f}× from_smiles"
    )
    print(
        json.dumps(
            {
                "molecules": n,
                "from_smiles_per_s": round(pyg, 1),
                "biofm_per_s": round(ours, 1),
                "biofm_prepare_per_s": round(parallel, 1),
                "workers": args.workers,
                "vs_from_smiles": round(ours / pyg, 3),
                "vs_from_smiles_prepare": round(parallel / pyg, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
