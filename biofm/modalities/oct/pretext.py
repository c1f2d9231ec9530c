"""OCT pretext task: masked 3D patch reconstruction (MAE on the volume's patch grid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from biofm.platform.pretext import PRETEXTS, Decoder, MaskingPretext, mask_fraction


def patches(volume: torch.Tensor, patch: tuple[int, int, int]) -> torch.Tensor:
    """[B, 1, D, H, W] → [B, N, pd·ph·pw], in the encoder's token order (voxels past the last whole patch
    are left out, as the strided stem leaves them)."""
    pd, ph, pw = patch
    b, _, d, h, w = volume.shape
    gd, gh, gw = d // pd, h // ph, w // pw
    x = volume[:, 0, : gd * pd, : gh * ph, : gw * pw].reshape(b, gd, pd, gh, ph, gw, pw)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, gd * gh * gw, pd * ph * pw)


@PRETEXTS.register("masked_patches")
class MaskedPatches(MaskingPretext):
    """A random `ratio` of each volume's patches show the encoder a mask vector instead of their voxels;
    the voxels of each hidden patch (normalised per patch, as MAE) are predicted from its token and the trunk."""

    modality = "oct"

    def __init__(self, model, weight: float = 1.0, ratio: float = 0.5):
        super().__init__(model, weight)
        self.ratio = float(ratio)
        encoder = model.encoders[self.modality]
        self.patch, self.n_patches = encoder.patch, encoder.volume_position.shape[0]
        self.decoder = Decoder(model.d_model, model.n_heads, int(torch.tensor(self.patch).prod()))

    def applies(self, inputs):
        return self.modality in inputs and bool(inputs[self.modality]["has_volume"].any())

    def corrupt(self, batch):
        has = batch["has_volume"] & batch["present"].to(torch.bool)
        chosen = mask_fraction(has[:, None].expand(-1, self.n_patches), self.ratio)
        return {**batch, "patch_mask": chosen}, (chosen, batch["volume"])

    def loss_from(self, model, encoded, state):
        chosen, volume = state
        if not chosen.any():
            return None
        target = patches(volume, self.patch)[chosen].float()
        target = (target - target.mean(dim=1, keepdim=True)) / (target.std(dim=1, keepdim=True) + 1e-3)
        tokens, _ = encoded.tokens[self.modality]  # volume tokens first, then the en-face map's
        prediction = self.decoder(tokens[:, : self.n_patches], encoded.trunk, encoded.mask)[chosen]
        return F.mse_loss(prediction.float(), target)
