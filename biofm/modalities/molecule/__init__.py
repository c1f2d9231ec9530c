"""Molecular graphs: RDKit featurisation (canonical atom order), GINE message passing with edge features
(torch-geometric), optional global attention between atoms (GPS-style); atom tokens go to the trunk.

RDKit and torch-geometric are imported only when a molecule is featurised or encoded."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from biofm.modalities.molecule.encoder import MoleculeEncoder
from biofm.modalities.molecule.featurise import (
    MAX_ATOMS,
    featurise_smiles,
)
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.store import Column, Ragged


@MODALITIES.register("molecule")
class Molecule(Modality):
    """Featuriser settings (stored with the store): `max_atoms` (larger molecules are rejected),
    `fragments` ("reject" salts and mixtures, keep the "largest" fragment, or "keep" all), `rw_steps` /
    `lap_dim` (positional encodings, 0 = off), `descriptors` (store RDKit descriptors per molecule, the
    targets of the `descriptors` pretext task). Encoder options (model config): `layers`,
    `global_attention`, `dropout`."""

    argument = column = "smiles"

    def __init__(
        self,
        max_atoms: int = MAX_ATOMS,
        fragments: str = "reject",
        rw_steps: int = 0,
        lap_dim: int = 0,
        descriptors: bool = False,
        **settings,
    ):
        if fragments not in ("reject", "largest", "keep"):
            raise ValueError(f"fragments must be reject, largest or keep, got {fragments!r}")
        super().__init__(
            max_atoms=int(max_atoms),
            fragments=fragments,
            rw_steps=int(rw_steps),
            lap_dim=int(lap_dim),
            **({"descriptors": True} if descriptors else {}),
            **settings,
        )

    def featurise_with_reasons(self, raw: Sequence[str | None]) -> tuple[dict[str, Column], list[str | None]]:
        s = self.settings
        arrays, reasons = featurise_smiles(
            raw, s["max_atoms"], s["fragments"], s["rw_steps"], s["lap_dim"], s.get("descriptors", False)
        )
        present = np.array([r is not None and why is None for r, why in zip(raw, reasons)])
        return self.prefixed({**arrays, "present": present}), reasons

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
        return tuple(
            {**batch, "atom_mask": torch.rand(len(batch["atoms"]), device=batch["atoms"].device) < 0.2}
            for _ in range(2)
        )

    def encoder(
        self, d_model: int, layers: int = 4, global_attention: bool = False, dropout: float = 0.0, norm: str = "batch"
    ) -> nn.Module:
        """`norm`: "batch" (GIN's) or "layer" (no running statistics: one model over sources that differ)."""
        return MoleculeEncoder(
            d_model,
            layers,
            global_attention,
            dropout,
            pe_dim=self.settings["rw_steps"] + self.settings["lap_dim"],
            norm=norm,
        )

    @classmethod
    def example_raw(cls, n: int, seed: int = 0) -> list:
        pool = [
            "CCO",
            "c1ccccc1O",
            "CC(=O)Nc1ccc(O)cc1",
            "C[C@H](N)C(=O)O",
            "c1ccncc1",
            "C/C=C/C",
            "O=C(O)CCl",
            "CN1CCC[C@H]1c1cccnc1",
            "C",
            "[NH4+]",
            "c1ccc2[nH]ccc2c1",
            "FC(F)(F)c1ccccc1",
        ]
        rng = np.random.default_rng(seed)
        return [pool[int(rng.integers(len(pool)))] if i % 5 != 4 else None for i in range(n)]


from biofm.modalities.molecule import pretext  # noqa: E402,F401  (registers its pretext tasks)
