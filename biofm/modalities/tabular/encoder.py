"""The case-data encoder: one token per column (FT-Transformer)."""

from __future__ import annotations

import torch
from torch import nn


class TabularEncoder(nn.Module):
    """One token per column: value · w_j + b_j for numbers, an embedding per category otherwise."""

    def __init__(self, n_numeric: int, cardinalities: list[int], d_model: int):
        super().__init__()
        self.n_numeric = n_numeric
        self.weight = nn.Parameter(torch.randn(n_numeric, d_model) * 0.1)
        self.bias = nn.Parameter(torch.randn(n_numeric, d_model) * 0.1)
        self.missing = nn.Parameter(torch.randn(n_numeric, d_model) * 0.1)
        sizes = [c + 1 for c in cardinalities]  # code 0 = missing or unknown, per column
        self.register_buffer(
            "cat_offsets", torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0), persistent=False
        )
        self.categories = nn.Embedding(max(sum(sizes), 1), d_model)
        nn.init.normal_(self.categories.weight, std=0.1)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = []
        if self.n_numeric:
            x = batch["numeric"]  # [B, C]
            missing = torch.isnan(x)
            value = torch.nan_to_num(x).unsqueeze(-1) * self.weight + self.bias
            tokens.append(torch.where(missing.unsqueeze(-1), self.missing.expand_as(value), value))
        if len(self.cat_offsets):
            tokens.append(self.categories(batch["categorical"] + self.cat_offsets))
        x = torch.cat(tokens, dim=1)  # [B, columns, d]
        return x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
