"""Plug-in commands of `biofm`: a source adds `biofm prepare <name>`, a format `biofm export <name>`, a
modality, source or recipe a top-level `biofm <name>` (e.g. `heatmap`, `predict-meds`, `demo`).

Also the options every cohort-prediction command shares (`add_cohort_arguments`, `cohort_options`,
`print_summary`), here so that building the parser imports no training stack.

A low module: the sources and modalities register here, and `biofm.platform.cli` reads the registries
after importing the plug-in packages by name (`PLUGINS`), so the platform imports none of them."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None]]
# `biofm prepare <name>`: each source adds a parser builder and a runner here
PREPARERS: dict[str, Command] = {}
# `biofm export <format>`: predictions → another format (e.g. MEDS evaluation files)
EXPORTERS: dict[str, Command] = {}
# `biofm <command>`: top-level commands a modality, source or recipe adds (e.g. `heatmap`)
COMMANDS: dict[str, Command] = {}
# packages whose import registers commands
PLUGINS = ("biofm.modalities", "biofm.datasets", "biofm.recipes")


def _registrar(registry: dict[str, Command]):
    def decorate(name: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
        def register(run: Callable[[argparse.Namespace], None]):
            registry[name] = (add_arguments, run)
            return run

        return register

    return decorate


preparer = _registrar(PREPARERS)
exporter = _registrar(EXPORTERS)
command = _registrar(COMMANDS)


def load_plugins() -> None:
    for name in PLUGINS:
        importlib.import_module(name)


def comma_list(value: str | None) -> list[str] | None:
    """A comma-separated command-line value as a list (None when not given)."""
    return [x.strip() for x in value.split(",") if x.strip()] if value else None


def add_cohort_arguments(parser: argparse.ArgumentParser, manifest_help: str, out_files: str) -> None:
    """The options of a cohort prediction command (`biofm predict-cohort` and those built on it)."""
    parser.add_argument("--checkpoint", required=True, help="a .ckpt file or a run directory holding one")
    parser.add_argument("--manifest", required=True, help=manifest_help)
    parser.add_argument("--out", required=True, help=f"folder for shards, {out_files}, errors.csv, summary.json")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--num-workers", type=int, default=0, help="loader processes that featurise")
    parser.add_argument("--devices", type=int, default=1, help="processes (GPUs, or CPU processes with gloo)")
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--encoding", default="utf-8", help="character encoding of a CSV manifest (default utf-8)")


def cohort_options(args) -> dict:
    """`add_cohort_arguments`' values as `predict_cohort`'s keyword options."""
    names = ("batch_size", "num_workers", "devices", "num_nodes", "accelerator", "encoding")
    return {name: getattr(args, name) for name in names}


def print_summary(summary: dict, out: str, predictions: str = "predictions.parquet") -> None:
    if summary:
        print(
            f"{summary['predicted']} of {summary['samples']} samples predicted, {summary['errors']} errors "
            f"(listed in {out}/errors.csv); {summary['samples_per_s']} samples/s; predictions in {out}/{predictions}"
        )
