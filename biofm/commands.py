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


# Where each plug-in command lives and its one line of help, so that building the parser for `biofm --help`
# (or for another command) imports none of them; tests/test_cli.py keeps this table equal to what the modules
# register.
LAZY: dict[str, dict[str, tuple[str, str]]] = {
    "prepare": {
        "meds": (
            "biofm.datasets.ehr.meds",
            "MEDS data + a MEDS label file → an EHR store (events as hierarchical text)",
        ),
        "ehr-tables": ("biofm.datasets.ehr.tables", "raw EHR tables of any schema → an EHR store"),
        "molecules": ("biofm.datasets.molecules", "SMILES and labels → a molecule store"),
        "oct": ("biofm.datasets.oct", "OCT volumes and en-face maps listed in a manifest → an OCT store"),
        "synthetic-oct": ("biofm.datasets.oct", "synthetic retina-like OCT volumes → an OCT store"),
        "slides": (
            "biofm.datasets.slides",
            "whole slides (+ reports + case data) listed in a manifest → a slide store",
        ),
        "synthetic": ("biofm.datasets.synthetic", "the synthetic multimodal cohort (tabular + text, five task kinds)"),
        "synthetic-biobank": ("biofm.datasets.synthetic_slides", "synthetic pathology biobank: slides, reports, cases"),
    },
    "export": {"meds": ("biofm.datasets.ehr.predict", "predictions → the MEDS evaluation format")},
    "command": {
        "heatmap": ("biofm.modalities.wsi.heatmap", "per-tile attention of a trained model over a slide's thumbnail"),
        "predict-meds": (
            "biofm.datasets.ehr.predict",
            "predict a MEDS cohort at its prediction times (MEDS format too)",
        ),
        "demo": ("biofm.recipes.demo", "prepare, train, evaluate and predict end to end"),
        "mol-train": ("biofm.recipes.chemist", "a CSV of SMILES and targets → a trained, tested model and its report"),
        "mol-predict": ("biofm.recipes.chemist", "a CSV of SMILES → predictions with a checkpoint, as a CSV"),
    },
}


def load_plugins() -> None:
    for name in PLUGINS:
        importlib.import_module(name)


def load_command(group: str, name: str) -> None:
    """Import the module that registers one plug-in command (its arguments), and nothing else."""
    entry = LAZY.get(group, {}).get(name)
    if entry is not None:
        importlib.import_module(entry[0])


def comma_list(value: str | None) -> list[str] | None:
    """A comma-separated command-line value as a list (None when not given). CSV quoting: a name that holds
    a comma goes in double quotes (`'"disorders, congenital and familial",other'`; `""` for a quote in one)."""
    if not value:
        return None
    import csv

    return [x.strip() for x in next(csv.reader([value], skipinitialspace=True), []) if x.strip()]


def add_columns_argument(parser: argparse.ArgumentParser, flag: str, help: str, required: bool = False, **kw) -> None:
    """`flag` (a comma-separated list, `comma_list`) and `flag-file` (a text file with one name per line, as
    the names are: no quoting): one or the other."""
    group = parser.add_mutually_exclusive_group(required=required)
    group.add_argument(flag, help=f"{help}; names that hold a comma in double quotes", **kw)
    group.add_argument(
        f"{flag}-file", default=None, help=f"a text file with one name per line instead of {flag} (UTF-8)"
    )


def columns_of(args: argparse.Namespace, dest: str) -> list[str] | None:
    """The names given with `--<dest>` or `--<dest>-file` (see `add_columns_argument`)."""
    path = getattr(args, f"{dest}_file", None)
    if not path:
        return comma_list(getattr(args, dest))
    from pathlib import Path

    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except OSError as err:
        raise FileNotFoundError(f"--{dest.replace('_', '-')}-file {path}: cannot read it ({err.strerror})") from None
    names = [line.strip() for line in lines if line.strip()]
    if not names:
        raise FileNotFoundError(f"--{dest.replace('_', '-')}-file {path}: holds no names (one per line)")
    return names


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
