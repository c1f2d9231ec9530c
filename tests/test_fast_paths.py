"""The shortcuts taken for training speed (#20) compute what the plain formulation computes: the molecule
encoder's projected bond tables, the resampler's keys and values of valid tokens only, and the trunk's last
block computing only the tokens that are read. Each is compared, values and gradients, with the plain
formulation written out here."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip(
    "torch_geometric",
    reason="torch-geometric is not installed: the molecule encoder needs it (pip install -e '.[molecules]')",
)
pytest.importorskip(
    "rdkit", reason="RDKit is not installed: molecules are featurised with it (pip install -e '.[molecules]')"
)

from biofm.platform.modality import MODALITIES  # noqa: E402
from biofm.platform.model import BiofmModel, Block, TrunkConfig  # noqa: E402

SMILES = ["CCO", "c1ccccc1O", "CC(=O)Nc1ccc(O)cc1", "C", "CN1CCC[C@H]1c1cccnc1", "FC(F)(F)c1ccccc1"]


def _molecules(**settings):
    """The molecule modality and a batch of SMILES, in float64 (compared in float64: exact up to rounding)."""
    modality = MODALITIES.resolve("molecule")(**settings)
    batch = modality.inputs_of(modality.featurise(SMILES))
    return modality, {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _plain_molecule_encoder(encoder, batch):
    """MoleculeEncoder.forward as first written: per-column embeddings summed, and each layer's stock
    GINEConv applying its `lin` to every bond's summed embedding."""
    from torch_geometric.nn import GINEConv
    from torch_geometric.utils import scatter, to_dense_batch

    atoms, bonds = batch["atoms"], batch["bonds"]
    h = sum(emb(atoms[:, i]) for i, emb in enumerate(encoder.atom_embeddings)) + encoder.mass(batch["mass"][:, None])
    if "atom_mask" in batch:
        h = torch.where(batch["atom_mask"][:, None], encoder.mask_atom, h)
    if encoder.positional is not None:
        h = h + encoder.positional(torch.cat([batch[k] for k in ("rwse", "lap") if k in batch], dim=1))
    e = sum(emb(bonds[:, i]) for i, emb in enumerate(encoder.bond_embeddings))
    if "bond_mask" in batch:
        e = torch.where(batch["bond_mask"][:, None], encoder.mask_bond, e)
    for conv, norm in zip(encoder.convs, encoder.norms):
        plain = GINEConv(torch.nn.Linear(e.shape[1], e.shape[1]), train_eps=True, edge_dim=e.shape[1])
        plain.nn, plain.eps, plain.lin = conv.nn, conv.eps, conv.lin  # the same parameters, shared
        h = h + torch.relu(norm(plain(h, batch["edge_index"], e)))
    index, size = batch["batch"], len(batch["n_atoms"])
    tokens, mask = to_dense_batch(h, index, batch_size=size)
    pooled = encoder.pool(0.1 * scatter(h, index, dim=0, dim_size=size, reduce="sum"))[:, None]
    return torch.cat([pooled, tokens], dim=1), torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)


def _values_and_gradients(module, compute):
    module.zero_grad(set_to_none=True)
    out = compute()
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), grads


def _assert_same(fast, plain):
    (a, grads_a), (b, grads_b) = fast, plain
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-10, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("masked", [False, True], ids=["clean", "masked atoms and bonds"])
def test_projected_bond_tables_give_the_plain_gine_encoder(masked):
    torch.manual_seed(0)
    modality, batch = _molecules(rw_steps=4, lap_dim=2)
    encoder = modality.encoder(32, layers=3).double().train()
    if masked:
        batch = {
            **batch,
            "atom_mask": torch.rand(len(batch["atoms"])) < 0.3,
            "bond_mask": torch.rand(len(batch["bonds"])) < 0.3,
        }
    _assert_same(
        _values_and_gradients(encoder, lambda: encoder(batch)[0]),
        _values_and_gradients(encoder, lambda: _plain_molecule_encoder(encoder, batch)[0]),
    )
    # the parameters are the stock GINEConv's: checkpoints of either load into the other
    from torch_geometric.nn import GINEConv

    stock = GINEConv(
        torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32)),
        train_eps=True,
        edge_dim=32,
    )
    assert set(stock.state_dict()) == set(encoder.convs[0].state_dict())


@pytest.mark.parametrize("shared", [False, True], ids=["own queries", "one query set expanded (latents)"])
def test_resampler_keys_of_valid_tokens_only_give_the_dense_attention(shared):
    torch.manual_seed(0)
    block, context_norm = Block(16, 4).double(), torch.nn.LayerNorm(16).double()
    x, context = torch.randn(3, 5, 16, dtype=torch.float64), torch.randn(3, 7, 16, dtype=torch.float64)
    if shared:  # queries projected once for the batch
        latents = torch.nn.Parameter(torch.randn(5, 16, dtype=torch.float64))
        block.latents = latents  # counted among the block's parameters: its gradient is compared too
        x = latents.expand(3, -1, -1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    context[~mask] = 1e3  # padding: whatever it holds must not matter

    def plain():
        x_ = x.contiguous() if shared else x  # a plain tensor per sample
        h = block.norm1(x_)
        y = x_ + block.attn(h, context_norm(context), mask)
        return y + block.mlp(block.norm2(y))

    modules = torch.nn.ModuleList([block, context_norm])
    _assert_same(
        _values_and_gradients(modules, lambda: block(x, mask, context=context, context_norm=context_norm)),
        _values_and_gradients(modules, plain),
    )


def test_the_last_trunk_block_computing_only_the_read_tokens_gives_the_full_trunk():
    torch.manual_seed(0)
    modality, batch = _molecules()
    schema = {
        "modalities": {"molecule": modality.config()},
        "tasks": {"a": {"kind": "regression"}, "b": {"kind": "binary"}},
    }
    model = BiofmModel(schema, TrunkConfig(d_model=32, depth=3, heads=4, latents=4, dropout=0.0)).double().train()
    inputs = {"molecule": batch}

    def full():
        x, _, _ = model.encode(inputs)  # every token through every block
        return torch.cat([model.heads[t](x[:, 1 + i]) for i, t in enumerate(model.queries)], dim=1)

    def fast():
        return torch.cat(list(model(inputs)["logits"].values()), dim=1)

    _assert_same(_values_and_gradients(model, fast), _values_and_gradients(model, full))
    x, _, _ = model.encode(inputs, read=3)
    assert x.shape[:2] == (len(SMILES), 3)


def test_the_fast_paths_run_under_bf16_autocast():
    """`precision: bf16-mixed` (CPU or GPU): the packed keys and values take autocast's dtype."""
    torch.manual_seed(0)
    modality, batch = _molecules()
    batch = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    schema = {"modalities": {"molecule": modality.config()}, "tasks": {"a": {"kind": "regression"}}}
    model = BiofmModel(schema, TrunkConfig(d_model=32, depth=2, heads=4, latents=4, dropout=0.0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"molecule": batch})["logits"]["a"]
    plain = model({"molecule": batch})["logits"]["a"]
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), plain, rtol=0.05, atol=0.05)
