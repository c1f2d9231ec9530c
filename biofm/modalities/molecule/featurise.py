"""SMILES → canonical molecular graphs as compact integer arrays (RDKit).

Atoms are put in RDKit's canonical order, so one molecule gives the same graph whatever SMILES wrote it.
Features are small integer codes (embedded by the encoder) plus the atomic mass:

    atom columns: element, degree, formal charge, chirality, hybridisation, aromatic, hydrogens, in ring
    bond columns: type, conjugated, in ring, stereo

Optional positional encodings per atom: random-walk return probabilities (`rw_steps`) and Laplacian
eigenvectors (`lap_dim`), both as in GraphGPS. Optional RDKit descriptors per molecule (`descriptors`):
targets of the `descriptors` pretext task, never inputs of the encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# element code: the common elements of drug-like and QM sets get their own code, the rest share one
MAX_ATOMS = 150  # heavy atoms: a larger molecule is rejected (the featuriser's one default)
ELEMENTS = [1, 5, 6, 7, 8, 9, 11, 12, 14, 15, 16, 17, 19, 20, 26, 29, 30, 33, 34, 35, 50, 53]
ELEMENT_CODE = np.full(128, len(ELEMENTS) + 1, dtype=np.int8)
ELEMENT_CODE[ELEMENTS] = np.arange(1, len(ELEMENTS) + 1)
ATOM_CARDINALITIES = [len(ELEMENTS) + 2, 7, 7, 4, 8, 2, 5, 2]  # embedding sizes per atom column
BOND_CARDINALITIES = [5, 2, 2, 6]


# whole-molecule descriptors computed from the structure (self-supervised regression targets)
DESCRIPTORS = [
    "MolLogP",
    "MolMR",
    "TPSA",
    "NumHDonors",
    "NumHAcceptors",
    "NumRotatableBonds",
    "RingCount",
    "NumAromaticRings",
    "FractionCSP3",
    "LabuteASA",
    "HeavyAtomCount",
    "NumHeteroatoms",
]


def descriptor_row(mol) -> list[float]:
    from rdkit.Chem import Descriptors

    return [float(getattr(Descriptors, name)(mol)) for name in DESCRIPTORS]


class MoleculeError(ValueError):
    """A SMILES that cannot become a graph; the message is the reason written to the rejects file."""


_QUIET = False


def _quiet_rdkit() -> None:
    """RDKit's own messages for bad SMILES off, once: the reason goes to the rejects file instead."""
    global _QUIET
    if not _QUIET:
        from rdkit import RDLogger

        RDLogger.DisableLog("rdApp.*")
        _QUIET = True


def parse(smiles: str, max_atoms: int = MAX_ATOMS, fragments: str = "reject"):
    """A sanitised RDKit molecule, or MoleculeError with the reason."""
    from rdkit import Chem

    _quiet_rdkit()
    if smiles is None or (isinstance(smiles, float) and np.isnan(smiles)) or not str(smiles).strip():
        raise MoleculeError("empty SMILES")
    mol = Chem.MolFromSmiles(str(smiles).strip())
    if mol is None:
        raise MoleculeError("invalid SMILES (RDKit cannot parse or sanitise it)")
    if mol.GetNumAtoms() == 0:
        raise MoleculeError("empty molecule")
    n_fragments = len(Chem.GetMolFrags(mol)) if "." in str(smiles) else 1
    if n_fragments > 1:
        if fragments == "reject":
            raise MoleculeError(
                f"{n_fragments} fragments (a salt or mixture); prepare with --fragments "
                "largest to keep the largest one, or keep to keep all"
            )
        if fragments == "largest":
            from rdkit.Chem.MolStandardize import rdMolStandardize

            mol = rdMolStandardize.LargestFragmentChooser().choose(mol)
    if mol.GetNumAtoms() > max_atoms:
        raise MoleculeError(f"{mol.GetNumAtoms()} heavy atoms, over the limit of {max_atoms} (--max-atoms)")
    return mol


_CIP = {"R": 1, "S": 2}
_MASS: np.ndarray | None = None


def atomic_masses() -> np.ndarray:
    """Standard atomic weight by atomic number (isotopes are rare in these sets and ignored)."""
    global _MASS
    if _MASS is None:
        from rdkit import Chem

        table = Chem.GetPeriodicTable()
        _MASS = np.array([table.GetAtomicWeight(z) for z in range(119)], dtype=np.float64)
    return _MASS


class GraphColumns:
    """Raw per-atom and per-bond values of a batch of molecules, column by column, and the canonical rank of
    each atom. Each value is one RDKit getter mapped over a molecule's atoms or bonds (a Python loop calling
    eight getters per atom costs about twice as much). Chirality is 0 none, 1 R, 2 S, 3 chiral but
    unassigned: CIP labels do not depend on atom order (CW/CCW tags do)."""

    def __init__(self):
        from rdkit import Chem

        atom, bond = Chem.Atom, Chem.Bond
        self.rank_atoms = Chem.CanonicalRankAtoms
        self.atom_getters = (
            atom.GetAtomicNum,
            atom.GetTotalDegree,
            atom.GetFormalCharge,
            atom.GetHybridization,
            atom.GetIsAromatic,
            atom.GetTotalNumHs,
            atom.IsInRing,
        )
        self.bond_getters = (
            bond.GetBeginAtomIdx,
            bond.GetEndAtomIdx,
            bond.GetBondTypeAsDouble,
            bond.GetIsConjugated,
            bond.IsInRing,
            bond.GetStereo,
        )
        self.atoms: list[list] = [[] for _ in self.atom_getters]
        self.bonds: list[list] = [[] for _ in self.bond_getters]
        self.chirality: list[int] = []
        self.ranks: list[int] = []

    def add(self, mol, smiles: str) -> tuple[int, int]:
        """Appends one molecule parsed from `smiles`; returns its numbers of atoms and bonds."""
        n, n_bonds = mol.GetNumAtoms(), mol.GetNumBonds()
        atoms = list(map(mol.GetAtomWithIdx, range(n)))  # by index: RDKit's GetAtoms() iterates in Python
        for column, get in zip(self.atoms, self.atom_getters):
            column += map(get, atoms)
        bonds = list(map(mol.GetBondWithIdx, range(n_bonds)))
        for column, get in zip(self.bonds, self.bond_getters):
            column += map(get, bonds)
        if "@" in smiles or "|" in smiles:  # chiral tags come only from an @ or from CXSMILES (3D coordinates)
            self.chirality += [
                (_CIP.get(a.GetProp("_CIPCode"), 3) if a.HasProp("_CIPCode") else 3) if a.GetChiralTag() else 0
                for a in atoms
            ]
        else:
            self.chirality += [0] * n
        rank = self.rank_atoms(mol, breakTies=True)
        self.ranks += map(rank.__getitem__, range(n))  # iterating RDKit's vector itself runs in Python
        return n, n_bonds


def encode_rows(columns: GraphColumns, atom_counts: np.ndarray, bond_counts: np.ndarray) -> dict[str, np.ndarray]:
    """Vectorised over a whole batch: feature codes, canonical atom order, both edge directions sorted.
    Returns flat arrays; `atom_counts` and `edge_counts` give the rows of each molecule."""
    n_mol = len(atom_counts)
    ints = np.array(columns.atoms[:3] + [columns.chirality] + columns.atoms[3:], dtype=np.int64).reshape(8, -1).T
    codes = np.empty((len(ints), 8), dtype=np.int8)
    codes[:, 0] = ELEMENT_CODE[np.clip(ints[:, 0], 0, 127)]
    lo = np.array([0, -3, 0, 0, 0, 0, 0])
    hi = np.array([6, 3, 3, 7, 1, 4, 1])
    codes[:, 1:] = np.clip(ints[:, 1:], lo, hi) - np.array([0, -3, 0, 0, 0, 0, 0])
    mass = (atomic_masses()[np.clip(ints[:, 0], 0, 118)] / 100.0).astype(np.float32)
    atom_offset = np.concatenate([[0], np.cumsum(atom_counts)[:-1]])
    rank = np.array(columns.ranks, dtype=np.int64)
    position = rank + np.repeat(atom_offset, atom_counts)  # where each atom goes
    atoms = np.empty_like(codes)
    atoms[position] = codes
    masses = np.empty_like(mass)
    masses[position] = mass
    raw_bonds = np.array(columns.bonds, dtype=np.float64).reshape(6, -1).T
    b = raw_bonds.astype(np.int64)
    order_code = np.select(
        [raw_bonds[:, 2] == 1.0, raw_bonds[:, 2] == 2.0, raw_bonds[:, 2] == 3.0, raw_bonds[:, 2] == 1.5],
        [0, 1, 2, 3],
        default=4,
    )
    bond_codes = np.stack([order_code, b[:, 3], b[:, 4], np.clip(b[:, 5], 0, 5)], axis=1).astype(np.int8)
    bond_offset = np.repeat(atom_offset, bond_counts)
    begin = rank[b[:, 0] + bond_offset]  # canonical local indices
    end = rank[b[:, 1] + bond_offset]
    molecule = np.repeat(np.arange(n_mol), bond_counts)
    src, dst = np.concatenate([begin, end]), np.concatenate([end, begin])
    mol2 = np.concatenate([molecule, molecule])
    order = np.lexsort((dst, src, mol2))
    edges = np.stack([src[order], dst[order]], axis=1).astype(np.int32)
    return {
        "atoms": atoms,
        "mass": masses,
        "edges": edges,
        "bonds": np.concatenate([bond_codes, bond_codes])[order],
        "edge_counts": 2 * bond_counts,
    }


def random_walk_encoding(n: int, edges: np.ndarray, steps: int) -> np.ndarray:
    """[n, steps]: probability that a random walk from each atom is back after 1..steps steps."""
    adjacency = np.zeros((n, n), dtype=np.float64)
    adjacency[edges[:, 0], edges[:, 1]] = 1.0
    degree = adjacency.sum(axis=1, keepdims=True)
    walk = np.divide(adjacency, degree, out=np.zeros_like(adjacency), where=degree > 0)
    out, power = np.empty((n, steps), dtype=np.float32), np.eye(n)
    for k in range(steps):
        power = power @ walk
        out[:, k] = np.diag(power)
    return out


def laplacian_encoding(n: int, edges: np.ndarray, dim: int) -> np.ndarray:
    """[n, dim]: eigenvectors of the normalised Laplacian with the smallest non-zero eigenvalues, each
    with its sign fixed (largest-magnitude entry positive) so the encoding is deterministic."""
    out = np.zeros((n, dim), dtype=np.float32)
    if n < 2:
        return out
    adjacency = np.zeros((n, n), dtype=np.float64)
    adjacency[edges[:, 0], edges[:, 1]] = 1.0
    degree = adjacency.sum(axis=1)
    inv_sqrt = np.where(degree > 0, 1.0 / np.sqrt(np.maximum(degree, 1e-12)), 0.0)
    laplacian = np.eye(n) - inv_sqrt[:, None] * adjacency * inv_sqrt[None, :]
    values, vectors = np.linalg.eigh(laplacian)
    vectors = vectors[:, 1 : dim + 1]
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(vectors.shape[1])])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    out[:, : vectors.shape[1]] = vectors
    return out


def featurise_smiles(
    smiles: Sequence[str | None],
    max_atoms: int = MAX_ATOMS,
    fragments: str = "reject",
    rw_steps: int = 0,
    lap_dim: int = 0,
    descriptors: bool = False,
) -> tuple[dict, list[str | None]]:
    """Graphs of a batch as ragged store arrays (a rejected or missing SMILES gives zero rows), and the
    rejection reason of each input (None where it was accepted or missing)."""
    from biofm.platform.store import Ragged

    columns, atom_counts, bond_counts, reasons = GraphColumns(), [], [], []
    described = np.zeros((len(smiles), len(DESCRIPTORS)), np.float32) if descriptors else None
    for i, s in enumerate(smiles):
        reason, n_atoms, n_bonds = None, 0, 0
        if s is not None:
            try:
                mol = parse(s, max_atoms, fragments)
                n_atoms, n_bonds = columns.add(mol, str(s))
                if described is not None:
                    described[i] = np.nan_to_num(descriptor_row(mol), nan=0.0, posinf=0.0, neginf=0.0)
            except MoleculeError as err:
                reason = str(err)
        reasons.append(reason)
        atom_counts.append(n_atoms)
        bond_counts.append(n_bonds)
    atom_counts, bond_counts = np.array(atom_counts, np.int64), np.array(bond_counts, np.int64)
    flat = encode_rows(columns, atom_counts, bond_counts)
    atom_offsets = np.concatenate([[0], np.cumsum(atom_counts)]).astype(np.int64)
    edge_offsets = np.concatenate([[0], np.cumsum(flat["edge_counts"])]).astype(np.int64)
    arrays = {
        "atoms": Ragged(flat["atoms"], atom_offsets),
        "mass": Ragged(flat["mass"], atom_offsets),
        "edges": Ragged(flat["edges"], edge_offsets),
        "bonds": Ragged(flat["bonds"], edge_offsets),
    }
    for name, dim, fn in (("rwse", rw_steps, random_walk_encoding), ("lap", lap_dim, laplacian_encoding)):
        if dim:
            rows = [
                fn(int(atom_counts[i]), flat["edges"][edge_offsets[i] : edge_offsets[i + 1]], dim)
                for i in range(len(atom_counts))
            ]
            arrays[name] = Ragged(np.concatenate(rows) if rows else np.zeros((0, dim), np.float32), atom_offsets)
    if described is not None:
        arrays["descriptors"] = described
    return arrays, reasons
