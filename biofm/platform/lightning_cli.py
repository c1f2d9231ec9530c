"""`biofm fit | validate | test | predict` through LightningCLI, with YAML configs composed from
`configs/` (trainer, model, data, experiment) and `--print_config`."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Optional

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from biofm.platform.checkpoint import SafeCheckpointIO, default_checkpoint, safe_load
from biofm.platform.errors import CheckpointError, StoreError
from biofm.platform.lightning import (
    BiofmDataModule,
    BiofmModule,
    ConfigError,
    PredictionWriter,
    check_settings,
    metrics_of,
    print_metrics,
    write_test_metrics,
)
from biofm.platform.report import plot_training_curves, write_report
from biofm.platform.tracking import CheckpointArtifact, default_loggers, log_run_settings
from biofm.registry import RegistryError

USER_ERRORS = (ConfigError, StoreError, RegistryError, CheckpointError, FileNotFoundError)


class BiofmCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # modalities and tasks come from the stores: the model is built for what the data holds
        parser.link_arguments("data.schema", "model.schema", apply_on="instantiate")
        parser.add_argument(
            "--checkpoint.every_minutes",
            type=Optional[float],
            default=10.0,
            help="also write last.ckpt within an epoch every this many minutes of training "
            "(null: only at the end of each epoch)",
        )
        parser.add_argument(
            "--checkpoint.every_n_steps",
            type=Optional[int],
            default=None,
            help="also write last.ckpt within an epoch every this many steps",
        )
        parser.add_argument(
            "--tracking.checkpoint_artifact",
            type=bool,
            default=False,
            help="record the best checkpoint in the W&B run (it is uploaded by `wandb sync`; a "
            "checkpoint carries tokenizer vocabularies learned from the training data)",
        )

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        run_dir = config.get("default_root_dir") or os.getcwd()
        config["default_root_dir"] = run_dir
        resuming = self.subcommand == "fit" and bool(self.config[self.subcommand].get("ckpt_path"))
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(run_dir, stage=self.subcommand or "fit", resume=resuming)
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())  # checkpoints load without unpickling code
        config["plugins"] = plugins
        extra = list(callbacks)
        configured = config.get("callbacks") or []
        if config.get("enable_progress_bar", True) is not False and not any(
            isinstance(c, ProgressBar) for c in configured + extra
        ):
            extra.append(RichProgressBar())
        if config.get("enable_checkpointing", True) is not False and not any(
            isinstance(c, ModelCheckpoint) for c in configured + extra
        ):
            cadence = self._get(self.config_init, "checkpoint", default=None) or {}
            extra.append(
                default_checkpoint(
                    run_dir,
                    every_minutes=cadence.get("every_minutes", 10.0),
                    every_n_steps=cadence.get("every_n_steps"),
                )
            )
        if self.subcommand == "predict":
            extra.append(PredictionWriter())
        if self.subcommand == "fit":
            tracking = self._get(self.config_init, "tracking", default=None) or {}
            extra.append(CheckpointArtifact(enabled=bool(tracking.get("checkpoint_artifact", False))))
        return super()._instantiate_trainer(config, extra)

    def _parse_ckpt_path(self) -> None:
        """The model settings saved in `--ckpt_path` replace the config's (as in LightningCLI), read with
        `safe_load`; a value given on the command line or in a config that the checkpoint replaces is named."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path in ("last", "best"):
            path = self._run_checkpoint(subcommand, path)
            self.config[subcommand]["ckpt_path"] = path
        if not path or not Path(path).is_file():
            return
        hparams = dict(safe_load(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        given = self.config[subcommand]["model"]
        given = given.as_dict() if hasattr(given, "as_dict") else dict(given)
        defaults = {k: p.default for k, p in inspect.signature(BiofmModule.__init__).parameters.items()}
        replaced = [
            f"model.{k} {given[k]!r} → {v!r}"
            for k, v in hparams.items()
            if k != "schema" and k in given and given[k] != v and given[k] != defaults.get(k)
        ]
        if replaced:
            print(
                f"biofm: warning: --ckpt_path {path} restores the model settings it was trained with, so these "
                f"values of the command line or config are not used (given → checkpoint's): "
                f"{'; '.join(replaced)}",
                file=sys.stderr,
            )
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def _run_checkpoint(self, subcommand: str, which: str) -> str:
        """`--ckpt_path last`: the newest of `<run dir>/checkpoints/last*.ckpt` and a SLURM requeue's
        `hpc_ckpt_*.ckpt`; `--ckpt_path best`: the newest `best-*.ckpt`. None is an error (Lightning would start
        afresh, or fail later, with a warning)."""
        run_dir = Path(self.config[subcommand]["trainer"].get("default_root_dir") or os.getcwd())
        if which == "last":
            found = [*(run_dir / "checkpoints").glob("last*.ckpt"), *run_dir.glob("hpc_ckpt_*.ckpt")]
        else:
            found = list((run_dir / "checkpoints").glob("best-*.ckpt"))
        if not found:
            kind = (
                "no last.ckpt (nor does the run directory a hpc_ckpt_*.ckpt)"
                if which == "last"
                else "no best-*.ckpt (no validation score could be computed, or the run was not validated)"
            )
            raise ConfigError(
                f"--ckpt_path {which}: {run_dir / 'checkpoints'} holds {kind}; run without "
                "--ckpt_path to start afresh, or name the checkpoint file"
            )
        return str(max(found, key=lambda p: p.stat().st_mtime))

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand in ("test", "validate"):
            kwargs["verbose"] = False  # after_test prints the table, with a column per source
        return kwargs

    def before_instantiate_classes(self) -> None:
        """Settings that cannot work are refused here, before any store is opened."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for group in ("data", "model"):
            values = config.get(group)
            if values is not None:
                check_settings(group, values.as_dict() if hasattr(values, "as_dict") else dict(values))

    def before_fit(self) -> None:
        log_run_settings(self.model, self.trainer.loggers)

    def after_fit(self) -> None:
        """The validation table of the best epoch and where the checkpoints are."""
        if not self.trainer.is_global_zero:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") or ""
        last = Path(checkpoint.dirpath) / "last.ckpt" if checkpoint is not None and checkpoint.dirpath else None
        rows = best_epoch_metrics(self.trainer, best)
        if rows:
            print_metrics(rows, f"validation (best epoch, {Path(best).stem.split('=')[-1]})")
        if best:
            print(f"best checkpoint (by {checkpoint.monitor}): {best}")
        if last is not None and last.exists():
            print(f"last checkpoint (the state at the end of training): {last}")
        csv = Path(self.trainer.default_root_dir) / "logs" / "fit" / "metrics.csv"
        if csv.exists():
            epoch = _epoch_of(best)
            png = plot_training_curves(csv, Path(self.trainer.default_root_dir) / "training_curves.png", epoch)
            print(f"training curves: {png}")

    def after_test(self) -> None:
        path = write_test_metrics(self.trainer)
        if path is not None:
            print_metrics(metrics_of(self.trainer, "test"), "test")
            print(f"test metrics written to {path}")
            module = self.trainer.lightning_module
            report = write_report(
                self.trainer.default_root_dir, module.test_outputs, module.model.schema["tasks"], module.test_notes
            )
            if report is not None:
                print(f"report (metrics and plots per task) written to {report}")

    def after_validate(self) -> None:
        if self.trainer.is_global_zero:
            print_metrics(metrics_of(self.trainer, "val"), "validation")


def _epoch_of(checkpoint: str) -> int | None:
    """N of a `best-epoch=N.ckpt` path."""
    if checkpoint and "epoch=" in Path(checkpoint).stem:
        try:
            return int(Path(checkpoint).stem.split("epoch=")[-1].split("-")[0])
        except ValueError:
            return None
    return None


def best_epoch_metrics(trainer, best: str) -> dict[str, float]:
    """The `val/…` metrics logged at the best checkpoint's epoch (from the run's metrics.csv), or the last
    validation's when that cannot be read."""
    import pandas as pd

    epoch = _epoch_of(best)
    csv = Path(trainer.default_root_dir) / "logs" / "fit" / "metrics.csv"
    if epoch is not None and csv.exists():
        log = pd.read_csv(csv)
        columns = [c for c in log.columns if c.startswith("val/")]
        rows = log[(log.get("epoch") == epoch)][columns].dropna(how="all") if "epoch" in log else log.iloc[:0]
        if len(rows):
            last = rows.ffill().iloc[-1]
            return {c[4:]: float(v) for c, v in last.items() if pd.notna(v)}
    return metrics_of(trainer, "val")


def run_lightning_cli(argv: list[str]) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        args = None if argv == sys.argv[1:] else argv  # LightningCLI reads sys.argv itself when it is ours
        BiofmCLI(
            BiofmModule,
            BiofmDataModule,
            args=args,
            seed_everything_default=0,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except USER_ERRORS as err:
        print(f"biofm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
