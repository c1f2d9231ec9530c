"""The SDK (`biofm.load`) and `biofm predict-cohort`: same predictions as `biofm predict`, every sample
written exactly once (resumed, or over two processes), bad inputs in errors.csv, the README example."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import biofm
from biofm.platform.cohort import predict_cohort
from biofm.testing import fake_raw, fake_slides, write_fake_modality_store

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {"d_model": 16, "depth": 1, "heads": 2, "latents": 2}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model trained briefly on molecule, slide and OCT stores, with `biofm predict`'s output."""
    os.environ.setdefault("WANDB_MODE", "disabled")
    from biofm.recipes.runs import fit_and_test

    folder = tmp_path_factory.mktemp("sdk")
    stores = [write_fake_modality_store(str(folder / f"{m}.zarr"), m, n=60).url for m in ("molecule", "wsi", "oct")]
    fit_and_test(stores, folder / "run", epochs=1, batch_size=16, loggers=False, predict=True, model=TINY)
    return folder


def test_sdk_predictions_equal_those_of_biofm_predict(trained):
    written = pd.read_parquet(trained / "run" / "predictions.parquet")
    written = written[written["source"] == "fake-molecule"]
    raw = fake_raw("molecule", 60)
    rows = [(sid, raw[int(sid[1:])]) for sid in written["sample_id"] if raw[int(sid[1:])] is not None]
    assert len(rows) >= 4
    model = biofm.load(trained / "run")
    assert model.modalities == ["molecule", "wsi", "oct"] and "flag" in model.tasks
    ours = model.predict(smiles=[s for _, s in rows], ids=[sid for sid, _ in rows]).set_index("sample_id")
    theirs = written.set_index("sample_id").loc[ours.index]
    np.testing.assert_allclose(
        ours["flag/prob/1"].to_numpy(float), theirs["flag/prob/1"].to_numpy(float), rtol=1e-4, atol=1e-5
    )
    assert (ours["flag"] == theirs["flag"]).all() and ours["error"].isna().all()
    assert model.embed(smiles=[s for _, s in rows[:2]]).shape == (2, TINY["d_model"])


def _cohort(folder: Path, n: int) -> Path:
    pool = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "c1ccncc1", "CN1CCC[C@H]1c1cccnc1"]
    manifest = folder / "cohort.csv"
    pd.DataFrame({"sample_id": [f"C{i}" for i in range(n)], "smiles": [pool[i % len(pool)] for i in range(n)]}).to_csv(
        manifest, index=False
    )
    return manifest


def _exactly_once(out: Path, n: int) -> pd.DataFrame:
    predictions = pd.read_parquet(out / "predictions.parquet")
    assert len(predictions) == n and predictions["sample_id"].is_unique
    assert set(predictions["sample_id"]) == {f"C{i}" for i in range(n)}
    return predictions


@pytest.mark.parametrize("num_workers", [0, 2])  # 2 workers on CPU: the model runs in the workers
def test_bad_inputs_end_in_errors_csv_and_every_other_sample_is_predicted(trained, tmp_path, num_workers):
    from biofm.datasets.oct import synthetic_eye

    volume, thickness = synthetic_eye(np.random.default_rng(0), (8, 16, 16))
    np.savez(tmp_path / "eye.npz", oct_bscans=volume, rnflt=thickness)
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 not a zip archive")
    rows = [
        {"sample_id": "mol-ok", "smiles": "CCO"},
        {"sample_id": "mol-bad", "smiles": "C1CC(("},
        {"sample_id": "slide-ok", "slide_path": fake_slides()[0]},
        {"sample_id": "slide-gone", "slide_path": str(tmp_path / "gone.svs")},
        {"sample_id": "oct-ok", "oct_path": str(tmp_path / "eye.npz")},
        {"sample_id": "oct-corrupt", "oct_path": str(tmp_path / "corrupt.npz")},
    ]
    pd.DataFrame(rows).to_csv(tmp_path / "cohort.csv", index=False)
    summary = predict_cohort(
        str(trained / "run"),
        str(tmp_path / "cohort.csv"),
        str(tmp_path / "out"),
        batch_size=2,
        num_workers=num_workers,
        accelerator="cpu",
        progress=False,
    )
    assert summary["samples"] == 6 and summary["predicted"] == 3 and summary["errors"] == 3
    errors = pd.read_csv(tmp_path / "out" / "errors.csv").set_index("sample_id")["reason"]
    assert sorted(errors.index) == ["mol-bad", "oct-corrupt", "slide-gone"]
    assert "SMILES" in errors["mol-bad"] and "does not exist" in errors["slide-gone"]
    assert "cannot be read" in errors["oct-corrupt"]
    predictions = pd.read_parquet(tmp_path / "out" / "predictions.parquet").set_index("sample_id")
    assert list(predictions.index) == [r["sample_id"] for r in rows]  # manifest order
    ok = ["mol-ok", "slide-ok", "oct-ok"]
    assert predictions.loc[ok, "flag/prob/1"].notna().all() and predictions.loc[ok, "error"].isna().all()
    sdk = biofm.load(trained / "run").predict(
        smiles=["CCO", None, None],
        slides=[None, fake_slides()[0], None],
        oct=[None, None, str(tmp_path / "eye.npz")],
        ids=ok,
    )
    np.testing.assert_allclose(
        predictions.loc[ok, "flag/prob/1"].to_numpy(float),
        sdk.set_index("sample_id").loc[ok, "flag/prob/1"].to_numpy(float),
        rtol=1e-4,
        atol=1e-5,
    )
    # a rerun finds every batch done and merges from the shards alone: the same errors and predictions
    again = predict_cohort(
        str(trained / "run"),
        str(tmp_path / "cohort.csv"),
        str(tmp_path / "out"),
        batch_size=2,
        num_workers=num_workers,
        accelerator="cpu",
        progress=False,
    )
    assert again["batches_this_run"] == 0 and again["errors"] == 3
    pd.testing.assert_series_equal(
        pd.read_csv(tmp_path / "out" / "errors.csv").set_index("sample_id")["reason"], errors
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(tmp_path / "out" / "predictions.parquet").set_index("sample_id"), predictions
    )


def test_a_run_killed_halfway_and_restarted_writes_every_sample_exactly_once(trained, tmp_path):
    n = 600
    manifest, out = _cohort(tmp_path, n), tmp_path / "out"
    script = (
        "from biofm.platform.cohort import predict_cohort\n"
        f"predict_cohort({str(trained / 'run')!r}, {str(manifest)!r}, {str(out)!r}, batch_size=8, "
        "progress=False)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "shards").glob("part-*.parquet"))) < 10:
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    written = len(list((out / "shards").glob("part-*.parquet")))
    assert 10 <= written < n // 8, "the run was not interrupted halfway"
    summary = predict_cohort(str(trained / "run"), str(manifest), str(out), batch_size=8, progress=False)
    assert summary["batches_this_run"] == n // 8 - written
    _exactly_once(out, n)


@pytest.mark.slow
def test_a_two_process_run_writes_every_sample_exactly_once(trained, tmp_path):
    n = 90  # 12 batches of 8 … the last one short; the distributed sampler pads ranks with repeats
    manifest, out = _cohort(tmp_path, n), tmp_path / "out"
    predict_cohort(
        str(trained / "run"), str(manifest), str(out), batch_size=8, devices=2, accelerator="cpu", progress=False
    )
    predictions = _exactly_once(out, n)
    single = predict_cohort(str(trained / "run"), str(manifest), str(tmp_path / "one"), batch_size=8, progress=False)
    assert single["samples"] == n
    one = pd.read_parquet(tmp_path / "one" / "predictions.parquet")
    np.testing.assert_allclose(
        predictions["flag/prob/1"].to_numpy(float), one["flag/prob/1"].to_numpy(float), rtol=1e-5
    )


def test_the_readme_example_runs(tmp_path, monkeypatch):
    os.environ.setdefault("WANDB_MODE", "disabled")
    from biofm.recipes.runs import fit_and_test

    block = re.search(r"## Python SDK and cohort inference\s+```python\n(.*?)```", README.read_text(), re.S)
    assert block, "the README has no Python SDK example"
    store = write_fake_modality_store(str(tmp_path / "m.zarr"), "molecule", n=40)
    fit_and_test([store.url], tmp_path / "runs" / "molecules", epochs=1, batch_size=16, loggers=False, model=TINY)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)  # noqa: S102 — our own README
    frame = namespace["frame"]
    assert list(frame["sample_id"]) == ["ethanol", "phenol", "bad"]
    assert frame["error"].isna().tolist() == [True, True, False]
    assert namespace["vectors"].shape == (1, TINY["d_model"])


def test_a_bare_string_a_single_volume_or_ids_of_another_length_are_refused(trained):
    model = biofm.load(trained / "run")
    with pytest.raises(
        ValueError,
        match=r"smiles= takes a list, one entry per sample; got a single str — pass "
        r"smiles=\['CCO'\]",
    ):
        model.predict(smiles="CCO")  # would be three molecules "C", "C", "O"
    with pytest.raises(ValueError, match=r"oct= takes a list.*one array of shape \(8, 16, 16\)"):
        model.predict(oct=np.zeros((8, 16, 16), np.uint8))  # would be eight B-scans as samples
    with pytest.raises(ValueError, match="ids= has 1 values but the inputs have 2 samples"):
        model.predict(smiles=["CCO", "CCN"], ids=["a"])
    with pytest.raises(ValueError, match="unknown input smile="):
        model.embed(smile=["CCO"])
    frame = model.predict(smiles=["CCO"], ids=["ethanol"])
    assert list(frame["sample_id"]) == ["ethanol"] and frame["error"].isna().all()


def test_a_cohort_manifest_without_sample_id_says_so(trained, tmp_path, capsys):
    manifest = tmp_path / "cohort.csv"
    pd.DataFrame({"smiles": ["CCO", "CCN", "c1ccccc1"]}).to_csv(manifest, index=False)
    predict_cohort(str(trained / "run"), str(manifest), str(tmp_path / "out"), progress=False)
    err = capsys.readouterr().err
    assert f"{manifest} has no sample_id column, so its rows are named row-1 … row-3" in err
    assert "columns: ['smiles']" in err
    written = pd.read_parquet(tmp_path / "out" / "predictions.parquet")
    assert list(written["sample_id"]) == ["row-1", "row-2", "row-3"]


NOT_CHECKPOINTS = {
    "empty": (lambda good: b"", "the file is empty (0 bytes), not a checkpoint"),
    "truncated": (lambda good: good[: len(good) // 2], "the checkpoint is truncated or damaged"),
    "text": (lambda good: b"model:\n  d_model: 64\n", "the file is readable characters, not a checkpoint"),
    "random": (
        lambda good: bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "the file is not a checkpoint",
    ),
    "another zip": (lambda good: _zip_bytes(), "a zip archive but not a PyTorch checkpoint"),
}


def _zip_bytes() -> bytes:
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("readme.txt", "not a model")
    return buffer.getvalue()


@pytest.mark.parametrize("kind", list(NOT_CHECKPOINTS))
def test_a_file_that_is_not_a_checkpoint_gets_one_error_saying_what_it_is(trained, tmp_path, capsys, kind):
    from biofm.platform.cli import main
    from biofm.platform.errors import CheckpointError
    from biofm.platform.sdk import find_checkpoint

    make, words = NOT_CHECKPOINTS[kind]
    bad = tmp_path / "model.ckpt"
    bad.write_bytes(make(find_checkpoint(trained / "run").read_bytes()))
    with pytest.raises(CheckpointError, match=re.escape(words)) as err:
        biofm.load(bad)
    assert "unpickling" not in str(err.value)  # not the diagnosis of a planted payload
    manifest = _cohort(tmp_path, 4)
    with pytest.raises(SystemExit) as done:
        main(["predict-cohort", "--checkpoint", str(bad), "--manifest", str(manifest), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("biofm: error:")]
    assert done.value.code == 2 and len(lines) == 1 and words in lines[0] and "Traceback" not in err


def test_a_cohort_folder_holding_another_runs_shards_is_refused_not_merged(trained, tmp_path):
    from biofm.platform.errors import StoreError

    out = tmp_path / "out"
    predict_cohort(str(trained / "run"), str(_cohort(tmp_path, 16)), str(out), batch_size=8, progress=False)
    other = tmp_path / "other.csv"
    pd.DataFrame({"sample_id": [f"X{i}" for i in range(16)], "smiles": ["CCN"] * 16}).to_csv(other, index=False)
    with pytest.raises(StoreError, match="holds the shards of another predict-cohort run"):
        predict_cohort(str(trained / "run"), str(other), str(out), batch_size=8, progress=False)
    assert set(pd.read_parquet(out / "predictions.parquet")["sample_id"]) == {f"C{i}" for i in range(16)}
    again = predict_cohort(str(trained / "run"), str(tmp_path / "cohort.csv"), str(out), batch_size=8, progress=False)
    assert again["batches_this_run"] == 0  # the same run resumes (nothing left to do)
