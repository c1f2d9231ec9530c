"""Per-task metrics with torchmetrics (synced across DDP ranks), missing labels ignored, and a macro summary.

Names: `<task>/auroc`, `<task>/auprc`, `<task>/accuracy` for classification, `<task>/rmse`, `<task>/mae`,
`<task>/r2` for regression (original units), `<task>/accuracy`, `<task>/mae` for ordinal levels; then
`macro/auroc`, `macro/r2` and `macro/score` (the mean over tasks of AUROC, R² or ordinal accuracy).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score
from torchmetrics.classification import (BinaryAccuracy, BinaryAUROC, BinaryAveragePrecision, MulticlassAccuracy,
                                         MulticlassAUROC, MulticlassAveragePrecision, MultilabelAccuracy,
                                         MultilabelAUROC, MultilabelAveragePrecision)

from biofm.tasks.kinds import TaskKind

PRIMARY = {"binary": "auroc", "multiclass": "auroc", "multilabel": "auroc", "regression": "r2",
           "ordinal": "accuracy"}
IGNORE = -1


def _collection(kind: TaskKind) -> MetricCollection:
    n = len(kind.classes)
    if kind.name == "binary":
        return MetricCollection({"auroc": BinaryAUROC(ignore_index=IGNORE),
                                 "auprc": BinaryAveragePrecision(ignore_index=IGNORE),
                                 "accuracy": BinaryAccuracy(ignore_index=IGNORE)})
    if kind.name == "multiclass":
        return MetricCollection({"auroc": MulticlassAUROC(n, ignore_index=IGNORE),
                                 "auprc": MulticlassAveragePrecision(n, ignore_index=IGNORE),
                                 "accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE)})
    if kind.name == "multilabel":
        return MetricCollection({"auroc": MultilabelAUROC(n, ignore_index=IGNORE),
                                 "auprc": MultilabelAveragePrecision(n, ignore_index=IGNORE),
                                 "accuracy": MultilabelAccuracy(n, ignore_index=IGNORE)})
    if kind.name == "ordinal":
        return MetricCollection({"accuracy": MulticlassAccuracy(n, average="micro", ignore_index=IGNORE),
                                 "mae": MeanAbsoluteError()})
    return MetricCollection({"rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError(),
                             "r2": R2Score()})


class TaskMetrics(nn.Module):
    def __init__(self, kinds: dict[str, TaskKind]):
        super().__init__()
        self.kinds = kinds
        self.metrics = nn.ModuleDict({task: _collection(kind) for task, kind in kinds.items()})
        self._seen: dict[str, int] = {}

    def update(self, task: str, logits: torch.Tensor, target: torch.Tensor) -> None:
        kind, metrics = self.kinds[task], self.metrics[task]
        present = ~torch.isnan(target)
        if not present.any():
            return
        self._seen[task] = self._seen.get(task, 0) + int(present.sum())
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

    def compute(self) -> dict[str, float]:
        """Metrics of every task that had labels (on any rank), then the macro summary."""
        results: dict[str, float] = {}
        seen = self._seen_everywhere()
        for task, metrics in self.metrics.items():
            if not seen.get(task):
                continue
            for name, metric in metrics.items():
                # R² of one sample is undefined (a tiny validation split): NaN, left out of the macro
                too_few = name == "r2" and seen[task] < 2
                results[f"{task}/{name}"] = float("nan") if too_few else float(metric.compute())
        for name in ("auroc", "r2"):
            values = [v for k, v in results.items() if k.endswith(f"/{name}") and math.isfinite(v)]
            if values:
                results[f"macro/{name}"] = sum(values) / len(values)
        primary = [results[f"{t}/{PRIMARY[k.name]}"] for t, k in self.kinds.items()
                   if f"{t}/{PRIMARY[k.name]}" in results and math.isfinite(results[f"{t}/{PRIMARY[k.name]}"])]
        if primary:
            results["macro/score"] = sum(primary) / len(primary)
        return results

    def _seen_everywhere(self) -> dict[str, int]:
        counts = torch.tensor([self._seen.get(t, 0) for t in self.kinds], dtype=torch.long)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            nccl = torch.distributed.get_backend() == "nccl"
            counts = counts.to("cuda" if nccl else "cpu")
            torch.distributed.all_reduce(counts)
        return dict(zip(self.kinds, counts.cpu().tolist()))

    def reset(self) -> None:
        for metrics in self.metrics.values():
            metrics.reset()
        self._seen = {}
