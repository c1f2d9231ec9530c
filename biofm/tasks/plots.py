"""The test report's plot of each task kind: ROC, precision–recall and reliability (binary, multilabel),
predicted against true values (regression), a confusion matrix (multiclass, ordinal). `platform/report.py`
calls them by kind name; matplotlib is imported when a plot is made."""

from __future__ import annotations

import numpy as np
import torch


def _curves(scores: np.ndarray, labels: np.ndarray) -> tuple[tuple, tuple, float, float] | None:
    """(fpr, tpr), (recall, precision), AUROC, AUPRC of one binary problem; None with one class only."""
    from torchmetrics.functional.classification import (
        binary_auroc,
        binary_average_precision,
        binary_precision_recall_curve,
        binary_roc,
    )

    keep = ~np.isnan(labels)
    scores, labels = torch.from_numpy(scores[keep]).float(), torch.from_numpy(labels[keep]).long()
    if len(labels) == 0 or labels.min() == labels.max():
        return None
    fpr, tpr, _ = binary_roc(scores, labels)
    precision, recall, _ = binary_precision_recall_curve(scores, labels)
    return (
        (fpr.numpy(), tpr.numpy()),
        (recall.numpy(), precision.numpy()),
        float(binary_auroc(scores, labels)),
        float(binary_average_precision(scores, labels)),
    )


def _reliability(ax, scores: np.ndarray, labels: np.ndarray, bins: int = 10) -> None:
    keep = ~np.isnan(labels)
    scores, labels = scores[keep], labels[keep]
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(scores, edges) - 1, 0, bins - 1)
    mean_p = [scores[which == b].mean() for b in range(bins) if (which == b).any()]
    frac = [labels[which == b].mean() for b in range(bins) if (which == b).any()]
    count = [int((which == b).sum()) for b in range(bins) if (which == b).any()]
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1, label="perfectly calibrated")
    ax.plot(mean_p, frac, marker="o", label="model")
    for x, y, n in zip(mean_p, frac, count):
        ax.annotate(str(n), (x, y), textcoords="offset points", xytext=(0, 5), fontsize=7, ha="center")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="mean predicted probability", ylabel="fraction of positives")
    ax.set_title("reliability (samples per bin)")
    ax.legend(loc="upper left", fontsize=8)


def _classification_figure(task: str, spec: dict, part: dict):
    import matplotlib.pyplot as plt

    value, target = part["value"], part["target"]
    if spec["kind"] == "binary":
        problems = {"": (value[:, 1], target)}
    else:  # multilabel: one problem per class
        classes = spec.get("classes") or [str(i) for i in range(value.shape[1])]
        problems = {str(c): (value[:, i], target[:, i]) for i, c in enumerate(classes)}
    fig, (roc, pr, rel) = plt.subplots(1, 3, figsize=(15, 4.6))
    scores_all, labels_all = [], []
    for name, (scores, labels) in problems.items():
        curves = _curves(scores, labels)
        scores_all.append(scores)
        labels_all.append(labels)
        if curves is None:
            continue
        (fpr, tpr), (recall, precision), auroc, auprc = curves
        prefix = f"{name}: " if name else ""
        roc.plot(fpr, tpr, label=f"{prefix}AUROC {auroc:.3f}")
        pr.plot(recall, precision, label=f"{prefix}AUPRC {auprc:.3f}")
    roc.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC", xlim=(0, 1), ylim=(0, 1.01))
    pr.set(xlabel="recall", ylabel="precision", title="precision–recall", xlim=(0, 1), ylim=(0, 1.01))
    for ax in (roc, pr):
        ax.legend(loc="lower right" if ax is roc else "lower left", fontsize=8)
    _reliability(rel, np.concatenate(scores_all), np.concatenate(labels_all))
    fig.suptitle(f"{task} ({spec['kind']}, {len(target)} test samples)")
    return fig


def _regression_figure(task: str, spec: dict, part: dict):
    import matplotlib.pyplot as plt

    value, target = part["value"].reshape(-1), part["target"].reshape(-1)
    unit = f" ({spec['unit']})" if spec.get("unit") else ""
    fig, ax = plt.subplots(figsize=(5.5, 5.2))
    sources = part.get("source")
    names = sorted(set(sources.tolist())) if sources is not None else [""]
    for name in names:
        rows = sources == name if sources is not None else slice(None)
        ax.scatter(target[rows], value[rows], s=10, alpha=0.6, label=name if len(names) > 1 else None)
    lo, hi = float(np.nanmin([target.min(), value.min()])), float(np.nanmax([target.max(), value.max()]))
    ax.plot([lo, hi], [lo, hi], ls="--", c="grey", lw=1, label="identity")
    rmse = float(np.sqrt(np.mean((value - target) ** 2)))
    ax.set(xlabel=f"true {task}{unit}", ylabel=f"predicted {task}{unit}")
    ax.set_title(f"{task}: RMSE {rmse:.3g}{unit}, {len(target)} test samples")
    ax.legend(fontsize=8)
    return fig


def _confusion_figure(task: str, spec: dict, part: dict):
    import matplotlib.pyplot as plt

    classes = [str(c) for c in spec.get("classes") or []]
    value, target = part["value"], part["target"].astype(int)
    predicted = value.argmax(axis=1) if value.ndim == 2 else value.astype(int)
    n = max(len(classes), int(max(predicted.max(), target.max())) + 1)
    classes = classes or [str(i) for i in range(n)]
    counts = np.zeros((n, n), dtype=int)
    np.add.at(counts, (target, predicted), 1)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 1.0 * n + 2.2))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=classes, yticklabels=classes)
    ax.set(xlabel="predicted class", ylabel="true class")
    ax.set_title(f"{task} ({spec['kind']}): confusion, {len(target)} test samples")
    fig.colorbar(image, ax=ax, label="share of the true class")
    return fig


FIGURES = {
    "binary": _classification_figure,
    "multilabel": _classification_figure,
    "regression": _regression_figure,
    "multiclass": _confusion_figure,
    "ordinal": _confusion_figure,
}
