"""Task kinds: what a head outputs, how its loss masks missing labels, how predictions read.

A task's spec is plain JSON (`{"kind": ..., "classes": [...], "unit": ..., "scaler": [mean, std]}`),
stored in the store's attributes and the checkpoint. Labels are float32 with NaN for missing.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from biofm.platform.registry import Registry

TASK_KINDS: Registry[TaskKind] = Registry("task kind", plugins="biofm.tasks.kinds")


class LabelError(ValueError):
    """Labels do not fit the kind of their task's head."""


class TaskKind:
    name: ClassVar[str]

    def __init__(self, task: str, spec: dict):
        self.task, self.spec = task, dict(spec)
        self.classes: list[str] = list(spec.get("classes") or [])

    @property
    def out_dim(self) -> int:
        return 1

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        """Raise LabelError when present labels cannot be targets of this head."""

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean loss over present labels (and how many there were); (0, 0) when none is present."""
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """`prediction` (class index or value in original units) and, for classification, `probs`."""
        raise NotImplementedError

    def _bad(self, where: str, what: str) -> LabelError:
        return LabelError(f"{where}: labels of task '{self.task}' do not fit a {self.name} head: {what}")


def _masked(loss_fn, logits, target):
    """loss_fn over the present labels only (NaN = missing; per cell for multilabel)."""
    present = ~torch.isnan(target)
    n = int(present.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return loss_fn(logits[present], target[present]), n


def _check_values(kind: TaskKind, labels: np.ndarray, allowed: set[float] | None, where: str,
                  upper: int | None = None) -> None:
    values = labels[~np.isnan(labels)]
    if allowed is not None:
        bad = set(np.unique(values).tolist()) - allowed
        if bad:
            raise kind._bad(where, f"found values {sorted(bad)[:5]}, expected {sorted(allowed)} or NaN")
    if upper is not None and len(values):
        if values.min() < 0 or values.max() >= upper or np.any(values != np.round(values)):
            raise kind._bad(where, f"expected class indices 0..{upper - 1} (classes {kind.classes}), "
                                   f"found values in [{values.min()}, {values.max()}]")


@TASK_KINDS.register("binary")
class Binary(TaskKind):
    def check_labels(self, labels, where):
        if labels.ndim != 1:
            raise self._bad(where, f"expected one label per sample, got shape {labels.shape}")
        _check_values(self, labels, {0.0, 1.0}, where)

    def loss(self, logits, target):
        return _masked(F.binary_cross_entropy_with_logits, logits[:, 0], target)

    def predict(self, logits):
        p = torch.sigmoid(logits[:, 0])
        return {"prediction": (p > 0.5).long(), "probs": torch.stack([1 - p, p], dim=1)}


@TASK_KINDS.register("multiclass")
class Multiclass(TaskKind):
    @property
    def out_dim(self):
        return len(self.classes)

    def check_labels(self, labels, where):
        if labels.ndim != 1:
            raise self._bad(where, f"expected one class index per sample, got shape {labels.shape}")
        _check_values(self, labels, None, where, upper=len(self.classes))

    def loss(self, logits, target):
        return _masked(lambda x, y: F.cross_entropy(x, y.long()), logits, target)

    def predict(self, logits):
        probs = torch.softmax(logits, dim=1)
        return {"prediction": probs.argmax(dim=1), "probs": probs}


@TASK_KINDS.register("multilabel")
class Multilabel(TaskKind):
    @property
    def out_dim(self):
        return len(self.classes)

    def check_labels(self, labels, where):
        if labels.ndim != 2 or labels.shape[1] != len(self.classes):
            raise self._bad(where, f"expected [N, {len(self.classes)}] labels, got shape {labels.shape}")
        _check_values(self, labels, {0.0, 1.0}, where)

    def loss(self, logits, target):
        return _masked(F.binary_cross_entropy_with_logits, logits, target)

    def predict(self, logits):
        probs = torch.sigmoid(logits)
        return {"prediction": (probs > 0.5).long(), "probs": probs}


@TASK_KINDS.register("regression")
class Regression(TaskKind):
    """Trained on standardised targets; `scaler` [mean, std] comes from the training labels and is undone
    at prediction, so predictions are in the task's original units."""

    @property
    def scaler(self) -> tuple[float, float]:
        mean, std = self.spec.get("scaler") or (0.0, 1.0)
        return float(mean), float(std) if std else 1.0

    def check_labels(self, labels, where):
        if labels.ndim != 1:
            raise self._bad(where, f"expected one value per sample, got shape {labels.shape}")
        if np.isinf(labels).any():
            raise self._bad(where, "found infinite values")

    def loss(self, logits, target):
        mean, std = self.scaler
        return _masked(F.mse_loss, logits[:, 0], (target - mean) / std)

    def predict(self, logits):
        mean, std = self.scaler
        return {"prediction": logits[:, 0] * std + mean}


@TASK_KINDS.register("ordinal")
class Ordinal(TaskKind):
    """Cumulative logits: output k is P(y > k); the predicted level counts outputs above 1/2."""

    @property
    def out_dim(self):
        return len(self.classes) - 1

    def check_labels(self, labels, where):
        if labels.ndim != 1:
            raise self._bad(where, f"expected one level per sample, got shape {labels.shape}")
        _check_values(self, labels, None, where, upper=len(self.classes))

    def loss(self, logits, target):
        levels = torch.arange(self.out_dim, device=logits.device)

        def cumulative(x, y):
            return F.binary_cross_entropy_with_logits(x, (y.unsqueeze(1) > levels).float())
        return _masked(cumulative, logits, target)

    def predict(self, logits):
        above = torch.sigmoid(logits)  # [B, C-1]
        ones = torch.ones_like(above[:, :1])
        cdf = torch.cat([ones, above, torch.zeros_like(ones)], dim=1)
        probs = (cdf[:, :-1] - cdf[:, 1:]).clamp_min(0)
        probs = probs / probs.sum(dim=1, keepdim=True).clamp_min(1e-8)
        return {"prediction": (above > 0.5).sum(dim=1), "probs": probs}


def task_kind(task: str, spec: dict) -> TaskKind:
    return TASK_KINDS.resolve(spec["kind"])(task, spec)
