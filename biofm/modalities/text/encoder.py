"""The text encoder: token and position embeddings, then a small pre-norm transformer."""

from __future__ import annotations

import torch
from torch import nn


class TextEncoder(nn.Module):
    """Token and position embeddings, then a small pre-norm transformer; tokens go to the trunk."""

    def __init__(self, vocab_size: int, max_length: int, d_model: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.positions = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = batch["token_ids"], batch["mask"]  # [B, L]
        positions = torch.arange(ids.shape[1], device=ids.device)
        x = self.tokens(ids) + self.positions(positions)
        # a row with no tokens keeps one (masked later by the trunk) so attention never sees an empty row
        key_padding = ~mask
        key_padding[:, 0] = False
        x = self.layers(x, src_key_padding_mask=key_padding)
        return x, mask
