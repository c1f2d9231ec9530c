"""Free text (pathology reports, notes): a WordPiece tokenizer trained locally, a small transformer."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from biofm.modalities.text.encoder import TextEncoder
from biofm.modalities.text.tokenizer import train_wordpiece
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column, Ragged


@MODALITIES.register("text")
class Text(Modality):
    """Settings: `tokenizer` (the trained tokenizer as JSON), `max_length`, `vocab_size`."""

    argument, column = "reports", "report"

    def __init__(self, tokenizer: str | None = None, max_length: int = 128, vocab_size: int = 2000, **settings):
        super().__init__(tokenizer=tokenizer, max_length=int(max_length), vocab_size=int(vocab_size), **settings)
        self._tokenizer = Tokenizer.from_str(tokenizer) if tokenizer else None

    def fit(self, raw: Sequence[str | None]) -> None:
        self._tokenizer = train_wordpiece([r for r in raw if r], self.settings["vocab_size"])
        self.settings["tokenizer"] = self._tokenizer.to_str()
        self.settings["vocab_size"] = self._tokenizer.get_vocab_size()

    @property
    def tokenizer(self) -> Tokenizer:
        if self._tokenizer is None:
            raise RuntimeError("the text modality has no tokenizer yet: call fit() on training texts first")
        return self._tokenizer

    def featurise(self, raw: Sequence[str | None]) -> dict[str, Column]:
        texts = [str(r) if r is not None else "" for r in raw]
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        limit = self.settings["max_length"]
        rows = [np.asarray(e.ids[:limit], dtype=np.int32) for e in encoded]
        return self.prefixed({"token_ids": Ragged.from_list(rows, dtype=np.int32), "present": self.present_mask(raw)})

    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        tokens: Ragged = arrays["token_ids"]
        lengths = tokens.lengths()
        width = max(int(lengths.max()) if len(lengths) else 0, 1)
        ids = np.zeros((len(lengths), width), dtype=np.int64)  # 0 = [PAD]
        mask = np.arange(width)[None, :] < lengths[:, None]
        ids[mask] = tokens.values
        return {"token_ids": torch.from_numpy(ids), "mask": torch.from_numpy(mask)}

    def encoder(self, d_model: int, layers: int = 2, heads: int = 4) -> nn.Module:
        return TextEncoder(self.settings["vocab_size"], self.settings["max_length"], d_model, layers, heads)

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        words = ["mild", "severe", "atypia", "margins", "clear", "involved", "biopsy", "tissue", "nodes"]
        rng = np.random.default_rng(seed)
        return [" ".join(rng.choice(words, size=rng.integers(3, 12))) if i % 5 != 3 else None for i in range(n)]
