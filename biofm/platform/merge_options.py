"""`biofm merge`'s command-line options (apart from `merge.py`, so that building the parser imports no torch)."""

from __future__ import annotations

import argparse

METHODS = ("average", "task_arithmetic", "ties", "breadcrumbs", "adamerging", "atlas", "twin")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", help="the pretrained checkpoint the models were fine-tuned from (task vectors)")
    parser.add_argument("--models", nargs="+", required=True, help="fine-tuned checkpoints to merge")
    parser.add_argument("--method", choices=METHODS, default="ties", help="how to merge (default ties)")
    parser.add_argument("--out", required=True, help="the merged checkpoint to write (must not exist)")
    parser.add_argument(
        "--scale", type=float, help="λ, the task vectors' weight (default 1 for ties, 1/N for the others)"
    )
    parser.add_argument("--density", type=float, help="fraction of each task vector kept (ties 0.2, breadcrumbs 0.9)")
    parser.add_argument("--outliers", type=float, default=0.01, help="breadcrumbs: largest fraction masked out")
    parser.add_argument(
        "--calibration",
        dest="calibration_stores",
        nargs="+",
        metavar="STORE",
        help="stores whose inputs adamerging, atlas and twin learn on (labels unused but by atlas' fraction)",
    )
    parser.add_argument(
        "--calibration-split", default="val", choices=("train", "val", "test", "all"), help="split read (default val)"
    )
    parser.add_argument("--calibration-samples", type=int, default=512, help="inputs read per calibration store")
    parser.add_argument("--steps", type=int, default=300, help="optimisation steps of the learned methods")
    parser.add_argument("--lr", type=float, default=1e-3, help="adamerging / atlas: the coefficients' learning rate")
    parser.add_argument("--granularity", choices=("task", "layer"), default="layer", help="adamerging's coefficients")
    parser.add_argument(
        "--labelled-fraction", type=float, default=0.0, help="atlas: calibration samples that use their labels"
    )
    parser.add_argument("--rank", type=int, default=8, help="twin: rank of each exclusive part's matrices")
    parser.add_argument(
        "--route",
        choices=("input", "task"),
        default="input",
        help="twin: a router picks each input's specialist (input), or each task takes its own (task)",
    )
    parser.add_argument(
        "--renormalise",
        action="store_true",
        help="measure batch-norm running statistics again on the calibration inputs (any method)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (calibration sampling, router)")
