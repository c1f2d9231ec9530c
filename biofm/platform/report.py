"""The test report: per task and source the metrics, and the plots people look at — ROC and PR curves and a
reliability diagram (binary, multilabel), predicted against true values (regression), a confusion matrix
(multiclass, ordinal) — as PNGs and one self-contained `report.html` (images embedded, nothing fetched).

`biofm test` writes it under `<run dir>/report/` from the test predictions it kept (`test_outputs.npz`: the
predictions, labels and source of each labelled test sample — no sample id); `biofm report RUN_DIR` builds it
again from that file and `test_metrics.json`.
"""

from __future__ import annotations

import base64
import html
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

REPORT_DIR = "report"
OUTPUTS = "test_outputs.npz"


class TestOutputs:
    """Per task, the labelled test samples' predictions (probabilities, or values in original units), labels
    and sources, gathered batch by batch."""

    def __init__(self):
        self.parts: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))

    def add(self, task: str, kind, logits: torch.Tensor, target: torch.Tensor, source: str) -> None:
        target = target.detach().float().cpu()
        rows = ~torch.isnan(target.reshape(len(target), -1)).all(dim=1)
        if not rows.any():
            return
        predicted = {k: v.detach().float().cpu() for k, v in kind.predict(logits.detach()[rows]).items()}
        part = self.parts[task]
        part["target"].append(target[rows].numpy())
        part["value"].append((predicted["probs"] if "probs" in predicted else predicted["prediction"]).numpy())
        part["source"].append(np.full(int(rows.sum()), source, dtype=object))

    def arrays(self) -> dict[str, np.ndarray]:
        """`<task>/target`, `<task>/value`, `<task>/source` (every rank's, when distributed)."""
        out = {}
        for task, part in self.parts.items():
            for name, values in part.items():
                out[f"{task}/{name}"] = np.concatenate(values)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, out)
            keys = sorted({k for g in gathered for k in g})
            out = {k: np.concatenate([g[k] for g in gathered if k in g]) for k in keys}
        return out


def save_outputs(run_dir: str | Path, arrays: dict[str, np.ndarray], tasks: dict[str, dict]) -> Path:
    """`<run dir>/report/test_outputs.npz` with the tasks' specs (kind, classes, unit) beside the arrays."""
    folder = Path(run_dir) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    specs = {t: {k: s.get(k) for k in ("kind", "classes", "unit")} for t, s in tasks.items()}
    stored = {k: (v.astype(str) if v.dtype == object else v) for k, v in arrays.items()}
    path = folder / OUTPUTS
    np.savez_compressed(path, __specs__=np.array(json.dumps(specs)), **stored)
    return path


def load_outputs(run_dir: str | Path) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    path = Path(run_dir) / REPORT_DIR / OUTPUTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no test outputs; run `biofm test` on this run directory first")
    with np.load(path, allow_pickle=False) as data:
        specs = json.loads(str(data["__specs__"]))
        per_task: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        for key in data.files:
            if key != "__specs__":
                task, name = key.rsplit("/", 1)
                per_task[task][name] = data[key]
    return specs, dict(per_task)


# ---- plots ----------------------------------------------------------------------------------------------------


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


# ---- the report -----------------------------------------------------------------------------------------------


def build_report(run_dir: str | Path, title: str | None = None) -> Path:
    """PNGs per task and `report.html` from `<run dir>/report/test_outputs.npz` and `test_metrics.json`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    specs, outputs = load_outputs(run_dir)
    metrics_path = run_dir / "test_metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    folder = run_dir / REPORT_DIR
    images = []
    for task, part in outputs.items():
        spec = specs.get(task) or {}
        figure = FIGURES.get(spec.get("kind"))
        if figure is None or not len(part.get("target", [])):
            continue
        fig = figure(task, spec, part)
        fig.tight_layout()
        path = folder / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images.append((task, spec["kind"], path))
    page = folder / "report.html"
    page.write_text(_html(title or "biofm test report", metrics, images), encoding="utf-8")
    return page


def _html(title: str, metrics: dict, images: list[tuple[str, str, Path]]) -> str:
    pooled, by_source = {}, defaultdict(dict)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] not in ("macro", "pretext") and key.split("/", 1)[1] in metrics:
            by_source[parts[0]]["/".join(parts[1:])] = value
        else:
            pooled[key] = value
    sources = sorted(by_source)

    def cell(value) -> str:
        return "–" if value is None or (isinstance(value, float) and not math.isfinite(value)) else f"{value:.4g}"

    head = "".join(
        f"<th>{html.escape(s)}</th>" for s in ["task / metric", "all sources" if sources else "value", *sources]
    )
    rows = "".join(
        "<tr>"
        + f"<td>{html.escape(k)}</td><td>{cell(pooled[k])}</td>"
        + "".join(f"<td>{cell(by_source[s].get(k))}</td>" for s in sources)
        + "</tr>"
        for k in sorted(pooled, key=lambda k: (k.startswith("macro/"), k))
        if not k.endswith("_n")
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(task)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(task)} ({kind})</figcaption></figure>'
        for task, kind, path in images
    )
    style = (
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}td:first-child,th:first-child{text-align:left}"
        "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Test metrics pooled over the sources and per source (– : undefined for these samples, e.g. one class "
        "only). Plots show every labelled test sample.</p>"
        f"<table><tr>{head}</tr>{rows}</table><h2>Per task</h2>{figures}</body></html>"
    )


def write_report(run_dir: str | Path, arrays: dict[str, np.ndarray], tasks: dict[str, dict]) -> Path | None:
    """Save the test outputs and build the report (rank 0 only: the arrays are every rank's)."""
    if not arrays:
        return None
    save_outputs(run_dir, arrays, tasks)
    return build_report(run_dir)
