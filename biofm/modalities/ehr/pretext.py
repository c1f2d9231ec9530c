"""EHR pretext tasks: masked tokens within events (BERT-style, as GenHPF's MLM) and masked events."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biofm.modalities.ehr.tokenizer import CLS
from biofm.modalities.text.tokenizer import SPECIAL_TOKENS
from biofm.platform.pretext import PRETEXTS, Decoder, MaskingPretext, mask_fraction


@PRETEXTS.register("masked_tokens")
class MaskedTokens(MaskingPretext):
    """A random `ratio` of the tokens of real events (table, column and value tokens; digits keep their
    digit-place ids) become [MASK]; each is predicted from its token state in the event encoder."""

    modality = "ehr"

    def __init__(self, model, weight: float = 1.0, ratio: float = 0.15):
        super().__init__(model, weight)
        self.ratio = float(ratio)
        ehr = model.modalities[self.modality]
        self.mask_id = ehr.mask_id
        self.head = nn.Sequential(nn.LayerNorm(model.d_model), nn.Linear(model.d_model, ehr.settings["vocab_size"]))

    def corrupt(self, batch):
        ids, types = batch["tokens"], batch["types"]
        eligible = batch["mask"][..., None] & (ids != 0) & (types != CLS)
        chosen = mask_fraction(eligible, self.ratio)
        return {**batch, "tokens": ids.masked_fill(chosen, self.mask_id)}, (chosen[batch["mask"]], ids[batch["mask"]])

    def loss_from(self, model, encoded, state):
        chosen, ids = state  # [N real events, T]
        states = encoded.tokens[self.modality].states.get("tokens")
        if states is None or not chosen.any():
            return None
        return F.cross_entropy(self.head(states[chosen]).float(), ids[chosen])


@PRETEXTS.register("masked_events")
class MaskedEvents(MaskingPretext):
    """A random `ratio` of a patient's events show only a mask vector and their time; the bag of each
    hidden event's tokens (which table, columns and values) is predicted from its position among the
    other events and the trunk."""

    modality = "ehr"

    def __init__(self, model, weight: float = 1.0, ratio: float = 0.15):
        super().__init__(model, weight)
        self.ratio = float(ratio)
        self.vocab_size = model.modalities[self.modality].settings["vocab_size"]
        self.decoder = Decoder(model.d_model, model.n_heads, self.vocab_size)

    def corrupt(self, batch):
        chosen = mask_fraction(batch["mask"], self.ratio)  # [B, E]
        ids = batch["tokens"][chosen]  # [n, T]
        bags = torch.zeros(len(ids), self.vocab_size, device=ids.device)
        bags.scatter_(1, ids, 1.0)
        bags[:, : len(SPECIAL_TOKENS)] = 0.0  # padding, [CLS], [MASK], … are not content
        return {**batch, "event_mask": chosen}, (chosen, bags)

    def loss_from(self, model, encoded, state):
        chosen, bags = state
        if not chosen.any():
            return None
        tokens, _ = encoded.tokens[self.modality]  # [B, E, d]
        logits = self.decoder(tokens, encoded.trunk, encoded.mask)[chosen]
        return F.binary_cross_entropy_with_logits(logits.float(), bags)
