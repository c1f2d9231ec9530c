"""Twin-Merging's model (Lu et al., 2024): one shared merged model, each specialist's exclusive knowledge as
a low-rank difference from it, and a router that picks, per input, whose exclusive part to add.

With `route="task"` there is no router: each task's group of predictions takes the exclusive part of the
specialist that trained it (biofm knows which task a prediction is for, which Twin-Merging's text models do
not), one pass per group. `biofm merge --method twin` writes it; `TrunkConfig.build` rebuilds it from a checkpoint's `merged` settings,
so `biofm test`, `predict`, `predict-cohort` and the SDK run it like any model. The router reads the shared
model's [CLS] output; each sample is predicted with θ_shared + Δ_k of its top-1 specialist k (the router is a
classifier of which specialist's data an input resembles, near one-hot on the inputs it was trained on), one
pass per specialist chosen in the batch — exact per sample, at most N passes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from biofm.platform.model import BiofmModel

TASK_PARTS = ("heads.", "queries.")  # a task's own parameters: each comes from the model that trained it


def exclusive_names(model: nn.Module) -> list[str]:
    """The parameters that carry exclusive knowledge: every float parameter but task heads and query tokens."""
    return [n for n, p in model.named_parameters() if not n.startswith(TASK_PARTS) and p.is_floating_point()]


def exclusive_buffers(model: nn.Module) -> list[str]:
    """Float buffers (batch-norm running statistics): each specialist's own, kept whole in its part."""
    return [n for n, b in model.named_buffers() if b.is_floating_point()]


def low_rank_shape(shape: torch.Size | tuple, rank: int) -> tuple[int, int, int] | None:
    """(rows, columns, rank) of a parameter's truncated-SVD factors, or None when it is kept whole (a vector,
    or a matrix with no more than `rank` rows or columns: nothing to compress)."""
    if len(shape) < 2:
        return None
    rows, cols = int(shape[0]), int(math.prod(shape[1:]))
    return None if min(rows, cols) <= rank else (rows, cols, rank)


class ExclusivePart(nn.Module):
    """One specialist's Δ = θ_k − θ_shared: `a` [rows, r] · `b` [r, cols] for matrices, Δ itself otherwise;
    and its own float buffers (its batch-norm statistics: the shared part's are the specialists' mean)."""

    def __init__(self, model: nn.Module, rank: int):
        super().__init__()
        self.shapes = {}
        for name in exclusive_names(model):
            param = model.get_parameter(name)
            key = name.replace(".", "__")
            low = low_rank_shape(param.shape, rank)
            if low is None:
                self.register_buffer(f"{key}__d", torch.zeros_like(param))
            else:
                rows, cols, r = low
                self.register_buffer(f"{key}__a", torch.zeros(rows, r, dtype=param.dtype))
                self.register_buffer(f"{key}__b", torch.zeros(r, cols, dtype=param.dtype))
            self.shapes[name] = (key, param.shape, low is not None)
        self.states = {}
        for name in exclusive_buffers(model):
            key = name.replace(".", "__")
            self.register_buffer(f"{key}__s", torch.zeros_like(model.get_buffer(name)))
            self.states[name] = key

    def set_state(self, name: str, value: torch.Tensor) -> None:
        """Store the specialist's own value of buffer `name` (e.g. its batch-norm running statistics)."""
        getattr(self, f"{self.states[name]}__s").copy_(value)

    def set(self, name: str, delta: torch.Tensor, rank: int) -> None:
        """Store Δ of parameter `name`, compressed to its shape's rank."""
        key, shape, low = self.shapes[name]
        if not low:
            getattr(self, f"{key}__d").copy_(delta)
            return
        u, s, vh = torch.linalg.svd(delta.reshape(shape[0], -1).float(), full_matrices=False)
        getattr(self, f"{key}__a").copy_(u[:, :rank] * s[:rank])
        getattr(self, f"{key}__b").copy_(vh[:rank])

    def delta(self, name: str) -> torch.Tensor:
        key, shape, low = self.shapes[name]
        if not low:
            return getattr(self, f"{key}__d")
        return (getattr(self, f"{key}__a") @ getattr(self, f"{key}__b")).reshape(shape)


class TwinMergedModel(BiofmModel):
    """A `BiofmModel` (the shared merged part) + one `ExclusivePart` per specialist + a router over them."""

    def __init__(self, schema: dict, config):
        super().__init__(schema, config)
        twin = config.merged["twin"]
        self.rank, n = int(twin["rank"]), int(twin["experts"])
        self.route_by = twin.get("route", "input")  # "input": the router picks per sample; "task": per task
        self.exclusive = nn.ModuleList([ExclusivePart(self, self.rank) for _ in range(n)])
        self.router = nn.Sequential(nn.Linear(self.d_model, self.d_model), nn.GELU(), nn.Linear(self.d_model, n))

    def _by_task(self, inputs: dict, tasks: list[str] | None, shared: dict) -> dict:
        """Each task group with its own specialist's part (θ_shared + Δ_k): no router, exact per task up to
        the compression; one pass per group asked for."""
        groups = self.config.merged.get("groups") or [list(self.queries)]
        owners = self.config.merged["twin"].get("owners") or list(range(len(groups)))
        wanted = set(self.queries) if tasks is None else set(tasks)
        out = {**shared, "logits": {}}
        for group, k in zip(groups, owners):
            asked = [t for t in group if t in wanted]
            if asked:
                subset = None if set(asked) == set(self.queries) else asked  # one group: the whole model
                chosen = torch.func.functional_call(
                    self, self.expert_parameters(k), (inputs,), {"tasks": subset, "route": False}
                )
                out["logits"].update(chosen["logits"])
        return out

    def route(self, cls: torch.Tensor) -> torch.Tensor:
        """Router logits [B, N] from the shared model's [CLS] output [B, d]."""
        return self.router(cls)

    def expert_parameters(self, k: int) -> dict[str, torch.Tensor]:
        """θ_shared + Δ_k for every parameter with exclusive knowledge, and specialist k's own buffers."""
        part = self.exclusive[k]
        weights = {name: self.get_parameter(name) + part.delta(name) for name in part.shapes}
        return {**weights, **{name: getattr(part, f"{key}__s") for name, key in part.states.items()}}

    def forward(self, inputs: dict, tasks: list[str] | None = None, route: bool = True) -> dict:
        shared = super().forward(inputs, tasks)
        if not route:
            return shared
        if self.route_by == "task":
            return self._by_task(inputs, tasks, shared)
        choice = self.route(shared["cls"].detach()).argmax(dim=1)  # [B]
        out = {**shared, "logits": dict(shared["logits"]), "expert": choice}
        for k in choice.unique().tolist():
            chosen = torch.func.functional_call(
                self, self.expert_parameters(k), (inputs,), {"tasks": tasks, "route": False}
            )
            rows = choice == k
            out["cls"] = torch.where(rows[:, None], chosen["cls"], out["cls"])
            out["tasks"] = torch.where(rows[:, None, None], chosen["tasks"], out["tasks"])
            for task, logits in chosen["logits"].items():
                out["logits"][task] = torch.where(rows[:, None], logits, out["logits"][task])
        return out
