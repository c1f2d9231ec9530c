"""The losses of one step in plain torch: per task the masked loss of its present labels and how many there
were, the pretext terms, and pseudo-labelling. The Lightning module only steps, balances and logs them
(scvi-tools' module / training-plan split)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from biofm.platform.model import BiofmModel
from biofm.platform.pretext import Encoded, StepEmbeddings
from biofm.tasks.kinds import TaskKind


@dataclass
class TaskLoss:
    """One task's loss over the batch's present labels, their count, and its weight once balanced."""

    loss: torch.Tensor
    labelled: int
    weight: float | torch.Tensor = 1.0  # a 0-d tensor where the balancer learns it (no device sync)


@dataclass
class StepLosses:
    """Every loss of one step: the supervised tasks labelled in the batch and the pretext tasks
    (`pretext/<name>`, already scaled by their `weight`); `pseudo_labels` counts the labels filled in."""

    tasks: dict[str, TaskLoss] = field(default_factory=dict)
    pretext: dict[str, torch.Tensor] = field(default_factory=dict)
    pseudo_labels: int = 0
    embedded: dict | None = None  # the supervised pass's `embed` output per modality (Rep-MTL reads its latents)

    def terms(self) -> dict[str, torch.Tensor]:
        """The losses the balancer combines, by name (tasks, then `pretext/<name>`)."""
        return {**{task: t.loss for task, t in self.tasks.items()}, **self.pretext}


def task_losses(
    kinds: dict[str, TaskKind], labels: dict[str, torch.Tensor], logits: dict[str, torch.Tensor]
) -> dict[str, TaskLoss]:
    """Per task with at least one present label in `labels`, its masked loss (`TaskKind.loss`); labels of
    tasks the model does not have (a store tested with a checkpoint of fewer tasks) are not its to score."""
    out = {}
    for task, target in labels.items():
        if task not in kinds:
            continue
        loss, n = kinds[task].loss(logits[task], target)
        if n:
            out[task] = TaskLoss(loss, n)
    return out


def pseudo_label(
    kinds: dict[str, TaskKind],
    labels: dict[str, torch.Tensor],
    logits: dict[str, torch.Tensor],
    tasks: list[str] | None,
    threshold: float,
) -> tuple[dict[str, torch.Tensor], int]:
    """`labels` with the missing labels of `tasks` (default: every kind that takes pseudo-labels) filled by
    confident predictions (`TaskKind.pseudo_label`), and how many were filled."""
    wanted = tasks or [t for t, k in kinds.items() if k.can_pseudo_label]
    labels, added = dict(labels), 0
    for task in wanted:
        if task in labels:
            labels[task], filled = kinds[task].pseudo_label(logits[task], labels[task], threshold)
            added += filled
    return labels, added


def pretext_losses(
    model: BiofmModel, pretexts: nn.ModuleDict, inputs: dict, embedded: dict | None = None
) -> dict[str, torch.Tensor]:
    """`pretext/<name>` → weighted loss. Masking pretexts share one pass over their corrupted inputs; the
    others share one encoder pass per modality of the clean inputs (`embedded`: the supervised pass's,
    `out["embedded"]`, reused; the others made once, `StepEmbeddings`)."""
    embeddings = StepEmbeddings(model, inputs, embedded)
    losses: dict[str, torch.Tensor] = {}
    masking = [(n, p) for n, p in pretexts.items() if p.masking and p.applies(inputs)]
    if masking:
        corrupted, states = dict(inputs), {}
        for name, pretext in masking:
            corrupted[pretext.modality], states[name] = pretext.corrupt(corrupted[pretext.modality])
        hidden = {pretext.modality for _, pretext in masking}
        untouched = {name: result for name, result in embeddings.computed.items() if name not in hidden}
        trunk, mask, passes = model.encode(corrupted, untouched)
        encoded = Encoded(trunk, mask, {name: result[2] for name, result in passes.items()})
        for name, pretext in masking:
            loss = pretext.loss_from(model, encoded, states[name])
            if loss is not None:
                losses[f"pretext/{name}"] = pretext.weight * loss
    for name, pretext in pretexts.items():
        if not pretext.masking and pretext.applies(inputs):
            loss = pretext.loss(model, inputs, embeddings)
            if loss is not None:
                losses[f"pretext/{name}"] = pretext.weight * loss
    return losses


def step_losses(model: BiofmModel, pretexts: nn.ModuleDict, batch: dict, pseudo: dict | None = None) -> StepLosses:
    """Supervised losses of the tasks labelled in the batch (on the clean inputs; with `pseudo`, {"tasks",
    "threshold"}, missing labels filled first) and pretext losses, sharing each modality's encoder pass."""
    result, embedded = StepLosses(), None
    if batch["labels"]:
        # an isolated model (task experts) computes only the batch's tasks: the others' logits are unused
        out = model(batch["inputs"], tasks=list(batch["labels"]) if model.isolated else None)
        embedded = out["embedded"]
        labels = batch["labels"]
        if pseudo is not None:
            labels, result.pseudo_labels = pseudo_label(
                model.kinds, labels, out["logits"], pseudo.get("tasks"), float(pseudo.get("threshold", 0.9))
            )
        result.tasks = task_losses(model.kinds, labels, out["logits"])
    result.pretext = pretext_losses(model, pretexts, batch["inputs"], embedded)
    result.embedded = embedded
    return result
