"""The `biofm` command: `prepare <source>`, `export <format>`, `info`, `demo`, and the Lightning subcommands
(`fit | validate | test | predict`), which go to LightningCLI."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from biofm.commands import (
    COMMANDS,
    EXPORTERS,
    LAZY,
    PREPARERS,
    add_cohort_arguments,
    cohort_options,
    load_command,
    load_plugins,
    print_summary,
)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
LIGHT_COMMANDS = ("info", "verify", "report", "prepare", "export")  # need no Lightning: not imported for them
LIGHTNING_HELP = {
    "fit": "train (and fine-tune) a model on stores; `biofm fit --help` lists every option",
    "validate": "score a checkpoint on the stores' validation split",
    "test": "score a checkpoint on the test split; writes test_metrics.json and report/report.html",
    "predict": "predict a split of stores with a checkpoint into predictions.parquet",
}


def prepare_config(parser: argparse.ArgumentParser, argv: list[str]) -> None:
    """`biofm prepare <source> --config FILE`: the YAML file's `option: value` pairs become that command's
    defaults (options given on the command line win; a required option the file gives is no longer asked)."""
    if len(argv) < 2 or argv[0] != "prepare" or "--config" not in argv:
        return
    from biofm.platform.errors import ConfigError

    index = argv.index("--config")
    if index + 1 >= len(argv):
        raise ConfigError("--config needs a YAML file")
    path = Path(argv[index + 1])
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file")
    import yaml

    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path}: expected `option: value` lines, got a {type(values).__name__}")
    sub = _choice(_choice(parser, "prepare"), argv[1])
    known = {a.dest: a for a in sub._actions}
    settings = {}
    for key, value in values.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest in ("help", "config", "print_config"):
            raise ConfigError(f"--config {path}: '{key}' is not an option of `biofm prepare {argv[1]}`")
        if isinstance(value, list) and known[dest].nargs is None:
            value = _quoted_list(value)  # the comma-separated options
        settings[dest] = value
        known[dest].required = False
    for group in sub._mutually_exclusive_groups:  # `--label-columns` or `--label-columns-file`
        if any(a.dest in settings for a in group._group_actions):
            group.required = False
    sub.set_defaults(**settings)


def _quoted_list(values: list) -> str:
    """A YAML list as one comma-separated value, names that hold commas in CSV quotes (`comma_list`)."""
    import csv
    import io

    out = io.StringIO()
    csv.writer(out, lineterminator="").writerow([str(v) for v in values])
    return out.getvalue()


def _input_errors() -> tuple[type[Exception], ...]:
    """Each registered modality's error for an input it cannot read (a slide, a volume): a clear line too."""
    from biofm.platform.modality import MODALITIES

    found = {getattr(MODALITIES.resolve(name), "input_error", None) for name in MODALITIES.names()}
    return tuple(e for e in found if isinstance(e, type) and issubclass(e, Exception))


def _choice(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


# Help for the options many commands share, where a command gives none
COMMON_HELP = {
    "seed": "random seed (splits, shuffling, initialisation; default 0)",
    "overwrite": "replace a complete store at --out (default: refuse, nothing written is replaced)",
    "batch_size": "samples per batch",
    "num_nodes": "machines (with --devices processes each)",
    "accelerator": "cpu, gpu or auto (default)",
    "epochs": "training epochs",
    "out": "store or folder to write (path or fsspec URL)",
    "vocab_size": "size of the WordPiece vocabulary learned from the training events",
    "subjects": "number of synthetic subjects (two eyes each)",
    "tile_size": "tile side in pixels at the target resolution",
    "task": "the task whose predictions to export",
}


def _fill_help(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        if not action.help and action.dest in COMMON_HELP:
            action.help = COMMON_HELP[action.dest]


def _subcommands(parent, registry: dict, group: str, dest: str) -> None:
    _add_commands(parent.add_subparsers(dest=dest, required=True), registry, group)


def _add_commands(subs, registry: dict, group: str) -> None:
    """Every command of `group`: those imported with their arguments, the others by name and help only (the
    one asked for is imported before the parser is built)."""
    for name, (_, line) in LAZY[group].items():
        if name not in registry:
            subs.add_parser(name, help=line)
    for name, (add_arguments, run) in registry.items():
        line = LAZY[group].get(name, (None, None))[1]
        sub = subs.add_parser(name, help=line or ((run.__doc__ or "").strip().splitlines() or [None])[0])
        add_arguments(sub)
        _fill_help(sub)
        if group == "prepare":
            sub.add_argument("--config", help="a YAML file of this command's options (`input: x.csv`, …)")
            sub.add_argument("--print_config", action="store_true", help="print the options as YAML and stop")
        sub.set_defaults(run=run)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser, with the plug-in command `argv` names imported (all of them when `argv` is None)."""
    if argv is None:
        load_plugins()
    elif argv and argv[0] in ("prepare", "export") and len(argv) > 1:
        load_command(argv[0], argv[1])
    elif argv:
        load_command("command", argv[0])
    parser = argparse.ArgumentParser(
        prog="biofm", description=__doc__, epilog="Lightning subcommands: biofm {fit,validate,test,predict} --help"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="also show Lightning's notes and known warnings")
    parser.add_argument("-q", "--quiet", action="store_true", help="results and errors only")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, line in LIGHTNING_HELP.items():  # listed here; LightningCLI parses them (`biofm fit --help`)
        commands.add_parser(name, help=line, add_help=False)
    _subcommands(
        commands.add_parser("prepare", help="turn a raw source into a sample store"), PREPARERS, "prepare", "source"
    )
    _subcommands(
        commands.add_parser("export", help="write predictions in another format"), EXPORTERS, "export", "format"
    )
    _add_commands(commands, COMMANDS, "command")
    cohort = commands.add_parser("predict-cohort", help="predict a manifest of raw inputs with a checkpoint")
    add_cohort_arguments(
        cohort,
        "CSV or parquet: sample_id and a column per input (the column each modality reads, case columns)",
        "predictions.parquet",
    )
    _fill_help(cohort)
    cohort.set_defaults(run=_predict_cohort)
    info = commands.add_parser("info", help="describe a store: splits, labels per task, modalities, arrays, size")
    info.add_argument("store", help="store path or fsspec URL")
    info.add_argument("--json", action="store_true", help="the same as one JSON object")
    info.set_defaults(run=_info)
    merge = commands.add_parser(
        "merge", help="one multi-task model from specialists fine-tuned from one base (task arithmetic, TIES, …)"
    )
    add_merge_arguments(merge)
    merge.set_defaults(run=_merge)
    report = commands.add_parser("report", help="build a run's test report (plots and report.html) again")
    report.add_argument("run_dir", help="the run directory `biofm test` wrote test_metrics.json and report/ to")
    report.set_defaults(run=_report)
    verify = commands.add_parser(
        "verify", help="check every file of a store against the checksums written when it was prepared"
    )
    verify.add_argument("store", help="store path or fsspec URL")
    verify.set_defaults(run=_verify)
    return parser


def add_merge_arguments(parser: argparse.ArgumentParser) -> None:
    from biofm.platform.merge_options import add_arguments

    add_arguments(parser)


def _merge(args: argparse.Namespace) -> None:
    import json

    from biofm.platform.merge import merge

    summary = merge(**{k: v for k, v in vars(args).items() if k not in ("command", "run", "verbose", "quiet")})
    print(json.dumps(summary))


def _report(args: argparse.Namespace) -> None:
    from biofm.platform.report import build_report

    print(f"report written to {build_report(args.run_dir)}")


def _info(args: argparse.Namespace) -> None:
    import json

    from biofm.platform.store import Store

    summary = Store(args.store).summary()
    if args.json:
        print(json.dumps(summary))
        return
    print_store_summary(summary)


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.1f} KiB"


def print_store_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    splits = ", ".join(f"{k} {v}" for k, v in summary["splits"].items())
    console.print(
        f"store {summary['store']}: source {summary['source']}, {summary['samples']} samples ({splits}), "
        f"{_mib(summary['bytes_on_disk'])} on disk"
    )
    tasks = Table(title="tasks")
    for column in ("task", "kind", "labelled train / val / test", "missing", "labels"):
        tasks.add_column(column)
    for task, entry in summary["tasks"].items():
        labelled = " / ".join(str(entry["labelled"][k]) for k in ("train", "val", "test"))
        if "range" in entry:
            r = entry["range"]
            labels = f"mean {r['mean']:.4g}, sd {r['sd']:.4g}, {r['min']:.4g} to {r['max']:.4g}"
        elif isinstance(entry.get("prevalence"), float):
            labels = f"{entry['prevalence']:.1%} positive"
        elif "prevalence" in entry:
            labels = ", ".join(f"{c} {p:.1%}" for c, p in entry["prevalence"].items())
        else:
            labels = ", ".join(f"{c} {n}" for c, n in (entry.get("classes") or {}).items())
        tasks.add_row(task, entry["kind"], labelled, f"{entry['missing_fraction']:.1%}", labels)
    console.print(tasks)
    modalities = Table(title="modalities and arrays")
    for column in ("array", "shape", "dtype", "stored"):
        modalities.add_column(column)
    for modality, rate in summary["modalities"].items():
        modalities.add_row(f"[bold]{modality}[/bold] (present in {rate:.1%} of samples)", "", "", "")
        for name, info in summary["arrays"].items():
            if name.split("/")[0] == modality:
                shape = "ragged " + str(info["shape"]) if info["ragged"] else str(info["shape"])
                modalities.add_row("  " + name, shape, info["dtype"], _mib(info["bytes"]))
    console.print(modalities)


def _verify(args: argparse.Namespace) -> None:
    from biofm.platform.integrity import verify
    from biofm.platform.store import Store

    result = verify(args.store, progress=sys.stderr.isatty())
    if not result["problems"]:
        Store(args.store)  # and the store's own checks: attributes, arrays, shapes, offsets
    for line in result["problems"]:
        print(f"biofm: error: {line}", file=sys.stderr)
    if result["problems"]:
        raise SystemExit(2)
    print(
        f"{args.store}: {result['files']} files ({result['bytes'] / (1 << 20):.1f} MiB) match the checksums "
        "written when the store was prepared"
    )


def _predict_cohort(args: argparse.Namespace) -> None:
    from biofm.platform.cohort import predict_cohort

    print_summary(predict_cohort(args.checkpoint, args.manifest, args.out, **cohort_options(args)), args.out)


def main(argv: list[str] | None = None) -> None:
    from biofm.platform.quiet import configure, verbosity_of

    verbosity, argv = verbosity_of(list(sys.argv[1:] if argv is None else argv))
    configure(verbosity)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        configure(verbosity, lightning=True)
        from biofm.platform.lightning_cli import run_lightning_cli

        run_lightning_cli(argv)
        return
    from biofm.platform.errors import CheckpointError, ConfigError, StoreError
    from biofm.registry import RegistryError

    parser = build_parser(argv)
    try:
        prepare_config(parser, argv)
    except ConfigError as err:
        print(f"biofm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    args = parser.parse_args(argv)
    if getattr(args, "print_config", False):
        import yaml

        shown = {
            k: v
            for k, v in vars(args).items()
            if k not in ("command", "source", "run", "config", "print_config", "verbose", "quiet")
        }
        print(yaml.safe_dump(shown, sort_keys=False), end="")
        return
    load_plugins()  # what the command reads may need any modality (a checkpoint's, a store's)
    configure(verbosity, lightning=args.command not in LIGHT_COMMANDS)
    known = (StoreError, CheckpointError, ConfigError, RegistryError, FileNotFoundError, FileExistsError)
    try:
        args.run(args)
    except known + _input_errors() as err:
        print(f"biofm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
