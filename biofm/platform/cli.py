"""The `biofm` command: `prepare <source>`, `export <format>`, `info`, `demo`, and the Lightning subcommands
(`fit | validate | test | predict`), which go to LightningCLI."""

from __future__ import annotations

import argparse
import sys

from biofm.commands import (
    COMMANDS,
    EXPORTERS,
    PREPARERS,
    add_cohort_arguments,
    cohort_options,
    load_plugins,
    print_summary,
)

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")


def _subcommands(parent, registry: dict, dest: str) -> None:
    _add_commands(parent.add_subparsers(dest=dest, required=True), registry)


def _add_commands(subs, registry: dict) -> None:
    for name, (add_arguments, run) in registry.items():
        sub = subs.add_parser(name, help=(run.__doc__ or "").strip().splitlines()[0] if run.__doc__ else None)
        add_arguments(sub)
        sub.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    load_plugins()  # sources, modalities and recipes register their commands
    parser = argparse.ArgumentParser(
        prog="biofm", description=__doc__, epilog="Lightning subcommands: biofm {fit,validate,test,predict} --help"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    _subcommands(commands.add_parser("prepare", help="turn a raw source into a sample store"), PREPARERS, "source")
    _subcommands(commands.add_parser("export", help="write predictions in another format"), EXPORTERS, "format")
    _add_commands(commands, COMMANDS)
    cohort = commands.add_parser("predict-cohort", help="predict a manifest of raw inputs with a checkpoint")
    add_cohort_arguments(
        cohort,
        "CSV or parquet: sample_id and a column per input (the column each modality reads, case columns)",
        "predictions.parquet",
    )
    cohort.set_defaults(run=_predict_cohort)
    info = commands.add_parser("info", help="describe a store")
    info.add_argument("store")
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

    summary = merge(**{k: v for k, v in vars(args).items() if k not in ("command", "run")})
    print(json.dumps(summary))


def _report(args: argparse.Namespace) -> None:
    from biofm.platform.report import build_report

    print(f"report written to {build_report(args.run_dir)}")


def _info(args: argparse.Namespace) -> None:
    from biofm.platform.store import Store

    print(Store(args.store).describe())


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
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        from biofm.platform.lightning_cli import run_lightning_cli

        run_lightning_cli(argv)
        return
    from biofm.platform.errors import CheckpointError, ConfigError, StoreError
    from biofm.registry import RegistryError

    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (StoreError, CheckpointError, ConfigError, RegistryError, FileNotFoundError, FileExistsError) as err:
        print(f"biofm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
