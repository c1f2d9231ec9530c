"""Synthetic retina-like OCT volumes and RNFL thickness maps (for the demo, the benchmarks and the tests)."""

from __future__ import annotations

import numpy as np


def synthetic_eye(
    rng: np.random.Generator, shape=(48, 64, 64), glaucoma: bool = False, sectors: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A retina-like volume [B-scans, depth, width] (uint8) and its RNFL thickness map [B-scans, width]
    (µm): vitreous, a bright nerve-fibre layer whose thickness carries the label signal (thinner in
    glaucoma, thinner still in the `sectors` of six around the disc that progress), ganglion / plexiform /
    nuclear layers, photoreceptors and a bright RPE, with a curved surface, a foveal pit and speckle."""
    n_scans, depth, width = shape
    y, x = np.mgrid[0:n_scans, 0:width].astype(np.float32)
    cy, cx = n_scans / 2, width / 2
    radius = np.hypot((y - cy) / n_scans, (x - cx) / width)
    angle = (np.arctan2(y - cy, x - cx) + np.pi) / (2 * np.pi) * 6  # sector index 0..6
    thickness = np.full((n_scans, width), 105.0 if not glaucoma else 72.0, np.float32)
    thickness *= 1 + 0.25 * np.exp(-((radius - 0.25) ** 2) / 0.01)  # thicker ring around the disc
    if sectors is not None:
        for k in np.flatnonzero(sectors):
            thickness *= np.where(np.floor(angle) % 6 == k, 0.7, 1.0)
    thickness += rng.normal(0, 4, thickness.shape)
    surface = depth * (0.25 + 0.15 * radius**2) - depth * 0.06 * np.exp(-(radius**2) / 0.004)  # fovea
    um_per_voxel = 4.0 * 64 / depth
    layers = [
        (thickness / um_per_voxel, 210),
        (np.full_like(thickness, 3), 120),
        (np.full_like(thickness, 2), 150),
        (np.full_like(thickness, 3), 70),
        (np.full_like(thickness, 2), 140),
        (np.full_like(thickness, 5), 50),
        (np.full_like(thickness, 2), 170),
        (np.full_like(thickness, 2), 240),
    ]
    z = np.arange(depth, dtype=np.float32)[None, :, None]  # [1, depth, 1]
    volume = np.full((n_scans, depth, width), 15.0, np.float32)
    top = surface.copy()
    for size, level in layers:
        bottom = top + size
        inside = (z >= top[:, None, :]) & (z < bottom[:, None, :])
        volume = np.where(inside, level, volume)
        top = bottom
    volume = np.where(z >= top[:, None, :], 35.0, volume)  # choroid
    volume *= rng.gamma(4.0, 0.25, volume.shape)  # speckle
    return np.clip(volume, 0, 255).astype(np.uint8), thickness
