"""EHR as hierarchical text (GenHPF): every event is `table column value column value …`, tokenised by a
WordPiece tokenizer trained locally, with numbers split into digits that carry a digit-place id (DPE) and
every token a token-type id (table, column, value). An event encoder pools each event's tokens to one
vector; event vectors plus an embedding of their time go to the trunk.

Raw input per sample is an `EventSequence` (or None): the events' times in hours relative to the
prediction time (≤ 0; NaN for static facts such as sex), their table names and their (column, value)
fields. `biofm.datasets.ehr` builds these from MEDS and from raw relational tables.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from biofm.modalities.text import train_wordpiece
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column, Ragged

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
    return NUMBER.sub(lambda m: f"{float(m.group(0)):.4f}".rstrip("0").rstrip(".") if "." in m.group(0)
                      else m.group(0), text)


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
            self._words(text_r[last:m.start()], ids, places)
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


@MODALITIES.register("ehr")
class EHR(Modality):
    """Settings: `tokenizer` (JSON), `vocab_size`, `max_event_tokens` (tokens per event, incl. [CLS]),
    `max_events` (latest events kept per sample)."""

    def __init__(self, tokenizer: str | None = None, vocab_size: int = 4000, max_event_tokens: int = 48,
                 max_events: int = 128, **settings):
        super().__init__(tokenizer=tokenizer, vocab_size=int(vocab_size), max_event_tokens=int(max_event_tokens),
                         max_events=int(max_events), **settings)
        self._events = EventTokenizer(Tokenizer.from_str(tokenizer)) if tokenizer else None

    def fit(self, raw: Sequence[EventSequence | None] | Iterable[str]) -> None:
        """Train the tokenizer on the events' strings (or directly on an iterable of strings)."""
        texts = (t for r in raw if r is not None for t in (r.texts() if isinstance(r, EventSequence) else [r]))
        tokenizer = train_event_tokenizer(texts, self.settings["vocab_size"])
        self.settings["tokenizer"] = tokenizer.to_str()
        self.settings["vocab_size"] = tokenizer.get_vocab_size()
        self._events = EventTokenizer(tokenizer)

    @property
    def events(self) -> EventTokenizer:
        if self._events is None:
            raise RuntimeError("the ehr modality has no tokenizer yet: call fit() on training events first")
        return self._events

    def encode_event(self, table: str, fields: list[tuple[str, str]]) -> tuple[list[int], list[int], list[int]]:
        """[CLS] table column value …; a (column, value) pair that would pass the cap is left out whole."""
        cap = self.settings["max_event_tokens"]
        ids, places = self.events.encode(table)
        ids, places = [self.events.cls_id, *ids][:cap], [0, *places][:cap]
        types = [CLS] + [TABLE] * (len(ids) - 1)
        for column, value in fields:
            c_ids, c_places = self.events.encode(column)
            v_ids, v_places = self.events.encode(value)
            if len(ids) + len(c_ids) + len(v_ids) > cap:
                break
            ids += c_ids + v_ids
            places += c_places + v_places
            types += [COLUMN] * len(c_ids) + [VALUE] * len(v_ids)
        return ids, types, places

    def featurise(self, raw: Sequence[EventSequence | None]) -> dict[str, Column]:
        cap, keep = self.settings["max_event_tokens"], self.settings["max_events"]
        rows_ids, rows_types, rows_places, rows_time = [], [], [], []
        for sample in raw:
            n = 0 if sample is None else len(sample)
            start = max(n - keep, 0)  # the latest events
            ids = np.zeros((n - start, cap), np.int32)
            types = np.zeros((n - start, cap), np.uint8)
            places = np.zeros((n - start, cap), np.uint8)
            for j in range(start, n):
                e_ids, e_types, e_places = self.encode_event(sample.tables[j], sample.fields[j])
                ids[j - start, :len(e_ids)] = e_ids
                types[j - start, :len(e_types)] = e_types
                places[j - start, :len(e_places)] = e_places
            rows_ids.append(ids)
            rows_types.append(types)
            rows_places.append(places)
            rows_time.append(np.zeros(0, np.float32) if sample is None else
                             np.asarray(sample.times, np.float32)[start:n])
        return {"ehr/tokens": Ragged.from_list(rows_ids, np.int32, (cap,)),
                "ehr/types": Ragged.from_list(rows_types, np.uint8, (cap,)),
                "ehr/places": Ragged.from_list(rows_places, np.uint8, (cap,)),
                "ehr/time": Ragged.from_list(rows_time, np.float32),
                "ehr/present": np.array([r is not None and len(r) > 0 for r in raw], dtype=bool)}

    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        tokens: Ragged = arrays["tokens"]
        lengths = tokens.lengths()
        b, width = len(lengths), max(int(lengths.max()) if len(lengths) else 0, 1)
        cap = tokens.values.shape[1] if tokens.values.ndim == 2 else self.settings["max_event_tokens"]
        mask = np.arange(width)[None, :] < lengths[:, None]
        out = {}
        for name, dtype in (("tokens", np.int64), ("types", np.int64), ("places", np.int64)):
            padded = np.zeros((b, width, cap), dtype=dtype)
            padded[mask] = arrays[name].values
            out[name] = torch.from_numpy(padded)
        time = np.zeros((b, width), np.float32)
        time[mask] = arrays["time"].values
        out["time"] = torch.from_numpy(time)
        out["mask"] = torch.from_numpy(mask)
        return out

    @property
    def mask_id(self) -> int:
        return self.events.tokenizer.token_to_id("[MASK]")

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """The earlier and the later half of each patient's events (both hold the event of a one-event patient)."""
        mask = batch["mask"]
        n = mask.sum(dim=1, keepdim=True)
        index = torch.arange(mask.shape[1], device=mask.device)[None, :]
        return {**batch, "mask": mask & (index < (n + 1) // 2)}, {**batch, "mask": mask & (index >= n // 2)}

    def encoder(self, d_model: int, layers: int = 2, heads: int = 4, aggregator_layers: int = 1) -> nn.Module:
        return EventEncoder(self.settings["vocab_size"], self.settings["max_event_tokens"], d_model, layers, heads,
                            aggregator_layers)


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
    their time) instead of their content. `states["tokens"]` keeps the last pass's token states of the
    real events [N, T, d]."""

    def __init__(self, vocab_size: int, max_event_tokens: int, d_model: int, layers: int = 2, heads: int = 4,
                 aggregator_layers: int = 1):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model, padding_idx=0)
        self.types = nn.Embedding(N_TYPES, d_model, padding_idx=0)
        self.places = nn.Embedding(N_DPE, d_model)
        self.positions = nn.Embedding(max_event_tokens, d_model)
        layer = lambda: nn.TransformerEncoderLayer(d_model, heads, 2 * d_model, dropout=0.0,  # noqa: E731
                                                   batch_first=True, norm_first=True)
        self.event_layers = nn.TransformerEncoder(layer(), layers, enable_nested_tensor=False)
        self.time = TimeEmbedding(d_model)
        self.norm = nn.LayerNorm(d_model)
        self.aggregator = (nn.TransformerEncoder(layer(), aggregator_layers, enable_nested_tensor=False)
                           if aggregator_layers else None)
        self.mask_event = nn.Parameter(torch.zeros(d_model))
        self.states: dict[str, torch.Tensor] = {}

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ids, mask = batch["tokens"], batch["mask"]  # [B, E, T], [B, E]
        b, e, t = ids.shape
        flat = ids[mask]  # only real events go through the event encoder
        vectors = ids.new_zeros((b, e, self.tokens.embedding_dim), dtype=self.positions.weight.dtype)
        if len(flat):
            positions = torch.arange(t, device=ids.device)
            x = (self.tokens(flat) + self.types(batch["types"][mask]) + self.places(batch["places"][mask])
                 + self.positions(positions))
            token_mask = flat != 0
            x = self.event_layers(x, src_key_padding_mask=~token_mask)
            self.states = {"tokens": x}
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
        return x, mask


from biofm.modalities.ehr import pretext  # noqa: E402,F401  (registers its pretext tasks)
