"""OCT: every reader on its format, fixed-shape volumes, splits by subject, bad input, augmentation off at
evaluation, a short fit on synthetic volumes (detection, sparse progression), pseudo-labelling."""

import numpy as np
import pandas as pd
import pytest
import torch

from biofm.datasets.oct import SYNTHETIC_LABELS, prepare_oct, write_synthetic_oct
from biofm.modalities.oct import Oct, read_oct
from biofm.testing import SHARED_DATA

OCT = SHARED_DATA / "oct"
needs_oct = pytest.mark.skipif(not OCT.exists(), reason=f"shared OCT data not found at {OCT}")


def ramp(shape=(6, 10, 12)) -> np.ndarray:
    return (np.arange(np.prod(shape)).reshape(shape) % 251).astype(np.uint8)


@needs_oct
@pytest.mark.parametrize("name", ["test_volume.vol", "heyex_xml_test_volume/test_dummy.xml"])
def test_heidelberg_vol_and_heyex_xml_read_through_eyepy(name):
    record = read_oct(str(OCT / name))
    assert record.volume.shape == (10, 40, 50) and record.volume.dtype == np.uint8
    arrays, _ = Oct(shape=(8, 16, 16)).process(str(OCT / name))
    assert arrays["volume"].shape == (8, 16, 16) and arrays["has_volume"] and not arrays["has_enface"]


def test_each_written_format_reads_back_the_same_volume(tmp_path):
    import nibabel
    import pydicom
    import tifffile
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    volume = ramp()
    np.savez(tmp_path / "eye.npz", oct_bscans=volume, rnflt=np.ones((5, 7), np.float32), glaucoma=np.float32(1))
    np.save(tmp_path / "eye.npy", volume)
    nibabel.save(nibabel.Nifti1Image(volume, np.eye(4)), tmp_path / "eye.nii.gz")
    tifffile.imwrite(tmp_path / "eye.tif", volume)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.77.1.5.4"  # ophthalmic tomography
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.update(
        {
            "NumberOfFrames": volume.shape[0],
            "Rows": volume.shape[1],
            "Columns": volume.shape[2],
            "SamplesPerPixel": 1,
            "PhotometricInterpretation": "MONOCHROME2",
            "BitsAllocated": 8,
            "BitsStored": 8,
            "HighBit": 7,
            "PixelRepresentation": 0,
        }
    )
    ds.PixelData = volume.tobytes()
    ds.save_as(tmp_path / "eye.dcm", enforce_file_format=True)
    for name in ("eye.npz", "eye.npy", "eye.nii.gz", "eye.tif", "eye.dcm"):
        record = read_oct(str(tmp_path / name))
        np.testing.assert_array_equal(record.volume, volume, err_msg=name)
    npz = read_oct(str(tmp_path / "eye.npz"))
    assert npz.enface.shape == (5, 7) and float(npz.values["glaucoma"]) == 1.0
    # a configurable key map reads other npz layouts
    np.savez(tmp_path / "other.npz", cube=volume)
    assert read_oct(str(tmp_path / "other.npz"), {"volume": "cube"}).volume.shape == volume.shape


def test_volumes_are_resampled_to_one_shape_as_uint8_and_floats_are_scaled():
    oct_ = Oct(shape=(4, 8, 8), enface_shape=(4, 4))
    arrays, _ = oct_.process(ramp((6, 10, 12)))
    assert arrays["volume"].shape == (4, 8, 8) and arrays["volume"].dtype == np.uint8
    floats = np.linspace(-3.0, 7.0, 4 * 8 * 8, dtype=np.float32).reshape(4, 8, 8)  # already the stored shape
    scaled, _ = oct_.process(floats)
    assert scaled["volume"].max() >= 250 and scaled["volume"].min() <= 5  # scaled to the full grey range
    assert (np.diff(scaled["volume"].reshape(-1).astype(int)) >= 0).all()  # order kept


def test_bad_files_are_reported_with_a_reason_and_the_rest_is_prepared(tmp_path):
    good = write_synthetic_oct(tmp_path / "good", n_subjects=3, seed=1, shape=(8, 16, 16))
    frame = pd.read_csv(good)
    frame["path"] = [str(tmp_path / "good" / p) for p in frame["path"]]
    (tmp_path / "eye.xyz").write_bytes(b"what")
    np.savez(tmp_path / "full.npz", oct_bscans=ramp())
    (tmp_path / "truncated.npz").write_bytes((tmp_path / "full.npz").read_bytes()[:300])
    np.savez(tmp_path / "nokey.npz", something=ramp())
    np.save(tmp_path / "flat.npy", np.ones((10, 10), np.uint8))
    nan = ramp().astype(np.float32)
    nan[1, 2, 3] = np.nan
    np.save(tmp_path / "nan.npy", nan)
    bad = {
        "eye.xyz": "unknown volume format",
        "truncated.npz": "cannot be read",
        "nokey.npz": "no 'oct_bscans'",
        "flat.npy": "2 dimensions",
        "nan.npy": "1 NaN",
        "gone.npz": "does not exist",
    }
    rows = [
        {"path": str(tmp_path / name), "sample_id": f"BAD-{i}", "subject_id": f"BADP-{i}", "eye": "OD"}
        for i, name in enumerate(bad)
    ]
    manifest = tmp_path / "manifest.csv"
    pd.concat([frame, pd.DataFrame(rows)]).to_csv(manifest, index=False)
    store, rejected = prepare_oct(
        str(manifest),
        str(tmp_path / "s.zarr"),
        npz_labels_keys=["glaucoma", "md"],
        shape=(8, 16, 16),
        enface_shape=(8, 16),
        batch_size=4,
    )
    assert rejected == len(bad) and store.n == len(frame)
    rejects = pd.read_csv(str(tmp_path / "s.zarr") + ".rejects.csv").set_index("sample_id")
    for i, (name, reason) in enumerate(bad.items()):
        assert reason in rejects.loc[f"BAD-{i}", "reason"], (name, rejects.loc[f"BAD-{i}", "reason"])


def test_both_eyes_of_a_subject_share_a_split_and_labels_come_from_the_npz(tmp_path):
    manifest = write_synthetic_oct(tmp_path / "v", n_subjects=30, seed=2, shape=(8, 16, 16))
    store, rejected = prepare_oct(
        str(manifest),
        str(tmp_path / "s.zarr"),
        npz_labels_keys=SYNTHETIC_LABELS,
        shape=(8, 16, 16),
        enface_shape=(8, 16),
    )
    assert rejected == 0 and store.n == 60
    assert store.tasks["glaucoma"]["kind"] == "binary" and store.tasks["md"]["kind"] == "regression"
    assert store.tasks["progression"]["kind"] == "multilabel" and store.tasks["progression"]["n_classes"] == 6
    splits = pd.DataFrame({"subject": store.index("subject_id"), "split": store.index("split")})
    assert splits.groupby("subject")["split"].nunique().max() == 1
    progression = store.root["labels/progression"][...]
    assert 0.2 < np.isnan(progression[:, 0]).mean() < 0.7  # known for part of the eyes only
    assert store.root["oct/volume"].chunks[0] == 1  # one volume per chunk


def test_augmentation_changes_training_batches_only():
    oct_ = Oct(shape=(8, 16, 16), enface_shape=(8, 16))
    from biofm.testing import fake_raw

    batch = oct_.collate(
        {k.split("/")[1]: v for k, v in oct_.featurise(fake_raw("oct", 6)).items() if k != "oct/present"}
    )
    torch.manual_seed(0)
    augmented = [oct_.augment(batch)["volume"] for _ in range(4)]
    assert any(not torch.equal(a, batch["volume"]) for a in augmented)
    assert all(a.min() >= 0 and a.max() <= 1 for a in augmented)
    from biofm.platform.lightning import Collator

    schema = {"modalities": {"oct": oct_.config()}, "tasks": {}}
    raw = {k: v for k, v in oct_.featurise(fake_raw("oct", 6)).items() if k != "oct/present"}
    raw.update({"oct/present": np.ones(6, bool), "source": "s", "row": np.arange(6)})
    evaluation = [Collator(schema)(dict(raw))["inputs"]["oct"]["volume"] for _ in range(3)]
    training = [Collator(schema, augment=True)(dict(raw))["inputs"]["oct"]["volume"] for _ in range(3)]
    assert all(torch.equal(v, batch["volume"]) for v in evaluation)  # evaluation: never augmented
    assert any(not torch.equal(v, batch["volume"]) for v in training)


@pytest.fixture(scope="module")
def synthetic_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("oct")
    manifest = write_synthetic_oct(folder / "v", n_subjects=80, seed=0, shape=(24, 32, 32))
    store, rejected = prepare_oct(
        str(manifest),
        str(folder / "s.zarr"),
        npz_labels_keys=SYNTHETIC_LABELS,
        shape=(24, 32, 32),
        enface_shape=(24, 32),
    )
    assert rejected == 0
    return folder, store


@pytest.mark.slow
def test_a_short_fit_beats_chance_on_detection_and_sparse_progression(synthetic_store):
    from biofm.recipes.runs import fit_and_test

    folder, store = synthetic_store
    metrics = fit_and_test(
        [store.url],
        folder / "run",
        epochs=5,
        batch_size=16,
        loggers=False,
        model={"lr": 2e-3, "encoders": {"oct": {"grid": 4, "layers": 1}}},
    )
    print({k: round(v, 3) for k, v in metrics.items()})
    assert metrics["glaucoma/auroc"] > 0.75, metrics
    assert metrics["progression/auroc"] > 0.6, metrics
    assert np.isfinite(metrics["md/r2"])


@pytest.mark.slow
def test_pseudo_labelling_adds_unlabeled_samples_and_training_stays_finite(synthetic_store, monkeypatch):
    from biofm.recipes.runs import fit_and_test

    monkeypatch.setenv("WANDB_MODE", "disabled")
    folder, store = synthetic_store
    assert np.isnan(store.root["labels/glaucoma"][...]).any()  # unlabeled eyes exist
    metrics = fit_and_test(
        [store.url],
        folder / "run-pseudo",
        epochs=4,
        batch_size=16,
        model={
            "lr": 2e-3,
            "encoders": {"oct": {"grid": 4, "layers": 1}},
            "pseudo_labels": {"threshold": 0.6, "start_epoch": 1, "tasks": ["glaucoma"]},
        },
        loggers=None,
    )
    log = pd.read_csv(folder / "run-pseudo" / "logs" / "fit" / "metrics.csv")
    added = log["train/pseudo_labels"].dropna()
    assert added.sum() > 0  # unlabeled volumes became training samples
    assert (log.loc[log["epoch"] == 0, "train/pseudo_labels"].dropna() == 0).all()  # none before start_epoch
    assert np.isfinite(log["train/loss"].dropna()).all() and np.isfinite(metrics["glaucoma/auroc"])
