"""The data module: stores → streams → mixed training batches (a batch comes from one source), and the
collator that turns store arrays into tensors in the loader workers."""

from __future__ import annotations

import logging

import numpy as np
import torch
from lightning.pytorch import LightningDataModule

from biofm.platform.errors import ConfigError
from biofm.platform.mixing import ChainLoader, MixedLoader
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.schema import build_schema
from biofm.platform.settings import check_settings
from biofm.platform.store import Store
from biofm.platform.stream import StoreStream, StreamLoader

log = logging.getLogger("biofm")


class Collator:
    """Store arrays of one batch → tensors: labels per task, inputs per modality (in the loader worker)."""

    def __init__(self, schema: dict, with_ids: bool = False, augment: bool = False):
        self.schema, self.with_ids, self.augment = schema, with_ids, augment
        self.modalities: dict[str, Modality] = {
            name: MODALITIES.resolve(name).from_config(config) for name, config in schema["modalities"].items()
        }

    def __call__(self, batch: dict) -> dict:
        out = {"source": batch["source"], "row": torch.from_numpy(np.asarray(batch["row"])), "labels": {}, "inputs": {}}
        for task in self.schema["tasks"]:
            if f"labels/{task}" in batch:
                out["labels"][task] = torch.from_numpy(np.ascontiguousarray(batch[f"labels/{task}"]))
        for name, modality in self.modalities.items():
            inputs = modality.inputs_of(batch, augment=self.augment)
            if inputs is not None:
                out["inputs"][name] = inputs
        if self.with_ids:
            out["sample_id"] = [str(s) for s in batch["index/sample_id"]]
        return out


class BiofmDataModule(LightningDataModule):
    """Streams one or more stores; training mixes them (a batch comes from one source).

    Args:
        stores: store paths or fsspec URLs.
        tasks: task names to train (default: every task of the stores), or {task: kind} to also assert
            the kind of each head.
        modalities: modalities to read (default: all); leave one out to train or test without it.
        weights: mixing weight per source name; otherwise sources are drawn with probability ∝
            size ** (1 / temperature) (1: by size; larger: closer to uniform).
        train_fraction: train on this fraction of each store's training samples (the same ones for a
            given seed): fine-tuning with few labels.
        steps_per_epoch: steps of one training epoch (default: the sum of the sources' batches).
        predict_split: split that `biofm predict` runs on ("train", "val", "test" or "all").
        shared_tasks: tasks that two or more stores have and that mean the same in each, so they train one
            head (a task in several stores whose specs state no common `definition` stops the run otherwise).
    """

    def __init__(
        self,
        stores: list[str],
        tasks: list[str] | dict[str, str] | None = None,
        modalities: list[str] | None = None,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        buffer_size: int = 1024,
        seed: int = 0,
        weights: dict[str, float] | None = None,
        temperature: float = 1.0,
        steps_per_epoch: int | None = None,
        predict_split: str = "test",
        storage_options: dict | None = None,
        train_fraction: float = 1.0,
        shared_tasks: list[str] | None = None,
    ):
        super().__init__()
        check_settings(
            "data",
            dict(
                batch_size=batch_size,
                eval_batch_size=eval_batch_size,
                num_workers=num_workers,
                buffer_size=buffer_size,
                temperature=temperature,
                train_fraction=train_fraction,
                steps_per_epoch=steps_per_epoch,
                weights=weights,
                predict_split=predict_split,
            ),
        )
        if not stores:
            raise ConfigError("data.stores is empty: name at least one store (biofm prepare … writes one)")
        self.stores: dict[str, Store] = {}
        for url in stores:
            store = Store(url, storage_options=storage_options)
            name = store.source if store.source not in self.stores else f"{store.source}:{len(self.stores)}"
            self.stores[name] = store
        self.schema = build_schema(list(self.stores.values()), tasks, modalities, train_fraction, seed, shared_tasks)
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.buffer_size, self.seed = num_workers, buffer_size, seed
        self.weights, self.temperature, self.steps_per_epoch = weights, temperature, steps_per_epoch
        self.train_fraction = train_fraction
        self.predict_split = predict_split

    def _stream(self, store: Store, split: str | None, shuffle: bool, with_ids: bool = False) -> StoreStream:
        arrays = [a for m in self.schema["modalities"] if m in store.modalities for a in store.arrays_of(m)]
        tasks = [t for t in self.schema["tasks"] if t in store.tasks]
        return StoreStream(
            store,
            split=split,
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            seed=self.seed,
            buffer_size=self.buffer_size,
            arrays=arrays,
            tasks=tasks,
            with_ids=with_ids,
            fraction=self.train_fraction if split == "train" else 1.0,
            transform=Collator(self.schema, with_ids, augment=shuffle),
        )  # training only

    def _loaders(self, split: str | None, shuffle: bool, with_ids: bool = False) -> dict[str, StreamLoader]:
        loaders = {}
        for name, store in self.stores.items():
            if not any(m in store.modalities for m in self.schema["modalities"]):
                continue
            stream = self._stream(store, split, shuffle, with_ids)
            if stream.n_selected:
                loaders[name] = StreamLoader(stream, num_workers=self.num_workers)
        return loaders

    def train_dataloader(self) -> MixedLoader:
        loaders = self._loaders("train", shuffle=True)
        if not loaders:
            raise ConfigError("no store has training samples with the configured modalities")
        self._warn_untrained_tasks()
        return MixedLoader(
            loaders, self.weights, self.temperature, self.seed, self.steps_per_epoch, confirm_trained=True
        )

    def _warn_untrained_tasks(self) -> None:
        """A task no training sample has a label for trains no head: said before training starts."""
        labelled = dict.fromkeys(self.schema["tasks"], 0)
        for store in self.stores.values():
            train = np.asarray(store.index("split")) == "train"
            for task in labelled:
                if task in store.tasks and train.any():
                    values = np.asarray(store.labels(task))[train]
                    labelled[task] += int((~np.isnan(values.reshape(len(values), -1))).any(axis=1).sum())
        for task in [t for t, n in labelled.items() if n == 0]:
            log.warning(
                f"warning: task '{task}' has no label in any training sample: its head is not trained and its "
                "predictions mean nothing (its store's train split holds no label for it)"
            )

    def val_dataloader(self) -> ChainLoader:
        return ChainLoader(self._loaders("val", shuffle=False))

    def test_dataloader(self) -> ChainLoader:
        return ChainLoader(self._loaders("test", shuffle=False))

    def predict_dataloader(self) -> ChainLoader:
        split = None if self.predict_split == "all" else self.predict_split
        return ChainLoader(self._loaders(split, shuffle=False, with_ids=True))
