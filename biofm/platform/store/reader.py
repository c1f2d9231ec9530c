"""Reading a store: its attributes and arrays checked on open, rows and whole chunks read for the stream."""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import sys
from collections.abc import Iterable

import numpy as np
import zarr

from biofm.platform import integrity
from biofm.platform.errors import StoreError
from biofm.platform.integrity import is_local
from biofm.platform.store.format import (
    FORMAT_VERSION,
    INDEX_ARRAYS,
    Column,
    Ragged,
    _normalise,
    _plain,
    open_root,
)
from biofm.tasks.kinds import label_width, task_kind


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
        if not (
            isinstance(store, LocalStore)
            and len(codecs) == 1
            and isinstance(codecs[0], BytesCodec)
            and dtype.kind in "biuf"
            and array.ndim >= 1
            and array.shards is None
            and 0 not in array.shape[1:]
            and tuple(array.chunks[1:]) == tuple(array.shape[1:])
            and (dtype.itemsize == 1 or (codecs[0].endian is not None and codecs[0].endian.value == sys.byteorder))
        ):
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
                mapped = mmap.mmap(
                    f.fileno(),
                    rows * self.row_bytes,
                    prot=mmap.PROT_READ,
                    flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                )
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
            want = flat[(lo - start) * self.row_bytes : (hi - start) * self.row_bytes]
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
    return StoreError(
        f"{path}: chunk {chunk} of array '{array.path}' is missing; the store is damaged, prepare it again"
    )


def _short_chunk(path: str, missing: int) -> StoreError:
    return StoreError(
        f"{path}: chunk file is {missing} bytes short of the rows it should hold; the store is "
        "damaged, prepare it again"
    )


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
            raise StoreError(
                f"{where}: written in store format version {attrs['biofm_store']}, but this "
                f"biofm reads version {FORMAT_VERSION}; run `biofm prepare` again with this "
                "version"
            )
        if not attrs.get("complete"):
            raise StoreError(
                f"{where}: the store is unfinished (an interrupted prepare); rerun the same "
                "`biofm prepare` command to resume it"
            )
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
                if offsets[0] != 0 or np.any(np.diff(offsets) < 0) or offsets[-1] != values.shape[0]:
                    raise StoreError(
                        f"{where}: {name}.offsets do not match the rows of {name} (they must "
                        f"start at 0, never decrease and end at its {values.shape[0]} rows); "
                        "prepare the store again"
                    )
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
            raise StoreError(
                f"{self.url}: array '{name}' is missing; the store is damaged or was written by "
                "an older prepare, prepare it again"
            )
        return arr

    def _check_fixed(self, name: str, shape: tuple) -> zarr.Array:
        arr = self._array(name)
        if tuple(arr.shape) != tuple(shape):
            raise StoreError(
                f"{self.url}: array '{name}' has shape {tuple(arr.shape)} but the store has "
                f"{self.n} samples (expected {tuple(shape)}); prepare the store again"
            )
        return arr

    # -- reading
    @property
    def n_chunks(self) -> int:
        return max(1, math.ceil(self.n / self.rows_per_chunk))

    def index(self, name: str) -> np.ndarray:
        """`sample_id`, `subject_id` or `split` for every sample, as a numpy str array."""
        return _plain(self._zarr_read(f"index/{name}"))

    def present(self, modality: str) -> np.ndarray:
        """Whether each sample has `modality` ([N] bool)."""
        return np.asarray(self.read_rows(0, self.n, [f"{modality}/present"])[f"{modality}/present"], dtype=bool)

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
            raise StoreError(
                f"{self.url}: array '{name}' ({rows}) cannot be decoded ({type(err).__name__}: "
                f"{str(err)[:120]}); a chunk is corrupt — the store is damaged, prepare it again "
                f"(`biofm verify {self.url}` names the file)"
            ) from None

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
                out[name] = Ragged(values, offsets[start : stop + 1] - lo)
            elif raw is None:
                out[name] = _plain(self._zarr_read(name, start, stop))
            elif mapped and stop > start and start // raw.rows == (stop - 1) // raw.rows:
                chunk = start // raw.rows
                offset = chunk * raw.rows
                out[name] = raw.view(chunk)[start - offset : stop - offset]
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
        arrays = sorted(
            (path, member) for path, member in self.root.members(max_depth=None) if isinstance(member, zarr.Array)
        )
        for name, array in arrays:
            strings = np.dtype(array.dtype).kind in "OTU"  # strings: their text, whatever width they were stored at
            digest.update(f"{name}:{'str' if strings else np.dtype(array.dtype).str}:{array.shape}".encode())
            rows = max(1, array.chunks[0]) if array.ndim else 1
            for start in range(0, max(array.shape[0] if array.ndim else 1, 1), rows):  # a chunk of rows at a time
                values = np.asarray(array[start : start + rows] if array.ndim else array[...])
                digest.update(
                    "".join(f"{v}\x00" for v in values.ravel().tolist()).encode()
                    if strings
                    else np.ascontiguousarray(values).tobytes()
                )
        return digest.hexdigest()

    def summary(self) -> dict:
        """What `biofm info` shows: samples per split; per task its kind, labelled samples per split, missing
        fraction and prevalence (positives, classes, or the value range); each modality's presence rate; each
        array's shape, dtype and stored bytes; the size on disk. Counts only: no id, no text."""
        files = integrity.list_files(self.url, self.storage_options)

        def stored(name: str) -> int:  # the array's files (its offsets' too, when ragged)
            return sum(size for key, size in files.items() if key.startswith((f"{name}/", f"{name}.offsets/")))

        split = self.index("split")
        splits = {name: int((split == name).sum()) for name in ("train", "val", "test")}
        tasks = {}
        for task, spec in self.tasks.items():
            labels = self.labels(task)
            present = ~np.isnan(labels) if labels.ndim == 1 else ~np.isnan(labels).all(axis=1)
            entry = {
                "kind": spec["kind"],
                "labelled": {name: int((present & (split == name)).sum()) for name in splits},
                "missing_fraction": round(float(1 - present.mean()), 4) if self.n else math.nan,
            }
            entry.update(task_kind(task, spec).label_summary(labels[present]))
            tasks[task] = entry
        arrays = {}
        for name, info in self.array_info.items():
            array = self._array(name)
            arrays[name] = {
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "ragged": bool(info["ragged"]),
                "bytes": stored(name),
            }
        return {
            "store": self.url,
            "source": self.source,
            "samples": self.n,
            "splits": splits,
            "tasks": tasks,
            "modalities": {m: round(float(self.present(m).mean()), 4) if self.n else math.nan for m in self.modalities},
            "arrays": arrays,
            "bytes_on_disk": sum(files.values()),
        }

    def describe(self) -> str:
        tasks = ", ".join(f"{t} ({s['kind']})" for t, s in self.tasks.items())
        return (
            f"store {self.url}: source {self.source}, {self.n} samples, modalities "
            f"{sorted(self.modalities)}, tasks {tasks or 'none'}"
        )
