"""Does self-supervised pretraining help small labelled tasks? Pretrained vs from scratch, same model.

    python benchmarks/pretraining.py [--seeds 3] [--pretrain-epochs 10] [--steps 600] [--cohort-n 3000]

1. Molecules: pretrain once on the unlabelled pool (micro QM9, micro ZINC, PCQM4Mv2 2k, ESOL and Tox21
   SMILES, labels dropped) with masked atoms, masked bonds and two-view contrast; then fine-tune on FreeSolv
   (random 80/10/10 split per seed) with 25 % and 100 % of its training labels, against the same model
   trained from scratch. Test RMSE (kcal/mol), mean ± sd over seeds.
2. Synthetic cohort (case data + report): pretrain on the training subjects without labels with
   cross-modal contrast and two-view contrast; fine-tune on `event` with `--low-fraction` of the training
   labels, against scratch. Test AUROC, mean ± sd over seeds.

Every fine-tune run trains for about `--steps` optimiser steps (epochs = steps / batches per epoch) and is
tested at its best validation epoch. Needs ../shared/data/mol. Last line: one JSON object.
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from biofm.datasets.molecules import prepare_molecules  # noqa: E402
from biofm.datasets.synthetic import prepare_synthetic  # noqa: E402
from biofm.platform.store import Store  # noqa: E402
from biofm.recipes.runs import fit_and_test  # noqa: E402
from biofm.testing import SHARED_DATA  # noqa: E402 — ../shared/data, or BIOFM_SHARED_DATA

MOL = SHARED_DATA / "mol"
POOL = {
    "qm9": ("graphium/micro_qm9.csv", "smiles"),
    "zinc": ("graphium/micro_ZINC.csv", "SMILES"),
    "pcqm4mv2": ("graphium/pcqm4mv2-2k.csv", "smiles"),
    "esol": ("esol.csv", "smiles"),
    "tox21": ("tox21.csv", "smiles"),
}
MOLECULE_MODEL = {
    "d_model": 128,
    "depth": 2,
    "heads": 4,
    "latents": 8,
    "dropout": 0.0,
    "lr": 1e-3,
    "weight_decay": 0.0,
    "schedule": "cosine",
    "warmup_steps": 50,
    "encoders": {"molecule": {"layers": 4}},
}
MOLECULE_PRETEXT = {
    "masked_atoms": {"ratio": 0.15},
    "masked_bonds": {"ratio": 0.15},
    "two_view": {"temperature": 0.2},
    "descriptors": {},
}
COHORT_MODEL = {
    "d_model": 64,
    "depth": 2,
    "heads": 4,
    "latents": 8,
    "dropout": 0.1,
    "lr": 2e-3,
    "schedule": "cosine",
    "warmup_steps": 50,
}
COHORT_PRETEXT = {"cross_modal": {"temperature": 0.2}, "two_view": {"temperature": 0.2, "keep": 0.5}}


def summary(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    return {
        "mean": round(float(a.mean()), 4),
        "sd": round(float(a.std(ddof=1)) if len(a) > 1 else 0.0, 4),
        "runs": [round(float(v), 4) for v in a],
    }


def epochs_for(n_train: int, batch_size: int, steps: int) -> int:
    return max(1, math.ceil(steps / max(1, math.ceil(n_train / batch_size))))


def pretrain(stores: list[str], run_dir: str, model: dict, pretext: dict, epochs: int, batch_size: int, **data) -> None:
    start = time.perf_counter()
    fit_and_test(
        stores,
        run_dir,
        epochs=epochs,
        batch_size=batch_size,
        model={**model, "pretext": pretext},
        loggers=False,
        data_options={"tasks": [], **data},
    )
    print(f"pretrained in {time.perf_counter() - start:.0f} s", flush=True)


def fine_tune(
    store: str,
    run_dir: str,
    model: dict,
    metric: str,
    task: str,
    fraction: float,
    seed: int,
    steps: int,
    batch_size: int,
    n_train: int,
    init_from: str | None,
    finetune: dict,
) -> float:
    options = {**model, **(finetune if init_from else {}), "init_from": init_from}
    epochs = epochs_for(round(n_train * fraction), batch_size, steps)
    metrics = fit_and_test(
        [store],
        run_dir,
        epochs=epochs,
        batch_size=batch_size,
        model=options,
        seed=seed,
        loggers=False,
        data_options={"tasks": [task], "train_fraction": fraction},
    )
    return metrics[f"{task}/{metric}"]


def compare(
    label: str,
    store_for_seed,
    model: dict,
    metric: str,
    task: str,
    fractions: list[float],
    seeds: int,
    steps: int,
    batch_size: int,
    checkpoint: str,
    finetune: dict,
    tmp: str,
) -> dict:
    results: dict = {}
    for fraction in fractions:
        runs: dict[str, list[float]] = {"pretrained": [], "scratch": []}
        for seed in range(seeds):
            store, n_train = store_for_seed(seed)
            for name, init in (("pretrained", checkpoint), ("scratch", None)):
                value = fine_tune(
                    store,
                    f"{tmp}/{label}-{fraction}-{seed}-{name}",
                    model,
                    metric,
                    task,
                    fraction,
                    seed,
                    steps,
                    batch_size,
                    n_train,
                    init,
                    finetune,
                )
                runs[name].append(value)
                print(f"{label} {int(fraction * 100)}% labels seed {seed} {name}: {metric} {value:.3f}", flush=True)
        entry = {k: summary(v) for k, v in runs.items()}
        p, s = entry["pretrained"]["mean"], entry["scratch"]["mean"]
        entry["pretrained_vs_scratch"] = round(p / s, 4)
        results[f"{int(round(fraction * 100))}%"] = entry
        print(
            f"{label} {int(fraction * 100)}% labels: pretrained {metric} {p:.3f} ± {entry['pretrained']['sd']:.3f}"
            f"  scratch {s:.3f} ± {entry['scratch']['sd']:.3f}  ratio {p / s:.3f}",
            flush=True,
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--pretrain-epochs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps of each fine-tune run")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--cohort-n", type=int, default=3000)
    parser.add_argument("--low-fraction", type=float, default=0.05, help="cohort: fraction of training labels")
    parser.add_argument("--layer-decay", type=float, default=None, help="fine-tuning: layer-wise lr decay")
    parser.add_argument("--fractions", default="0.25,1.0", help="FreeSolv: fractions of training labels")
    parser.add_argument("--skip", default="", help="molecules or cohort: leave that part out")
    parser.add_argument(
        "--workdir",
        default=None,
        help="keep stores and runs here (default: a temporary folder); a pretrained checkpoint found there is reused",
    )
    args = parser.parse_args()
    if not MOL.is_dir():
        raise SystemExit(f"{MOL} is missing: the benchmark needs ../shared/data/mol")
    os.environ.setdefault("WANDB_MODE", "disabled")
    finetune = {"layer_decay": args.layer_decay} if args.layer_decay else {}
    result: dict = {"settings": {k: v for k, v in vars(args).items()}}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="biofm-pretrain-bench-") as scratch_dir:
        tmp = args.workdir or scratch_dir
        Path(tmp).mkdir(parents=True, exist_ok=True)
        if "molecules" not in args.skip:
            pool, n_pool = [], 0
            for name, (path, column) in POOL.items():
                store, _ = prepare_molecules(
                    str(MOL / path),
                    f"{tmp}/pool-{name}.zarr",
                    smiles_column=column,
                    label_columns=[],
                    fragments="keep",
                    source=name,
                    overwrite=True,
                    descriptors=True,
                )
                pool.append(store.url)
                n_pool += store.n
            print(f"pool: {n_pool} molecules in {len(pool)} sources", flush=True)
            checkpoint = f"{tmp}/pretrain-molecules/checkpoints/last.ckpt"
            if not Path(checkpoint).exists():
                pretrain(
                    pool,
                    f"{tmp}/pretrain-molecules",
                    MOLECULE_MODEL,
                    MOLECULE_PRETEXT,
                    args.pretrain_epochs,
                    64,
                    temperature=2.0,
                )

            def freesolv(seed: int) -> tuple[str, int]:
                store, _ = prepare_molecules(
                    str(MOL / "freesolv.csv"),
                    f"{tmp}/freesolv-{seed}.zarr",
                    label_columns=["freesolv"],
                    split="random",
                    seed=seed,
                    fragments="keep",
                    descriptors=True,
                    overwrite=True,
                )
                return store.url, int((store.index("split") == "train").sum())

            result["freesolv_rmse"] = compare(
                "freesolv",
                freesolv,
                MOLECULE_MODEL,
                "rmse",
                "freesolv",
                [float(f) for f in args.fractions.split(",")],
                args.seeds,
                args.steps,
                args.batch_size,
                checkpoint,
                finetune,
                tmp,
            )
        if "cohort" not in args.skip:
            checkpoint = f"{tmp}/pretrain-cohort/checkpoints/last.ckpt"
            if Path(checkpoint).exists():
                cohort = Store(f"{tmp}/cohort.zarr")
            else:
                cohort = prepare_synthetic(f"{tmp}/cohort.zarr", n=args.cohort_n, seed=0)
                pretrain(
                    [cohort.url], f"{tmp}/pretrain-cohort", COHORT_MODEL, COHORT_PRETEXT, args.pretrain_epochs * 2, 64
                )
            n_train = int((cohort.index("split") == "train").sum())
            result["cohort_event_auroc"] = compare(
                "cohort-event",
                lambda seed: (cohort.url, n_train),
                COHORT_MODEL,
                "auroc",
                "event",
                [args.low_fraction],
                args.seeds,
                args.steps,
                args.batch_size,
                checkpoint,
                finetune,
                tmp,
            )
    result["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
