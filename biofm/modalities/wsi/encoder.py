"""The slide encoder: tile features → tokens for the trunk (gated-attention MIL pooling as in CLAM, plus the
tiles' positions on the slide grid)."""

from __future__ import annotations

import math

import torch
from torch import nn

from biofm.platform.modality import Tokens


class GatedAttention(nn.Module):
    """Gated attention pooling (Ilse et al. 2018) with K branches: K weighted means of the tiles."""

    def __init__(self, d_model: int, hidden: int, branches: int):
        super().__init__()
        self.v, self.u = nn.Linear(d_model, hidden), nn.Linear(d_model, hidden)
        self.w = nn.Linear(hidden, branches)

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.w(torch.tanh(self.v(h)) * torch.sigmoid(self.u(h)))  # [B, T, K]
        scores = scores.masked_fill(~mask[..., None], float("-inf"))
        weights = torch.nan_to_num(torch.softmax(scores, dim=1))  # a slide without tiles: all zero
        return torch.einsum("btk,btd->bkd", weights, h), weights.transpose(1, 2)  # [B, K, d], [B, K, T]


def grid_embedding(grid: torch.Tensor, d_model: int) -> torch.Tensor:
    """2D sinusoidal embedding of tile positions (in tile units) [B, T, 2] → [B, T, d]."""
    quarter = d_model // 4
    freq = torch.exp(-math.log(1000.0) * torch.arange(quarter, device=grid.device) / max(quarter, 1))
    angles = grid[..., None] * freq  # [B, T, 2, quarter]
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1).flatten(-2)  # [B, T, 4·quarter]
    return nn.functional.pad(emb, (0, d_model - emb.shape[-1]))


SIZE_FREQUENCIES = (0.5, 1.0, 2.0, 4.0)  # per unit of log(tiles): slides of 1 to ~10⁵ tiles stay apart


class SlideEncoder(nn.Module):
    """Tile features (+ tissue fraction) → d_model → [transformer layers over tiles with 2D positions] →
    gated attention to `tokens` slide tokens, plus one token for the slide's size (tiles, tissue area).
    `attention` keeps the last forward's weights per tile [B, K, T] for heatmaps. A batch may carry
    `tile_mask` [B, T] (pretext tasks): those tiles show a learned mask vector instead of their features
    and are left out of the pooling; its `Tokens` carry the pass's tile states, (subsampled) batch and attention."""

    def __init__(
        self,
        feature_dim: int,
        d_model: int,
        kind: str = "abmil",
        tokens: int = 4,
        layers: int = 1,
        heads: int = 4,
        max_tiles: int = 4096,
        dropout: float = 0.1,
    ):
        super().__init__()
        if kind not in ("abmil", "transformer"):
            raise ValueError(f"wsi encoder kind must be abmil or transformer, got {kind!r}")
        self.kind, self.max_tiles, self.d_model = kind, max_tiles, d_model
        # features standardised per dimension over the tiles (a per-tile LayerNorm would erase their
        # overall level, which carries stain and intensity)
        self.norm = nn.BatchNorm1d(feature_dim + 1)
        self.embed = nn.Sequential(nn.Linear(feature_dim + 1, d_model), nn.GELU(), nn.Dropout(dropout))
        self.layers = None
        if kind == "transformer":
            layer = nn.TransformerEncoderLayer(
                d_model, heads, 2 * d_model, dropout=dropout, batch_first=True, norm_first=True
            )
            self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.pool = GatedAttention(d_model, d_model, tokens)
        self.size = nn.Linear(2 * 2 * len(SIZE_FREQUENCIES), d_model)
        self.mask_tile = nn.Parameter(torch.zeros(d_model))

    def _subsample(self, batch: dict) -> dict:
        """In training, at most `max_tiles` random tiles per slide (all of them in evaluation)."""
        mask = batch["mask"]
        if not self.training or mask.shape[1] <= self.max_tiles:
            return batch
        batch = {**batch, "tissue_area": (batch["tissue"] * mask).sum(1)}
        keys = torch.rand(mask.shape, device=mask.device).masked_fill(~mask, 2.0)
        keep = keys.argsort(dim=1)[:, : self.max_tiles]
        return {
            **batch,
            **{
                k: torch.gather(
                    batch[k], 1, keep if batch[k].dim() == 2 else keep[..., None].expand(-1, -1, batch[k].shape[-1])
                )
                for k in ("features", "mask", "tissue", "grid", "tile_mask")
                if k in batch
            },
        }

    def forward(self, batch: dict[str, torch.Tensor]) -> Tokens:
        batch = self._subsample(batch)
        mask = batch["mask"]  # [B, T]
        x = torch.cat([batch["features"], batch["tissue"][..., None]], dim=-1)  # [B, T, D + 1]
        if mask.any():
            x = x.masked_scatter(
                mask[..., None], self.norm(x[mask]) if mask.sum() > 1 or not self.training else x[mask]
            )
        h = self.embed(x)
        pooled = mask
        if "tile_mask" in batch:
            h = torch.where(batch["tile_mask"][..., None], self.mask_tile.to(h.dtype), h)
            pooled = mask & ~batch["tile_mask"]
        if self.layers is not None:
            h = h + grid_embedding(batch["grid"], self.d_model)
            padding = ~mask
            padding[:, 0] = False  # a slide without tiles keeps one key; its tokens are masked anyway
            h = self.layers(h, src_key_padding_mask=padding)
        tokens, weights = self.pool(h, pooled)  # [B, K, d], [B, K, T]
        # the slide's size: log tile count and log tissue area (in tiles), from every tile even when subsampled
        area = batch["tissue_area"] if "tissue_area" in batch else (batch["tissue"] * mask).sum(1)
        logs = torch.stack([torch.log1p(batch["n_tiles"]), torch.log1p(area)], dim=-1)[..., None]  # [B, 2, 1]
        angles = (logs * logs.new_tensor(SIZE_FREQUENCIES)).flatten(1)  # Fourier features: [B, 2·F]
        size = self.size(torch.cat([angles.sin(), angles.cos()], dim=-1))[:, None]  # [B, 1, d]
        x = torch.cat([size, tokens], dim=1)
        valid = (batch["n_tiles"] > 0)[:, None].expand(-1, x.shape[1])
        return Tokens(x, valid, {"tiles": h, "batch": batch, "attention": weights.detach()})
