"""A chemist's two commands, as chemprop users know them (`train --data-path`, `predict --test-path`):

    biofm mol-train --data-path esol.csv --smiles-column smiles --target-columns logS --out runs/esol
    biofm mol-predict --test-path new.csv --checkpoint runs/esol --preds-path predictions.csv

`mol-train` prepares the CSV as a store (random 80/10/10 split by molecule), trains configs/model/molecule.yaml
with its molecule settings, tests the best epoch and writes the report (`<out>/run/report/report.html`).
`mol-predict` reads SMILES from a CSV and writes one row per molecule with the predictions (a row whose
SMILES cannot be read gets its reason, not a crash). Named `mol-*`: `predict` is Lightning's.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from biofm.commands import add_columns_argument, columns_of, comma_list, command


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-path", required=True, help="CSV (or TSV, parquet, SDF) with SMILES and targets")
    p.add_argument("--smiles-column", default="smiles", help="the column holding the SMILES (default smiles)")
    add_columns_argument(p, "--target-columns", default=None, help="comma-separated (default: every other column)")
    p.add_argument("--task-types", default=None, help="binary,regression,… per target (default: inferred)")
    p.add_argument("--split", default="random", help="random | scaffold | column:NAME")
    p.add_argument("--epochs", type=int, default=40, help="training epochs (the best validation epoch is kept)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="folder for the store, the run, its checkpoints and report")


@command("mol-train", _train_arguments)
def _train(args: argparse.Namespace) -> None:
    """train and test a molecule model from a CSV of SMILES and targets, in one step"""
    from biofm.datasets.molecules import prepare_molecules
    from biofm.platform.lightning import print_metrics
    from biofm.recipes.config import read_config
    from biofm.recipes.runs import fit_and_test

    out = Path(args.out)
    store, rejected = prepare_molecules(
        args.data_path,
        str(out / "molecules.zarr"),
        smiles_column=args.smiles_column,
        label_columns=columns_of(args, "target_columns"),
        task_types=comma_list(args.task_types),
        split=args.split,
        seed=args.seed,
        overwrite=True,
    )
    print(
        store.describe()
        + (f"; {rejected} rows rejected (listed in {out / 'molecules.zarr'}/rejected.csv)" if rejected else "")
    )
    metrics = fit_and_test(
        [store.url],
        out / "run",
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        loggers=False,
        model=read_config("model/molecule.yaml"),
        label="molecules",
    )
    print_metrics(metrics, "test (best validation epoch)")
    print(f"checkpoints: {out / 'run' / 'checkpoints'}; report: {out / 'run' / 'report' / 'report.html'}")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-path", required=True, help="CSV (or TSV, parquet) with a SMILES column")
    p.add_argument("--checkpoint", required=True, help="a .ckpt file or a run directory (its best checkpoint)")
    p.add_argument("--smiles-column", default="smiles", help="the column holding the SMILES (default smiles)")
    p.add_argument("--preds-path", required=True, help="CSV to write (must not exist)")
    p.add_argument("--batch-size", type=int, default=256)


@command("mol-predict", _predict_arguments)
def _predict(args: argparse.Namespace) -> None:
    """predict a CSV of SMILES with a trained checkpoint into a CSV"""
    import biofm
    from biofm.datasets.molecules import read_table

    out = Path(args.preds_path)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another --preds-path")
    frame = read_table(args.test_path, args.smiles_column, "utf-8")
    model = biofm.load(args.checkpoint)
    predictions = model.predict(smiles=frame[args.smiles_column].astype(str).tolist(), batch_size=args.batch_size)
    predictions.insert(0, args.smiles_column, frame[args.smiles_column].to_numpy())
    out.parent.mkdir(parents=True, exist_ok=True)
    predictions.to_csv(out, index=False)
    print(f"{len(predictions)} molecules predicted; written to {out}")
