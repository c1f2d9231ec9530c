"""Slide pretext task: masked tile-feature reconstruction (MAE on the bag of tiles)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biofm.modalities.wsi.encoder import grid_embedding
from biofm.platform.pretext import PRETEXTS, Decoder, MaskingPretext, mask_fraction


@PRETEXTS.register("masked_tiles")
class MaskedTiles(MaskingPretext):
    """A random `ratio` of each slide's tiles show a mask vector instead of their patch features and are left
    out of the slide's pooling; their features (standardised per dimension over the batch's tiles) are
    predicted from their position on the slide, the tile states and the trunk."""

    modality = "wsi"

    def __init__(self, model, weight: float = 1.0, ratio: float = 0.5):
        super().__init__(model, weight)
        self.ratio = float(ratio)
        self.feature_dim = int(model.modalities[self.modality].settings["feature_dim"])
        self.decoder = Decoder(model.d_model, model.n_heads, self.feature_dim)

    def corrupt(self, batch):
        return {**batch, "tile_mask": mask_fraction(batch["mask"], self.ratio)}, None

    def loss_from(self, model, encoded, state):
        states = encoded.tokens[self.modality].states
        tiles, batch = states["tiles"], states["batch"]  # after any subsampling
        chosen = batch["tile_mask"] & batch["mask"]
        if not chosen.any():
            return None
        features = batch["features"][batch["mask"]].float()
        mean = features.mean(dim=0)
        std = features.std(dim=0).clamp_min(1e-3) if len(features) > 1 else torch.ones_like(mean)
        target = (batch["features"][chosen].float() - mean) / std
        queries = tiles + grid_embedding(batch["grid"], model.d_model).to(tiles.dtype)
        prediction = self.decoder(queries, encoded.trunk, encoded.mask)[chosen]
        return F.mse_loss(prediction.float(), target)
