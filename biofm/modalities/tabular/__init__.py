"""Case-level structured data: numeric and categorical columns, one token per column (FT-Transformer)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from biofm.modalities.tabular.encoder import TabularEncoder
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

    argument = "case"  # a DataFrame, or a list of dicts; a manifest's case columns are the settings' columns

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
        out: dict[str, Column] = {"present": present}
        if numeric:
            cols = []
            for column, (mean, std) in numeric.items():
                values = (
                    pd.to_numeric(frame[column], errors="coerce")
                    if column in frame
                    else pd.Series(np.nan, index=range(n))
                )
                cols.append(((values.to_numpy(dtype=float) - mean) / std).astype(np.float32))
            out["numeric"] = np.stack(cols, axis=1)
        if categorical:
            codes = np.zeros((n, len(categorical)), dtype=np.int32)
            for j, (column, categories) in enumerate(categorical.items()):
                if column in frame:
                    lookup = {c: i + 1 for i, c in enumerate(categories)}
                    codes[:, j] = [lookup.get(str(v), 0) if pd.notna(v) else 0 for v in frame[column]]
            out["categorical"] = codes
        return self.prefixed(out)

    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        out = {}
        if "numeric" in arrays:
            out["numeric"] = torch.from_numpy(np.asarray(arrays["numeric"], dtype=np.float32))
        if "categorical" in arrays:
            out["categorical"] = torch.from_numpy(np.asarray(arrays["categorical"], dtype=np.int64))
        return out

    def encoder(self, d_model: int) -> nn.Module:
        return TabularEncoder(
            len(self.settings["numeric"]), [len(c) for c in self.settings["categorical"].values()], d_model
        )

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        rng = np.random.default_rng(seed)
        frame = pd.DataFrame(
            {
                "age": rng.normal(60, 10, n).round(1),
                "dose": rng.random(n),
                "stage": rng.choice(["I", "II", "III"], n),
                "smoker": rng.choice([True, False], n),
            }
        )
        frame.loc[frame.index % 4 == 1, "age"] = np.nan
        return [r if i % 5 != 2 else None for i, r in enumerate(frame.to_dict("records"))]

    def raw_from_argument(self, values):
        """A DataFrame (a row per sample) as it is, or a list of dicts (None: no case data)."""
        return values.reset_index(drop=True) if isinstance(values, pd.DataFrame) else super().raw_from_argument(values)

    def table_columns(self) -> list[str]:
        return list(self.settings.get("numeric", {})) + list(self.settings.get("categorical", {}))

    def raw_from_table(self, frame):
        """The manifest's columns that the settings know; a row with none of them has no case data (text cells
        of numeric columns are read as numbers by `featurise`)."""
        known = [c for c in self.table_columns() if c in frame.columns]
        if not known:
            return None
        present = frame[known].notna().any(axis=1).to_numpy()
        return [r if p else None for r, p in zip(frame[known].to_dict("records"), present)]
