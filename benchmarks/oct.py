"""OCT: training throughput of the default volume encoder against MONAI's DenseNet121 (3D), and prepare
throughput against reading the raw arrays.

    python benchmarks/oct.py [--size 128] [--batch 2] [--steps 3] [--files 12]

- encoder: forward + backward volumes/s on the same random batch [B, 1, S, S, S] of the default
  `OctEncoder` (d_model 64, grid 8, 2 layers) with a linear head on its mean token, and of
  `monai.networks.nets.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)`; the first step of each
  is a warm-up, then the mean of `steps` steps (DenseNet: one step when it takes over a minute).
- prepare: `--files` Harvard-style npz files (200³ uint8 B-scans + a 200² RNFL map) → `prepare_oct` at
  S³, against `np.load` of the same arrays alone.
The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def train_rate(model: torch.nn.Module, forward, batch: torch.Tensor, steps: int, budget_s: float = 60.0) -> float:
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-4)
    target = torch.zeros(len(batch), dtype=torch.long)
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(forward(batch), target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        times.append(time.perf_counter() - start)
        if step >= 1 and sum(times[1:]) > budget_s:
            break
    measured = times[1:] or times
    return len(batch) / (sum(measured) / len(measured))


def encoder_figures(size: int, batch_size: int, steps: int) -> dict:
    from monai.networks.nets import DenseNet121

    from biofm.modalities.oct.encoder import OctEncoder

    torch.manual_seed(0)
    volume = torch.rand(batch_size, 1, size, size, size)
    ours = OctEncoder((size, size, size), (size, size), d_model=64)
    head = torch.nn.Linear(64, 2)
    model = torch.nn.ModuleDict({"encoder": ours, "head": head})
    inputs = {
        "volume": volume,
        "has_volume": torch.ones(batch_size, dtype=torch.bool),
        "enface": torch.zeros(batch_size, 1, size, size),
        "has_enface": torch.zeros(batch_size, dtype=torch.bool),
    }

    def forward_ours(_):
        tokens, mask = ours(inputs)
        return head((tokens * mask[..., None]).sum(1) / mask.sum(1, keepdim=True))

    ours_rate = train_rate(model, forward_ours, volume, steps)
    print(f"biofm OctEncoder: {ours_rate:.3f} volumes/s (forward + backward, {size}³, batch {batch_size})")
    densenet = DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    dense_rate = train_rate(densenet, densenet, volume, steps)
    print(f"MONAI DenseNet121-3D: {dense_rate:.3f} volumes/s")
    return {
        "encoder_volumes_per_s": round(ours_rate, 3),
        "densenet121_volumes_per_s": round(dense_rate, 4),
        "encoder_vs_densenet121": round(ours_rate / dense_rate, 1),
        "size": size,
        "batch": batch_size,
        "encoder_parameters": sum(p.numel() for p in ours.parameters()),
        "densenet121_parameters": sum(p.numel() for p in densenet.parameters()),
    }


def prepare_figures(files: int, size: int) -> dict:
    import pandas as pd

    from biofm.datasets.oct import prepare_oct, synthetic_eye

    folder = Path(tempfile.mkdtemp(prefix="biofm-oct-bench-"))
    try:
        rng = np.random.default_rng(0)
        rows = []
        for i in range(files):
            volume, thickness = synthetic_eye(rng, (200, 200, 200), glaucoma=bool(i % 2))
            np.savez(folder / f"eye{i}.npz", oct_bscans=volume, rnflt=thickness, glaucoma=np.float32(i % 2))
            rows.append({"path": f"eye{i}.npz", "sample_id": f"E{i}", "subject_id": f"P{i // 2}", "eye": "OD"})
        manifest = folder / "manifest.csv"
        pd.DataFrame(rows).to_csv(manifest, index=False)
        start = time.perf_counter()
        for i in range(files):
            with np.load(folder / f"eye{i}.npz") as data:
                data["oct_bscans"], data["rnflt"]  # noqa: B018 — the read is what is timed
        read_s = time.perf_counter() - start
        start = time.perf_counter()
        prepare_oct(
            str(manifest),
            str(folder / "s.zarr"),
            npz_labels_keys=["glaucoma"],
            shape=(size,) * 3,
            enface_shape=(size, size),
        )
        prepare_s = time.perf_counter() - start
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(f"prepare: {files / prepare_s:.1f} volumes/s; np.load alone: {files / read_s:.1f} volumes/s")
    return {
        "prepare_volumes_per_s": round(files / prepare_s, 2),
        "read_volumes_per_s": round(files / read_s, 2),
        "prepare_vs_read": round(read_s / prepare_s, 3),
        "files": files,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--files", type=int, default=12)
    args = parser.parse_args()
    figures = encoder_figures(args.size, args.batch, args.steps)
    figures.update(prepare_figures(args.files, args.size))
    figures["threads"] = torch.get_num_threads()
    print(
        f"encoder / DenseNet121-3D: {figures['encoder_vs_densenet121']}×; prepare / np.load: "
        f"{figures['prepare_vs_read']}×"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
