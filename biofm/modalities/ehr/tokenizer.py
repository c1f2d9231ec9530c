"""Events as hierarchical text: an event sequence, and the tokenizer that turns each event into tokens (numbers digit by digit, GenHPF style)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from biofm.modalities.text.tokenizer import train_wordpiece

# token types (0 = padding)
TABLE, COLUMN, VALUE, CLS = 1, 2, 3, 4


N_TYPES = 5


# digit-place ids: 0 = not part of a number, 5 = the decimal point, 6 = ones, 7 = tens, …, 4 … 1 = the first
# … fourth decimal; capped at N_DPE - 1 for very long integers
POINT, ONES, N_DPE = 5, 6, 16


NUMBER = re.compile(r"\d+(?:\.\d+)?")


DIGITS = "0123456789."


@dataclass
class EventSequence:
    """One sample's events, oldest first. `times`: hours relative to the prediction time (NaN = static)."""

    times: np.ndarray
    tables: list[str] = field(default_factory=list)
    fields: list[list[tuple[str, str]]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.tables)

    def texts(self) -> Iterable[str]:
        for table, fields in zip(self.tables, self.fields):
            yield table
            for column, value in fields:
                yield column
                yield value


def _round_numbers(text: str) -> str:
    """Decimals rounded to 4 places (as GenHPF), so '0.30000001' costs 6 digits, not 10."""
    return NUMBER.sub(
        lambda m: f"{float(m.group(0)):.4f}".rstrip("0").rstrip(".") if "." in m.group(0) else m.group(0), text
    )


def digit_places(number: str) -> list[int]:
    """DPE ids for the characters of `number` ('12.5' → tens, ones, point, first decimal)."""
    whole, _, fraction = number.partition(".")
    places = [min(ONES + len(whole) - 1 - i, N_DPE - 1) for i in range(len(whole))]
    if fraction:
        places.append(POINT)
        places += [max(POINT - 1 - i, 1) for i in range(len(fraction))]
    return places


class EventTokenizer:
    """Strings → (token ids, digit-place ids), with a cache: EHR strings repeat (column names, item
    labels, units), so each distinct string is tokenised once."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.digit_ids = {c: tokenizer.token_to_id(c) for c in DIGITS}
        missing = [c for c, i in self.digit_ids.items() if i is None]
        if missing:
            raise ValueError(f"the EHR tokenizer has no token for {missing}; train it with train_event_tokenizer")
        self.cls_id = tokenizer.token_to_id("[CLS]")
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def encode(self, text: str) -> tuple[list[int], list[int]]:
        hit = self._cache.get(text)
        if hit is not None:
            return hit
        text_r = _round_numbers(text)
        ids: list[int] = []
        places: list[int] = []
        last = 0
        for m in NUMBER.finditer(text_r):
            self._words(text_r[last : m.start()], ids, places)
            ids += [self.digit_ids[c] for c in m.group(0)]
            places += digit_places(m.group(0))
            last = m.end()
        self._words(text_r[last:], ids, places)
        if len(self._cache) < 500_000:
            self._cache[text] = (ids, places)
        return ids, places

    def _words(self, text: str, ids: list[int], places: list[int]) -> None:
        if text.strip():
            encoded = self.tokenizer.encode(text, add_special_tokens=False).ids
            ids += encoded
            places += [0] * len(encoded)


def train_event_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """WordPiece on the corpus's words (numbers become digits, so they are left out), plus the digits."""
    words = (NUMBER.sub(" ", t) for t in texts if t)
    return train_wordpiece(_with_digits(words), vocab_size=vocab_size, min_frequency=1)


def _with_digits(texts: Iterable[str]) -> Iterable[str]:
    yield " ".join(DIGITS)
    yield from texts
