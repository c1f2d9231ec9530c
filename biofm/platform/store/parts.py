"""Committed parts of an unfinished store: whether a part holds all its arrays, the fault injection of the
resume tests (BIOFM_KILL_AFTER_PARTS, BIOFM_PAUSE_AFTER_PARTS, BIOFM_PARTS_LOG), rows per chunk, and a
ragged array written from the parts in the final row order without holding it whole."""

from __future__ import annotations

import math
import os
import signal

import numpy as np
import zarr

from biofm.platform.store.format import MIB, _create_array, _write_chunked


def _chunk_rows(bytes_per_row: float, n: int, chunk_bytes: int, min_chunks: int) -> int:
    """Rows per chunk: about `chunk_bytes`, smaller (down to 1 MiB) to give at least `min_chunks`."""
    bytes_per_row = max(bytes_per_row, 1.0)
    rows = int(chunk_bytes // bytes_per_row)
    floor_rows = int(math.ceil(MIB / bytes_per_row))
    rows = min(rows, max(int(math.ceil(n / min_chunks)), floor_rows))
    return int(max(1, min(rows, max(n, 1))))


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


def _write_ragged_streaming(
    root: zarr.Group,
    name: str,
    parts: list[zarr.Group],
    perm: np.ndarray,
    chunk_bytes: int,
    rows_per_chunk: int,
    codec: str,
) -> None:
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
    out = _create_array(
        root, name, (int(offsets[-1]), *first.shape[1:]), first.dtype, (value_rows, *first.shape[1:]), codec
    )
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
            out[written : written + whole] = block[:whole]
            written += whole
            buffer, buffered = [block[whole:]], len(block) - whole
    if buffered:
        out[written : written + buffered] = np.concatenate(buffer)
    _write_chunked(root, name + ".offsets", offsets, max(rows_per_chunk + 1, 1 << 16), codec)
