"""Task kinds: what a head outputs, how its loss masks missing labels, how predictions read.

A task's spec is plain JSON (`{"kind": ..., "classes": [...], "unit": ..., "scaler": [mean, std]}`),
stored in the store's attributes and the checkpoint. Labels are float32 with NaN for missing. Everything
that depends on the kind lives on its class — the spec's checks, the label width in a store, what is
learned from training labels, the prediction columns, pseudo-labelling — so the store, the training module
and the SDK name no kind.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from biofm.registry import Registry

TASK_KINDS: Registry[TaskKind] = Registry("task kind", plugins="biofm.tasks.kinds")


class LabelError(ValueError):
    """Labels do not fit the kind of their task's head."""


class SpecError(ValueError):
    """A task spec that no head of its kind can be built from."""


class TaskKind:
    name: ClassVar[str]
    needs_classes: ClassVar[bool] = False  # the spec names its classes (at least two)
    multilabel: ClassVar[bool] = False  # labels are [N, n_classes] (one 0/1 per class) instead of [N]

    def __init__(self, task: str, spec: dict):
        self.task, self.spec = task, dict(spec)
        self.classes: list[str] = list(spec.get("classes") or [])

    @property
    def out_dim(self) -> int:
        return 1

    # ---- the spec, as a store declares it
    @classmethod
    def check_spec(cls, task: str, spec: dict) -> dict:
        """The spec, normalised (class names as strings, `n_classes`); SpecError when it cannot work."""
        if cls.needs_classes:
            classes = spec.get("classes")
            if not classes or len(classes) < 2:
                raise SpecError(f"{cls.name} task '{task}' needs 'classes' (at least two names)")
            spec["classes"] = [str(c) for c in classes]
            spec["n_classes"] = len(classes)
        return spec

    @classmethod
    def from_column(cls, task: str, cells: pd.Series) -> tuple[dict, np.ndarray]:
        """The spec and float32 labels (NaN = missing) of a label table's column (`cells`: missing spellings
        already NaN); LabelError naming the row when a cell cannot be a label of this kind. Default: numbers."""
        numbers = pd.to_numeric(cells, errors="coerce")
        bad = np.flatnonzero(numbers.isna().to_numpy() & cells.notna().to_numpy())
        if len(bad):
            raise LabelError(
                f"row {bad[0] + 1}: label '{task}' is {cls.name} but holds {str(cells.iloc[bad[0]])[:40]!r}"
            )
        values = numbers.to_numpy(dtype=np.float32)
        cls(task, {"kind": cls.name}).check_labels(values, f"label '{task}'")
        return {"kind": cls.name}, values

    @classmethod
    def label_width(cls, spec: dict) -> int:
        """Labels per sample in the store: 0 for one value ([N]), else the width of [N, width]."""
        return int(spec["n_classes"]) if cls.multilabel else 0

    @classmethod
    def fit_spec(cls, spec: dict, train_labels: np.ndarray) -> dict:
        """The spec with what is learned from the run's training labels (a regression's scaler). Default:
        nothing to learn."""
        return spec

    def check_labels(self, labels: np.ndarray, where: str) -> None:
        """Raise LabelError when present labels cannot be targets of this head."""

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Mean loss over present labels (and how many there were); (0, 0) when none is present."""
        raise NotImplementedError

    def predict(self, logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """`prediction` (class index or value in original units) and, for classification, `probs`."""
        raise NotImplementedError

    # ---- predictions as columns
    def columns(self, predicted: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
        """`predict`'s output of one batch as named columns: `<task>` (the class name) and per class
        `<task>/prob/<class>`."""
        classes = self.classes or ["0", "1"]
        own = {self.task: np.asarray(classes, dtype=object)[predicted["prediction"].numpy()]}
        return {**own, **self._prob_columns(predicted, classes)}

    def _prob_columns(self, predicted: dict, classes: list[str]) -> dict[str, np.ndarray]:
        if "probs" not in predicted:
            return {}
        probs = predicted["probs"].numpy()
        return {f"{self.task}/prob/{c}": probs[:, j].astype(np.float64) for j, c in enumerate(classes)}

    # ---- semi-supervised training
    can_pseudo_label: ClassVar[bool] = False

    def entropy(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Per-sample entropy of the predicted distribution [B] (a sum over classes of independent flags);
        None for a kind that predicts no probabilities (AdaMerging's objective, `platform/merge.py`)."""
        out = self.predict(logits)
        if "probs" not in out:
            return None
        p = out["probs"].clamp(1e-6, 1 - 1e-6)
        if self.multilabel:
            return -(p * p.log() + (1 - p) * (1 - p).log()).sum(dim=1)
        return -(p * p.log()).sum(dim=1)

    def label_summary(self, values: np.ndarray) -> dict:
        """What `biofm info` says of the present labels: class counts by default."""
        if not len(values):
            return {}
        counts = np.bincount(values.astype(int), minlength=len(self.classes))
        return {
            "classes": {str(self.classes[i]) if i < len(self.classes) else str(i): int(c) for i, c in enumerate(counts)}
        }

    def true_columns(self, target: np.ndarray) -> dict[str, np.ndarray]:
        """The labels beside the predictions: `<task>/true`, a class name (None where missing) or a value."""
        if self.classes:
            return {
                f"{self.task}/true": np.array(
                    [None if np.isnan(v) else self.classes[int(v)] for v in target], dtype=object
                )
            }
        return {f"{self.task}/true": target.astype(np.float64)}

    def pseudo_label(self, logits: torch.Tensor, target: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
        """`target` with its missing labels filled by the model's predictions where their probability is at
        least `threshold`, and how many were filled (kinds with `can_pseudo_label`)."""
        raise NotImplementedError(f"{self.name} tasks take no pseudo-labels")

    def _bad(self, where: str, what: str) -> LabelError:
        return LabelError(f"{where}: labels of task '{self.task}' do not fit a {self.name} head: {what}")


MAX_CLASSES = 50  # distinct values a label column read as classes may have


class _Classes(TaskKind):
    """Labels that are class names: a table column is read as classes over its sorted distinct values."""

    needs_classes = True

    @classmethod
    def from_column(cls, task, cells):
        classes = sorted(cells.dropna().astype(str).unique())
        if len(classes) < 2 or len(classes) > MAX_CLASSES:
            raise LabelError(
                f"label '{task}' has {len(classes)} distinct values; a {cls.name} task needs 2–{MAX_CLASSES}"
            )
        lookup = {c: i for i, c in enumerate(classes)}
        values = np.array([lookup[str(v)] if pd.notna(v) else np.nan for v in cells], dtype=np.float32)
        return {"kind": cls.name, "classes": classes}, values


class _SingleLabel(TaskKind):
    """One class per sample: pseudo-labels are the most probable class where it is probable enough."""

    can_pseudo_label = True

    def pseudo_label(self, logits, target, threshold):
        top, index = self.predict(logits.detach().float())["probs"].max(dim=1)
        confident = torch.isnan(target) & (top >= threshold)
        return torch.where(confident, index.to(target.dtype), target), int(confident.sum())


def _masked(loss_fn, logits, target):
    """loss_fn over the present labels only (NaN = missing; per cell for multilabel)."""
    present = ~torch.isnan(target)
    n = int(present.sum())
    if n == 0:
        return logits.sum() * 0.0, 0
    return loss_fn(logits[present], target[present]), n


def _check_values(
    kind: TaskKind, labels: np.ndarray, allowed: set[float] | None, where: str, upper: int | None = None
) -> None:
    values = labels[~np.isnan(labels)]
    if allowed is not None:
        bad = set(np.unique(values).tolist()) - allowed
        if bad:
            raise kind._bad(where, f"found values {sorted(bad)[:5]}, expected {sorted(allowed)} or NaN")
    if upper is not None and len(values):
        if values.min() < 0 or values.max() >= upper or np.any(values != np.round(values)):
            raise kind._bad(
                where,
                f"expected class indices 0..{upper - 1} (classes {kind.classes}), "
                f"found values in [{values.min()}, {values.max()}]",
            )


@TASK_KINDS.register("binary")
class Binary(_SingleLabel):
    def check_labels(self, labels, where):
        if labels.ndim != 1:
            raise self._bad(where, f"expected one label per sample, got shape {labels.shape}")
        _check_values(self, labels, {0.0, 1.0}, where)

    def loss(self, logits, target):
        return _masked(F.binary_cross_entropy_with_logits, logits[:, 0], target)

    def predict(self, logits):
        p = torch.sigmoid(logits[:, 0])
        return {"prediction": (p > 0.5).long(), "probs": torch.stack([1 - p, p], dim=1)}

    def label_summary(self, values):
        return {"prevalence": round(float(values.mean()), 4)} if len(values) else {}


@TASK_KINDS.register("multiclass")
class Multiclass(_SingleLabel, _Classes):
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
    needs_classes = multilabel = can_pseudo_label = True

    @classmethod
    def from_column(cls, task, cells):
        raise LabelError(f"label '{task}': a multilabel task takes a 0/1 column per class, not one column")

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

    def columns(self, predicted):
        """A flag per class `<task>/<class>` and its probability `<task>/prob/<class>`."""
        pred = predicted["prediction"].numpy()
        own = {f"{self.task}/{c}": pred[:, j].astype(bool) for j, c in enumerate(self.classes)}
        return {**own, **self._prob_columns(predicted, self.classes)}

    def label_summary(self, values):
        return (
            {"prevalence": {str(c): round(float(np.nanmean(values[:, i])), 4) for i, c in enumerate(self.classes)}}
            if len(values)
            else {}
        )

    def true_columns(self, target):
        """`<task>/true/<class>`: 1, 0 or NaN."""
        return {f"{self.task}/true/{c}": target[:, i].astype(np.float64) for i, c in enumerate(self.classes)}

    def pseudo_label(self, logits, target, threshold):
        """Per class: a confident flag (probability ≥ threshold, or ≤ 1 − threshold) fills a missing one."""
        probs = self.predict(logits.detach().float())["probs"]
        confident = torch.isnan(target) & ((probs >= threshold) | (probs <= 1 - threshold))
        return torch.where(confident, (probs >= 0.5).to(target.dtype), target), int(confident.sum())


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

    @classmethod
    def fit_spec(cls, spec, train_labels):
        """`scaler`: the mean and standard deviation of the present training labels (1 when they do not vary)."""
        values = train_labels[~np.isnan(train_labels)]
        std = float(values.std()) if len(values) > 1 else 1.0
        return {**spec, "scaler": [float(values.mean()) if len(values) else 0.0, std if std > 0 else 1.0]}

    def loss(self, logits, target):
        mean, std = self.scaler
        return _masked(F.mse_loss, logits[:, 0], (target - mean) / std)

    def predict(self, logits):
        mean, std = self.scaler
        return {"prediction": logits[:, 0] * std + mean}

    def label_summary(self, values):
        if not len(values):
            return {}
        stats = (("mean", np.mean), ("sd", np.std), ("min", np.min), ("max", np.max))
        return {"range": {k: round(float(f(values)), 4) for k, f in stats}}

    def columns(self, predicted):
        return {self.task: predicted["prediction"].numpy().astype(np.float64)}


@TASK_KINDS.register("ordinal")
class Ordinal(_Classes):
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


def infer_kind(values: np.ndarray) -> str:
    """The kind a numeric label column reads as when none is named: 0/1 values (NaN = missing) binary,
    other numbers regression. (A column of text reads as multiclass over its values.)"""
    values = np.asarray(values, dtype=np.float64)
    present = values[~np.isnan(values)]
    return "binary" if len(present) and set(np.unique(present)) <= {0.0, 1.0} else "regression"


def check_spec(task: str, spec: dict) -> dict:
    """`spec` checked and normalised by its kind; SpecError naming the task when the kind is unknown."""
    kind = spec.get("kind")
    if kind not in TASK_KINDS.names():
        raise SpecError(f"task '{task}' has kind {kind!r}; expected one of {TASK_KINDS.names()}")
    return TASK_KINDS.resolve(kind).check_spec(task, spec)


def label_width(spec: dict) -> int:
    """Labels per sample of a task in a store (see `TaskKind.label_width`)."""
    return TASK_KINDS.resolve(spec["kind"]).label_width(spec)
