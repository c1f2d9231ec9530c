"""Experiment tracking: W&B through Lightning's WandbLogger, offline by default, plus a CSV log.

`WANDB_MODE` decides: unset → `offline` (files under the run directory, sync later with `wandb sync`),
`disabled` → no W&B at all (what the tests use), `online` → a W&B server. Without the `wandb` package the
CSV log alone is kept. Only metrics and the model's size settings are logged: no sample or subject id,
no free text, no tokenizer vocabulary (the schema stays in checkpoints), no path: W&B's run metadata (the
command line with its store paths, the program, host and user) is not collected, and a checkpoint — whose
tokenizer vocabulary is learned from patient text — is recorded in the W&B run only when asked
(`checkpoint_artifact=True`, `--tracking.checkpoint_artifact true`).

The CSV log `<run dir>/logs/<stage>/metrics.csv` keeps its history: a resumed fit appends to it, and a new
run of the same stage moves an earlier log aside (`metrics-<n>.csv`) rather than deleting it.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import time
from pathlib import Path

from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _KeepingWriter(ExperimentWriter):
    """Lightning's CSV writer deletes an existing metrics.csv; this one appends to it (`append`) or moves it
    aside as `metrics-<n>.csv`."""

    def __init__(self, log_dir: str, append: bool):
        self.append = append
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.append:
            with open(path, newline="") as handle:
                self.metrics_keys = sorted(next(csv.reader(handle), []))
            return
        n = 1
        while (path.parent / f"metrics-{n}.csv").exists():
            n += 1
        path.rename(path.parent / f"metrics-{n}.csv")


class RunLog(CSVLogger):
    """`<run dir>/logs/<stage>/metrics.csv` that keeps its history (see the module's doc)."""

    def __init__(self, run_dir: str, stage: str, append: bool = False):
        super().__init__(run_dir, name="logs", version=stage)
        self.append = append

    @property
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _KeepingWriter(self.log_dir, self.append)
        return self._experiment


def wandb_settings():
    """W&B settings that keep paths and the command line out of the run's files (see the module's doc)."""
    import wandb

    return wandb.Settings(
        x_disable_meta=True,
        disable_code=True,
        disable_git=True,
        save_code=False,
        x_save_requirements=False,
        silent=True,
    )


def default_loggers(
    run_dir: str | os.PathLike, stage: str = "fit", project: str = "biofm", resume: bool = False
) -> list[Logger]:
    """`<run_dir>/logs/<stage>/metrics.csv` (each subcommand its own, so `test` never clears `fit`'s log;
    appended to when `resume`), and W&B under `<run_dir>/wandb` unless disabled or not installed."""
    run_dir = str(run_dir)
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    loggers: list[Logger] = [RunLog(run_dir, stage, append=resume)]
    mode = os.environ.setdefault("WANDB_MODE", "offline")
    if mode != "disabled" and importlib.util.find_spec("wandb") is not None:
        from lightning.pytorch.loggers import WandbLogger

        # checkpoints reach W&B only through CheckpointArtifact, when asked
        wandb_logger = WandbLogger(
            save_dir=run_dir,
            project=project,
            offline=(mode == "offline"),
            log_model=False,
            settings=wandb_settings(),
        )
        # Lightning 2.6 always passes `anonymous=None`, which W&B 0.31 warns is deprecated on every run
        wandb_logger._wandb_init.pop("anonymous", None)
        loggers.append(wandb_logger)
    return loggers


class CheckpointArtifact(Callback):
    """At the end of `fit`, records the best (or last) checkpoint in the W&B run (its `files/`, uploaded
    by `wandb sync` or at once online) — only when `enabled`: a checkpoint carries the tokenizer vocabularies
    learned from the training data (patient text, for EHR and reports)."""

    def __init__(self, enabled: bool = False):
        self.enabled = enabled

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.enabled or not trainer.is_global_zero or trainer.checkpoint_callback is None:
            return
        path = trainer.checkpoint_callback.best_model_path or trainer.checkpoint_callback.last_model_path
        # wandb itself rewrites WANDB_MODE=offline to "dryrun" once a run starts
        if not path or not Path(path).exists() or os.environ.get("WANDB_MODE") == "disabled":
            return
        for logger in trainer.loggers:
            if type(logger).__name__ == "WandbLogger":
                logger.experiment.save(str(path), base_path=str(Path(path).parent), policy="now")


SAFE_HPARAMS = (
    "d_model",
    "depth",
    "heads",
    "latents",
    "dropout",
    "lr",
    "weight_decay",
    "balancing",
    "freeze_encoders",
    "fresh_heads",
    "encoders",
)


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
        self.samples.append(
            {
                "when": when,
                "step": trainer.global_step,
                "rss": own,
                "workers_rss": workers,
                "seconds": time.perf_counter() - self._start,
                "samples": self._count,
            }
        )

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
