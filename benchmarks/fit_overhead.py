"""biofm's `fit` against a bare PyTorch loop with the same model, on molecules: what Lightning, the stream,
logging and balancing cost per training step (issue #20, item 3).

    python benchmarks/fit_overhead.py [--input ../shared/data/mol/esol.csv] [--label-columns logp] [--epochs 5]

Both arms train the same `BiofmModel` (configs/model/molecule.yaml) on the same store's
training split for the same number of epochs, one thread set as torch has it:
- `fit`: `Trainer.fit` on `BiofmModule` + `BiofmDataModule` as `biofm fit` runs it (no validation, no
  checkpoints, no logger, no progress bar), timed from the first to the last training batch;
- `bare`: the training batches collated once beforehand and kept in memory, then per step the model's
  forward, the masked task losses, backward and AdamW (the same kernel as fit's) — no Lightning, no loader,
  no logging.
Prints training molecules/s of each and their ratio; last line JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.datasets.molecules import prepare_molecules  # noqa: E402
from biofm.platform.lightning import BiofmDataModule, BiofmModule  # noqa: E402
from biofm.platform.losses import task_losses  # noqa: E402
from biofm.platform.optim import adamw_kernel  # noqa: E402
from biofm.recipes.config import read_config  # noqa: E402
from biofm.testing import SHARED_DATA  # noqa: E402

MODEL = read_config("model/molecule.yaml")  # the molecule model of `biofm fit -c configs/molecules/…`


class TrainClock:
    """Wall time from the first training batch's start to the last one's end, and samples trained."""

    def __init__(self):
        self.start = self.end = None
        self.samples = 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.end = time.perf_counter()
        self.samples += len(batch["row"])


def fit_arm(url: str, epochs: int, batch_size: int, seed: int) -> dict:
    from lightning.pytorch import Callback, Trainer, seed_everything

    class Clock(TrainClock, Callback):
        pass

    seed_everything(seed, verbose=False)
    data = BiofmDataModule([url], batch_size=batch_size, seed=seed)
    module = BiofmModule(data.schema, **MODEL)
    clock = Clock()
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[clock],
    )
    trainer.fit(module, datamodule=data)
    seconds = clock.end - clock.start
    return {"samples": clock.samples, "seconds": round(seconds, 2), "per_s": round(clock.samples / seconds, 1)}


def bare_step(model, optimiser, batch: dict, dtype: torch.dtype | None = None) -> None:
    """One training step without Lightning: forward (under autocast to `dtype` if given), the masked task
    losses summed, backward, the optimiser's step."""
    device = next(model.parameters()).device.type
    with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
        out = model(batch["inputs"])
        losses = task_losses(model.kinds, batch["labels"], out["logits"])
        loss = sum(t.loss for t in losses.values())
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()


def bare_arm(url: str, epochs: int, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    data = BiofmDataModule([url], batch_size=batch_size, seed=seed)
    batches = list(data.train_dataloader())  # collated once: the loop below does the model's work only
    model = BiofmModule(data.schema, **MODEL).model.train()
    groups = [{"params": list(model.parameters())}]
    optimiser = torch.optim.AdamW(groups, lr=MODEL["lr"], weight_decay=0.0, **adamw_kernel(groups))  # as fit's
    samples, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in batches:
            bare_step(model, optimiser, batch)
            samples += len(batch["row"])
    seconds = time.perf_counter() - start
    return {"samples": samples, "seconds": round(seconds, 2), "per_s": round(samples / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SHARED_DATA / "mol" / "esol.csv"))
    parser.add_argument("--label-columns", default="logp")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)  # configs/data/esol.yaml's
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if not Path(args.input).exists():
        print(f"{args.input}: not found (the shared data, or --input); nothing to measure")
        return
    os.environ.setdefault("WANDB_MODE", "disabled")
    with tempfile.TemporaryDirectory(prefix="biofm-fit-overhead-") as tmp:
        store, _ = prepare_molecules(
            args.input,
            f"{tmp}/s.zarr",
            label_columns=args.label_columns.split(","),
            split="random",
            seed=args.seed,
            fragments="keep",
            workers=1,
        )
        bare = bare_arm(store.url, args.epochs, args.batch_size, args.seed)
        fit = fit_arm(store.url, args.epochs, args.batch_size, args.seed)
    result = {
        "input": Path(args.input).name,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "bare": bare,
        "fit": fit,
        "fit_vs_bare": round(fit["per_s"] / bare["per_s"], 3),
    }
    print(
        f"training molecules/s: fit {fit['per_s']}, bare loop {bare['per_s']} → fit is "
        f"{result['fit_vs_bare']:.2f}× the bare loop"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
