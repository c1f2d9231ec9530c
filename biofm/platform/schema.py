"""The run's schema — modalities with their settings, tasks with their specs, scalers and where they apply —
read from the stores and checked (it travels in every checkpoint)."""

from __future__ import annotations

import numpy as np
import torch

from biofm.platform.errors import ConfigError
from biofm.platform.modality import MODALITIES
from biofm.platform.store import Store
from biofm.platform.stream import keep_fraction
from biofm.tasks.kinds import LabelError, task_kind


def build_schema(
    stores: list[Store],
    tasks: list[str] | dict[str, str] | None = None,
    modalities: list[str] | None = None,
    train_fraction: float = 1.0,
    seed: int = 0,
    shared_tasks: list[str] | None = None,
) -> dict:
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
                raise ConfigError(
                    f"stores {where[name]} and {store.url} both have modality '{name}' with "
                    "different settings (e.g. another tokenizer); prepare them with the same "
                    "settings"
                )
            all_modalities[name], where[name] = config, store.url
        for name, spec in store.tasks.items():
            known = all_tasks.get(name)
            if known is not None and {k: v for k, v in known.items() if k not in ("unit", "definition")} != {
                k: v for k, v in spec.items() if k not in ("unit", "definition")
            }:
                raise ConfigError(
                    f"task '{name}' is {known['kind']} in {where['task:' + name]} but "
                    f"{spec['kind']} (or has other classes) in {store.url}"
                )
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
        raise ConfigError(
            f"data.shared_tasks names {unknown_shared}, which no store has; the stores have {sorted(all_tasks)}"
        )
    for name in wanted_tasks:
        _check_shared(name, holders[name], shared_tasks or ())
    if isinstance(tasks, dict):
        for name, kind in tasks.items():
            if kind and kind != all_tasks[name]["kind"]:
                raise ConfigError(
                    f"the config asks for a {kind} head for task '{name}', but its labels in "
                    f"{where['task:' + name]} are {all_tasks[name]['kind']}"
                )
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
                if modality in wanted_modalities and labelled.any() and store.present(modality)[labelled].any():
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
    raise ConfigError(
        f"task '{task}' is in stores {first.url} (source {first.source}) and {other.url} (source "
        f"{other.source}), which do not state the same definition of it, so they would train one "
        f"head for what may be two things. If it means the same in both, say so: "
        f"--data.shared_tasks '[{task}]'; otherwise prepare one of them with another task name "
        f"(e.g. --label-columns COLUMN={task}_{other.source})"
    )


def task_applies(schema: dict, inputs: dict[str, dict], n: int) -> dict[str, np.ndarray]:
    """Per task, whether each of the `n` samples has one of the modalities its training samples had
    (`spec["applies"]`; a checkpoint from before it was recorded: everywhere)."""
    present = {
        name: np.asarray(batch["present"].cpu() if torch.is_tensor(batch["present"]) else batch["present"], dtype=bool)
        for name, batch in inputs.items()
    }
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
