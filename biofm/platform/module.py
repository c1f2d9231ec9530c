"""The training module: the model, masked per-task losses, pretext tasks, balancing, metrics and the optimiser."""

from __future__ import annotations

import logging
import signal
import warnings

import torch
from lightning.pytorch import Callback, LightningModule

from biofm.platform.balancing import make_balancer, mean_over_ranks
from biofm.platform.checkpoint import load_pretrained
from biofm.platform.errors import ConfigError
from biofm.platform.experts import expert_options
from biofm.platform.lora import LoRALinear, add_lora, lora_options
from biofm.platform.losses import StepLosses, pretext_losses, step_losses, task_losses
from biofm.platform.model import TrunkConfig
from biofm.platform.optim import adamw_kernel, decayed, parameter_groups, warmup_cosine
from biofm.platform.pretext import make_pretexts
from biofm.platform.report import TestOutputs
from biofm.platform.schema import task_applies
from biofm.platform.settings import check_settings
from biofm.tasks.metrics import TaskMetrics

log = logging.getLogger("biofm")


class BiofmModule(LightningModule):
    """The multimodal multi-task model in training.

    Args:
        schema: modalities and tasks; linked from the data module by `biofm fit`.
        balancing: "equal", "uncertainty", "dwa", "famo", "pcgrad" (gradient surgery), "flat" (per-task
            sharpness-aware minimisation over a base balancer, e.g. {"base": "pcgrad", "rho": 0.05}) or
            "rep-mtl" (representation-level task saliency regularisers with equal weights); `balancing_options`
            are its keyword options (see `biofm.platform.balancing`).
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
        experts: a mixture of task experts in chosen trunk blocks, e.g. {"blocks": [-1], "shared": 2,
            "per_group": 1, "top_k": null, "memory": false} (see `biofm.platform.experts`; implies
            `isolate_tasks`).
        isolate_tasks: no token of the trunk reads another task's query token, so a task's prediction does
            not depend on the others asked (predicting a subset runs less).
        modality_dropout: in training, each modality a sample has is hidden from the model with this
            probability (at least one kept), so a fused model learns every modality's signal instead of leaning
            on the easiest one (e.g. slide tasks predicted from reports alone).
        lora: low-rank adapters on the trunk's projections for fine-tuning, e.g. {"rank": 8, "alpha": 16,
            "experts": null} (SMoRA's active ranks with `experts: k`); only the adapters, task heads and query
            tokens train (see `biofm.platform.lora`; `merge_lora_checkpoint` folds them back).
        merged: written by `biofm merge`, not for training runs: the method, the models merged and what was
            learned (coefficients; for Twin-Merging the exclusive parts' rank and the router, see
            `biofm.platform.merge`).
    """

    def __init__(
        self,
        schema: dict | None = None,
        d_model: int = 64,
        depth: int = 2,
        heads: int = 4,
        latents: int = 8,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        balancing: str = "equal",
        balancing_options: dict | None = None,
        init_from: str | None = None,
        fresh_heads: bool = False,
        freeze_encoders: bool = False,
        encoders: dict | None = None,
        schedule: str = "constant",
        warmup_steps: int = 100,
        pseudo_labels: dict | None = None,
        pretext: dict[str, dict] | None = None,
        linear_probe: bool = False,
        layer_decay: float | None = None,
        experts: dict | None = None,
        isolate_tasks: bool = False,
        lora: dict | None = None,
        modality_dropout: float = 0.0,
        merged: dict | None = None,
    ):
        super().__init__()
        check_settings(
            "model",
            dict(
                d_model=d_model,
                depth=depth,
                heads=heads,
                latents=latents,
                dropout=dropout,
                lr=lr,
                weight_decay=weight_decay,
                warmup_steps=warmup_steps,
                layer_decay=layer_decay,
                schedule=schedule,
            ),
        )
        if schema is None:
            raise ConfigError(
                "model.schema is missing: it comes from the data module (biofm fit links it); "
                "in Python pass BiofmDataModule(...).schema"
            )
        # the schema (with tokenizer vocabularies) goes into checkpoints, never to a logger
        self.save_hyperparameters(logger=False)
        if not 0.0 <= modality_dropout < 1.0:
            raise ConfigError(f"model.modality_dropout must be in [0, 1), got {modality_dropout}")
        try:
            expert_options(experts)
            self._lora = lora_options(lora)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.trunk_config = TrunkConfig.of(self.hparams)  # the architecture, read once from the settings
        self.model = self.trunk_config.build(schema)
        try:
            self.pretexts = make_pretexts(self.model, pretext)
        except ValueError as err:
            raise ConfigError(f"model.pretext: {err}") from None
        if not schema["tasks"] and not self.pretexts:
            raise ConfigError(
                "nothing to train: the run has no tasks (data.tasks) and no pretext tasks (model.pretext)"
            )
        self._for_schema(schema)
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
        if self._lora:
            add_lora(self.model.trunk, self._lora)
            adapters = {
                id(p)
                for m in self.model.modules()
                if isinstance(m, LoRALinear)
                for n, p in m.named_parameters()
                if not n.startswith("base.")
            }
            for name, param in self.model.named_parameters():
                param.requires_grad_(id(param) in adapters or name.startswith(("heads.", "queries.")))
            # encoders and resamplers are wholly frozen: evaluation mode, batch-norm statistics included
            self._frozen += [m for m in (self.model.encoders, self.model.resamplers) if m not in self._frozen]
            for module in self._frozen:
                module.eval()
        self._test_outputs, self.test_outputs = TestOutputs(), {}  # the last test's predictions and labels
        self.test_notes: dict[str, str] = {}  # the last test's notes on few labels (`TaskMetrics.notes`)
        self._epoch_losses: dict[str, list] = {}  # task → [Σ loss (a tensor on the device), steps]
        self._step_losses: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True):
        """Frozen parts stay in evaluation mode (batch-norm statistics and dropout included)."""
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self

    def _for_schema(self, schema: dict, device=None) -> None:
        """What depends on the schema's tasks besides the model: the balancer (with the pretext tasks), and
        pooled metrics per stage and per source for test (made as sources appear: every rank sees each)."""
        hp = self.hparams
        self.balancer = make_balancer(hp["balancing"], self._balanced_tasks(schema), hp["balancing_options"])
        self.automatic_optimization = not self.balancer.gradient_based
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
                raise ConfigError(
                    f"the checkpoint's modality '{name}' has other settings (e.g. another tokenizer) "
                    "than the stores given; prepare them with the checkpoint's settings"
                )
        device = next(self.parameters()).device
        self.model = self.trunk_config.build(saved)  # the same architecture, the checkpoint's schema
        if self._lora:
            add_lora(self.model.trunk, self._lora)
        self.model.to(device)
        self._for_schema(saved, device)
        self.hparams["schema"] = saved

    def _pseudo_options(self) -> dict | None:
        """The pseudo-labelling settings in force at this epoch (None before `start_epoch`, or without them)."""
        options = self.hparams.pseudo_labels
        if not options or self.current_epoch < int(options.get("start_epoch", 1)):
            return None
        return options

    def _pretext_losses(self, inputs: dict, embedded: dict | None = None) -> dict[str, torch.Tensor]:
        return pretext_losses(self.model, self.pretexts, inputs, embedded)

    def _losses(self, batch: dict) -> StepLosses:
        return step_losses(self.model, self.pretexts, batch, self._pseudo_options())

    def configure_callbacks(self) -> list[Callback]:
        """The loader-position callbacks, unless the trainer has them already (from an earlier fit or test)."""
        have = {type(c) for c in self.trainer.callbacks} if self._trainer is not None else set()
        return [c for c in (ConfirmTrained(), RequeueBetweenBatches()) if type(c) not in have]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.hparams.modality_dropout and len(batch["inputs"]) > 1:
            batch = {**batch, "inputs": drop_modalities(batch["inputs"], self.hparams.modality_dropout)}
        second_order = getattr(self.balancer, "needs_representation", False) and len(batch["labels"]) > 1
        if second_order:  # Rep-MTL differentiates saliencies: SDPA's fused kernels have no double backward
            from torch.nn.attention import SDPBackend, sdpa_kernel

            with sdpa_kernel(SDPBackend.MATH):
                step = self._losses(batch)
        else:
            step = self._losses(batch)
        losses = step.terms()
        total, weights = self.balancer.combine(losses) if losses else (torch.zeros((), device=self.device), {})
        aux = self.model.auxiliary_loss() if step.tasks else None  # the task experts' load balance
        regulariser = None
        if second_order and step.embedded:
            regulariser = self.balancer.regulariser(
                {t: r.loss for t, r in step.tasks.items()}, [e[0] for e in step.embedded.values()]
            )
        extra = sum(t for t in (aux, regulariser) if t is not None)
        if not self.automatic_optimization:
            self._gradient_step(losses, total, weights, batch, extra)
        else:  # a batch without any label still needs a loss with a graph for the optimiser
            total = total + extra + self._every_parameter(needed=not losses)
        for task, record in step.tasks.items():
            record.weight = weights[task]
        size = len(batch["row"])
        self.log("train/loss", total, batch_size=size, prog_bar=True)
        if self._pseudo_options() is not None and batch["labels"]:
            self.log("train/pseudo_labels", float(step.pseudo_labels), batch_size=size, reduce_fx="sum")
        # Per-task curves only on the steps the logger writes (each `self.log` costs ~0.3 ms of Python, and
        # the others are dropped); the epoch's mean losses stay on the device until the epoch ends: no sync
        # per task per step.
        logged = self._trainer is None or self.trainer._logger_connector.should_update_logs
        if logged:
            self._log_diagnostics(size)
            self.log(f"train/source/{batch['source']}/loss", total.detach(), batch_size=size)  # a batch: one source
        for task, loss in losses.items():
            loss = loss.detach()
            if logged:
                self.log(f"train/{task}/loss", loss, batch_size=size)
                self.log(f"train/{task}/weight", weights[task], batch_size=size)
            running = self._epoch_losses.setdefault(task, [0.0, 0])
            running[0], running[1] = running[0] + loss, running[1] + 1
        self._step_losses = {t: l.detach() for t, l in losses.items()}
        return total

    def _log_diagnostics(self, size: int) -> None:
        """On the logger's steps: each task's gate mass on its own experts, the largest dead-unit fraction
        of any expert, and Rep-MTL's regularisers."""
        for i, experts in enumerate(self.model.expert_blocks()):
            for task, mass in experts.stats.get("own_mass", {}).items():
                self.log(f"train/experts{i}/{task}/own_mass", mass, batch_size=size)
            dead = experts.dead_fractions()
            if dead:
                self.log(f"train/experts{i}/dead_max", torch.stack(list(dead.values())).max(), batch_size=size)
        for name, value in getattr(self.balancer, "last", {}).items():
            self.log(f"train/{self.hparams.balancing}/{name}", value, batch_size=size)

    def _every_parameter(self, needed: bool = False) -> torch.Tensor | float:
        """Under DDP (or when `needed`), 0 · Σ every trainable parameter: heads of tasks absent from the
        batch, encoders of modalities it lacks, pretext heads and mask vectors all get a (zero) gradient, so
        DDP's reducer finds one for each without `find_unused_parameters`. Nothing in a single process."""
        if not needed and (self._trainer is None or self.trainer.world_size == 1):
            return 0.0
        return 0.0 * sum(p.sum() for p in self.parameters() if p.requires_grad)

    def _gradient_step(
        self, losses: dict[str, torch.Tensor], total: torch.Tensor, weights: dict, batch: dict, extra=0.0
    ) -> None:
        """Manual optimisation for gradient-based balancing: per-task gradients of the shared parameters
        (encoders, resamplers, trunk) are combined by the balancer; task-specific parameters (heads, query
        tokens, pretext heads) take each task's gradient at its loss weight. With `flat`, each task's sharpness-aware gradient is taken
        too (one more forward and backward per task) and its flat part combined the same way. The combined
        gradient is back-propagated as a surrogate (Σ p·g, plus `extra`: terms outside the balance, such
        as the experts' load balance), so DDP averages it over ranks as usual."""
        optimiser = self.optimizers()
        optimiser.zero_grad()
        own_balancer = {id(p) for p in self.balancer.parameters()}
        trainable = [p for p in self.parameters() if p.requires_grad and id(p) not in own_balancer]
        specific = {id(p) for n, p in self.model.named_parameters() if n.startswith(("heads.", "queries."))}
        specific |= {id(p) for p in self.pretexts.parameters()}
        shared = [p for p in trainable if id(p) not in specific]
        own = [p for p in trainable if id(p) in specific]
        params = shared + own
        surrogate = self._every_parameter() + extra
        if losses:
            per_task = [
                torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True) for loss in losses.values()
            ]
            rho = getattr(self.balancer, "rho", 0.0)
            balancer_params = [p for p in self.balancer.optimised_parameters() if p.requires_grad]
            if balancer_params:  # uncertainty weighting's log-variances, under flat
                for p, g in zip(balancer_params, torch.autograd.grad(total, balancer_params, retain_graph=True)):
                    surrogate = surrogate + (p * g.detach()).sum()
            w = [weights[t].detach() if torch.is_tensor(weights[t]) else weights[t] for t in losses]
            plain = [_flat(g[: len(shared)], shared) for g in per_task]
            combined = self.balancer.combine_gradients(plain, w)
            own_source = per_task
            if rho:
                sharp = self._sharpness_gradients(batch, list(losses), per_task, params, rho)
                combined = combined + self.balancer.combine_gradients(
                    [_flat(g[: len(shared)], shared) - p for g, p in zip(sharp, plain)], w
                )
                own_source = sharp
            offset = 0
            for p in shared:
                surrogate = surrogate + (p * combined[offset : offset + p.numel()].view_as(p)).sum()
                offset += p.numel()
            for i, p in enumerate(own):  # each task's own parameters: its gradient at its loss weight
                grads = [wt * g[len(shared) + i] for wt, g in zip(w, own_source) if g[len(shared) + i] is not None]
                if grads:
                    surrogate = surrogate + (p * sum(grads).detach()).sum()
        if torch.is_tensor(surrogate):  # else: one process, nothing to learn from this batch
            self.manual_backward(surrogate)
            optimiser.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()

    def _sharpness_gradients(self, batch: dict, names: list[str], per_task: list, params: list, rho: float) -> list:
        """Per task t: ∇L_t at θ + ρ g_t / ‖g_t‖ (its own perturbation), the parameters restored after each."""
        result = []
        for name, grads in zip(names, per_task):
            norm = torch.sqrt(sum(g.square().sum() for g in grads if g is not None)).clamp_min(1e-12)
            steps = [None if g is None else rho * g / norm for g in grads]
            with torch.no_grad():
                for p, e in zip(params, steps):
                    if e is not None:
                        p.add_(e)
            loss = self._losses(batch).terms().get(name)
            sharp = torch.autograd.grad(loss, params, allow_unused=True) if loss is not None else grads
            with torch.no_grad():
                for p, e in zip(params, steps):
                    if e is not None:
                        p.sub_(e)
            result.append(sharp)
        return result

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.balancer.after_step(self._step_losses)

    def on_train_epoch_end(self) -> None:
        means = {t: float(total) / steps for t, (total, steps) in self._epoch_losses.items() if steps}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            means = mean_over_ranks(means, self.balancer.tasks)
        self.balancer.epoch_end(means)
        self._epoch_losses.clear()

    def _evaluate(self, batch: dict, stage: str) -> None:
        size = len(batch["row"])
        name = self.test_name if stage == "test" else stage
        embedded = None
        if self.model.kinds:
            out = self.model(batch["inputs"])
            embedded = out["embedded"]
            losses = task_losses(self.model.kinds, batch["labels"], out["logits"])
            if losses:
                self.log(f"{name}/loss", sum(t.loss for t in losses.values()), batch_size=size, sync_dist=True)
            by_source = self._metrics_of_source(batch["source"]) if stage == "test" else None
            keep = stage == "test" and name == "test"  # the report's samples: the full model's test
            for task, target in batch["labels"].items():
                if task not in out["logits"]:  # the store has a task the checkpoint was not trained on
                    continue
                self.metrics[stage].update(task, out["logits"][task], target)
                if keep:
                    self._test_outputs.add(task, self.model.kinds[task], out["logits"][task], target, batch["source"])
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
            notes = dict(self.metrics[stage].notes)
            if stage == "test" and len(self._source_metrics) > 1:
                for source, metrics in sorted(self._source_metrics.items()):
                    results.update({f"{name}/{source}/{k}": v for k, v in metrics.compute().items()})
                    notes.update({f"{source}/{task}": note for task, note in metrics.notes.items()})
        if quiet:
            self.metrics[stage].forget()
        if stage == "test" and self.test_name == "test":
            self.test_notes = notes
            if notes and self.global_rank == 0:
                tasks = sorted({key.split("/")[-1] for key in notes})
                log.info(
                    f"test metrics of {len(tasks)} task(s) rest on few labels or on some classes only "
                    f"({', '.join(tasks)}); the report lists their label counts"
                )
        self.log_dict(results)
        self.metrics[stage].reset()
        if stage == "test":
            self._source_metrics = {}

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_start(self) -> None:
        self._test_outputs = TestOutputs()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        if self.test_name == "test":  # every rank gathers; rank 0 writes the report (`platform/report.py`)
            self.test_outputs = self._test_outputs.arrays()

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        out = self.model(batch["inputs"])
        result = {
            "source": [batch["source"]] * len(batch["row"]),
            "sample_id": batch.get("sample_id"),
            "applies": task_applies(self.model.schema, batch["inputs"], len(batch["row"])),
            "labels": {t: v.cpu() for t, v in batch["labels"].items() if t in self.model.kinds},
        }
        for task, kind in self.model.kinds.items():
            result[task] = {k: v.cpu() for k, v in kind.predict(out["logits"][task]).items()}
        return result

    def _parameter_groups(self) -> list[dict]:
        """AdamW's parameter groups (`optim.parameter_groups`): the model's, then the pretext heads' and the
        balancer's own parameters with the heads."""
        extra = [p for p in self.pretexts.parameters() if p.requires_grad] + self.balancer.optimised_parameters()
        return parameter_groups(
            self.model,
            extra,
            self.hparams.lr,
            self.hparams.weight_decay,
            self.hparams.layer_decay,
            decayed_ids={id(p) for p in decayed(self)},
        )

    def configure_optimizers(self):
        groups = self._parameter_groups()
        optimiser = torch.optim.AdamW(
            groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, **adamw_kernel(groups)
        )
        if self.hparams.schedule == "constant":
            return optimiser
        if self.hparams.schedule != "cosine":
            raise ConfigError(f"model.schedule must be constant or cosine, got {self.hparams.schedule!r}")
        scheduler = warmup_cosine(optimiser, int(self.trainer.estimated_stepping_batches), self.hparams.warmup_steps)
        return {"optimizer": optimiser, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def drop_modalities(inputs: dict, p: float) -> dict:
    """`inputs` with each sample's modalities marked absent with probability `p` each; a sample that would
    lose all of them keeps what it had."""
    names = list(inputs)
    present = torch.stack([inputs[n]["present"].to(torch.bool) for n in names], dim=1)  # [B, M]
    kept = present & (torch.rand(present.shape, device=present.device) >= p)
    kept = torch.where(kept.any(dim=1, keepdim=True), kept, present)
    return {n: {**inputs[n], "present": kept[:, j].to(inputs[n]["present"].dtype)} for j, n in enumerate(names)}


def _flat(grads: tuple, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Gradients of `params` (None = unused) as one vector."""
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


class ConfirmTrained(Callback):
    """Tells the training loader that a batch has been trained once Lightning counts it as processed, so
    the loader position saved in a checkpoint matches Lightning's own: a checkpoint saved at a step's end
    (ModelCheckpoint, which Lightning runs after the other callbacks; the SLURM requeue checkpoint, which
    `RequeueBetweenBatches` defers to the next batch's start) resumes at the next batch."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loader = trainer.train_dataloader
        if hasattr(loader, "mark_trained"):
            loader.mark_trained()


class RequeueBetweenBatches(Callback):
    """Lightning saves the SLURM requeue checkpoint inside its SIGUSR1 handler, wherever the signal lands:
    between a batch's optimizer step and the loader's record of it (`ConfirmTrained`), the checkpoint holds the
    batch's update but not its place, and the requeued job trains that batch again. This holds the signal and
    runs Lightning's handler at the start of the next training batch (or at the end of training), where the
    weights, the step count and the loader position agree. Without a handler (no SLURM) it does nothing."""

    def __init__(self):
        self._handler = None
        self._pending: tuple | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        if not hasattr(signal, "SIGUSR1"):  # not a POSIX system: no SLURM signal
            return
        handler = signal.getsignal(signal.SIGUSR1)
        if callable(handler) and handler not in (signal.SIG_DFL, signal.SIG_IGN):
            self._handler = handler
            signal.signal(signal.SIGUSR1, self._hold)

    def _hold(self, signum, frame) -> None:
        self._pending = (signum, frame)

    def _release(self) -> None:
        if self._pending is not None and self._handler is not None:
            signum, frame = self._pending
            self._pending = None
            self._handler(signum, frame)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._release()

    def on_train_end(self, trainer, pl_module) -> None:
        self._release()
        if self._handler is not None:
            signal.signal(signal.SIGUSR1, self._handler)
            self._handler = None
