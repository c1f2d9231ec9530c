"""OCT readers: one path → a 3D volume (and, where the file has one, a 2D en-face map and labels).

Formats: Harvard-style `.npz` (one per subject: `oct_bscans`, `rnflt`, `glaucoma`, `progression`, `md`, …,
names configurable with a key map), NIfTI (`.nii`, `.nii.gz`, nibabel), DICOM (multi-frame OPT, pydicom),
TIFF stacks (tifffile), `.npy`, and Heidelberg `.vol` / HEYEX `.xml` through eyepy (the `oct` extra).
Every problem is an OctError whose message is the sample's reason.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from biofm.modalities.dicom import pixel_spacing

HARVARD_KEYS = {"volume": "oct_bscans", "enface": "rnflt"}


class OctError(Exception):
    """A volume that cannot be used; the message is the per-sample reason."""


@dataclass
class OctRecord:
    volume: np.ndarray | None  # [D, H, W]
    enface: np.ndarray | None = None  # [H, W]
    values: dict = field(default_factory=dict)  # other arrays of the file (npz labels, age, …)
    scan: np.ndarray | None = None  # one B-scan [depth, width]: a line scan, or a circle scan unrolled
    profile: np.ndarray | None = None  # RNFL thickness along the scan [width], µm (from the file's layers)
    spacing: tuple[float, float, float] | None = None  # mm per voxel of `volume` (D, H, W), where the file says
    pattern: str = "volume"  # volume | line | circle


def _format(path: str) -> str:
    lower = path.lower()
    for suffix, kind in (
        (".nii.gz", "nifti"),
        (".nii", "nifti"),
        (".npz", "npz"),
        (".npy", "npy"),
        (".dcm", "dicom"),
        (".dicom", "dicom"),
        (".tif", "tiff"),
        (".tiff", "tiff"),
        (".vol", "vol"),
        (".xml", "xml"),
    ):
        if lower.endswith(suffix):
            return kind
    raise OctError("unknown volume format (expected .npz, .nii, .nii.gz, .dcm, .tif, .tiff, .npy, .vol or .xml)")


def read_oct(path: str, keys: dict | None = None) -> OctRecord:
    """Read one OCT file; `keys` maps `volume` and `enface` to npz key names (Harvard's by default)."""
    if not os.path.exists(path):
        raise OctError("the file does not exist")
    kind = _format(path)
    keys = {**HARVARD_KEYS, **(keys or {})}
    try:
        record = _READERS[kind](path, keys)
    except OctError:
        raise
    except ImportError as err:
        raise OctError(f"reading {kind} files needs {err.name}: pip install 'biofm[oct]'") from None
    except Exception as err:  # noqa: BLE001 — each library raises its own kinds for damaged files
        detail = str(err).splitlines()[0] if str(err) else "no detail"
        raise OctError(f"the {kind} file cannot be read ({type(err).__name__}: {detail[:200]})") from None
    return check_record(record)


def check_record(record: OctRecord) -> OctRecord:
    if record.volume is None and record.enface is None and record.scan is None:
        raise OctError("the file holds neither a volume, an en-face map nor a B-scan")
    if record.scan is not None:
        scan = np.asarray(record.scan)
        if scan.ndim != 2 or min(scan.shape) < 2:
            raise OctError(f"the B-scan has shape {tuple(scan.shape)}; expected depth × width")
        if scan.dtype.kind == "f" and not np.isfinite(scan).all():
            raise OctError(f"the B-scan has {int((~np.isfinite(scan)).sum())} NaN or infinite pixels")
    if record.profile is not None:
        profile = np.asarray(record.profile, dtype=np.float32)
        record.profile = None if profile.ndim != 1 or not np.isfinite(profile).any() else profile
    for name, array in (("volume", record.volume), ("en-face map", record.enface)):
        if array is not None and np.asarray(array).dtype.kind not in "biuf":
            raise OctError(f"the {name} holds {np.asarray(array).dtype} values; expected numbers")
    if record.volume is not None:
        volume = np.asarray(record.volume)
        if volume.ndim == 4 and volume.shape[-1] in (1, 3):  # a colour or channel axis
            volume = volume.mean(axis=-1)
        if volume.ndim != 3:
            raise OctError(
                f"the volume has {volume.ndim} dimensions {tuple(volume.shape)}; expected 3 (B-scans × depth × width)"
            )
        if min(volume.shape) < 2:
            raise OctError(f"the volume {tuple(volume.shape)} is too small")
        if volume.dtype.kind == "f" and not np.isfinite(volume).all():
            raise OctError(f"the volume has {int((~np.isfinite(volume)).sum())} NaN or infinite voxels")
        record.volume = volume
    if record.enface is not None:
        enface = np.asarray(record.enface, dtype=np.float32)
        if enface.ndim != 2:
            raise OctError(f"the en-face map has {enface.ndim} dimensions; expected 2")
        if not np.isfinite(enface).all():
            raise OctError(f"the en-face map has {int((~np.isfinite(enface)).sum())} NaN or infinite values")
        record.enface = enface
    return record


def _npz(path: str, keys: dict) -> OctRecord:
    with np.load(path, allow_pickle=False) as data:
        names = list(data.keys())
        if keys["volume"] not in names and keys["enface"] not in names:
            raise OctError(
                f"the npz has no '{keys['volume']}' (volume) or '{keys['enface']}' (en-face) key; "
                f"its keys are {names}; map them with a key map"
            )
        volume = data[keys["volume"]] if keys["volume"] in names else None
        enface = data[keys["enface"]] if keys["enface"] in names else None
        values = {k: data[k] for k in names if k not in (keys["volume"], keys["enface"])}
    return OctRecord(volume, enface, values)


def _npy(path: str, keys: dict) -> OctRecord:
    return OctRecord(np.load(path, allow_pickle=False))


def _nifti(path: str, keys: dict) -> OctRecord:
    import nibabel

    image = nibabel.load(path)
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])  # in the header's unit, mm by default
    return OctRecord(np.asarray(image.dataobj), spacing=zooms if len(zooms) == 3 and all(zooms) else None)


def _dicom(path: str, keys: dict) -> OctRecord:
    import pydicom

    dataset = pydicom.dcmread(path)
    spacing = None
    pixel = pixel_spacing(dataset)
    between = getattr(dataset, "SpacingBetweenSlices", None) or getattr(dataset, "SliceThickness", None)
    if pixel and between:
        spacing = (float(between), pixel[0], pixel[1])
    return OctRecord(dataset.pixel_array, spacing=spacing)


def _tiff(path: str, keys: dict) -> OctRecord:
    import tifffile

    return OctRecord(tifffile.imread(path))


VOL_PATTERNS = {1: "line", 2: "circle", 3: "volume", 4: "volume", 5: "radial"}
RNFL_LAYERS = (0, 2)  # ILM and the RNFL's outer boundary in a .vol's segmentation vectors (eyepy's SEG_MAPPING)


def _vol(path: str, keys: dict) -> OctRecord:
    """A Heidelberg `.vol`: a volume (scan patterns 3, 4 and older files' 0), or — eyepy's `EyeVolume`
    refuses a circle scan — a single B-scan read with its low-level reader (pattern 1 line, 2 circle, or one
    B-scan), with the RNFL thickness along it where the file carries the layer segmentation."""
    import eyepy
    from eyepy.io.he.vol_reader import HeVolReader

    parsed = HeVolReader(path).parsed_file
    pattern = VOL_PATTERNS.get(int(parsed.scan_pattern), "volume")
    spacing = (float(parsed.distance), float(parsed.scale_y), float(parsed.scale_x))
    if pattern == "radial":
        raise OctError("a radial (star) scan: its B-scans cross at the centre; biofm reads volumes, lines and circles")
    if pattern == "volume" and int(parsed.n_bscans) > 1:
        return OctRecord(np.asarray(eyepy.import_heyex_vol(path).data), spacing=spacing)
    bscans = [np.asarray(b.data, dtype=np.float32) for b in parsed.bscans]
    scan = np.mean(bscans, axis=0)  # a line or circle repeated: averaged, as the device's ART mean does
    profile = None
    layers = [np.asarray(b.layer_segmentations, dtype=np.float32) for b in parsed.bscans if len(b.layer_segmentations)]
    if layers and all(len(l) > max(RNFL_LAYERS) for l in layers):
        stack = np.stack(layers)  # [repeats, layers, width], in pixels from the top
        stack[stack >= 3.0e38] = np.nan
        inner, outer = stack[:, RNFL_LAYERS[0]], stack[:, RNFL_LAYERS[1]]
        with np.errstate(all="ignore"):
            profile = np.nanmean(outer - inner, axis=0) * float(parsed.scale_y) * 1000.0  # µm
    return OctRecord(None, scan=scan, profile=profile, pattern="circle" if pattern == "circle" else "line")


def _xml(path: str, keys: dict) -> OctRecord:
    import eyepy

    return OctRecord(np.asarray(eyepy.import_heyex_xml(path).data))


_READERS = {"npz": _npz, "npy": _npy, "nifti": _nifti, "dicom": _dicom, "tiff": _tiff, "vol": _vol, "xml": _xml}
