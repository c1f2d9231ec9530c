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

HARVARD_KEYS = {"volume": "oct_bscans", "enface": "rnflt"}


class OctError(Exception):
    """A volume that cannot be used; the message is the per-sample reason."""


@dataclass
class OctRecord:
    volume: np.ndarray | None  # [D, H, W]
    enface: np.ndarray | None = None  # [H, W]
    values: dict = field(default_factory=dict)  # other arrays of the file (npz labels, age, …)


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
    if record.volume is None and record.enface is None:
        raise OctError("the file holds neither a volume nor an en-face map")
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
    return OctRecord(np.asarray(image.dataobj))


def _dicom(path: str, keys: dict) -> OctRecord:
    import pydicom

    dataset = pydicom.dcmread(path)
    return OctRecord(dataset.pixel_array)


def _tiff(path: str, keys: dict) -> OctRecord:
    import tifffile

    return OctRecord(tifffile.imread(path))


def _vol(path: str, keys: dict) -> OctRecord:
    import eyepy

    return OctRecord(np.asarray(eyepy.import_heyex_vol(path).data))


def _xml(path: str, keys: dict) -> OctRecord:
    import eyepy

    return OctRecord(np.asarray(eyepy.import_heyex_xml(path).data))


_READERS = {"npz": _npz, "npy": _npy, "nifti": _nifti, "dicom": _dicom, "tiff": _tiff, "vol": _vol, "xml": _xml}
