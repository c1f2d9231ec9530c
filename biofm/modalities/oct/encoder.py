"""The OCT encoder: 3D patch embeddings of the volume (and 2D ones of the en-face map), then a transformer."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def _stem(dims: int, size: Sequence[int], grid: int, d_model: int) -> nn.Sequential:
    """Two strided convolutions that cut each axis to about `grid` patches (a patch embedding with a
    little locality learned before it)."""
    conv = nn.Conv3d if dims == 3 else nn.Conv2d
    patch = [max(1, s // grid) for s in size]
    first = tuple(1 if p == 1 else 2 if p <= 4 else 4 for p in patch)
    second = tuple(max(1, p // f) for p, f in zip(patch, first))
    return nn.Sequential(
        conv(1, d_model // 4, first, stride=first), nn.GELU(), conv(d_model // 4, d_model, second, stride=second)
    )


class OctEncoder(nn.Module):
    """Volume [B, 1, D, H, W] → ~grid³ tokens; en-face map [B, 1, h, w] → ~grid² tokens; with `scan_shape`,
    a single B-scan [B, 1, depth, width] → ~grid² tokens and its RNFL profile [B, 1, width] → ~grid; each with a learned
    position embedding, then `layers` transformer layers over the tokens a sample has. A batch may carry
    `patch_mask` [B, Nv] (pretext tasks): those volume patches (`patch` voxels each, on a `patch_grid`)
    show a learned mask vector instead of their voxels."""

    def __init__(
        self,
        shape,
        enface_shape,
        d_model: int,
        grid: int = 8,
        layers: int = 2,
        heads: int = 4,
        dropout: float = 0.1,
        scan_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        self.scan_shape = tuple(scan_shape) if scan_shape else None
        if self.scan_shape:  # a single B-scan [B, 1, depth, width] → ~grid² tokens; its RNFL profile → ~grid
            self.scan_stem = _stem(2, self.scan_shape, grid, d_model)
            with torch.no_grad():
                n_scan = self.scan_stem(torch.zeros(1, 1, *self.scan_shape)).flatten(2).shape[2]
            self.scan_position = nn.Parameter(torch.randn(n_scan, d_model) * 0.02)
            stride = max(1, self.scan_shape[1] // grid)
            self.profile_norm = nn.BatchNorm1d(1)  # thickness in µm
            self.profile_stem = nn.Conv1d(1, d_model, stride, stride=stride)
            n_profile = self.scan_shape[1] // stride
            self.profile_position = nn.Parameter(torch.randn(n_profile, d_model) * 0.02)
        self.volume_stem = _stem(3, shape, grid, d_model)
        self.enface_norm = nn.BatchNorm2d(1)  # thickness maps come in µm
        self.enface_stem = _stem(2, enface_shape, grid, d_model)
        with torch.no_grad():
            n_volume = self.volume_stem(torch.zeros(1, 1, *shape)).flatten(2).shape[2]
            n_enface = self.enface_stem(torch.zeros(1, 1, *enface_shape)).flatten(2).shape[2]
        self.volume_position = nn.Parameter(torch.randn(n_volume, d_model) * 0.02)
        self.patch = tuple(a * b for a, b in zip(self.volume_stem[0].stride, self.volume_stem[2].stride))
        self.patch_grid = tuple(s // p for s, p in zip(shape, self.patch))
        self.mask_patch = nn.Parameter(torch.zeros(d_model))
        self.enface_position = nn.Parameter(torch.randn(n_enface, d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=dropout, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        volume = self.volume_stem(batch["volume"]).flatten(2).transpose(1, 2)
        if "patch_mask" in batch:
            volume = torch.where(batch["patch_mask"][..., None], self.mask_patch.to(volume.dtype), volume)
        volume = volume + self.volume_position
        enface = self.enface_stem(self.enface_norm(batch["enface"])).flatten(2).transpose(1, 2) + self.enface_position
        parts = [volume, enface]
        present = [
            batch["has_volume"][:, None].expand(-1, volume.shape[1]),
            batch["has_enface"][:, None].expand(-1, enface.shape[1]),
        ]
        if self.scan_shape:
            scan = self.scan_stem(batch["scan"]).flatten(2).transpose(1, 2) + self.scan_position
            profile = self.profile_stem(self.profile_norm(batch["profile"])).transpose(1, 2) + self.profile_position
            parts += [scan, profile]
            present += [
                batch["has_scan"][:, None].expand(-1, scan.shape[1]),
                batch["has_profile"][:, None].expand(-1, profile.shape[1]),
            ]
        x = torch.cat(parts, dim=1)  # [B, Nv + Ne (+ Ns + Np), d]
        mask = torch.cat(present, dim=1)
        padding = ~mask
        padding[~mask.any(dim=1), 0] = False  # a sample with neither keeps one key; the trunk masks it out
        return self.layers(x, src_key_padding_mask=padding), mask
