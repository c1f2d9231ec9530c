"""Per-task metrics with torchmetrics (synced across DDP ranks), missing labels ignored, and a macro summary.

Names: `<task>/auroc`, `<task>/auprc`, `<task>/accuracy` for classification, `<task>/rmse`, `<task>/mae`,
`<task>/r2` for regression (original units), `<task>/accuracy`, `<task>/mae` for ordinal levels; then
`macro/auroc`, `macro/r2` and `macro/score` (the mean over tasks of AUROC, R² or ordinal accuracy), each with
`macro/<name>_n`, the number of tasks that entered it.

A metric that cannot be computed is NaN, never 0: AUROC needs both classes (per class, one against the rest,
for multiclass and multilabel tasks: a class without positives or without negatives is left out of the
mean over classes), AUPRC needs positives, R² two labels that differ. NaN metrics are left out of the macro
means. A split whose labels make a metric undefined is named once per task in a warning with its label
counts; one that holds fewer than `FEW` labels of a class, or whose AUROC is the mean over some classes only,
gets a note (`TaskMetrics.notes`: logged at debug level, and listed in the test report) — the value is defined,
only noisy, so it is not a warning.
"""

from __future__ import annotations

import logging
import math
import warnings

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import (
    BinaryAccuracy,
    BinaryAUROC,
    BinaryAveragePrecision,
    MulticlassAccuracy,
    MulticlassAUROC,
    MulticlassAveragePrecision,
    MultilabelAccuracy,
    MultilabelAUROC,
    MultilabelAveragePrecision,
)

from biofm.tasks.kinds import TaskKind

PRIMARY = {"binary": "auroc", "multiclass": "auroc", "multilabel": "auroc", "regression": "r2", "ordinal": "accuracy"}
IGNORE = -1
FEW = 5  # fewer labels of a class than this: its metrics are noisy, and said so
log = logging.getLogger("biofm")


def _collection(kind: TaskKind) -> MetricCollection:
    n = len(kind.classes)
    if kind.name == "binary":
        return MetricCollection(
            {
                "auroc": BinaryAUROC(ignore_index=IGNORE),
                "auprc": BinaryAveragePrecision(ignore_index=IGNORE),
                "accuracy": BinaryAccuracy(ignore_index=IGNORE),
            }
        )
    if kind.name == "multiclass":  # per class (average=None): classes absent from the labels are left out
        return MetricCollection(
            {
                "auroc": MulticlassAUROC(n, average=None, ignore_index=IGNORE),
                "auprc": MulticlassAveragePrecision(n, average=None, ignore_index=IGNORE),
                "accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE),
            }
        )
    if kind.name == "multilabel":
        return MetricCollection(
            {
                "auroc": MultilabelAUROC(n, average=None, ignore_index=IGNORE),
                "auprc": MultilabelAveragePrecision(n, average=None, ignore_index=IGNORE),
                "accuracy": MultilabelAccuracy(n, ignore_index=IGNORE),
            }
        )
    if kind.name == "ordinal":
        return MetricCollection(
            {"accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE), "mae": MeanAbsoluteError()}
        )
    return MetricCollection({"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError(), "r2": R2Score()})


def _count_width(kind: TaskKind) -> int:
    """Length of a task's label counts: per class (binary: negatives, positives; multilabel: negatives then
    positives per label), or n, Σy, Σy² for regression."""
    n = len(kind.classes)
    return {"binary": 2, "multiclass": n, "ordinal": n, "multilabel": 2 * n}.get(kind.name, 3)


class TaskMetrics(nn.Module):
    def __init__(self, kinds: dict[str, TaskKind], name: str = "val"):
        super().__init__()
        self.kinds, self.name = kinds, name
        self.metrics = nn.ModuleDict({task: _collection(kind) for task, kind in kinds.items()})
        self._counts: dict[str, torch.Tensor] = {}
        self._warned: set[str] = set()
        self.notes: dict[str, str] = {}  # task → what its label counts leave undefined or noisy (once per task)

    def update(self, task: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        kind, metrics = self.kinds[task], self.metrics[task]
        present = ~torch.isnan(target)
        if not present.any():
            return
        self._count(task, kind, target.detach(), present)
        out = kind.predict(logits.detach().float())
        if kind.name in ("regression", "ordinal"):
            rows = present if present.dim() == 1 else present.all(dim=1)
            if kind.name == "regression":
                metrics.update(out["prediction"][rows], target[rows])
            else:
                metrics["accuracy"].update(out["prediction"][rows], target[rows].long())
                metrics["mae"].update(out["prediction"][rows].float(), target[rows])
            return
        labels = torch.where(present, target, torch.full_like(target, IGNORE)).long()
        scores = out["probs"][:, 1] if kind.name == "binary" else out["probs"]
        metrics.update(scores, labels)

    def _count(self, task: str, kind: TaskKind, target: torch.Tensor, present: torch.Tensor) -> None:
        values = target[present].double().cpu()
        if kind.name == "regression":
            counts = torch.stack(
                [torch.tensor(float(len(values)), dtype=torch.float64), values.sum(), (values**2).sum()]
            )
        elif kind.name == "multilabel":
            cells = present.cpu()
            positives = (torch.nan_to_num(target.cpu(), nan=0.0) * cells).sum(dim=0).double()
            counts = torch.cat([cells.sum(dim=0).double() - positives, positives])
        else:
            counts = torch.bincount(values.long(), minlength=_count_width(kind)).double()
        self._counts[task] = self._counts.get(task, torch.zeros(_count_width(kind), dtype=torch.float64)) + counts

    def counts(self) -> dict[str, list[float]]:
        """Every task's label counts over all ranks (see `_count_width`)."""
        flat = (
            torch.cat(
                [self._counts.get(t, torch.zeros(_count_width(k), dtype=torch.float64)) for t, k in self.kinds.items()]
            )
            if self.kinds
            else torch.zeros(0, dtype=torch.float64)
        )
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            nccl = torch.distributed.get_backend() == "nccl"
            flat = flat.to("cuda" if nccl else "cpu")
            torch.distributed.all_reduce(flat)
        out, offset = {}, 0
        for task, kind in self.kinds.items():
            width = _count_width(kind)
            out[task] = flat[offset : offset + width].cpu().tolist()
            offset += width
        return out

    def compute(self) -> dict[str, float]:
        """Metrics of every task that had labels (on any rank), undefined ones NaN, then the macro summary."""
        results: dict[str, float] = {}
        counts = self.counts()
        for task, metrics in self.metrics.items():
            kind, count = self.kinds[task], counts[task]
            labelled = count[0] if kind.name == "regression" else sum(count) / (2 if kind.name == "multilabel" else 1)
            if not labelled:
                continue
            values = {name: _compute(metric) for name, metric in metrics.items()}
            for name, value in values.items():
                results[f"{task}/{name}"] = _defined(kind, name, value, count)
            self._warn(task, kind, count, results)
        for name in ("auroc", "r2"):
            values = [v for k, v in results.items() if k.endswith(f"/{name}") and math.isfinite(v)]
            if values:
                results[f"macro/{name}"] = sum(values) / len(values)
                results[f"macro/{name}_n"] = float(len(values))
        primary = [
            results[f"{t}/{PRIMARY[k.name]}"]
            for t, k in self.kinds.items()
            if math.isfinite(results.get(f"{t}/{PRIMARY[k.name]}", float("nan")))
        ]
        if results:
            results["macro/score"] = sum(primary) / len(primary) if primary else float("nan")
            results["macro/score_n"] = float(len(primary))
        return results

    def _warn(self, task: str, kind: TaskKind, count: list[float], results: dict[str, float]) -> None:
        """Once per task: a split whose labels leave a metric undefined, or hold fewer than FEW of a class."""
        if task in self._warned:
            return
        undefined = [
            name.split("/")[1] for name, value in results.items() if name.startswith(f"{task}/") and math.isnan(value)
        ]
        if kind.name == "regression":
            few, described = count[0] < FEW, f"{int(count[0])} labels"
        else:
            classes = kind.classes or ["0", "1"]
            if kind.name == "multilabel":
                n = len(classes)
                per = [f"{c}: {int(count[n + j])} positive, {int(count[j])} negative" for j, c in enumerate(classes)]
                few = min(count) < FEW
            else:
                per = [f"{int(c)} of class {name}" for name, c in zip(classes, count)]
                few = min(count) < FEW
            described = ", ".join(per)
        partial = ""
        if kind.name in ("multiclass", "multilabel") and "auroc" not in undefined:
            n = len(kind.classes)
            positives = count[n:] if kind.name == "multilabel" else count
            negatives = count[:n] if kind.name == "multilabel" else [sum(count) - c for c in count]
            both = sum(1 for p, q in zip(positives, negatives) if p > 0 and q > 0)
            if both < n:
                partial = (
                    f"; its AUROC is the mean over the {both} of {n} "
                    f"{'labels' if kind.name == 'multilabel' else 'classes'} that have both positives and "
                    "negatives"
                )
        if undefined or few or partial:
            self._warned.add(task)
            what = (
                f"its {', '.join(undefined)} {'is' if len(undefined) == 1 else 'are'} undefined (NaN) and left "
                "out of the macro means"
                if undefined
                else "its metrics rest on few labels"
                if few
                else "its metrics are defined"
            ) + partial
            message = f"{self.name} split: task '{task}' has {described}: {what}"
            self.notes[task] = message
            if undefined:
                warnings.warn(message, UserWarning, stacklevel=2)
            else:
                log.debug(message)

    def forget(self) -> None:
        """Forget what was said (after Lightning's sanity check, whose batches neither warn nor count)."""
        self._warned.clear()
        self.notes.clear()

    def reset(self) -> None:
        """A new epoch's state; what was said (`notes`) stays: each task is named once per run."""
        for metrics in self.metrics.values():
            metrics.reset()
        self._counts = {}


def _compute(metric) -> torch.Tensor:
    """A torchmetrics value; NaN where torchmetrics refuses (R² of one sample). Its warnings on undefined
    cases are silenced: `_defined` decides those from the label counts."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return metric.compute()
        except (ValueError, RuntimeError, ZeroDivisionError):
            return torch.tensor(float("nan"))


def _defined(kind: TaskKind, name: str, value: torch.Tensor, count: list[float]) -> float:
    """A metric's value, NaN where the labels do not define it (see the module's doc)."""
    if kind.name == "regression":
        n, total, squares = count
        variance = squares / n - (total / n) ** 2 if n else 0.0
        if name == "r2" and (n < 2 or variance <= 1e-12 * max(1.0, squares / n)):
            return float("nan")
        return float(value)
    if name not in ("auroc", "auprc"):
        return float(value)
    if kind.name == "binary":
        negatives, positives = count
        ok = positives > 0 and (negatives > 0 or name == "auprc")
        return float(value) if ok else float("nan")
    per_class = value.double().reshape(-1)
    if kind.name == "multilabel":
        n = len(per_class)
        negatives, positives = torch.tensor(count[:n]), torch.tensor(count[n:])
    else:
        positives = torch.tensor(count, dtype=torch.float64)
        negatives = positives.sum() - positives
    valid = (positives > 0) & ((negatives > 0) | (name == "auprc"))
    return float(per_class[valid].mean()) if valid.any() else float("nan")
