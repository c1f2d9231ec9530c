"""`biofm demo`: the end-to-end job on data that needs no download."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console


def run_demo(out: str = "biofm-demo", n: int = 2000, seed: int = 0) -> None:
    from biofm.datasets.synthetic import prepare_synthetic
    from biofm.platform.stream import StoreStream, StreamLoader

    console = Console()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    store = prepare_synthetic(str(out_dir / "synthetic.zarr"), n=n, seed=seed, overwrite=True, progress=True)
    console.print(store.describe())
    for split in ("train", "val", "test"):
        loader = StreamLoader(StoreStream(store, split=split, batch_size=64, shuffle=split == "train"))
        samples = sum(len(b["row"]) for b in loader)
        console.print(f"  {split}: {samples} samples in {len(loader)} batches")
    console.print(f"demo finished in {time.perf_counter() - start:.1f} s")
