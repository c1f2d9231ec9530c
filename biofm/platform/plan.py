"""The epoch plan's parts: the (rank, world) of this process, pieces of chunks, even splits, a seeded fraction
of the wanted samples, and the pool of rows read from chunks that a stream draws its batches from."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch.distributed as dist

from biofm.platform.store import Column, Ragged, slice_rows, take_rows

Batch = dict[str, Column]
SMALL_SAMPLE_BYTES = 16 << 10  # below this, batches of a round are gathered together


def dist_rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@dataclass(frozen=True)
class Piece:
    """Rows of one chunk that a worker uses: chunk rows [start, stop), and positions within them."""

    start: int
    stop: int
    rows: np.ndarray  # indices into [0, stop - start)


def split_evenly(total: int, parts: int) -> np.ndarray:
    """Boundaries [parts + 1] that cut `total` items into `parts` runs differing by at most one."""
    return (total * np.arange(parts + 1)) // max(parts, 1)


def keep_fraction(wanted: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A random `fraction` of the True rows of `wanted` (at least one), the same ones for a given seed."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1.0:
        return wanted
    rows = np.flatnonzero(wanted)
    kept = np.zeros(len(wanted), dtype=bool)
    kept[np.random.default_rng(seed).permutation(rows)[: max(1, round(fraction * len(rows)))]] = True
    return kept


class _Pool:
    """Blocks of rows read from chunks, and a (shuffled) queue of the rows not yet emitted."""

    def __init__(self):
        self.blocks: dict[int, Batch] = {}
        self.left: dict[int, int] = {}
        self.queue_block = np.zeros(0, dtype=np.int64)
        self.queue_row = np.zeros(0, dtype=np.int64)
        self._next_id = 0
        self.bytes_per_row: float | None = None

    def __len__(self) -> int:
        return len(self.queue_block)

    def add(self, cols: Batch, rows: np.ndarray, rng: np.random.Generator | None) -> None:
        block = self._next_id
        self._next_id += 1
        self.blocks[block], self.left[block] = cols, len(rows)
        if self.bytes_per_row is None:
            n = max(len(cols["row"]), 1)
            self.bytes_per_row = (
                sum(
                    (c.values.nbytes if isinstance(c, Ragged) else c.nbytes)
                    for c in cols.values()
                    if hasattr(c, "nbytes") or isinstance(c, Ragged)
                )
                / n
            )
        self.queue_block = np.concatenate([self.queue_block, np.full(len(rows), block)])
        self.queue_row = np.concatenate([self.queue_row, rows])
        if rng is not None:
            perm = rng.permutation(len(self.queue_block))
            self.queue_block, self.queue_row = self.queue_block[perm], self.queue_row[perm]

    @property
    def small(self) -> bool:
        return self.bytes_per_row <= SMALL_SAMPLE_BYTES

    def take_round(self, sizes: list[int]) -> list[Batch]:
        """Several batches at once, in queue order: one grouped gather, one reorder, then views."""
        total = sum(sizes)
        order = np.argsort(self.queue_block[:total], kind="stable")
        gathered = self.take(total, order)
        restore = np.empty_like(order)
        restore[order] = np.arange(total)
        gathered = {k: take_rows(v, restore) for k, v in gathered.items()}
        bounds = np.concatenate([[0], np.cumsum(sizes)])
        return [
            {k: slice_rows(v, int(lo), int(hi)) for k, v in gathered.items()} for lo, hi in zip(bounds[:-1], bounds[1:])
        ]

    def take(self, size: int, order: np.ndarray | None = None, empty: Callable = np.empty) -> Batch:
        """`size` rows from the front of the queue, gathered block by block (grouped by block)."""
        blocks, rows = self.queue_block[:size], self.queue_row[:size]
        self.queue_block, self.queue_row = self.queue_block[size:], self.queue_row[size:]
        if order is None:
            order = np.argsort(blocks, kind="stable")
        blocks, rows = blocks[order], rows[order]
        ids, starts = np.unique(blocks, return_index=True)
        bounds = list(starts) + [len(blocks)]
        segments = [
            (int(block), rows[bounds[i] : bounds[i + 1]], bounds[i], bounds[i + 1]) for i, block in enumerate(ids)
        ]
        first = self.blocks[segments[0][0]]
        out: Batch = {}
        for name, col in first.items():
            if len(segments) == 1:
                out[name] = take_rows(col, segments[0][1])
            elif isinstance(col, Ragged):
                out[name] = Ragged.concat([self.blocks[b][name].take(picked) for b, picked, _, _ in segments])
            else:
                # fixed arrays: gather every block's rows straight into one batch array (one copy); strings
                # take the widest of the blocks' widths
                dtype = (
                    np.result_type(*[self.blocks[b][name].dtype for b, _, _, _ in segments])
                    if col.dtype.kind == "U"
                    else col.dtype
                )
                values = empty((size, *col.shape[1:]), dtype=dtype)
                for b, picked, lo, hi in segments:
                    block = self.blocks[b][name]
                    if block.dtype == dtype:
                        np.take(block, picked, axis=0, out=values[lo:hi])
                    else:  # a narrower string block: numpy's take will not widen into `out`
                        values[lo:hi] = block[picked]
                out[name] = values
        for b, picked, _, _ in segments:
            self.left[b] -= len(picked)
            if self.left[b] == 0:
                del self.blocks[b], self.left[b]
        return out
