"""Stores on object storage: `prepare` writes to s3://…, `fit` streams from it, against a real
S3-compatible server on loopback (moto in server mode), with credentials from the environment only."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from biofm.testing import fake_raw, free_port

ROOT = Path(__file__).resolve().parents[1]
SECRET = "biofm-test-secret-never-logged"


@pytest.fixture
def s3_env():
    moto_server = pytest.importorskip(
        "moto.server", reason="moto[server] is not installed: it runs the local S3 server (pip install -e '.[dev]')"
    )
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed: it reads s3:// stores (pip install -e '.[s3]')")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    env = {
        "AWS_ACCESS_KEY_ID": "biofm-test",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    s3fs.S3FileSystem(
        key=env["AWS_ACCESS_KEY_ID"], secret=SECRET, endpoint_url=env["AWS_ENDPOINT_URL"], skip_instance_cache=True
    ).mkdir("cohort")
    try:
        yield {**os.environ, **env, "WANDB_MODE": "offline"}
    finally:
        urllib.request.urlopen(urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST"))
        server.stop()


def test_prepare_writes_to_s3_and_fit_streams_from_it(s3_env, tmp_path):
    smiles = fake_raw("molecule", 80, seed=2)
    (tmp_path / "mols.csv").write_text("smiles,active\n" + "\n".join(f"{s},{i % 2}" for i, s in enumerate(smiles)))
    biofm = [sys.executable, "-m", "biofm"]
    prepared = subprocess.run(
        [
            *biofm,
            "prepare",
            "molecules",
            "--input",
            str(tmp_path / "mols.csv"),
            "--out",
            "s3://cohort/mols.zarr",
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        env=s3_env,
        cwd=tmp_path,
        timeout=300,
    )
    assert prepared.returncode == 0, prepared.stderr[-3000:]
    assert not (tmp_path / "mols.zarr").exists()  # nothing written locally

    import s3fs

    fs = s3fs.S3FileSystem(key=s3_env["AWS_ACCESS_KEY_ID"], secret=SECRET, endpoint_url=s3_env["AWS_ENDPOINT_URL"])
    assert fs.exists("cohort/mols.zarr/zarr.json") and fs.exists("cohort/mols.zarr/molecule/atoms/zarr.json")

    run = tmp_path / "run"
    fit = subprocess.run(
        [
            *biofm,
            "fit",
            "--trainer",
            str(ROOT / "configs/trainer/cpu.yaml"),
            "--model",
            str(ROOT / "configs/model/tiny.yaml"),
            "--data",
            str(ROOT / "configs/data/molecules.yaml"),
            "--data.stores",
            json.dumps(["s3://cohort/mols.zarr"]),
            "--data.batch_size",
            "16",
            "--trainer.max_epochs",
            "2",
            "--trainer.default_root_dir",
            str(run),
            "--trainer.enable_progress_bar",
            "false",
        ],
        capture_output=True,
        text=True,
        env=s3_env,
        cwd=tmp_path,
        timeout=600,
    )
    assert fit.returncode == 0, fit.stderr[-3000:]
    metrics = (run / "logs" / "fit" / "metrics.csv").read_text()
    assert "val/active/auroc" in metrics and (run / "checkpoints" / "last.ckpt").exists()
    # credentials come from the environment and never land in the run: configs, logs, W&B files
    for path in run.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in fit.stdout + fit.stderr


def test_a_missing_bucket_is_a_clear_error(s3_env, tmp_path):
    fit = subprocess.run(
        [
            sys.executable,
            "-m",
            "biofm",
            "fit",
            "--model",
            str(ROOT / "configs/model/tiny.yaml"),
            "--data.stores",
            '["s3://no-such-bucket/x.zarr"]',
            "--trainer.max_epochs",
            "1",
        ],
        capture_output=True,
        text=True,
        env=s3_env,
        cwd=tmp_path,
        timeout=300,
    )
    assert fit.returncode == 2
    assert "s3://no-such-bucket/x.zarr" in fit.stderr and "Traceback" not in fit.stderr
