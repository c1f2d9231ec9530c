"""biofm against chemprop 2.3.1 side by side: the same grouped random splits, machine, torch and Lightning
(issue #20, item 2).

    make bench-env        # .venv-bench: biofm + chemprop (the `bench` extra), see below
    .venv-bench/bin/python benchmarks/vs_chemprop.py [--datasets esol,freesolv,tox21] [--seeds 3]

For each data set (../shared/data/mol: ESOL, FreeSolv, Tox21) and seed, one split is drawn and both
systems train and test on it:
- splits: grouped random 80/10/10 by molecule — the rows of one canonical molecular graph (the graph biofm
  featurises; duplicates and different SMILES of one molecule) are one group and go to one split together.
  biofm refuses a split that puts one molecule on two sides (its subject is the canonical graph), so the
  split is made this way for both. Rows RDKit cannot read are left out of both.
- biofm: `biofm fit -c configs/molecules/<name>.yaml` as it runs (configs/model/molecule.yaml, the data
  piece's batch size, configs/trainer/molecules.yaml's epochs; best epoch by validation macro score, the
  best checkpoint tested), here from Python on a store prepared with that split.
- chemprop: `chemprop train`'s defaults from its Python API (D-MPNN, hidden 300, depth 3, norm
  aggregation, one FFN layer, 50 epochs, batch 64, Noam-like schedule 1e-4 → 1e-3 → 1e-4, targets
  standardised; best epoch by validation loss, the best checkpoint tested), no workers, like biofm.
Figures per arm: test RMSE (ESOL, FreeSolv) or mean AUROC over tasks (Tox21); training molecules/s
(training molecules × epochs / fit wall time, validation and checkpointing included — what a user waits
for), the same over training batches only, wall time to the end of the best validation epoch, and
inference molecules/s from SMILES (featurisation included) over the data set's SMILES repeated to
≥ 5,000. At equal wall-time budget: the slower arm is trained again with its epochs cut to fit the faster
arm's fit time (its schedule then completes within the budget) and tested.

Ratios are biofm / chemprop (speed: > 1 is faster; RMSE: < 1 is better; AUROC: > 1 is better); printed
per data set as mean ± sd over seeds, last line JSON.

Why a separate environment: chemprop needs cuik-molmaker-pin, a C++ featuriser built against one RDKit
(2026.03.x), while biofm pins RDKit 2026.9.1; `make bench-env` installs biofm and chemprop with every other
pin of constraints.txt (torch, Lightning, numpy, …) and RDKit 2026.03.6, and both arms run in it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.recipes.config import read_config  # noqa: E402
from biofm.testing import SHARED_DATA  # noqa: E402

DATASETS = {  # file, label columns, metric
    "esol": ("esol.csv", ["logp"], "rmse"),
    "freesolv": ("freesolv.csv", ["freesolv"], "rmse"),
    "tox21": ("tox21.csv", None, "auroc"),
}
INFERENCE_MOLECULES = 5000


class Clock:
    """Fit wall time, training-batch time, molecules trained, and each validation epoch's end and score
    (a Lightning callback, built by `clock()`)."""

    def __init__(self, monitor: str):
        self.monitor, self.start, self.train_seconds, self.samples = monitor, None, 0.0, 0
        self.epochs: list[tuple[float, float]] = []  # (seconds since the fit's start, monitored value)

    def on_train_start(self, trainer, module):
        self.start = time.perf_counter()

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self._batch = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.train_seconds += time.perf_counter() - self._batch
        self.samples += _batch_size(batch)

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.monitor)
        self.epochs.append((time.perf_counter() - self.start, float(value) if value is not None else math.nan))

    def on_train_end(self, trainer, module):
        self.seconds = time.perf_counter() - self.start

    def summary(self, mode: str) -> dict:
        scores = np.array([v for _, v in self.epochs], dtype=float)
        best = (np.nanargmax if mode == "max" else np.nanargmin)(scores) if np.isfinite(scores).any() else None
        return {
            "fit_seconds": round(self.seconds, 2),
            "train_per_s": round(self.samples / self.seconds, 1),
            "train_batches_per_s": round(self.samples / self.train_seconds, 1),
            "best_epoch": None if best is None else int(best) + 1,
            "seconds_to_best": None if best is None else round(self.epochs[best][0], 2),
            "epochs": len(self.epochs),
        }


def clock(monitor: str):
    from lightning.pytorch import Callback

    return type("LightningClock", (Clock, Callback), {})(monitor)


def _batch_size(batch) -> int:
    if isinstance(batch, dict):  # biofm
        return len(batch["row"])
    return len(batch.Y if hasattr(batch, "Y") else batch[0])  # chemprop's TrainingBatch


def grouped_split(frame: pd.DataFrame, seed: int) -> np.ndarray:
    """train / val / test per row, 80/10/10 by molecule, the rows of one biofm graph in one split; None for
    rows that cannot be featurised."""
    import hashlib

    from biofm.modalities.molecule.featurise import featurise_smiles

    arrays, reasons = featurise_smiles(list(frame["smiles"]), fragments="keep")
    keys = np.array(
        [
            None
            if why
            else hashlib.sha1(b"|".join(arrays[k].row(i).tobytes() for k in ("atoms", "edges", "bonds"))).hexdigest()
            for i, why in enumerate(reasons)
        ],
        dtype=object,
    )
    groups = pd.unique(keys[keys != None])  # noqa: E711
    order = np.random.default_rng(seed).permutation(len(groups))
    sizes = pd.Series(keys).value_counts()
    n, taken, side = int((keys != None).sum()), 0, {}  # noqa: E711
    for g in groups[order]:
        side[g] = "train" if taken < 0.8 * n else "val" if taken < 0.9 * n else "test"
        taken += int(sizes[g])
    return np.array([side.get(k) if k is not None else None for k in keys], dtype=object)


def _metric(metric: str, true: np.ndarray, pred: np.ndarray) -> float:
    """RMSE over one target, or mean AUROC over tasks (present labels only; a task without both classes
    in the test set is left out)."""
    from sklearn.metrics import roc_auc_score

    if metric == "rmse":
        ok = ~np.isnan(true[:, 0])
        return float(np.sqrt(np.mean((pred[ok, 0] - true[ok, 0]) ** 2)))
    scores = []
    for j in range(true.shape[1]):
        ok = ~np.isnan(true[:, j])
        if len(np.unique(true[ok, j])) == 2:
            scores.append(roc_auc_score(true[ok, j], pred[ok, j]))
    return float(np.mean(scores)) if scores else math.nan


# ---- biofm


def biofm_arm(name: str, table: Path, labels: list[str], metric: str, seed: int, tmp: Path, epochs=None) -> dict:
    from lightning.pytorch import Trainer, seed_everything

    from biofm import load
    from biofm.datasets.molecules import prepare_molecules
    from biofm.platform.checkpoint import SafeCheckpointIO, default_checkpoint
    from biofm.platform.lightning import BiofmDataModule, BiofmModule

    pieces = read_config(f"molecules/{name}.yaml")  # trainer / model / data pieces, as `biofm fit -c` composes
    settings = {k: read_config(os.path.normpath(f"molecules/{v}")) for k, v in pieces.items()}
    epochs = epochs or settings["trainer"]["max_epochs"]
    store_path = tmp / f"{name}-{seed}.zarr"
    if not store_path.exists():
        prepare_molecules(
            str(table), str(store_path), label_columns=labels, split="column:split", fragments="keep", workers=1
        )
    seed_everything(seed, verbose=False)
    data = BiofmDataModule([str(store_path)], batch_size=settings["data"]["batch_size"], seed=seed)
    module = BiofmModule(data.schema, **settings["model"])
    timer = clock("val/macro/score")
    run = tmp / f"biofm-{name}-{seed}-{epochs}"
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[default_checkpoint(str(run)), timer],
        plugins=[SafeCheckpointIO()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run),
    )
    trainer.fit(module, datamodule=data)
    best = trainer.checkpoint_callback.best_model_path
    model = load(best, device="cpu", quiet=True)
    frame = pd.read_csv(table)
    test = frame[frame["split"] == "test"]
    tasks = list(model.tasks)
    out = model.predict(smiles=list(test["smiles"]), batch_size=256)
    true = test[tasks].to_numpy(dtype=float)  # the label columns are the task names here (no renaming)
    pred = np.column_stack([_biofm_prediction(out, t, metric) for t in tasks])
    result = {"test": _metric(metric, true, pred), **timer.summary("max")}
    smiles = _inference_smiles(frame)
    start = time.perf_counter()
    model.predict(smiles=smiles, batch_size=256)
    result["inference_per_s"] = round(len(smiles) / (time.perf_counter() - start), 1)
    return result


def _biofm_prediction(out: pd.DataFrame, task: str, metric: str) -> np.ndarray:
    if metric == "rmse":
        return out[task].to_numpy(dtype=float)
    return out[f"{task}/prob/1"].to_numpy(dtype=float)


def _inference_smiles(frame: pd.DataFrame) -> list[str]:
    smiles = list(frame.loc[frame["split"].notna(), "smiles"])
    return (smiles * math.ceil(INFERENCE_MOLECULES / len(smiles)))[: max(INFERENCE_MOLECULES, len(smiles))]


# ---- chemprop


def chemprop_arm(name: str, table: Path, labels: list[str], metric: str, seed: int, tmp: Path, epochs=None) -> dict:
    from chemprop import data as cdata
    from chemprop import featurizers, models
    from chemprop import nn as cnn
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    epochs = epochs or 50
    frame = pd.read_csv(table)
    featurizer = featurizers.SimpleMoleculeMolGraphFeaturizer()

    def dataset(part):
        rows = frame[frame["split"] == part]
        points = [cdata.MoleculeDatapoint.from_smi(s, y) for s, y in zip(rows["smiles"], rows[labels].to_numpy(float))]
        return cdata.MoleculeDataset(points, featurizer)

    seed_everything(seed, verbose=False)
    train, val = dataset("train"), dataset("val")
    if metric == "rmse":
        scaler = train.normalize_targets()
        val.normalize_targets(scaler)
        predictor = cnn.RegressionFFN(output_transform=cnn.UnscaleTransform.from_standard_scaler(scaler))
    else:
        predictor = cnn.BinaryClassificationFFN(n_tasks=len(labels))
    model = models.MPNN(cnn.BondMessagePassing(), cnn.NormAggregation(), predictor, batch_norm=False)
    run = tmp / f"chemprop-{name}-{seed}-{epochs}"
    checkpoint = ModelCheckpoint(str(run), monitor="val_loss", mode="min", save_last=True)
    timer = clock("val_loss")
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[checkpoint, timer],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run),
    )
    trainer.fit(
        model,
        cdata.build_dataloader(train, num_workers=0, seed=seed),
        cdata.build_dataloader(val, num_workers=0, shuffle=False),
    )
    best = models.MPNN.load_from_checkpoint(checkpoint.best_model_path)
    predictor_trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)

    def predict(smiles: list[str]) -> np.ndarray:
        points = [cdata.MoleculeDatapoint.from_smi(s) for s in smiles]
        loader = cdata.build_dataloader(
            cdata.MoleculeDataset(points, featurizer), num_workers=0, shuffle=False, batch_size=256
        )
        return torch.cat(predictor_trainer.predict(best, loader)).numpy().reshape(len(smiles), -1)

    rows = frame[frame["split"] == "test"]
    result = {
        "test": _metric(metric, rows[labels].to_numpy(float), predict(list(rows["smiles"]))),
        **timer.summary("min"),
    }
    smiles = _inference_smiles(frame)
    start = time.perf_counter()
    predict(smiles)
    result["inference_per_s"] = round(len(smiles) / (time.perf_counter() - start), 1)
    return result


ARMS = {"biofm": biofm_arm, "chemprop": chemprop_arm}


def one_seed(name: str, seed: int, tmp: Path) -> dict:
    file, labels, metric = DATASETS[name]
    frame = pd.read_csv(SHARED_DATA / "mol" / file)
    labels = labels or [c for c in frame.columns if c != "smiles"]
    frame["split"] = grouped_split(frame, seed)
    table = tmp / f"{name}-{seed}.csv"
    frame.to_csv(table, index=False)
    results = {arm: fn(name, table, labels, metric, seed, tmp) for arm, fn in ARMS.items()}
    # equal wall-time budget: the slower arm again, its epochs cut to the faster arm's fit time
    slow, fast = sorted(ARMS, key=lambda a: -results[a]["fit_seconds"])
    budget = results[fast]["fit_seconds"]
    epochs = max(1, int(results[slow]["epochs"] * budget / results[slow]["fit_seconds"]))
    again = ARMS[slow](name, table, labels, metric, seed, tmp, epochs=epochs)
    budgeted = {fast: results[fast]["test"], slow: again["test"], "seconds": budget, "slower": slow}
    budgeted[f"{slow}_epochs"], budgeted[f"{slow}_fit_seconds"] = epochs, again["fit_seconds"]
    return {"metric": metric, **results, "equal_budget": budgeted}


def ratios(run: dict) -> dict:
    b, c = run["biofm"], run["chemprop"]
    return {
        "train_per_s": b["train_per_s"] / c["train_per_s"],
        "train_batches_per_s": b["train_batches_per_s"] / c["train_batches_per_s"],
        "inference_per_s": b["inference_per_s"] / c["inference_per_s"],
        "seconds_to_best": b["seconds_to_best"] / c["seconds_to_best"],
        "test": b["test"] / c["test"],
        "test_at_equal_budget": run["equal_budget"]["biofm"] / run["equal_budget"]["chemprop"],
    }


def _mean_sd(values) -> dict:
    values = np.asarray(values, dtype=float)
    return {
        "mean": round(float(values.mean()), 4),
        "sd": round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default="esol,freesolv,tox21")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    try:
        import chemprop  # noqa: F401
    except ImportError:
        print(
            "chemprop is not installed here: run it in the bench environment (`make bench-env`, then "
            ".venv-bench/bin/python benchmarks/vs_chemprop.py)"
        )
        return
    if not (SHARED_DATA / "mol").exists():
        print(f"{SHARED_DATA / 'mol'}: not found (the shared data); nothing to measure")
        return
    os.environ.setdefault("WANDB_MODE", "disabled")
    summary = {"threads": torch.get_num_threads(), "seeds": args.seeds, "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="biofm-vs-chemprop-") as tmp:
        for name in args.datasets.split(","):
            runs = []
            for seed in range(args.seeds):
                run = one_seed(name, seed, Path(tmp))
                runs.append(run)
                r = ratios(run)
                print(
                    f"{name} seed {seed}: {run['metric']} biofm {run['biofm']['test']:.3f} chemprop "
                    f"{run['chemprop']['test']:.3f}; training mol/s biofm {run['biofm']['train_per_s']:.0f} "
                    f"chemprop {run['chemprop']['train_per_s']:.0f} ({r['train_per_s']:.2f}×); inference "
                    f"{r['inference_per_s']:.2f}×; at equal budget ({run['equal_budget']['seconds']:.0f} s) "
                    f"biofm {run['equal_budget']['biofm']:.3f} chemprop {run['equal_budget']['chemprop']:.3f}",
                    flush=True,
                )
            per = {
                arm: {
                    k: _mean_sd([r[arm][k] for r in runs])
                    for k in (
                        "test",
                        "train_per_s",
                        "train_batches_per_s",
                        "seconds_to_best",
                        "inference_per_s",
                        "fit_seconds",
                    )
                }
                for arm in ARMS
            }
            per["equal_budget"] = {arm: _mean_sd([r["equal_budget"][arm] for r in runs]) for arm in ARMS}
            per["ratios"] = {k: _mean_sd([ratios(r)[k] for r in runs]) for k in ratios(runs[0])}
            per["metric"], per["runs"] = runs[0]["metric"], runs
            summary["datasets"][name] = per
            q = per["ratios"]
            print(
                f"{name}: {per['metric']} biofm {per['biofm']['test']['mean']:.3f} ± {per['biofm']['test']['sd']:.3f}, "
                f"chemprop {per['chemprop']['test']['mean']:.3f} ± {per['chemprop']['test']['sd']:.3f}; training "
                f"mol/s {q['train_per_s']['mean']:.2f}× chemprop's, inference {q['inference_per_s']['mean']:.2f}×, "
                f"time to best epoch {q['seconds_to_best']['mean']:.2f}×",
                flush=True,
            )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
