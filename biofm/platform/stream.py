"""Streaming a store: whole chunks, shuffled per epoch, mixed in a buffer, split over (rank, worker).

The plan of an epoch is a pure function of `(seed, epoch)`: the chunk order is a seeded permutation, the
samples of the wanted split are laid out in that order, and the sequence is cut into one contiguous span
per rank and per worker. Every rank gets the same number of batches (batch sizes may differ by one), every
sample is seen exactly once per epoch, and a loader resumed from `state_dict()` yields exactly the
batches it had not yet yielded.
"""

from __future__ import annotations

import math
import warnings
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from biofm.platform.store import Column, Ragged, Store, StoreError, slice_rows, take_rows

Batch = dict[str, Column]
READ_AHEAD = 2  # chunk reads in flight per stream
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
    kept[np.random.default_rng(seed).permutation(rows)[:max(1, round(fraction * len(rows)))]] = True
    return kept


class StoreStream(IterableDataset):
    """An iterable over one split of one store that yields whole batches (use `StreamLoader`).

    Args:
        store: a `Store` or its URL.
        split: "train", "val", "test" or None for every sample.
        batch_size: samples per batch; batches may hold one more or fewer so that every rank takes the
            same number of steps and every sample is seen once.
        shuffle: shuffle chunk order per epoch and samples within a buffer of `buffer_size`.
        arrays: array names to read (default: every array of the store); labels are always read.
        transform: applied to each batch in the worker (e.g. a modality's collate).
        with_ids: add `index/sample_id` to each batch (for predictions; never needed to train).
        fraction: keep only this fraction of the split's samples, the same ones for a given seed
            (low-label experiments).
    """

    def __init__(self, store: Store | str, split: str | None = "train", batch_size: int = 32,
                 shuffle: bool = True, seed: int = 0, buffer_size: int = 1024,
                 arrays: list[str] | None = None, tasks: list[str] | None = None,
                 transform: Callable[[Batch], object] | None = None, storage_options: dict | None = None,
                 with_ids: bool = False, fraction: float = 1.0):
        store = store if isinstance(store, Store) else Store(store, storage_options=storage_options)
        self.url, self.storage_options = store.url, store.storage_options
        self._store: Store | None = store
        self.source = store.source
        self.split, self.batch_size, self.shuffle, self.seed = split, int(batch_size), shuffle, seed
        self.buffer_size = int(buffer_size) if shuffle else 0
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.tasks = list(store.tasks) if tasks is None else list(tasks)
        missing = sorted(set(self.tasks) - set(store.tasks))
        if missing:
            raise StoreError(f"{store.url}: no labels for tasks {missing}; it has {sorted(store.tasks)}")
        names = list(store.array_info) if arrays is None else list(arrays)
        unknown = sorted(set(names) - set(store.array_info))
        if unknown:
            raise StoreError(f"{store.url}: no arrays {unknown}; it has {sorted(store.array_info)}")
        # sample ids only where asked (prediction): never in a training batch
        self.names = names + [f"labels/{t}" for t in self.tasks] + (["index/sample_id"] if with_ids else [])
        self.transform = transform
        self.rows_per_chunk, self.n = store.rows_per_chunk, store.n
        wanted = np.ones(store.n, dtype=bool) if split is None else store.index("split") == split
        wanted = keep_fraction(wanted, fraction, seed)
        # selected rows of each chunk, computed once: [n_chunks] arrays of in-chunk positions
        self.chunk_rows = [np.flatnonzero(wanted[c:c + self.rows_per_chunk])
                           for c in range(0, store.n, self.rows_per_chunk)]
        self.n_selected = int(wanted.sum())
        # set by the loader before each iteration (in the main process, before workers start)
        self.epoch, self.rank, self.world, self.skip = 0, 0, 1, 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # workers reopen the store
        return state

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.url, storage_options=self.storage_options)
        return self._store

    # -- the plan
    def batches_per_rank(self, world: int | None = None) -> int:
        world = self.world if world is None else world
        if self.n_selected < world:
            raise StoreError(f"{self.url}: split '{self.split}' has {self.n_selected} samples, fewer than "
                             f"the {world} ranks; every rank needs at least one")
        return max(1, math.ceil((self.n_selected // world) / self.batch_size))

    def __len__(self) -> int:
        return self.batches_per_rank()

    def plan(self, epoch: int, rank: int, world: int, worker: int, n_workers: int
             ) -> tuple[list[Piece], np.ndarray]:
        """The chunk pieces and batch sizes of one (rank, worker) stream in one epoch."""
        n_chunks = len(self.chunk_rows)
        order = (np.random.default_rng([self.seed, epoch]).permutation(n_chunks) if self.shuffle
                 else np.arange(n_chunks))
        counts = np.array([len(self.chunk_rows[c]) for c in order], dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(counts)])
        total, n_batches = int(cum[-1]), self.batches_per_rank(world)
        rank_lo, rank_hi = split_evenly(total, world)[rank:rank + 2]
        # workers share the rank's batches round-robin; worker w takes batches j with j % n_workers == w
        per_worker = np.array([len(range(w, n_batches, n_workers)) for w in range(n_workers)])
        bounds = rank_lo + ((rank_hi - rank_lo) * np.concatenate([[0], np.cumsum(per_worker)])) // n_batches
        lo, hi = int(bounds[worker]), int(bounds[worker + 1])
        k = int(per_worker[worker])
        sizes = np.diff(split_evenly(hi - lo, k)) if k else np.zeros(0, dtype=np.int64)
        pieces = []
        first = int(np.searchsorted(cum, lo, side="right")) - 1
        for i in range(max(first, 0), n_chunks):
            if cum[i] >= hi:
                break
            c = int(order[i])
            use = self.chunk_rows[c][max(lo, cum[i]) - cum[i]:min(hi, cum[i + 1]) - cum[i]]
            if len(use):
                start = c * self.rows_per_chunk
                pieces.append(Piece(start, min(start + self.rows_per_chunk, self.n), use))
        return pieces, sizes

    # -- iteration
    def __iter__(self) -> Iterator[object]:
        info = get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # after a resume that skipped `skip` batches, the loader's worker 0 plays the part of the worker
        # that owns batch `skip`, so the batch order is the same as in an uninterrupted epoch
        logical = (worker + self.skip) % n_workers
        skip_here = len(range(logical, self.skip, n_workers))
        pieces, sizes = self.plan(self.epoch, self.rank, self.world, logical, n_workers)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, logical, 0xB10F])
        for i, batch in enumerate(self._batches(pieces, sizes, rng)):
            if i >= skip_here:
                yield self.transform(batch) if self.transform is not None else batch

    def _batches(self, pieces: list[Piece], sizes: np.ndarray, rng: np.random.Generator) -> Iterator[Batch]:
        """Read pieces, hold them as blocks, and emit batches gathered from a shuffled index of held rows.

        Only the index (block, row) is shuffled; each sample's bytes are copied once, into its batch."""
        if not len(sizes):
            return
        pool = _Pool()
        b = 0
        for p, cols in enumerate(self._read_ahead(pieces)):
            piece = pieces[p]
            pool.add(cols, piece.rows, rng if self.shuffle else None)
            last = p == len(pieces) - 1
            if not last and len(pool) < self.buffer_size + sizes[min(b, len(sizes) - 1)]:
                continue
            keep = 0 if last else self.buffer_size // 2
            n_out = int(np.searchsorted(np.cumsum(sizes[b:]), len(pool) - keep, side="right"))
            if n_out == 0:
                continue
            round_sizes = [int(x) for x in sizes[b:b + n_out]]
            # small samples: one gather for the whole round, then views (Python cost per batch matters);
            # large samples: one gather per batch (bytes copied once matter)
            batches = pool.take_round(round_sizes) if pool.small else (pool.take(x) for x in round_sizes)
            for batch in batches:
                batch["source"] = self.source
                yield batch
            b += n_out
        if b != len(sizes):  # the plan and the data disagree: never silently short
            raise RuntimeError(f"{self.url}: stream produced {b} of {len(sizes)} planned batches")


    def _read_ahead(self, pieces: list[Piece]) -> Iterator[Batch]:
        """Chunks in plan order, with up to `READ_AHEAD` reads in flight: zarr decodes in threads that
        release the GIL, so reading overlaps with batching (and with the next chunk's read)."""
        def read(piece: Piece) -> Batch:
            cols = self.store.read_rows(piece.start, piece.stop, self.names)
            cols["row"] = np.arange(piece.start, piece.stop)
            return cols

        if get_worker_info() is not None:  # loader workers already read in parallel; threads only contend
            yield from (read(piece) for piece in pieces)
            return
        with ThreadPoolExecutor(max_workers=READ_AHEAD) as pool:
            pending = deque(pool.submit(read, piece) for piece in pieces[:READ_AHEAD])
            for i in range(len(pieces)):
                cols = pending.popleft().result()
                if i + READ_AHEAD < len(pieces):
                    pending.append(pool.submit(read, pieces[i + READ_AHEAD]))
                yield cols


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
            self.bytes_per_row = sum((c.values.nbytes if isinstance(c, Ragged) else c.nbytes)
                                     for c in cols.values() if hasattr(c, "nbytes") or isinstance(c, Ragged)) / n
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
        return [{k: slice_rows(v, int(lo), int(hi)) for k, v in gathered.items()}
                for lo, hi in zip(bounds[:-1], bounds[1:])]

    def take(self, size: int, order: np.ndarray | None = None) -> Batch:
        """`size` rows from the front of the queue, gathered block by block (grouped by block)."""
        blocks, rows = self.queue_block[:size], self.queue_row[:size]
        self.queue_block, self.queue_row = self.queue_block[size:], self.queue_row[size:]
        if order is None:
            order = np.argsort(blocks, kind="stable")
        blocks, rows = blocks[order], rows[order]
        ids, starts = np.unique(blocks, return_index=True)
        bounds = list(starts) + [len(blocks)]
        segments = [(int(block), rows[bounds[i]:bounds[i + 1]], bounds[i], bounds[i + 1])
                    for i, block in enumerate(ids)]
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
                dtype = np.result_type(*[self.blocks[b][name].dtype for b, _, _, _ in segments]) \
                    if col.dtype.kind == "U" else col.dtype
                values = np.empty((size, *col.shape[1:]), dtype=dtype)
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


def _as_is(batch):
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a `StoreStream` that tracks its epoch and position (Lightning saves and restores
    it through `state_dict` / `load_state_dict`). Workers are forked where the platform allows it."""

    def __init__(self, stream: StoreStream, num_workers: int = 0, rank: int | None = None,
                 world: int | None = None, **kwargs):
        if num_workers > 0 and "multiprocessing_context" not in kwargs:
            kwargs["multiprocessing_context"] = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
        kwargs.setdefault("pin_memory", False)
        kwargs.setdefault("collate_fn", _as_is)  # the stream's transform already made the batch
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs)
        self.stream = stream
        self._rank, self._world = rank, world
        self.epoch, self.yielded = 0, 0
        self._started, self._resume = False, False

    def _rank_world(self) -> tuple[int, int]:
        rank, world = dist_rank_world()
        return (rank if self._rank is None else self._rank), (world if self._world is None else self._world)

    def __len__(self) -> int:
        return self.stream.batches_per_rank(self._rank_world()[1])

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.yielded, self._resume = int(epoch), 0, True

    def __iter__(self):
        if self._resume:
            self._resume = False
        elif self._started:
            self.epoch, self.yielded = self.epoch + 1, 0
        self._started = True
        self.stream.rank, self.stream.world = self._rank_world()
        self.stream.epoch, self.stream.skip = self.epoch, self.yielded
        return self._counted(super().__iter__())

    def _counted(self, it):
        for batch in it:
            self.yielded += 1
            yield batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded, "world": self._rank_world()[1],
                "seed": self.stream.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        if state.get("world") != self._rank_world()[1] or state.get("seed") != self.stream.seed:
            warnings.warn("the loader state was saved with another number of ranks or seed; the epoch "
                          "restarts from its beginning", stacklevel=2)
            yielded = 0
        self.epoch, self.yielded, self._resume, self._started = epoch, yielded, True, True


def to_tensors(batch: Batch) -> dict:
    """numpy → torch without copies: fixed arrays as tensors, ragged ones as (values, offsets)."""
    out: dict = {}
    for name, col in batch.items():
        if isinstance(col, Ragged):
            out[name] = (torch.from_numpy(np.ascontiguousarray(col.values)), torch.from_numpy(col.offsets))
        elif isinstance(col, np.ndarray) and col.dtype.kind not in "UTO":
            out[name] = torch.from_numpy(np.ascontiguousarray(col))
        else:
            out[name] = col
    return out
