"""The Lightning layer: one DataModule (stores → streams → mixed batches) and one LightningModule
(the model, masked per-task losses, balancing, metrics). The schema — modalities with their settings and
tasks with their specs and scalers — is read from the stores by the DataModule and handed to the model
(`biofm fit` links `data.schema` → `model.schema`), so it travels in every checkpoint."""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer

from biofm.platform.balancing import make_balancer, mean_over_ranks
from biofm.platform.checkpoint import load_pretrained
from biofm.platform.errors import ConfigError
from biofm.platform.mixing import ChainLoader, MixedLoader
from biofm.platform.modality import MODALITIES, Modality
from biofm.platform.model import BiofmModel
from biofm.platform.pretext import Encoded, make_pretexts
from biofm.platform.store import Store, StoreError
from biofm.platform.stream import StoreStream, StreamLoader, keep_fraction
from biofm.tasks.kinds import LabelError, task_kind
from biofm.tasks.metrics import TaskMetrics


def _number_rule(value, rule: str) -> bool:
    """Whether `value` keeps `rule`: "int>=1", "int>=0", ">0", ">=0", "[0,1)", "(0,1]"."""
    if rule.startswith("int"):  # "int>=1": a whole number of at least 1
        return isinstance(value, int) and not isinstance(value, bool) and value >= int(rule[len("int>="):])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return False
    return {">0": value > 0, ">=0": value >= 0, "[0,1)": 0 <= value < 1, "(0,1]": 0 < value <= 1}[rule]


DATA_RULES = {"batch_size": "int>=1", "eval_batch_size": "int>=1", "num_workers": "int>=0",
              "buffer_size": "int>=0", "temperature": ">0", "train_fraction": "(0,1]", "steps_per_epoch": "int>=1"}
MODEL_RULES = {"d_model": "int>=1", "depth": "int>=0", "heads": "int>=1", "latents": "int>=1",
               "dropout": "[0,1)", "lr": ">0", "weight_decay": ">=0", "warmup_steps": "int>=0",
               "layer_decay": "(0,1]"}
RULE_WORDS = {"int>=1": "a whole number of at least 1", "int>=0": "a whole number of at least 0",
              ">0": "a number above 0", ">=0": "a number of at least 0", "[0,1)": "in [0, 1)", "(0,1]": "in (0, 1]"}


def check_settings(group: str, values: dict) -> None:
    """Refuse settings that cannot work, before any data is read: `group` is "data" or "model"."""
    rules = DATA_RULES if group == "data" else MODEL_RULES
    for name, rule in rules.items():
        value = values.get(name)
        if value is not None and not _number_rule(value, rule):
            raise ConfigError(f"{group}.{name} must be {RULE_WORDS[rule]}, got {value!r}")
    if group == "model":
        d_model, heads = values.get("d_model"), values.get("heads")
        if isinstance(d_model, int) and isinstance(heads, int) and heads and d_model % heads:
            raise ConfigError(f"model.d_model ({d_model}) must be divisible by model.heads ({heads}): each "
                              f"attention head takes d_model / heads features (e.g. --model.d_model "
                              f"{max(heads, d_model // heads * heads)})")
        if values.get("schedule", "constant") not in ("constant", "cosine"):
            raise ConfigError(f"model.schedule must be constant or cosine, got {values.get('schedule')!r}")
    else:
        weights = values.get("weights")
        if weights is not None and (not isinstance(weights, dict) or any(
                not _number_rule(w, ">=0") for w in weights.values()) or not sum(weights.values()) > 0):
            raise ConfigError(f"data.weights must map source names to numbers of at least 0 with a positive sum, "
                              f"got {weights!r}")
        if values.get("predict_split", "test") not in ("train", "val", "test", "all"):
            raise ConfigError(f"predict_split must be train, val, test or all, got {values.get('predict_split')!r}")


# ------------------------------------------------------------------------------------------- schema

def build_schema(stores: list[Store], tasks: list[str] | dict[str, str] | None = None,
                 modalities: list[str] | None = None, train_fraction: float = 1.0, seed: int = 0,
                 shared_tasks: list[str] | None = None) -> dict:
    """Modalities and tasks of the run, checked against the stores: every requested task and modality
    exists, settings agree across stores, and labels fit the kind of their task's head. Regression scalers
    come from the training labels the run will see (`train_fraction`).

    A task name in two or more stores trains one head only when the stores mean the same by it: their specs
    state the same `definition`, or the run names the task in `shared_tasks`; otherwise the run stops here
    (a unit-discharge death and a death within 30 days are both called `mortality` somewhere).
    Each task records where it applies: the modalities its training samples had and the sources they came
    from; a sample with none of those modalities gets no prediction for it."""
    all_modalities: dict[str, dict] = {}
    all_tasks: dict[str, dict] = {}
    where: dict[str, str] = {}
    holders: dict[str, list[Store]] = {}
    for store in stores:
        for name, config in store.modalities.items():
            if name in all_modalities and all_modalities[name] != config:
                raise ConfigError(f"stores {where[name]} and {store.url} both have modality '{name}' with "
                                  "different settings (e.g. another tokenizer); prepare them with the same "
                                  "settings")
            all_modalities[name], where[name] = config, store.url
        for name, spec in store.tasks.items():
            known = all_tasks.get(name)
            if known is not None and {k: v for k, v in known.items() if k not in ("unit", "definition")} != \
                    {k: v for k, v in spec.items() if k not in ("unit", "definition")}:
                raise ConfigError(f"task '{name}' is {known['kind']} in {where['task:' + name]} but "
                                  f"{spec['kind']} (or has other classes) in {store.url}")
            all_tasks[name], where["task:" + name] = dict(spec), store.url
            holders.setdefault(name, []).append(store)
    wanted_modalities = list(all_modalities) if modalities is None else list(modalities)
    for name in wanted_modalities:
        MODALITIES.resolve(name)  # unregistered → "could not resolve modality 'x' among choices [...]"
        if name not in all_modalities:
            raise ConfigError(f"modality '{name}' is in no store; the stores have {sorted(all_modalities)}")
    wanted_tasks = list(all_tasks) if tasks is None else list(tasks)
    for name in wanted_tasks:
        if name not in all_tasks:
            raise ConfigError(f"task '{name}' is in no store; the stores have {sorted(all_tasks)}")
    unknown_shared = sorted(set(shared_tasks or ()) - set(all_tasks))
    if unknown_shared:
        raise ConfigError(f"data.shared_tasks names {unknown_shared}, which no store has; the stores have "
                          f"{sorted(all_tasks)}")
    for name in wanted_tasks:
        _check_shared(name, holders[name], shared_tasks or ())
    if isinstance(tasks, dict):
        for name, kind in tasks.items():
            if kind and kind != all_tasks[name]["kind"]:
                raise ConfigError(f"the config asks for a {kind} head for task '{name}', but its labels in "
                                  f"{where['task:' + name]} are {all_tasks[name]['kind']}")
    schema_tasks = {}
    for name in wanted_tasks:
        spec = dict(all_tasks[name])
        kind = task_kind(name, spec)
        train_labels, applies = [], set()
        for store in holders[name]:
            labels = store.labels(name)
            try:
                kind.check_labels(labels, f"{store.url} labels/{name}")
            except LabelError as err:
                raise ConfigError(str(err)) from None
            train = keep_fraction(store.index("split") == "train", train_fraction, seed)
            train_labels.append(labels[train])
            labelled = train & ~np.isnan(labels.reshape(len(labels), -1)).all(axis=1)
            for modality in store.modalities:
                if modality in wanted_modalities and labelled.any() and np.asarray(
                        store.read_rows(0, store.n, [f"{modality}/present"])[f"{modality}/present"],
                        dtype=bool)[labelled].any():
                    applies.add(modality)
        spec = type(kind).fit_spec(spec, np.concatenate(train_labels))  # e.g. a regression's scaler
        spec["applies"] = {"modalities": sorted(applies), "sources": sorted({s.source for s in holders[name]})}
        schema_tasks[name] = spec
    return {"modalities": {n: all_modalities[n] for n in wanted_modalities}, "tasks": schema_tasks}


def _check_shared(task: str, stores: list[Store], shared: list[str] | tuple) -> None:
    """Stores that both have `task` share its head only when they say they mean the same (see build_schema)."""
    if len(stores) < 2 or task in shared:
        return
    definitions = [store.tasks[task].get("definition") for store in stores]
    if definitions[0] is not None and all(d == definitions[0] for d in definitions):
        return
    first = stores[0]
    other = next((s for s, d in zip(stores[1:], definitions[1:]) if d is None or d != definitions[0]), stores[1])
    raise ConfigError(f"task '{task}' is in stores {first.url} (source {first.source}) and {other.url} (source "
                      f"{other.source}), which do not state the same definition of it, so they would train one "
                      f"head for what may be two things. If it means the same in both, say so: "
                      f"--data.shared_tasks '[{task}]'; otherwise prepare one of them with another task name "
                      f"(e.g. --label-columns COLUMN={task}_{other.source})")


def task_applies(schema: dict, inputs: dict[str, dict], n: int) -> dict[str, np.ndarray]:
    """Per task, whether each of the `n` samples has one of the modalities its training samples had
    (`spec["applies"]`; a checkpoint from before it was recorded: everywhere)."""
    present = {name: np.asarray(batch["present"].cpu() if torch.is_tensor(batch["present"]) else batch["present"],
                                dtype=bool) for name, batch in inputs.items()}
    out = {}
    for task, spec in schema["tasks"].items():
        modalities = (spec.get("applies") or {}).get("modalities")
        if modalities is None:
            out[task] = np.ones(n, dtype=bool)
            continue
        mask = np.zeros(n, dtype=bool)
        for modality in modalities:
            if modality in present:
                mask |= present[modality]
        out[task] = mask
    return out


class Collator:
    """Store arrays of one batch → tensors: labels per task, inputs per modality (in the loader worker)."""

    def __init__(self, schema: dict, with_ids: bool = False, augment: bool = False):
        self.schema, self.with_ids, self.augment = schema, with_ids, augment
        self.modalities: dict[str, Modality] = {
            name: MODALITIES.resolve(name).from_config(config) for name, config in schema["modalities"].items()}

    def __call__(self, batch: dict) -> dict:
        out = {"source": batch["source"], "row": torch.from_numpy(np.asarray(batch["row"])),
               "labels": {}, "inputs": {}}
        for task in self.schema["tasks"]:
            if f"labels/{task}" in batch:
                out["labels"][task] = torch.from_numpy(np.ascontiguousarray(batch[f"labels/{task}"]))
        for name, modality in self.modalities.items():
            prefix = name + "/"
            arrays = {k[len(prefix):]: v for k, v in batch.items() if k.startswith(prefix)}
            if arrays:
                present = torch.from_numpy(np.asarray(arrays.pop("present"), dtype=bool))
                inputs = modality.collate(arrays)
                out["inputs"][name] = {"present": present,
                                       **(modality.augment(inputs) if self.augment else inputs)}
        if self.with_ids:
            out["sample_id"] = [str(s) for s in batch["index/sample_id"]]
        return out


# --------------------------------------------------------------------------------------- datamodule

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

    def __init__(self, stores: list[str], tasks: list[str] | dict[str, str] | None = None,
                 modalities: list[str] | None = None, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int = 0, buffer_size: int = 1024, seed: int = 0,
                 weights: dict[str, float] | None = None, temperature: float = 1.0,
                 steps_per_epoch: int | None = None, predict_split: str = "test",
                 storage_options: dict | None = None, train_fraction: float = 1.0,
                 shared_tasks: list[str] | None = None):
        super().__init__()
        check_settings("data", dict(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                                    buffer_size=buffer_size, temperature=temperature, train_fraction=train_fraction,
                                    steps_per_epoch=steps_per_epoch, weights=weights, predict_split=predict_split))
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
        return StoreStream(store, split=split, batch_size=self.batch_size if shuffle else self.eval_batch_size,
                           shuffle=shuffle, seed=self.seed, buffer_size=self.buffer_size, arrays=arrays,
                           tasks=tasks, with_ids=with_ids, fraction=self.train_fraction if split == "train" else 1.0,
                           transform=Collator(self.schema, with_ids, augment=shuffle))  # training only

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
        return MixedLoader(loaders, self.weights, self.temperature, self.seed, self.steps_per_epoch,
                           confirm_trained=True)

    def val_dataloader(self) -> ChainLoader:
        return ChainLoader(self._loaders("val", shuffle=False))

    def test_dataloader(self) -> ChainLoader:
        return ChainLoader(self._loaders("test", shuffle=False))

    def predict_dataloader(self) -> ChainLoader:
        split = None if self.predict_split == "all" else self.predict_split
        return ChainLoader(self._loaders(split, shuffle=False, with_ids=True))


# ------------------------------------------------------------------------------------------- module

class BiofmModule(LightningModule):
    """The multimodal multi-task model in training.

    Args:
        schema: modalities and tasks; linked from the data module by `biofm fit`.
        balancing: "equal", "uncertainty", "dwa", "famo" or "pcgrad" (gradient surgery, with manual
            optimisation); `balancing_options` are its keyword options.
        pretext: self-supervised tasks and their options, trained beside (or instead of) the supervised
            ones, e.g. {"masked_atoms": {"ratio": 0.15}, "two_view": {"temperature": 0.1}}; each is balanced
            as the task `pretext/<name>` (see `biofm.platform.pretext`).
        init_from: a checkpoint to start from (fine-tuning): encoders, resamplers, trunk and the heads of
            tasks it shares with this run are loaded; new tasks get fresh heads.
        fresh_heads: start every head fresh, even for shared tasks.
        freeze_encoders: train only the trunk and heads.
        linear_probe: train only the task heads and their query tokens (encoders and trunk frozen).
        layer_decay: layer-wise learning-rate decay (e.g. 0.75): heads and the final norm train at `lr`, trunk
            block i of n at lr·decay^(n - i), encoders, resamplers and the [CLS] token at lr·decay^(n + 1).
        encoders: architecture options per modality, e.g. {"molecule": {"layers": 5, "global_attention": true}}.
        pseudo_labels: semi-supervised training, e.g. {"threshold": 0.9, "start_epoch": 2, "tasks": ["glaucoma"]}:
            from `start_epoch` on, a training sample without a label for a task whose kind takes
            pseudo-labels (`TaskKind.can_pseudo_label`: the classification kinds) takes the model's own
            prediction as its label where the predicted probability is at least `threshold` (default tasks:
            every such task).
        schedule: "constant" or "cosine" (linear warm-up over `warmup_steps`, then cosine decay to zero over
            the run's total steps).
    """

    def __init__(self, schema: dict | None = None, d_model: int = 64, depth: int = 2, heads: int = 4,
                 latents: int = 8, dropout: float = 0.1, lr: float = 1e-3, weight_decay: float = 0.01,
                 balancing: str = "equal", balancing_options: dict | None = None, init_from: str | None = None,
                 fresh_heads: bool = False, freeze_encoders: bool = False, encoders: dict | None = None,
                 schedule: str = "constant", warmup_steps: int = 100, pseudo_labels: dict | None = None,
                 pretext: dict[str, dict] | None = None, linear_probe: bool = False,
                 layer_decay: float | None = None):
        super().__init__()
        check_settings("model", dict(d_model=d_model, depth=depth, heads=heads, latents=latents, dropout=dropout,
                                     lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                     layer_decay=layer_decay, schedule=schedule))
        if schema is None:
            raise ConfigError("model.schema is missing: it comes from the data module (biofm fit links it); "
                              "in Python pass BiofmDataModule(...).schema")
        # the schema (with tokenizer vocabularies) goes into checkpoints, never to a logger
        self.save_hyperparameters(logger=False)
        self.model = BiofmModel(schema, d_model, depth, heads, latents, dropout, encoders)
        try:
            self.pretexts = make_pretexts(self.model, pretext)
        except ValueError as err:
            raise ConfigError(f"model.pretext: {err}") from None
        if not schema["tasks"] and not self.pretexts:
            raise ConfigError("nothing to train: the run has no tasks (data.tasks) and no pretext tasks "
                              "(model.pretext)")
        self.balancer = make_balancer(balancing, self._balanced_tasks(schema), balancing_options)
        self.automatic_optimization = not self.balancer.gradient_based
        self._new_metrics()
        self.test_name = "test"  # the key prefix of test metrics; another for an extra evaluation (test/without:x)
        if init_from:
            try:
                load_pretrained(self.model, init_from, fresh_heads=fresh_heads)
            except ValueError as err:
                raise ConfigError(f"model.init_from: {err}") from None
        self._frozen: list[torch.nn.Module] = []
        if freeze_encoders or linear_probe:
            self._frozen = [self.model.encoders, self.model.resamplers]
        if linear_probe:
            self._frozen += [self.model.trunk, self.model.norm]
        for module in self._frozen:
            module.requires_grad_(False)
            module.eval()
        if linear_probe:
            for name, param in self.model.named_parameters():
                param.requires_grad_(name.startswith(("heads.", "queries.")))
        self._epoch_losses: dict[str, list[float]] = defaultdict(list)
        self._step_losses: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        """Frozen parts stay in evaluation mode (batch-norm statistics and dropout included)."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def _new_metrics(self, device=None) -> None:
        """Pooled metrics per stage, and per source for test (made as sources appear: every rank sees each)."""
        self.metrics = torch.nn.ModuleDict({stage: TaskMetrics(self.model.kinds, stage) for stage in ("val", "test")})
        if device is not None:
            self.metrics.to(device)
        self._source_metrics: dict[str, TaskMetrics] = {}

    def _balanced_tasks(self, schema: dict) -> list[str]:
        return list(schema["tasks"]) + [f"pretext/{name}" for name in self.pretexts]

    def forward(self, inputs: dict) -> dict:
        return self.model(inputs)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """Testing or predicting on stores with fewer (or other) tasks than the checkpoint was trained on:
        the model takes the checkpoint's schema, so its weights load whole and it predicts every task it
        knows. Modalities shared with the stores must have the same settings (the same tokenizer)."""
        from lightning.pytorch.trainer.states import TrainerFn

        saved = (checkpoint.get("hyper_parameters") or {}).get("schema")
        current = self.hparams["schema"]
        if saved is None or saved == current or self._trainer is None or self.trainer.state.fn == TrainerFn.FITTING:
            return
        for name, config in current["modalities"].items():
            if name in saved["modalities"] and saved["modalities"][name] != config:
                raise ConfigError(f"the checkpoint's modality '{name}' has other settings (e.g. another tokenizer) "
                                  "than the stores given; prepare them with the checkpoint's settings")
        hp = self.hparams
        device = next(self.parameters()).device
        self.model = BiofmModel(saved, hp["d_model"], hp["depth"], hp["heads"], hp["latents"], hp["dropout"],
                                hp["encoders"]).to(device)
        self.balancer = make_balancer(hp["balancing"], self._balanced_tasks(saved), hp["balancing_options"])
        self._new_metrics(device)
        self.hparams["schema"] = saved

    def _task_losses(self, batch: dict, out: dict) -> dict[str, torch.Tensor]:
        losses = {}
        for task, target in batch["labels"].items():
            loss, n = self.model.kinds[task].loss(out["logits"][task], target)
            if n:
                losses[task] = loss
        return losses

    def _pseudo_label(self, batch: dict, out: dict) -> dict:
        """Fill missing classification labels with confident predictions (see `pseudo_labels`)."""
        options = self.hparams.pseudo_labels
        if not options or self.current_epoch < int(options.get("start_epoch", 1)):
            return batch
        threshold = float(options.get("threshold", 0.9))
        wanted = options.get("tasks") or [t for t, k in self.model.kinds.items() if k.can_pseudo_label]
        labels, added = dict(batch["labels"]), 0
        for task in wanted:
            if task not in labels:
                continue
            labels[task], filled = self.model.kinds[task].pseudo_label(out["logits"][task], labels[task], threshold)
            added += filled
        self.log("train/pseudo_labels", float(added), batch_size=len(batch["row"]), reduce_fx="sum")
        return {**batch, "labels": labels}

    def _pretext_losses(self, inputs: dict, embedded: dict | None = None) -> dict[str, torch.Tensor]:
        """Masking pretexts share one pass over their corrupted inputs; the others share the clean inputs'
        encoder passes (`embedded`: those of the supervised pass, and any they add)."""
        embedded = {} if embedded is None else embedded
        losses: dict[str, torch.Tensor] = {}
        masking = [(n, p) for n, p in self.pretexts.items() if p.masking and p.applies(inputs)]
        if masking:
            corrupted, states = dict(inputs), {}
            for name, pretext in masking:
                corrupted[pretext.modality], states[name] = pretext.corrupt(corrupted[pretext.modality])
            hidden = {pretext.modality for _, pretext in masking}
            passes = {name: result for name, result in embedded.items() if name not in hidden}  # untouched
            trunk, mask = self.model.encode(corrupted, passes)
            encoded = Encoded(trunk, mask, {name: result[2] for name, result in passes.items()})
            for name, pretext in masking:
                loss = pretext.loss_from(self.model, encoded, states[name])
                if loss is not None:
                    losses[f"pretext/{name}"] = pretext.weight * loss
        for name, pretext in self.pretexts.items():
            if not pretext.masking and pretext.applies(inputs):
                loss = pretext.loss(self.model, inputs, embedded)
                if loss is not None:
                    losses[f"pretext/{name}"] = pretext.weight * loss
        return losses

    def _losses(self, batch: dict) -> tuple[dict[str, torch.Tensor], dict]:
        """Supervised losses of the tasks labelled in the batch (on the clean inputs) and pretext losses."""
        losses: dict[str, torch.Tensor] = {}
        embedded: dict = {}
        if batch["labels"]:
            out = self.model(batch["inputs"], embedded)
            batch = self._pseudo_label(batch, out)
            losses.update(self._task_losses(batch, out))
        losses.update(self._pretext_losses(batch["inputs"], embedded))
        return losses, batch

    def configure_callbacks(self) -> list[Callback]:
        return [ConfirmTrained()]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        losses, batch = self._losses(batch)
        total, weights = self.balancer.combine(losses) if losses else (torch.zeros((), device=self.device), {})
        if not self.automatic_optimization:
            self._gradient_step(losses)
        else:  # a batch without any label still needs a loss with a graph for the optimiser
            total = total + self._every_parameter(needed=not losses)
        size = len(batch["row"])
        self.log("train/loss", total, batch_size=size, prog_bar=True)
        for task, loss in losses.items():
            self.log(f"train/{task}/loss", loss, batch_size=size)
            self.log(f"train/{task}/weight", float(weights[task]), batch_size=size)
            self._epoch_losses[task].append(float(loss.detach()))
        self._step_losses = {t: l.detach() for t, l in losses.items()}
        return total

    def _every_parameter(self, needed: bool = False) -> torch.Tensor | float:
        """Under DDP (or when `needed`), 0 · Σ every trainable parameter: heads of tasks absent from the
        batch, encoders of modalities it lacks, pretext heads and mask vectors all get a (zero) gradient, so
        DDP's reducer finds one for each without `find_unused_parameters`. Nothing in a single process."""
        if not needed and (self._trainer is None or self.trainer.world_size == 1):
            return 0.0
        return 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)

    def _gradient_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Manual optimisation for gradient-based balancing: per-task gradients of the shared parameters
        (encoders, resamplers, trunk) are combined by the balancer; task-specific parameters (heads, query
        tokens, pretext heads) take the plain sum. The combined gradient is back-propagated as a surrogate
        (Σ p·g), so DDP averages it over ranks as usual."""
        optimiser = self.optimizers()
        optimiser.zero_grad()
        trainable = [p for p in self.parameters() if p.requires_grad]
        specific = {id(p) for n, p in self.model.named_parameters() if n.startswith(("heads.", "queries."))}
        specific |= {id(p) for p in self.pretexts.parameters()}
        shared = [p for p in trainable if id(p) not in specific]
        own = [p for p in trainable if id(p) in specific]
        surrogate = self._every_parameter()
        if losses:
            per_task = [_flat(torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True), shared)
                        for loss in losses.values()]
            combined = self.balancer.combine_gradients(per_task)
            own_grads = torch.autograd.grad(sum(losses.values()), own, allow_unused=True) if own else []
            offset = 0
            for p in shared:
                surrogate = surrogate + (p * combined[offset:offset + p.numel()].view_as(p)).sum()
                offset += p.numel()
            for p, g in zip(own, own_grads):
                if g is not None:
                    surrogate = surrogate + (p * g.detach()).sum()
        if torch.is_tensor(surrogate):  # else: one process, nothing to learn from this batch
            self.manual_backward(surrogate)
            optimiser.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.balancer.after_step(self._step_losses)

    def on_train_epoch_end(self) -> None:
        means = {t: float(np.mean(v)) for t, v in self._epoch_losses.items() if v}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            means = mean_over_ranks(means, self.balancer.tasks)
        self.balancer.epoch_end(means)
        self._epoch_losses.clear()

    def _evaluate(self, batch: dict, stage: str) -> None:
        size = len(batch["row"])
        name = self.test_name if stage == "test" else stage
        embedded: dict = {}
        if self.model.kinds:
            out = self.model(batch["inputs"], embedded)
            losses = self._task_losses(batch, out)
            if losses:
                self.log(f"{name}/loss", sum(losses.values()), batch_size=size, sync_dist=True)
            by_source = self._metrics_of_source(batch["source"]) if stage == "test" else None
            for task, target in batch["labels"].items():
                self.metrics[stage].update(task, out["logits"][task], target)
                if by_source is not None:
                    by_source.update(task, out["logits"][task], target)
        if self.pretexts:
            pretext = sum(self._pretext_losses(batch["inputs"], embedded).values())
            if torch.is_tensor(pretext):
                self.log(f"{name}/pretext/loss", pretext, batch_size=size, sync_dist=True)
                if not self.model.kinds:  # pretraining only: checkpoints keep the lowest pretext loss
                    self.log(f"{name}/macro/score", -pretext, batch_size=size, sync_dist=True)

    def _metrics_of_source(self, source: str) -> TaskMetrics:
        if source not in self._source_metrics:
            self._source_metrics[source] = TaskMetrics(self.model.kinds, f"test ({source})").to(self.device)
        return self._source_metrics[source]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def _log_metrics(self, stage: str) -> None:
        """Pooled metrics (NaN where undefined); for test with several sources, each source's too, under
        `test/<source>/…`. Sanity-check batches neither warn nor count."""
        quiet = self._trainer is not None and self.trainer.sanity_checking
        name = self.test_name if stage == "test" else stage
        with warnings.catch_warnings():
            if quiet:
                warnings.simplefilter("ignore")
            results = {f"{name}/{k}": v for k, v in self.metrics[stage].compute().items()}
            if stage == "test" and len(self._source_metrics) > 1:
                for source, metrics in sorted(self._source_metrics.items()):
                    results.update({f"{name}/{source}/{k}": v for k, v in metrics.compute().items()})
        if quiet:
            self.metrics[stage]._warned.clear()
        self.log_dict(results)
        self.metrics[stage].reset()
        if stage == "test":
            self._source_metrics = {}

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = self.model(batch["inputs"])
        result = {"source": [batch["source"]] * len(batch["row"]), "sample_id": batch.get("sample_id"),
                  "applies": task_applies(self.model.schema, batch["inputs"], len(batch["row"]))}
        for task, kind in self.model.kinds.items():
            result[task] = {k: v.cpu() for k, v in kind.predict(out["logits"][task]).items()}
        return result

    def _parameter_groups(self) -> list[dict]:
        """One group at `lr`, or with `layer_decay` one per depth of the model (see the class docstring)."""
        lr, decay = self.hparams.lr, self.hparams.layer_decay
        pretext = [p for p in self.pretexts.parameters() if p.requires_grad]
        extra = self.balancer.optimised_parameters()
        if not decay:
            return [{"params": [p for p in self.model.parameters() if p.requires_grad] + pretext + extra, "lr": lr}]
        depth = len(self.model.trunk)
        groups: dict[int, list] = defaultdict(list)
        for name, param in self.model.named_parameters():
            if not param.requires_grad:
                continue
            if name.startswith("trunk."):
                level = depth - int(name.split(".")[1])
            elif name.startswith(("encoders.", "resamplers.", "modality_embedding.", "cls")):
                level = depth + 1
            else:  # heads, query tokens, the final norm
                level = 0
            groups[level].append(param)
        groups[0] += pretext + extra
        return [{"params": params, "lr": lr * decay ** level} for level, params in sorted(groups.items()) if params]

    def configure_optimizers(self):
        optimiser = torch.optim.AdamW(self._parameter_groups(), lr=self.hparams.lr,
                                      weight_decay=self.hparams.weight_decay)
        if self.hparams.schedule == "constant":
            return optimiser
        if self.hparams.schedule != "cosine":
            raise ConfigError(f"model.schedule must be constant or cosine, got {self.hparams.schedule!r}")
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 10 + 1)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return 0.5 * (1 + math.cos(math.pi * progress))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def _flat(grads: tuple, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Gradients of `params` (None = unused) as one vector."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


# ------------------------------------------------------------------------------------- predictions

def prediction_columns(kinds: dict, out: dict, applies: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Per task of one batch's `TaskKind.predict` outputs: the prediction (class name or value in original
    units) and, for classification, one probability column per class name; with `applies` (`task_applies`),
    `<task>/applies` and no prediction (NaN, or None for class names and flags) where it is False."""
    columns: dict[str, np.ndarray] = {}
    for task, kind in kinds.items():
        own = kind.columns(out[task])
        if applies is not None:
            mask = np.asarray(applies[task], dtype=bool)
            if not mask.all():
                own = {name: _without(values, ~mask) for name, values in own.items()}
            own[f"{task}/applies"] = mask
        columns.update(own)
    return columns


def _without(values: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`values` with `rows` emptied: floats NaN, class names and flags None."""
    values = values.astype(np.float64 if values.dtype.kind == "f" else object)
    values[rows] = np.nan if values.dtype.kind == "f" else None
    return values


def predictions_frame(kinds: dict, outputs: list[dict]) -> pd.DataFrame:
    """One row per sample: `source`, `sample_id` when known, and `prediction_columns`."""
    frames = []
    for out in outputs:
        columns: dict[str, object] = {"source": out["source"]}
        if out.get("sample_id") is not None:
            columns["sample_id"] = out["sample_id"]
        columns.update(prediction_columns(kinds, out, out.get("applies")))
        frames.append(pd.DataFrame(columns))
    if len(frames) == 1:
        return frames[0]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


class ConfirmTrained(Callback):
    """Tells the training loader that a batch has been trained once Lightning counts it as processed, so
    the loader position saved in a checkpoint matches Lightning's own: a checkpoint saved inside a step (a
    SIGUSR1 handler's) trains that batch again on resume, one saved at a step's end (ModelCheckpoint, which
    Lightning runs after the other callbacks) does not."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_trained"):
            loader.mark_trained()


class PredictionWriter(Callback):
    """Writes `predictions.parquet` in the run directory (one shard per rank, merged by rank 0)."""

    def __init__(self, out_dir: str | None = None):
        self.out_dir = out_dir
        self.outputs: list[dict] = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.outputs.append(outputs)

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: BiofmModule) -> None:
        out_dir = Path(self.out_dir or trainer.default_root_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        frame = predictions_frame(pl_module.model.kinds, self.outputs)
        shard = out_dir / f"predictions-rank{trainer.global_rank}.parquet"
        frame.to_parquet(shard, index=False)
        self.outputs = []
        trainer.strategy.barrier()
        if trainer.is_global_zero:
            shards = sorted(out_dir.glob("predictions-rank*.parquet"))
            merged = pd.concat([pd.read_parquet(s) for s in shards], ignore_index=True)
            merged.to_parquet(out_dir / "predictions.parquet", index=False)
            for s in shards:
                s.unlink()


def metrics_of(trainer: Trainer, prefix: str = "test") -> dict[str, float]:
    """The metrics a run logged under `prefix/` (the prefix removed); extra evaluations logged under a longer
    prefix (`test/without:<modality>/…`) are not among them."""
    out = {}
    for key, value in trainer.callback_metrics.items():
        if key.startswith(prefix + "/") and not key[len(prefix) + 1:].startswith("without:"):
            out[key[len(prefix) + 1:]] = float(value)
    return out


def write_test_metrics(trainer: Trainer, path: str | Path | None = None, prefix: str = "test") -> Path | None:
    """Test metrics as JSON (`<run dir>/test_metrics.json`), from rank 0: `<task>/<metric>` pooled over the
    sources and, with several sources, `<source>/<task>/<metric>`; a metric that could not be computed is
    null."""
    if not trainer.is_global_zero:
        return None
    path = Path(path or Path(trainer.default_root_dir) / "test_metrics.json")
    metrics = {k: (v if math.isfinite(v) else None) for k, v in metrics_of(trainer, prefix).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, sort_keys=True))
    return path


def print_metrics(metrics: dict[str, float], title: str, file=None) -> None:
    """A table of `metrics_of`'s output: a row per `<task>/<metric>`, a column for the pooled value and one per
    source (when the run had several); NaN is shown as "–" (undefined)."""
    from rich.console import Console
    from rich.table import Table
    pooled, by_source = {}, defaultdict(dict)
    for key, value in metrics.items():
        parts = key.split("/")
        if len(parts) >= 3 and parts[0] not in ("macro", "pretext") and key.split("/", 1)[1] in metrics:
            by_source[parts[0]]["/".join(parts[1:])] = value  # `<source>/<task>/<metric>`
        else:
            pooled[key] = value
    table = Table(title=f"{title} metrics" + (" (pooled over sources, and per source)" if by_source else ""))
    table.add_column("task / metric", no_wrap=True)
    table.add_column("all sources" if by_source else "value", justify="right")
    for source in sorted(by_source):
        table.add_column(source, justify="right")

    def shown(value) -> str:
        return "–" if value is None or not math.isfinite(value) else f"{value:.4g}"
    for key in sorted(pooled, key=lambda k: (k.startswith("macro/"), k)):
        table.add_row(key, shown(pooled[key]), *[shown(by_source[s].get(key)) for s in sorted(by_source)])
    Console(file=file).print(table)


__all__ = ["BiofmDataModule", "BiofmModule", "Collator", "ConfigError", "PredictionWriter", "StoreError",
           "build_schema", "prediction_columns", "predictions_frame", "write_test_metrics"]
