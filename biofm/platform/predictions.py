"""What a run gives back: prediction columns and `predictions.parquet`, and the logged metrics as a dict, a JSON
file and a table."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
from lightning.pytorch import Callback, LightningModule, Trainer


def prediction_columns(kinds: dict, out: dict, applies: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per task of one batch's `TaskKind.predict` outputs: the prediction (class name or value in original
    units) and, for classification, one probability column per class name; with `applies` (`task_applies`),
    `<task>/applies` and no prediction (NaN, or None for class names and flags) where it is False."""
    columns: dict[str, np.ndarray] = {}
    for task, kind in kinds.items():
        own = kind.columns(out[task])
        if applies is not None:
            mask = np.asarray(applies[task], dtype=bool)
            if not mask.all():
                own = {name: _without(values, ~mask) for name, values in own.items()}
            own[f"{task}/applies"] = mask
        columns.update(own)
    return columns


def _without(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`values` with `rows` emptied: floats NaN, class names and flags None."""
    values = values.astype(np.float64 if values.dtype.kind == "f" else object)
    values[rows] = np.nan if values.dtype.kind == "f" else None
    return values


def true_columns(kinds: dict, labels: dict) -> dict[str, np.ndarray]:
    """The store's labels beside the predictions (`TaskKind.true_columns`: `<task>/true`, or one column per
    class)."""
    columns: dict[str, np.ndarray] = {}
    for task, target in labels.items():
        if task in kinds:
            values = np.asarray(target.cpu() if hasattr(target, "cpu") else target, dtype=np.float64)
            columns.update(kinds[task].true_columns(values))
    return columns


def predictions_frame(kinds: dict, outputs: list[dict]) -> pd.DataFrame:
    """One row per sample: `source`, `sample_id` when known, `prediction_columns`, and the labels the store
    has (`true_columns`)."""
    frames = []
    for out in outputs:
        columns: dict[str, object] = {"source": out["source"]}
        if out.get("sample_id") is not None:
            columns["sample_id"] = out["sample_id"]
        columns.update(prediction_columns(kinds, out, out.get("applies")))
        columns.update(true_columns(kinds, out.get("labels") or {}))
        frames.append(pd.DataFrame(columns))
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class PredictionWriter(Callback):
    """Writes `predictions.parquet` in the run directory (one shard per rank, merged by rank 0)."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.outputs: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append(outputs)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        out_dir = Path(self.out_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        frame = predictions_frame(pl_module.model.kinds, self.outputs)
        shard = out_dir / f"predictions-rank{trainer.global_rank}.parquet"
        frame.to_parquet(shard, index=False)
        self.outputs = []
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            shards = sorted(out_dir.glob("predictions-rank*.parquet"))
            merged = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
            merged.to_parquet(out_dir / "predictions.parquet", index=False)
            for s in shards:
                s.unlink()
            print(f"{len(merged)} predictions written to {out_dir / 'predictions.parquet'}")


def metrics_of(trainer: Trainer, prefix: str = "test") -> dict[str, float]:
    """The metrics a run logged under `prefix/` (the prefix removed); extra evaluations logged under a longer
    prefix (`test/without:<modality>/…`) are not among them."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith(prefix + "/") and not key[len(prefix) + 1 :].startswith("without:"):
            out[key[len(prefix) + 1 :]] = float(value)
    return out


def write_test_metrics(trainer: Trainer, path: str | Path | None = None, prefix: str = "test") -> Path | None:
    """Test metrics as JSON (`<run dir>/test_metrics.json`), from rank 0: `<task>/<metric>` pooled over the
    sources and, with several sources, `<source>/<task>/<metric>`; a metric that could not be computed is
    null."""
    if not trainer.is_global_zero:
        return None
    path = Path(path or Path(trainer.default_root_dir) / "test_metrics.json")
    metrics = {k: (v if math.isfinite(v) else None) for k, v in metrics_of(trainer, prefix).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def print_metrics(metrics: dict[str, float], title: str, file=None) -> None:
    """A table of `metrics_of`'s output: a row per `<task>/<metric>`, a column for the pooled value and one per
    source (when the run had several); NaN is shown as "–" (undefined)."""
    from rich.console import Console
    from rich.table import Table

    pooled, by_source = {}, defaultdict(dict)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] not in ("macro", "pretext") and key.split("/", 1)[1] in metrics:
            by_source[parts[0]]["/".join(parts[1:])] = value  # `<source>/<task>/<metric>`
        else:
            pooled[key] = value
    table = Table(title=f"{title} metrics" + (" (pooled over sources, and per source)" if by_source else ""))
    table.add_column("task / metric", no_wrap=True)
    table.add_column("all sources" if by_source else "value", justify="right")
    for source in sorted(by_source):
        table.add_column(source, justify="right")

    def shown(value) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"

    for key in sorted(pooled, key=lambda k: (k.startswith("macro/"), k)):
        table.add_row(key, shown(pooled[key]), *[shown(by_source[s].get(key)) for s in sorted(by_source)])
    Console(file=file).print(table)
