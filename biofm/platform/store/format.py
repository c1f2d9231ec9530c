"""The store format: paths and the root group, ragged columns, codecs and array creation, task-spec checks."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

from biofm.platform import integrity
from biofm.platform.errors import StoreError
from biofm.platform.integrity import is_local
from biofm.platform.integrity import local_path as _local_path
from biofm.tasks.kinds import SpecError, check_spec

# Variable-length strings are not yet in the Zarr v3 core spec; zarr warns on every string array.
warnings.filterwarnings("ignore", message=".*(vlen-utf8|variable-length|VariableLengthUTF8|string).*", module="zarr.*")
# the checksums file sits beside zarr's metadata; zarr names every file it does not know when it lists members
warnings.filterwarnings("ignore", message=f".*{integrity.MANIFEST}.*not recognized", module="zarr.*")


FORMAT_VERSION = 2  # 2: every chunk written, checksums of every file (integrity.py), labels filled with NaN


SPLITS = ("train", "val", "test")


INDEX_ARRAYS = ("index/sample_id", "index/subject_id", "index/split")


MIB = 1 << 20


def open_root(
    url: str, mode: str = "r", storage_options: dict | None = None, attributes: dict | None = None
) -> zarr.Group:
    """Open the store's root group; any fsspec URL works as a path (`memory://`, `s3://`, `file://`).
    With mode "w", `attributes` are written with the group's metadata, in one file."""
    url = str(url)
    if is_local(url):
        store = zarr.storage.LocalStore(_local_path(url), read_only=(mode == "r"))
    else:
        store = zarr.storage.FsspecStore.from_url(url, storage_options=storage_options, read_only=(mode == "r"))
    try:
        if attributes is not None:
            return zarr.open_group(store, mode=mode, zarr_format=3, attributes=attributes)
        return zarr.open_group(store, mode=mode, zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as err:
        if is_local(url) and os.path.exists(_local_path(url)):
            raise StoreError(
                f"{url}: not a biofm store (no zarr group metadata, zarr.json, in it). Check the "
                "path, or run `biofm prepare …` to write a store there."
            ) from None
        raise StoreError(
            f"{url}: no store at this path (it does not exist). Check the path, or run `biofm prepare …` to write it."
        ) from err


def _exists(url: str, storage_options: dict | None) -> bool:
    try:
        open_root(url, "r", storage_options)
        return True
    except StoreError:
        return False


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
        return self.values[self.offsets[i] : self.offsets[i + 1]]

    def slice(self, start: int, stop: int) -> Ragged:
        lo, hi = self.offsets[start], self.offsets[stop]
        return Ragged(self.values[lo:hi], self.offsets[start : stop + 1] - lo)

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


def _describe(col: Column) -> dict:
    values = col.values if isinstance(col, Ragged) else col
    n = max(len(col), 1)
    return {
        "ragged": isinstance(col, Ragged),
        "dtype": _dtype_name(values.dtype),
        "shape": list(values.shape[1:]),
        "bytes_per_sample": _nbytes(values) / n,
    }


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
    return group.create_array(
        name,
        shape=shape,
        dtype=dtype,
        chunks=chunks,
        overwrite=True,
        compressors=compressors_for(dtype if kind not in "UTO" else str, codec),
        fill_value=np.nan if kind == "f" else None,
        config={"write_empty_chunks": True},
    )


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


def _plain(values: np.ndarray) -> np.ndarray:
    """zarr returns strings as numpy's StringDType; give plain fixed-width str arrays back."""
    values = np.asarray(values)
    if values.dtype.kind in "TO" or isinstance(values.dtype, np.dtypes.StringDType):
        return values.astype(object).astype(str)
    return values
