"""Low-rank adapters on the trunk's projections (LoRA, Hu et al. 2022), with SMoRA's rank-wise experts as an
option, and merging them back into plain weights.

    y = W x + b + (α / r) · B A x            A [r × d_in] (Kaiming), B [d_out × r] (zeros: starts as W)

With `experts: k` (SMoRA, Zhao et al. 2025) every rank is an expert: a gate (a linear map of the input)
keeps the k highest-scoring ranks of the r for each token, so `B diag(g(x)) A x` mixes rank-one updates
per token. A merged-back model (`merge_lora`) has only its rank-r product folded into W, so it is defined
for plain LoRA alone; a SMoRA model keeps its adapters.

Fine-tuning with `lora` trains the adapters and the task heads and query tokens only; everything else is
frozen (`BiofmModule`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

DEFAULTS = {"rank": 8, "alpha": 16.0, "targets": ["q", "kv", "out", "mlp"], "experts": None, "dropout": 0.0}
TARGETS = {"q": ("attn.q",), "kv": ("attn.kv",), "out": ("attn.out",), "mlp": ("mlp.0", "mlp.3")}


def lora_options(options: Mapping | None) -> dict | None:
    if not options:
        return None
    options = dict(options)
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model.lora: unknown options {unknown}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    if int(merged["rank"]) < 1:
        raise ValueError(f"model.lora.rank must be at least 1, got {merged['rank']}")
    bad = sorted(set(merged["targets"]) - set(TARGETS))
    if bad:
        raise ValueError(f"model.lora.targets: unknown {bad}; known: {sorted(TARGETS)}")
    k = merged["experts"]
    if k is not None and not 1 <= int(k) <= int(merged["rank"]):
        raise ValueError(f"model.lora.experts (SMoRA's active ranks) must be in [1, rank], got {k}")
    return merged


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update (see the module)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, experts: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.rank, self.scale, self.active = rank, alpha / rank, experts
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.gate = nn.Linear(base.in_features, rank, bias=False) if experts is not None else None
        self.drop = nn.Dropout(dropout)

    @property
    def weight(self) -> torch.Tensor:  # for code that reads a projection's weight (dtype, device)
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        low = self.drop(x) @ self.lora_a.T  # [..., r]
        if self.gate is not None:
            scores = self.gate(x)
            top = scores.topk(self.active, dim=-1)
            weights = torch.zeros_like(scores).scatter(-1, top.indices, torch.softmax(top.values, -1) * self.active)
            low = low * weights
        return self.base(x) + self.scale * (low @ self.lora_b.T)

    def merged(self) -> nn.Linear:
        """The plain linear layer with the update folded in (plain LoRA only)."""
        if self.gate is not None:
            raise ValueError("a SMoRA adapter's update depends on its input: it cannot be merged into one weight")
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        with torch.no_grad():
            linear.weight.copy_(self.base.weight + self.scale * self.lora_b @ self.lora_a)
            if self.base.bias is not None:
                linear.bias.copy_(self.base.bias)
        return linear.to(self.base.weight.device, self.base.weight.dtype)


def add_lora(trunk: nn.Module, options: Mapping) -> list[str]:
    """Wrap the chosen projections of every trunk block in adapters; returns the wrapped modules' names."""
    wrapped = []
    suffixes = tuple(s for t in options["targets"] for s in TARGETS[t])
    for name, module in list(trunk.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".", 1)[-1].endswith(suffixes) and "experts" not in name:
            parent_name, _, child = name.rpartition(".")
            parent = trunk.get_submodule(parent_name) if parent_name else trunk
            setattr(
                parent,
                child,
                LoRALinear(
                    module, int(options["rank"]), float(options["alpha"]), options["experts"], options["dropout"]
                ),
            )
            wrapped.append(name)
    return wrapped


def merge_lora(model: nn.Module) -> int:
    """Fold every plain LoRA adapter of `model` into its linear layer, in place; returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merged())
            count += 1
    return count


def merge_lora_checkpoint(source: str | Path, out: str | Path) -> Path:
    """A LoRA fine-tuned checkpoint → one without adapters (weights folded in, `lora` off), which loads
    wherever a checkpoint does. `out` must not exist (nothing already written is replaced)."""
    from biofm.platform.checkpoint import biofm_schema, safe_load
    from biofm.platform.sdk import load_module

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another path for the merged checkpoint")
    checkpoint = safe_load(source)
    biofm_schema(checkpoint, source)
    if not (checkpoint["hyper_parameters"] or {}).get("lora"):
        raise ValueError(f"{source} has no LoRA adapters (its model.lora is off): nothing to merge")
    module = load_module(source)
    merge_lora(module.model)
    hparams = {**checkpoint["hyper_parameters"], "lora": None, "init_from": None}
    merged = {
        "state_dict": {f"model.{k}": v for k, v in module.model.state_dict().items()},
        "hyper_parameters": hparams,
        "epoch": checkpoint.get("epoch"),
        "global_step": checkpoint.get("global_step"),
        "pytorch-lightning_version": checkpoint.get("pytorch-lightning_version"),
    }
    merged["state_dict"].update({k: v for k, v in checkpoint["state_dict"].items() if not k.startswith("model.")})
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(merged, partial)
    partial.replace(out)
    return out
