"""A fit stopped mid-epoch and resumed from its checkpoint trains on every sample of that epoch once."""

import numpy as np
import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from biofm.platform.checkpoint import SafeCheckpointIO
from biofm.platform.lightning import BiofmDataModule, BiofmModule


class RowRecorder(Callback):
    def __init__(self):
        self.batches = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.batches.append(batch["row"].numpy().copy())


def _fit(store, root, recorder, ckpt_path=None, **trainer_kwargs):
    data = BiofmDataModule([store.url], batch_size=32, num_workers=trainer_kwargs.pop("num_workers", 0))
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2)
    trainer = Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=root,
        plugins=[SafeCheckpointIO()],
        callbacks=[recorder, *trainer_kwargs.pop("callbacks", [])],
        **trainer_kwargs,
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return data


@pytest.mark.parametrize("num_workers, stop_at", [(0, 7), (2, 5)])
def test_a_fit_resumed_mid_epoch_sees_each_sample_of_the_epoch_exactly_once(
    cohort_store, tmp_path, num_workers, stop_at
):
    full = RowRecorder()
    _fit(cohort_store, tmp_path / "full", full, max_epochs=1, enable_checkpointing=False, num_workers=num_workers)

    first = RowRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_at, save_top_k=-1, filename="{step}")
    _fit(cohort_store, tmp_path / "a", first, max_steps=stop_at, callbacks=[saver], num_workers=num_workers)
    assert len(first.batches) == stop_at
    second = RowRecorder()
    _fit(
        cohort_store,
        tmp_path / "b",
        second,
        max_epochs=1,
        enable_checkpointing=False,
        num_workers=num_workers,
        ckpt_path=str(tmp_path / "ckpt" / f"step={stop_at}.ckpt"),
    )

    train_rows = set(np.flatnonzero(cohort_store.index("split") == "train"))
    seen = np.concatenate(first.batches + second.batches)
    assert len(seen) == len(set(seen)) == len(train_rows) and set(seen) == train_rows
    # the very same batches, in the same order, as the uninterrupted epoch
    assert len(first.batches) + len(second.batches) == len(full.batches)
    for got, want in zip(first.batches + second.batches, full.batches):
        np.testing.assert_array_equal(got, want)


class SaveInsideStep(Callback):
    """Saves a checkpoint in the middle of a training step, where a SIGUSR1 handler may save one."""

    def __init__(self, path, at: int):
        self.path, self.at, self.saved = path, at, False

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if trainer.global_step == self.at and not self.saved:
            trainer.save_checkpoint(self.path)
            self.saved = True


@pytest.mark.parametrize("where", ["mid-epoch", "last step"])
def test_a_checkpoint_saved_inside_a_step_resumes_with_that_batch(cohort_store, tmp_path, where):
    full = RowRecorder()
    _fit(cohort_store, tmp_path / "full", full, max_epochs=2, enable_checkpointing=False)
    per_epoch = len(full.batches) // 2
    at = 4 if where == "mid-epoch" else per_epoch - 1  # steps done before the interrupted one

    first = RowRecorder()
    saver = SaveInsideStep(tmp_path / "inside.ckpt", at)
    _fit(cohort_store, tmp_path / "a", first, max_steps=at + 1, enable_checkpointing=False, callbacks=[saver])
    second = RowRecorder()
    _fit(
        cohort_store,
        tmp_path / "b",
        second,
        max_epochs=2,
        enable_checkpointing=False,
        ckpt_path=str(tmp_path / "inside.ckpt"),
    )
    # the interrupted step is trained again, then the rest of the epoch, then the whole second epoch
    resumed = first.batches[:at] + second.batches
    assert len(resumed) == len(full.batches)
    for got, want in zip(resumed, full.batches):
        np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_a_fit_killed_with_sigkill_mid_epoch_and_resumed_trains_on_each_sample_once(cohort_store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from biofm.platform.checkpoint import safe_load

    root = Path(__file__).resolve().parents[1]
    run, rows = tmp_path / "run", tmp_path / "rows.txt"
    callbacks = tmp_path / "callbacks.yaml"
    callbacks.write_text(
        "trainer:\n  callbacks:\n"
        f"    - class_path: biofm.testing.RowLog\n      init_args: {{path: {rows}}}\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        f"      init_args: {{dirpath: {tmp_path / 'steps'}, every_n_train_steps: 5, save_top_k: -1, filename: '{{step}}'}}\n"
    )
    args = [
        sys.executable,
        "-m",
        "biofm",
        "fit",
        "--trainer",
        str(root / "configs/trainer/cpu.yaml"),
        "-c",
        str(callbacks),
        "--model",
        str(root / "configs/model/tiny.yaml"),
        "--data.stores",
        f"[{cohort_store.url}]",
        "--data.batch_size",
        "4",
        "--trainer.max_epochs",
        "1",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.default_root_dir",
        str(run),
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.logger",
        "false",
    ]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    job = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (rows.exists() and len(rows.read_text().splitlines()) >= 23):
        assert job.poll() is None and time.time() < deadline, "the fit ended before it could be killed"
        time.sleep(0.02)
    job.send_signal(signal.SIGKILL)
    job.wait()
    first = [list(map(int, line.split())) for line in rows.read_text().splitlines()]
    checkpoints = sorted((tmp_path / "steps").glob("step=*.ckpt"), key=lambda p: int(p.stem.split("=")[1]))
    latest = checkpoints[-1]
    step = safe_load(latest)["global_step"]
    assert 0 < step < first[-1][0] + 1  # killed after that checkpoint, mid-epoch
    rows.unlink()
    resumed = subprocess.run(args + ["--ckpt_path", str(latest)], env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    second = [list(map(int, line.split())) for line in rows.read_text().splitlines()]
    # the model's history: the first run's steps up to its checkpoint, then the resumed run's
    trained = [r for line in first if line[0] <= step for r in line[1:]] + [r for line in second for r in line[1:]]
    train_rows = set(np.flatnonzero(cohort_store.index("split") == "train").tolist())
    assert len(trained) == len(set(trained)) == len(train_rows) and set(trained) == train_rows
    assert second[0][0] == step + 1
