"""Nothing lost: `prepare` never deletes what is not its own, a damaged store is never read as data, one writer
per store, and every bad input table gets one clear `biofm: error:` line naming the file."""

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import polars as pl
import pytest

from biofm.datasets.synthetic import prepare_synthetic
from biofm.platform.cli import main
from biofm.platform.lightning import BiofmDataModule
from biofm.platform.store import Store, StoreError, StoreWriter, open_root
from biofm.platform.writing import StoreLock, lock_path
from biofm.testing import TOY_TASKS, toy_batch, write_toy_store

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MOLECULES = "smiles,y,note\n" + "".join(
    f"{s},{i % 2},n{i}\n" for i, s in enumerate(["CCO", "c1ccccc1", "CC(=O)O", "CCN", "c1ccncc1", "CCCl"] * 8)
)


def _run(argv: list[str], capsys, out: list | None = None) -> tuple[int, str]:
    """`biofm …` in this process: its exit code and stderr (stdout appended to `out` when given)."""
    try:
        main(argv)
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    if out is not None:
        out.append(captured.out)
    return code, captured.err


def _one_error(err: str, *names: str) -> str:
    """Exactly one `biofm: error:` line, naming each of `names`, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("biofm: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for name in names:
        assert str(name) in lines[0], (name, lines[0])
    return lines[0]


def _listing(folder: Path) -> list:
    return sorted(
        (str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    )


# -------------------------------------------------------------------------------- 1. never delete theirs


def _user_folder(path: Path) -> Path:
    (path / "sub").mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work")
    (path / "sub" / "data.csv").write_text(MOLECULES)
    return path


@pytest.mark.parametrize("where", ["folder", "folder --overwrite", "cwd", "input's folder", "a file"])
def test_prepare_refuses_an_out_that_is_not_a_store_and_leaves_it_untouched(tmp_path, capsys, monkeypatch, where):
    folder = _user_folder(tmp_path / "mine")
    source = folder / "sub" / "data.csv"
    out = {
        "folder": folder,
        "folder --overwrite": folder,
        "cwd": ".",
        "input's folder": source.parent,
        "a file": folder / "thesis.txt",
    }[where]
    monkeypatch.chdir(folder)
    before = _listing(folder)
    argv = [
        "prepare",
        "molecules",
        "--input",
        str(source),
        "--out",
        str(out),
        "--label-columns",
        "y",
        "--workers",
        "1",
    ] + (["--overwrite"] if "overwrite" in where else [])
    code, err = _run(argv, capsys)
    assert code == 2
    line = _one_error(err, out)
    assert "not a biofm store" in line
    assert _listing(folder) == before  # every file still there, unchanged
    assert not list(tmp_path.glob("*.lock")) and not list(folder.rglob("*.lock"))


def test_overwrite_replaces_a_biofm_store_and_an_empty_folder_is_written(tmp_path, capsys):
    (tmp_path / "data.csv").write_text(MOLECULES)
    empty = tmp_path / "empty"
    empty.mkdir()
    args = ["prepare", "molecules", "--input", str(tmp_path / "data.csv"), "--label-columns", "y", "--workers", "1"]
    assert _run(args + ["--out", str(empty)], capsys)[0] == 0 and Store(str(empty)).n == 48
    code, err = _run(args + ["--out", str(empty)], capsys)
    assert code == 2 and "already a complete store" in _one_error(err, empty)
    assert _run(args + ["--out", str(empty), "--overwrite"], capsys)[0] == 0 and Store(str(empty)).n == 48


def test_an_object_storage_folder_that_is_not_a_store_is_refused_and_kept(tmp_path, capsys):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe(f"/biofm-user-{tmp_path.name}/results/model.bin", b"weights")
    (tmp_path / "data.csv").write_text(MOLECULES)
    code, err = _run(
        [
            "prepare",
            "molecules",
            "--input",
            str(tmp_path / "data.csv"),
            "--label-columns",
            "y",
            "--out",
            f"memory://biofm-user-{tmp_path.name}/results",
            "--workers",
            "1",
            "--overwrite",
        ],
        capsys,
    )
    assert code == 2 and "not a biofm store" in _one_error(err, "results")
    assert fs.cat(f"/biofm-user-{tmp_path.name}/results/model.bin") == b"weights"


def test_the_ehr_work_folder_is_emptied_only_when_biofm_made_it(tmp_path):
    from biofm.datasets.ehr.common import work_dir as _work_dir

    theirs = tmp_path / "a.zarr.work"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="was not made by biofm prepare"):
        _work_dir(str(tmp_path / "a.zarr"))
    assert (theirs / "notes.txt").read_text() == "mine"
    ours = _work_dir(str(tmp_path / "b.zarr"))
    (ours / "events-00000.parquet").write_bytes(b"x")
    assert list(_work_dir(str(tmp_path / "b.zarr")).iterdir()) == [ours / ".biofm-work"]  # its own: emptied


# ---------------------------------------------------------------------------- 2. damage is never data


@pytest.fixture
def cohort(tmp_path):
    """A fresh small synthetic cohort (raw float arrays, zstd ints and strings) that a test may damage."""
    return prepare_synthetic(str(tmp_path / "cohort.zarr"), n=300, seed=1)


def _chunk(store: Store, name: str) -> Path:
    files = sorted(p for p in (Path(store.url) / name / "c").rglob("*") if p.is_file())
    assert files, name
    return files[len(files) // 2]


def _damage(store: Store, how: str) -> tuple[Path, str]:
    """Damage one chunk; returns its file and the array it belongs to."""
    if how == "deleted chunk":
        name = "labels/event"
        path = _chunk(store, name)
        path.unlink()
    elif how == "truncated raw chunk":
        name = "tabular/numeric"
        assert store.root[name].metadata.codecs[-1].__class__.__name__ == "BytesCodec"  # raw: no compressor
        path = _chunk(store, name)
        path.write_bytes(path.read_bytes()[:-12])
    else:  # truncated zstd chunk
        name = "tabular/categorical"
        assert "Zstd" in str(store.root[name].metadata.codecs)
        path = _chunk(store, name)
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    return path, name


@pytest.mark.parametrize("how", ["deleted chunk", "truncated raw chunk", "truncated zstd chunk"])
def test_a_damaged_chunk_is_an_error_naming_it_from_fit_the_python_api_and_verify(cohort, tmp_path, capsys, how):
    printed = []
    code, err = _run(["verify", cohort.url], capsys, printed)
    assert code == 0 and "match the checksums written when the store was prepared" in printed[0], err
    path, name = _damage(cohort, how)
    key = str(path.relative_to(cohort.url))
    # biofm fit: one error naming the chunk and its array, before any training
    code, err = _run(
        [
            "fit",
            "--trainer",
            str(CONFIGS / "trainer" / "cpu.yaml"),
            "--model",
            str(CONFIGS / "model" / "tiny.yaml"),
            "--data",
            str(CONFIGS / "data" / "synthetic.yaml"),
            "--data.stores",
            f"[{cohort.url}]",
            "--trainer.default_root_dir",
            str(tmp_path / "run"),
            "--trainer.max_epochs",
            "1",
        ],
        capsys,
    )
    assert code == 2
    _one_error(err, key, f"array '{name}'")
    assert not (tmp_path / "run" / "checkpoints").exists()
    # the Python API: the store and the data module refuse it the same way
    for open_it in (lambda: Store(cohort.url), lambda: BiofmDataModule([cohort.url])):
        with pytest.raises(StoreError, match=f"array '{name}'.*{key}"):
            open_it()
    # biofm verify names the file
    code, err = _run(["verify", cohort.url], capsys)
    assert code == 2 and key in err and ("missing" in err or "truncated" in err)


def test_a_corrupt_chunk_of_the_same_size_fails_verify_and_a_compressed_one_fails_its_read(cohort, capsys):
    raw = _chunk(cohort, "tabular/numeric")
    data = bytearray(raw.read_bytes())
    data[5] ^= 0xFF
    raw.write_bytes(bytes(data))  # a raw chunk: only its checksum can tell
    packed = _chunk(cohort, "tabular/categorical")
    data = bytearray(packed.read_bytes())
    data[len(data) // 2] ^= 0xFF
    packed.write_bytes(bytes(data))
    code, err = _run(["verify", cohort.url], capsys)
    assert code == 2
    for path in (raw, packed):
        assert f"does not match its checksum (file {path.relative_to(cohort.url)})" in err
    store = Store(cohort.url)  # sizes agree, so it opens; reading the compressed chunk fails, never other values
    with pytest.raises(StoreError, match="array 'tabular/categorical'.*cannot be decoded"):
        store.read_rows(0, store.n, ["tabular/categorical"])


def test_every_chunk_is_written_and_unwritten_labels_read_as_missing(tmp_path):
    writer = StoreWriter(
        tmp_path / "s.zarr",
        source="fill",
        modalities={"m": {}},
        tasks={"y": {"kind": "binary"}},
        chunk_bytes=1024,
        min_chunks=4,
    )
    n = 400
    writer.write_batch(
        0,
        sample_id=[str(i) for i in range(n)],
        subject_id=[str(i) for i in range(n)],
        labels={"y": np.full(n, np.nan, np.float32)},  # every chunk only the fill value
        arrays={"m/zeros": np.zeros((n, 8), np.int32), "m/x": np.ones((n, 8), np.float32)},
    )
    store = writer.finalize()
    for name in ("labels/y", "m/zeros", "m/x"):
        array = store.root[name]
        chunks = int(np.prod([-(-s // c) for s, c in zip(array.shape, array.chunks)]))
        assert chunks > 1
        assert len([p for p in (Path(store.url) / name / "c").rglob("*") if p.is_file()]) == chunks, name
    assert np.isnan(store.root["labels/y"].metadata.fill_value)  # a label never written is missing, never 0


def test_no_flipped_byte_of_a_compressed_chunk_reads_back_as_other_values(cohort):
    path = _chunk(cohort, "tabular/categorical")
    good = path.read_bytes()
    want = cohort.read_rows(0, cohort.n, ["tabular/categorical"])["tabular/categorical"]
    silent = []
    for position in range(len(good)):
        flipped = bytearray(good)
        flipped[position] ^= 0x55
        path.write_bytes(bytes(flipped))
        try:
            got = Store(cohort.url).read_rows(0, cohort.n, ["tabular/categorical"])["tabular/categorical"]
        except StoreError as err:
            assert "cannot be decoded" in str(err)
            continue
        if not np.array_equal(got, want):
            silent.append(position)
    path.write_bytes(good)
    assert not silent, f"{len(silent)} of {len(good)} flipped bytes read back as other values"


# ---------------------------------------------------------------------------------- 3. one writer a store


def test_a_second_prepare_of_the_same_store_is_refused_while_the_first_runs_and_the_store_verifies(tmp_path):
    out, release = str(tmp_path / "cohort.zarr"), str(tmp_path / "go-on")
    command = [sys.executable, "-m", "biofm", "prepare", "synthetic", "--out", out, "--n", "1200"]
    first = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "BIOFM_PAUSE_AFTER_PARTS": f"1:{release}"},
    )  # caught mid-prepare
    deadline = time.time() + 120
    while not os.path.exists(release + ".paused") and first.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert os.path.exists(release + ".paused"), first.communicate()
    second = subprocess.run(command, capture_output=True, text=True)
    Path(release).touch()
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert second.returncode == 2, second.stderr
    assert f"another biofm prepare is writing this store (pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    verify = subprocess.run([sys.executable, "-m", "biofm", "verify", out], capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert Store(out).n == 1200 and not os.path.exists(lock_path(out))  # whole, and the lock given back


def test_a_lock_left_by_a_killed_prepare_does_not_block_its_rerun(tmp_path):
    out = str(tmp_path / "cohort.zarr")
    command = [sys.executable, "-m", "biofm", "prepare", "synthetic", "--out", out, "--n", "1200"]
    killed = subprocess.run(command, env={**os.environ, "BIOFM_KILL_AFTER_PARTS": "1"}, capture_output=True)
    assert killed.returncode == -signal.SIGKILL and os.path.exists(lock_path(out))  # its file stays behind
    assert subprocess.run(command, capture_output=True).returncode == 0
    assert Store(out).n == 1200


def test_an_object_storage_lock_names_its_owner_and_a_dead_owner_of_this_host_is_taken_over(tmp_path):
    import socket

    import fsspec

    url = f"memory://biofm-lock-{tmp_path.name}/s.zarr"
    held = StoreLock(url).acquire()
    with pytest.raises(StoreError, match=rf"another biofm prepare is writing this store \(pid {os.getpid()}"):
        StoreLock(url).acquire()
    held.release()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fsspec.filesystem("memory").pipe(
        f"/biofm-lock-{tmp_path.name}/s.zarr.lock",
        json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "then"}).encode(),
    )
    StoreLock(url).acquire().release()  # stale: its process is gone


def test_a_part_marked_committed_without_all_its_arrays_is_written_again(tmp_path):
    url = str(tmp_path / "s.zarr")
    writer = StoreWriter(url, source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS, seed=0)
    for key in range(4):
        writer.write_batch(key, **toy_batch(key * 60, 60, 0))
    del open_root(url, "r+")["_parts/00000001/toy/x"]  # as a second writer's clean-up of the part would
    del writer
    resumed = StoreWriter(url, source="toy", modalities={"toy": {"version": 1}}, tasks=TOY_TASKS, seed=0)
    assert resumed.committed() == {0, 2, 3}
    resumed.write_batch(1, **toy_batch(60, 60, 0))
    store = resumed.finalize()
    assert store.checksum() == write_toy_store(tmp_path / "fresh.zarr", n=240, batch=60).checksum()


# ----------------------------------------------------------------------------------- 4. input tables


@pytest.mark.parametrize("missing", ["NA", "nan", "NaN", "N/A", "null", "", " NA "])
def test_missing_label_spellings_are_masked_and_keep_the_rows_other_labels(tmp_path, missing):
    from biofm.datasets.molecules import prepare_molecules

    csv = tmp_path / "mols.csv"
    rows = [("CCO", missing, "1"), ("c1ccccc1", "0", missing), ("CC(=O)O", "1", "0"), ("CCN", "0", "1")] * 5
    csv.write_text("smiles,a,b\n" + "".join(",".join(r) + "\n" for r in rows))
    store, rejected = prepare_molecules(str(csv), str(tmp_path / "s.zarr"), workers=1)
    assert rejected == 0 and store.n == 20
    order = {sid: i for i, sid in enumerate(store.index("sample_id"))}
    a, b = store.labels("a"), store.labels("b")
    for row in range(20):
        i = order[f"row-{row + 1}"]
        want_a = np.nan if rows[row][1] == missing else float(rows[row][1])
        want_b = np.nan if rows[row][2] == missing else float(rows[row][2])
        np.testing.assert_equal([a[i], b[i]], [want_a, want_b])
    assert store.tasks["a"]["kind"] == "binary"


def _ehr_layout(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    stays = ["stay_id,subject_id,intime"] + [f"s{i},p{i},2020-01-0{1 + i % 5} 08:00:00" for i in range(30)]
    (folder / "stays.csv").write_text("\n".join(stays) + "\n")
    events = ["stay_id,charttime,item,value"] + [f"s{i},2020-01-0{1 + i % 5} 09:00:00,hr,{60 + i}" for i in range(30)]
    (folder / "events.csv").write_text("\n".join(events) + "\n")
    schema = folder / "schema.yaml"
    schema.write_text(
        "name: tiny\nfiles: '{name}.csv'\nstays: {table: stays, id: stay_id, subject: subject_id, "
        "start: intime}\ntables:\n  - {table: events, time: charttime, link: stay_id, numeric: [value]}\n"
    )
    return schema


def _meds_folder(folder: Path) -> Path:
    (folder / "data").mkdir(parents=True, exist_ok=True)
    pl.DataFrame(
        {
            "subject_id": [1, 1, 2],
            "time": [pd.Timestamp("2020-01-01")] * 3,
            "code": ["A", "B", "A"],
            "numeric_value": [1.0, None, 2.0],
        }
    ).write_parquet(folder / "data" / "0.parquet")
    return folder


# each reader: (valid table text, how to call it on a file)
READERS = {
    "molecules": (
        MOLECULES,
        lambda f, d: [
            "prepare",
            "molecules",
            "--input",
            f,
            "--label-columns",
            "y",
            "--out",
            f"{d}/s.zarr",
            "--workers",
            "1",
        ],
    ),
    "slide manifest": (
        "slide_path,sample_id,subject_id,y,note\n" + "".join(f"a{i}.svs,s{i},p{i},{i % 2},n{i}\n" for i in range(40)),
        lambda f, d: ["prepare", "slides", "--manifest", f, "--label-columns", "y", "--out", f"{d}/s.zarr"],
    ),
    "oct manifest": (
        "path,sample_id,subject_id,y,note\n" + "".join(f"e{i}.npz,s{i},p{i},{i % 2},n{i}\n" for i in range(40)),
        lambda f, d: ["prepare", "oct", "--manifest", f, "--label-columns", "y", "--out", f"{d}/s.zarr"],
    ),
    "ehr labels": (
        "stay_id,y,note\n" + "".join(f"s{i},{i % 2},n{i}\n" for i in range(30)),
        lambda f, d: [
            "prepare",
            "ehr-tables",
            "--input",
            f"{d}/ehr",
            "--schema",
            str(_ehr_layout(Path(d) / "ehr")),
            "--labels",
            f,
            "--out",
            f"{d}/s.zarr",
        ],
    ),
    "ehr stays table": (None, None),  # the layout's own stays table, damaged in place
    "meds labels": (
        "subject_id,prediction_time,boolean_value\n"  # a MEDS label file has no other columns
        + "".join(f"{1 + i % 2},2020-01-02 00:00:00,{'true' if i % 2 else 'false'}\n" for i in range(40)),
        lambda f, d: [
            "prepare",
            "meds",
            "--input",
            str(_meds_folder(Path(d) / "meds")),
            "--labels",
            f,
            "--out",
            f"{d}/s.zarr",
        ],
    ),
    "cohort manifest": (
        "sample_id,smiles,note\n" + "".join(f"c{i},CCO,n{i}\n" for i in range(40)),
        lambda f, d: ["predict-cohort", "--checkpoint", f"{d}/none.ckpt", "--manifest", f, "--out", f"{d}/preds"],
    ),
}


def _faulty(text: str, fault: str) -> tuple[bytes, str]:
    """The bytes of `text` with one fault, and the file suffix they go under."""
    lines = text.splitlines(keepends=True)
    if fault == "empty":
        return b"", ".csv"
    if fault == "header only":
        return lines[0].encode(), ".csv"
    if fault == "duplicate columns":
        return "".join(
            line.rstrip("\n") + "," + line.rstrip("\n").rsplit(",", 1)[1] + "\n" for line in lines
        ).encode(), ".csv"
    if fault == "not utf-8":
        lines[3] = lines[3].rstrip("\n") + "é\n"
        return "".join(lines).encode("latin-1"), ".csv"
    packed = gzip.compress(("".join(lines) * 40).encode())  # truncated gzip
    return packed[: len(packed) // 2], ".csv.gz"


FAULTS = ["empty", "header only", "duplicate columns", "not utf-8", "truncated gzip"]
WORDS = {
    "empty": "empty",
    "header only": "no data rows",
    "duplicate columns": "two or more columns named [",
    "not utf-8": "line 4 is not valid utf-8",
    "truncated gzip": "truncated",
}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("reader", list(READERS))
def test_a_bad_table_gives_one_error_line_naming_the_file_in_every_reader(tmp_path, capsys, reader, fault):
    if reader == "ehr stays table":
        schema = _ehr_layout(tmp_path / "ehr")
        data, suffix = _faulty((tmp_path / "ehr" / "stays.csv").read_text(), fault)
        (tmp_path / "ehr" / "stays.csv").unlink()
        path = tmp_path / "ehr" / f"stays{suffix}"
        argv = [
            "prepare",
            "ehr-tables",
            "--input",
            str(tmp_path / "ehr"),
            "--schema",
            str(schema),
            "--out",
            str(tmp_path / "s.zarr"),
        ]
    else:
        text, command = READERS[reader]
        data, suffix = _faulty(text, fault)
        path = tmp_path / f"table{suffix}"
        argv = command(str(path), str(tmp_path))
    path.write_bytes(data)
    code, err = _run(argv, capsys)
    assert code == 2
    line = _one_error(err, path)
    assert WORDS[fault] in line, line
    assert not (tmp_path / "s.zarr").exists() and not (tmp_path / "preds").exists()  # nothing written


def test_encoding_reads_a_table_saved_in_another_one(tmp_path, capsys):
    data, _ = _faulty(MOLECULES, "not utf-8")
    (tmp_path / "latin.csv").write_bytes(data)
    code, err = _run(
        [
            "prepare",
            "molecules",
            "--input",
            str(tmp_path / "latin.csv"),
            "--label-columns",
            "y",
            "--out",
            str(tmp_path / "s.zarr"),
            "--workers",
            "1",
            "--encoding",
            "latin-1",
        ],
        capsys,
    )
    assert code == 0, err
    assert Store(str(tmp_path / "s.zarr")).n == 48


@pytest.mark.parametrize("reader", ["molecules", "slide manifest"])
def test_a_label_column_without_any_value_is_an_error_before_anything_is_written(tmp_path, capsys, reader):
    text, command = READERS[reader]
    header, *rows = text.splitlines()
    position = header.split(",").index("y")
    blank = [",".join("NA" if j == position else cell for j, cell in enumerate(r.split(","))) for r in rows]
    path = tmp_path / "table.csv"
    path.write_text("\n".join([header, *blank]) + "\n")
    code, err = _run(command(str(path), str(tmp_path)), capsys)
    assert code == 2
    assert "label column 'y' has no value in any row" in _one_error(err, path)
    assert not (tmp_path / "s.zarr").exists() and not list(tmp_path.glob("s.zarr.*"))


def test_a_shared_data_table_reads_unchanged():
    """The real MoleculeNet CSVs (blank cells for missing Tox21 labels) read as before: the new reader changes
    nothing for well-formed input."""
    from biofm.datasets.molecules import read_table
    from biofm.testing import SHARED_DATA

    path = SHARED_DATA / "mol" / "tox21.csv"
    if not path.exists():
        pytest.skip(f"{path} is missing: MoleculeNet's Tox21 lives in ../shared/data")
    ours = read_table(str(path), "smiles")
    plain = pd.read_csv(path, dtype=str, keep_default_na=False, na_values=[""])
    pd.testing.assert_frame_equal(ours, plain)


@pytest.mark.parametrize("what", ["molecule parquet", "meds data shard", "empty sdf"])
def test_a_truncated_parquet_or_an_empty_sdf_gives_one_error_line_naming_it(tmp_path, capsys, what):
    if what == "molecule parquet":
        path = tmp_path / "mols.parquet"
        pd.DataFrame({"smiles": ["CCO", "CCN"] * 50, "y": [0, 1] * 50}).to_parquet(path)
        path.write_bytes(path.read_bytes()[:-40])
        argv = ["prepare", "molecules", "--input", str(path), "--out", str(tmp_path / "s.zarr")]
    elif what == "meds data shard":
        folder = _meds_folder(tmp_path / "meds")
        path = folder / "data" / "0.parquet"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        labels = tmp_path / "labels.csv"
        labels.write_text(READERS["meds labels"][0])
        argv = ["prepare", "meds", "--input", str(folder), "--labels", str(labels), "--out", str(tmp_path / "s.zarr")]
    else:
        path = tmp_path / "mols.sdf"
        path.write_bytes(b"")
        argv = ["prepare", "molecules", "--input", str(path), "--out", str(tmp_path / "s.zarr")]
    code, err = _run(argv, capsys)
    assert code == 2
    line = _one_error(err, path)
    assert ("not a readable parquet file" in line) if "parquet" in what or "shard" in what else ("empty" in line)
    assert not (tmp_path / "s.zarr").exists()
