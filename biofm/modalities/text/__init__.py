"""Free text (pathology reports, notes): a WordPiece tokenizer trained locally, a small transformer."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from torch import nn

from biofm.modalities.text.wordpiece import learn_vocabulary
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column, Ragged

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece(texts: Iterable[str], vocab_size: int = 2000, min_frequency: int = 2) -> Tokenizer:
    """A lower-casing WordPiece tokenizer (`tokenizers`' BERT normaliser and pre-tokeniser) whose vocabulary
    is learned here, deterministically (`wordpiece.learn_vocabulary`); nothing is downloaded."""
    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    words: Counter = Counter()
    for text, n in Counter(t for t in texts if t).items():  # texts repeat (EHR strings): each split once
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)):
            words[word] += n
    vocab = learn_vocabulary(words, vocab_size, min_frequency, SPECIAL_TOKENS)
    tokenizer = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer, tokenizer.pre_tokenizer = normalizer, pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


@MODALITIES.register("text")
class Text(Modality):
    """Settings: `tokenizer` (the trained tokenizer as JSON), `max_length`, `vocab_size`."""

    def __init__(self, tokenizer: str | None = None, max_length: int = 128, vocab_size: int = 2000,
                 **settings):
        super().__init__(tokenizer=tokenizer, max_length=int(max_length), vocab_size=int(vocab_size),
                         **settings)
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
        return {"text/token_ids": Ragged.from_list(rows, dtype=np.int32), "text/present": self.present_mask(raw)}

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


class TextEncoder(nn.Module):
    """Token and position embeddings, then a small pre-norm transformer; tokens go to the trunk."""

    def __init__(self, vocab_size: int, max_length: int, d_model: int, layers: int = 2, heads: int = 4):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.positions = nn.Embedding(max_length, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0, batch_first=True,
                                           norm_first=True)
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
