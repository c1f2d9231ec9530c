"""Slide prepare throughput against OpenSlide's `read_region` alone on the same tiles (the limit).

    python benchmarks/wsi.py [--slides 8] [--size 4096] [--repeats 2]

Slides: `--slides` synthetic pyramidal TIFFs of real tissue (resections, `--size` px square at 0.5 µm/px)
plus `cmu-1-small-region.svs` when ../shared/data/wsi has it. Each mode runs in its own process (its
peak RSS is the process's), best of `repeats`:
  - read_only:     open each slide, `read_region` every tile `biofm prepare slides` keeps, as RGB arrays,
                   in one thread (the issue's limit);
  - read_only_threads: the same with prepare's reader threads (`--read-threads`, default 2);
  - coords:        `prepare_slides` without a patch encoder: tissue detection, tile grid, coordinates and
                   tissue fractions stored (tiles still read, as prepare always reads them);
  - tiles:         the same, also storing the raw tiles (uint8) for end-to-end training;
  - encoder:       the full prepare with the default patch encoder (features stored as float16).
Ratios are tiles/s against both read-only rates. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.testing import SHARED_DATA  # noqa: E402 — ../shared/data, or BIOFM_SHARED_DATA

CMU = SHARED_DATA / "wsi" / "cmu-1-small-region.svs"


def make_slides(folder: Path, count: int, size: int) -> Path:
    import numpy as np
    import pandas as pd

    from biofm.datasets.synthetic_slides import TissueSource, synthetic_slide, write_pyramid_tiff

    source = TissueSource(seed=0)
    rows = []
    for i in range(count):
        rng = np.random.default_rng([7, i])
        rgb, _ = synthetic_slide(rng, source, ["H&E", "IHC"][i % 2], "resection", False, size)
        path = folder / f"bench-{i}.tiff"
        write_pyramid_tiff(path, rgb, mpp=0.5, levels=8)  # down to ~256 px, as scanners write them
        rows.append({"slide_path": str(path), "sample_id": f"B{i}", "subject_id": f"P{i}", "flag": i % 2})
    if CMU.exists():
        rows.append({"slide_path": str(CMU), "sample_id": "CMU", "subject_id": "PC", "flag": 1})
    manifest = folder / "manifest.csv"
    pd.DataFrame(rows).to_csv(manifest, index=False)
    pd.DataFrame(rows[-1:]).to_csv(folder / "warmup.csv", index=False)
    return manifest


def read_only(manifest: str, threads: int = 1) -> tuple[int, float]:
    import pandas as pd

    from biofm.modalities.wsi import SlideRef
    from biofm.modalities.wsi.slide import open_slide, plan_tiles, read_rgb

    plans = []
    for path in pd.read_csv(manifest)["slide_path"]:  # the tiles prepare keeps, planned outside the timing
        slide = open_slide(path)
        plans.append((path, plan_tiles(slide, SlideRef(path))))
        slide.close()
    from concurrent.futures import ThreadPoolExecutor

    start = time.perf_counter()
    tiles = 0
    with ThreadPoolExecutor(threads) as pool:
        for path, plan in plans:
            slide = open_slide(path)
            size = (plan.read_size, plan.read_size)
            list(pool.map(lambda c: read_rgb(slide, (int(c[0]), int(c[1])), plan.level, size), plan.coords))
            tiles += len(plan.coords)
            slide.close()
    return tiles, time.perf_counter() - start


def prepare(manifest: str, patch_encoder: str, store_tiles: bool, threads: int) -> tuple[int, float]:
    from biofm.datasets.slides import prepare_slides

    out = tempfile.mkdtemp(prefix="biofm-wsi-bench-")
    try:
        from biofm.modalities.wsi import Wsi

        Wsi(patch_encoder=patch_encoder).fit()  # build (and import) the network outside the timing
        # a one-slide run first: imports, zarr's event loop and the like are not what is measured
        prepare_slides(
            str(Path(manifest).parent / "warmup.csv"),
            out + "/warmup.zarr",
            label_columns=["flag"],
            patch_encoder=patch_encoder,
            store_tiles=store_tiles,
            read_threads=threads,
        )
        start = time.perf_counter()
        result = prepare_slides(
            manifest,
            out + "/s.zarr",
            label_columns=["flag"],
            patch_encoder=patch_encoder,
            store_tiles=store_tiles,
            read_threads=threads,
        )
        return result.tiles, time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _child(mode: str, manifest: str, threads: int, queue) -> None:
    if mode == "read_only":
        tiles, seconds = read_only(manifest, 1)
    elif mode == "read_only_threads":
        tiles, seconds = read_only(manifest, threads)
    else:
        tiles, seconds = prepare(manifest, "default" if mode == "encoder" else "none", mode == "tiles", threads)
    queue.put((tiles, seconds, peak_rss_mib()))


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run(mode: str, manifest: str, threads: int) -> tuple[int, float, float]:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(mode, manifest, threads, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--read-threads", type=int, default=2, help="prepare's reader threads (default 2)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="biofm-wsi-slides-"))
    try:
        manifest = str(make_slides(folder, args.slides, args.size))
        figures: dict = {}
        for mode in ("read_only", "read_only_threads", "coords", "tiles", "encoder"):
            best = None
            for _ in range(args.repeats):
                tiles, seconds, rss = run(mode, manifest, args.read_threads)
                if best is None or seconds < best[1]:
                    best = (tiles, seconds, rss)
            tiles, seconds, rss = best
            figures[f"{mode}_tiles_per_s"] = round(tiles / seconds, 1)
            figures[f"{mode}_peak_rss_mib"] = round(rss, 1)
            figures["tiles"] = tiles
            print(
                f"{mode:>10}: {tiles} tiles in {seconds:.2f} s = {tiles / seconds:.0f} tiles/s, peak RSS {rss:.0f} MiB"
            )
        for mode in ("coords", "tiles", "encoder"):
            for base in ("read_only", "read_only_threads"):
                ratio = round(figures[f"{mode}_tiles_per_s"] / figures[f"{base}_tiles_per_s"], 3)
                figures[f"{mode}_vs_{base}"] = ratio
                print(f"{mode} / {base}: {ratio:.3f}×")
        figures.update(
            slides=args.slides + CMU.exists(), size=args.size, read_threads=args.read_threads, cpus=mp.cpu_count()
        )
        print(json.dumps(figures))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
