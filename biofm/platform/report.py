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

from biofm.tasks.plots import FIGURES

REPORT_DIR = "report"
OUTPUTS = "test_outputs.npz"


class TestOutputs:
    """Per task, the labelled test samples' predictions (probabilities, or values in original units), labels
    and sources, gathered batch by batch."""

    def __init__(self):
        self.parts: dict[str, dict[str, list]] = {}  # plain dicts: the module is pickled for spawned ranks

    def add(self, task: str, kind, logits: torch.Tensor, target: torch.Tensor, source: str) -> None:
        target = target.detach().float().cpu()
        rows = ~torch.isnan(target.reshape(len(target), -1)).all(dim=1)
        if not rows.any():
            return
        predicted = {k: v.detach().float().cpu() for k, v in kind.predict(logits.detach()[rows]).items()}
        part = self.parts.setdefault(task, {"target": [], "value": [], "source": []})
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


def save_outputs(
    run_dir: str | Path, arrays: dict[str, np.ndarray], tasks: dict[str, dict], notes: dict[str, str] | None = None
) -> Path:
    """`<run dir>/report/test_outputs.npz` with the tasks' specs (kind, classes, unit) and the test's notes on
    few labels (`TaskMetrics.notes`) beside the arrays."""
    folder = Path(run_dir) / REPORT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    specs = {t: {k: s.get(k) for k in ("kind", "classes", "unit")} for t, s in tasks.items()}
    stored = {k: (v.astype(str) if v.dtype == object else v) for k, v in arrays.items()}
    path = folder / OUTPUTS
    np.savez_compressed(
        path, __specs__=np.array(json.dumps(specs)), __notes__=np.array(json.dumps(notes or {})), **stored
    )
    return path


def load_outputs(run_dir: str | Path) -> tuple[dict[str, dict], dict[str, dict[str, np.ndarray]]]:
    path = Path(run_dir) / REPORT_DIR / OUTPUTS
    if not path.exists():
        raise FileNotFoundError(f"{path}: no test outputs; run `biofm test` on this run directory first")
    with np.load(path, allow_pickle=False) as data:
        specs = json.loads(str(data["__specs__"]))
        per_task: dict[str, dict[str, np.ndarray]] = defaultdict(dict)
        for key in data.files:
            if key not in ("__specs__", "__notes__"):
                task, name = key.rsplit("/", 1)
                per_task[task][name] = data[key]
    return specs, dict(per_task)


def load_notes(run_dir: str | Path) -> dict[str, str]:
    """The test's notes on few labels saved beside its outputs (none in a report written before them)."""
    with np.load(Path(run_dir) / REPORT_DIR / OUTPUTS, allow_pickle=False) as data:
        return json.loads(str(data["__notes__"])) if "__notes__" in data.files else {}


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
        figure = FIGURES.get(spec.get("kind"))  # one plot per task kind (`biofm.tasks.plots`)
        if figure is None or not len(part.get("target", [])):
            continue
        fig = figure(task, spec, part)
        fig.tight_layout()
        path = folder / f"{task}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        images.append((task, spec["kind"], path))
    page = folder / "report.html"
    page.write_text(_html(title or "biofm test report", metrics, images, load_notes(run_dir)), encoding="utf-8")
    return page


def _html(title: str, metrics: dict, images: list[tuple[str, str, Path]], notes: dict[str, str]) -> str:
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
        + f'<td>{html.escape(k)}</td><td align="right">{cell(pooled[k])}</td>'
        + "".join(f'<td align="right">{cell(by_source[s].get(k))}</td>' for s in sources)
        + "</tr>"
        for k in sorted(pooled, key=lambda k: (k.startswith("macro/"), k))
        if not k.endswith("_n")
    )
    figures = "".join(
        f'<figure><img alt="{html.escape(task)}" src="data:image/png;base64,'
        f'{base64.b64encode(path.read_bytes()).decode()}"><figcaption>{html.escape(task)} ({kind})</figcaption></figure>'
        for task, kind, path in images
    )
    listed = (
        "<h2>Notes on the labels</h2><ul>"
        + "".join(f"<li>{html.escape(note)}</li>" for _, note in sorted(notes.items()))
        + "</ul>"
        if notes
        else ""
    )
    style = (
        "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:3px 8px}"
        "th{background:#f3f3f3}figure{margin:1.5em 0}img{max-width:100%}figcaption{color:#555}"
    )
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        "<p>Test metrics pooled over the sources and per source (– : undefined for these samples, e.g. one class "
        "only). Plots show every labelled test sample.</p>"
        f"<table><tr>{head}</tr>{rows}</table>{listed}<h2>Per task</h2>{figures}</body></html>"
    )


def plot_training_curves(metrics_csv: str | Path, out_png: str | Path, best_epoch: int | None = None) -> Path:
    """Three panels a person can read: the training loss per source (a rolling mean over the logged steps,
    the raw values faint), each task's validation metric per epoch, and the validation macro score — the
    best epoch marked in the last two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    log = pd.read_csv(metrics_csv)
    fig, (ax_loss, ax_task, ax_macro) = plt.subplots(1, 3, figsize=(16, 4.6))
    sources = [c for c in log.columns if c.startswith("train/source/") and c.endswith("/loss")]
    curves = sources or (["train/loss"] if "train/loss" in log else [])
    for column in curves:
        rows = log.dropna(subset=[column])
        label = column.split("/")[2] if column in sources else "all sources"
        smooth = rows[column].rolling(max(1, len(rows) // 20), min_periods=1).mean()
        (line,) = ax_loss.plot(rows["step"], smooth, label=label)
        ax_loss.plot(rows["step"], rows[column], alpha=0.2, lw=0.8, color=line.get_color())
    ax_loss.set(xlabel="training step", ylabel="loss (sum of the batch's task losses)")
    ax_loss.set_title("training loss per source (rolling mean; raw faint)")
    if curves:
        ax_loss.legend(fontsize=7)
    val = log.dropna(subset=["epoch"]) if "epoch" in log else log.iloc[:0]
    kinds = {}
    for column in [c for c in log.columns if c.startswith("val/") and c.count("/") == 2]:
        task, metric = column.split("/")[1:]
        if task in ("macro", "pretext"):
            continue
        kinds.setdefault(task, [])
        kinds[task].append(metric)
    for task, metrics in sorted(kinds.items()):
        metric = next((m for m in ("auroc", "r2", "accuracy") if m in metrics), None)
        if metric is None:
            continue
        rows = val.dropna(subset=[f"val/{task}/{metric}"]).groupby("epoch")[f"val/{task}/{metric}"].last()
        ax_task.plot(rows.index, rows.values, marker=".", label=f"{task} ({metric})")
    ax_task.set(xlabel="epoch", ylabel="validation metric (AUROC, R² or accuracy)")
    ax_task.set_title("validation per task")
    if kinds:
        ax_task.legend(fontsize=7)
    if "val/macro/score" in log:
        rows = val.dropna(subset=["val/macro/score"]).groupby("epoch")["val/macro/score"].last()
        ax_macro.plot(rows.index, rows.values, marker="o", label="macro score")
    ax_macro.set(xlabel="epoch", ylabel="mean over tasks of AUROC, R² or accuracy")
    ax_macro.set_title("validation macro score (checkpoints keep the best)")
    if best_epoch is not None:
        for ax in (ax_task, ax_macro):
            ax.axvline(best_epoch, ls="--", c="grey", lw=1, label=f"best epoch ({best_epoch})")
        ax_macro.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def write_report(
    run_dir: str | Path, arrays: dict[str, np.ndarray], tasks: dict[str, dict], notes: dict[str, str] | None = None
) -> Path | None:
    """Save the test outputs and build the report (rank 0 only: the arrays are every rank's)."""
    if not arrays:
        return None
    save_outputs(run_dir, arrays, tasks, notes)
    return build_report(run_dir)
