"""Checkpoints that load without executing pickled code, and loading pretrained weights to fine-tune.

Every checkpoint biofm writes holds only tensors and plain values (the schema is JSON-like), so
`torch.load(weights_only=True)` reads it; anything else — a planted pickle payload — is refused.
"""

from __future__ import annotations

import pickle
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

from biofm.platform.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format since 1.6
PICKLE_MAGIC = b"\x80"  # the legacy format starts with a pickle protocol opcode


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint holds objects that only unpickling arbitrary code could rebuild."""


def _what_is_wrong(path: str, fs) -> str | None:
    """Why a file cannot be a checkpoint, from its first and last bytes, or None when it may be one."""
    size = fs.size(path)
    if not size:
        return "the file is empty (0 bytes), not a checkpoint"
    with fs.open(path, "rb") as handle:
        head = handle.read(4096)
        if head.startswith(ZIP_MAGIC):
            try:
                with zipfile.ZipFile(handle) as archive:
                    names = archive.namelist()
            except (zipfile.BadZipFile, OSError, EOFError):
                return (
                    f"the checkpoint is truncated or damaged ({size} bytes; its zip archive has no end, as when "
                    "a save or a copy is cut short): use another checkpoint, e.g. best-*.ckpt, or copy it again"
                )
            if not any(name.endswith("data.pkl") for name in names):
                return "the file is a zip archive but not a PyTorch checkpoint (no data.pkl in it)"
            return None
    if head.startswith(PICKLE_MAGIC):
        return None
    try:
        head.decode("utf-8")
        return (
            "the file is readable characters, not a checkpoint (a checkpoint is a file of bytes written by `biofm fit`)"
        )
    except UnicodeDecodeError:
        return "the file is not a checkpoint (its bytes are neither a PyTorch zip archive nor a pickle)"


def safe_load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; refuse, with one clear error, a file that is not a
    checkpoint (empty, truncated, text, random bytes) and one that needs more than plain values."""
    fs = get_filesystem(str(path))
    if not fs.exists(str(path)):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if fs.isdir(str(path)):
        raise CheckpointError(
            f"{path}: is a folder, not a checkpoint file (biofm.load and predict-cohort take a "
            "run directory; --ckpt_path and init_from take a .ckpt file)"
        )
    wrong = _what_is_wrong(str(path), fs)
    if wrong:
        raise CheckpointError(f"{path}: {wrong}")
    try:
        with fs.open(str(path), "rb") as f:
            checkpoint = torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        if "GLOBAL" in str(err) or "Unsupported global" in str(err):
            raise UnsafeCheckpointError(unsafe_message(path, err)) from None
        raise CheckpointError(
            f"{path}: the file cannot be read as a checkpoint ({str(err).splitlines()[0][:120]}); "
            "it is damaged or was not written by torch.save"
        ) from None
    except Exception as err:  # noqa: BLE001 — torch raises RuntimeError, EOFError, KeyError, IndexError, …
        raise CheckpointError(
            f"{path}: the checkpoint is truncated or damaged ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:120] if str(err) else 'no detail'}); use another "
            "checkpoint or copy it again"
        ) from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f"{path}: holds a {type(checkpoint).__name__}, not a checkpoint (a mapping with "
            "state_dict and hyper_parameters)"
        )
    return checkpoint


def biofm_schema(checkpoint: dict, path) -> dict:
    """The schema a biofm checkpoint carries; another program's checkpoint is a CheckpointError."""
    schema = (checkpoint.get("hyper_parameters") or {}).get("schema")
    if not isinstance(schema, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(
            f"{path} is not a biofm checkpoint (no schema in its hyper-parameters); use one written by `biofm fit`"
        )
    return schema


def unsafe_message(path, err: Exception) -> str:
    detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
    return (
        f"refusing to load checkpoint {path}: it holds objects that only unpickling arbitrary code could "
        f"rebuild, which biofm never writes. Load only checkpoints from a source you trust. {detail}"
    ).strip()


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, reading with `safe_load` whatever the caller asks for."""

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return safe_load(path, map_location=map_location or "cpu")


PRETRAINED_PARTS = ("encoders.", "resamplers.", "modality_embedding.", "cls", "trunk.", "norm.")


def load_pretrained(model: nn.Module, path: str | Path, fresh_heads: bool = False) -> dict[str, list[str]]:
    """Copy encoders, resamplers and trunk from a checkpoint into `model`; tasks it shares with the
    checkpoint keep their heads and query tokens unless `fresh_heads`; new tasks start fresh.
    The modality settings (e.g. tokenizer) must be those the checkpoint was trained with."""
    checkpoint = safe_load(path)
    schema = biofm_schema(checkpoint, path)
    for name, config in model.schema["modalities"].items():
        if name in schema["modalities"] and schema["modalities"][name] != config:
            raise ValueError(
                f"modality '{name}' of {path} was prepared with other settings (e.g. another "
                "tokenizer) than this run's stores; prepare the stores with the checkpoint's "
                "settings"
            )
    state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    shared_tasks = [
        t
        for t in model.schema["tasks"]
        if t in schema["tasks"] and schema["tasks"][t]["kind"] == model.schema["tasks"][t]["kind"] and not fresh_heads
    ]
    keep = PRETRAINED_PARTS + tuple(f"heads.{t}." for t in shared_tasks) + tuple(f"queries.{t}" for t in shared_tasks)
    own = model.state_dict()
    mismatched = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}"
        for k, v in state.items()
        if k.startswith(keep) and k in own and own[k].shape != v.shape
    ]
    if mismatched:
        raise ValueError(
            f"{path} has another architecture than this model ({', '.join(mismatched[:3])}"
            f"{', …' if len(mismatched) > 3 else ''}); fine-tune with the pretraining run's model "
            "options (d_model, depth, heads, latents, encoders)"
        )
    loaded = {k: v for k, v in state.items() if k.startswith(keep) and k in own}
    model.load_state_dict(loaded, strict=False)
    fresh = [t for t in model.schema["tasks"] if t not in shared_tasks]
    return {"loaded": sorted(loaded), "fresh_tasks": fresh}


class BiofmCheckpoint(ModelCheckpoint):
    """`best-epoch=N.ckpt` by the monitored validation metric, and `last.ckpt`: the state at the end of every
    training epoch (after its validation) and every `every_minutes` minutes or `every_n_steps` steps within
    one, so a killed run loses minutes, not an epoch, and a resume from `last.ckpt` trains nothing twice.

    Lightning's `save_last` refreshes `last.ckpt` only when a top-k checkpoint is saved (after epochs whose
    validation did not improve it kept an older epoch). A NaN monitor (no metric could be computed) never
    selects a checkpoint."""

    def __init__(
        self,
        dirpath: str,
        monitor: str = "val/macro/score",
        mode: str = "max",
        every_minutes: float | None = 10.0,
        every_n_steps: int | None = None,
        **kwargs,
    ):
        super().__init__(
            dirpath=dirpath,
            monitor=monitor,
            mode=mode,
            save_last=True,
            save_top_k=1,
            filename="best-{epoch}",
            enable_version_counter=False,
            **kwargs,
        )
        if every_minutes is not None and every_minutes <= 0:
            raise ValueError(f"checkpoint every_minutes must be above 0, got {every_minutes}")
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"checkpoint every_n_steps must be at least 1, got {every_n_steps}")
        self.every_seconds = None if every_minutes is None else 60.0 * every_minutes
        self.every_n_steps = every_n_steps
        self._last_at_step: int | None = None
        self._last_at_time = time.monotonic()

    def _save_last_checkpoint(self, trainer, monitor_candidates) -> None:
        saved_before = self._last_global_step_saved
        super()._save_last_checkpoint(trainer, monitor_candidates)
        # `last.ckpt` never stands in for the best checkpoint's save at this step (Lightning skips saving
        # twice at one step, which would skip the epoch's top-k check after a mid-epoch save)
        self._last_global_step_saved = saved_before
        self._last_at_step, self._last_at_time = trainer.global_step, time.monotonic()

    def _save_topk_checkpoint(self, trainer, monitor_candidates) -> None:
        current = monitor_candidates.get(self.monitor)
        if torch.is_tensor(current) and torch.isnan(current):
            return  # no metric could be computed: nothing to choose by
        super()._save_topk_checkpoint(trainer, monitor_candidates)

    def _fitting(self, trainer) -> bool:
        from lightning.pytorch.trainer.states import TrainerFn

        return not trainer.fast_dev_run and trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking

    def _refresh_last(self, trainer) -> None:
        if self._fitting(trainer) and self._last_at_step != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = (self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0) or (
            self.every_seconds is not None and time.monotonic() - self._last_at_time >= self.every_seconds
        )
        if trainer.world_size > 1:  # every rank takes the same decision (ranks' clocks differ)
            due = trainer.strategy.broadcast(due)
        if due:
            self._refresh_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._refresh_last(trainer)


def default_checkpoint(
    run_dir: str, every_minutes: float | None = 10.0, every_n_steps: int | None = None
) -> BiofmCheckpoint:
    """`<run_dir>/checkpoints/`: the best epoch by validation macro score, and `last.ckpt` (see
    `BiofmCheckpoint`)."""
    import os

    return BiofmCheckpoint(
        os.path.join(run_dir, "checkpoints"), every_minutes=every_minutes, every_n_steps=every_n_steps
    )
