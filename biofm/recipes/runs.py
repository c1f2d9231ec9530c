"""Train on stores, test the best checkpoint, and plot the curves: the job the demo, the benchmarks and the
tests run. Model settings start from `configs/model/small.yaml`."""

from __future__ import annotations

from pathlib import Path

from biofm.recipes.config import read_config


def epoch_lines(label: str):
    """A callback printing one line per epoch — `fit <label>: epoch 3/12, val macro score 0.612, 14 s` —
    readable in a log file as in a terminal (a progress bar is neither on a busy machine's CI log)."""
    import time

    from lightning.pytorch import Callback

    class EpochLines(Callback):
        def on_train_start(self, trainer, module):
            self.start = time.perf_counter()
            print(f"fit {label}: {trainer.max_epochs} epochs of {trainer.num_training_batches} steps", flush=True)

        def on_validation_end(self, trainer, module):
            if trainer.sanity_checking:
                return
            score = trainer.callback_metrics.get("val/macro/score")
            shown = f", val macro score {float(score):.3f}" if score is not None else ""
            elapsed = time.perf_counter() - self.start
            print(
                f"fit {label}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}{shown}, {elapsed:.0f} s",
                flush=True,
            )

    return EpochLines()


def fit_and_test(
    stores: list[str],
    run_dir: str | Path,
    *,
    modalities: list[str] | None = None,
    epochs: int = 12,
    batch_size: int = 64,
    model: dict | None = None,
    seed: int = 0,
    progress: bool = False,
    loggers=None,
    predict: bool = False,
    test_without: list[str] = (),
    data_options: dict | None = None,
    checkpoint_artifact: bool = False,
    label: str | None = None,
) -> dict:
    """Train on `stores` (optionally only some modalities), test the best checkpoint, and return the test
    metrics (also in `<run_dir>/test_metrics.json`); `model` adds to (or replaces) the settings of
    `configs/model/small.yaml`; with `test_without`, also test the same model with each
    of those modalities left out (returned under `without:<modality>`, logged as `test/without:<modality>/…`);
    with `predict`, also write `<run_dir>/predictions.parquet`. `data_options` holds further data-module
    options (tasks, train_fraction, …); checkpoints land in `<run_dir>/checkpoints`, the test report in
    `<run_dir>/report/`; with `label`, one line per epoch instead of a progress bar."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.callbacks import RichProgressBar

    from biofm.platform.checkpoint import SafeCheckpointIO, default_checkpoint
    from biofm.platform.lightning import (
        BiofmDataModule,
        BiofmModule,
        PredictionWriter,
        metrics_of,
        write_test_metrics,
    )
    from biofm.platform.report import write_report
    from biofm.platform.tracking import (
        CheckpointArtifact,
        default_loggers,
        log_run_settings,
    )

    seed_everything(seed, verbose=False)
    run_dir = str(run_dir)
    data = BiofmDataModule(stores, modalities=modalities, batch_size=batch_size, seed=seed, **(data_options or {}))
    module = BiofmModule(data.schema, **{**read_config("model/small.yaml"), **(model or {})})
    loggers = default_loggers(run_dir) if loggers is None else loggers
    callbacks = [default_checkpoint(run_dir), CheckpointArtifact(checkpoint_artifact)]
    if label is not None:
        callbacks.append(epoch_lines(label))
    elif progress:
        callbacks.append(RichProgressBar())
    if predict:
        callbacks.append(PredictionWriter(run_dir))
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        default_root_dir=run_dir,
        logger=loggers,
        callbacks=callbacks,
        plugins=[SafeCheckpointIO()],
        enable_progress_bar=progress and label is None,
        enable_model_summary=False,
        log_every_n_steps=5,
    )
    log_run_settings(module, trainer.loggers)
    trainer.fit(module, datamodule=data)
    best = trainer.checkpoint_callback.best_model_path or None
    trainer.test(module, datamodule=data, ckpt_path=best, verbose=False)
    write_test_metrics(trainer)
    tested = trainer.lightning_module
    write_report(run_dir, tested.test_outputs, tested.model.schema["tasks"], tested.test_notes)
    metrics = metrics_of(trainer, "test")
    for dropped in test_without:
        kept = [m for m in data.schema["modalities"] if m != dropped]
        reduced = BiofmDataModule(stores, modalities=kept, batch_size=batch_size, seed=seed, **(data_options or {}))
        module.test_name = f"test/without:{dropped}"  # its own keys: the tracker keeps the full model's
        trainer.test(module, datamodule=reduced, ckpt_path=best, verbose=False)
        metrics[f"without:{dropped}"] = metrics_of(trainer, module.test_name)
    module.test_name = "test"
    if predict:
        trainer.predict(module, datamodule=data, ckpt_path=best, return_predictions=False)
    for logger in trainer.loggers:
        if type(logger).__name__ == "WandbLogger":
            logger.experiment.finish()  # the next run gets its own W&B run
            import wandb

            # finish() returns before W&B's service has written the run's records to disk; teardown waits
            wandb.teardown()
    return metrics


def plot_curves(metrics_csv: Path, out_png: Path, best_epoch: int | None = None) -> Path:
    """The run's training curves (`biofm.platform.report.plot_training_curves`)."""
    from biofm.platform.report import plot_training_curves

    return plot_training_curves(metrics_csv, out_png, best_epoch)
