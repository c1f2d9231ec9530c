"""A mixture of task experts in place of a trunk block's MLP (TaskExpert, HoME, M³ViT).

    [CLS] and modality latents ── shared experts, weighed by the shared gate ───────────────┐
    query token of task t ──────── shared experts + the experts of t's group, weighed by t's gate ─┴─ block output

Each task has its own gate (a linear map of its query token's state, softmax over the experts it may use,
optionally top-k); the [CLS] and modality tokens go through the shared experts under one shared gate. What
HoME found is built in: every expert's output is layer-normalised (so a gate weighs experts of equal scale,
not the loudest), experts use SiLU (fewer dead units than ReLU), and a task keeps at least `own_floor` of its
gate mass on its own group's experts (a data-sparse task does not collapse onto the shared ones). The
balancing term is Switch-style for top-k (E·Σ f_e·P_e) and E·Σ P̄_e² − 1 for soft gates (0 when uniform).

With `memory` (TaskExpert's multi-task feature memory) each expert block's output for a task token is added to
that task's memory, which the head reads beside the token. Task tokens must not be read by other tokens
(`TrunkConfig.isolate_tasks`, on whenever experts are): predicting a subset of tasks then runs only their
experts and gives the same predictions for them (M³ViT's inference path; `expert_flops` counts what it saves).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULTS = {
    "blocks": [-1],  # which trunk blocks get experts (negative: from the end)
    "shared": 2,  # experts every token may use
    "per_group": 1,  # experts per task group
    "groups": "task",  # "task" (each task its own group) or {group: [tasks]} (tasks in no group: shared only)
    "hidden": None,  # each expert's hidden width (default 2·d_model)
    "top_k": None,  # None: soft gates over every allowed expert; k: the k largest gate values, renormalised
    "balance": 0.01,  # weight of the load-balancing term in the training loss
    "own_floor": 0.1,  # the least gate mass a task keeps on its own group's experts
    "memory": False,  # TaskExpert's multi-task feature memory
}


def expert_options(options: Mapping | None) -> dict | None:
    """The experts' settings with defaults filled in (None: no experts); unknown keys are an error."""
    if options is None or options is False:
        return None
    options = dict(options)
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise ValueError(f"model.experts: unknown options {unknown}; known: {sorted(DEFAULTS)}")
    merged = {**DEFAULTS, **options}
    if int(merged["shared"]) < 1 and int(merged["per_group"]) < 1:
        raise ValueError("model.experts: needs at least one expert (shared or per_group ≥ 1)")
    if merged["top_k"] is not None and int(merged["top_k"]) < 1:
        raise ValueError(f"model.experts.top_k must be at least 1, got {merged['top_k']}")
    if not 0.0 <= float(merged["own_floor"]) < 1.0:
        raise ValueError(f"model.experts.own_floor must be in [0, 1), got {merged['own_floor']}")
    return merged


def task_groups(tasks: Sequence[str], groups) -> dict[str, str | None]:
    """Each task's group name (None: shared experts only)."""
    if groups == "task":
        return {t: t for t in tasks}
    if not isinstance(groups, Mapping):
        raise ValueError(f"model.experts.groups must be 'task' or a mapping group → tasks, got {groups!r}")
    of = {}
    for group, members in groups.items():
        for t in members:
            if t in of:
                raise ValueError(f"model.experts.groups: task '{t}' is in groups '{of[t]}' and '{group}'")
            of[t] = str(group)
    return {t: of.get(t) for t in tasks}


class Expert(nn.Module):
    """Linear → SiLU → Linear → LayerNorm: a small MLP whose output has a fixed scale."""

    def __init__(self, d_model: int, hidden: int, dropout: float = 0.0, normalise: bool = True):
        super().__init__()
        self.up, self.down = nn.Linear(d_model, hidden), nn.Linear(hidden, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model) if normalise else nn.Identity()
        self.active: torch.Tensor | None = None  # hidden units some token of this training pass activated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.up(x)
        if self.training:
            with torch.no_grad():
                active = (pre.reshape(-1, pre.shape[-1]) > 0).any(dim=0)
                self.active = active if self.active is None else self.active | active
        return self.norm(self.down(self.drop(F.silu(pre))))

    @property
    def dead(self) -> torch.Tensor | None:
        """The fraction of hidden units that no token of the last training pass activated."""
        return None if self.active is None else 1.0 - self.active.float().mean()


class TaskExperts(nn.Module):
    """The MLP of one trunk block as shared + per-group experts under per-task gates (see the module)."""

    def __init__(self, d_model: int, tasks: Sequence[str], options: Mapping, dropout: float = 0.0):
        super().__init__()
        self.tasks = list(tasks)
        self.top_k = options["top_k"]
        self.own_floor = float(options["own_floor"])
        hidden = int(options["hidden"] or 2 * d_model)
        n_shared, per_group = int(options["shared"]), int(options["per_group"])
        self.group_of = task_groups(self.tasks, options["groups"])
        groups = sorted({g for g in self.group_of.values() if g is not None})
        self.shared = nn.ModuleList([Expert(d_model, hidden, dropout) for _ in range(n_shared)])
        self.grouped = nn.ModuleDict(
            {g: nn.ModuleList([Expert(d_model, hidden, dropout) for _ in range(per_group)]) for g in groups}
        )
        self.shared_gate = nn.Linear(d_model, n_shared) if n_shared > 1 else None
        self.gates = nn.ModuleDict({t: nn.Linear(d_model, self._allowed(t)) for t in self.tasks})
        for gate in self.gates.values():  # start uniform: the gates learn to prefer, not a random draw
            nn.init.zeros_(gate.weight)
            nn.init.zeros_(gate.bias)
        if self.shared_gate is not None:
            nn.init.zeros_(self.shared_gate.weight)
            nn.init.zeros_(self.shared_gate.bias)
        self.flops_per_token = 4 * d_model * hidden  # two matmuls, multiply-adds counted as 2
        self.aux: torch.Tensor | None = None
        self.stats: dict[str, torch.Tensor] = {}

    def _own(self, task: str) -> nn.ModuleList:
        group = self.group_of.get(task)
        return self.grouped[group] if group is not None else nn.ModuleList()

    def _allowed(self, task: str) -> int:
        return len(self.shared) + len(self._own(task))

    def _weights(self, logits: torch.Tensor, n_own: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate logits [..., E] → (weights used, full softmax); own experts are the last `n_own`."""
        probs = torch.softmax(logits, dim=-1)
        if self.own_floor and n_own and n_own < probs.shape[-1]:
            floor = torch.zeros_like(probs)
            floor[..., -n_own:] = 1.0 / n_own
            own_mass = probs[..., -n_own:].sum(-1, keepdim=True)
            lift = (self.own_floor - own_mass).clamp_min(0.0)  # only where the task fell below its floor
            probs = probs * (1 - lift) + lift * floor
        weights = probs
        if self.top_k is not None and self.top_k < probs.shape[-1]:
            top = probs.topk(self.top_k, dim=-1)
            weights = torch.zeros_like(probs).scatter(-1, top.indices, top.values)
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
        return weights, probs

    def _balance(self, weights: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        e = probs.shape[-1]
        if e < 2:
            return probs.new_zeros(())
        mean_prob = probs.reshape(-1, e).mean(0)
        if self.top_k is not None and self.top_k < e:
            routed = (weights.reshape(-1, e) > 0).float().mean(0)
            return e * (routed * mean_prob).sum() / self.top_k - 1.0
        return e * mean_prob.square().sum() - 1.0

    def forward(self, x: torch.Tensor, tasks: Sequence[str]) -> torch.Tensor:
        """`x` [B, N, d]: token 0 is [CLS], tokens 1 … len(tasks) the query tokens of `tasks`, the rest latents.
        Each shared expert runs once over every token, each group's experts once over its tasks' tokens."""
        n_tasks = len(tasks)
        if self.training:
            for expert in self.modules():
                if isinstance(expert, Expert):
                    expert.active = None
        shared_out = torch.stack([e(x) for e in self.shared], dim=-1)  # [B, N, d, S]
        other_out = torch.cat([shared_out[:, :1], shared_out[:, 1 + n_tasks :]], dim=1)
        aux = x.new_zeros(())
        if self.shared_gate is not None:
            w, p = self._weights(self.shared_gate(torch.cat([x[:, :1], x[:, 1 + n_tasks :]], dim=1)), 0)
            aux = aux + self._balance(w, p)
            mixed = (other_out * w[:, :, None, :]).sum(-1)
        else:
            mixed = other_out[..., 0]
        positions: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            if self.group_of.get(task) is not None and len(self.grouped[self.group_of[task]]):
                positions.setdefault(self.group_of[task], []).append(i)
        own_out = {}  # task position → its group's expert outputs [B, d, G]
        for group, index in positions.items():
            tokens = x[:, [1 + i for i in index]]  # [B, k, d]
            out = torch.stack([e(tokens) for e in self.grouped[group]], dim=-1)  # [B, k, d, G]
            own_out.update({i: out[:, j] for j, i in enumerate(index)})
        outputs = [mixed[:, :1]]
        stats = {}
        for i, task in enumerate(tasks):
            candidates = shared_out[:, 1 + i]  # [B, d, S]
            n_own = own_out[i].shape[-1] if i in own_out else 0
            if n_own:
                candidates = torch.cat([candidates, own_out[i]], dim=-1)
            w, p = self._weights(self.gates[task](x[:, 1 + i]), n_own)
            aux = aux + self._balance(w, p)
            outputs.append((candidates * w[:, None, :]).sum(-1)[:, None])
            if self.training:
                stats[task] = p.detach().mean(0)[len(self.shared) :].sum() if n_own else p.new_zeros(())
        outputs.append(mixed[:, 1:])
        self.aux = aux
        if self.training:
            self.stats = {"own_mass": stats}
        return torch.cat(outputs, dim=1)

    def dead_fractions(self) -> dict[str, torch.Tensor]:
        """Each expert's share of hidden units that no token of the last training pass activated."""
        found = {f"shared{i}": e.dead for i, e in enumerate(self.shared) if e.dead is not None}
        for group, experts in self.grouped.items():
            found.update({f"{group}{i}": e.dead for i, e in enumerate(experts) if e.dead is not None})
        return found

    def flops(self, tasks: Sequence[str], other_tokens: int) -> int:
        """Expert FLOPs per sample for these task tokens and `other_tokens` [CLS] + latent tokens."""
        return self.flops_per_token * (other_tokens * len(self.shared) + sum(self._allowed(t) for t in tasks))
