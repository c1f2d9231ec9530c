"""Merging fine-tuned specialists into one model (issue #22): how close does each method stay to them?

    python benchmarks/merge.py [--seeds 3] [--suites molecules,cohort] [--epochs 40] [--joint-epochs 20]

Protocol (the transfer benchmark's, benchmarks/transfer.py): per seed, one base pretrained on the six pooled
molecule sources (joint, equal balancing, its last state), then one specialist per judged source (ESOL,
FreeSolv, Tox21) fine-tuned from it, each kept at its best validation epoch. The three specialists are merged
with every method (`biofm merge`, each in its own process: seconds and peak memory are that process's), and
every merged model is tested on each source's test split. Baselines measured in the same run: each specialist
on its own source, and the joint model (the base run, each source at its own best validation epoch).

Tuning, on validation only and the same for every data-free method: λ of task_arithmetic, ties and
breadcrumbs from {1/N, 0.5, 0.75, 1}, chosen by the mean over sources of the validation score relative to the
specialist's (average has none). The learned methods (adamerging layer- and task-wise, atlas with 10 % of the
calibration samples labelled, twin at rank 32 routed by a router over the inputs) calibrate on the sources'
validation inputs; twin-task (rank 32, and 8) routes each task to its own specialist's exclusive part and
needs no calibration.

Per source the figure is RMSE (ESOL, FreeSolv) or mean AUROC over the 12 assays (Tox21); `relative` is
merged / specialist (a method keeps a source when RMSE ≤ 1.05× or AUROC ≥ 0.95× the specialist's), and
`score` the normalised figure (specialist / merged RMSE, merged / specialist AUROC; 1 = the specialist), whose
mean over sources ranks the methods. The cohort suite (`--suites cohort`) does the same on the synthetic cohort:
a base on its five tasks, one specialist per task, RMSE for the regression, AUROC or ordinal accuracy for the
rest (one calibration store for every task: the twin router has nothing to tell apart there).

The last line is JSON: `{suite: {"per_source": {source: {arm: {mean, sd, relative}}}, "mean_score": {arm: …},
"kept_all": {arm: bool}, "best_method": …, "merge_seconds": {…}, "merge_peak_mib": {…}, "scale": {…}},
"import_baseline_mib": …}` (the peak memory of a process that only imports what `biofm merge` does).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transfer import JUDGED, SOURCES, Cache, molecule_stores, run, score  # noqa: E402 — benchmarks/, this script's folder

DATA_FREE = ["average", "task_arithmetic", "ties", "breadcrumbs"]
LEARNED = {  # arm: (method, options)
    "adamerging": ("adamerging", ["--granularity", "layer"]),
    "adamerging-task": ("adamerging", ["--granularity", "task"]),
    "atlas": ("atlas", ["--labelled-fraction", "0.1"]),
    "twin": ("twin", ["--rank", "32"]),  # the paper's router over the inputs
    "twin-task": ("twin", ["--rank", "32", "--route", "task"]),  # each task its own specialist's part
    "twin-task-r8": ("twin", ["--rank", "8", "--route", "task"]),
}
SCALED = ("task_arithmetic", "ties", "breadcrumbs")


def merge_in_process(base: Path, models: list[Path], method: str, out: Path, options: list[str]) -> dict:
    """`biofm merge` in its own process; its JSON summary (seconds and peak memory are that process's)."""
    if out.exists():
        out.unlink()
    command = [sys.executable, "-m", "biofm", "merge", "--base", str(base), "--models", *map(str, models)]
    command += ["--method", method, "--out", str(out), *options]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"biofm merge --method {method} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def import_baseline() -> float:
    """Peak memory of a process that only imports what `biofm merge` imports (Python, torch, Lightning)."""
    code = (
        "import lightning.pytorch, biofm.platform.merge, biofm.platform.lightning; "
        "print(biofm.platform.merge.peak_rss_mib())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return round(float(done.stdout.strip().splitlines()[-1]), 1)


def evaluate(checkpoint: Path, stores: dict, judged: list[str], split: str, scorer, tasks=None, store=None) -> dict:
    """A checkpoint's figure on each judged source (or task) on `split` ("val" or "test")."""
    from lightning.pytorch import Trainer

    from biofm.platform.lightning import BiofmDataModule
    from biofm.platform.sdk import load_module

    module = load_module(checkpoint)
    figures = {}
    for name in judged:
        data = BiofmDataModule([stores[store or name]], batch_size=256, tasks=tasks)
        tester = Trainer(
            accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        (tester.validate if split == "val" else tester.test)(module, datamodule=data, verbose=False)
        figures[name] = scorer({k: float(v) for k, v in tester.callback_metrics.items()}, name, split)
    return figures


def normalised(figure: float, specialist: float, lower: bool) -> float:
    """1 = the specialist's figure; higher is better."""
    return specialist / figure if lower else figure / specialist


def save_best(trainer, judged: str, path: Path) -> Path:
    """The fitted module at `judged`'s best validation epoch, as a checkpoint."""
    module = trainer.lightning_module
    last = {k: v.clone() for k, v in module.state_dict().items()}
    module.load_state_dict(trainer.best_states[judged][2])
    trainer.save_checkpoint(path)
    module.load_state_dict(last)
    return path


def cached_fit(cache: Cache, key: str, seed: int, path: Path, fit, judged: str | None = None) -> dict:
    """`key`'s cached result for `seed`, or `fit()`'s, its checkpoint written to `path`: the last state, or
    with `judged` that source's best validation epoch (its figure then cached as `val`)."""
    done = cache.get(key, seed)
    if done is None or not path.exists():
        result, seconds, trainer = fit()
        if judged is None:
            trainer.save_checkpoint(path)  # the last state: the pretrained base
        else:
            save_best(trainer, judged, path)
            result = {**result, "val": abs(trainer.best_states[judged][0])}
        cache.put(key, seed, result, seconds)
        done = cache.get(key, seed)
    return done["result"]


def suite_molecules(root: Path, seed: int, args, cache: Cache):
    """(stores, base, judged, {source: specialist checkpoint}, {source: specialist val}, {arm: {source: test}},
    scorer, lower, where)."""
    stores, judged = molecule_stores(root, seed), list(JUDGED)
    base = root / f"base{seed}.ckpt"
    joint = lambda: run(stores, list(SOURCES), judged, root / f"joint{seed}", args.joint_epochs, seed)
    figures = {"joint": cached_fit(cache, "joint", seed, base, joint)}
    specialists, val = {}, {}
    for source in judged:
        path = root / f"specialist-{source}{seed}.ckpt"
        fit = lambda: run(
            stores, [source], [source], root / f"ft-{source}{seed}", args.epochs, seed, init_from=str(base)
        )
        result = cached_fit(cache, f"specialist-{source}", seed, path, fit, judged=source)
        specialists[source], val[source] = path, result["val"]
        figures.setdefault("specialist", {})[source] = result[source]
    return stores, base, judged, specialists, val, figures, score, JUDGED, {}


def cohort_score(kinds: dict):
    from biofm.tasks.metrics import PRIMARY

    def scorer(metrics: dict, task: str, prefix: str) -> float:
        metric = "rmse" if kinds[task] == "regression" else PRIMARY[kinds[task]]
        return float(metrics.get(f"{prefix}/{task}/{metric}", math.nan))

    return scorer


def suite_cohort(root: Path, seed: int, args, cache: Cache):
    from biofm.datasets.synthetic import prepare_synthetic

    folder = root / "cohort" / f"seed{seed}"
    url = str(folder / "cohort.zarr")
    if not Path(url).exists():
        prepare_synthetic(url, n=2000, seed=seed)
    from biofm.platform.store import Store

    kinds = {t: spec["kind"] for t, spec in Store(url).tasks.items()}
    judged, scorer = list(kinds), cohort_score(kinds)
    lower = {t: k == "regression" for t, k in kinds.items()}
    stores = {"cohort": url}
    common = dict(model_config="model/small.yaml", scorer=scorer, lower=lower, test_store="cohort")
    base = folder / "base.ckpt"
    joint = lambda: run(stores, ["cohort"], judged, folder / "joint", args.cohort_epochs, seed, **common)
    figures = {"joint": cached_fit(cache, "cohort-joint", seed, base, joint)}
    specialists, val = {}, {}
    for task in judged:
        path = folder / f"specialist-{task}.ckpt"
        fit = lambda: run(
            stores, ["cohort"], [task], folder / f"ft-{task}", args.cohort_epochs, seed,
            tasks=[task], init_from=str(base), **common,
        )  # fmt: skip
        result = cached_fit(cache, f"cohort-specialist-{task}", seed, path, fit, judged=task)
        specialists[task], val[task] = path, result["val"]
        figures.setdefault("specialist", {})[task] = result[task]
    return stores, base, judged, specialists, val, figures, scorer, lower, {"store": "cohort"}


def merge_arms(root: Path, suite: str, seed: int, setup, cache: Cache, steps: int) -> tuple[dict, dict, dict, dict]:
    """Every method's test figures, seconds, peak memory and chosen λ for one seed."""
    stores, base, judged, specialists, val, figures, scorer, lower, where = setup
    models = [specialists[s] for s in judged]
    calibration = ["--calibration", *sorted({stores[where.get("store") or s] for s in judged}), "--steps", str(steps)]
    folder = root / f"{suite}-merged{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    seconds, memory, scales = {}, {}, {}
    grid = [1.0 / len(models), 0.5, 0.75, 1.0]
    for arm in [*DATA_FREE, *LEARNED]:
        key = f"{suite}-{arm}"
        done = cache.get(key, seed)
        if done is not None:
            figures[arm], seconds[arm] = done["result"]["test"], done["seconds"]
            memory[arm], scales[arm] = done["result"]["peak_mib"], done["result"].get("scale")
            continue
        out = folder / f"{arm}.ckpt"
        if arm in SCALED:  # λ chosen on validation, by the mean score relative to the specialists
            best = None
            for lam in grid:
                summary = merge_in_process(base, models, arm, out, ["--scale", str(lam)])
                got = evaluate(out, stores, judged, "val", scorer, store=where.get("store"))
                mean = float(np.nanmean([normalised(got[s], val[s], lower[s]) for s in judged]))
                print(f"{suite} seed {seed} {arm} λ={lam:.3f}: validation score {mean:.4f}", flush=True)
                if best is None or mean > best[0]:
                    best = (mean, lam, summary)
            summary = merge_in_process(base, models, arm, out, ["--scale", str(best[1])])
            scales[arm] = best[1]
        else:
            method, options = LEARNED.get(arm, (arm, []))
            summary = merge_in_process(base, models, method, out, options + (calibration if arm in LEARNED else []))
            scales[arm] = None
        figures[arm] = evaluate(out, stores, judged, "test", scorer, store=where.get("store"))
        seconds[arm], memory[arm] = summary["seconds"], summary["peak_rss_mib"]
        extra = {k: summary[k] for k in ("router_accuracy", "objective", "exclusive_fraction") if k in summary}
        cache.put(
            key, seed, {"test": figures[arm], "peak_mib": memory[arm], "scale": scales[arm], **extra}, seconds[arm]
        )
        print(
            f"{suite} seed {seed} {arm}: "
            + ", ".join(f"{s} {figures[arm][s]:.4f}" for s in judged)
            + f" (merge {seconds[arm]:.1f} s, peak {memory[arm]:.0f} MiB{', ' + json.dumps(extra) if extra else ''})",
            flush=True,
        )
    return figures, seconds, memory, scales


def summarise(suite: str, per_seed: list[dict], judged: list[str], lower: dict, seconds, memory, scales) -> dict:
    arms = list(per_seed[0])
    table: dict = {}
    for source in judged:
        table[source] = {}
        for arm in arms:
            values = [f[arm][source] for f in per_seed if arm in f]
            mean = float(np.mean(values))
            spec = float(np.mean([f["specialist"][source] for f in per_seed]))
            table[source][arm] = {
                "mean": round(mean, 4),
                "sd": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else None,
                "relative": round(mean / spec, 4),
            }
    mean_score, kept = {}, {}
    for arm in arms:
        scores = [normalised(table[s][arm]["mean"], table[s]["specialist"]["mean"], lower[s]) for s in judged]
        mean_score[arm] = round(float(np.mean(scores)), 4)
        kept[arm] = all(
            (table[s][arm]["relative"] <= 1.05) if lower[s] else (table[s][arm]["relative"] >= 0.95) for s in judged
        )
    methods = [a for a in arms if a not in ("specialist", "joint")]
    best = max(methods, key=mean_score.get)
    print(f"\n{suite}: test, mean ± sd over {len(per_seed)} seeds (relative = merged / specialist)")
    print(f"{'arm':>16} " + " ".join(f"{s:>22}" for s in judged) + f" {'score':>7} kept  merge s  peak MiB")
    for arm in arms:
        cells = " ".join(
            f"{table[s][arm]['mean']:8.4f}±{(table[s][arm]['sd'] or math.nan):.3f} ({table[s][arm]['relative']:.3f})"
            for s in judged
        )
        timing = f"{np.mean(seconds[arm]):8.1f} {np.mean(memory[arm]):9.0f}" if arm in seconds else ""
        print(f"{arm:>16} {cells} {mean_score[arm]:7.4f} {'yes' if kept[arm] else 'no ':>4} {timing}")
    print(
        f"{suite}: best method {best} (mean score {mean_score[best]:.4f}; average {mean_score['average']:.4f}, "
        f"task arithmetic {mean_score['task_arithmetic']:.4f}); keeps every source within 5 %: {kept[best]}"
    )
    return {
        "per_source": table,
        "mean_score": mean_score,
        "kept_all": kept,
        "best_method": best,
        "best_beats_average_and_task_arithmetic": mean_score[best]
        > max(mean_score["average"], mean_score["task_arithmetic"]),
        "merge_seconds": {a: round(float(np.mean(v)), 2) for a, v in seconds.items()},
        "merge_peak_mib": {a: round(float(np.mean(v)), 1) for a, v in memory.items()},
        "scale": scales,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--suites", default="molecules,cohort")
    parser.add_argument("--epochs", type=int, default=40, help="fine-tuning epochs of each molecule specialist")
    parser.add_argument("--joint-epochs", type=int, default=20, help="epochs of the pooled base")
    parser.add_argument("--cohort-epochs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300, help="steps of the learned merges (biofm merge's default)")
    parser.add_argument("--out", default=None, help="keep stores, checkpoints and results.json here (resumes)")
    args = parser.parse_args()
    suites = [s.strip() for s in args.suites.split(",") if s.strip()]
    if "molecules" in suites:
        missing = [str(p) for p, _, _ in SOURCES.values() if not p.exists()]
        if missing:
            sys.exit(f"shared molecule data missing ({', '.join(missing)}); see ../shared/data/README.md")
    os.environ.setdefault("WANDB_MODE", "disabled")
    from biofm.platform.quiet import configure

    configure(0, lightning=True)  # as the biofm command: no Lightning tips or device lines
    out = {}
    with tempfile.TemporaryDirectory(prefix="biofm-merge-") as tmp:
        root = Path(args.out or tmp)
        cache = Cache(root / "results.json")
        for suite in suites:
            per_seed, seconds, memory, scales = [], {}, {}, {}
            for seed in range(args.seeds):
                setup = (suite_molecules if suite == "molecules" else suite_cohort)(root, seed, args, cache)
                figures, s, m, lam = merge_arms(root, suite, seed, setup, cache, args.steps)
                per_seed.append(figures)
                for arm in s:
                    seconds.setdefault(arm, []).append(s[arm])
                    memory.setdefault(arm, []).append(m[arm])
                    scales.setdefault(arm, []).append(lam[arm])
            judged, lower = setup[2], setup[7]
            out[suite] = summarise(suite, per_seed, judged, lower, seconds, memory, scales)
    out["import_baseline_mib"] = import_baseline()
    out["settings"] = vars(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
