"""Writing a store: batches go to committed parts (`_parts/<batch>`, committed by an attribute written last),
so an interrupted `prepare` resumes and never exposes half a sample; `finalize` writes every array once, rows
in one seeded random permutation, and marks the store complete."""

from __future__ import annotations

import datetime as _dt
import math
import weakref
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import zarr

from biofm.platform import integrity
from biofm.platform.errors import StoreError
from biofm.platform.store.format import (
    FORMAT_VERSION,
    MIB,
    Column,
    Ragged,
    _check_json,
    _check_task,
    _describe,
    _exists,
    _normalise,
    _plain,
    _write_chunked,
    _write_whole,
    compressors_for,
    concat_rows,
    open_root,
    take_rows,
)
from biofm.platform.store.parts import _chunk_rows, _fault_injection, _part_is_whole, _write_ragged_streaming
from biofm.platform.store.reader import Store
from biofm.platform.store.splits import check_subject_splits, subject_splits
from biofm.platform.writing import check_target, hold
from biofm.tasks.kinds import label_width


def _as_strings(values: Iterable, name: str, where: str) -> np.ndarray:
    arr = np.asarray(list(values), dtype=object)
    if any(v is None or (isinstance(v, float) and math.isnan(v)) for v in arr):
        raise StoreError(f"{where}: {name} has an empty value; every sample needs one")
    return np.array([str(v) for v in arr], dtype=str)


def unfinished_settings(url: str, storage_options: dict | None = None) -> dict | None:
    """The settings (source, modalities, tasks, seed) of an interrupted prepare at `url`, or None. A resumed
    prepare reuses them rather than fitting again: tokenizer training breaks ties arbitrarily."""
    if not _exists(str(url), storage_options):
        return None
    attrs = dict(open_root(str(url), "r", storage_options).attrs)
    return None if attrs.get("complete") else attrs.get("pending")


class StoreWriter:
    """Writes one store in batches; resumable, and invisible to readers until `finalize`.

    >>> w = StoreWriter(url, source="tox21", modalities={"molecule": {...}}, tasks={"NR-AR": {"kind": "binary"}})
    >>> for key, batch in enumerate(batches):
    ...     if key not in w.committed():
    ...         w.write_batch(key, sample_id=..., subject_id=..., labels={...}, arrays={"molecule/x": ...})
    >>> w.finalize()
    """

    def __init__(
        self,
        url: str,
        *,
        source: str,
        modalities: Mapping[str, dict],
        tasks: Mapping[str, dict],
        seed: int = 0,
        overwrite: bool = False,
        chunk_bytes: int = 4 * MIB,
        min_chunks: int = 16,
        codec: str = "auto",
        storage_options: dict | None = None,
        memory_bytes: int = 1 << 30,
        codecs: Mapping[str, str] | None = None,
    ):
        self.url, self.storage_options = str(url), storage_options
        self.memory_bytes = memory_bytes  # a ragged array larger than this is finalised in a stream
        compressors_for(np.float32, codec)  # validate early
        self.codec = codec
        self.codecs = dict(codecs or {})  # per array, e.g. {"wsi/tiles": "none"}: pixels barely compress
        for name, value in self.codecs.items():
            compressors_for(np.uint8, value)
        self.seed, self.chunk_bytes, self.min_chunks = seed, chunk_bytes, min_chunks
        tasks = {name: _check_task(name, dict(spec), self.url) for name, spec in tasks.items()}
        self.pending = {"source": source, "modalities": dict(modalities), "tasks": tasks, "seed": seed}
        _check_json(self.pending, self.url)
        # one writer per store, and never a folder that is not a biofm store (see writing.py)
        self._finalizer = weakref.finalize(self, hold(self.url, storage_options))
        try:
            self.root = self._open_root(overwrite)
        except BaseException:
            self._finalizer()  # a writer that cannot start gives the lock back at once
            raise

    def _open_root(self, overwrite: bool) -> zarr.Group:
        storage_options = self.storage_options
        kind = check_target(self.url, storage_options)
        fresh = {"biofm_store": FORMAT_VERSION, "complete": False, "pending": self.pending}
        if kind == "store":
            attrs = dict(open_root(self.url, "r", storage_options).attrs)
            if overwrite:
                root = open_root(self.url, "w", storage_options, attributes=fresh)
            elif attrs.get("complete"):
                raise StoreError(
                    f"{self.url} is already a complete store; pass overwrite=True (--overwrite) to write it again"
                )
            elif attrs.get("biofm_store") != FORMAT_VERSION:
                raise StoreError(
                    f"{self.url} holds an unfinished prepare of store format version "
                    f"{attrs.get('biofm_store')}; pass overwrite=True (--overwrite) to start over"
                )
            elif _normalise(attrs.get("pending")) != _normalise(self.pending):
                raise StoreError(
                    f"{self.url} holds an unfinished prepare with other settings (source, "
                    "modalities, tasks or seed); pass overwrite=True (--overwrite) to start over"
                )
            else:
                root = open_root(self.url, "r+", storage_options)
        else:  # absent or an empty folder; the metadata and the attributes that make it a store in one write
            root = open_root(self.url, "w", storage_options, attributes=fresh)
        return root

    # -- parts
    def _parts(self) -> zarr.Group:
        return self.root.require_group("_parts")

    def _committed_parts(self) -> list[tuple[int, zarr.Group]]:
        """(key, group) of the parts whose commit mark is written and whose arrays are all there."""
        if "_parts" not in self.root:
            return []
        return sorted((int(k), g) for k, g in self._parts().groups() if _part_is_whole(g))

    def committed(self) -> set[int]:
        """Keys of the batches already committed (a rerun skips them)."""
        return {key for key, _ in self._committed_parts()}

    def committed_sample_ids(self) -> set[str]:
        """Sample ids in the committed batches: a rerun that groups its samples into batches differently
        (e.g. by work done, as slides are) skips the samples already written."""
        return {str(v) for _, g in self._committed_parts() for v in _plain(g["index/sample_id"][...])}

    def write_batch(
        self,
        key: int,
        *,
        sample_id: Iterable,
        subject_id: Iterable,
        labels: Mapping[str, Any] | None = None,
        arrays: Mapping[str, Column] | None = None,
        split: Iterable | None = None,
    ) -> None:
        """Validate one batch fully, then write it as a part committed by its last write."""
        where = f"{self.url} (batch {key})"
        columns = self._validate_batch(where, sample_id, subject_id, labels or {}, arrays or {}, split)
        parts = self._parts()
        name = f"{int(key):08d}"
        if name in parts:
            del parts[name]  # an uncommitted leftover of an interrupted run, or a rewrite
        part = parts.create_group(name)
        layout = {}
        for array_name, col in columns.items():
            if isinstance(col, Ragged):
                _write_whole(part, array_name, col.values, self.codecs.get(array_name, self.codec))
                _write_whole(part, array_name + ".offsets", col.offsets)
            else:
                _write_whole(part, array_name, col, self.codecs.get(array_name, self.codec))
            layout[array_name] = _describe(col)
        part.attrs.update({"n": len(columns["index/sample_id"]), "layout": layout, "committed": True})
        _fault_injection(key, len(columns["index/sample_id"]))

    def _validate_batch(self, where, sample_id, subject_id, labels, arrays, split) -> dict[str, Column]:
        sample_id = _as_strings(sample_id, "sample_id", where)
        n = len(sample_id)
        columns: dict[str, Column] = {
            "index/sample_id": sample_id,
            "index/subject_id": _as_strings(subject_id, "subject_id", where),
        }
        if split is not None:
            columns["index/split"] = _as_strings(split, "split", where)
        for name, col in list(columns.items()):
            if len(col) != n:
                raise StoreError(f"{where}: {name} has {len(col)} values but sample_id has {n}")
        tasks = self.pending["tasks"]
        unknown = sorted(set(labels) - set(tasks))
        if unknown:
            raise StoreError(f"{where}: labels for undeclared tasks {unknown}; declare them in tasks=")
        for task, spec in tasks.items():
            width = label_width(spec)
            if task not in labels:
                values = np.full((n, width) if width else (n,), np.nan, dtype=np.float32)
            else:
                values = np.asarray(labels[task], dtype=np.float32)
            want = (n, width) if width else (n,)
            if values.shape != want:
                raise StoreError(
                    f"{where}: labels/{task} has shape {values.shape}, expected {want} for a {spec['kind']} task"
                )
            columns[f"labels/{task}"] = values
        modalities = self.pending["modalities"]
        for array_name, col in arrays.items():
            modality = array_name.split("/")[0]
            if "/" not in array_name or modality not in modalities:
                raise StoreError(
                    f"{where}: array '{array_name}' must be named '<modality>/<array>' with a "
                    f"declared modality ({sorted(modalities)})"
                )
            if not isinstance(col, Ragged):
                col = np.asarray(col)
                if col.dtype == object:
                    raise StoreError(f"{where}: array '{array_name}' has no numeric or string dtype")
            if len(col) != n:
                raise StoreError(f"{where}: array '{array_name}' has {len(col)} rows but the batch has {n} samples")
            columns[array_name] = col
        for modality in modalities:
            present = f"{modality}/present"
            if present not in columns:
                columns[present] = np.ones(n, dtype=bool)
            columns[present] = np.asarray(columns[present], dtype=bool)
        return columns

    # -- finalize
    def finalize(self, *, split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)) -> Store:
        """Write every array once in a seeded random row order, then mark the store complete.

        Holds one array of the whole store in memory at a time, except ragged arrays larger than
        `memory_bytes` (tile features, raw tiles), which stream sample by sample in permuted order.
        Rerunning after an interruption (here or earlier) gives the same store."""
        parts = self._committed_parts()
        if not parts:
            raise StoreError(f"{self.url}: nothing was written; no sample to finalize")
        layouts = [dict(g.attrs["layout"]) for _, g in parts]
        layout = layouts[0]

        def shape_of(lay: dict) -> dict:
            return {k: (v["ragged"], v["dtype"], tuple(v["shape"])) for k, v in lay.items()}

        for (key, _), other in zip(parts, layouts):
            if shape_of(other) != shape_of(layout):
                mine, first = shape_of(other), shape_of(layout)
                diff = sorted(k for k in set(mine) | set(first) if mine.get(k) != first.get(k))
                raise StoreError(
                    f"{self.url}: batch {key} has arrays that differ from batch {parts[0][0]} "
                    f"in name, dtype or shape: {diff}"
                )

        def gather(name: str) -> Column:
            cols = []
            for _, g in parts:
                if layout[name]["ragged"]:
                    cols.append(Ragged(g[name][...], g[name + ".offsets"][...]))
                else:
                    cols.append(_plain(g[name][...]))
            return concat_rows(cols)

        subject_ids = gather("index/subject_id")
        n = len(subject_ids)
        sample_ids = gather("index/sample_id")
        if len(np.unique(sample_ids)) != n:
            raise StoreError(f"{self.url}: sample_id values repeat; every sample needs its own id")
        if "index/split" in layout:
            splits = gather("index/split")
            check_subject_splits(subject_ids, splits, self.url)
        else:
            splits = subject_splits(subject_ids, split_fractions, self.seed)
        perm = np.random.default_rng(self.seed).permutation(n)

        # size chunks by the mean bytes per sample over all parts
        bytes_per_row = sum(
            np.mean([lay[name]["bytes_per_sample"] for lay in layouts])
            for name in layout
            if not name.startswith("index/")
        )
        rows = _chunk_rows(bytes_per_row, n, self.chunk_bytes, self.min_chunks)

        root = self.root
        for name in [k for k in root.keys() if k != "_parts"]:
            del root[name]  # a finalize interrupted earlier
        _write_chunked(root, "index/sample_id", sample_ids[perm], rows, self.codec)
        _write_chunked(root, "index/subject_id", subject_ids[perm], rows, self.codec)
        _write_chunked(root, "index/split", splits[perm], rows, self.codec)
        arrays = {}
        for name, info in layout.items():
            if name.startswith("index/"):
                continue
            total_bytes = sum(lay[name]["bytes_per_sample"] for lay in layouts) * n / len(layouts)
            if info["ragged"] and total_bytes > self.memory_bytes:
                _write_ragged_streaming(
                    root, name, [g for _, g in parts], perm, self.chunk_bytes, rows, self.codecs.get(name, self.codec)
                )
                arrays[name] = {"ragged": True, "dtype": info["dtype"], "shape": info["shape"]}
                continue
            col = take_rows(gather(name), perm)
            if isinstance(col, Ragged):
                row_bytes = col.values[0:1].nbytes or 1
                value_rows = _chunk_rows(row_bytes, len(col.values), self.chunk_bytes, 1)
                _write_chunked(root, name, col.values, value_rows, self.codecs.get(name, self.codec))
                _write_chunked(root, name + ".offsets", col.offsets, max(rows + 1, 1 << 16), self.codec)
            else:
                _write_chunked(root, name, col, rows, self.codecs.get(name, self.codec))
            if not name.startswith("labels/"):
                arrays[name] = {"ragged": info["ragged"], "dtype": info["dtype"], "shape": info["shape"]}
        # the checksums of every file, then the attributes that mark the store complete, in one write: a
        # complete store always has its checksums; the parts go last (a leftover is ignored by readers)
        integrity.write_manifest(self.url, self.storage_options)
        pending = self.pending
        root.attrs.put(
            {
                "biofm_store": FORMAT_VERSION,
                "source": pending["source"],
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "n_samples": int(n),
                "rows_per_chunk": int(rows),
                "seed": pending["seed"],
                "modalities": pending["modalities"],
                "tasks": pending["tasks"],
                "arrays": arrays,
                "complete": True,
            }
        )
        del root["_parts"]
        store = Store(self.url, storage_options=self.storage_options)
        self._finalizer()  # the lock goes back once the store is complete
        return store
