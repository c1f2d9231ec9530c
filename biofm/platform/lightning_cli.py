"""`biofm fit | validate | test | predict` through LightningCLI, with YAML configs composed from
`configs/` (trainer, model, data, experiment) and `--print_config`."""

from __future__ import annotations

import os
import pickle
import sys

from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar, RichProgressBar
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO

from biofm.platform.checkpoint import SafeCheckpointIO, UnsafeCheckpointError, unsafe_message
from biofm.platform.lightning import (BiofmDataModule, BiofmModule, ConfigError, PredictionWriter,
                                      write_test_metrics)
from biofm.platform.registry import RegistryError
from biofm.platform.store import StoreError
from biofm.platform.tracking import CheckpointArtifact, default_loggers, log_run_settings

def default_checkpoint(run_dir: str) -> ModelCheckpoint:
    """`<run_dir>/checkpoints/`: the best epoch by validation macro score, and `last.ckpt`."""
    return ModelCheckpoint(dirpath=os.path.join(run_dir, "checkpoints"), monitor="val/macro/score", mode="max",
                           save_last=True, save_top_k=1, filename="best-{epoch}")


USER_ERRORS = (ConfigError, StoreError, RegistryError, UnsafeCheckpointError, FileNotFoundError)


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
        # LightningCLI reads --ckpt_path itself (weights_only) for its hyper-parameters: refuse clearly
        try:
            super()._parse_ckpt_path()
        except pickle.UnpicklingError as err:
            path = self.config[self.config.subcommand].get("ckpt_path")
            raise UnsafeCheckpointError(unsafe_message(path, err)) from None

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
