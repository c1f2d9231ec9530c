"""`biofm predict-cohort`: a manifest of raw inputs → predictions for a whole cohort, through Lightning's
predict on one or more processes.

The manifest (CSV or parquet) holds one row per sample: `sample_id` (default: the row number) and a column
per modality input (`Modality.column`, e.g. a SMILES, a slide's path, a report) and the case columns the
model knows. A source with inputs that no manifest cell holds gives `predict_cohort` its own `rows` (the
EHR side's `biofm predict-meds` reads MEDS events up to each prediction time).
Rows are cut into batches of `batch_size`; loader workers featurise them (the same featurisers and
settings as training). On a GPU, or with fewer than two workers, the main process runs the model (with the
cores the workers leave); on CPU with two or more workers each worker also runs the model on its own batches
with one thread, which spreads featurisation and model over every core with no intra-op threads to keep in
step (the weights are shared with the forked workers, not copied). Each batch's predictions, failed rows
with their `error`, go to `<out>/shards/part-<batch>.parquet`, written whole and then renamed by whichever
rank ran it. A rerun skips the batches whose shard exists, so a killed run resumes and every sample is
written once. At the end: `<out>/predictions.parquet` (manifest order), `<out>/errors.csv` (sample_id,
reason) and `<out>/summary.json` (counts, seconds, samples/s).
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from biofm.platform.errors import StoreError
from biofm.platform.sdk import Model, find_checkpoint, load_module
from biofm.platform.tables import read_table

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def read_cohort(path: str, encoding: str = "utf-8") -> pd.DataFrame:
    """The cohort manifest (CSV, TSV or parquet); without a `sample_id` column rows are named `row-<n>`
    (said on stderr, with the columns it has, in case the ids are in a column of another name)."""
    frame = read_table(path, "cohort manifest", encoding)
    if "sample_id" not in frame.columns:
        print(
            f"biofm: note: {path} has no sample_id column, so its rows are named row-1 … row-{len(frame)} "
            f"in the predictions (its columns: {list(frame.columns)}); add a sample_id column to name them",
            file=sys.stderr,
        )
        frame.insert(0, "sample_id", [f"row-{i + 1}" for i in range(len(frame))])
    missing = np.flatnonzero(frame["sample_id"].isna().to_numpy())
    if len(missing):
        raise StoreError(f"{path}: row {int(missing[0]) + 1}: sample_id is empty; every row needs one")
    repeated = frame["sample_id"].duplicated().to_numpy()
    if repeated.any():
        raise StoreError(f"{path}: row {int(np.flatnonzero(repeated)[0]) + 1} repeats a sample_id")
    return frame.reset_index(drop=True)


def raw_inputs(model: Model, frame: pd.DataFrame, where: str) -> dict[str, object]:
    """The manifest's columns as raw inputs per modality of the model (`Modality.raw_from_table`; an empty
    cell is no input)."""
    raw = {}
    for name, modality in model.module.model.modalities.items():
        values = modality.raw_from_table(frame)
        if values is not None:
            raw[name] = values
    if not raw:
        wanted = [c for m in model.module.model.modalities.values() for c in m.table_columns()]
        raise StoreError(f"{where}: no column for the model's modalities {model.modalities}; expected one of {wanted}")
    return raw


class CohortBatches(Dataset):
    """Item k = batch `todo[k]` of the manifest, featurised (runs in the loader workers)."""

    def __init__(
        self, model: Model, raw: dict, sample_ids: np.ndarray, batch_size: int, todo: list[int], predict: bool = False
    ):
        self.model, self.raw, self.sample_ids = model, raw, sample_ids
        self.batch_size, self.todo, self.predict = batch_size, todo, predict

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int) -> dict:
        index = self.todo[k]
        lo, hi = index * self.batch_size, min(len(self.sample_ids), (index + 1) * self.batch_size)
        raw = {name: values[lo:hi] for name, values in self.raw.items()}
        inputs, errors = self.model.featurise(raw, hi - lo)
        item = {"batch": index, "sample_id": self.sample_ids[lo:hi].tolist(), "inputs": inputs, "errors": errors}
        if self.predict:  # on CPU with 2+ workers each runs the model on its own batches (one thread)
            with torch.inference_mode():
                item = predicted(self.model, item)
        return item


def predicted(model: Model, item: dict) -> dict:
    """A featurised batch → its predictions as an Arrow table (sample_id, the model's columns, error)."""
    out = model.forward(item["inputs"])
    return {"batch": item["batch"], "table": pa.table(model.columns(out, item["errors"], item["sample_id"]))}


class CohortPredictor(LightningModule):
    def __init__(self, model: Model):
        super().__init__()
        self.net = model.module.model
        self.sdk = model

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        if "table" in batch:  # predicted in the loader worker
            return batch
        return predicted(self.sdk, batch)  # the same network as self.net, moved by Lightning


class ShardWriter(BasePredictionWriter):
    """Each batch's predictions (failed rows with their `error`) as a parquet file of its own, written whole
    then renamed. A single process also keeps them, so the merge need not read them back. Batches travel as
    Arrow tables built from the model's columns: no pandas frame per batch."""

    def __init__(self, out: Path, keep: bool):
        super().__init__(write_interval="batch")
        self.shards = out / "shards"
        self.kept: dict[int, pa.Table] | None = {} if keep else None

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        table = prediction["table"]
        part = self.shards / f"part-{prediction['batch']:08d}.parquet"  # its existence marks the batch done
        pq.write_table(table, f"{part}.{os.getpid()}.tmp")
        os.replace(f"{part}.{os.getpid()}.tmp", part)
        if self.kept is not None:
            self.kept[prediction["batch"]] = table


def _first(items: list) -> dict:
    return items[0]


def _one_thread(_worker: int) -> None:
    torch.set_num_threads(1)  # a featurising worker: RDKit, OpenSlide and numpy, no parallel torch


def _predicting_worker(worker: int) -> None:
    """A worker that also runs the model: one thread, and memory freed after a batch stays with the process
    for the next one (glibc otherwise hands the model's buffers back to the system and faults them in again
    batch after batch, a tenth of the worker's time on two busy cores)."""
    _one_thread(worker)
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc: its allocator as it is
        return
    # both or neither: a fixed trim threshold alone also fixes the mmap threshold at 128 KiB, far worse
    if mallopt(M_MMAP_THRESHOLD, 32 << 20):  # 32 MiB: within every 64-bit glibc's limit
        mallopt(M_TRIM_THRESHOLD, 1 << 30)


def predict_cohort(
    checkpoint: str,
    manifest: str,
    out: str,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    progress: bool = True,
    encoding: str = "utf-8",
    rows: Callable[[Model, str], tuple[pd.DataFrame, dict]] | None = None,
    run: dict | None = None,
) -> dict:
    """Predict every row of `manifest` (see the module's doc); returns the summary. `rows(model, manifest)`
    gives the rows (a frame with `sample_id`, in output order) and the raw inputs per modality when the
    manifest's cells are not the inputs themselves (default: `read_cohort` and `raw_inputs`); `run` adds what
    else identifies the run for resuming (e.g. the events' folder)."""
    start = time.perf_counter()
    out_dir = Path(out)
    # the manifest first: a table that cannot be read is named before the model is loaded
    table = None if rows else read_cohort(manifest, encoding)
    checkpoint = find_checkpoint(checkpoint)
    model = Model(load_module(checkpoint), torch.device("cpu"))
    frame, raw = rows(model, manifest) if rows else (table, raw_inputs(model, table, manifest))
    (out_dir / "shards").mkdir(parents=True, exist_ok=True)  # once the manifest and the model are read
    _same_run(
        out_dir,
        {"manifest": _sha256(manifest), "checkpoint": _sha256(checkpoint), "batch_size": batch_size, **(run or {})},
    )
    n_batches = -(-len(frame) // batch_size)
    done = {int(p.name[5:13]) for p in (out_dir / "shards").glob("part-*.parquet")}
    todo = [b for b in range(n_batches) if b not in done]
    if todo:
        on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
        in_workers = on_cpu and num_workers >= 2
        data = DataLoader(
            CohortBatches(model, raw, frame["sample_id"].astype(str).to_numpy(), batch_size, todo, predict=in_workers),
            batch_size=1,
            collate_fn=_first,
            num_workers=num_workers,
            worker_init_fn=_predicting_worker if in_workers else _one_thread,
            prefetch_factor=4 if num_workers else None,
        )
        threads = torch.get_num_threads()
        if num_workers and not in_workers:  # the cores the featurising workers leave run the forward pass
            torch.set_num_threads(max(1, (os.cpu_count() or 1) - num_workers))
        multi = devices > 1 or num_nodes > 1
        strategy = ("ddp" if "SLURM_NTASKS" in os.environ else "ddp_spawn") if multi else "auto"
        writer = ShardWriter(out_dir, keep=not multi)
        trainer = Trainer(
            accelerator=accelerator,
            devices=devices,
            num_nodes=num_nodes,
            strategy=strategy,
            logger=False,
            enable_progress_bar=progress,
            enable_model_summary=False,
            callbacks=[writer],
            default_root_dir=str(out_dir),
        )
        gc.freeze()  # forked workers' garbage collector then leaves the parent's objects (and pages) alone
        try:
            trainer.predict(CohortPredictor(model), dataloaders=data, return_predictions=False)
        finally:
            gc.unfreeze()
            torch.set_num_threads(threads)
        if trainer.global_rank != 0:
            return {}
        kept = writer.kept
    else:
        kept = None
    return merge(out_dir, frame, n_batches, len(todo), time.perf_counter() - start, kept)


def _sha256(path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _same_run(out_dir: Path, key: dict) -> None:
    """Shards are resumed only by the run that wrote them: `shards/run.json` records its manifest, checkpoint
    and batch size, and a folder holding another run's shards is refused (its shards would be taken as
    this run's batches)."""
    record = out_dir / "shards" / "run.json"
    shards = list((out_dir / "shards").glob("part-*.parquet"))
    if record.exists():
        if json.loads(record.read_text()) != key:
            raise StoreError(
                f"{out_dir} holds the shards of another predict-cohort run (another manifest, checkpoint "
                f"or batch size); a rerun resumes only the same run: write to another --out, or delete "
                f"{out_dir / 'shards'} to start over"
            )
    elif shards:
        raise StoreError(
            f"{out_dir / 'shards'} holds shards that no run recorded; write to another --out, or delete "
            "it to start over"
        )
    else:
        record.write_text(json.dumps(key))


def merge(
    out_dir: Path,
    frame: pd.DataFrame,
    n_batches: int,
    ran: int,
    seconds: float,
    kept: dict[int, pa.Table] | None = None,
) -> dict:
    """Every batch's shard (or the table kept in memory for it) → predictions.parquet, errors.csv and
    summary.json."""
    kept = kept or {}
    parts = [out_dir / "shards" / f"part-{b:08d}.parquet" for b in range(n_batches)]
    missing = [p.name for p in parts if not p.exists()]
    if missing:
        raise RuntimeError(f"{out_dir}: {len(missing)} batches have no shard ({missing[:3]} …); rerun to finish")
    tables = [kept[b] if b in kept else pq.read_table(p) for b, p in enumerate(parts)]
    # a column no row of a batch has a value for is of Arrow's null type there
    predictions = pa.concat_tables(tables, promote_options="permissive").to_pandas()
    failed = predictions["error"].notna()
    predictions["error"] = predictions["error"].astype(object).where(failed, None)  # shards differ in dtype
    errors = predictions.loc[failed, ["sample_id", "error"]].rename(columns={"error": "reason"})
    predictions.to_parquet(out_dir / "predictions.parquet.tmp", index=False)
    os.replace(out_dir / "predictions.parquet.tmp", out_dir / "predictions.parquet")
    errors.to_csv(out_dir / "errors.csv", index=False)
    summary = {
        "samples": int(len(frame)),
        "predicted": int(predictions["error"].isna().sum()),
        "errors": int(len(errors)),
        "batches": n_batches,
        "batches_this_run": ran,
        "seconds": round(seconds, 2),
        "samples_per_s": round(len(frame) / max(seconds, 1e-9), 1),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
