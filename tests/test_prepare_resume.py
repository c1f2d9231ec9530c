"""A prepare killed mid-way (SIGKILL right after it committed a part) and rerun gives a store identical, by
checksum, to an uninterrupted prepare of the same input — for every modality's prepare."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from biofm.platform.store import Store
from biofm.testing import SHARED_DATA, fake_raw

ROOT = Path(__file__).resolve().parents[1]
EHR = SHARED_DATA / "ehr"


def _molecules(tmp_path, out):
    csv = tmp_path / "mols.csv"
    if not csv.exists():
        smiles = fake_raw("molecule", 300, seed=4)
        csv.write_text("smiles,active\n" + "\n".join(f"{s},{i % 2}" for i, s in enumerate(smiles)))
    return ["molecules", "--input", str(csv), "--out", out, "--workers", "1", "--batch-size", "64"]


def _oct(tmp_path, out):
    return [
        "synthetic-oct",
        "--out",
        out,
        "--volumes-dir",
        str(tmp_path / f"volumes-{os.path.basename(out)}"),
        "--subjects",
        "40",
        "--shape",
        "16,16,16",
    ]


def _cohort(tmp_path, out):
    return ["synthetic", "--out", out, "--n", "1200"]  # tabular + report text (a tokenizer is learned)


def _biobank(tmp_path, out):  # slides + reports + case data; the same slide files for both runs
    return ["synthetic-biobank", "--out", out, "--slides-dir", str(tmp_path / "slides"), "--n", "30", "--size", "448"]


def _meds(tmp_path, out):
    if not EHR.is_dir():
        pytest.skip(f"{EHR} is missing: the MEDS demo lives in ../shared/data")
    return [
        "meds",
        "--input",
        str(EHR / "mimic-iv-demo-meds-0.0.1"),
        "--labels",
        str(EHR / "aces_icu_mortality_first_24h_labels.parquet"),
        "--out",
        out,
        "--shard-subjects",
        "20",
    ]


def _ehr_tables(tmp_path, out):
    if not EHR.is_dir():
        pytest.skip(f"{EHR} is missing: the MIMIC-IV demo lives in ../shared/data")
    return [
        "ehr-tables",
        "--input",
        str(EHR / "mimic-iv-demo-2.2"),
        "--schema",
        str(ROOT / "configs/ehr/mimic-iv.yaml"),
        "--out",
        out,
        "--shard-subjects",
        "20",
    ]


@pytest.mark.parametrize(
    "command, parts",
    [(_molecules, 2), (_oct, 2), (_cohort, 2), (_biobank, 1), (_meds, 2), (_ehr_tables, 2)],
    ids=["molecules", "synthetic-oct", "synthetic-cohort", "synthetic-biobank", "meds", "ehr-tables"],
)
def test_a_killed_prepare_reruns_to_the_same_store(tmp_path, command, parts):
    prepare = [sys.executable, "-m", "biofm", "prepare"]
    clean = subprocess.run(
        prepare + command(tmp_path, str(tmp_path / "clean.zarr")), capture_output=True, text=True, timeout=600
    )
    assert clean.returncode == 0, clean.stderr[-2000:]
    resumed = str(tmp_path / "resumed.zarr")
    first_log, rerun_log = tmp_path / "parts-killed.txt", tmp_path / "parts-rerun.txt"
    killed = subprocess.run(
        prepare + command(tmp_path, resumed),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BIOFM_KILL_AFTER_PARTS": str(parts), "BIOFM_PARTS_LOG": str(first_log)},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    rerun = subprocess.run(
        prepare + command(tmp_path, resumed),
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "BIOFM_PARTS_LOG": str(rerun_log)},
    )
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert Store(resumed).checksum() == Store(str(tmp_path / "clean.zarr")).checksum()
    # the rerun resumed from the last committed part: it wrote none of the killed run's parts again, and
    # between them every sample was written once
    killed_parts = [tuple(map(int, line.split())) for line in first_log.read_text().splitlines()]
    rerun_parts = (
        [tuple(map(int, line.split())) for line in rerun_log.read_text().splitlines()] if rerun_log.exists() else []
    )  # the killed run may have committed every sample before it was killed
    assert len(killed_parts) == parts
    assert not {k for k, _ in killed_parts} & {k for k, _ in rerun_parts}
    assert sum(n for _, n in killed_parts) + sum(n for _, n in rerun_parts) == Store(resumed).n
    for store in (resumed, str(tmp_path / "clean.zarr")):  # and every file matches the checksums written for it
        verify = subprocess.run([sys.executable, "-m", "biofm", "verify", store], capture_output=True, text=True)
        assert verify.returncode == 0, verify.stderr[-2000:]
