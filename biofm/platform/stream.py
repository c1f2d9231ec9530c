"""Streaming a store: whole chunks, shuffled per epoch, mixed in a buffer, split over (rank, worker).

The plan of an epoch is a pure function of `(seed, epoch)`: the chunk order is a seeded permutation, the
samples of the wanted split are laid out in that order, and the sequence is cut into one contiguous span
per rank and per worker. Every rank gets the same number of batches (batch sizes may differ by one), every
sample is seen exactly once per epoch, and a loader resumed from `state_dict()` yields exactly the
batches it had not yet yielded.
"""

from __future__ import annotations

import math
import mmap
import multiprocessing
import warnings
import weakref
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
RING_BYTES = 512 << 20  # at most this much shared memory per loader for handing batches over from workers


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
            row = np.dtype(info["dtype"] if info["dtype"] != "str" else "U16").itemsize * \
                int(np.prod(info["shape"], dtype=np.int64))
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
        ring = self.ring if info is not None else None
        empty = ring.allocator(worker) if ring is not None else np.empty
        for i, batch in enumerate(self._batches(pieces, sizes, rng, empty)):
            if i < skip_here:  # yielded before the resume
                if ring is not None:
                    ring.discard(worker)
                continue
            out = self.transform(batch) if self.transform is not None else batch
            yield ring.pack(out, worker) if ring is not None else out

    def _batches(self, pieces: list[Piece], sizes: np.ndarray, rng: np.random.Generator,
                 empty: Callable = np.empty) -> Iterator[Batch]:
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
            # large samples: one gather per batch (bytes copied once matter), in a worker straight into
            # the ring slot that carries the batch to the main process (`empty`)
            batches = pool.take_round(round_sizes) if pool.small else (pool.take(x, empty=empty)
                                                                       for x in round_sizes)
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

    def take(self, size: int, order: np.ndarray | None = None, empty: Callable = np.empty) -> Batch:
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


@dataclass(frozen=True)
class _Packed:
    """A tensor (or numpy array) left in a ring slot: where it starts, its dtype and shape."""

    start: int
    dtype: torch.dtype | np.dtype
    shape: tuple

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class _RingBatch:
    """A batch whose tensors wait in slot `slot` of worker `worker`'s part of the ring."""

    worker: int
    slot: int
    batch: object


class Ring:
    """Shared memory, mapped before the workers fork, through which they hand batches to the main process.

    DataLoader moves each tensor of a batch into a fresh shared-memory segment and passes its file
    descriptor over a socket: per tensor a new segment, page faults on its pages and a connection, which
    caps a loader at about 350 batches of 4 MiB a second on 2 cores. Here each worker owns `slots` fixed
    slots of one mapping made before the fork. A gather writes the batch's arrays straight into a free slot
    (`allocator`), `pack` moves any other tensor of the transformed batch there and sends only their places,
    and the main process wraps the slot's memory as tensors without a copy. The slot is lent, not copied:
    it is freed when the last tensor (or view) of its batch is freed. A worker that finds no free slot, or
    a tensor that does not fit, falls back to DataLoader's own transfer, so nothing ever waits on the ring
    and a consumer that keeps batches only makes the loader slower."""

    ALIGN = 64

    def __init__(self, workers: int, slots: int, slot_bytes: int):
        self.workers, self.slots = workers, slots
        self.slot_bytes = -(-slot_bytes // self.ALIGN) * self.ALIGN
        self.header = -(-(workers * slots) // 4096) * 4096  # one byte per slot: 1 while lent
        self.memory = mmap.mmap(-1, self.header + workers * slots * self.slot_bytes)  # shared with forked children
        self.state = np.frombuffer(self.memory, dtype=np.uint8, count=workers * slots)
        context = multiprocessing.get_context("fork")
        self.free = [context.Semaphore(slots) for _ in range(workers)]  # free slots of each worker
        self.open: tuple[int, int] | None = None  # in a worker: the slot being filled and its bytes used
        self.needed = 0  # the most tensor bytes one batch has carried (main process)
        self.lent = 0  # batches that came through a slot (main process)

    def _slot(self, slot: int) -> np.ndarray:
        return np.frombuffer(self.memory, dtype=np.uint8, count=self.slot_bytes,
                             offset=self.header + slot * self.slot_bytes)

    def _take_slot(self, worker: int) -> bool:
        if self.open is None and self.free[worker].acquire(block=False):
            mine = self.state[worker * self.slots:(worker + 1) * self.slots]
            slot = worker * self.slots + int(np.flatnonzero(mine == 0)[0])
            self.state[slot] = 1
            self.open = (slot, 0)
        return self.open is not None

    def _release(self, worker: int, slot: int) -> None:
        self.state[slot] = 0
        self.free[worker].release()  # after the flag: a worker acquires before it looks at the flags

    def discard(self, worker: int) -> None:
        """In a worker: give back the slot a batch that is not sent was gathered into."""
        if self.open is not None:
            self._release(worker, self.open[0])
            self.open = None

    def _carve(self, nbytes: int) -> np.ndarray | None:
        slot, used = self.open
        start = -(-used // self.ALIGN) * self.ALIGN
        if start + nbytes > self.slot_bytes:
            return None
        self.open = (slot, start + nbytes)
        return self._slot(slot)[start:start + nbytes]

    def allocator(self, worker: int) -> Callable[..., np.ndarray]:
        """`np.empty` for a batch's numeric arrays that places them in the slot that will carry the batch,
        so a gather writes each sample once and `pack` finds it already in place."""
        def empty(shape, dtype=float) -> np.ndarray:
            dtype = np.dtype(dtype)
            nbytes = math.prod(shape) * dtype.itemsize
            if dtype.kind in "biuf" and nbytes and self._take_slot(worker):
                memory = self._carve(nbytes)
                if memory is not None:
                    return memory.view(dtype).reshape(shape)
            return np.empty(shape, dtype=dtype)
        return empty

    def pack(self, batch: object, worker: int) -> object:
        """In a worker: the batch with its tensors in a slot (copied there unless a gather already wrote
        them there), or the batch as it is when no slot is free."""
        if not self._take_slot(worker):
            return batch
        slot = self.open[0]
        lo = self._slot(slot).__array_interface__["data"][0]

        def put(x):
            if isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.layout == torch.strided:
                nbytes, at, contiguous = x.numel() * x.element_size(), x.data_ptr() - lo, x.is_contiguous()
            elif isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
                nbytes, at, contiguous = x.nbytes, x.__array_interface__["data"][0] - lo, x.flags.c_contiguous
            else:
                return x
            if nbytes == 0:
                return x
            if 0 <= at and at + nbytes <= self.slot_bytes and contiguous:
                return _Packed(at, x.dtype, tuple(x.shape))  # gathered in place
            place = self._carve(nbytes)
            if place is None:
                return x
            if isinstance(x, torch.Tensor):
                torch.from_numpy(place).view(x.dtype).view(x.shape).copy_(x)
            else:
                place.view(x.dtype).reshape(x.shape)[...] = x
            return _Packed(place.__array_interface__["data"][0] - lo, x.dtype, tuple(x.shape))

        try:
            packed = _map_leaves(batch, put)
        finally:
            self.open = None
        return _RingBatch(worker, slot, packed)

    def unpack(self, item: object) -> object:
        """In the main process: the batch with tensors over the slot's memory, lent until they are freed."""
        if not isinstance(item, _RingBatch):
            sizes = []
            _map_leaves(item, lambda x: sizes.append(_leaf_bytes(x)))
            self.needed = max(self.needed, sum(sizes))
            return item
        memory = np.asarray(_Lease(self, item.worker, item.slot))  # the lease lives as long as any view
        self.lent += 1
        end, rest = 0, 0  # bytes a slot would need: the packed ones' end, and what did not fit

        def get(x):  # a leaf function: a closure that called itself would keep `memory` in a cycle
            nonlocal end, rest
            if isinstance(x, _Packed):
                end = max(end, x.start + x.nbytes)
                values = memory[x.start:x.start + x.nbytes]  # noqa: F821 (deleted after the last call, below)
                if isinstance(x.dtype, np.dtype):
                    return values.view(x.dtype).reshape(x.shape)
                return torch.from_numpy(values).view(x.dtype).view(x.shape)
            rest += _leaf_bytes(x)
            return x

        batch = _map_leaves(item.batch, get)
        del memory, get
        self.needed = max(self.needed, end + rest)
        return batch

    @classmethod
    def for_loader(cls, workers: int, prefetch: int, batch_bytes: float, budget: int) -> Ring | None:
        """Slots for the batches in flight (`prefetch` per worker), the one being filled and two that the
        consumer holds, of `batch_bytes` each, within `budget` bytes (None if not two per worker fit)."""
        slot_bytes = int(batch_bytes) + (64 << 10)
        slots = min(prefetch + 3, budget // max(workers * slot_bytes, 1))
        return cls(workers, int(slots), slot_bytes) if workers and slots >= 2 else None


class _Lease:
    """A slot of a ring lent to the main process: numpy arrays made from it keep it as their base, and the
    slot is freed when the last of them (and of the tensors over them) is gone."""

    def __init__(self, ring: Ring, worker: int, slot: int):
        start = ring._slot(slot).__array_interface__["data"][0]
        self.__array_interface__ = {"version": 3, "shape": (ring.slot_bytes,), "typestr": "|u1",
                                    "data": (start, False)}
        weakref.finalize(self, ring._release, worker, slot)


def _map_leaves(x, fn):
    """`fn` applied to every leaf of a batch made of dicts, lists, tuples and `Ragged` columns."""
    if isinstance(x, Ragged):
        return Ragged(fn(x.values), fn(x.offsets))
    if isinstance(x, dict):
        return {k: _map_leaves(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_map_leaves(v, fn) for v in x]
    if isinstance(x, tuple) and not hasattr(x, "_fields"):
        return tuple(_map_leaves(v, fn) for v in x)
    return fn(x)


def _leaf_bytes(x) -> int:
    """Bytes a slot would hold for one leaf of a batch (a tensor or numeric array; 0 for the rest)."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size() + Ring.ALIGN
    if isinstance(x, np.ndarray) and x.dtype.kind in "biuf":
        return x.nbytes + Ring.ALIGN
    return 0


def _as_is(batch):
    return batch


class StreamLoader(DataLoader):
    """A DataLoader over a `StoreStream` that tracks its epoch and position (Lightning saves and restores
    it through `state_dict` / `load_state_dict`). Workers are forked where the platform allows it and hand
    their batches over through a shared `Ring` of at most `ring_bytes` (0: DataLoader's own transfer)."""

    def __init__(self, stream: StoreStream, num_workers: int = 0, rank: int | None = None,
                 world: int | None = None, ring_bytes: int = RING_BYTES, **kwargs):
        if num_workers > 0 and "multiprocessing_context" not in kwargs:
            kwargs["multiprocessing_context"] = "fork" if "fork" in torch.multiprocessing.get_all_start_methods() else None
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
