"""Molecular graphs: RDKit featurisation (canonical atom order), GINE message passing with edge features
(torch-geometric), optional global attention between atoms (GPS-style); atom tokens go to the trunk.

RDKit and torch-geometric are imported only when a molecule is featurised or encoded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from biofm.modalities.molecule.featurise import ATOM_CARDINALITIES, BOND_CARDINALITIES, featurise_smiles
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column, Ragged


@MODALITIES.register("molecule")
class Molecule(Modality):
    """Featuriser settings (stored with the store): `max_atoms` (larger molecules are rejected),
    `fragments` ("reject" salts and mixtures, keep the "largest" fragment, or "keep" all), `rw_steps` /
    `lap_dim` (positional encodings, 0 = off), `descriptors` (store RDKit descriptors per molecule, the
    targets of the `descriptors` pretext task). Encoder options (model config): `layers`,
    `global_attention`, `dropout`."""

    def __init__(self, max_atoms: int = 150, fragments: str = "reject", rw_steps: int = 0, lap_dim: int = 0,
                 descriptors: bool = False, **settings):
        if fragments not in ("reject", "largest", "keep"):
            raise ValueError(f"fragments must be reject, largest or keep, got {fragments!r}")
        super().__init__(max_atoms=int(max_atoms), fragments=fragments, rw_steps=int(rw_steps),
                         lap_dim=int(lap_dim), **({"descriptors": True} if descriptors else {}), **settings)

    def featurise_with_reasons(self, raw: Sequence[str | None]) -> tuple[dict[str, Column], list[str | None]]:
        s = self.settings
        arrays, reasons = featurise_smiles(raw, s["max_atoms"], s["fragments"], s["rw_steps"], s["lap_dim"],
                                           s.get("descriptors", False))
        out: dict[str, Column] = {f"molecule/{k}": v for k, v in arrays.items()}
        out["molecule/present"] = np.array([r is not None and why is None for r, why in zip(raw, reasons)])
        return out, reasons

    def featurise(self, raw: Sequence[str | None]) -> dict[str, Column]:
        return self.featurise_with_reasons(raw)[0]

    def collate(self, arrays: dict[str, Column]) -> dict[str, torch.Tensor]:
        atoms: Ragged = arrays["atoms"]
        edges: Ragged = arrays["edges"]
        n_atoms, n_edges = atoms.lengths(), edges.lengths()
        shift = np.repeat(atoms.offsets[:-1], n_edges)  # local atom index → index in the batch
        out = {
            "atoms": torch.from_numpy(atoms.values.astype(np.int64)),
            "mass": torch.from_numpy(np.asarray(arrays["mass"].values, dtype=np.float32)),
            "edge_index": torch.from_numpy((edges.values.astype(np.int64) + shift[:, None]).T.copy()),
            "bonds": torch.from_numpy(arrays["bonds"].values.astype(np.int64)),
            "batch": torch.from_numpy(np.repeat(np.arange(len(n_atoms)), n_atoms)),
            "n_atoms": torch.from_numpy(n_atoms),
        }
        for name in ("rwse", "lap"):
            if name in arrays:
                out[name] = torch.from_numpy(np.asarray(arrays[name].values, dtype=np.float32))
        if "descriptors" in arrays:
            out["descriptors"] = torch.from_numpy(np.asarray(arrays["descriptors"], dtype=np.float32))
        return out

    def views(self, batch: dict[str, torch.Tensor]) -> tuple[dict, dict]:
        """Two attribute maskings (GraphCL): in each view a random 20 % of atoms show only the mask vector."""
        return tuple({**batch, "atom_mask": torch.rand(len(batch["atoms"]), device=batch["atoms"].device) < 0.2}
                     for _ in range(2))

    def encoder(self, d_model: int, layers: int = 4, global_attention: bool = False,
                dropout: float = 0.0) -> nn.Module:
        return MoleculeEncoder(d_model, layers, global_attention, dropout,
                               pe_dim=self.settings["rw_steps"] + self.settings["lap_dim"])


class MoleculeEncoder(nn.Module):
    """Atom and bond embeddings → `layers` × (GINE + norm + residual [+ global attention]) → atom tokens,
    preceded by one token of the summed atom states (which keeps the molecule's size). A batch may carry
    `atom_mask` / `bond_mask` (pretext tasks): those atoms and bonds get a learned mask vector in place of
    their attributes."""

    def __init__(self, d_model: int, layers: int = 4, global_attention: bool = False, dropout: float = 0.0,
                 pe_dim: int = 0, heads: int = 4):
        super().__init__()
        from torch_geometric.nn import GINEConv
        self.atom_embeddings = nn.ModuleList([nn.Embedding(n, d_model) for n in ATOM_CARDINALITIES])
        self.bond_embeddings = nn.ModuleList([nn.Embedding(n, d_model) for n in BOND_CARDINALITIES])
        self.mass = nn.Linear(1, d_model)
        self.positional = nn.Linear(pe_dim, d_model) if pe_dim else None
        self.convs = nn.ModuleList([
            GINEConv(nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model)),
                     train_eps=True, edge_dim=d_model) for _ in range(layers)])
        self.norms = nn.ModuleList([nn.BatchNorm1d(d_model) for _ in range(layers)])
        self.attention = nn.ModuleList([nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True)
                                        for _ in range(layers)]) if global_attention else None
        self.dropout = nn.Dropout(dropout)
        self.pool = nn.Linear(d_model, d_model)  # no norm: the sum's magnitude carries the molecule's size
        self.mask_atom, self.mask_bond = nn.Parameter(torch.zeros(d_model)), nn.Parameter(torch.zeros(d_model))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from torch_geometric.utils import scatter, to_dense_batch
        atoms, bonds = batch["atoms"], batch["bonds"]
        h = sum(emb(atoms[:, i]) for i, emb in enumerate(self.atom_embeddings)) + self.mass(batch["mass"][:, None])
        if "atom_mask" in batch:
            h = torch.where(batch["atom_mask"][:, None], self.mask_atom.to(h.dtype), h)
        if self.positional is not None:
            pe = torch.cat([batch[k] for k in ("rwse", "lap") if k in batch], dim=1)
            h = h + self.positional(pe)
        e = sum(emb(bonds[:, i]) for i, emb in enumerate(self.bond_embeddings))
        if "bond_mask" in batch:
            e = torch.where(batch["bond_mask"][:, None], self.mask_bond.to(e.dtype), e)
        index, size = batch["batch"], len(batch["n_atoms"])
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            update = torch.relu(norm(conv(h, batch["edge_index"], e))) if len(h) > 1 else \
                torch.relu(conv(h, batch["edge_index"], e))
            h = h + self.dropout(update)
            if self.attention is not None:  # every atom attends to every atom of its molecule
                dense, mask = to_dense_batch(h, index, batch_size=size)
                attended, _ = self.attention[i](dense, dense, dense, key_padding_mask=~mask, need_weights=False)
                h = h + self.dropout(torch.nan_to_num(attended)[mask])
        tokens, mask = to_dense_batch(h, index, batch_size=size)  # [B, max atoms, d]
        pooled = self.pool(0.1 * scatter(h, index, dim=0, dim_size=size, reduce="sum"))[:, None]
        x = torch.cat([pooled, tokens], dim=1)
        mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return x, mask


from biofm.modalities.molecule import pretext  # noqa: E402,F401  (registers its pretext tasks)
