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

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from biofm.platform.plan import Batch, Piece, _Pool, dist_rank_world, keep_fraction, split_evenly
from biofm.platform.ring import RING_BYTES, Ring
from biofm.platform.store import Ragged, Store, StoreError

READ_AHEAD = 2  # chunk reads in flight per stream


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

    def __init__(
        self,
        store: Store | str,
        split: str | None = "train",
        batch_size: int = 32,
        shuffle: bool = True,
        seed: int = 0,
        buffer_size: int = 1024,
        arrays: list[str] | None = None,
        tasks: list[str] | None = None,
        transform: Callable[[Batch], object] | None = None,
        storage_options: dict | None = None,
        with_ids: bool = False,
        fraction: float = 1.0,
    ):
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
        self.chunk_rows = [
            np.flatnonzero(wanted[c : c + self.rows_per_chunk]) for c in range(0, store.n, self.rows_per_chunk)
        ]
        self.n_selected = int(wanted.sum())
        # set by the loader before each iteration (in the main process, before workers start)
        self.epoch, self.rank, self.world, self.skip = 0, 0, 1, 0
        self.ring: Ring | None = None
        self.sample_bytes = self._sample_bytes(store)

    def _sample_bytes(self, store: Store) -> float:
        """Mean bytes per sample of the arrays read (to size the shared memory that carries batches)."""
        total = 0.0
        for name in self.names:
            info = store.array_info.get(name)
            if info is None:  # labels and ids
                total += 64
                continue
            row = np.dtype(info["dtype"] if info["dtype"] != "str" else "U16").itemsize * int(
                np.prod(info["shape"], dtype=np.int64)
            )
            total += row * (store.offsets[name][-1] / max(store.n, 1) if info["ragged"] else 1)
        return total

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_store"] = None  # workers reopen the store
        return state

    @property
    def store(self) -> Store:
        if self._store is None:  # in a loader worker: the store's files were checked when it was first opened
            self._store = Store(self.url, storage_options=self.storage_options, check_files=False)
        return self._store

    # -- the plan
    def batches_per_rank(self, world: int | None = None) -> int:
        world = self.world if world is None else world
        if self.n_selected < world:
            raise StoreError(
                f"{self.url}: split '{self.split}' has {self.n_selected} samples, fewer than "
                f"the {world} ranks; every rank needs at least one"
            )
        return max(1, math.ceil((self.n_selected // world) / self.batch_size))

    def __len__(self) -> int:
        return self.batches_per_rank()

    def plan(self, epoch: int, rank: int, world: int, worker: int, n_workers: int) -> tuple[list[Piece], np.ndarray]:
        """The chunk pieces and batch sizes of one (rank, worker) stream in one epoch."""
        n_chunks = len(self.chunk_rows)
        order = np.random.default_rng([self.seed, epoch]).permutation(n_chunks) if self.shuffle else np.arange(n_chunks)
        counts = np.array([len(self.chunk_rows[c]) for c in order], dtype=np.int64)
        cum = np.concatenate([[0], np.cumsum(counts)])
        total, n_batches = int(cum[-1]), self.batches_per_rank(world)
        rank_lo, rank_hi = split_evenly(total, world)[rank : rank + 2]
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
            use = self.chunk_rows[c][max(lo, cum[i]) - cum[i] : min(hi, cum[i + 1]) - cum[i]]
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
        ring = self.ring if info is not None else None
        empty = ring.allocator(worker) if ring is not None else np.empty
        for i, batch in enumerate(self._batches(pieces, sizes, rng, empty)):
            if i < skip_here:  # yielded before the resume
                if ring is not None:
                    ring.discard(worker)
                continue
            out = self.transform(batch) if self.transform is not None else batch
            yield ring.pack(out, worker) if ring is not None else out

    def _batches(
        self, pieces: list[Piece], sizes: np.ndarray, rng: np.random.Generator, empty: Callable = np.empty
    ) -> Iterator[Batch]:
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
            round_sizes = [int(x) for x in sizes[b : b + n_out]]
            # small samples: one gather for the whole round, then views (Python cost per batch matters);
            # large samples: one gather per batch (bytes copied once matter), in a worker straight into
            # the ring slot that carries the batch to the main process (`empty`)
            batches = pool.take_round(round_sizes) if pool.small else (pool.take(x, empty=empty) for x in round_sizes)
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
            cols = self.store.read_rows(piece.start, piece.stop, self.names, mapped=True)
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


def _as_is(batch):
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a `StoreStream` that tracks its epoch and position (Lightning saves and restores
    it through `state_dict` / `load_state_dict`). Workers are forked where the platform allows it and hand
    their batches over through a shared `Ring` of at most `ring_bytes` (0: DataLoader's own transfer)."""

    def __init__(
        self,
        stream: StoreStream,
        num_workers: int = 0,
        rank: int | None = None,
        world: int | None = None,
        ring_bytes: int = RING_BYTES,
        **kwargs,
    ):
        if num_workers > 0 and "multiprocessing_context" not in kwargs:
            kwargs["multiprocessing_context"] = (
                "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
            )
        kwargs.setdefault("pin_memory", False)
        kwargs.setdefault("collate_fn", _as_is)  # the stream's transform already made the batch
        super().__init__(stream, batch_size=None, num_workers=num_workers, persistent_workers=False, **kwargs)
        self.stream = stream
        self._rank, self._world = rank, world
        # workers hand batches over through a shared `Ring` (forked workers, unpinned batches only)
        self.ring_bytes = ring_bytes
        self._batch_bytes = 2.0 * stream.sample_bytes * (stream.batch_size + 1)  # until a batch was seen
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
        ring = self.stream.ring = self._ring()
        return self._counted(super().__iter__(), ring)

    def _ring(self) -> Ring | None:
        context = self.multiprocessing_context
        forked = context is not None and context.get_start_method() == "fork"
        if not (self.num_workers and forked and not self.pin_memory and self.ring_bytes > 0):
            return None
        return Ring.for_loader(self.num_workers, self.prefetch_factor or 2, self._batch_bytes, self.ring_bytes)

    def _counted(self, it, ring: Ring | None):
        try:
            for batch in it:
                self.yielded += 1
                yield ring.unpack(batch) if ring is not None else batch
        finally:
            if ring is not None and ring.needed:  # size the next epoch's slots by what batches carried
                self._batch_bytes = ring.needed * 1.1

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self.yielded, "world": self._rank_world()[1], "seed": self.stream.seed}

    def load_state_dict(self, state: dict) -> None:
        epoch, yielded = int(state["epoch"]), int(state["yielded"])
        if state.get("world") != self._rank_world()[1] or state.get("seed") != self.stream.seed:
            warnings.warn(
                "the loader state was saved with another number of ranks or seed; the epoch "
                "restarts from its beginning",
                stacklevel=2,
            )
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
