"""`biofm fit | validate | test | predict` through LightningCLI, with YAML configs composed from
`configs/` (trainer, model, data, experiment) and `--print_config`."""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from biofm.platform.checkpoint import SafeCheckpointIO, safe_load
from biofm.platform.errors import CheckpointError, StoreError
from biofm.platform.lightning import (BiofmDataModule, BiofmModule, ConfigError, PredictionWriter, check_settings,
                                      write_test_metrics)
from biofm.platform.registry import RegistryError
from biofm.platform.tracking import CheckpointArtifact, default_loggers, log_run_settings

def default_checkpoint(run_dir: str) -> ModelCheckpoint:
    """`<run_dir>/checkpoints/`: the best epoch by validation macro score, and `last.ckpt`."""
    return ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), monitor="val/macro/score", mode="max",
                           save_last=True, save_top_k=1, filename="best-{epoch}")


USER_ERRORS = (ConfigError, StoreError, RegistryError, CheckpointError, FileNotFoundError)


class BiofmCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # modalities and tasks come from the stores: the model is built for what the data holds
        parser.link_arguments("data.schema", "model.schema", apply_on="instantiate")

    def _instantiate_trainer(self, config: dict, callbacks: list) -> object:
        run_dir = config.get("default_root_dir") or os.getcwd()
        config["default_root_dir"] = run_dir
        if config.get("logger") in (None, True):
            config["logger"] = default_loggers(run_dir, stage=self.subcommand or "fit")
        plugins = config.get("plugins") or []
        plugins = plugins if isinstance(plugins, list) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(SafeCheckpointIO())  # checkpoints load without unpickling code
        config["plugins"] = plugins
        extra = list(callbacks)
        configured = config.get("callbacks") or []
        if config.get("enable_progress_bar", True) is not False and \
                not any(isinstance(c, ProgressBar) for c in configured + extra):
            extra.append(RichProgressBar())
        if config.get("enable_checkpointing", True) is not False and \
                not any(isinstance(c, ModelCheckpoint) for c in configured + extra):
            extra.append(default_checkpoint(run_dir))
        if self.subcommand == "predict":
            extra.append(PredictionWriter())
        if self.subcommand == "fit":
            extra.append(CheckpointArtifact())
        return super()._instantiate_trainer(config, extra)

    def _parse_ckpt_path(self) -> None:
        """The model settings saved in `--ckpt_path` replace the config's (as in LightningCLI), read with
        `safe_load`; a value given on the command line or in a config that the checkpoint replaces is named."""
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or not Path(path).is_file():
            return
        hparams = dict(safe_load(path).get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        given = self.config[subcommand]["model"]
        given = given.as_dict() if hasattr(given, "as_dict") else dict(given)
        defaults = {k: p.default for k, p in inspect.signature(BiofmModule.__init__).parameters.items()}
        replaced = [f"model.{k} {given[k]!r} → {v!r}" for k, v in hparams.items()
                    if k != "schema" and k in given and given[k] != v and given[k] != defaults.get(k)]
        if replaced:
            print(f"biofm: warning: --ckpt_path {path} restores the model settings it was trained with, so these "
                  f"values of the command line or config are not used (given → checkpoint's): "
                  f"{'; '.join(replaced)}", file=sys.stderr)
        self.config = self.parser.parse_object({subcommand: {"model": hparams}}, self.config)

    def before_instantiate_classes(self) -> None:
        """Settings that cannot work are refused here, before any store is opened."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        for group in ("data", "model"):
            values = config.get(group)
            if values is not None:
                check_settings(group, values.as_dict() if hasattr(values, "as_dict") else dict(values))

    def before_fit(self) -> None:
        log_run_settings(self.model, self.trainer.loggers)

    def after_test(self) -> None:
        path = write_test_metrics(self.trainer)
        if path is not None:
            print(f"test metrics written to {path}")


def run_lightning_cli(argv: list[str]) -> None:
    os.environ.setdefault("WANDB_MODE", "offline")
    try:
        args = None if argv == sys.argv[1:] else argv  # LightningCLI reads sys.argv itself when it is ours
        BiofmCLI(BiofmModule, BiofmDataModule, args=args, seed_everything_default=0,
                 save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False)
    except USER_ERRORS as err:
        print(f"biofm: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
