"""OCT: 3D retinal volumes resampled to a fixed shape (uint8) and 2D en-face maps (e.g. RNFL thickness),
MONAI augmentations in the training loader, and a 3D patch-embedding transformer (plus a 2D one for the
en-face map) producing tokens for the trunk. Readers are in `readers.py`.

Store arrays: `volume` [N, D, H, W] uint8 with `has_volume`, `enface` [N, h, w] float16 with `has_enface`;
either may be absent per sample.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from biofm.modalities.oct.encoder import OctEncoder
from biofm.modalities.oct.readers import OctError, OctRecord, check_record, read_oct
from biofm.platform.modality import MODALITIES, FileModality
from biofm.platform.store import Column

__all__ = ["Oct", "OctError", "OctRecord", "read_oct"]


def resample(array: np.ndarray, shape: Sequence[int], mode: str) -> np.ndarray:
    """Linear resampling to `shape` in float32, anti-aliased: each axis that shrinks by a factor f is first
    smoothed with a Gaussian of σ = f / 2 input voxels (scipy, edges replicated), which damps what the new
    grid cannot hold (at the old Nyquist frequency to ~5 % for 200 → 128) — so 200³ → 128³ does not alias fine
    layers into moiré, as plain trilinear interpolation does. (MONAI's `Resize(anti_aliasing=True)` uses
    σ = (f − 1) / 2, too little below f = 2; its resize is this `interpolate`, and importing MONAI costs a
    prepare process 6 s.)"""
    array = np.ascontiguousarray(array, dtype=np.float32)
    sigma = [0.5 * a / s if s < a else 0.0 for s, a in zip(shape, array.shape)]
    if any(sigma):
        from scipy.ndimage import gaussian_filter

        array = gaussian_filter(array, sigma=sigma, mode="nearest")
    x = torch.from_numpy(array)[None, None]
    return F.interpolate(x, size=tuple(int(v) for v in shape), mode=mode, align_corners=False)[0, 0].numpy()


def resample_physical(volume: np.ndarray, spacing: Sequence[float], target: Sequence[float], shape) -> np.ndarray:
    """A volume of `spacing` mm per voxel onto `target` mm per voxel (anti-aliased where it shrinks), centred,
    cropped or padded with zeros to `shape`: every eye at one physical scale."""
    factors = [s / t for s, t in zip(spacing, target)]
    scaled = resample(volume, [max(2, round(n * f)) for n, f in zip(volume.shape, factors)], "trilinear")
    out = np.zeros(tuple(int(v) for v in shape), np.float32)
    source, target_slices = [], []
    for have, want in zip(scaled.shape, out.shape):
        offset = (have - want) // 2
        if offset >= 0:  # crop the middle
            source.append(slice(offset, offset + want))
            target_slices.append(slice(0, want))
        else:  # pad around
            source.append(slice(0, have))
            target_slices.append(slice(-offset, -offset + have))
    out[tuple(target_slices)] = scaled[tuple(source)]
    return out


def to_uint8(volume: np.ndarray) -> np.ndarray:
    """uint8 volumes keep their grey levels; others are scaled from their 0.5–99.5th percentiles."""
    if volume.dtype == np.uint8:
        return volume
    low, high = np.percentile(volume, [0.5, 99.5])
    scale = 255.0 / (high - low) if high > low else 0.0
    return np.clip((volume.astype(np.float32) - low) * scale, 0, 255).astype(np.uint8)


@MODALITIES.register("oct")
class Oct(FileModality):
    """Settings: `shape` of the stored volumes (default 128³), `enface_shape` (default 128²), `keys`
    (npz key map: {"volume": "oct_bscans", "enface": "rnflt"}), `scan_shape` (depth × width of single
    B-scans — line scans, circle scans unrolled — stored with the RNFL thickness profile along them; None:
    no B-scan arrays, as stores before them), `spacing` (mm per stored voxel D, H, W: volumes whose file
    states its spacing are resampled to it and cropped or padded, not stretched to `shape`). Encoder options:
    `grid` (tokens per axis, 8), `layers`, `heads`, `dropout`."""

    argument, column = "oct", "oct_path"

    input_error = OctError

    def __init__(
        self,
        shape: Sequence[int] = (128, 128, 128),
        enface_shape: Sequence[int] = (128, 128),
        keys: dict | None = None,
        scan_shape: Sequence[int] | None = None,
        spacing: Sequence[float] | None = None,
        **settings,
    ):
        shape, enface_shape = [int(v) for v in shape], [int(v) for v in enface_shape]
        if len(shape) != 3 or len(enface_shape) != 2:
            raise ValueError(f"oct shape must have 3 sizes and enface_shape 2, got {shape} and {enface_shape}")
        if scan_shape is not None:
            scan_shape = [int(v) for v in scan_shape]
            if len(scan_shape) != 2:
                raise ValueError(f"oct scan_shape must have 2 sizes (depth, width), got {scan_shape}")
            settings["scan_shape"] = scan_shape
        if spacing is not None:
            settings["spacing"] = [float(v) for v in spacing]
        super().__init__(shape=shape, enface_shape=enface_shape, keys=dict(keys or {}), **settings)
        self._augmentation = None

    # ---- prepare side
    def process(self, raw) -> tuple[dict[str, np.ndarray], dict]:
        """One input (path, OctRecord or volume array) → its arrays (unprefixed) and the file's other
        values (npz labels). Raises OctError with a readable reason."""
        if isinstance(raw, OctRecord):
            record = check_record(raw)
        elif isinstance(raw, np.ndarray):
            record = check_record(OctRecord(raw))
        else:
            record = read_oct(str(raw), self.settings["keys"])
        s = self.settings
        arrays = self._empty()
        if record.scan is not None and not s.get("scan_shape"):
            raise OctError(
                f"a single B-scan ({record.pattern} scan): this store keeps volumes and en-face maps only; prepare "
                "with --scan-shape DEPTH,WIDTH"
            )
        if record.volume is not None:
            volume = to_uint8(record.volume)
            if s.get("spacing") and record.spacing:
                volume = resample_physical(volume, record.spacing, s["spacing"], s["shape"])
            if list(volume.shape) != s["shape"]:
                volume = resample(volume, s["shape"], "trilinear")
            volume = np.clip(np.asarray(volume, np.float32).round(), 0, 255).astype(np.uint8)
            arrays.update(volume=volume, has_volume=np.bool_(True))
        if record.enface is not None:
            arrays.update(
                enface=resample(record.enface, s["enface_shape"], "bilinear").astype(np.float16),
                has_enface=np.bool_(True),
            )
        if record.scan is not None:
            scan = resample(to_uint8(np.asarray(record.scan)), s["scan_shape"], "bilinear")
            arrays.update(scan=np.clip(scan.round(), 0, 255).astype(np.uint8), has_scan=np.bool_(True))
            if record.profile is not None:
                profile = np.asarray(record.profile, np.float32)
                known = np.isfinite(profile)
                profile = np.interp(np.arange(len(profile)), np.flatnonzero(known), profile[known])
                width = s["scan_shape"][1]
                profile = resample(profile[None], (1, width), "bilinear")[0]
                arrays.update(profile=profile.astype(np.float16), has_profile=np.bool_(True))
        return arrays, record.values

    def _empty(self) -> dict[str, np.ndarray]:
        """A sample's arrays with nothing in them (the B-scan ones only when the settings keep B-scans)."""
        s = self.settings
        empty = {
            "volume": np.zeros(s["shape"], np.uint8),
            "has_volume": np.bool_(False),
            "enface": np.zeros(s["enface_shape"], np.float16),
            "has_enface": np.bool_(False),
        }
        if s.get("scan_shape"):
            empty.update(
                scan=np.zeros(s["scan_shape"], np.uint8),
                has_scan=np.bool_(False),
                profile=np.zeros(s["scan_shape"][1], np.float16),
                has_profile=np.bool_(False),
            )
        return empty

    def stack(self, rows: list[dict | None]) -> dict[str, Column]:
        empty = self._empty()
        full = [r if r is not None else empty for r in rows]
        out = {name: np.stack([np.asarray(r[name]) for r in full]) for name in empty}
        return self.prefixed({**out, "present": [r is not None for r in rows]})

    # ---- train side
    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        volume = torch.from_numpy(np.ascontiguousarray(arrays["volume"])).float().div_(255.0)[:, None]
        enface = torch.from_numpy(np.asarray(arrays["enface"], dtype=np.float32))[:, None]
        out = {
            "volume": volume,
            "has_volume": torch.from_numpy(np.asarray(arrays["has_volume"], bool)),
            "enface": enface,
            "has_enface": torch.from_numpy(np.asarray(arrays["has_enface"], bool)),
        }
        if self.settings.get("scan_shape"):
            out["scan"] = torch.from_numpy(np.ascontiguousarray(arrays["scan"])).float().div_(255.0)[:, None]
            out["has_scan"] = torch.from_numpy(np.asarray(arrays["has_scan"], bool))
            out["profile"] = torch.from_numpy(np.asarray(arrays["profile"], dtype=np.float32))[:, None]
            out["has_profile"] = torch.from_numpy(np.asarray(arrays["has_profile"], bool))
        return out

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """MONAI: left-right flip, intensity scale and shift, a small affine; volumes only."""
        if not bool(batch["has_volume"].any()):
            return batch
        if self._augmentation is None:  # built once per loader worker, reseeded per batch
            self._augmentation = _augmentation()
        transform = self._augmentation
        transform.set_random_state(seed=int(torch.randint(0, 2**31 - 1, ()).item()))
        volume = batch["volume"].clone()
        for i in torch.nonzero(batch["has_volume"]).flatten().tolist():
            volume[i] = torch.as_tensor(transform(volume[i])).clamp_(0.0, 1.0)
        return {**batch, "volume": volume}

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Two random augmentations of each volume: a left-right flip, intensity scale and shift, and a
        quarter of 4×4×4 blocks blanked (en-face maps unchanged)."""
        return self._view(batch), self._view(batch)

    @staticmethod
    def _view(batch: dict[str, torch.Tensor]) -> dict:
        volume = batch["volume"]  # [B, 1, D, H, W]
        b, device = volume.shape[0], volume.device
        flip = torch.rand(b, device=device) < 0.5
        volume = torch.where(flip[:, None, None, None, None], volume.flip(-1), volume)
        scale = 1 + 0.2 * (torch.rand(b, 1, 1, 1, 1, device=device) - 0.5)
        shift = 0.1 * (torch.rand(b, 1, 1, 1, 1, device=device) - 0.5)
        keep = (torch.rand(b, 1, 4, 4, 4, device=device) >= 0.25).to(volume.dtype)
        keep = F.interpolate(keep, size=volume.shape[2:], mode="nearest")
        return {**batch, "volume": ((volume * scale + shift) * keep).clamp(0.0, 1.0)}

    def encoder(self, d_model: int, grid: int = 8, layers: int = 2, heads: int = 4, dropout: float = 0.1) -> nn.Module:
        s = self.settings
        return OctEncoder(
            s["shape"], s["enface_shape"], d_model, grid, layers, heads, dropout, scan_shape=s.get("scan_shape")
        )

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        """Synthetic eyes: every third has only its en-face map, some only their volume, every seventh nothing."""
        from biofm.modalities.oct.synthetic import synthetic_eye

        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            volume, thickness = synthetic_eye(rng, (8, 16, 16), glaucoma=bool(i % 2))
            has_volume, has_enface = i % 3 != 0, i % 5 != 4 or i % 3 == 0
            out.append(
                None if i % 7 == 6 else OctRecord(volume if has_volume else None, thickness if has_enface else None)
            )
        return out


def _augmentation():
    from monai.transforms import (
        Compose,
        RandAffine,
        RandFlip,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    return Compose(
        [
            RandFlip(prob=0.5, spatial_axis=2),
            RandScaleIntensity(factors=0.1, prob=0.5),
            RandShiftIntensity(offsets=0.05, prob=0.5),
            RandAffine(prob=0.3, rotate_range=(0.05, 0.05, 0.05), translate_range=(1, 1, 1), padding_mode="border"),
        ]
    )


from biofm.modalities.oct import pretext  # noqa: E402,F401  (registers its pretext tasks)
