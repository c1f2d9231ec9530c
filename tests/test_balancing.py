"""Balancing strategies: each trains a few steps with finite losses, and each reacts as it should."""

import math

import pytest
import torch
from lightning.pytorch import Trainer

from biofm.platform.balancing import BALANCERS, make_balancer
from biofm.platform.lightning import BiofmDataModule, BiofmModule
from biofm.registry import RegistryError


@pytest.mark.parametrize("name", BALANCERS.names())
def test_each_strategy_trains_a_few_steps_with_finite_losses(cohort_store, tmp_path, name):
    data = BiofmDataModule([cohort_store.url], batch_size=32)
    module = BiofmModule(data.schema, d_model=16, depth=1, heads=2, latents=2, balancing=name)
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = Trainer(
        max_steps=6,
        log_every_n_steps=1,  # per-task curves are logged on the logger's steps only
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, datamodule=data)
    loss = trainer.callback_metrics["train/loss"]
    assert math.isfinite(float(loss))
    for task in data.schema["tasks"]:
        assert math.isfinite(float(trainer.callback_metrics[f"train/{task}/loss"]))
        assert float(trainer.callback_metrics[f"train/{task}/weight"]) > 0
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())


def test_uncertainty_weights_are_learned_by_the_main_optimiser():
    balancer = make_balancer("uncertainty", ["a", "b"])
    assert len(balancer.optimised_parameters()) == 2
    total, weights = balancer.combine({"a": torch.tensor(2.0), "b": torch.tensor(0.5)})
    assert total.item() == pytest.approx(2.5) and weights == {"a": 1.0, "b": 1.0}


def test_dwa_gives_more_weight_to_the_task_whose_loss_falls_slowest():
    balancer = make_balancer("dwa", ["fast", "slow"])
    balancer.epoch_end({"fast": 1.0, "slow": 1.0})
    balancer.epoch_end({"fast": 0.5, "slow": 0.95})
    _, weights = balancer.combine({"fast": torch.tensor(1.0), "slow": torch.tensor(1.0)})
    assert weights["slow"] > 1.0 > weights["fast"] and sum(weights.values()) == pytest.approx(2.0)


def test_famo_moves_weight_away_from_the_task_that_improves_fastest():
    balancer = make_balancer("famo", ["fast", "slow"], {"lr": 0.1})
    for step in range(5):
        losses = {"fast": torch.tensor(1.0 / (step + 1)), "slow": torch.tensor(1.0)}
        balancer.combine(losses)
        balancer.after_step(losses)
    z = torch.softmax(balancer.logits.detach(), dim=0)
    assert z[1] > z[0]
    assert not any(p is balancer.logits for p in balancer.parameters())  # never in the main optimiser


def test_an_unknown_strategy_names_the_choices():
    with pytest.raises(
        RegistryError, match=r"among choices \['dwa', 'equal', 'famo', 'flat', 'pcgrad', 'rep-mtl', 'uncertainty'\]"
    ):
        make_balancer("gradnorm", ["a"])


def test_equal_with_mean_reduction_weighs_a_many_task_batch_like_a_one_task_batch():
    balancer = make_balancer("equal", ["a", "b", "c"], {"reduction": "mean"})
    total, weights = balancer.combine({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})
    assert total.item() == pytest.approx(2.0) and weights == {"a": 0.5, "b": 0.5}
    assert make_balancer("equal", ["a", "b"]).combine({"a": torch.tensor(1.0), "b": torch.tensor(3.0)})[0] == 4.0
    with pytest.raises(ValueError, match="reduction must be sum or mean"):
        make_balancer("equal", ["a"], {"reduction": "max"})
