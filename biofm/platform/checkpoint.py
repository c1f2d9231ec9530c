"""Checkpoints that load without executing pickled code, and loading pretrained weights to fine-tune.

Every checkpoint biofm writes holds only tensors and plain values (the schema is JSON-like), so
`torch.load(weights_only=True)` reads it; anything else — a planted pickle payload — is refused.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint holds objects that only unpickling arbitrary code could rebuild."""


def safe_load(path: str | Path, map_location: Any = "cpu") -> dict:
    """Load a checkpoint with `weights_only=True`; refuse, with a clear error, what needs more."""
    fs = get_filesystem(str(path))
    if not fs.exists(str(path)):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with fs.open(str(path), "rb") as f:
            return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise UnsafeCheckpointError(unsafe_message(path, err)) from None


def unsafe_message(path, err: Exception) -> str:
    detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line), "")
    return (f"refusing to load checkpoint {path}: it holds objects that only unpickling arbitrary code could "
            f"rebuild, which biofm never writes. Load only checkpoints from a source you trust. {detail}").strip()


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
    schema = checkpoint.get("hyper_parameters", {}).get("schema")
    if schema is None:
        raise ValueError(f"{path} is not a biofm checkpoint (no schema in its hyper-parameters)")
    for name, config in model.schema["modalities"].items():
        if name in schema["modalities"] and schema["modalities"][name] != config:
            raise ValueError(f"modality '{name}' of {path} was prepared with other settings (e.g. another "
                             "tokenizer) than this run's stores; prepare the stores with the checkpoint's "
                             "settings")
    state = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    shared_tasks = [t for t in model.schema["tasks"]
                    if t in schema["tasks"] and schema["tasks"][t]["kind"] == model.schema["tasks"][t]["kind"]
                    and not fresh_heads]
    keep = PRETRAINED_PARTS + tuple(f"heads.{t}." for t in shared_tasks) + tuple(f"queries.{t}" for t in shared_tasks)
    own = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                  if k.startswith(keep) and k in own and own[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"{path} has another architecture than this model ({', '.join(mismatched[:3])}"
                         f"{', …' if len(mismatched) > 3 else ''}); fine-tune with the pretraining run's model "
                         "options (d_model, depth, heads, latents, encoders)")
    loaded = {k: v for k, v in state.items() if k.startswith(keep) and k in own}
    model.load_state_dict(loaded, strict=False)
    fresh = [t for t in model.schema["tasks"] if t not in shared_tasks]
    return {"loaded": sorted(loaded), "fresh_tasks": fresh}
