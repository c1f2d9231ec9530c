"""Load: a 2-process DDP fit (gloo, 2 loader workers each) on a store 10× the size of the test stores, against
one process without workers on the same store, in the same run. Reports samples/s, and per process the
resident memory (its own and its loader workers') at the start, during and at the end of the epoch.

    python benchmarks/load.py [--n 7000] [--epochs 2]

Memory is "flat" when the end-of-epoch RSS stays within a few percent of the RSS after the first steps
(the first steps allocate the model's gradients and optimiser state). Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from biofm.datasets.synthetic import prepare_synthetic  # noqa: E402

MIB = 1 << 20


def fit(store: str, run_dir: Path, processes: int, workers: int, epochs: int, batch_size: int) -> dict:
    callbacks = run_dir / "callbacks.yaml"
    run_dir.mkdir(parents=True)
    callbacks.write_text(
        "trainer:\n  callbacks:\n    - class_path: biofm.platform.tracking.MemoryMonitor\n"
        f"      init_args: {{out_dir: {run_dir / 'memory'}, every: 5}}\n"
    )
    trainer = "ddp-cpu.yaml" if processes > 1 else "cpu.yaml"
    args = [
        sys.executable,
        "-m",
        "biofm",
        "fit",
        "--trainer",
        str(ROOT / "configs/trainer" / trainer),
        "-c",
        str(callbacks),
        "--model",
        str(ROOT / "configs/model/small.yaml"),
        "--data.stores",
        f"[{store}]",
        "--data.batch_size",
        str(batch_size),
        "--data.num_workers",
        str(workers),
        "--trainer.max_epochs",
        str(epochs),
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(run_dir),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
        "--trainer.enable_checkpointing",
        "false",
    ]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "disabled"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    wall = time.perf_counter() - start
    ranks = [json.loads(p.read_text()) for p in sorted((run_dir / "memory").glob("memory-rank*.json"))]
    out = {"processes": processes, "workers_per_process": workers, "wall_s": round(wall, 1), "ranks": []}
    samples = seconds = 0.0
    for r in ranks:
        epoch = r[max(i for i, s in enumerate(r) if s["when"] == "start") :]  # the last epoch
        steps = [s for s in epoch if s["when"] == "step"]
        early = steps[min(1, len(steps) - 1)]
        end = epoch[-1]
        samples += end["samples"]
        seconds = max(seconds, end["seconds"])
        total = [s["rss"] + s["workers_rss"] for s in epoch]
        out["ranks"].append(
            {
                "rss_start_mib": round(epoch[0]["rss"] / MIB),
                "rss_early_mib": round(early["rss"] / MIB),
                "rss_end_mib": round(end["rss"] / MIB),
                "rss_peak_mib": round(max(s["rss"] for s in epoch) / MIB),
                "with_workers_early_mib": round((early["rss"] + early["workers_rss"]) / MIB),
                "with_workers_end_mib": round((end["rss"] + end["workers_rss"]) / MIB),
                "with_workers_peak_mib": round(max(total) / MIB),
                "end_vs_early": round(end["rss"] / early["rss"], 3),
            }
        )
    out["samples_per_s"] = round(samples / seconds, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=7000, help="samples (the test cohort has 700)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="biofm-load-") as tmp:
        store = prepare_synthetic(f"{tmp}/cohort.zarr", n=args.n, seed=0)
        print(f"store: {store.n} samples, {sum(1 for _ in Path(store.url).rglob('*'))} files", flush=True)
        single = fit(store.url, Path(tmp) / "single", 1, 0, args.epochs, args.batch_size)
        print(f"1 process, 0 workers: {single['samples_per_s']} samples/s; {single['ranks']}", flush=True)
        ddp = fit(store.url, Path(tmp) / "ddp", 2, 2, args.epochs, args.batch_size)
        for i, r in enumerate(ddp["ranks"]):
            print(
                f"DDP rank {i}: RSS start {r['rss_start_mib']} MiB, after the first steps {r['rss_early_mib']}, "
                f"end {r['rss_end_mib']} (×{r['end_vs_early']}), peak {r['rss_peak_mib']}; with its 2 workers "
                f"{r['with_workers_early_mib']} → {r['with_workers_end_mib']} MiB (peak {r['with_workers_peak_mib']})",
                flush=True,
            )
        ratio = ddp["samples_per_s"] / single["samples_per_s"]
        print(f"2-process DDP, 2 workers each: {ddp['samples_per_s']} samples/s = {ratio:.2f}× one process", flush=True)
    print(
        json.dumps(
            {
                "n": args.n,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "single": single,
                "ddp": ddp,
                "ddp_vs_single": round(ratio, 3),
                "memory_flat": all(r["end_vs_early"] <= 1.05 for r in ddp["ranks"]),
            }
        )
    )


if __name__ == "__main__":
    main()
