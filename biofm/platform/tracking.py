"""Experiment tracking: W&B through Lightning's WandbLogger, offline by default, plus a CSV log.

`WANDB_MODE` decides: unset → `offline` (files under the run directory, sync later with `wandb sync`),
`disabled` → no W&B at all (what the tests use), `online` → a W&B server. Without the `wandb` package the
CSV log alone is kept. Only metrics and the model's size settings are logged: no sample or subject id,
no free text, no tokenizer vocabulary (the schema stays in checkpoints).
"""

from __future__ import annotations

import importlib.util
import json
import time
import os
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, Logger


def default_loggers(run_dir: str | os.PathLike, stage: str = "fit", project: str = "biofm") -> list[Logger]:
    """`<run_dir>/logs/<stage>/metrics.csv` (each subcommand its own, so `test` never clears `fit`'s log),
    and W&B under `<run_dir>/wandb` unless disabled or not installed."""
    run_dir = str(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [CSVLogger(run_dir, name="logs", version=stage)]
    mode = os.environ.setdefault("WANDB_MODE", "offline")
    if mode != "disabled" and importlib.util.find_spec("wandb") is not None:
        from lightning.pytorch.loggers import WandbLogger
        # online, Lightning uploads checkpoints itself; offline, CheckpointArtifact records them
        loggers.append(WandbLogger(save_dir=run_dir, project=project, offline=(mode == "offline"),
                                   log_model=(mode == "online")))
    return loggers


class CheckpointArtifact(Callback):
    """At the end of `fit`, records the best (or last) checkpoint in the W&B run (its `files/`, uploaded
    by `wandb sync`): offline, Lightning's `log_model` cannot."""

    def on_fit_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.checkpoint_callback is None:
            return
        path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
        # wandb itself rewrites WANDB_MODE=offline to "dryrun" once a run starts
        if not path or not Path(path).exists() or os.environ.get("WANDB_MODE") not in ("offline", "dryrun"):
            return
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.save(str(path), base_path=str(Path(path).parent), policy="now")


SAFE_HPARAMS = ("d_model", "depth", "heads", "latents", "dropout", "lr", "weight_decay", "balancing",
                "freeze_encoders", "fresh_heads", "encoders")


def log_run_settings(module, loggers: list[Logger]) -> None:
    """Model size, optimiser and task list (names and kinds only) to every logger."""
    hp = module.hparams
    settings = {k: hp[k] for k in SAFE_HPARAMS if k in hp}
    settings["tasks"] = {t: s["kind"] for t, s in hp["schema"]["tasks"].items()}
    settings["modalities"] = sorted(hp["schema"]["modalities"])
    for logger in loggers:
        logger.log_hyperparams(settings)


class MemoryMonitor(Callback):
    """Resident memory of each training process (with its loader workers) over the epoch: at the start,
    every `every` steps and at the end of each training epoch, written per rank to
    `<out_dir>/memory-rank<r>.json` with the epoch's samples and seconds (for `benchmarks/load.py`)."""

    def __init__(self, out_dir: str, every: int = 10):
        self.out_dir, self.every = Path(out_dir), every
        self.samples: list[dict] = []
        self._start, self._count = 0.0, 0

    @staticmethod
    def _rss() -> tuple[int, int]:
        """This process's RSS, and its loader workers' (children of this rank; the other ranks, which
        Lightning starts as children of rank 0, are left out by their LOCAL_RANK)."""
        import psutil
        me, rank = psutil.Process(), os.environ.get("LOCAL_RANK", "0")
        workers = 0
        for child in me.children(recursive=True):
            try:
                if child.environ().get("LOCAL_RANK", rank) == rank:
                    workers += child.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return me.memory_info().rss, workers

    def _record(self, trainer, when: str) -> None:
        own, workers = self._rss()
        self.samples.append({"when": when, "step": trainer.global_step, "rss": own, "workers_rss": workers,
                             "seconds": time.perf_counter() - self._start, "samples": self._count})

    def on_train_epoch_start(self, trainer, pl_module):
        self._start, self._count = time.perf_counter(), 0
        self._record(trainer, "start")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._count += len(batch["row"])
        if batch_idx % self.every == 0:
            self._record(trainer, "step")

    def on_train_epoch_end(self, trainer, pl_module):
        self._record(trainer, "end")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"memory-rank{trainer.global_rank}.json").write_text(json.dumps(self.samples))
