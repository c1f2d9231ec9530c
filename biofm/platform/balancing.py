"""Balancing between task losses, chosen by name in config: equal, uncertainty, dwa, famo, pcgrad, flat
(per-task sharpness-aware minimisation over any of the others) and rep-mtl (representation-level task
saliency, with equal weights).

Each strategy gets the per-task mean losses of one step (only the tasks that had labels in the batch:
a batch comes from one source, and sources carry different tasks; pretext tasks count as tasks) and
returns the total loss and the weight it gave each task. A gradient-based strategy (`gradient_based`)
instead combines the tasks' gradients of the shared parameters (`combine_gradients`); the module then
optimises manually.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from biofm.registry import Registry

BALANCERS: Registry[Balancer] = Registry("balancing strategy", plugins="biofm.platform.balancing")


class Balancer(nn.Module):
    """Equal weights; the base of the others."""

    gradient_based = False

    def __init__(self, tasks: list[str], **options):
        super().__init__()
        if options:
            raise TypeError(f"balancing '{self.name}' takes no options {sorted(options)}")
        self.tasks = list(tasks)

    def combine(self, losses: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        total = sum(losses.values())
        return total, {t: 1.0 for t in losses}

    def after_step(self, losses: dict[str, torch.Tensor]) -> None:
        """Called with the step's losses after the optimiser step."""

    def epoch_end(self, mean_losses: dict[str, float]) -> None:
        """Called with each task's mean training loss over the epoch."""

    def optimised_parameters(self) -> list[nn.Parameter]:
        """Parameters that the main optimiser should train (uncertainty weighting's log-variances)."""
        return []


@BALANCERS.register("equal")
class Equal(Balancer):
    """Equal weights: the sum of the batch's task losses, or with `reduction="mean"` their mean, so a batch
    of a source with many tasks (Tox21's 12 assays) weighs as much as one of a source with one."""

    def __init__(self, tasks: list[str], reduction: str = "sum"):
        super().__init__(tasks)
        if reduction not in ("sum", "mean"):
            raise ValueError(f"balancing 'equal': reduction must be sum or mean, got {reduction!r}")
        self.reduction = reduction

    def combine(self, losses):
        if self.reduction == "sum":
            return super().combine(losses)
        weight = 1.0 / len(losses)
        return sum(losses.values()) * weight, {t: weight for t in losses}


@BALANCERS.register("uncertainty")
class Uncertainty(Balancer):
    """Kendall, Gal & Cipolla (2018): L = Σ exp(-s_t) L_t + s_t, with s_t = log σ_t² learned."""

    def __init__(self, tasks: list[str]):
        super().__init__(tasks)
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in self.tasks})

    def combine(self, losses):
        total = sum(torch.exp(-self.log_vars[t]) * loss + self.log_vars[t] for t, loss in losses.items())
        return total, {t: torch.exp(-self.log_vars[t].detach()) for t in losses}  # no device sync per task

    def optimised_parameters(self):
        return list(self.log_vars.values())


@BALANCERS.register("dwa")
class DynamicWeightAverage(Balancer):
    """Liu, Johns & Davison (2019): w_t = T · softmax(r_t / temperature), r_t = L_t(e-1) / L_t(e-2)."""

    def __init__(self, tasks: list[str], temperature: float = 2.0):
        super().__init__(tasks)
        self.temperature = temperature
        self.history: list[dict[str, float]] = []
        self.weights = {t: 1.0 for t in self.tasks}

    def combine(self, losses):
        return sum(self.weights[t] * loss for t, loss in losses.items()), {t: self.weights[t] for t in losses}

    def epoch_end(self, mean_losses):
        self.history = (self.history + [dict(mean_losses)])[-2:]
        if len(self.history) < 2:
            return
        prev, last = self.history
        tasks = [t for t in self.tasks if t in prev and t in last and prev[t] > 0]
        if not tasks:
            return
        ratios = torch.tensor([last[t] / prev[t] for t in tasks]) / self.temperature
        weights = len(tasks) * torch.softmax(ratios, dim=0)
        self.weights.update(dict(zip(tasks, weights.tolist())))


@BALANCERS.register("famo")
class FAMO(Balancer):
    """Liu et al. (2023), Fast Adaptive Multitask Optimisation: minimise Σ z_t log L_t with z = softmax(ξ),
    and move ξ so that every task's log-loss decreases at a similar rate. ξ has its own optimiser; only
    tasks present at two consecutive steps update it. Under DDP the losses are averaged over ranks first,
    so ξ stays the same on every rank."""

    def __init__(self, tasks: list[str], lr: float = 0.025, weight_decay: float = 0.001):
        super().__init__(tasks)
        # a buffer, not a parameter: the main optimiser and DDP's gradient sync must not touch it
        self.register_buffer("logits", torch.zeros(len(self.tasks)).requires_grad_(True))
        self._optimiser = torch.optim.Adam([self.logits], lr=lr, weight_decay=weight_decay)
        self._previous: dict[str, float] = {}

    def combine(self, losses):
        index = [self.tasks.index(t) for t in losses]
        z = torch.softmax(self.logits.detach()[index], dim=0)
        values = torch.stack(list(losses.values()))
        clipped = values.clamp_min(1e-8)
        c = (z / clipped).sum().detach()
        total = (z / c * clipped.log()).sum()
        return total, {t: float(w) for t, w in zip(losses, z / c)}

    def after_step(self, losses):
        current = {t: float(v.detach()) for t, v in losses.items()}
        if dist.is_available() and dist.is_initialized():
            current = mean_over_ranks(current, self.tasks)
        shared = [t for t in current if t in self._previous]
        if shared:
            index = [self.tasks.index(t) for t in shared]
            delta = torch.tensor(
                [math.log(max(self._previous[t], 1e-8)) - math.log(max(current[t], 1e-8)) for t in shared]
            )
            with torch.enable_grad():
                logits = self.logits.detach().requires_grad_(True)
                z = torch.softmax(logits[index], dim=0)
                grad = torch.autograd.grad(z, logits, grad_outputs=delta)[0]
            self._optimiser.zero_grad()
            self.logits.grad = grad
            self._optimiser.step()
            self.logits.grad = None
        self._previous.update(current)

    def optimised_parameters(self):
        return []

    def load_state_dict(self, state_dict, strict=True, assign=False):
        result = super().load_state_dict(state_dict, strict, assign)
        self.logits.requires_grad_(True)
        return result


@BALANCERS.register("pcgrad")
class PCGrad(Balancer):
    """Yu et al. (2020), gradient surgery: each task's gradient of the shared parameters loses its component
    along any other task's gradient it conflicts with (negative dot product), taking the others in random
    order; the projected gradients are summed. With one task it is plain (equal-weight) training.

    Cost: one backward pass per task in the batch (plus one for the task-specific heads) instead of one, and
    one flat copy of the shared gradient per task. Under DDP each rank projects the gradients of its own
    batch's tasks and DDP averages the projected gradients over ranks (the module back-propagates a
    surrogate whose gradient is the projected one), so every rank takes the same step; this is PCGrad per
    rank, not on gradients gathered over ranks. Lightning's gradient clipping and accumulation options
    do not apply to manual optimisation."""

    gradient_based = True

    def __init__(self, tasks: list[str], seed: int = 0):
        super().__init__(tasks)
        self.generator = torch.Generator().manual_seed(seed)

    def combine_gradients(self, grads: list[torch.Tensor], weights: list | None = None) -> torch.Tensor:
        """Per-task flat gradients → the combined gradient (`weights`, the loss weights, are not used)."""
        combined = torch.zeros_like(grads[0])
        for i, g in enumerate(grads):
            g = g.clone()
            for j in torch.randperm(len(grads), generator=self.generator).tolist():
                if j == i:
                    continue
                dot = torch.dot(g, grads[j])
                if dot < 0:
                    g -= dot / grads[j].square().sum().clamp_min(1e-20) * grads[j]
            combined += g
        return combined


@BALANCERS.register("flat")
class FlatRegions(Balancer):
    """Phan et al. (2022), "Improving multi-task learning via seeking task-based flat regions": each task's
    gradient g_t is joined by its own sharpness-aware gradient g_t^SAM = ∇L_t(θ + ρ g_t / ‖g_t‖) (the
    perturbation from that task's gradient alone); the low-loss parts {g_t} and the flat parts
    {g_t^SAM − g_t} are each combined by the `base` balancer (any of the others: weights for the loss-based
    ones, the gradient combination for pcgrad) and the update is their sum. Heads take their own task's
    g_t^SAM. With ρ = 0 it is the base balancer exactly; with one task, SAM.

    Cost per step: one extra forward and backward per task in the batch (a batch of Tox21's 12 assays:
    12), plus one flat copy of the shared gradient per task, twice."""

    gradient_based = True

    def __init__(self, tasks: list[str], base: str = "equal", rho: float = 0.05, base_options: dict | None = None):
        super().__init__(tasks)
        if base == "flat":
            raise ValueError("balancing 'flat' needs another balancer as its base")
        if rho < 0:
            raise ValueError(f"balancing 'flat': rho must be at least 0, got {rho}")
        self.base, self.rho = make_balancer(base, tasks, base_options), float(rho)

    def combine(self, losses):
        return self.base.combine(losses)

    def combine_gradients(self, grads: list[torch.Tensor], weights: list | None = None) -> torch.Tensor:
        """The base's combination of per-task gradients (loss-based bases: Σ w_t g_t with their weights)."""
        if self.base.gradient_based:
            return self.base.combine_gradients(grads, weights)
        weights = weights if weights is not None else [1.0] * len(grads)
        return sum(w * g for w, g in zip(weights, grads))

    def after_step(self, losses):
        self.base.after_step(losses)

    def epoch_end(self, mean_losses):
        self.base.epoch_end(mean_losses)

    def optimised_parameters(self):
        return self.base.optimised_parameters()


@BALANCERS.register("rep-mtl")
class RepMTL(Balancer):
    """Wang, Li & Xu (2025), Rep-MTL: equal weights plus two regularisers on the task saliencies
    S_t = ∂L_t/∂Z, Z the shared representation (every modality's resampler latents, the trunk's input):
    - task-specific saliency regulation: per sample and channel c, each task's share of the saliency
      p_t = a_t / Σ_u a_u (a_t = Σ_tokens |S_t|, each task's a_t normalised to sum 1 over channels) has its
      entropy −Σ p_t log p_t / log T penalised (weight `tsr`): channels keep a task that owns them;
    - cross-task saliency alignment: the saliency vectors of one sample under two tasks are a positive pair,
      of two samples a negative (InfoNCE at `temperature`, weight `csa`): tasks share what helps per sample.
    The saliencies are taken with `create_graph`, so the regularisers train the trunk and encoders (a second
    backward pass through the trunk). With one task in the batch both are 0: plain equal weighting."""

    needs_representation = True

    def __init__(self, tasks: list[str], tsr: float = 1.0, csa: float = 0.1, temperature: float = 0.1):
        super().__init__(tasks)
        self.tsr, self.csa, self.temperature = float(tsr), float(csa), float(temperature)
        self.last: dict[str, torch.Tensor] = {}

    def regulariser(self, losses: dict[str, torch.Tensor], representation: list[torch.Tensor]) -> torch.Tensor | None:
        """The weighted regularisers for this step's losses (None with fewer than two tasks)."""
        if len(losses) < 2 or not representation:
            return None
        z = representation
        saliency = []
        for loss in losses.values():
            grads = torch.autograd.grad(loss, z, retain_graph=True, create_graph=True, allow_unused=True)
            parts = [(g if g is not None else torch.zeros_like(r)).abs().sum(dim=1) for g, r in zip(grads, z)]
            a = torch.cat(parts, dim=-1)  # [B, channels]
            saliency.append(a / a.sum(-1, keepdim=True).clamp_min(1e-12))
        a = torch.stack(saliency)  # [T, B, C]
        p = a / a.sum(0, keepdim=True).clamp_min(1e-12)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(0).mean() / math.log(len(losses))
        v = torch.nn.functional.normalize(a, dim=-1)
        target = torch.arange(v.shape[1], device=v.device)
        pairs = [
            torch.nn.functional.cross_entropy(v[i] @ v[j].T / self.temperature, target)
            for i in range(len(v))
            for j in range(len(v))
            if i != j
        ]
        alignment = torch.stack(pairs).mean() if v.shape[1] > 1 else entropy.new_zeros(())
        self.last = {"tsr": entropy.detach(), "csa": alignment.detach()}
        return self.tsr * entropy + self.csa * alignment


def mean_over_ranks(values: dict[str, float], tasks: list[str]) -> dict[str, float]:
    """Each task's value averaged over the ranks that had it (every rank must call this together)."""
    sums = torch.zeros(2, len(tasks))
    for t, v in values.items():
        sums[0, tasks.index(t)], sums[1, tasks.index(t)] = v, 1.0
    if dist.get_backend() == "nccl":
        sums = sums.cuda()
    dist.all_reduce(sums)
    sums = sums.cpu()
    return {t: float(sums[0, i] / sums[1, i]) for i, t in enumerate(tasks) if sums[1, i] > 0}


def make_balancer(name: str, tasks: list[str], options: dict | None = None) -> Balancer:
    return BALANCERS.resolve(name)(tasks, **(options or {}))
