"""A training step on a GPU (issue #20, item 4): the model's FLOPs, achieved TFLOP/s and MFU in bf16, samples/s,
peak memory, whether the stream keeps the GPU fed, and DDP (nccl) and FSDP fits on the devices present.

    python benchmarks/gpu.py [--d-model 512] [--depth 8] [--batch-size 256] [--steps 30] [--device cuda]

Two workloads, both made here (nothing is read from ../shared, which a lent machine does not have):
- `molecules`: a molecule store of generated SMILES (the modality's example pool, repeated), GINE + trunk;
- `cohort`: the synthetic cohort (tabular + text encoders, five tasks).
For each: the batches are drawn from `BiofmDataModule`'s training stream first (timed alone: the stream's
samples/s), moved to the device, then `--steps` steps of forward, masked task losses, backward and fused
AdamW under `torch.autocast(bfloat16)` are timed with the device synchronised. FLOPs per step are counted
by `torch.utils.flop_counter.FlopCounterMode` on one step (forward + backward; matmuls, convolutions and
attention); TFLOP/s = FLOPs / step time, MFU = TFLOP/s / the GPU's dense bf16 peak (H100/H200 989, A100
312; `--peak-tflops` for others). `loader_bound` is true when the stream supplies fewer samples/s than
the step consumes (the GPU would wait on it). Then `Trainer.fit` with `precision="bf16-mixed"` for the
same number of steps, with Lightning's DDP (nccl) and with `BiofmFSDP`, on every device present, each in
its own process (Lightning's launcher starts the other ranks), reporting samples/s over all ranks.

On a machine without a GPU it says so and exits 0 (`--device cpu` runs the same measurements on the CPU,
with gloo, to check the script itself). Last line JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fit_overhead import bare_step  # noqa: E402  (the same bare step as the CPU limit's)

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_tflops(device: torch.device, given: float | None) -> float:
    if given:
        return given
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), math.nan)


def make_stores(root: Path, n: int) -> dict[str, str]:
    import pandas as pd

    from biofm.datasets.molecules import prepare_molecules
    from biofm.datasets.synthetic import prepare_synthetic
    from biofm.platform.modality import MODALITIES

    pool = MODALITIES.resolve("molecule").example_raw(64)
    rng = torch.Generator().manual_seed(0)
    frame = pd.DataFrame(
        {"smiles": [pool[i % len(pool)] for i in range(n)], "y": torch.randn(n, generator=rng).numpy()}
    )
    frame.to_csv(root / "molecules.csv", index=False)
    molecules, _ = prepare_molecules(
        str(root / "molecules.csv"), str(root / "molecules.zarr"), label_columns=["y"], fragments="keep", workers=1
    )
    cohort = prepare_synthetic(str(root / "cohort.zarr"), n=n)
    return {"molecules": molecules.url, "cohort": cohort.url}


def _to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def step_figures(url: str, settings: dict, batch_size: int, steps: int, device: torch.device, peak: float) -> dict:
    """The bare training step on `device` in bf16: FLOPs, time, TFLOP/s, MFU, samples/s, peak memory, and the
    stream's own samples/s."""
    from torch.utils.flop_counter import FlopCounterMode

    from biofm.platform.lightning import BiofmDataModule, BiofmModule

    torch.manual_seed(0)
    data = BiofmDataModule([url], batch_size=batch_size, seed=0)
    batches, start = [], time.perf_counter()
    while len(batches) < steps + 3:
        for batch in data.train_dataloader():
            batches.append(batch)
            if len(batches) == steps + 3:
                break
    stream_per_s = sum(len(b["row"]) for b in batches) / (time.perf_counter() - start)
    batches = [_to(b, device) for b in batches]
    model = BiofmModule(data.schema, **settings).model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(params, lr=1e-4, fused=device.type in ("cuda", "cpu"))

    def step(batch):
        bare_step(model, optimiser, batch, torch.bfloat16)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    with FlopCounterMode(display=False) as counter:
        step(batches[0])
    flops = counter.get_total_flops()
    for batch in batches[1:3]:  # warm-up (kernel choice, allocator)
        step(batch)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    samples, start = 0, time.perf_counter()
    for batch in batches[3:]:
        step(batch)
        samples += len(batch["row"])
    sync()
    seconds = (time.perf_counter() - start) / steps
    tflops = flops / seconds / 1e12
    per_s = samples / (seconds * steps)
    return {
        "parameters": sum(p.numel() for p in params),
        "batch_size": batch_size,
        "flops_per_step": flops,
        "step_ms": round(1000 * seconds, 3),
        "tflops": round(tflops, 3),
        "mfu": round(tflops / peak, 4) if math.isfinite(peak) else None,
        "samples_per_s": round(per_s, 1),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        "stream_samples_per_s": round(stream_per_s, 1),
        "loader_bound": stream_per_s < per_s,
    }


def fit_figures(url: str, settings: dict, batch_size: int, steps: int, strategy: str, device: str) -> dict:
    """`Trainer.fit` in bf16-mixed with `strategy` on every device present (run in its own process)."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from biofm.platform.lightning import BiofmDataModule, BiofmModule
    from biofm.platform.strategies import BiofmFSDP

    class Clock(Callback):
        def __init__(self):
            self.samples, self.start = 0, None

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == 3 and self.start is None:  # after warm-up
                if device == "cuda":
                    torch.cuda.synchronize()
                self.start = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if self.start is not None:
                self.samples += len(batch["row"])

        def on_train_end(self, trainer, module):
            if device == "cuda":
                torch.cuda.synchronize()
            self.seconds = time.perf_counter() - self.start

    seed_everything(0, verbose=False)
    data = BiofmDataModule([url], batch_size=batch_size, seed=0)
    module = BiofmModule(data.schema, **settings)
    clock = Clock()
    gpus = torch.cuda.device_count() if device == "cuda" else 2
    chosen = {"ddp": "ddp", "fsdp": BiofmFSDP()}[strategy]
    trainer = Trainer(
        accelerator="gpu" if device == "cuda" else "cpu",
        devices=gpus,
        strategy=chosen,
        precision="bf16-mixed",
        max_steps=steps + 3,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=data)
    per_rank = torch.tensor([clock.samples / clock.seconds], device=module.device)
    if trainer.world_size > 1:
        torch.distributed.all_reduce(per_rank)
    return {"strategy": strategy, "devices": trainer.world_size, "samples_per_s": round(float(per_rank), 1)}


WORKLOADS = {  # model settings per workload: the molecule model's shape at GPU size
    "molecules": {"encoders": {"molecule": {"layers": 4}}},
    "cohort": {},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--latents", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=8192, help="samples per generated store")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU")
    parser.add_argument("--fit", default=None, help=argparse.SUPPRESS)  # internal: strategy,workload,url
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("no GPU here (torch.cuda.is_available() is False): nothing to measure; run on a GPU machine")
        print(json.dumps({"gpu": False}))
        return

    def settings(workload: str) -> dict:
        return {
            "d_model": args.d_model,
            "depth": args.depth,
            "heads": args.heads,
            "latents": args.latents,
            "dropout": 0.0,
            "lr": 1e-4,
            **WORKLOADS[workload],
        }

    if args.fit:  # one strategy's fit, in its own process (and Lightning's other ranks)
        strategy, workload, url = args.fit.split(",", 2)
        result = fit_figures(url, settings(workload), args.batch_size, args.steps, strategy, args.device)
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            print("FIT " + json.dumps(result), flush=True)
        return
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    summary = {
        "gpu": device.type == "cuda",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "devices": torch.cuda.device_count() if device.type == "cuda" else 1,
        "peak_bf16_tflops": peak if math.isfinite(peak) else None,
        "torch": torch.__version__,
        "model": {k: getattr(args, k) for k in ("d_model", "depth", "heads", "latents")},
        "workloads": {},
    }
    with tempfile.TemporaryDirectory(prefix="biofm-gpu-") as tmp:
        stores = make_stores(Path(tmp), args.samples)
        for workload, url in stores.items():
            figures = step_figures(url, settings(workload), args.batch_size, args.steps, device, peak)
            print(
                f"{workload}: {figures['flops_per_step'] / 1e9:.1f} GFLOP/step, {figures['step_ms']:.1f} ms/step, "
                f"{figures['tflops']:.1f} TFLOP/s (MFU {figures['mfu']}), {figures['samples_per_s']:.0f} samples/s; "
                f"stream {figures['stream_samples_per_s']:.0f} samples/s"
                f"{' — the GPU would wait on the loader' if figures['loader_bound'] else ''}",
                flush=True,
            )
            fits = []
            for strategy in ("ddp", "fsdp"):
                if strategy == "fsdp" and device.type != "cuda":
                    fits.append({"strategy": strategy, "skipped": "FSDP needs a GPU"})
                    continue
                command = [sys.executable, __file__, *sys.argv[1:], "--fit", f"{strategy},{workload},{url}"]
                done = subprocess.run(command, capture_output=True, text=True, timeout=900)
                line = next((x for x in done.stdout.splitlines() if x.startswith("FIT ")), None)
                fit = json.loads(line[4:]) if line else {"strategy": strategy, "error": done.stderr[-800:]}
                fits.append(fit)
                print(f"  fit {strategy}: {fit.get('samples_per_s', fit.get('error'))}", flush=True)
            summary["workloads"][workload] = {**figures, "fits": fits}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
