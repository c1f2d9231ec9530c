"""The model in pure torch: encoders → resamplers → shared trunk → one head per task.

    tokens of each modality a sample has ─ resampler (K latents) ─┐
    [CLS] [query task 1] … [query task T] ────────────────────────┴─ trunk (pre-norm, SDPA) ─ heads

A modality a sample lacks contributes no tokens: its latents are masked out of every attention. With
`isolate_tasks` (always with task experts) no token reads a task's query token but that token itself, so a
task's prediction does not depend on which other tasks are asked (`forward(inputs, tasks=…)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from biofm.platform.experts import TaskExperts, expert_options
from biofm.platform.modality import MODALITIES, Modality, Tokens
from biofm.tasks.kinds import TaskKind, task_kind


class Attention(nn.Module):
    """Multi-head attention on `scaled_dot_product_attention`; `key_mask` [B, S] is True where valid (or
    [B, N, S]: which key each query may read)."""

    def __init__(self, d_model: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(d_model, d_model)
        self.kv = nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor, kv: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`kv` [B, S, 2d]: the context's keys and values when already projected (see `Block`)."""
        b, n, d = x.shape
        h = self.heads
        if b > 1 and x.stride(0) == 0:  # one query set for every sample (the resampler's latents): project it once
            q = self.q(x[:1]).expand(b, -1, -1).reshape(b, n, h, d // h).transpose(1, 2)
        else:
            q = self.q(x).view(b, n, h, d // h).transpose(1, 2)  # [B, h, N, d/h]
        kv = self.kv(context) if kv is None else kv
        k, v = kv.view(b, -1, 2, h, d // h).permute(2, 0, 3, 1, 4)  # [B, h, S, d/h] each
        mask = key_mask[:, None, None, :] if key_mask.dim() == 2 else key_mask[:, None]  # [B, 1, 1 or N, S]
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Block(nn.Module):
    """Pre-norm transformer block; with `context` it cross-attends (the resampler), else self-attends.
    `read`: only the first `read` tokens' outputs are wanted (the trunk's last block, whose other tokens
    nothing reads): they alone are queried and go through the MLP — the same values, fewer FLOPs."""

    def __init__(
        self, d_model: int, heads: int, dropout: float = 0.0, mlp_ratio: int = 4, experts: TaskExperts | None = None
    ):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, heads, dropout)
        self.experts = experts  # a trunk block's MLP as task experts (`biofm.platform.experts`)
        if experts is None:
            self.mlp = nn.Sequential(
                nn.Linear(d_model, mlp_ratio * d_model),
                nn.GELU(),
                nn.Dropout(dropout),
                nn.Linear(mlp_ratio * d_model, d_model),
            )

    def forward(self, x, key_mask, context=None, context_norm=None, read: int | None = None, tasks=()):
        """`tasks`: the names of query tokens 1 … T (for task experts)."""
        h = self.norm1(x[:1]).expand_as(x) if len(x) > 1 and x.stride(0) == 0 else self.norm1(x)
        kv = None
        if context is None:
            ctx = h
        elif context.device.type == "cpu" and context.shape[1] > 1:
            # Keys and values of the valid context tokens only: a batch of molecules or slides is mostly
            # padding (ESOL: 60 %), and on a CPU those rows are matmul time. (On a GPU the gather would cost
            # a device sync, more than the padded rows.)
            ctx = context
            projected = self.attn.kv(context_norm(context[key_mask]))  # in autocast's dtype where it is on
            kv = projected.new_zeros(*key_mask.shape, projected.shape[-1])
            kv[key_mask] = projected
        else:
            ctx = context_norm(context)
        if read is not None:
            x, h = x[:, :read], h[:, :read]
            key_mask = key_mask[:, :read] if key_mask.dim() == 3 else key_mask
        x = x + self.attn(h, ctx, key_mask, kv)
        if self.experts is not None:
            return x + self.experts(self.norm2(x), tasks)
        return x + self.mlp(self.norm2(x))


class Resampler(nn.Module):
    """K learned latents cross-attend to a modality's tokens: the trunk's cost no longer grows with a
    slide's tiles or a patient's events."""

    def __init__(self, d_model: int, latents: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(latents, d_model) * 0.02)
        self.context_norm = nn.LayerNorm(d_model)
        self.block = Block(d_model, heads, dropout)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        mask = mask.clone()
        mask[~mask.any(dim=1), 0] = True  # a sample with no token: attend to padding, masked in the trunk
        x = self.latents.expand(tokens.shape[0], -1, -1)
        return self.block(x, mask, context=tokens, context_norm=self.context_norm)  # [B, K, d]


@dataclass(frozen=True)
class TrunkConfig:
    """The model's architecture: the trunk (width, depth, heads, latents per modality, dropout) and the
    encoders' options per modality (`{"molecule": {"layers": 5}}`). Built once from the module's settings
    (`of`), and again from a checkpoint's, by the same builder (`build`)."""

    d_model: int = 64
    depth: int = 2
    heads: int = 4
    latents: int = 8
    dropout: float = 0.1
    encoders: dict[str, dict] | None = None
    experts: dict | None = None  # task experts in chosen trunk blocks (`biofm.platform.experts`)
    isolate_tasks: bool = False  # no token reads another task's query token (always on with experts)
    merged: dict | None = None  # how `biofm merge` made this model; Twin-Merging's adds parts (`platform/twin.py`)

    @classmethod
    def of(cls, settings: Mapping[str, Any]) -> TrunkConfig:
        """The architecture among `settings` (e.g. a module's hyper-parameters); other keys are ignored."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if f.name in settings})

    def build(self, schema: dict) -> BiofmModel:
        if self.merged and self.merged.get("method") == "twin":
            from biofm.platform.twin import TwinMergedModel

            return TwinMergedModel(schema, self)
        return BiofmModel(schema, self)


class BiofmModel(nn.Module):
    """Encoders, resamplers, trunk and heads for a schema `{"modalities": {...}, "tasks": {...}}`."""

    def __init__(self, schema: dict, config: TrunkConfig | None = None):
        super().__init__()
        config = config or TrunkConfig()
        d_model, depth, heads, latents, dropout, encoders = (
            config.d_model,
            config.depth,
            config.heads,
            config.latents,
            config.dropout,
            config.encoders,
        )
        self.schema, self.config = schema, config
        self.modalities: dict[str, Modality] = {
            name: MODALITIES.resolve(name).from_config(config) for name, config in schema["modalities"].items()
        }
        self.kinds: dict[str, TaskKind] = {t: task_kind(t, spec) for t, spec in schema["tasks"].items()}
        options = encoders or {}
        unknown = sorted(set(options) - set(self.modalities))
        if unknown:
            raise ValueError(
                f"encoder options for modalities {unknown} that the data does not have ({sorted(self.modalities)})"
            )
        self.encoders = nn.ModuleDict({n: m.encoder(d_model, **options.get(n, {})) for n, m in self.modalities.items()})
        self.resamplers = nn.ModuleDict({n: Resampler(d_model, latents, heads, dropout) for n in self.modalities})
        self.modality_embedding = nn.ParameterDict(
            {n: nn.Parameter(torch.randn(d_model) * 0.02) for n in self.modalities}
        )
        self.cls = nn.Parameter(torch.randn(d_model) * 0.02)
        self.queries = nn.ParameterDict({t: nn.Parameter(torch.randn(d_model) * 0.02) for t in self.kinds})
        experts = expert_options(config.experts)
        blocks = {b % depth for b in experts["blocks"]} if experts else set()
        self.trunk = nn.ModuleList(
            [
                Block(d_model, heads, dropout, experts=TaskExperts(d_model, list(self.kinds), experts, dropout))
                if i in blocks
                else Block(d_model, heads, dropout)
                for i in range(depth)
            ]
        )
        self.isolated = bool(config.isolate_tasks or experts)
        self.memory = nn.Linear(d_model, d_model) if experts and experts["memory"] else None
        if self.memory is not None:  # starts as no memory at all
            nn.init.zeros_(self.memory.weight)
            nn.init.zeros_(self.memory.bias)
        self.norm = nn.LayerNorm(d_model)
        self.heads = nn.ModuleDict({t: nn.Linear(d_model, k.out_dim) for t, k in self.kinds.items()})
        self.d_model, self.n_heads = d_model, heads

    def embed(
        self, name: str, batch: dict[str, torch.Tensor], keep: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, Tokens]:
        """One modality → its K latents [B, K, d], their validity [B, K] and the encoder's `Tokens`;
        `keep` [B, L] drops encoder tokens (a view for contrastive pretext tasks)."""
        out = self.encoders[name](batch)
        out = out if isinstance(out, Tokens) else Tokens(*out)
        mask = out.mask if keep is None else out.mask & keep
        latent, valid = self.resample(name, out.tokens, mask, batch["present"])
        return latent, valid, out

    def embed_all(
        self, inputs: dict[str, dict[str, torch.Tensor]], reuse: Mapping[str, tuple] | None = None
    ) -> dict[str, tuple]:
        """`embed` of every modality of `inputs` the model knows, taking those already in `reuse` (this step's
        earlier passes over the same clean inputs) rather than encoding them again."""
        reuse = reuse or {}
        return {
            name: reuse[name] if name in reuse else self.embed(name, batch)
            for name, batch in inputs.items()
            if name in self.encoders
        }

    def resample(
        self, name: str, x: torch.Tensor, mask: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A modality's encoder tokens → its K latents and their validity (False where the sample lacks it)."""
        latent = self.resamplers[name](x, mask) + self.modality_embedding[name]
        return latent, present.to(torch.bool)[:, None].expand(-1, latent.shape[1])

    def trunk_over(
        self,
        latents: list[torch.Tensor],
        masks: list[torch.Tensor],
        read: int | None = None,
        tasks: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[CLS] + task queries (of `tasks`, default all) + the given latents through the trunk: output
        [B, 1 + T + ΣK, d] and mask; with `read`, only the first `read` tokens of the output ([B, read, d]),
        which the last block then computes alone."""
        tasks = list(self.queries) if tasks is None else list(tasks)
        batch_size, device = latents[0].shape[0], latents[0].device
        special = torch.stack([self.cls, *(self.queries[t] for t in tasks)])  # [1 + T, d]
        x = torch.cat([special.expand(batch_size, -1, -1), *latents], dim=1)
        mask = torch.cat([torch.ones(batch_size, len(special), dtype=torch.bool, device=device), *masks], dim=1)
        attend = self._isolating(mask, len(tasks)) if self.isolated else mask
        memory = None
        for i, block in enumerate(self.trunk):
            x = block(x, attend, read=read if i == len(self.trunk) - 1 else None, tasks=tasks)
            if self.memory is not None and block.experts is not None:
                written = x[:, 1 : 1 + len(tasks)]
                memory = written if memory is None else memory + written
        x = self.norm(x)
        if memory is not None:  # TaskExpert's feature memory: the task tokens of every expert block, summed
            x = torch.cat([x[:, :1], x[:, 1 : 1 + len(tasks)] + self.memory(memory), x[:, 1 + len(tasks) :]], 1)
        return x, mask

    @staticmethod
    def _isolating(mask: torch.Tensor, n_tasks: int) -> torch.Tensor:
        """[B, S] validity → [B, S, S]: a task's query token is read by itself alone."""
        s = mask.shape[1]
        allowed = torch.ones(s, s, dtype=torch.bool, device=mask.device)
        allowed[:, 1 : 1 + n_tasks] = False
        idx = torch.arange(1, 1 + n_tasks, device=mask.device)
        allowed[idx, idx] = True
        return mask[:, None, :] & allowed

    def encode(
        self,
        inputs: dict[str, dict[str, torch.Tensor]],
        reuse: Mapping[str, tuple] | None = None,
        read: int | None = None,
        tasks: list[str] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, tuple]]:
        """Trunk output [B, 1 + T + K·M, d] (the first `read` tokens only, if given), its validity mask and
        each modality's `embed` output, for the modalities in `inputs` (a modality the model was not trained
        on is left out); embeddings in `reuse` are taken, not computed again (see `embed_all`)."""
        embedded = self.embed_all(inputs, reuse)
        if not embedded:
            raise ValueError(f"the batch has none of the model's modalities {sorted(self.encoders)}")
        x, mask = self.trunk_over([e[0] for e in embedded.values()], [e[1] for e in embedded.values()], read, tasks)
        return x, mask, embedded

    def forward(self, inputs: dict[str, dict[str, torch.Tensor]], tasks: list[str] | None = None) -> dict:
        """`cls` [B, d], the task tokens, `logits` per task, and `embedded`: each modality's `embed` output,
        which pretext tasks of the same step reuse. `tasks`: predict only these (an isolated model gives them
        the same logits as with every task, and runs only their experts)."""
        groups = self.task_groups(tasks)
        if groups is not None:
            return self._forward_groups(inputs, groups, tasks)
        if tasks is not None and not self.isolated:
            raise ValueError("predicting a subset of tasks needs a model with isolate_tasks (or experts)")
        tasks = list(self.queries) if tasks is None else [t for t in self.queries if t in set(tasks)]
        x, _, embedded = self.encode(inputs, read=1 + len(tasks), tasks=tasks)  # nothing reads the latents' outputs
        task_tokens = x[:, 1 : 1 + len(tasks)]
        logits = {t: self.heads[t](task_tokens[:, i]) for i, t in enumerate(tasks)}
        return {"cls": x[:, 0], "tasks": task_tokens, "logits": logits, "embedded": embedded}

    def task_groups(self, tasks: list[str] | None = None) -> list[list[str]] | None:
        """A merged model's task groups — each specialist's tasks, trained together beside no other query
        token — that hold any of `tasks` (default all); None for a model of one group."""
        groups = (self.config.merged or {}).get("groups")
        if not groups or len(groups) < 2:
            return None
        wanted = set(self.queries) if tasks is None else set(tasks)
        return [group for group in groups if wanted & set(group)]

    def _forward_groups(self, inputs: dict, groups: list[list[str]], tasks: list[str] | None) -> dict:
        """Each group through the trunk with its own query tokens only (the context its specialist was
        trained in), the encoders run once; [CLS] from a pass with no query token."""
        embedded = self.embed_all(inputs)
        if not embedded:
            raise ValueError(f"the batch has none of the model's modalities {sorted(self.encoders)}")
        latents, masks = [e[0] for e in embedded.values()], [e[1] for e in embedded.values()]
        cls = self.trunk_over(latents, masks, read=1, tasks=[])[0][:, 0]
        logits, tokens = {}, []
        for group in groups:
            x, _ = self.trunk_over(latents, masks, read=1 + len(group), tasks=group)
            for i, task in enumerate(group):
                if tasks is None or task in tasks:
                    logits[task] = self.heads[task](x[:, 1 + i])
                    tokens.append(x[:, 1 + i])
        return {"cls": cls, "tasks": torch.stack(tokens, dim=1), "logits": logits, "embedded": embedded}

    def expert_blocks(self) -> list[TaskExperts]:
        return [block.experts for block in self.trunk if block.experts is not None]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """The experts' load-balancing term of the last forward pass, weighted (None without experts)."""
        terms = [e.aux for e in self.expert_blocks() if e.aux is not None]
        if not terms:
            return None
        return float(expert_options(self.config.experts)["balance"]) * sum(terms)

    def expert_flops(self, tasks: list[str] | None = None) -> int:
        """Expert FLOPs per sample to predict `tasks` (default all): M³ViT's saving is the difference."""
        tasks = list(self.queries) if tasks is None else list(tasks)
        other = 1 + sum(self.config.latents for _ in self.modalities)
        total = 0
        for i, block in enumerate(self.trunk):
            if block.experts is not None:
                last = i == len(self.trunk) - 1  # the last block runs the task tokens and [CLS] only
                total += block.experts.flops(tasks, 1 if last else other)
        return total
