"""The sample store: one Zarr v3 group per source, the contract between `prepare` and the stream.

Layout (DESIGN.md):

    attrs: biofm_store, source, created, n_samples, rows_per_chunk, modalities, tasks, arrays, complete
    index/sample_id [N] str   index/subject_id [N] str   index/split [N] str (train / val / test)
    labels/<task>   [N] or [N, C] float32, NaN = missing
    <modality>/<array>            fixed per sample: [N, ...]
    <modality>/<array> + .offsets ragged per sample: rows [M, ...] and int64 offsets [N + 1]
    <modality>/present [N] bool   whether a sample has the modality at all

Writes go to committed parts first (`_parts/<batch>`, committed by an attribute written last), so an
interrupted `prepare` resumes and never exposes half a sample; `finalize` then writes every array once,
rows in one seeded random permutation, and marks the store complete.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import mmap
import os
import signal
import sys
import warnings
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from biofm.platform import integrity
from biofm.platform.errors import StoreError
from biofm.platform.integrity import is_local
from biofm.platform.integrity import local_path as _local_path
from biofm.platform.writing import check_target, hold
from biofm.tasks.kinds import SpecError, check_spec, label_width

FORMAT_VERSION = 2  # 2: every chunk written, checksums of every file (integrity.py), labels filled with NaN
SPLITS = ("train", "val", "test")
INDEX_ARRAYS = ("index/sample_id", "index/subject_id", "index/split")
MIB = 1 << 20

# Variable-length strings are not yet in the Zarr v3 core spec; zarr warns on every string array.
warnings.filterwarnings("ignore", message=".*(vlen-utf8|variable-length|VariableLengthUTF8|string).*",
                        module="zarr.*")
# the checksums file sits beside zarr's metadata; zarr names every file it does not know when it lists members
warnings.filterwarnings("ignore", message=f".*{integrity.MANIFEST}.*not recognized", module="zarr.*")


# --------------------------------------------------------------------------------------------- paths

def open_root(url: str, mode: str = "r", storage_options: dict | None = None,
              attributes: dict | None = None) -> zarr.Group:
    """Open the store's root group; any fsspec URL works as a path (`memory://`, `s3://`, `file://`).
    With mode "w", `attributes` are written with the group's metadata, in one file."""
    url = str(url)
    if is_local(url):
        store = zarr.storage.LocalStore(_local_path(url), read_only=(mode == "r"))
    else:
        store = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options,
                                                  read_only=(mode == "r"))
    try:
        if attributes is not None:
            return zarr.open_group(store, mode=mode, zarr_format=3, attributes=attributes)
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        if is_local(url) and os.path.exists(_local_path(url)):
            raise StoreError(f"{url}: not a biofm store (no zarr group metadata, zarr.json, in it). Check the "
                             "path, or run `biofm prepare …` to write a store there.") from None
        raise StoreError(f"{url}: no store at this path (it does not exist). Check the path, or run "
                         f"`biofm prepare …` to write it.") from err


def _exists(url: str, storage_options: dict | None) -> bool:
    try:
        open_root(url, "r", storage_options)
        return True
    except StoreError:
        return False


# -------------------------------------------------------------------------------------------- ragged

@dataclass
class Ragged:
    """Rows of variable count per sample: `values[offsets[i]:offsets[i + 1]]` belong to sample i."""

    values: np.ndarray  # [M, ...]
    offsets: np.ndarray  # [n + 1] int64, offsets[0] == 0

    @classmethod
    def from_list(cls, rows: list[np.ndarray], dtype: Any = None, trailing: tuple = ()) -> Ragged:
        rows = [np.asarray(r, dtype=dtype) for r in rows]
        lengths = np.array([len(r) for r in rows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        if rows:
            values = np.concatenate(rows)
        else:
            values = np.zeros((0, *trailing), dtype=dtype)
        return cls(values, offsets)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def row(self, i: int) -> np.ndarray:
        return self.values[self.offsets[i]:self.offsets[i + 1]]

    def slice(self, start: int, stop: int) -> Ragged:
        lo, hi = self.offsets[start], self.offsets[stop]
        return Ragged(self.values[lo:hi], self.offsets[start:stop + 1] - lo)

    def take(self, idx: np.ndarray) -> Ragged:
        idx = np.asarray(idx, dtype=np.int64)
        starts, lengths = self.offsets[idx], self.lengths()[idx]
        new_offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        # one gather for all rows: position k of the output reads starts[sample] + (k - new_offsets[sample])
        gather = np.repeat(starts - new_offsets[:-1], lengths) + np.arange(new_offsets[-1])
        return Ragged(self.values[gather], new_offsets)

    @staticmethod
    def concat(parts: list[Ragged]) -> Ragged:
        values = np.concatenate([p.values for p in parts])
        shifts = np.cumsum([0] + [len(p.values) for p in parts[:-1]])
        offsets = np.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, shifts)])
        return Ragged(values, offsets.astype(np.int64))


Column = np.ndarray | Ragged


def take_rows(col: Column, idx: np.ndarray) -> Column:
    return col.take(idx) if isinstance(col, Ragged) else col[idx]


def slice_rows(col: Column, start: int, stop: int) -> Column:
    return col.slice(start, stop) if isinstance(col, Ragged) else col[start:stop]


def concat_rows(cols: list[Column]) -> Column:
    if isinstance(cols[0], Ragged):
        return Ragged.concat(cols)
    return np.concatenate(cols)


# ------------------------------------------------------------------------------------------- splits

def subject_splits(subject_ids: np.ndarray, fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
                   seed: int = 0) -> np.ndarray:
    """Assign every sample the split of its subject; subjects are shuffled with `seed`."""
    if len(fractions) != 3 or min(fractions) < 0 or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6):
        raise StoreError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    subjects, inverse = np.unique(np.asarray(subject_ids, dtype=str), return_inverse=True)
    order = np.random.default_rng(seed).permutation(len(subjects))
    bounds = np.round(np.cumsum(fractions) * len(subjects)).astype(int)
    subject_split = np.empty(len(subjects), dtype=object)
    for name, lo, hi in zip(SPLITS, [0, bounds[0], bounds[1]], bounds):
        subject_split[order[lo:hi]] = name
    return subject_split[inverse].astype(str)


def check_subject_splits(subject_ids: np.ndarray, splits: np.ndarray, where: str) -> None:
    bad = sorted(set(np.unique(splits)) - set(SPLITS))
    if bad:
        raise StoreError(f"{where}: split values must be one of {SPLITS}, found {bad[:3]}")
    seen: dict[str, str] = {}
    for subject, split in zip(np.asarray(subject_ids, dtype=str), splits):
        if seen.setdefault(subject, split) != split:
            # the message names no subject: ids never reach a log
            raise StoreError(f"{where}: one subject has samples in both '{seen[subject]}' and '{split}'; "
                             "splits must be by subject so no patient is on two sides")


# ------------------------------------------------------------------------------------------- writer

def _chunk_rows(bytes_per_row: float, n: int, chunk_bytes: int, min_chunks: int) -> int:
    """Rows per chunk: about `chunk_bytes`, smaller (down to 1 MiB) to give at least `min_chunks`."""
    bytes_per_row = max(bytes_per_row, 1.0)
    rows = int(chunk_bytes // bytes_per_row)
    floor_rows = int(math.ceil(MIB / bytes_per_row))
    rows = min(rows, max(int(math.ceil(n / min_chunks)), floor_rows))
    return int(max(1, min(rows, max(n, 1))))


def _plain(values: np.ndarray) -> np.ndarray:
    """zarr returns strings as numpy's StringDType; give plain fixed-width str arrays back."""
    values = np.asarray(values)
    if values.dtype.kind in "TO" or isinstance(values.dtype, np.dtypes.StringDType):
        return values.astype(object).astype(str)
    return values


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

    def __init__(self, url: str, *, source: str, modalities: Mapping[str, dict], tasks: Mapping[str, dict],
                 seed: int = 0, overwrite: bool = False, chunk_bytes: int = 4 * MIB, min_chunks: int = 16,
                 codec: str = "auto", storage_options: dict | None = None, memory_bytes: int = 1 << 30,
                 codecs: Mapping[str, str] | None = None):
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
                raise StoreError(f"{self.url} is already a complete store; pass overwrite=True "
                                 "(--overwrite) to write it again")
            elif attrs.get("biofm_store") != FORMAT_VERSION:
                raise StoreError(f"{self.url} holds an unfinished prepare of store format version "
                                 f"{attrs.get('biofm_store')}; pass overwrite=True (--overwrite) to start over")
            elif _normalise(attrs.get("pending")) != _normalise(self.pending):
                raise StoreError(f"{self.url} holds an unfinished prepare with other settings (source, "
                                 "modalities, tasks or seed); pass overwrite=True (--overwrite) to start over")
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

    def write_batch(self, key: int, *, sample_id: Iterable, subject_id: Iterable,
                    labels: Mapping[str, Any] | None = None, arrays: Mapping[str, Column] | None = None,
                    split: Iterable | None = None) -> None:
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
        columns: dict[str, Column] = {"index/sample_id": sample_id,
                                      "index/subject_id": _as_strings(subject_id, "subject_id", where)}
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
                raise StoreError(f"{where}: labels/{task} has shape {values.shape}, expected {want} "
                                 f"for a {spec['kind']} task")
            columns[f"labels/{task}"] = values
        modalities = self.pending["modalities"]
        for array_name, col in arrays.items():
            modality = array_name.split("/")[0]
            if "/" not in array_name or modality not in modalities:
                raise StoreError(f"{where}: array '{array_name}' must be named '<modality>/<array>' with a "
                                 f"declared modality ({sorted(modalities)})")
            if not isinstance(col, Ragged):
                col = np.asarray(col)
                if col.dtype == object:
                    raise StoreError(f"{where}: array '{array_name}' has no numeric or string dtype")
            if len(col) != n:
                raise StoreError(f"{where}: array '{array_name}' has {len(col)} rows but the batch has "
                                 f"{n} samples")
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
                raise StoreError(f"{self.url}: batch {key} has arrays that differ from batch {parts[0][0]} "
                                 f"in name, dtype or shape: {diff}")

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
        bytes_per_row = sum(np.mean([lay[name]["bytes_per_sample"] for lay in layouts])
                            for name in layout if not name.startswith("index/"))
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
                _write_ragged_streaming(root, name, [g for _, g in parts], perm, self.chunk_bytes, rows,
                                        self.codecs.get(name, self.codec))
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
        root.attrs.put({
            "biofm_store": FORMAT_VERSION, "source": pending["source"],
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "n_samples": int(n), "rows_per_chunk": int(rows), "seed": pending["seed"],
            "modalities": pending["modalities"], "tasks": pending["tasks"], "arrays": arrays,
            "complete": True,
        })
        del root["_parts"]
        store = Store(self.url, storage_options=self.storage_options)
        self._finalizer()  # the lock goes back once the store is complete
        return store


def _part_is_whole(group: zarr.Group) -> bool:
    """A part counts as committed when its commit mark is written (last) and every array its layout names
    is there with its rows: whatever happened to the writer, a committed part is never missing an array."""
    attrs = group.attrs
    if not attrs.get("committed"):
        return False
    n = int(attrs.get("n", -1))
    for name, info in dict(attrs.get("layout", {})).items():
        try:
            array = group[name]
            if info.get("ragged"):
                offsets = group[name + ".offsets"]
                if offsets.shape != (n + 1,) or int(offsets[-1]) != array.shape[0]:
                    return False
            elif array.shape[0] != n:
                return False
        except (KeyError, IndexError, ValueError, OSError, RuntimeError):
            return False
    return True


def _fault_injection(key: int, n: int) -> None:
    """Fault-injection for tests: with BIOFM_KILL_AFTER_PARTS=N the process kills itself (SIGKILL) right
    after committing its N-th part, as a node dying mid-prepare would. With BIOFM_PAUSE_AFTER_PARTS=N:FILE it
    writes FILE.paused after its N-th part and waits (at most 5 minutes) until FILE exists: a prepare caught
    in the middle, for tests of a second writer. With BIOFM_PARTS_LOG=FILE each committed part appends
    `<key> <samples>` to FILE: what a run wrote (a rerun must skip what an earlier run committed)."""
    global _COMMITTED
    kill, pause = os.environ.get("BIOFM_KILL_AFTER_PARTS"), os.environ.get("BIOFM_PAUSE_AFTER_PARTS")
    log = os.environ.get("BIOFM_PARTS_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{key} {n}\n")
    if not (kill or pause):
        return
    _COMMITTED += 1
    if kill and _COMMITTED >= int(kill):
        os.kill(os.getpid(), signal.SIGKILL)
    if pause and _COMMITTED == int(pause.split(":", 1)[0]):
        import time
        release = pause.split(":", 1)[1]
        open(release + ".paused", "w").close()
        deadline = time.monotonic() + 300
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.02)


_COMMITTED = 0


def _write_ragged_streaming(root: zarr.Group, name: str, parts: list[zarr.Group], perm: np.ndarray,
                            chunk_bytes: int, rows_per_chunk: int, codec: str) -> None:
    """A ragged array in the order `perm` (over the parts' samples, concatenated), read one sample at a
    time and written in whole chunks: memory holds about one chunk, never the array."""
    sources = [part[name] for part in parts]
    part_offsets = [part[name + ".offsets"][...].astype(np.int64) for part in parts]
    counts = [len(o) - 1 for o in part_offsets]
    part_of = np.repeat(np.arange(len(parts)), counts)
    local = np.concatenate([np.arange(c) for c in counts])
    lengths = np.concatenate([np.diff(o) for o in part_offsets])[perm]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    first = sources[0]
    row_bytes = max(int(np.prod(first.shape[1:], dtype=np.int64)) * first.dtype.itemsize, 1)
    value_rows = _chunk_rows(row_bytes, int(offsets[-1]), chunk_bytes, 1)
    out = _create_array(root, name, (int(offsets[-1]), *first.shape[1:]), first.dtype,
                        (value_rows, *first.shape[1:]), codec)
    buffer, buffered, written = [], 0, 0
    for sample in perm:
        p, j = part_of[sample], local[sample]
        lo, hi = part_offsets[p][j], part_offsets[p][j + 1]
        if hi > lo:
            buffer.append(sources[p][lo:hi])
            buffered += hi - lo
        if buffered >= value_rows:
            block = np.concatenate(buffer)
            whole = (len(block) // value_rows) * value_rows
            out[written:written + whole] = block[:whole]
            written += whole
            buffer, buffered = [block[whole:]], len(block) - whole
    if buffered:
        out[written:written + buffered] = np.concatenate(buffer)
    _write_chunked(root, name + ".offsets", offsets, max(rows_per_chunk + 1, 1 << 16), codec)


def _describe(col: Column) -> dict:
    values = col.values if isinstance(col, Ragged) else col
    n = max(len(col), 1)
    return {"ragged": isinstance(col, Ragged), "dtype": _dtype_name(values.dtype),
            "shape": list(values.shape[1:]), "bytes_per_sample": _nbytes(values) / n}


def _nbytes(values: np.ndarray) -> int:
    if values.dtype.kind in "UTO":
        return int(sum(len(str(v)) for v in values.reshape(-1)))
    return int(values.nbytes)


def _dtype_name(dtype: np.dtype) -> str:
    return "str" if dtype.kind in "UTO" else np.dtype(dtype).str.lstrip("<>|=")


def _write_whole(group: zarr.Group, name: str, values: np.ndarray, codec: str = "auto") -> None:
    """A part's array in chunks of about 4 MiB (one huge chunk writes at a quarter of the speed)."""
    row_bytes = max(values[:1].nbytes, 1) if values.dtype.kind not in "UTO" else 64
    _write_chunked(group, name, values, max(1, min(len(values), (4 * MIB) // row_bytes)), codec)


CODECS = ("auto", "zstd", "none")


def compressors_for(dtype: np.dtype, codec: str = "auto"):
    """`auto`: floats (features, volumes) barely compress and zstd decodes them at a third of memcpy
    speed, so they are stored raw; integers, booleans and strings (tokens, codes, ids) get zstd.
    `zstd` compresses everything (smaller stores, slower streams); `none` nothing. zstd frames carry their
    content checksum, so a corrupt chunk fails when it is decoded instead of reading back as other values."""
    if codec not in CODECS:
        raise StoreError(f"codec must be one of {CODECS}, got {codec!r}")
    kind = np.dtype(dtype).kind if not isinstance(dtype, type) else "U"
    if kind in "UTO" or codec == "zstd" or (codec == "auto" and kind != "f"):
        from zarr.codecs import ZstdCodec
        return ZstdCodec(level=0, checksum=True)
    return None


def _create_array(group: zarr.Group, name: str, shape: tuple, dtype, chunks: tuple, codec: str) -> zarr.Array:
    """Every chunk is written, even one that holds only the fill value, so a missing chunk file is damage
    (integrity.py); floats are filled with NaN, so a label that was never written reads as missing, not 0."""
    kind = np.dtype(dtype).kind if not isinstance(dtype, type) else "U"
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, overwrite=True,
                              compressors=compressors_for(dtype if kind not in "UTO" else str, codec),
                              fill_value=np.nan if kind == "f" else None,
                              config={"write_empty_chunks": True})


def _write_chunked(group: zarr.Group, name: str, values: np.ndarray, rows: int, codec: str = "auto") -> None:
    dtype = str if values.dtype.kind in "UTO" else values.dtype
    arr = _create_array(group, name, values.shape, dtype, (max(1, rows), *values.shape[1:]), codec)
    if values.size:
        arr[...] = values


def _check_task(name: str, spec: dict, where: str) -> dict:
    try:
        return check_spec(name, spec)
    except SpecError as err:
        raise StoreError(f"{where}: {err}") from None


def _check_json(value: Any, where: str) -> None:
    try:
        json.dumps(value)
    except TypeError as err:
        raise StoreError(f"{where}: modality settings and task specs must be plain JSON values ({err})") from err


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True)) if value is not None else None


# ------------------------------------------------------------------------------------------- reader

class RawChunks:
    """Rows of an uncompressed local array read straight from its chunk files into one array.

    zarr's read path costs about four times a plain file read for a raw chunk (async dispatch, a bytes
    object per chunk, a copy into the result); an array stored with only the `bytes` codec, chunked along
    its first axis, is its chunk files' bytes, so this reads each needed row range with one `readinto`.
    `of` returns None for any other array (compressed, sharded, strings, another byte order), which is
    read through zarr."""

    def __init__(self, root: str, array: zarr.Array):
        self.root, self.array = root, array
        self.dtype = np.dtype(array.dtype)
        self.shape, self.rows = tuple(array.shape), int(array.chunks[0])
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.shape[1:], dtype=np.int64))

    @classmethod
    def of(cls, array: zarr.Array) -> RawChunks | None:
        from zarr.codecs import BytesCodec
        from zarr.storage import LocalStore

        store = array.store_path.store
        codecs = getattr(array.metadata, "codecs", ())
        dtype = np.dtype(array.dtype)
        if not (isinstance(store, LocalStore) and len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
                and dtype.kind in "biuf" and array.ndim >= 1 and array.shards is None and 0 not in array.shape[1:]
                and tuple(array.chunks[1:]) == tuple(array.shape[1:])
                and (dtype.itemsize == 1 or (codecs[0].endian is not None
                                             and codecs[0].endian.value == sys.byteorder))):
            return None
        return cls(os.path.join(str(store.root), array.store_path.path), array)

    def chunk_path(self, chunk: int) -> str:
        key = self.array.metadata.encode_chunk_key((chunk,) + (0,) * (len(self.shape) - 1))
        return os.path.join(self.root, *key.split("/"))

    def view(self, chunk: int) -> np.ndarray:
        """The rows of one chunk as a read-only memory map of its file."""
        path = self.chunk_path(chunk)
        rows = min(self.rows, self.shape[0] - chunk * self.rows)
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size < rows * self.row_bytes:
                    raise _short_chunk(path, rows * self.row_bytes - size)
                mapped = mmap.mmap(f.fileno(), rows * self.row_bytes, prot=mmap.PROT_READ,
                                   flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except FileNotFoundError:
            raise _missing_chunk(path, self.array, chunk) from None
        return np.frombuffer(mapped, dtype=self.dtype).reshape(rows, *self.shape[1:])

    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        stop = min(stop, self.shape[0])
        if out is None:
            out = np.empty((max(stop - start, 0), *self.shape[1:]), dtype=self.dtype)
        flat = out.reshape(-1).view(np.uint8)  # a view: `out` is contiguous
        for chunk in range(start // self.rows, -(-stop // self.rows)):
            lo, hi = max(start, chunk * self.rows), min(stop, (chunk + 1) * self.rows)
            want = flat[(lo - start) * self.row_bytes:(hi - start) * self.row_bytes]
            path = self.chunk_path(chunk)
            try:
                with open(path, "rb", buffering=0) as f:
                    f.seek((lo - chunk * self.rows) * self.row_bytes)
                    got = f.readinto(want)
            except FileNotFoundError:  # every chunk is written: a missing one is damage
                raise _missing_chunk(path, self.array, chunk) from None
            if got != len(want):
                raise _short_chunk(path, len(want) - got)
        return out


def _missing_chunk(path: str, array: zarr.Array, chunk: int) -> StoreError:
    return StoreError(f"{path}: chunk {chunk} of array '{array.path}' is missing; the store is damaged, "
                      "prepare it again")


def _short_chunk(path: str, missing: int) -> StoreError:
    return StoreError(f"{path}: chunk file is {missing} bytes short of the rows it should hold; the store is "
                      "damaged, prepare it again")


class Store:
    """A complete store, validated on open: every declared array exists and has the right length, and every
    file it was written with is there at its size (`integrity.check_files`)."""

    def __init__(self, url: str, storage_options: dict | None = None, check_files: bool = True):
        self.url, self.storage_options = str(url), storage_options
        self.root = open_root(self.url, "r", storage_options)
        self._arrays: dict[str, zarr.Array] = {}
        self._raw: dict[str, RawChunks | None] = {}
        self.attrs = attrs = dict(self.root.attrs)
        where = self.url
        if "biofm_store" not in attrs:
            raise StoreError(f"{where}: not a biofm store (no 'biofm_store' attribute)")
        if attrs["biofm_store"] != FORMAT_VERSION:
            raise StoreError(f"{where}: written in store format version {attrs['biofm_store']}, but this "
                             f"biofm reads version {FORMAT_VERSION}; run `biofm prepare` again with this "
                             "version")
        if not attrs.get("complete"):
            raise StoreError(f"{where}: the store is unfinished (an interrupted prepare); rerun the same "
                             "`biofm prepare` command to resume it")
        for key in ("source", "n_samples", "rows_per_chunk", "modalities", "tasks", "arrays"):
            if key not in attrs:
                raise StoreError(f"{where}: attribute '{key}' is missing; the store is damaged, prepare it again")
        self.n = n = int(attrs["n_samples"])
        self.source: str = attrs["source"]
        self.modalities: dict[str, dict] = attrs["modalities"]
        self.tasks: dict[str, dict] = attrs["tasks"]
        self.array_info: dict[str, dict] = attrs["arrays"]
        self.rows_per_chunk = int(attrs["rows_per_chunk"])
        self.offsets: dict[str, np.ndarray] = {}
        for name in INDEX_ARRAYS:
            self._check_fixed(name, (n,))
        for task, spec in self.tasks.items():
            width = label_width(spec)
            self._check_fixed(f"labels/{task}", (n, width) if width else (n,))
        for name, info in self.array_info.items():
            if info["ragged"]:
                values = self._array(name)
                self._check_fixed(name + ".offsets", (n + 1,))
                offsets = self._zarr_read(name + ".offsets")
                if (offsets[0] != 0 or np.any(np.diff(offsets) < 0)
                        or offsets[-1] != values.shape[0]):
                    raise StoreError(f"{where}: {name}.offsets do not match the rows of {name} (they must "
                                     f"start at 0, never decrease and end at its {values.shape[0]} rows); "
                                     "prepare the store again")
                self.offsets[name] = offsets.astype(np.int64)
            else:
                self._check_fixed(name, (n, *info["shape"]))
        if check_files:  # a missing or truncated chunk, named (a loader worker reopening a checked store skips it)
            integrity.check_files(self.url, storage_options)

    def _array(self, name: str) -> zarr.Array:
        # opening an array reads and parses its metadata: once per store object, not once per read
        cached = self._arrays.get(name)
        if cached is not None:
            return cached
        try:
            arr = self.root[name]
        except KeyError:
            arr = None
        if isinstance(arr, zarr.Array):
            self._arrays[name] = arr
        if not isinstance(arr, zarr.Array):
            raise StoreError(f"{self.url}: array '{name}' is missing; the store is damaged or was written by "
                             "an older prepare, prepare it again")
        return arr

    def _check_fixed(self, name: str, shape: tuple) -> zarr.Array:
        arr = self._array(name)
        if tuple(arr.shape) != tuple(shape):
            raise StoreError(f"{self.url}: array '{name}' has shape {tuple(arr.shape)} but the store has "
                             f"{self.n} samples (expected {tuple(shape)}); prepare the store again")
        return arr

    # -- reading
    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.n / self.rows_per_chunk))

    def index(self, name: str) -> np.ndarray:
        """`sample_id`, `subject_id` or `split` for every sample, as a numpy str array."""
        return _plain(self._zarr_read(f"index/{name}"))

    def labels(self, task: str) -> np.ndarray:
        """The labels of `task` for every sample ([N] or [N, C] float32, NaN = missing)."""
        return self.read_rows(0, self.n, [f"labels/{task}"])[f"labels/{task}"]

    def _zarr_read(self, name: str, start: int | None = None, stop: int | None = None) -> np.ndarray:
        """Rows of an array through zarr; a chunk that cannot be decoded is a StoreError naming it."""
        array = self._array(name)
        try:
            return array[start:stop] if start is not None or stop is not None else array[...]
        except Exception as err:  # noqa: BLE001 — zstd and zarr raise RuntimeError, ValueError, …
            rows = f"rows {start or 0}–{array.shape[0] if stop is None else stop}" if array.ndim else "its value"
            raise StoreError(f"{self.url}: array '{name}' ({rows}) cannot be decoded ({type(err).__name__}: "
                             f"{str(err)[:120]}); a chunk is corrupt — the store is damaged, prepare it again "
                             f"(`biofm verify {self.url}` names the file)") from None

    def arrays_of(self, modality: str) -> list[str]:
        return [name for name in self.array_info if name.split("/")[0] == modality]

    def read_rows(self, start: int, stop: int, names: Iterable[str], mapped: bool = False) -> dict[str, Column]:
        """Rows [start, stop) of each named array: whole chunks, one call per array. Uncompressed local
        arrays are read straight from their chunk files (`RawChunks`); with `mapped`, rows that lie in one
        chunk come back as a read-only memory map of it (the stream gathers from it, copying each
        sample's bytes once)."""
        out: dict[str, Column] = {}
        for name in names:
            raw = self._raw_chunks(name)
            if name in self.offsets:
                offsets = self.offsets[name]
                lo, hi = int(offsets[start]), int(offsets[stop])
                values = raw.read(lo, hi) if raw is not None else self._zarr_read(name, lo, hi)
                out[name] = Ragged(values, offsets[start:stop + 1] - lo)
            elif raw is None:
                out[name] = _plain(self._zarr_read(name, start, stop))
            elif mapped and stop > start and start // raw.rows == (stop - 1) // raw.rows:
                chunk = start // raw.rows
                offset = chunk * raw.rows
                out[name] = raw.view(chunk)[start - offset:stop - offset]
            else:
                out[name] = raw.read(start, stop)
        return out

    def _raw_chunks(self, name: str) -> RawChunks | None:
        if name not in self._raw:
            self._raw[name] = RawChunks.of(self._array(name)) if is_local(self.url) else None
        return self._raw[name]

    def checksum(self) -> str:
        """SHA-256 over every array (name, dtype, shape, values) and the attributes that define the store
        (all but its creation time): equal for stores of the same samples written with the same settings,
        whatever the order of their parts or the interruptions on the way. Reads a chunk of rows at a time."""
        digest = hashlib.sha256()
        attrs = {k: v for k, v in self.attrs.items() if k != "created"}
        digest.update(json.dumps(_normalise(attrs), sort_keys=True).encode())
        arrays = sorted((path, member) for path, member in self.root.members(max_depth=None)
                        if isinstance(member, zarr.Array))
        for name, array in arrays:
            strings = np.dtype(array.dtype).kind in "OTU"  # strings: their text, whatever width they were stored at
            digest.update(f"{name}:{'str' if strings else np.dtype(array.dtype).str}:{array.shape}".encode())
            rows = max(1, array.chunks[0]) if array.ndim else 1
            for start in range(0, max(array.shape[0] if array.ndim else 1, 1), rows):  # a chunk of rows at a time
                values = np.asarray(array[start:start + rows] if array.ndim else array[...])
                digest.update("".join(f"{v}\x00" for v in values.ravel().tolist()).encode() if strings
                              else np.ascontiguousarray(values).tobytes())
        return digest.hexdigest()

    def describe(self) -> str:
        tasks = ", ".join(f"{t} ({s['kind']})" for t, s in self.tasks.items())
        return (f"store {self.url}: source {self.source}, {self.n} samples, modalities "
                f"{sorted(self.modalities)}, tasks {tasks or 'none'}")
