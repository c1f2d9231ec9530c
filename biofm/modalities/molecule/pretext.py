"""Molecule pretext tasks: masked atom and bond attributes (Hu et al. 2020), and descriptor regression (MTR)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biofm.modalities.molecule.featurise import (
    ATOM_CARDINALITIES,
    BOND_CARDINALITIES,
    DESCRIPTORS,
)
from biofm.platform.pretext import PRETEXTS, Decoder, MaskingPretext, mask_fraction


def _attribute_loss(logits: torch.Tensor, targets: torch.Tensor, cardinalities) -> torch.Tensor:
    """Mean cross-entropy over the categorical attributes (logits of all of them side by side)."""
    parts = torch.split(logits, list(cardinalities), dim=1)
    return torch.stack([F.cross_entropy(part.float(), targets[:, i]) for i, part in enumerate(parts)]).mean()


@PRETEXTS.register("masked_atoms")
class MaskedAtoms(MaskingPretext):
    """A random `ratio` of atoms show the encoder a mask vector instead of their attributes (element,
    charge, degree, …, mass); each attribute is predicted from the atom's token and the trunk."""

    modality = "molecule"

    def __init__(self, model, weight: float = 1.0, ratio: float = 0.15):
        super().__init__(model, weight)
        self.ratio = float(ratio)
        self.decoder = Decoder(model.d_model, model.n_heads, sum(ATOM_CARDINALITIES))

    def corrupt(self, batch):
        atoms = batch["atoms"]
        chosen = mask_fraction(torch.ones(len(atoms), dtype=torch.bool, device=atoms.device), self.ratio)
        return {**batch, "atom_mask": chosen}, (chosen, atoms)

    def loss_from(self, model, encoded, state):
        chosen, atoms = state
        if not chosen.any():
            return None
        tokens, mask = encoded.tokens[self.modality]  # [B, 1 + atoms, d]: the pooled token, then the atoms
        logits = self.decoder(tokens, encoded.trunk, encoded.mask)[:, 1:][mask[:, 1:]]  # atoms in batch order
        return _attribute_loss(logits[chosen], atoms[chosen], ATOM_CARDINALITIES)


@PRETEXTS.register("masked_bonds")
class MaskedBonds(MaskingPretext):
    """A random `ratio` of bonds (both directions of each) show a mask vector instead of their attributes
    (type, stereo, conjugation, ring); each is predicted from its two atoms' states."""

    modality = "molecule"

    def __init__(self, model, weight: float = 1.0, ratio: float = 0.15):
        super().__init__(model, weight)
        self.ratio = float(ratio)
        self.decoder = Decoder(model.d_model, model.n_heads, model.d_model)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(model.d_model, sum(BOND_CARDINALITIES)))

    def corrupt(self, batch):
        edges = batch["edge_index"]
        if edges.shape[1] == 0:
            return batch, None
        n = int(batch["atoms"].shape[0])
        keys = torch.minimum(edges[0], edges[1]) * n + torch.maximum(edges[0], edges[1])
        unique, inverse = torch.unique(keys, return_inverse=True)
        bonds = mask_fraction(torch.ones(len(unique), dtype=torch.bool, device=edges.device), self.ratio)
        chosen = bonds[inverse]  # both directions of a chosen bond
        return {**batch, "bond_mask": chosen}, (chosen, batch["bonds"], edges)

    def loss_from(self, model, encoded, state):
        if state is None:
            return None
        chosen, bonds, edges = state
        tokens, mask = encoded.tokens[self.modality]
        atoms = self.decoder(tokens, encoded.trunk, encoded.mask)[:, 1:][mask[:, 1:]]
        pair = atoms[edges[0, chosen]] + atoms[edges[1, chosen]]
        return _attribute_loss(self.head(pair), bonds[chosen], BOND_CARDINALITIES)


@PRETEXTS.register("descriptors")
class Descriptors(MaskingPretext):
    """Molecular descriptors computed by RDKit from the structure (logP, molar refractivity, TPSA, H-bond
    donors and acceptors, rotatable bonds, rings, …; `featurise.DESCRIPTORS`), regressed from the trunk's
    [CLS] output — multi-task regression pretraining as ChemBERTa-2's MTR. Needs stores prepared with
    `--descriptors`. Targets are standardised by the mean and standard deviation of every training molecule
    seen so far (running sums kept in the checkpoint): standardised over the batch, as it was, a molecule's
    target depended on its batch's source (a batch is one source), and one model over several sources
    was asked for conflicting values. It hides nothing itself and reads the pass it shares with the masking
    tasks."""

    modality = "molecule"

    def __init__(self, model, weight: float = 1.0):
        super().__init__(model, weight)
        if not model.modalities[self.modality].settings.get("descriptors"):
            raise ValueError("pretext task 'descriptors' needs molecule stores prepared with --descriptors")
        self.head = nn.Sequential(
            nn.Linear(model.d_model, model.d_model), nn.GELU(), nn.Linear(model.d_model, len(DESCRIPTORS))
        )
        n = len(DESCRIPTORS)  # running count, mean and sum of squared deviations (Chan et al.'s merge)
        self.register_buffer("seen", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(n))
        self.register_buffer("m2", torch.zeros(n))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("seen", "mean", "m2"):  # checkpoints from before the running statistics: start afresh
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone().zero_())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def _observe(self, values: torch.Tensor) -> None:
        """Merges one batch's count, mean and squared deviations into the running ones."""
        values = values.float()
        count = float(len(values))
        mean = values.mean(dim=0)
        total = self.seen + count
        delta = mean - self.mean
        self.m2 += ((values - mean) ** 2).sum(dim=0) + delta**2 * self.seen * count / total
        self.mean += delta * count / total
        self.seen.copy_(total)

    def corrupt(self, batch):
        return batch, (batch["descriptors"], batch["present"].to(torch.bool))

    def loss_from(self, model, encoded, state):
        values, present = state
        if int(present.sum()) < 2:
            return None
        target = self.targets(values[present])
        return F.mse_loss(self.head(encoded.trunk[present, 0]).float(), target)

    def targets(self, values: torch.Tensor) -> torch.Tensor:
        """`values` [N, descriptors] standardised by the running statistics (a training batch joins them
        first); before any training batch, by the batch's own."""
        values = values.float()
        if self.training:
            self._observe(values)
        if self.seen >= 2:
            mean, std = self.mean, (self.m2 / (self.seen - 1)).sqrt()
        else:
            mean, std = values.mean(dim=0), values.std(dim=0)
        return (values - mean) / std.clamp_min(1e-3)
