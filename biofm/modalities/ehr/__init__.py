"""EHR as hierarchical text (GenHPF): every event is `table column value column value …`, tokenised by a
WordPiece tokenizer trained locally, with numbers split into digits that carry a digit-place id (DPE) and
every token a token-type id (table, column, value). An event encoder pools each event's tokens to one
vector; event vectors plus an embedding of their time go to the trunk.

Raw input per sample is an `EventSequence` (or None): the events' times in hours relative to the
prediction time (≤ 0; NaN for static facts such as sex), their table names and their (column, value)
fields. `biofm.datasets.ehr` builds these from MEDS and from raw relational tables.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import nn

from biofm.modalities.ehr.encoder import EventEncoder
from biofm.modalities.ehr.tokenizer import (
    CLS,
    COLUMN,
    TABLE,
    VALUE,
    EventSequence,
    EventTokenizer,
    train_event_tokenizer,
)
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column, Ragged


@MODALITIES.register("ehr")
class EHR(Modality):
    """Settings: `tokenizer` (JSON), `vocab_size`, `max_event_tokens` (tokens per event, incl. [CLS]),
    `max_events` (latest events kept per sample)."""

    argument = "ehr"  # a manifest has no EHR column: MEDS events come through `biofm predict-meds`

    def __init__(
        self,
        tokenizer: str | None = None,
        vocab_size: int = 4000,
        max_event_tokens: int = 48,
        max_events: int = 128,
        **settings,
    ):
        super().__init__(
            tokenizer=tokenizer,
            vocab_size=int(vocab_size),
            max_event_tokens=int(max_event_tokens),
            max_events=int(max_events),
            **settings,
        )
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
                ids[j - start, : len(e_ids)] = e_ids
                types[j - start, : len(e_types)] = e_types
                places[j - start, : len(e_places)] = e_places
            rows_ids.append(ids)
            rows_types.append(types)
            rows_places.append(places)
            rows_time.append(
                np.zeros(0, np.float32) if sample is None else np.asarray(sample.times, np.float32)[start:n]
            )
        return self.prefixed(
            {
                "tokens": Ragged.from_list(rows_ids, np.int32, (cap,)),
                "types": Ragged.from_list(rows_types, np.uint8, (cap,)),
                "places": Ragged.from_list(rows_places, np.uint8, (cap,)),
                "time": Ragged.from_list(rows_time, np.float32),
                "present": [r is not None and len(r) > 0 for r in raw],
            }
        )

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
        return EventEncoder(
            self.settings["vocab_size"], self.settings["max_event_tokens"], d_model, layers, heads, aggregator_layers
        )

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        items = [
            ("labevents", "glucose", "mg/dL"),
            ("labevents", "creatinine", "mg/dL"),
            ("prescriptions", "heparin", "unit"),
            ("inputevents", "norepinephrine", "mcg/kg/min"),
        ]
        rng = np.random.default_rng(seed)
        out = []
        for i in range(n):
            if i % 5 == 1:
                out.append(None)
                continue
            k = int(rng.integers(1, 9))
            picks = [items[j] for j in rng.integers(0, len(items), k)]
            times = np.sort(-rng.random(k) * 12).astype(np.float32)
            times[0] = np.nan if i % 3 == 0 else times[0]  # a static fact now and then
            fields = [
                [("item", name), ("value", f"{rng.random() * 200:.2f}"), ("unit", unit)] for _, name, unit in picks
            ]
            out.append(EventSequence(times, [t for t, _, _ in picks], fields))
        return out


from biofm.modalities.ehr import pretext  # noqa: E402,F401  (registers its pretext tasks)
