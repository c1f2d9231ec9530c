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
    trainer = Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      default_root_dir=root, plugins=[SafeCheckpointIO()], callbacks=[recorder, *trainer_kwargs.pop(
                          "callbacks", [])], **trainer_kwargs)
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return data


@pytest.mark.parametrize("num_workers, stop_at", [(0, 7), (2, 5)])
def test_a_fit_resumed_mid_epoch_sees_each_sample_of_the_epoch_exactly_once(cohort_store, tmp_path, num_workers,
                                                                             stop_at):
    full = RowRecorder()
    _fit(cohort_store, tmp_path / "full", full, max_epochs=1, enable_checkpointing=False, num_workers=num_workers)

    first = RowRecorder()
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop_at, save_top_k=-1,
                            filename="{step}")
    _fit(cohort_store, tmp_path / "a", first, max_steps=stop_at, callbacks=[saver], num_workers=num_workers)
    assert len(first.batches) == stop_at
    second = RowRecorder()
    _fit(cohort_store, tmp_path / "b", second, max_epochs=1, enable_checkpointing=False, num_workers=num_workers,
         ckpt_path=str(tmp_path / "ckpt" / f"step={stop_at}.ckpt"))

    train_rows = set(np.flatnonzero(cohort_store.index("split") == "train"))
    seen = np.concatenate(first.batches + second.batches)
    assert len(seen) == len(set(seen)) == len(train_rows) and set(seen) == train_rows
    # the very same batches, in the same order, as the uninterrupted epoch
    assert len(first.batches) + len(second.batches) == len(full.batches)
    for got, want in zip(first.batches + second.batches, full.batches):
        np.testing.assert_array_equal(got, want)
