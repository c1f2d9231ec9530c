"""The molecule encoder: a graph network over atoms and bonds (torch-geometric); atoms → tokens for the trunk."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from biofm.modalities.molecule.featurise import (
    ATOM_CARDINALITIES,
    BOND_CARDINALITIES,
)


def _projected_bond_gine_conv() -> type:
    """PyG's GINEConv whose `message` takes the bond features already through the conv's own `lin`:
    `MoleculeEncoder.forward` projects the bond embedding tables instead of every bond (a bond's features are
    a sum of table rows, so `lin` of it is the sum of projected rows + bias) — a gather from [Σ sizes, d]
    tables in place of an [E, d] × [d, d] matmul per layer and its backward, with the same values and
    parameters. Made on first use (torch-geometric is imported lazily) and kept as this module's
    `ProjectedBondGINEConv`, so models pickle (DDP and loader workers spawn)."""
    if "ProjectedBondGINEConv" not in globals():
        from torch_geometric.nn import GINEConv

        class ProjectedBondGINEConv(GINEConv):
            def message(self, x_j: torch.Tensor, edge_attr: torch.Tensor) -> torch.Tensor:
                return (x_j + edge_attr).relu()

        ProjectedBondGINEConv.__module__, ProjectedBondGINEConv.__qualname__ = __name__, "ProjectedBondGINEConv"
        globals()["ProjectedBondGINEConv"] = ProjectedBondGINEConv
    return globals()["ProjectedBondGINEConv"]


def __getattr__(name: str):  # unpickling a model finds the class by name (PEP 562)
    if name == "ProjectedBondGINEConv":
        return _projected_bond_gine_conv()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _gine_conv(d_model: int) -> nn.Module:
    return _projected_bond_gine_conv()(
        nn.Sequential(nn.Linear(d_model, 2 * d_model), nn.ReLU(), nn.Linear(2 * d_model, d_model)),
        train_eps=True,
        edge_dim=d_model,
    )


def _offsets(cardinalities: list[int]) -> torch.Tensor:
    """Where each column's rows start in the concatenation of its embedding tables."""
    return torch.tensor([0, *cardinalities[:-1]]).cumsum(0)


def _multi_hot(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """[N, columns] rows of a concatenated table → [N, len(table)] with a 1 at each (columns' rows are
    disjoint), so that `_multi_hot(rows, table) @ table` is Σ over columns of each column's row."""
    return table.new_zeros(len(rows), len(table)).scatter_(1, rows, 1.0)


class MoleculeEncoder(nn.Module):
    """Atom and bond embeddings → `layers` × (GINE + norm + residual [+ global attention]) → atom tokens,
    preceded by one token of the summed atom states (which keeps the molecule's size). A batch may carry
    `atom_mask` / `bond_mask` (pretext tasks): those atoms and bonds get a learned mask vector in place of
    their attributes."""

    def __init__(
        self,
        d_model: int,
        layers: int = 4,
        global_attention: bool = False,
        dropout: float = 0.0,
        pe_dim: int = 0,
        heads: int = 4,
        norm: str = "batch",
    ):
        super().__init__()
        if norm not in ("batch", "layer"):
            raise ValueError(f"molecule encoder: norm must be batch or layer, got {norm!r}")
        self.atom_embeddings = nn.ModuleList([nn.Embedding(n, d_model) for n in ATOM_CARDINALITIES])
        self.bond_embeddings = nn.ModuleList([nn.Embedding(n, d_model) for n in BOND_CARDINALITIES])
        self.mass = nn.Linear(1, d_model)
        self.positional = nn.Linear(pe_dim, d_model) if pe_dim else None
        self.register_buffer("atom_offsets", _offsets(ATOM_CARDINALITIES), persistent=False)
        self.register_buffer("bond_offsets", _offsets(BOND_CARDINALITIES), persistent=False)
        self.convs = nn.ModuleList([_gine_conv(d_model) for _ in range(layers)])
        # batch norm's running statistics mix sources whose batches are each one source; layer norm has none
        self.norms = nn.ModuleList(
            [nn.BatchNorm1d(d_model) if norm == "batch" else nn.LayerNorm(d_model) for _ in range(layers)]
        )
        self.attention = (
            nn.ModuleList(
                [nn.MultiheadAttention(d_model, heads, dropout=dropout, batch_first=True) for _ in range(layers)]
            )
            if global_attention
            else None
        )
        self.dropout = nn.Dropout(dropout)
        self.pool = nn.Linear(d_model, d_model)  # no norm: the sum's magnitude carries the molecule's size
        self.mask_atom, self.mask_bond = nn.Parameter(torch.zeros(d_model)), nn.Parameter(torch.zeros(d_model))

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        from torch_geometric.utils import scatter, to_dense_batch

        atoms, bonds = batch["atoms"], batch["bonds"]
        # Σ over columns of each column's embedding, as one multi-hot matmul with the concatenated tables
        # (a third faster than a bag-sum's backward on CPU, which sorts the indices)
        atom_table = torch.cat([emb.weight for emb in self.atom_embeddings])
        h = _multi_hot(atoms + self.atom_offsets, atom_table) @ atom_table + self.mass(batch["mass"][:, None])
        if "atom_mask" in batch:
            h = torch.where(batch["atom_mask"][:, None], self.mask_atom.to(h.dtype), h)
        if self.positional is not None:
            pe = torch.cat([batch[k] for k in ("rwse", "lap") if k in batch], dim=1)
            h = h + self.positional(pe)
        bond_table = torch.cat([emb.weight for emb in self.bond_embeddings])
        bond_hot = _multi_hot(bonds + self.bond_offsets, bond_table)
        bond_mask = batch.get("bond_mask")
        index, size = batch["batch"], len(batch["n_atoms"])
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms)):
            e = bond_hot @ F.linear(bond_table, conv.lin.weight) + conv.lin.bias
            if bond_mask is not None:
                e = torch.where(bond_mask[:, None], conv.lin(self.mask_bond.to(e.dtype)), e)
            update = (
                torch.relu(norm(conv(h, batch["edge_index"], e)))
                if len(h) > 1
                else torch.relu(conv(h, batch["edge_index"], e))
            )
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
