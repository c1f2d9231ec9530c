"""The streaming loader and multi-source mixing: coverage, equal steps, chunk reads, exact resume."""

import gc

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from biofm.platform.mixing import ChainLoader, MixedLoader, source_at, source_probabilities
from biofm.platform.ring import _Lease
from biofm.platform.store import Ragged, Store, StoreError, StoreWriter
from biofm.platform.stream import StoreStream, StreamLoader
from biofm.testing import ddp_stream_worker, free_port, write_toy_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    # small chunks so that the epoch spans many of them
    return write_toy_store(tmp_path_factory.mktemp("stream") / "s.zarr", n=1000, chunk_bytes=2048)


def _rows(loader) -> list[np.ndarray]:
    return [np.asarray(b["row"]) for b in loader]


def train_rows(store) -> set:
    return set(np.flatnonzero(store.index("split") == "train"))


@pytest.mark.parametrize("num_workers", [0, 2])
def test_two_ranks_two_workers_see_every_training_sample_once_with_equal_steps(store, num_workers):
    assert store.n_chunks > 8
    per_rank = []
    for rank in range(2):
        loader = StreamLoader(StoreStream(store, batch_size=16, seed=1), num_workers=num_workers, rank=rank, world=2)
        batches = _rows(loader)
        assert len(batches) == len(loader)
        assert max(len(b) for b in batches) - min(len(b) for b in batches) <= 1
        per_rank.append(batches)
    assert len(per_rank[0]) == len(per_rank[1])
    seen = np.concatenate([np.concatenate(b) for b in per_rank])
    assert len(seen) == len(set(seen)) and set(seen) == train_rows(store)


def test_the_stream_reads_whole_chunks_never_one_sample_per_call(store, monkeypatch):
    calls = []
    original = Store.read_rows

    def counting(self, start, stop, names, **kwargs):
        calls.append((start, stop))
        return original(self, start, stop, names, **kwargs)

    monkeypatch.setattr(Store, "read_rows", counting)
    n_samples = sum(len(b) for b in _rows(StreamLoader(StoreStream(store, batch_size=8))))
    assert len(calls) <= store.n_chunks and n_samples == len(train_rows(store))
    assert all(stop - start == store.rows_per_chunk or stop == store.n for start, stop in calls)


def test_chunk_order_and_buffer_shuffle_are_a_pure_function_of_seed_and_epoch(store):
    def epoch_rows(seed, epoch):
        loader = StreamLoader(StoreStream(store, batch_size=32, seed=seed))
        loader.set_epoch(epoch)
        return np.concatenate(_rows(loader))

    a0, a0_again, a1, b0 = epoch_rows(1, 0), epoch_rows(1, 0), epoch_rows(1, 1), epoch_rows(2, 0)
    np.testing.assert_array_equal(a0, a0_again)
    assert not np.array_equal(a0, a1) and not np.array_equal(a0, b0)
    assert set(a0) == set(a1) == set(b0)
    # consecutive epochs of one loader advance by themselves
    loader = StreamLoader(StoreStream(store, batch_size=32, seed=1))
    first, second = np.concatenate(_rows(loader)), np.concatenate(_rows(loader))
    np.testing.assert_array_equal(first, a0)
    np.testing.assert_array_equal(second, a1)


def test_evaluation_splits_are_read_in_order_without_shuffling(store):
    rows = np.concatenate(_rows(StreamLoader(StoreStream(store, split="val", batch_size=10, shuffle=False))))
    np.testing.assert_array_equal(rows, np.flatnonzero(store.index("split") == "val"))


@pytest.mark.parametrize("num_workers, stop_after", [(0, 7), (2, 7), (2, 8), (3, 1)])
def test_a_state_saved_mid_epoch_and_restored_yields_exactly_the_unseen_samples(store, num_workers, stop_after):
    def make():
        return StreamLoader(StoreStream(store, batch_size=16, seed=9), num_workers=num_workers)

    full = _rows(make())
    loader = make()
    seen = []
    for i, batch in enumerate(loader):
        seen.append(np.asarray(batch["row"]))
        if i + 1 == stop_after:
            break
    state = loader.state_dict()
    restored = make()
    restored.load_state_dict(state)
    rest = _rows(restored)
    assert len(seen) + len(rest) == len(full)
    # the same batches in the same order as an uninterrupted epoch
    for got, want in zip(seen + rest, full):
        np.testing.assert_array_equal(got, want)
    # resuming twice in one epoch stays exact
    again = make()
    again.load_state_dict(state)
    it = iter(again)
    next(it)
    state2 = again.state_dict()
    third = make()
    third.load_state_dict(state2)
    np.testing.assert_array_equal(np.concatenate(_rows(third)), np.concatenate(full[stop_after + 1 :]))


def _nested(batch: dict) -> dict:
    """A transform like a modality's collate: new tensors, nested containers, a ragged pair, text."""
    tokens = batch["toy/tokens"]
    return {
        "row": torch.from_numpy(batch["row"]),
        "source": batch["source"],
        "inputs": {
            "x": torch.from_numpy(batch["toy/x"]) * 2,
            "tokens": (torch.from_numpy(tokens.values), torch.from_numpy(tokens.offsets)),
        },
        "labels": [torch.from_numpy(batch["labels/flag"]), batch["labels/grade"]],
    }


def _flat(batch) -> list:
    return [v.numpy().copy() if isinstance(v, torch.Tensor) else np.array(v) for v in _leaves(batch)]


def _leaves(x):
    if isinstance(x, dict):
        return [leaf for v in x.values() for leaf in _leaves(v)]
    if isinstance(x, (list, tuple)):
        return [leaf for v in x for leaf in _leaves(v)]
    if isinstance(x, Ragged):
        return [x.values, x.offsets]
    return [x]


def _same(a: list, b: list) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert u.dtype == v.dtype
            np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("transform", [None, _nested])
def test_workers_hand_batches_over_through_the_shared_ring_unchanged(store, transform):
    def epoch(ring_bytes: int, keep: bool):
        loader = StreamLoader(
            StoreStream(store, batch_size=16, seed=4, transform=transform), num_workers=2, ring_bytes=ring_bytes
        )
        out, kept = [], []
        for batch in loader:
            out.append(_flat(batch))
            if keep:  # a consumer that holds every batch: held slots must never be written again
                kept.append(batch)
        return out, kept, loader.stream.ring

    reference, _, none = epoch(0, keep=False)
    assert none is None
    streamed, _, ring = epoch(4 << 20, keep=False)
    _same(streamed, reference)
    assert ring.lent == len(reference)  # every batch came through a slot
    _, kept, ring = epoch(4 << 20, keep=True)
    _same([_flat(b) for b in kept], reference)
    assert 0 < ring.lent < len(reference)  # slots ran out while held: the rest went the ordinary way
    assert ring.state.any()
    del kept
    gc.collect()
    assert not ring.state.any()  # every slot free again once its tensors are gone


def _in_a_slot(values: np.ndarray) -> bool:
    while values is not None and not isinstance(values, _Lease):
        values = values.base
    return values is not None


def test_large_samples_are_gathered_into_ring_slots_and_a_resumed_epoch_frees_every_slot(tmp_path):
    """Samples over 16 KiB are gathered per batch straight into a slot; batches skipped on resume give
    their slot back; what arrives equals the stored rows."""
    writer = StoreWriter(
        tmp_path / "big.zarr", source="big", modalities={"m": {}}, tasks={}, seed=2, chunk_bytes=1 << 20
    )
    rng = np.random.default_rng(0)
    values = rng.standard_normal((240, 8192), dtype=np.float32)  # 32 KiB per sample
    writer.write_batch(
        0, sample_id=[str(i) for i in range(240)], subject_id=[str(i) for i in range(240)], arrays={"m/x": values}
    )
    big = writer.finalize()
    stored = big.read_rows(0, big.n, ["m/x"])["m/x"]

    def make():
        return StreamLoader(StoreStream(big, split=None, batch_size=16, seed=5), num_workers=2)

    full = [b["row"].copy() for b in make()]
    loader = make()
    for i, _ in enumerate(loader):
        if i == 4:
            break
    state = loader.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = []
    for batch in resumed:
        assert _in_a_slot(batch["m/x"])  # gathered in place, not copied over by DataLoader
        np.testing.assert_array_equal(batch["m/x"], stored[batch["row"]])
        rest.append(batch["row"].copy())  # a view would keep its slot lent
    ring = resumed.stream.ring
    assert ring.lent == len(rest) == len(full) - 5
    for got, want in zip(rest, full[5:]):
        np.testing.assert_array_equal(got, want)
    del batch
    gc.collect()
    assert not ring.state.any()


def test_the_stream_runs_under_a_real_ddp_process_group(store, tmp_path):
    world = 2
    mp.start_processes(
        ddp_stream_worker, args=(world, store.url, free_port(), 2, str(tmp_path)), nprocs=world, start_method="spawn"
    )
    rows = [np.load(tmp_path / f"rank{r}.npy") for r in range(world)]
    counts = [tuple(np.load(tmp_path / f"rank{r}_batches.npy")) for r in range(world)]
    assert counts[0] == counts[1] and counts[0][0] == counts[0][1]
    seen = np.concatenate(rows)
    assert len(seen) == len(set(seen)) and set(seen) == train_rows(store)


def test_too_few_samples_for_the_ranks_is_a_clear_error(tmp_path):
    tiny = write_toy_store(tmp_path / "tiny.zarr", n=12)
    stream = StoreStream(tiny, split="test", batch_size=4)
    with pytest.raises(StoreError, match="fewer than the 64 ranks"):
        stream.batches_per_rank(64)


def test_asking_for_a_task_or_array_the_store_lacks_names_it(store):
    with pytest.raises(StoreError, match=r"no labels for tasks \['mortality'\]"):
        StoreStream(store, tasks=["mortality"])
    with pytest.raises(StoreError, match=r"no arrays \['oct/volume'\]"):
        StoreStream(store, arrays=["oct/volume"])


# --------------------------------------------------------------------------------------------- mixing


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {
        "big": write_toy_store(root / "big.zarr", n=900, seed=1, source="big"),
        "small": write_toy_store(root / "small.zarr", n=300, seed=2, source="small"),
    }


def _mixed(sources, rank=0, world=1, **kwargs):
    loaders = {
        name: StreamLoader(StoreStream(s, batch_size=10, seed=4), rank=rank, world=world) for name, s in sources.items()
    }
    return MixedLoader(loaders, seed=7, **kwargs)


def test_the_source_of_each_step_is_the_same_on_every_rank_and_each_batch_has_one_source(sources):
    per_rank = []
    for rank in range(2):
        per_rank.append([(b["source"], np.asarray(b["row"])) for b in _mixed(sources, rank=rank, world=2)])
    assert [s for s, _ in per_rank[0]] == [s for s, _ in per_rank[1]]
    assert {s for s, _ in per_rank[0]} == {"big", "small"}
    # each batch's rows come from its own source (the small store has rows 0..299 only)
    assert all(rows.max() < 300 for source, rows in per_rank[0] if source == "small")
    # the pick is a pure function of (seed, step): a fresh loader draws the same sequence
    again = [b["source"] for b in _mixed(sources, rank=1, world=2)]
    assert again == [s for s, _ in per_rank[1]]


def test_mixing_follows_weights_and_temperature(sources):
    sizes = {"big": 900, "small": 300}
    assert source_probabilities(sizes) == pytest.approx({"big": 0.75, "small": 0.25})
    assert source_probabilities(sizes, temperature=1e9) == pytest.approx({"big": 0.5, "small": 0.5})
    assert source_probabilities(sizes, weights={"small": 1.0}) == {"big": 0.0, "small": 1.0}
    mixed = _mixed(sources, weights={"big": 0.2, "small": 0.8}, steps_per_epoch=400)
    drawn = [b["source"] for b in mixed]
    assert len(drawn) == 400 and 0.72 < drawn.count("small") / 400 < 0.88
    assert drawn == [mixed.names[source_at(step, 7, mixed.cumulative)] for step in range(400)]
    with pytest.raises(ValueError, match="not loaded"):
        source_probabilities(sizes, weights={"tox21": 1.0})


def test_mixed_loader_resumes_at_the_same_step(sources):
    full = [np.asarray(b["row"]) for b in _mixed(sources)]
    first = _mixed(sources)
    head = []
    for batch in first:
        head.append(np.asarray(batch["row"]))
        if len(head) == 11:
            break
    resumed = _mixed(sources)
    resumed.load_state_dict(first.state_dict())
    tail = [np.asarray(b["row"]) for b in resumed]
    assert len(head) + len(tail) == len(full)
    for got, want in zip(head + tail, full):
        np.testing.assert_array_equal(got, want)


def test_chain_loader_gives_every_batch_of_every_source(sources):
    loaders = {n: StreamLoader(StoreStream(s, split="val", batch_size=7, shuffle=False)) for n, s in sources.items()}
    chain = ChainLoader(loaders)
    batches = list(chain)
    assert len(batches) == len(chain) == sum(len(l) for l in loaders.values())


def test_a_batch_spanning_chunks_keeps_sample_ids_of_different_widths(tmp_path):
    from biofm.platform.store import StoreWriter
    from biofm.testing import TOY_TASKS, toy_batch

    writer = StoreWriter(
        str(tmp_path / "s.zarr"),
        source="toy",
        modalities={"toy": {"version": 1}},
        tasks=TOY_TASKS,
        chunk_bytes=64,
        min_chunks=16,
    )
    batch = toy_batch(0, 64)
    batch["sample_id"] = [f"{'x' * (1 + i % 7)}{i}" for i in range(64)]  # ids of 2 to 9 characters
    writer.write_batch(0, **batch)
    store = writer.finalize()
    assert store.rows_per_chunk < 16  # a batch of 16 gathers rows of several chunks
    stream = StoreStream(store, split=None, batch_size=16, shuffle=True, seed=1, with_ids=True)
    seen = [str(s) for b in StreamLoader(stream) for s in b["index/sample_id"]]
    assert sorted(seen) == sorted(batch["sample_id"])
