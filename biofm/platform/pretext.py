"""Self-supervised pretext tasks, trained like tasks: chosen by name in the model config
(`--model.pretext '{"masked_atoms": {}, "two_view": {}}'`), mixable with supervised tasks, and balanced by
the same strategy as they are (each counts as the task `pretext/<name>`).

Two families:

- **masking** (one per modality, registered by the modality's package): each corrupts its modality's batch
  (`corrupt`); the model runs once on the corrupted inputs of all of them; each then predicts what it hid
  (`loss_from`) from the encoder's tokens and, through a small `Decoder` that cross-attends to the trunk's
  output, from everything else the model knows about the sample (MAE-style).
- **contrastive** (here, for any modality): `cross_modal` — InfoNCE between the modalities of one sample,
  each passed alone through encoder, resampler and trunk; `two_view` — NT-Xent between two views of one
  modality (`Modality.views`: two halves of a patient's events, two tile subsets of a slide, …; two random
  subsets of the encoder's tokens for a modality without views of its own).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from biofm.platform.modality import Tokens
from biofm.platform.model import BiofmModel, Block
from biofm.registry import Registry

PRETEXTS: Registry[Pretext] = Registry("pretext task", plugins="biofm.modalities")


@dataclass
class Encoded:
    """The model's pass over the corrupted inputs: trunk output and mask, and per modality the encoder's
    `Tokens` (with the states of that pass)."""

    trunk: torch.Tensor
    mask: torch.Tensor
    tokens: dict[str, Tokens]


class StepEmbeddings:
    """Each modality's `model.embed` of one step's clean inputs, computed at most once: those of the supervised
    pass are given (`known`), the others made on first use; `computed` holds every one made so far."""

    def __init__(self, model: BiofmModel, inputs: dict[str, dict[str, torch.Tensor]], known: dict | None = None):
        self.model, self.inputs = model, inputs
        self.computed: dict[str, tuple] = dict(known or {})

    def __call__(self, name: str) -> tuple:
        if name not in self.computed:
            self.computed[name] = self.model.embed(name, self.inputs[name])
        return self.computed[name]


class Pretext(nn.Module):
    """A self-supervised task. `weight` scales its loss before balancing."""

    modality: ClassVar[str | None] = None  # the modality a masking pretext corrupts
    masking: ClassVar[bool] = False

    def __init__(self, model: BiofmModel, weight: float = 1.0):
        super().__init__()
        self.weight = float(weight)
        if self.modality is not None and self.modality not in model.modalities:
            raise ValueError(
                f"pretext task '{self.name}' needs the {self.modality} modality; the run has {sorted(model.modalities)}"
            )

    def applies(self, inputs: dict[str, dict[str, torch.Tensor]]) -> bool:
        return self.modality in inputs and bool(inputs[self.modality]["present"].any())

    # masking pretexts
    def corrupt(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """The modality's batch with parts hidden, and what `loss_from` needs to score their prediction."""
        raise NotImplementedError

    def loss_from(self, model: BiofmModel, encoded: Encoded, state: Any) -> torch.Tensor | None:
        raise NotImplementedError

    # other pretexts
    def loss(
        self, model: BiofmModel, inputs: dict[str, dict[str, torch.Tensor]], embeddings: StepEmbeddings
    ) -> torch.Tensor | None:
        """The loss on the clean `inputs`; `embeddings(name)` gives a modality's `model.embed` of them, made
        once per step (the supervised pass's when there was one)."""
        raise NotImplementedError


class MaskingPretext(Pretext):
    masking = True


class Decoder(nn.Module):
    """Queries [B, L, d] (the encoder's tokens at hidden positions, or their positions) cross-attend to the
    trunk's output [B, S, d], then a linear map to `out_dim`: a hidden part is predicted from all the model
    knows about its sample, so the trunk learns from masking pretexts too."""

    def __init__(self, d_model: int, heads: int, out_dim: int):
        super().__init__()
        self.context_norm = nn.LayerNorm(d_model)
        self.block = Block(d_model, heads)
        self.norm = nn.LayerNorm(d_model)
        self.out = nn.Linear(d_model, out_dim)

    def forward(self, queries: torch.Tensor, trunk: torch.Tensor, trunk_mask: torch.Tensor) -> torch.Tensor:
        h = self.block(queries, trunk_mask, context=trunk, context_norm=self.context_norm)
        return self.out(self.norm(h))


def mask_fraction(valid: torch.Tensor, ratio: float) -> torch.Tensor:
    """A random `ratio` of the True entries of `valid` (at least one where any is valid)."""
    chosen = (torch.rand(valid.shape, device=valid.device) < ratio) & valid
    if valid.any() and not chosen.any():
        flat = valid.reshape(-1).nonzero().squeeze(1)
        chosen.view(-1)[flat[torch.randint(len(flat), (1,), device=valid.device)]] = True
    return chosen


def projection(d_model: int, dim: int | None) -> nn.Module:
    return nn.Sequential(nn.Linear(d_model, d_model), nn.GELU(), nn.Linear(d_model, dim or d_model))


@PRETEXTS.register("cross_modal")
class CrossModal(Pretext):
    """InfoNCE (CLIP-style) between modalities of the same sample: each modality alone through its encoder,
    resampler and the trunk → [CLS] → projection; for each pair of modalities, the samples that have both
    are each other's positives and the batch's other samples the negatives. Needs two or more modalities."""

    def __init__(self, model: BiofmModel, weight: float = 1.0, temperature: float = 0.1, dim: int | None = None):
        super().__init__(model, weight)
        if len(model.modalities) < 2:
            raise ValueError(
                f"pretext task 'cross_modal' needs two or more modalities; the run has {sorted(model.modalities)}"
            )
        self.temperature = float(temperature)
        self.project = projection(model.d_model, dim)

    def applies(self, inputs):
        return sum(bool(b["present"].any()) for b in inputs.values()) >= 2

    def loss(self, model, inputs, embeddings):
        names = [n for n, b in inputs.items() if n in model.encoders and bool(b["present"].any())]
        z, present = {}, {}
        for name in names:
            latent, valid, _ = embeddings(name)
            x, _ = model.trunk_over([latent], [valid], read=1)
            z[name] = F.normalize(self.project(x[:, 0]), dim=-1)
            present[name] = inputs[name]["present"].to(torch.bool)
        losses = []
        for a, b in combinations(names, 2):
            both = present[a] & present[b]
            if int(both.sum()) < 2:
                continue
            logits = z[a][both] @ z[b][both].T / self.temperature
            target = torch.arange(len(logits), device=logits.device)
            losses.append(0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)))
        return torch.stack(losses).mean() if losses else None


@PRETEXTS.register("two_view")
class TwoView(Pretext):
    """NT-Xent (SimCLR) between two views of one modality of a sample, each through encoder, resampler and
    trunk alone → [CLS] → projection. Views come from `Modality.views`; a modality without them gets two
    random subsets of its encoder's tokens, each keeping a `keep` fraction. `modalities` limits it to some."""

    def __init__(
        self,
        model: BiofmModel,
        weight: float = 1.0,
        temperature: float = 0.1,
        keep: float = 0.5,
        dim: int | None = None,
        modalities: list[str] | None = None,
    ):
        super().__init__(model, weight)
        unknown = sorted(set(modalities or []) - set(model.modalities))
        if unknown:
            raise ValueError(f"two_view: modalities {unknown} are not in the run ({sorted(model.modalities)})")
        self.temperature, self.keep = float(temperature), float(keep)
        self.modalities = list(modalities) if modalities else None
        self.project = projection(model.d_model, dim)

    def _names(self, inputs):
        return [n for n in (self.modalities or inputs) if n in inputs and int(inputs[n]["present"].sum()) >= 2]

    def applies(self, inputs):
        return bool(self._names(inputs))

    def _cls(self, model, latent, valid):
        x, _ = model.trunk_over([latent], [valid], read=1)
        return F.normalize(self.project(x[:, 0]), dim=-1)

    def loss(self, model, inputs, embeddings):
        losses = []
        for name in self._names(inputs):
            batch = inputs[name]
            present = batch["present"].to(torch.bool)
            views = model.modalities[name].views(batch)
            if views is not None:
                z = [self._cls(model, *model.embed(name, view)[:2]) for view in views]
            else:  # the clean encoder pass, two random token subsets
                tokens = embeddings(name)[2]
                x, mask = tokens.tokens, tokens.mask
                z = []
                for _ in range(2):
                    keep = torch.rand(mask.shape, device=mask.device) < self.keep
                    lost = ~(keep & mask).any(dim=1)
                    keep[lost] = True  # a sample with too few tokens keeps them all
                    z.append(self._cls(model, *model.resample(name, x, mask & keep, present)))
            a, b = z[0][present], z[1][present]
            losses.append(nt_xent(a, b, self.temperature))
        return torch.stack(losses).mean() if losses else None


def nt_xent(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's loss for n pairs of normalised embeddings: each of the 2n finds its partner among 2n - 1."""
    z = torch.cat([a, b])
    n = len(a)
    sim = z @ z.T / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)]).to(z.device)
    return F.cross_entropy(sim, target)


def make_pretexts(model: BiofmModel, config: dict[str, dict] | None) -> nn.ModuleDict:
    """`{name: options}` → the pretext modules, checked against the model's modalities."""
    pretexts = nn.ModuleDict()
    for name, options in (config or {}).items():
        pretexts[name] = PRETEXTS.resolve(name)(model, **(options or {}))
    return pretexts
