"""A modality is a small plug-in: raw → store arrays, store arrays → batch, batch → tokens.

Subclasses live in `biofm/modalities/<name>/` and register with `@MODALITIES.register("<name>")`;
nothing in `platform/` names one. Settings learned at prepare time (vocabularies, scalers) are plain
JSON in `config()`: they go into the store's attributes and the checkpoint, so inference prepares raw
input exactly as training did.

To override (as PyG's `MessagePassing`): `featurise` and `collate` and `encoder` (required), `fit`,
`featurise_with_reasons`, `augment`, `views` (optional); and for users' inputs the class attributes
`argument` (the keyword of `Model.predict`) and `column` (the cohort manifest's column), with
`raw_from_table` where a manifest row gives the input otherwise, and `example_raw` (raw inputs for the
registry-wide tests). None of the defaults calls another overridable method.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from biofm.platform.store import Column
from biofm.registry import Registry

MODALITIES: Registry[Modality] = Registry("modality", plugins="biofm.modalities")


class Tokens(tuple):
    """What an encoder gives the trunk: `tokens` [B, L, d] and their validity `mask` [B, L] (it unpacks as
    that pair), and `states`: per-element states of this pass that its modality's pretext tasks and tools
    read (e.g. the EHR encoder's token states, the slide encoder's tile states and attention). An encoder
    may return a plain (tokens, mask) pair instead; the model makes it a `Tokens` with no states."""

    states: dict

    def __new__(cls, tokens: torch.Tensor, mask: torch.Tensor, states: dict | None = None) -> Tokens:
        record = super().__new__(cls, (tokens, mask))
        record.states = dict(states or {})
        return record

    @property
    def tokens(self) -> torch.Tensor:
        return self[0]

    @property
    def mask(self) -> torch.Tensor:
        return self[1]


class Modality:
    name: ClassVar[str]
    version: ClassVar[int] = 1
    argument: ClassVar[str | None] = None  # `Model.predict(<argument>=[…])`; None: the modality's name
    column: ClassVar[str | None] = None  # the cohort manifest's column (a cell per sample); None: no column

    def __init__(self, **settings: Any):
        self.settings = dict(settings)

    @classmethod
    def from_config(cls, config: dict) -> Modality:
        config = {k: v for k, v in config.items() if k != "version"}
        return cls(**config)

    def config(self) -> dict:
        """JSON-serialisable settings, enough to featurise new raw input the same way."""
        return {"version": self.version, **self.settings}

    # ---- prepare side
    def fit(self, raw: Sequence[Any]) -> None:
        """Learn settings from raw training input (vocabulary, scalers). Default: nothing to learn."""

    def featurise(self, raw: Sequence[Any]) -> dict[str, Column]:
        """Store arrays (`"<modality>/<array>"`) for a batch of raw inputs; None marks a missing input."""
        raise NotImplementedError

    def featurise_with_reasons(self, raw: Sequence[Any]) -> tuple[dict[str, Column], list[str | None]]:
        """`featurise`, and per input the reason it could not be used (None where it was used or missing).
        Default: every input can be used; modalities whose inputs can fail override this."""
        return self.featurise(raw), [None] * len(raw)

    @staticmethod
    def present_mask(raw: Sequence[Any]) -> np.ndarray:
        return np.array([r is not None for r in raw], dtype=bool)

    def prefixed(self, arrays: dict[str, Column]) -> dict[str, Column]:
        """A featuriser's arrays (`present` and the others, by their own names) under their store names,
        `<modality>/<array>`, with `present` as bool: the one place the prefix is written."""
        out = {f"{self.name}/{key}": value for key, value in arrays.items()}
        out[f"{self.name}/present"] = np.asarray(arrays["present"], dtype=bool)
        return out

    def inputs_of(self, columns: dict[str, Column], augment: bool = False) -> dict[str, torch.Tensor] | None:
        """This modality's store columns among `columns` → its model inputs: `present` (a bool tensor) and
        `collate`'s tensors (`augment`ed for training); None when `columns` has none of them. The one place
        the prefix is taken off."""
        prefix = self.name + "/"
        arrays = {key[len(prefix) :]: value for key, value in columns.items() if key.startswith(prefix)}
        if not arrays:
            return None
        present = torch.from_numpy(np.asarray(arrays.pop("present"), dtype=bool))
        inputs = self.collate(arrays)
        return {"present": present, **(self.augment(inputs) if augment else inputs)}

    # ---- train side
    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        """Tensors for one batch from this modality's store arrays (names without the prefix)."""
        raise NotImplementedError

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Random augmentation of a collated training batch (in the loader worker); never called for
        evaluation or prediction. Default: none."""
        return batch

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict] | None:
        """Two random views of a collated batch for contrastive pretraining (`two_view`), e.g. two halves of
        a patient's events; None (the default) lets the pretext take two random subsets of the encoder's
        tokens instead."""
        return None

    # ---- inputs from users: the SDK and predict-cohort
    @classmethod
    def keyword(cls) -> str:
        """The keyword of `Model.predict` and `Model.embed` that takes this modality's raw inputs."""
        return cls.argument or cls.name

    def raw_from_argument(self, values: Any) -> Sequence[Any]:
        """`Model.predict`'s argument as raw inputs, one per sample (None: the sample has none). Default: a
        list, refusing a bare string or array (which would be read as one sample per character or row)."""
        return as_samples(self.keyword(), values)

    def raw_from_table(self, frame: pd.DataFrame) -> list | None:
        """Raw inputs from the rows of a cohort manifest, or None when it has no column for this modality.
        Default: the `column` cells as strings (an empty or missing cell: no input)."""
        if self.column is None or self.column not in frame.columns:
            return None
        return [None if pd.isna(v) or v == "" else str(v) for v in frame[self.column]]

    def table_columns(self) -> list[str]:
        """The manifest columns `raw_from_table` reads (for an error naming what a manifest lacks)."""
        return [self.column] if self.column else []

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        """`n` raw inputs for tests (None marks a sample without one, and at least one sample has none): the
        registry-wide tests run every modality from these."""
        raise NotImplementedError(f"modality '{cls.name}' gives no example inputs; add example_raw")

    def encoder(self, d_model: int, **options) -> nn.Module:
        """A module whose forward(batch) returns tokens [B, L, d] and a validity mask [B, L], or a `Tokens`
        record with the states of the pass its modality's pretext tasks need; `options` are the encoder's
        architecture settings from the model config (`--model.encoders`)."""
        raise NotImplementedError


class FileModality(Modality):
    """A modality whose raw input is one file (or array) per sample, processed alone (slides, volumes):
    subclasses give `process` (one input → its unprefixed arrays and extra values, raising `input_error`
    with a readable reason) and `stack` (per-sample arrays, None for absent → the batch's store columns)."""

    input_error: ClassVar[type[Exception]] = ValueError

    def process(self, raw: Any) -> tuple[dict[str, np.ndarray], dict]:
        raise NotImplementedError

    def stack(self, rows: list[dict | None]) -> dict[str, Column]:
        raise NotImplementedError

    def featurise_with_reasons(self, raw: Sequence[Any]) -> tuple[dict[str, Column], list[str | None]]:
        """Arrays for a batch (None = no input); an input that fails is absent, with its reason."""
        rows, reasons = [], []
        for r in raw:
            if r is None:
                rows.append(None), reasons.append(None)
                continue
            try:
                rows.append(self.process(r)[0]), reasons.append(None)
            except self.input_error as err:
                rows.append(None), reasons.append(str(err))
        return self.stack(rows), reasons

    def featurise(self, raw: Sequence[Any]) -> dict[str, Column]:
        return self.featurise_with_reasons(raw)[0]


def as_samples(argument: str, values: Any) -> list:
    """An input argument as a list of samples; a bare string (or a single volume) would be read as a sequence
    of samples (`smiles="CCO"` as "C", "C", "O"), so it is refused."""
    if isinstance(values, (str, bytes, Path)):
        raise ValueError(
            f"{argument}= takes a list, one entry per sample; got a single "
            f"{type(values).__name__} — pass {argument}=[{str(values)[:30]!r}] for one sample"
        )
    if isinstance(values, np.ndarray) and values.ndim > 1:
        raise ValueError(
            f"{argument}= takes a list, one entry per sample; got one array of shape "
            f"{values.shape} — pass {argument}=[volume] for one sample, or a list of arrays"
        )
    if isinstance(values, dict):
        raise ValueError(f"{argument}= takes a list, one entry per sample; got a dict")
    try:
        return list(values)
    except TypeError:
        raise ValueError(f"{argument}= takes a list, one entry per sample; got a {type(values).__name__}") from None
