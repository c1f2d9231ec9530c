"""The EHR encoder: each event's tokens → one vector (a small transformer over token, type and digit-place
embeddings), plus the time before the prediction, then a transformer over the events."""

from __future__ import annotations

import math

import torch
from torch import nn

from biofm.modalities.ehr.tokenizer import (
    N_DPE,
    N_TYPES,
)
from biofm.platform.modality import Tokens


class TimeEmbedding(nn.Module):
    """Hours before the prediction time → d: sinusoids of log(1 + hours) at several scales, then a linear
    map; static facts (NaN time) get a learned vector of their own."""

    def __init__(self, d_model: int, frequencies: int = 16):
        super().__init__()
        self.register_buffer("scales", torch.exp(torch.linspace(0.0, math.log(64.0), frequencies)), persistent=False)
        self.project = nn.Linear(2 * frequencies, d_model)
        self.static = nn.Parameter(torch.zeros(d_model))

    def forward(self, hours: torch.Tensor) -> torch.Tensor:
        static = torch.isnan(hours)
        t = torch.log1p(hours.nan_to_num(0.0).abs())[..., None] * self.scales
        x = self.project(torch.cat([torch.sin(t), torch.cos(t)], dim=-1))
        return torch.where(static[..., None], self.static.to(x.dtype), x)


class EventEncoder(nn.Module):
    """Per event: token + type + digit-place + position embeddings → transformer → mean over its tokens.
    Then event vectors + time embedding → a small transformer across events → tokens for the trunk.
    A batch may carry `event_mask` [B, E] (pretext tasks): those events show a learned mask vector (and
    their time) instead of their content. Its `Tokens` carry the token states of the pass (`states["tokens"]`),
    real events only [N, T, d]."""

    def __init__(
        self,
        vocab_size: int,
        max_event_tokens: int,
        d_model: int,
        layers: int = 2,
        heads: int = 4,
        aggregator_layers: int = 1,
    ):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.types = nn.Embedding(N_TYPES, d_model, padding_idx=0)
        self.places = nn.Embedding(N_DPE, d_model)
        self.positions = nn.Embedding(max_event_tokens, d_model)
        layer = lambda: nn.TransformerEncoderLayer(
            d_model,
            heads,
            2 * d_model,
            dropout=0.0,  # noqa: E731
            batch_first=True,
            norm_first=True,
        )
        self.event_layers = nn.TransformerEncoder(layer(), layers, enable_nested_tensor=False)
        self.time = TimeEmbedding(d_model)
        self.norm = nn.LayerNorm(d_model)
        self.aggregator = (
            nn.TransformerEncoder(layer(), aggregator_layers, enable_nested_tensor=False) if aggregator_layers else None
        )
        self.mask_event = nn.Parameter(torch.zeros(d_model))

    def forward(self, batch: dict[str, torch.Tensor]) -> Tokens:
        ids, mask = batch["tokens"], batch["mask"]  # [B, E, T], [B, E]
        b, e, t = ids.shape
        states: dict[str, torch.Tensor] = {}
        flat = ids[mask]  # only real events go through the event encoder
        vectors = ids.new_zeros((b, e, self.tokens.embedding_dim), dtype=self.positions.weight.dtype)
        if len(flat):
            positions = torch.arange(t, device=ids.device)
            x = (
                self.tokens(flat)
                + self.types(batch["types"][mask])
                + self.places(batch["places"][mask])
                + self.positions(positions)
            )
            token_mask = flat != 0
            x = self.event_layers(x, src_key_padding_mask=~token_mask)
            states = {"tokens": x}
            weights = token_mask.to(x.dtype)[..., None]
            pooled = (x * weights).sum(1) / weights.sum(1).clamp_min(1.0)
            vectors = vectors.to(pooled.dtype)
            vectors[mask] = pooled
        if "event_mask" in batch:
            vectors = torch.where(batch["event_mask"][..., None], self.mask_event.to(vectors.dtype), vectors)
        x = self.norm(vectors + self.time(batch["time"]).to(vectors.dtype))
        if self.aggregator is not None:
            key_padding = ~mask
            key_padding[:, 0] = False  # a sample without events keeps one (masked by the trunk)
            x = self.aggregator(x, src_key_padding_mask=key_padding)
        return Tokens(x, mask, states)
