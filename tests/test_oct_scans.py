"""OCT exams as clinics take them (issue #24): line and circle scans from Heidelberg `.vol` files (the shared
`test_volume.vol` with its scan pattern rewritten), their RNFL thickness profile, anti-aliased resampling and
resampling by the file's voxel spacing."""

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from biofm.datasets.oct import prepare_oct
from biofm.modalities.oct import Oct, resample, resample_physical
from biofm.modalities.oct.readers import OctRecord, read_oct
from biofm.platform.store import Store
from biofm.testing import SHARED_DATA, write_vol_scan

VOL = SHARED_DATA / "oct" / "test_volume.vol"
needs_vol = pytest.mark.skipif(not VOL.exists(), reason=f"the shared Heidelberg test volume is not at {VOL}")
SCALE_Y_UM = 3.872  # µm per pixel of depth in test_volume.vol


NAMES = [
    f"oct/{n}" for n in ("volume", "has_volume", "enface", "has_enface", "scan", "has_scan", "profile", "has_profile")
]


def _layers(width: int = 50) -> np.ndarray:
    """ILM at row 5, BM at 30, the RNFL's outer boundary from row 8 to 12 across the scan."""
    return np.stack([np.full(width, 5.0), np.full(width, 30.0), np.linspace(8.0, 12.0, width)])


@needs_vol
@pytest.mark.parametrize("pattern, name", [(1, "line"), (2, "circle")])
def test_a_line_or_circle_scan_is_read_as_one_bscan_with_its_rnfl_profile(tmp_path, pattern, name):
    path = write_vol_scan(VOL, tmp_path / f"{name}.vol", pattern, layers=_layers())
    record = read_oct(path)
    assert record.pattern == name and record.volume is None and record.scan.shape == (40, 50)
    assert record.profile == pytest.approx((np.linspace(8.0, 12.0, 50) - 5.0) * SCALE_Y_UM, rel=1e-3)
    repeated = read_oct(write_vol_scan(VOL, tmp_path / "repeats.vol", pattern, bscans=3))  # ART repeats
    assert repeated.scan.shape == (40, 50) and repeated.profile is None  # no segmentation in the file
    volume = read_oct(str(VOL))
    assert volume.pattern == "volume" and volume.volume.shape == (10, 40, 50)
    assert volume.spacing == pytest.approx((0.03144, 0.003872, 0.011819), rel=1e-3)


@needs_vol
def test_circle_scans_and_volumes_prepare_into_one_store_and_reach_the_encoder(tmp_path):
    paths = [write_vol_scan(VOL, tmp_path / f"c{i}.vol", 2, layers=_layers() + i) for i in range(4)]
    rows = [
        {"path": p, "sample_id": f"c{i}", "subject_id": f"p{i}", "eye": "OD", "y": i % 2} for i, p in enumerate(paths)
    ]
    rows += [{"path": str(VOL), "sample_id": f"v{i}", "subject_id": f"q{i}", "eye": "OS", "y": i % 2} for i in range(4)]
    pd.DataFrame(rows).to_csv(tmp_path / "exams.csv", index=False)
    store, rejected = prepare_oct(
        str(tmp_path / "exams.csv"),
        str(tmp_path / "oct.zarr"),
        label_columns=["y"],
        shape=(8, 16, 16),
        scan_shape=(32, 64),
    )
    assert rejected == 0 and store.n == 8
    rows = store.read_rows(0, store.n, ["oct/has_scan", "oct/has_profile", "oct/has_volume", "oct/scan", "oct/profile"])
    ids = list(store.index("sample_id"))
    scans = {s: bool(h) for s, h in zip(ids, rows["oct/has_scan"])}
    assert scans == {**{f"c{i}": True for i in range(4)}, **{f"v{i}": False for i in range(4)}}
    assert list(rows["oct/has_volume"]) == [not scans[s] for s in ids]
    circle = ids.index("c0")
    assert rows["oct/scan"][circle].shape == (32, 64) and rows["oct/scan"][circle].max() > 0
    assert float(rows["oct/profile"][circle][0]) == pytest.approx(3 * SCALE_Y_UM, rel=0.02)
    modality = Oct.from_config(Store(store.url).modalities["oct"])
    batch = modality.collate({k.split("/", 1)[1]: v for k, v in store.read_rows(0, store.n, NAMES).items()})
    tokens, mask = modality.encoder(32, grid=4, layers=1, heads=2)(batch)
    assert tokens.shape[0] == 8 and mask[circle].sum() > 0
    volume_tokens = 4 * 4 * 4  # grid³ for the volume, then the en-face map, the B-scan and the profile
    assert not mask[circle, :volume_tokens].any() and mask[circle, volume_tokens:].any()


@needs_vol
def test_a_store_without_bscans_refuses_a_circle_scan_naming_the_option(tmp_path):
    path = write_vol_scan(VOL, tmp_path / "c.vol", 2)
    modality = Oct(shape=(8, 16, 16))
    with pytest.raises(Exception, match=r"a single B-scan \(circle scan\).*--scan-shape"):
        modality.process(path)


def test_resampling_200_cubed_to_128_cubed_does_not_alias_fine_layers():
    depth = np.arange(200)
    stripes = np.broadcast_to((depth % 2 * 200.0)[None, :, None], (200, 200, 200)).astype(np.float32)  # period 2
    plain = F.interpolate(torch.from_numpy(stripes)[None, None], size=(128,) * 3, mode="trilinear")[0, 0].numpy()
    smooth = resample(stripes, (128, 128, 128), "trilinear")
    inside = slice(4, -4)  # the first and last few planes see the edge stripe replicated
    assert plain[:, inside].std() > 40  # moiré: a beat between the stripes and the new grid
    # what is left of the stripes is the Gaussian's response at the old Nyquist frequency (~5 %; measured
    # 0.098 of the moiré); the mean grey is kept
    assert smooth[:, inside].std() < 0.2 * plain[:, inside].std() and abs(smooth.mean() - 100.0) < 1


def test_volumes_of_known_spacing_are_resampled_to_one_physical_scale():
    def eye(spacing: float, n: int) -> OctRecord:
        z = (np.arange(n) + 0.5) * spacing
        layer = ((z > 0.8) & (z < 1.2)).astype(np.float32) * 200  # a layer 0.4 mm thick
        return OctRecord(np.broadcast_to(layer[None, :, None], (16, n, 16)).copy(), spacing=(0.1, spacing, 0.1))

    modality = Oct(shape=(16, 64, 16), spacing=(0.1, 0.025, 0.1))
    thickness = []
    for spacing, n in ((0.0125, 160), (0.025, 80)):  # the same eye at two resolutions
        arrays, _ = modality.process(eye(spacing, n))
        thickness.append(int((arrays["volume"][8, :, 8] > 100).sum()))
    assert thickness[0] == thickness[1] == pytest.approx(16, abs=1)  # 0.4 mm at 0.025 mm per voxel
    stretched = Oct(shape=(16, 64, 16)).process(eye(0.0125, 160))[0]["volume"][8, :, 8]
    assert int((stretched > 100).sum()) == pytest.approx(12.8, abs=1.5)  # no spacing: 160 voxels squeezed into 64
    assert resample_physical(np.ones((4, 8, 8), np.float32), (1, 1, 1), (2, 2, 2), (4, 8, 8)).shape == (4, 8, 8)
