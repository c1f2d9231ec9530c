"""A prepare killed mid-way (SIGKILL right after it committed a part) and rerun gives a store identical, by
checksum, to an uninterrupted prepare of the same input."""

import os
import signal
import subprocess
import sys

import pytest

from biofm.platform.store import Store
from biofm.testing import fake_raw


def _molecules(tmp_path, out):
    csv = tmp_path / "mols.csv"
    if not csv.exists():
        smiles = fake_raw("molecule", 300, seed=4)
        csv.write_text("smiles,active\n" + "\n".join(f"{s},{i % 2}" for i, s in enumerate(smiles)))
    return ["molecules", "--input", str(csv), "--out", out, "--workers", "1", "--batch-size", "64"]


def _oct(tmp_path, out):
    return ["synthetic-oct", "--out", out, "--volumes-dir", str(tmp_path / f"volumes-{os.path.basename(out)}"),
            "--subjects", "40", "--shape", "16,16,16"]


@pytest.mark.parametrize("command", [_molecules, _oct], ids=["molecules", "synthetic-oct"])
def test_a_killed_prepare_reruns_to_the_same_store(tmp_path, command):
    prepare = [sys.executable, "-m", "biofm", "prepare"]
    clean = subprocess.run(prepare + command(tmp_path, str(tmp_path / "clean.zarr")), capture_output=True,
                           text=True, timeout=600)
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed = str(tmp_path / "resumed.zarr")
    killed = subprocess.run(prepare + command(tmp_path, resumed), capture_output=True, text=True, timeout=600,
                            env={**os.environ, "BIOFM_KILL_AFTER_PARTS": "2"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = subprocess.run(prepare + command(tmp_path, resumed), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert Store(resumed).checksum() == Store(str(tmp_path / "clean.zarr")).checksum()
