"""Whole-slide pathology: tiles at a fixed microns per pixel where the tissue is, patch features computed
once at prepare time, and an attention-based MIL encoder (ABMIL, or a transformer variant) to K slide
tokens for the trunk. Attention weights per tile are kept for heatmaps.

Store arrays per slide: `features` [T, D] float16, `coords` [T, 2] level-0 corners, `tissue` [T],
optional raw `tiles` [T, S, S, 3] uint8; fixed `tile_extent` (level-0 pixels per tile side), `mpp`,
`dimensions`. OpenSlide, MONAI and scikit-image are imported only when a slide is read.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch import nn

from biofm.modalities.wsi.encoder import SlideEncoder
from biofm.modalities.wsi.slide import (
    SlideError,
    SlideRef,
    open_slide,
    plan_tiles,
    read_tile,
)
from biofm.platform.modality import MODALITIES, FileModality
from biofm.platform.store import Column, Ragged

__all__ = ["Wsi", "SlideError", "SlideRef", "SlideEncoder"]


@MODALITIES.register("wsi")
class Wsi(FileModality):
    """Settings: `target_mpp` (µm/px of the tiles, default 0.5), `tile_size` (224), `min_tissue` (the
    least tissue fraction a tile needs, 0.25), `thumbnail_mpp` (scale of the tissue mask, 8 µm/px),
    `patch_encoder` ("default" or "package.module:factory"), `patch_weights` (local file), `store_tiles`
    (also keep raw tiles, for end-to-end training), `channels` (fluorescence channels shown to the patch
    encoder, names or indices; default the nuclear one and the next two); `feature_dim` and `patch_checksum` are filled in by
    `fit`. Encoder options (model config): `kind` (abmil | transformer), `tokens`, `layers`, `max_tiles`,
    `dropout`."""

    argument, column = "slides", "slide_path"

    input_error = SlideError

    def __init__(
        self,
        target_mpp: float = 0.5,
        tile_size: int = 224,
        min_tissue: float = 0.25,
        thumbnail_mpp: float = 8.0,
        patch_encoder: str = "default",
        patch_weights: str | None = None,
        store_tiles: bool = False,
        feature_dim: int | None = None,
        patch_checksum: str | None = None,
        **settings,
    ):
        super().__init__(
            target_mpp=float(target_mpp),
            tile_size=int(tile_size),
            min_tissue=float(min_tissue),
            thumbnail_mpp=float(thumbnail_mpp),
            patch_encoder=str(patch_encoder),
            patch_weights=patch_weights,
            store_tiles=bool(store_tiles),
            feature_dim=feature_dim,
            patch_checksum=patch_checksum,
            **settings,
        )
        self._patch = None
        self.read_threads = 2  # tiles read in parallel (how, not what: not a setting of the store)

    # ---- prepare side
    @property
    def patch(self):
        """The patch encoder, built on first use and checked against the checksum in the settings."""
        if self._patch is None:
            from biofm.modalities.wsi.patch import PatchEncoder, build_network, checksum

            network = build_network(self.settings["patch_encoder"], self.settings["patch_weights"])
            digest = checksum(network)
            if self.settings["patch_checksum"] not in (None, digest):
                raise ValueError(
                    f"the patch encoder {self.settings['patch_encoder']!r} has weights {digest}, but these slide "
                    f"settings were prepared with {self.settings['patch_checksum']}; use the same encoder and "
                    "--patch-weights file as the store"
                )
            self._patch = PatchEncoder(network)
            self.settings["patch_checksum"] = digest
            self.settings["feature_dim"] = self._patch.dim
        return self._patch

    def fit(self, raw=None) -> None:
        self.patch  # noqa: B018 — fixes feature_dim and the checksum

    def process(self, raw, batch_tiles: int = 64) -> tuple[dict[str, np.ndarray], dict]:
        """One slide → its arrays (unprefixed) and facts (mpp and its source, level, tiles, notes).
        Raises SlideError with a readable reason."""
        ref = SlideRef.of(raw)
        s = self.settings
        slide = open_slide(ref.path, ref.channels or s.get("channels"))
        try:
            plan = plan_tiles(slide, ref, s["target_mpp"], s["tile_size"], s["min_tissue"], s["thumbnail_mpp"])
            if not len(plan.coords):
                raise SlideError(
                    f"no tissue found (no tile of {s['tile_size']} px at {s['target_mpp']} µm/px "
                    f"holds {s['min_tissue']:.0%} tissue)"
                )
            features, tiles = [], []
            for batch in _read_ahead(slide, plan, batch_tiles, self.read_threads):
                features.append(self.patch(batch))
                if s["store_tiles"]:
                    tiles.append(batch)
        finally:
            slide.close()
        arrays = {
            "features": np.concatenate(features),
            "coords": plan.coords.astype(np.int32),
            "tissue": plan.tissue.astype(np.float16),
            "tile_extent": np.float32(plan.extent),
            "mpp": np.float32(plan.mpp),
            "dimensions": np.asarray(plan.dimensions, np.int64),
        }
        if s["store_tiles"]:
            arrays["tiles"] = np.concatenate(tiles)
        facts = {
            "mpp": plan.mpp,
            "mpp_source": plan.mpp_source,
            "level": plan.level,
            "tiles": int(len(plan.coords)),
            "notes": "; ".join(plan.notes),
        }
        return arrays, facts

    def stack(self, rows: list[dict | None]) -> dict[str, Column]:
        """Per-slide arrays (None = absent) → the modality's store columns for a batch."""
        dim, size = (
            self.patch.dim if self.settings["feature_dim"] is None else self.settings["feature_dim"],
            self.settings["tile_size"],
        )
        empty = {
            "features": np.zeros((0, dim), np.float16),
            "coords": np.zeros((0, 2), np.int32),
            "tissue": np.zeros(0, np.float16),
            "tile_extent": np.float32(0),
            "mpp": np.float32(0),
            "dimensions": np.zeros(2, np.int64),
            "tiles": np.zeros((0, size, size, 3), np.uint8),
        }
        full = [r if r is not None else empty for r in rows]
        out: dict[str, Column] = {"present": np.array([r is not None for r in rows], dtype=bool)}
        for name in ("features", "coords", "tissue") + (("tiles",) if self.settings["store_tiles"] else ()):
            trailing = empty[name].shape[1:]
            out[name] = Ragged.from_list([r[name] for r in full], dtype=empty[name].dtype, trailing=trailing)
        for name in ("tile_extent", "mpp", "dimensions"):
            out[name] = np.stack([np.asarray(r[name]) for r in full])
        return self.prefixed(out)

    # ---- train side
    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        features: Ragged = arrays["features"]
        lengths = features.lengths()
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        mask = np.arange(width)[None, :] < lengths[:, None]
        padded = np.zeros((len(lengths), width, features.values.shape[1]), np.float32)
        padded[mask] = features.values
        tissue = np.zeros((len(lengths), width), np.float32)
        tissue[mask] = arrays["tissue"].values
        grid = np.zeros((len(lengths), width, 2), np.float32)  # tile positions in tile units
        extent = np.maximum(np.asarray(arrays["tile_extent"], np.float32), 1e-6)
        grid[mask] = arrays["coords"].values / np.repeat(extent, lengths)[:, None]
        return {
            "features": torch.from_numpy(padded),
            "mask": torch.from_numpy(mask),
            "tissue": torch.from_numpy(tissue),
            "grid": torch.from_numpy(grid),
            "n_tiles": torch.from_numpy(lengths.astype(np.float32)),
        }

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Two disjoint random halves of each slide's tiles (a one-tile slide keeps its tile in both); each
        view counts only its own tiles."""
        mask = batch["mask"]
        half = torch.rand(mask.shape, device=mask.device) < 0.5
        views = []
        for keep in (mask & half, mask & ~half):
            keep = torch.where(keep.any(dim=1, keepdim=True), keep, mask)
            views.append({**batch, "mask": keep, "n_tiles": keep.sum(dim=1).to(batch["n_tiles"].dtype)})
        return views[0], views[1]

    def encoder(
        self,
        d_model: int,
        kind: str = "abmil",
        tokens: int = 4,
        layers: int = 1,
        heads: int = 4,
        max_tiles: int = 4096,
        dropout: float = 0.1,
    ) -> nn.Module:
        if self.settings["feature_dim"] is None:
            raise ValueError(
                "the wsi settings have no feature_dim; prepare the store with `biofm prepare slides` (or call fit())"
            )
        return SlideEncoder(int(self.settings["feature_dim"]), d_model, kind, tokens, layers, heads, max_tiles, dropout)

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        """Paths of small synthetic pyramidal TIFF slides (`biofm.testing.fake_slides`, written once)."""
        from biofm.testing import fake_slides

        paths = fake_slides(seed)
        return [paths[i % len(paths)] if i % 5 != 0 else None for i in range(n)]


def _read_ahead(slide, plan, batch_tiles: int, threads: int = 2):
    """Tiles in batches of `batch_tiles` [b, S, S, 3], read by `threads` threads (OpenSlide decodes
    without holding the GIL); the next batch is read while the caller encodes this one."""
    starts = list(range(0, len(plan.coords), batch_tiles))
    with ThreadPoolExecutor(max(1, threads)) as pool:

        def submit(start: int) -> list:
            return [pool.submit(read_tile, slide, plan, x, y) for x, y in plan.coords[start : start + batch_tiles]]

        pending = submit(starts[0]) if starts else []
        for i in range(len(starts)):
            current, pending = pending, submit(starts[i + 1]) if i + 1 < len(starts) else []
            yield np.stack([future.result() for future in current])


from biofm.modalities.wsi import heatmap, pretext  # noqa: E402,F401  (registers its pretexts and `biofm heatmap`)
