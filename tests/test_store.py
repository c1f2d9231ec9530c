"""The sample store: round trips, URLs, splits by subject, resume after a kill, and bad input."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import zarr

from biofm.platform.store import (
    FORMAT_VERSION,
    Ragged,
    Store,
    StoreError,
    StoreWriter,
    check_subject_splits,
    open_root,
    subject_splits,
)
from biofm.testing import TOY_TASKS, store_arrays, toy_batch, write_toy_store

DTYPES = [
    "bool",
    "int8",
    "int16",
    "int32",
    "int64",
    "uint8",
    "uint16",
    "uint32",
    "uint64",
    "float16",
    "float32",
    "float64",
]


def _values(dtype: str, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype == "bool":
        return rng.random((n, 3)) > 0.5
    info = np.finfo(dtype) if dtype.startswith("float") else np.iinfo(dtype)
    if dtype.startswith("float"):
        return (rng.standard_normal((n, 3)) * 100).astype(dtype)
    return rng.integers(info.min, info.max, size=(n, 3), dtype=dtype, endpoint=True)


def test_round_trip_every_dtype_fixed_ragged_nan_labels_and_string_ids(tmp_path):
    tasks = {"y": {"kind": "binary"}, "tags": {"kind": "multilabel", "classes": ["a", "b", "c"]}}
    writer = StoreWriter(tmp_path / "s.zarr", source="rt", modalities={"m": {"k": 1}}, tasks=tasks, seed=5)
    expected = {}
    for key in range(3):
        n = 7
        ids = [f"sample-{key}-{i}-é✓" for i in range(n)]
        arrays = {f"m/{d}": _values(d, n, key) for d in DTYPES}
        arrays["m/words"] = np.array([f"w{key}{i}" * (i + 1) for i in range(n)])
        rows = [np.full((i % 3, 2), key * 10 + i, dtype=np.float32) for i in range(n)]
        arrays["m/ragged"] = Ragged.from_list(rows, dtype=np.float32, trailing=(2,))
        y = np.array([0, 1, np.nan, 1, np.nan, 0, 1], dtype=np.float32)
        tags = np.where(np.arange(n * 3).reshape(n, 3) % 4 == 0, np.nan, 1.0).astype(np.float32)
        writer.write_batch(
            key,
            sample_id=ids,
            subject_id=[f"subj{key}{i // 2}" for i in range(n)],
            labels={"y": y, "tags": tags},
            arrays=arrays,
        )
        for i, sid in enumerate(ids):
            expected[sid] = {
                name: (col.row(i) if isinstance(col, Ragged) else col[i]) for name, col in arrays.items()
            } | {"y": y[i], "tags": tags[i]}
    store = writer.finalize()

    assert store.n == 21 and store.tasks["tags"]["n_classes"] == 3
    names = [f"m/{d}" for d in DTYPES] + ["m/words", "m/ragged", "labels/y", "labels/tags", "index/sample_id"]
    got = store.read_rows(0, store.n, names)
    assert sorted(got["index/sample_id"]) == sorted(expected)
    for i, sid in enumerate(got["index/sample_id"]):
        want = expected[sid]
        for d in DTYPES:
            assert got[f"m/{d}"].dtype == np.dtype(d)
            np.testing.assert_array_equal(got[f"m/{d}"][i], want[f"m/{d}"])
        assert got["m/words"][i] == want["m/words"]
        np.testing.assert_array_equal(got["m/ragged"].row(i), want["m/ragged"])
        np.testing.assert_array_equal(got["labels/y"][i], want["y"])  # NaN == NaN here
        np.testing.assert_array_equal(got["labels/tags"][i], want["tags"])
    assert np.isnan(got["labels/y"]).sum() == 6
    assert store.array_info["m/ragged"] == {"ragged": True, "dtype": "f4", "shape": [2]}


def test_rows_are_written_in_one_seeded_permutation(tmp_path):
    a = write_toy_store(tmp_path / "a.zarr", n=300, seed=1)
    b = write_toy_store(tmp_path / "b.zarr", n=300, seed=2)
    order = a.read_rows(0, a.n, ["toy/x"])["toy/x"][:, 0]
    assert sorted(order) == list(range(300))
    assert not np.array_equal(order, np.arange(300))  # not the input order
    assert not np.array_equal(order, b.read_rows(0, b.n, ["toy/x"])["toy/x"][:, 0])


def test_chunks_are_sized_by_bytes_and_hold_whole_rows(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", source="big", modalities={"m": {}}, tasks={}, seed=0)
    n = 600
    writer.write_batch(
        0,
        sample_id=[str(i) for i in range(n)],
        subject_id=[str(i) for i in range(n)],
        arrays={"m/x": np.zeros((n, 4096), dtype=np.float32)},
    )  # 16 KiB a sample
    store = writer.finalize()
    chunk_bytes = store.rows_per_chunk * 4096 * 4
    assert 1 << 20 <= chunk_bytes <= 8 << 20
    assert store.root["m/x"].chunks == (store.rows_per_chunk, 4096)


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls_behave_like_paths(tmp_path, scheme):
    url = f"memory://biofm-test/{tmp_path.name}/s.zarr" if scheme == "memory" else f"file://{tmp_path}/s.zarr"
    via_url = write_toy_store(url, n=120)
    via_path = write_toy_store(tmp_path / "p.zarr", n=120)
    assert via_url.n == via_path.n == 120
    a, b = store_arrays(Store(url)), store_arrays(Store(str(tmp_path / "p.zarr")))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_subject_splits_never_put_one_subject_on_two_sides(tmp_path):
    store = write_toy_store(tmp_path / "s.zarr", n=400)
    splits, subjects = store.index("split"), store.index("subject_id")
    for subject in np.unique(subjects):
        assert len(set(splits[subjects == subject])) == 1
    assert set(splits) == {"train", "val", "test"}
    assert 0.7 < np.mean(splits == "train") < 0.9
    # the assignment is a pure function of the seed
    np.testing.assert_array_equal(subject_splits(subjects, seed=4), subject_splits(subjects, seed=4))
    assert not np.array_equal(subject_splits(subjects, seed=4), subject_splits(subjects, seed=5))  # and of it
    with pytest.raises(StoreError, match="both 'train' and 'test'"):
        check_subject_splits(np.array(["p1", "p1"]), np.array(["train", "test"]), "manifest.csv")


def test_given_splits_are_kept_and_checked_by_subject(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", source="t", modalities={"toy": {}}, tasks={})
    batch = toy_batch(0, 10)
    split = ["test" if i < 4 else "train" for i in range(10)]
    writer.write_batch(
        0, sample_id=batch["sample_id"], subject_id=batch["subject_id"], split=split, arrays=batch["arrays"]
    )
    store = writer.finalize()
    by_id = dict(zip(store.index("sample_id"), store.index("split")))
    assert [by_id[s] for s in batch["sample_id"]] == split

    bad = StoreWriter(tmp_path / "bad.zarr", source="t", modalities={"toy": {}}, tasks={})
    bad.write_batch(0, sample_id=["a", "b"], subject_id=["p", "p"], split=["train", "val"])
    with pytest.raises(StoreError, match="by subject"):
        bad.finalize()


_KILLED_WRITER = textwrap.dedent("""
    import os, sys, signal
    from biofm.platform.store import StoreWriter
    from biofm.testing import TOY_TASKS, toy_batch
    w = StoreWriter(sys.argv[1], source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS, seed=0)
    for key in range(4):
        w.write_batch(key, **toy_batch(key * 60, 60, 0))
        print(key, flush=True)
        if key == 1:
            os.kill(os.getpid(), signal.SIGKILL)   # killed between batches
""")


def test_interrupted_write_resumes_to_the_same_store(tmp_path):
    url = str(tmp_path / "resumed.zarr")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, url], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL and proc.stdout.split() == ["0", "1"]
    with pytest.raises(StoreError, match="unfinished"):
        Store(url)  # readers never see a half-written store
    # a half-written batch (no commit mark) is ignored and rewritten
    part = open_root(url, "r+").require_group("_parts").create_group("00000002")
    part.create_array("index/sample_id", shape=(3,), dtype=str)
    writer = StoreWriter(url, source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS, seed=0)
    assert writer.committed() == {0, 1}
    resumed = write_toy_store(url, n=240, batch=60)
    fresh = write_toy_store(tmp_path / "fresh.zarr", n=240, batch=60)
    a, b = store_arrays(resumed), store_arrays(fresh)
    assert sorted(a) == sorted(b) and "_parts" not in str(sorted(a))
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    strip = lambda attrs: {k: v for k, v in attrs.items() if k != "created"}  # noqa: E731
    assert strip(resumed.attrs) == strip(fresh.attrs)


def test_a_complete_store_is_not_overwritten_by_accident(tmp_path):
    write_toy_store(tmp_path / "s.zarr", n=60)
    with pytest.raises(StoreError, match="already a complete store"):
        write_toy_store(tmp_path / "s.zarr", n=60)
    assert write_toy_store(tmp_path / "s.zarr", n=90, overwrite=True).n == 90


def test_uncompressed_arrays_read_from_chunk_files_give_what_zarr_gives(tmp_path):
    """Raw arrays bypass zarr's read path (`RawChunks`): every dtype, ranges across chunk borders, the
    memory-mapped view of one chunk, a chunk of only zeros (written like any other), ragged values."""
    writer = StoreWriter(
        tmp_path / "s.zarr",
        source="raw",
        modalities={"m": {}},
        tasks={},
        seed=1,
        codec="none",
        chunk_bytes=2048,
        min_chunks=4,
    )
    for key in range(2):
        arrays = {f"m/{d}": _values(d, 50, key) for d in DTYPES}
        arrays["m/zeros"] = np.zeros((50, 4), dtype=np.float32)
        arrays["m/ragged"] = Ragged.from_list([np.full((i % 4, 3), i + key, dtype=np.int16) for i in range(50)])
        writer.write_batch(
            key,
            sample_id=[f"{key}-{i}" for i in range(50)],
            subject_id=[f"{key}-{i}" for i in range(50)],
            arrays=arrays,
        )
    store = writer.finalize()
    rows = store.rows_per_chunk
    assert 1 < rows < store.n
    names = [f"m/{d}" for d in DTYPES] + ["m/zeros"]
    assert all(store._raw_chunks(name) is not None for name in names + ["m/ragged"])
    assert store._raw_chunks("index/sample_id") is None  # strings: through zarr
    # every chunk is written, even one that holds only the fill value: a missing chunk file is damage
    assert len([p for p in (tmp_path / "s.zarr" / "m" / "zeros" / "c").rglob("*") if p.is_file()]) == store.n_chunks
    for start, stop in [(0, store.n), (1, rows + 3), (rows, 2 * rows), (store.n - 5, store.n), (7, 7)]:
        got = store.read_rows(start, stop, names + ["m/ragged"], mapped=True)
        for name in names:
            want = store.root[name][start:stop]
            assert got[name].dtype == want.dtype and got[name].shape == want.shape
            np.testing.assert_array_equal(got[name], want)
        lo, hi = store.offsets["m/ragged"][[start, stop]]
        np.testing.assert_array_equal(got["m/ragged"].values, store.root["m/ragged"][lo:hi])
    view = store.read_rows(rows, 2 * rows, ["m/float32"], mapped=True)["m/float32"]
    assert not view.flags.writeable  # a map of the chunk file, never written through


def test_a_truncated_chunk_file_is_named(tmp_path):
    store = write_toy_store(tmp_path / "s.zarr", n=240, codec="none", chunk_bytes=1024)
    assert store.n_chunks > 2
    chunk = tmp_path / "s.zarr" / "toy" / "x" / "c" / "1" / "0"
    store = Store(store.url)
    chunk.write_bytes(chunk.read_bytes()[:-8])  # after the store was opened: the read names it
    for mapped in (False, True):
        with pytest.raises(StoreError, match=r"toy/x/c/1/0: chunk file is 8 bytes short"):
            store.read_rows(store.rows_per_chunk, 2 * store.rows_per_chunk, ["toy/x"], mapped=mapped)
    with pytest.raises(StoreError, match=r"chunk \(1, 0\) of array 'toy/x' is \d+ bytes but was written as"):
        Store(store.url)  # before: opening compares every file's size with the checksums file


# ------------------------------------------------------------------------------------------ bad input


def _listing(path):
    return sorted((p, os.path.getsize(os.path.join(d, p))) for d, _, files in os.walk(path) for p in files)


def _damage(url, how):
    root = open_root(url, "r+")
    if how == "version":
        root.attrs["biofm_store"] = FORMAT_VERSION + 1
    elif how == "missing":
        del root["toy/x"]
    elif how == "offsets":
        offsets = root["toy/tokens.offsets"]
        values = offsets[...]
        values[-1] += 3
        offsets[...] = values
    elif how == "labels":
        arr = root["labels/flag"]
        arr.resize((arr.shape[0] - 1,))


@pytest.mark.parametrize(
    "how, message",
    [
        ("version", rf"format version {FORMAT_VERSION + 1}, but this biofm reads version {FORMAT_VERSION}"),
        ("missing", r"array 'toy/x' is missing"),
        ("offsets", r"toy/tokens.offsets do not match the rows of toy/tokens"),
        ("labels", r"'labels/flag' has shape \(239,\) but the store has 240 samples"),
    ],
)
def test_a_damaged_store_gives_one_clear_error_naming_store_and_field(tmp_path, how, message):
    url = str(tmp_path / "s.zarr")
    write_toy_store(url, n=240)
    _damage(url, how)
    before = _listing(url)
    with pytest.raises(StoreError, match=message) as err:
        Store(url)
    assert url in str(err.value)
    assert _listing(url) == before  # reading a bad store writes nothing


def test_a_path_that_does_not_exist_is_named_and_nothing_is_created(tmp_path):
    url = str(tmp_path / "nowhere.zarr")
    with pytest.raises(StoreError, match="does not exist") as err:
        Store(url)
    assert url in str(err.value) and not os.path.exists(url)


def test_a_bad_batch_is_refused_whole_before_anything_is_written(tmp_path):
    writer = StoreWriter(tmp_path / "s.zarr", source="toy", modalities={"toy": {}}, tasks={"flag": {"kind": "binary"}})
    batch = toy_batch(0, 10)
    with pytest.raises(StoreError, match=r"labels/flag has shape \(9,\), expected \(10,\)"):
        writer.write_batch(
            0,
            sample_id=batch["sample_id"],
            subject_id=batch["subject_id"],
            labels={"flag": np.zeros(9)},
            arrays=batch["arrays"],
        )
    with pytest.raises(StoreError, match="undeclared tasks"):
        writer.write_batch(
            0, sample_id=batch["sample_id"], subject_id=batch["subject_id"], labels={"other": np.zeros(10)}
        )
    with pytest.raises(StoreError, match="has 3 rows but the batch has 10"):
        writer.write_batch(
            0, sample_id=batch["sample_id"], subject_id=batch["subject_id"], arrays={"toy/x": np.zeros((3, 2))}
        )
    assert writer.committed() == set()
    root = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert "_parts" not in root or not list(root["_parts"].groups())  # no part, not even a partial one


def test_resuming_with_other_settings_is_refused(tmp_path):
    url = tmp_path / "s.zarr"
    StoreWriter(url, source="toy", modalities={"toy": {}}, tasks={}).write_batch(0, sample_id=["a"], subject_id=["p"])
    with pytest.raises(StoreError, match="other settings"):
        StoreWriter(url, source="toy", modalities={"toy": {"changed": True}}, tasks={})


def test_a_ragged_array_over_the_memory_budget_is_finalised_in_a_stream_to_the_same_store(tmp_path):
    in_memory = write_toy_store(tmp_path / "a.zarr", n=240, batch=60, seed=5)
    # every ragged array is "too large": finalised sample by sample, in whole chunks of 64 bytes
    streamed = write_toy_store(tmp_path / "b.zarr", n=240, batch=60, seed=5, memory_bytes=0, chunk_bytes=64)
    a, b = store_arrays(in_memory), store_arrays(streamed)
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert streamed.root["toy/tokens"].chunks[0] < streamed.root["toy/tokens"].shape[0]  # several chunks


def test_committed_sample_ids_let_a_rerun_regroup_its_batches(tmp_path):
    """Slides are committed in groups by work done, so a rerun may group the remaining samples otherwise: it
    skips the committed sample ids, writes the rest under new keys, and the store is the same as in one go."""
    url = str(tmp_path / "s.zarr")
    first = StoreWriter(url, source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS)
    batch = toy_batch(0, 90)
    pick = lambda rows: {
        k: (
            {t: v[rows] for t, v in val.items()}
            if k == "labels"
            # noqa: E731
            else {a: (v.take(rows) if isinstance(v, Ragged) else v[rows]) for a, v in val.items()}
            if k == "arrays"
            else [val[i] for i in rows]
        )
        for k, val in batch.items()
    }
    first.write_batch(0, **pick(np.arange(0, 25)))
    first.write_batch(1, **pick(np.arange(25, 40)))
    del first  # the run stops here
    rerun = StoreWriter(url, source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS)
    done = rerun.committed_sample_ids()
    assert done == set(batch["sample_id"][:40])
    todo = np.array([i for i, sid in enumerate(batch["sample_id"]) if sid not in done])
    key = max(rerun.committed()) + 1
    for rows in np.array_split(todo, 3):  # other groups than the first run would have made
        rerun.write_batch(key, **pick(rows))
        key += 1
    store = rerun.finalize()
    assert sorted(store.index("sample_id")) == sorted(batch["sample_id"])  # each sample once
    whole = StoreWriter(str(tmp_path / "whole.zarr"), source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS)
    whole.write_batch(0, **batch)
    assert store.checksum() == whole.finalize().checksum()


def test_the_checksum_follows_content_not_how_or_when_it_was_written(tmp_path):
    from biofm.platform.store import open_root

    first = write_toy_store(tmp_path / "a.zarr", batch=60)
    writer = StoreWriter(str(tmp_path / "b.zarr"), source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS)
    for key in (3, 1, 0, 2):  # the same parts in another order, at another time
        writer.write_batch(key, **toy_batch(key * 60, 60, 0))
    again = writer.finalize()
    assert first.checksum() == again.checksum()
    root = open_root(str(tmp_path / "b.zarr"), "r+")
    name = next(n for n in ("toy/x", "labels/score") if n in root)
    values = root[name][...]
    values.flat[0] += 1
    root[name][...] = values
    assert Store(str(tmp_path / "b.zarr")).checksum() != first.checksum()
    assert write_toy_store(tmp_path / "c.zarr", seed=1).checksum() != first.checksum()  # another split
