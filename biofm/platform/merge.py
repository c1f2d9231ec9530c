"""One multi-task model from specialists fine-tuned from one base, without their training data.

    biofm merge --base BASE.ckpt --models A.ckpt B.ckpt … --method ties --out MERGED.ckpt
    biofm.merge(["A.ckpt", "B.ckpt"], base="BASE.ckpt", method="ties", out="MERGED.ckpt")

Task vectors τ_k = θ_k − θ_base are taken over encoders, resamplers and trunk; each task's head and query
token comes from the model that trained it (the mean where several did); batch-norm running statistics are
the models' mean. The merged schema is the union of the specialists' tasks; modality (featuriser) settings and
architecture must agree, or the merge is refused naming the difference.

Methods (λ = `scale`, N models):
- `average`: θ = mean θ_k (no base needed).
- `task_arithmetic` (Ilharco et al., 2023): θ = θ_base + λ Σ τ_k; λ defaults to 1/N.
- `ties` (Yadav et al., 2023): each τ_k trimmed to its `density` largest magnitudes (per tensor), a sign per
  entry elected by the summed trimmed mass, the mean of the entries that agree with it; θ = θ_base + λ τ.
- `breadcrumbs` (Davari & Belilovsky, 2024): per tensor, the `outliers` largest and the smallest
  1 − density − outliers of |τ_k| masked out; θ = θ_base + λ Σ m_k ⊙ τ_k; λ defaults to 1/N.
- `adamerging` (Yang et al., 2024): θ = θ_base + Σ λ_k,l τ_k,l with coefficients per model (`granularity
  task`) or per model and layer (`layer`, a layer = one module's parameters), learned by Adam from 1/N on
  unlabelled inputs of the calibration stores: the entropy of each classification task's prediction, and —
  for regression, which has no entropy — the squared difference from the specialist's own prediction on the
  same inputs (the stated surrogate). A sample counts for a task only when its store carries that task.
- `atlas` (Zhang et al., 2024): anisotropic coefficients per model and parameter block (every tensor), learned
  the same way; `labelled_fraction` of the calibration samples take their task loss instead of the surrogate.
- `twin` (Lu et al., 2024): a shared part (task arithmetic), each model's exclusive part θ_k − θ_shared as a
  rank-`rank` truncated SVD per matrix (vectors whole), and a router from the shared model's [CLS] output to
  the model whose calibration store an input came from; see `biofm.platform.twin`.

Streaming: the data-free methods hold the base, one specialist and the result (plus accumulators) at a time;
the learned ones also hold the N task vectors their every step needs. The merged checkpoint loads wherever a
checkpoint does (`biofm test`, `predict`, `predict-cohort`, the SDK, `init_from`).
"""

from __future__ import annotations

import inspect
import math
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from biofm.platform.checkpoint import biofm_schema, safe_load
from biofm.platform.errors import CheckpointError, ConfigError
from biofm.platform.merge_options import METHODS  # one list for the command line and here
from biofm.platform.model import TrunkConfig
from biofm.platform.twin import exclusive_names

LEARNED = ("adamerging", "atlas", "twin")  # these read calibration stores
ARCHITECTURE = ("d_model", "depth", "heads", "latents", "encoders", "isolate_tasks")
DEFAULT_DENSITY = {"ties": 0.2, "breadcrumbs": 0.9}


class MergeError(CheckpointError):
    """Checkpoints that cannot be merged (other architecture, featuriser settings or tasks), named."""


class Loaded:
    """One checkpoint's model weights in memory. Counts how many are alive at once (the streaming promise:
    the data-free methods hold no more than two)."""

    live = peak = 0

    def __init__(self, path: str | Path):
        checkpoint = safe_load(path)
        self.path, self.name = str(path), Path(path).stem
        self.schema = biofm_schema(checkpoint, path)
        self.hparams = dict(checkpoint.get("hyper_parameters") or {})
        self.state = {k[len("model.") :]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        Loaded.live += 1
        Loaded.peak = max(Loaded.peak, Loaded.live)

    def __del__(self):
        Loaded.live -= 1


@dataclass
class Header:
    """What a model is, kept after its weights are released: settings, schema and tensor shapes."""

    path: str
    name: str
    hparams: dict
    schema: dict
    shapes: dict[str, tuple]

    @classmethod
    def of(cls, loaded: Loaded) -> Header:
        return cls(
            loaded.path,
            loaded.name,
            loaded.hparams,
            loaded.schema,
            {k: tuple(v.shape) for k, v in loaded.state.items()},
        )

    @property
    def tasks(self) -> list[str]:
        return list(self.schema["tasks"])


def model_names(paths: list[str]) -> list[str]:
    """A distinct, readable name per checkpoint: its file's stem, or — where stems repeat, as every run's
    `last.ckpt` does — its run folder's name (the folder above `checkpoints/`), then a number."""
    stems = [Path(p).stem for p in paths]

    def run_of(path: str) -> str:
        folder = Path(path).resolve().parent
        return (folder.parent if folder.name == "checkpoints" else folder).name

    names = [s if stems.count(s) == 1 else f"{run_of(p)}/{s}" for p, s in zip(paths, stems)]
    return [n if names.count(n) == 1 else f"{n}#{i + 1}" for i, n in enumerate(names)]


def task_of(key: str) -> str | None:
    """The task whose head or query token a state key belongs to (None for shared parts)."""
    if key.startswith("heads."):
        return key.split(".")[1]
    if key.startswith("queries."):
        return key[len("queries.") :]
    return None


# ---- compatibility ------------------------------------------------------------------------------------------


def check_mergeable(base: Header | None, models: list[Header]) -> None:
    """Refuse, naming the difference, models that cannot be merged with each other or the base."""
    if not models:
        raise MergeError("no models to merge: name at least one fine-tuned checkpoint (--models)")
    reference = base or models[0]
    for model in models:
        hp = model.hparams
        if hp.get("lora"):
            raise MergeError(
                f"{model.path} has LoRA adapters: fold them in first (biofm.platform.lora.merge_lora_checkpoint)"
            )
        if hp.get("experts"):
            raise MergeError(
                f"{model.path} has task experts, whose gates depend on its task set; merge models without experts"
            )
        if hp.get("merged"):
            raise MergeError(f"{model.path} is itself a merged model; merge the specialists it came from")
        for key in ARCHITECTURE:
            if model is not reference and hp.get(key) != reference.hparams.get(key):
                raise MergeError(
                    f"{model.path} has another architecture than {reference.path}: model.{key} is "
                    f"{hp.get(key)!r} there and {reference.hparams.get(key)!r} here; merge only models fine-tuned "
                    "from the same base with the same model settings"
                )
        for name, config in model.schema["modalities"].items():
            if name not in reference.schema["modalities"]:
                if base is not None:
                    raise MergeError(
                        f"{model.path} has modality '{name}', which the base {base.path} has no encoder for"
                    )
                continue
            other = reference.schema["modalities"][name]
            if config != other:
                keys = sorted(k for k in set(config) | set(other) if config.get(k) != other.get(k))
                raise MergeError(  # the keys only: a setting may hold a tokenizer vocabulary (free text)
                    f"{model.path} and {reference.path} prepared modality '{name}' with other featuriser settings "
                    f"(they differ in {', '.join(keys)}); merge only models whose stores were prepared alike"
                )
        if base is not None:
            for key, shape in model.shapes.items():
                if task_of(key) is not None:
                    continue
                if key not in base.shapes:
                    raise MergeError(
                        f"{model.path} has {key}, which the base {base.path} lacks: not fine-tuned from it"
                    )
                if base.shapes[key] != shape:
                    raise MergeError(
                        f"{model.path} has another architecture than the base {base.path}: {key} is {shape} there and "
                        f"{base.shapes[key]} in the base"
                    )
    kinds: dict[str, tuple[str, dict]] = {}
    for model in models:
        for task, spec in model.schema["tasks"].items():
            if task in kinds:
                known, first = kinds[task]
                if (known["kind"], known.get("classes")) != (spec["kind"], spec.get("classes")):
                    raise MergeError(
                        f"task '{task}' is {known['kind']} in {first} but {spec['kind']} (or has other classes) in "
                        f"{model.path}: one head cannot be both"
                    )
            else:
                kinds[task] = (spec, model.path)


def task_groups(models: list[Header]) -> list[list[str]]:
    """Each model's tasks (those an earlier model did not bring): the merged model predicts each group with
    its own query tokens only, as its specialist was trained."""
    seen, groups = set(), []
    for model in models:
        group = [t for t in model.tasks if t not in seen]
        seen.update(group)
        if group:
            groups.append(group)
    return groups


def group_owners(models: list[Header]) -> list[int]:
    """For each of `task_groups`' groups, the index of the model it came from."""
    seen, owners = set(), []
    for i, model in enumerate(models):
        group = [t for t in model.tasks if t not in seen]
        seen.update(group)
        if group:
            owners.append(i)
    return owners


def merged_schema(base: Header | None, models: list[Header]) -> dict:
    """Modalities the specialists have (in the base's order) and the union of their tasks; a task several
    models trained keeps the first one's spec, with where it applies joined."""
    order = list((base or models[0]).schema["modalities"]) + [m for model in models for m in model.schema["modalities"]]
    have = {m for model in models for m in model.schema["modalities"]}
    modalities = {}
    for name in order:
        if name in have and name not in modalities:
            modalities[name] = next(
                model.schema["modalities"][name] for model in models if name in model.schema["modalities"]
            )
    tasks: dict[str, dict] = {}
    for model in models:
        for task, spec in model.schema["tasks"].items():
            if task not in tasks:
                tasks[task] = dict(spec)
                continue
            known = tasks[task]
            if known.get("scaler") != spec.get("scaler"):
                print(
                    f"biofm merge: warning: task '{task}' was trained with another target scaler in {model.path}; "
                    "its heads are averaged in the first model's units",
                    file=sys.stderr,
                )
            a, b = known.get("applies") or {}, spec.get("applies") or {}
            if a or b:
                known["applies"] = {k: sorted(set(a.get(k, [])) | set(b.get(k, []))) for k in ("modalities", "sources")}
    return {"modalities": modalities, "tasks": tasks}


# ---- the data-free methods -----------------------------------------------------------------------------------


class Mean:
    """Running mean per key over the models that have the key."""

    def __init__(self):
        self.sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def add(self, key: str, value: torch.Tensor) -> None:
        value = value.detach().to(torch.float64)
        self.sum[key] = self.sum[key] + value if key in self.sum else value.clone()
        self.count[key] = self.count.get(key, 0) + 1

    def result(self) -> dict[str, torch.Tensor]:
        return {k: v / self.count[k] for k, v in self.sum.items()}


def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES' trim: the `density` fraction of largest magnitudes kept, the rest zero."""
    if density >= 1.0:
        return tau
    keep = max(1, math.ceil(density * tau.numel()))
    threshold = tau.abs().flatten().kthvalue(tau.numel() - keep + 1).values
    return torch.where(tau.abs() >= threshold, tau, torch.zeros_like(tau))


def breadcrumbs_mask(tau: torch.Tensor, density: float, outliers: float) -> torch.Tensor:
    """Model Breadcrumbs' mask of one tensor: the `outliers` largest and the smallest 1 − density − outliers
    magnitudes out, the `density` fraction between them kept."""
    n = tau.numel()
    n_top = int(round(outliers * n))
    n_keep = min(n - n_top, int(round(density * n)))
    bottom = n - n_top - n_keep
    rank = torch.empty(n, dtype=torch.long)
    rank[tau.abs().flatten().argsort()] = torch.arange(n)
    return ((rank >= bottom) & (rank < bottom + n_keep)).reshape(tau.shape)


@dataclass
class Pool:
    """The models to merge and what every method shares: the base's weights, the names of the shared float
    parameters, and the task-specific and buffer values collected in the first pass."""

    base_weights: Loaded | None
    models: list[Header]
    shared: list[str]  # float parameters with task vectors (not heads, queries or buffers)
    buffers: set[str]
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)  # heads, queries, buffers: the models' mean

    @property
    def base(self) -> dict[str, torch.Tensor] | None:
        return self.base_weights.state if self.base_weights is not None else None

    def each(self) -> Callable:
        """Yields (index, weights) of each model in turn, releasing the previous one first (no zip or
        enumerate around it: their reused result tuple would keep the previous one alive)."""

        def generator():
            for i, header in enumerate(self.models):
                loaded = Loaded(header.path)
                yield i, loaded
                del loaded

        return generator()

    def task_vector(self, loaded: Loaded, key: str) -> torch.Tensor:
        return loaded.state[key].to(torch.float64) - self.base[key].to(torch.float64)

    def collect_fixed(self, loaded: Loaded, mean: Mean, firsts: dict) -> None:
        for key, value in loaded.state.items():
            if task_of(key) is not None or key in self.buffers:
                if value.is_floating_point():
                    mean.add(key, value)
                else:
                    firsts.setdefault(key, value.clone())


def _linear(pool: Pool, method: str, scale: float, density: float, outliers: float) -> dict[str, torch.Tensor]:
    """average, task_arithmetic, breadcrumbs: one pass, a running sum."""
    total, mean, firsts = Mean(), Mean(), {}
    for _, loaded in pool.each():
        pool.collect_fixed(loaded, mean, firsts)
        for key in pool.shared:
            if key not in loaded.state:
                continue
            if method == "average":
                total.add(key, loaded.state[key])
                continue
            tau = pool.task_vector(loaded, key)
            if method == "breadcrumbs":
                tau = tau * breadcrumbs_mask(tau, density, outliers)
            total.add(key, tau)
        del loaded
    pool.fixed = {**mean.result(), **firsts}
    if method == "average":
        merged = total.result()
        return {k: merged.get(k, pool.base[k] if pool.base else None) for k in pool.shared}
    return {k: pool.base[k] + scale * total.sum[k] if k in total.sum else pool.base[k] for k in pool.shared}


def _ties(pool: Pool, scale: float, density: float) -> dict[str, torch.Tensor]:
    """Trim, elect sign, disjoint mean: two passes over the models (the sign needs every trimmed vector)."""
    mass, mean, firsts = Mean(), Mean(), {}
    for _, loaded in pool.each():
        pool.collect_fixed(loaded, mean, firsts)
        for key in pool.shared:
            if key in loaded.state:
                mass.add(key, trim(pool.task_vector(loaded, key), density))
        del loaded
    pool.fixed = {**mean.result(), **firsts}
    sign = {k: torch.sign(v) for k, v in mass.sum.items()}
    agreeing, count = {}, {}
    for _, loaded in pool.each():
        for key in sign:
            if key not in loaded.state:
                continue
            tau = trim(pool.task_vector(loaded, key), density)
            agree = (torch.sign(tau) == sign[key]) & (tau != 0)
            agreeing[key] = agreeing.get(key, 0) + torch.where(agree, tau, torch.zeros_like(tau))
            count[key] = count.get(key, 0) + agree.to(torch.float64)
        del loaded
    return {
        k: pool.base[k] + scale * agreeing[k] / count[k].clamp_min(1) if k in agreeing else pool.base[k]
        for k in pool.shared
    }


# ---- calibration inputs and the learned methods -------------------------------------------------------------


@dataclass
class Calibration:
    """Batches of the calibration stores, each with the tasks its store carries (a sample counts only for
    those) and, for aTLAS, which of its rows may use their labels."""

    batches: list[dict]
    store_tasks: list[list[str]]  # per batch
    labelled: list[torch.Tensor]  # per batch: [B] bool


def calibration(
    schema: dict,
    stores: Sequence[str],
    split: str = "val",
    batch_size: int = 64,
    max_samples: int = 512,
    labelled_fraction: float = 0.0,
    seed: int = 0,
) -> Calibration:
    """Up to `max_samples` inputs of each store's `split` ("all": every split), collated for `schema`."""
    from biofm.platform.data import Collator
    from biofm.platform.store import Store
    from biofm.platform.stream import StoreStream

    out = Calibration([], [], [])
    generator = torch.Generator().manual_seed(seed)
    for url in stores:
        store = Store(url)
        for name, config in store.modalities.items():
            if name in schema["modalities"] and schema["modalities"][name] != config:
                raise ConfigError(
                    f"calibration store {url}: modality '{name}' was prepared with other settings than the models' "
                    "(e.g. another tokenizer); prepare it with the models' settings"
                )
        modalities = [m for m in schema["modalities"] if m in store.modalities]
        if not modalities:
            raise ConfigError(
                f"calibration store {url} has none of the models' modalities {sorted(schema['modalities'])}"
            )
        tasks = [t for t in schema["tasks"] if t in store.tasks]
        stream = StoreStream(
            store,
            split=None if split == "all" else split,
            batch_size=batch_size,
            shuffle=False,
            seed=seed,
            arrays=[a for m in modalities for a in store.arrays_of(m)],
            tasks=tasks,
            transform=Collator(schema),
        )
        if not stream.n_selected:
            raise ConfigError(f"calibration store {url} has no samples in split '{split}'; choose another split")
        seen = 0
        for batch in stream:
            n = len(batch["row"])
            out.batches.append(batch)
            out.store_tasks.append(tasks)
            out.labelled.append(torch.rand(n, generator=generator) < labelled_fraction)
            seen += n
            if seen >= max_samples:
                break
    return out


def build(hparams: dict, schema: dict, merged: dict | None = None):
    """A model of the settings in `hparams` for `schema` (no weights loaded)."""
    settings = {**hparams, "merged": merged}
    return TrunkConfig.of(settings).build(schema)


def is_classification(kind) -> bool:
    """Whether a task kind predicts class probabilities (its unsupervised objective is their entropy)."""
    return kind.entropy(torch.zeros(1, kind.out_dim)) is not None


def surrogate(kind, logits: torch.Tensor, reference: torch.Tensor | None) -> torch.Tensor:
    """Per-sample unsupervised objective: entropy for classification, squared difference from the
    specialist's logits for the rest (regression has no entropy)."""
    entropy = kind.entropy(logits)
    return entropy if entropy is not None else ((logits - reference) ** 2).sum(dim=1)


def references(pool: Pool, data: Calibration) -> list[dict[str, torch.Tensor]]:
    """Each specialist's own logits on the calibration batches, for its non-classification tasks."""
    out: list[dict[str, torch.Tensor]] = [{} for _ in data.batches]
    for i, loaded in pool.each():
        header = pool.models[i]
        model = build(header.hparams, header.schema)
        model.load_state_dict(loaded.state)
        model.eval()
        del loaded
        with torch.no_grad():
            for i, batch in enumerate(data.batches):
                wanted = [t for t in data.store_tasks[i] if t in model.kinds and not is_classification(model.kinds[t])]
                if wanted:
                    logits = model(batch["inputs"])["logits"]
                    out[i].update({t: logits[t] for t in wanted})
    return out


def objective(
    template, logits: dict, batch: dict, tasks: list[str], owners: dict, reference: dict, labelled
) -> torch.Tensor:
    """Σ over the specialists of the mean over their tasks in this batch of the per-sample objective (task loss
    on labelled rows, the surrogate elsewhere), over the samples each task applies to."""
    from biofm.platform.schema import task_applies

    applies = task_applies(template.schema, batch["inputs"], len(batch["row"]))
    per_model: dict[int, list[torch.Tensor]] = {}
    for task in tasks:
        kind = template.kinds[task]
        rows = torch.from_numpy(applies[task])
        if not rows.any():
            continue
        terms = []
        unlabelled = rows & ~labelled
        if unlabelled.any():
            ref = reference.get(task)
            terms.append(surrogate(kind, logits[task][unlabelled], None if ref is None else ref[unlabelled]).mean())
        supervised = rows & labelled
        if supervised.any() and task in batch["labels"]:
            loss, n = kind.loss(logits[task][supervised], batch["labels"][task][supervised])
            if n:
                terms.append(loss)
        if terms:
            per_model.setdefault(owners[task], []).append(sum(terms))
    if not per_model:
        return torch.zeros(())
    return sum(torch.stack(v).mean() for v in per_model.values())


def _learn(
    pool: Pool,
    method: str,
    data: Calibration,
    hparams: dict,
    schema: dict,
    granularity: str,
    steps: int,
    lr: float,
    progress: bool,
) -> tuple[dict[str, torch.Tensor], dict]:
    """AdaMerging / aTLAS: coefficients of the task vectors learned on the calibration batches."""
    mean, firsts, taus = Mean(), {}, []
    for _, loaded in pool.each():
        pool.collect_fixed(loaded, mean, firsts)
        taus.append({k: pool.task_vector(loaded, k).float() for k in pool.shared if k in loaded.state})
        del loaded
    pool.fixed = {**mean.result(), **firsts}
    if method == "atlas":
        group_of = {k: k for k in pool.shared}  # a block: one parameter tensor
    elif granularity == "layer":
        group_of = {k: k.rpartition(".")[0] or k for k in pool.shared}  # a layer: one module's parameters
    elif granularity == "task":
        group_of = {k: "all" for k in pool.shared}
    else:
        raise ConfigError(f"granularity must be 'task' or 'layer', got {granularity!r}")
    groups = sorted(set(group_of.values()))
    index = {g: i for i, g in enumerate(groups)}
    n = len(pool.models)
    coefficients = torch.full((n, len(groups)), 1.0 / n, requires_grad=True)
    template = build(hparams, schema, {"groups": task_groups(pool.models)})  # predicts as the merged model
    base = {k: pool.base[k].float() for k in pool.shared}
    own = template.state_dict()
    template.load_state_dict({**{k: v.to(own[k].dtype) for k, v in pool.fixed.items()}, **base})
    template.eval()
    owners = {t: i for i, h in enumerate(pool.models) for t in h.tasks}
    reference = references(pool, data)

    def params_of(lam: torch.Tensor) -> dict[str, torch.Tensor]:
        return {
            k: base[k] + sum(lam[m, index[group_of[k]]] * tau[k] for m, tau in enumerate(taus) if k in tau)
            for k in pool.shared
        }

    def loss_at(lam: torch.Tensor, i: int) -> torch.Tensor:
        batch = data.batches[i]
        logits = torch.func.functional_call(template, params_of(lam), (batch["inputs"],))["logits"]
        return objective(template, logits, batch, data.store_tasks[i], owners, reference[i], data.labelled[i])

    def calibration_objective(lam: torch.Tensor) -> float:
        with torch.no_grad():
            return round(float(np.mean([float(loss_at(lam, i)) for i in range(len(data.batches))])), 5)

    before = calibration_objective(coefficients.detach())
    optimiser = torch.optim.Adam([coefficients], lr=lr)
    order = _interleaved(data)
    for step in _progress(range(steps), progress, f"{method}: learning coefficients"):
        loss = loss_at(coefficients, order[step % len(order)])
        optimiser.zero_grad()
        if loss.requires_grad:
            loss.backward()
            optimiser.step()
    lam = coefficients.detach()
    merged = {
        k: pool.base[k]
        + sum(lam[m, index[group_of[k]]].double() * tau[k].double() for m, tau in enumerate(taus) if k in tau)
        for k in pool.shared
    }
    record = {
        "coefficients": {
            h.name: (
                {g: round(float(lam[m, index[g]]), 4) for g in groups}
                if len(groups) > 1
                else round(float(lam[m, 0]), 4)
            )
            for m, h in enumerate(pool.models)
        },
        # the objective over every calibration batch, at the start (task arithmetic, λ = 1/N) and the end
        "objective": {"start": before, "end": calibration_objective(lam)},
    }
    return merged, record


def _interleaved(data: Calibration) -> list[int]:
    """Batch order that takes the stores in turn (each step one batch of the next store)."""
    by_store: dict[tuple, list[int]] = {}
    for i, tasks in enumerate(data.store_tasks):
        by_store.setdefault(tuple(tasks), []).append(i)
    queues = list(by_store.values())
    order = []
    for j in range(max(len(q) for q in queues)):
        order += [q[j % len(q)] for q in queues]
    return order


def _progress(iterable, enabled: bool, description: str):
    if not enabled:
        return iterable
    from rich.progress import track

    return track(iterable, description=description, transient=True)


def _twin(
    pool: Pool,
    data: Calibration | None,
    hparams: dict,
    schema: dict,
    scale: float,
    rank: int,
    route: str,
    steps: int,
    progress: bool,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Twin-Merging: the shared part, each model's compressed exclusive part and — routing by input — the
    router, trained on 80 % of the calibration inputs to name the model whose store an input came from (its
    balanced accuracy on the other 20 % is reported)."""
    shared = _linear(pool, "task_arithmetic", scale, 1.0, 0.0)
    groups, owners = task_groups(pool.models), group_owners(pool.models)
    merged = {
        "method": "twin",
        "twin": {"rank": rank, "experts": len(pool.models), "route": route, "owners": owners},
        "groups": groups,
    }
    model = build(hparams, schema, merged)
    state = model.state_dict()
    model.load_state_dict(
        {
            **state,
            **{k: v.to(state[k].dtype) for k, v in pool.fixed.items()},
            **{k: v.to(state[k].dtype) for k, v in shared.items()},
        }
    )
    with torch.no_grad():
        for i, loaded in pool.each():
            part = model.exclusive[i]
            for name in part.shapes:
                if name in loaded.state:
                    part.set(name, loaded.state[name].to(torch.float64) - shared[name], rank)
            for name in part.states:
                part.set_state(name, loaded.state[name] if name in loaded.state else pool.fixed.get(name, state[name]))
            del loaded
    kept = sum(b.numel() for part in model.exclusive for n, b in part.named_buffers() if not n.endswith("__s"))
    full = sum(model.get_parameter(n).numel() for n in model.exclusive[0].shapes) * len(pool.models)
    record = {"exclusive_fraction": round(kept / max(full, 1), 4), "rank": rank, "route": route}
    if route == "input":
        record["router_accuracy"] = _train_router(model, pool, data, steps, progress, seed)
    return {k: v for k, v in model.state_dict().items()}, {**merged, **record}


def _train_router(model, pool: Pool, data: Calibration, steps: int, progress: bool, seed: int) -> float:
    """Train the router on the shared model's [CLS] of 80 % of the calibration inputs (class-balanced);
    returns its balanced accuracy on the other 20 %."""
    owners = {}
    for i, header in enumerate(pool.models):
        for task in header.tasks:
            owners.setdefault(task, i)
    features, targets = [], []
    model.eval()
    with torch.no_grad():
        for batch, tasks in zip(data.batches, data.store_tasks):
            votes = [owners[t] for t in tasks if t in owners]
            if not votes:
                continue
            owner = max(set(votes), key=votes.count)  # the model that trained most of the store's tasks
            cls = model(batch["inputs"], route=False)["cls"]
            features.append(cls)
            targets.append(torch.full((len(cls),), owner))
    if not features:
        raise ConfigError("twin: no calibration store carries a task of the merged models; name their stores")
    x, y = torch.cat(features), torch.cat(targets)
    generator = torch.Generator().manual_seed(seed)
    held = torch.rand(len(y), generator=generator) < 0.2
    torch.manual_seed(seed)
    optimiser = torch.optim.AdamW(model.router.parameters(), lr=1e-2, weight_decay=0.05)
    counts = torch.bincount(y[~held], minlength=len(pool.models)).clamp_min(1)
    balance = (len(y) / (len(counts) * counts.double())).float()  # every specialist's inputs weigh the same
    for _ in _progress(range(steps), progress, "twin: training the router"):
        loss = torch.nn.functional.cross_entropy(model.route(x[~held]), y[~held], weight=balance)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    with torch.no_grad():
        right = (model.route(x[held]).argmax(1) == y[held]).double()
    per_class = [right[y[held] == k].mean() for k in y[held].unique()]
    return round(float(torch.stack(per_class).mean()), 4) if per_class else math.nan


# ---- the entry point -------------------------------------------------------------------------------------------


def merge(
    models: Sequence[str | Path],
    base: str | Path | None = None,
    method: str = "ties",
    out: str | Path | None = None,
    scale: float | None = None,
    density: float | None = None,
    outliers: float = 0.01,
    calibration_stores: Sequence[str] | None = None,
    calibration_split: str = "val",
    calibration_samples: int = 512,
    steps: int = 300,
    lr: float = 1e-3,
    granularity: str = "layer",
    labelled_fraction: float = 0.0,
    rank: int = 8,
    route: str = "input",
    renormalise: bool = False,
    seed: int = 0,
    progress: bool | None = None,
) -> dict:
    """Merge fine-tuned checkpoints `models` (all from `base`) into one checkpoint `out`; returns a summary
    (method, tasks, seconds, peak memory, models held at once, and what was learned). See the module's text."""
    if method not in METHODS:
        raise ConfigError(f"merge method {method!r} is not one of {', '.join(METHODS)}")
    if out is None:
        raise ConfigError("name the merged checkpoint to write (out=… / --out)")
    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; choose another path for the merged checkpoint")
    if base is None and method != "average":
        raise ConfigError(f"{method} takes task vectors against the base: name the pretrained checkpoint (--base)")
    if route not in ("input", "task"):
        raise ConfigError(f"twin's route must be 'input' (a router) or 'task' (each task its own part), got {route!r}")
    needs_inputs = (method in LEARNED and not (method == "twin" and route == "task")) or renormalise
    if needs_inputs and not calibration_stores:
        what = f"{method} learns" if method in LEARNED else "--renormalise recomputes batch-norm statistics"
        raise ConfigError(f"{what} on unlabelled inputs: name calibration stores (--calibration STORE …)")
    density = DEFAULT_DENSITY.get(method, 1.0) if density is None else float(density)
    if not 0 < density <= 1 or not 0 <= outliers < 1 or (method == "breadcrumbs" and density + outliers > 1 + 1e-9):
        raise ConfigError(f"density must be in (0, 1] and density + outliers ≤ 1; got {density} and {outliers}")
    if not 0 <= labelled_fraction <= 1:
        raise ConfigError(f"labelled_fraction must be in [0, 1], got {labelled_fraction}")
    progress = sys.stderr.isatty() if progress is None else progress
    started = time.perf_counter()
    Loaded.peak = Loaded.live
    base_loaded = Loaded(base) if base is not None else None
    base_header = Header.of(base_loaded) if base_loaded else None
    headers = []
    for path in models:
        loaded = Loaded(path)
        headers.append(Header.of(loaded))
        del loaded
    for header, name in zip(headers, model_names([h.path for h in headers])):
        header.name = name  # the coefficients and the router are keyed by it
    check_mergeable(base_header, headers)
    schema = merged_schema(base_header, headers)
    reference = base_header or headers[0]
    hparams = {k: v for k, v in reference.hparams.items() if k not in ("schema", "_instantiator")}
    template = build(hparams, schema)
    buffers = {n for n, _ in template.named_buffers()}
    shared = exclusive_names(template)
    n = len(headers)
    scale = (1.0 if method in ("ties",) else 1.0 / n) if scale is None else float(scale)
    pool = Pool(base_loaded, headers, shared, buffers)
    del base_loaded
    record: dict = {"method": method, "models": [{"name": h.name, "tasks": h.tasks} for h in headers]}
    record["groups"] = task_groups(headers)
    if method in ("average", "task_arithmetic", "breadcrumbs"):
        weights = _linear(pool, method, scale, density, outliers)
        sparse = method == "breadcrumbs"
        record.update(scale=scale, density=density if sparse else None, outliers=outliers if sparse else None)
    elif method == "ties":
        weights = _ties(pool, scale, density)
        record.update(scale=scale, density=density)
    else:
        data = calibration(
            schema, calibration_stores, calibration_split, max_samples=calibration_samples,
            labelled_fraction=labelled_fraction if method == "atlas" else 0.0, seed=seed,
        ) if calibration_stores else None  # fmt: skip
        if method == "twin":
            weights, learned = _twin(pool, data, hparams, schema, scale, rank, route, steps, progress, seed)
            record.update(learned, scale=scale)
        else:
            weights, learned = _learn(pool, method, data, hparams, schema, granularity, steps, lr, progress)
            record.update(learned, granularity=None if method == "atlas" else granularity)
            record.update(labelled_fraction=labelled_fraction if method == "atlas" else None)
    state = {**pool.fixed, **weights}
    del pool
    record = {k: v for k, v in record.items() if v is not None}
    if renormalise:
        if method not in LEARNED or data is None:
            data = calibration(
                schema, calibration_stores, calibration_split, max_samples=calibration_samples, seed=seed
            )
        state, record["renormalised"] = renormalised(hparams, schema, record, state, data)
    path = _write(hparams, schema, state, record, out)
    seconds = time.perf_counter() - started
    return {
        **record,
        "out": str(path),
        "tasks": list(schema["tasks"]),
        "seconds": round(seconds, 3),
        "peak_rss_mib": peak_rss_mib(),
        "models_held_at_once": Loaded.peak,
    }


def renormalised(hparams: dict, schema: dict, record: dict, state: dict, data: Calibration) -> tuple[dict, int]:
    """The merged weights with every batch-norm layer's running statistics measured again on the calibration
    inputs (the specialists' mean does not describe the merged model's activations; REPAIR's observation,
    Jordan et al., 2023). A Twin-Merging model's routed parts keep their specialists' own statistics."""
    model = build(hparams, schema, record)
    own = model.state_dict()
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return state, 0
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative mean over every calibration batch
        norm.train()
    options = {"route": False} if record.get("method") == "twin" else {}
    with torch.no_grad():
        for batch in data.batches:
            model(batch["inputs"], **options)
    return {**state, **model.state_dict()}, len(norms)


def peak_rss_mib() -> float:
    """This process's peak resident memory: VmHWM of its own address space (`ru_maxrss` would count the
    parent's memory too for a process started by fork and exec, as `biofm merge` from a benchmark is)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def _write(hparams: dict, schema: dict, state: dict[str, torch.Tensor], record: dict, out: Path) -> Path:
    """The merged checkpoint, built and loaded back strictly before it is written (atomically)."""
    from biofm.platform.lightning import BiofmModule

    settings = {
        **hparams,
        "schema": schema,
        "init_from": None,
        "lora": None,
        "experts": None,
        "balancing": "equal",
        "balancing_options": None,
        "pretext": None,
        "pseudo_labels": None,
        "merged": record,
    }
    accepted = inspect.signature(BiofmModule.__init__).parameters
    settings = {k: v for k, v in settings.items() if k in accepted}
    module = BiofmModule(**settings)
    own = module.model.state_dict()
    missing = sorted(set(own) - set(state))
    if missing:
        raise MergeError(
            f"the merge left {len(missing)} weights unset (e.g. {missing[0]}); this is a bug in biofm merge"
        )
    module.model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    checkpoint = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "epoch": 0,
        "global_step": 0,
        "pytorch-lightning_version": _lightning_version(),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    torch.save(checkpoint, partial)
    partial.replace(out)
    return out


def _lightning_version() -> str:
    import lightning

    return lightning.__version__
