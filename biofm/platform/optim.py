"""The optimiser's parts: parameter groups (a learning rate per depth with layer-wise decay, weight decay on
the weights of linear and convolutional layers only) and the warm-up + cosine schedule."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn


def parameter_groups(
    model: nn.Module,
    extra: list[nn.Parameter],
    lr: float,
    weight_decay: float,
    layer_decay: float | None,
    decayed_ids: set[int] | None = None,
) -> list[dict]:
    """AdamW's groups for a `BiofmModel` and `extra` parameters trained with its heads: at `lr`, or with
    `layer_decay` one learning rate per depth (heads and the final norm at `lr`, trunk block i of n at
    lr·decay^(n − i), encoders, resamplers and the [CLS] token at lr·decay^(n + 1)); in each, weight decay
    only on `decayed` parameters (those in `decayed_ids`), none on norms, biases, embeddings and learned
    tokens ([CLS], task queries, resampler latents, mask vectors), as BERT, MAE and timm train."""
    decayed_ids = {id(p) for p in decayed(model)} if decayed_ids is None else decayed_ids
    depth = len(model.trunk)
    levels: dict[int, list] = defaultdict(list)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if not layer_decay:
            level = 0
        elif name.startswith("trunk."):
            level = depth - int(name.split(".")[1])
        elif name.startswith(("encoders.", "resamplers.", "modality_embedding.", "cls")):
            level = depth + 1
        else:  # heads, query tokens, the final norm
            level = 0
        levels[level].append(param)
    levels[0] += extra
    groups = []
    for level, params in sorted(levels.items()):
        for with_decay in (True, False):
            chosen = [p for p in params if (id(p) in decayed_ids) == with_decay]
            if chosen:
                groups.append(
                    {
                        "params": chosen,
                        "lr": lr * (layer_decay**level if layer_decay else 1.0),
                        "weight_decay": weight_decay if with_decay else 0.0,
                    }
                )
    return groups


def adamw_kernel(groups: list[dict]) -> dict:
    """AdamW's implementation for these parameters: on CPU with plain float32 tensors the fused kernel (one
    pass over all parameters; on CPU torch otherwise loops over them one by one — 13–16 % more molecules/s
    in benchmarks/fit_overhead.py's loop); elsewhere torch's default (multi-tensor on GPUs)."""
    params = [p for group in groups for p in group["params"]]
    plain = all(type(p) is nn.Parameter and p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    return {"fused": True} if params and plain else {}


def warmup_cosine(
    optimiser: torch.optim.Optimizer, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps` (at most a tenth of the run, plus one), then cosine decay to zero
    at `total_steps`."""
    total = max(total_steps, 1)
    warmup = min(warmup_steps, total // 10 + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimiser, factor)


DECAYED_LAYERS = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


def decayed(module: nn.Module) -> list[nn.Parameter]:
    """The parameters weight decay applies to: the weight matrices of linear and convolutional layers
    (torch's, torch-geometric's `Linear`, attention's input projection). Norms, biases, embeddings and
    learned tokens are left out."""
    out = []
    for layer in module.modules():
        if isinstance(layer, DECAYED_LAYERS) or type(layer).__name__ == "Linear":
            weight = getattr(layer, "weight", None)
            if isinstance(weight, nn.Parameter):
                out.append(weight)
        elif isinstance(layer, nn.MultiheadAttention) and layer.in_proj_weight is not None:
            out.append(layer.in_proj_weight)
    return out
