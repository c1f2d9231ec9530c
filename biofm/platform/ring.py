"""A shared-memory ring through which loader workers hand batches to the main process without a copy (a
transport that knows no store; see `Ring`)."""

from __future__ import annotations

import math
import mmap
import multiprocessing
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from biofm.platform.store import Ragged

RING_BYTES = 512 << 20  # at most this much shared memory per loader for handing batches over from workers


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
        return np.frombuffer(
            self.memory, dtype=np.uint8, count=self.slot_bytes, offset=self.header + slot * self.slot_bytes
        )

    def _take_slot(self, worker: int) -> bool:
        if self.open is None and self.free[worker].acquire(block=False):
            mine = self.state[worker * self.slots : (worker + 1) * self.slots]
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
        return self._slot(slot)[start : start + nbytes]

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
                values = memory[x.start : x.start + x.nbytes]  # noqa: F821 (deleted after the last call, below)
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
        self.__array_interface__ = {"version": 3, "shape": (ring.slot_bytes,), "typestr": "|u1", "data": (start, False)}
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
