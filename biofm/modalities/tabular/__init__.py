"""Case-level structured data: numeric and categorical columns, one token per column (FT-Transformer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column


def as_frame(raw: Sequence[Any] | pd.DataFrame) -> tuple[pd.DataFrame, np.ndarray]:
    """A DataFrame (every row present) or a list of dict / None rows → (frame, present mask)."""
    if isinstance(raw, pd.DataFrame):
        return raw.reset_index(drop=True), np.ones(len(raw), dtype=bool)
    present = Modality.present_mask(raw)
    return pd.DataFrame([r if r is not None else {} for r in raw]), present


@MODALITIES.register("tabular")
class Tabular(Modality):
    """Settings: `numeric` {column: [mean, std]} and `categorical` {column: [categories]}, learned by
    `fit` when not given. Missing cells are NaN (numeric) or code 0 (categorical); each has a learned
    'missing' embedding. Unknown categories at inference also map to code 0."""

    def __init__(self, numeric: dict | None = None, categorical: dict | None = None, **settings):
        super().__init__(numeric=dict(numeric or {}), categorical=dict(categorical or {}), **settings)

    def fit(self, raw) -> None:
        frame, present = as_frame(raw)
        frame = frame[present]
        numeric, categorical = {}, {}
        for column in frame.columns:
            values = frame[column]
            if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
                categorical[str(column)] = sorted({str(v) for v in values.dropna()})
            else:
                v = values.astype(float)
                std = float(v.std()) if v.notna().sum() > 1 else 1.0
                numeric[str(column)] = [float(v.mean()) if v.notna().any() else 0.0, std if std > 0 else 1.0]
        self.settings.update(numeric=numeric, categorical=categorical)

    def featurise(self, raw) -> dict[str, Column]:
        frame, present = as_frame(raw)
        n = len(present)
        numeric, categorical = self.settings["numeric"], self.settings["categorical"]
        out: dict[str, Column] = {"tabular/present": present}
        if numeric:
            cols = []
            for column, (mean, std) in numeric.items():
                values = pd.to_numeric(frame[column], errors="coerce") if column in frame else \
                    pd.Series(np.nan, index=range(n))
                cols.append(((values.to_numpy(dtype=float) - mean) / std).astype(np.float32))
            out["tabular/numeric"] = np.stack(cols, axis=1)
        if categorical:
            codes = np.zeros((n, len(categorical)), dtype=np.int32)
            for j, (column, categories) in enumerate(categorical.items()):
                if column in frame:
                    lookup = {c: i + 1 for i, c in enumerate(categories)}
                    codes[:, j] = [lookup.get(str(v), 0) if pd.notna(v) else 0 for v in frame[column]]
            out["tabular/categorical"] = codes
        return out

    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        out = {}
        if "numeric" in arrays:
            out["numeric"] = torch.from_numpy(np.asarray(arrays["numeric"], dtype=np.float32))
        if "categorical" in arrays:
            out["categorical"] = torch.from_numpy(np.asarray(arrays["categorical"], dtype=np.int64))
        return out

    def encoder(self, d_model: int) -> nn.Module:
        return TabularEncoder(len(self.settings["numeric"]),
                              [len(c) for c in self.settings["categorical"].values()], d_model)


class TabularEncoder(nn.Module):
    """One token per column: value · w_j + b_j for numbers, an embedding per category otherwise."""

    def __init__(self, n_numeric: int, cardinalities: list[int], d_model: int):
        super().__init__()
        self.n_numeric = n_numeric
        self.weight = nn.Parameter(torch.randn(n_numeric, d_model) * 0.1)
        self.bias = nn.Parameter(torch.randn(n_numeric, d_model) * 0.1)
        self.missing = nn.Parameter(torch.randn(n_numeric, d_model) * 0.1)
        sizes = [c + 1 for c in cardinalities]  # code 0 = missing or unknown, per column
        self.register_buffer("cat_offsets", torch.tensor([0] + sizes[:-1], dtype=torch.long).cumsum(0),
                             persistent=False)
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
