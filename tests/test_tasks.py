"""Task kinds: masked losses normalised per task, scalers undone, label checks, metrics ignore gaps."""

import numpy as np
import pytest
import torch

from biofm.tasks import TASK_KINDS, LabelError, task_kind
from biofm.tasks.metrics import TaskMetrics

SPECS = {
    "binary": {"kind": "binary"},
    "multiclass": {"kind": "multiclass", "classes": ["a", "b", "c"]},
    "multilabel": {"kind": "multilabel", "classes": ["x", "y", "z"]},
    "regression": {"kind": "regression", "scaler": [10.0, 2.0]},
    "ordinal": {"kind": "ordinal", "classes": ["G1", "G2", "G3", "G4"]},
}


def _targets(kind, n=6):
    if kind == "multilabel":
        t = torch.tensor(np.eye(3)[np.arange(n) % 3], dtype=torch.float32)
        t[1, 2] = float("nan")
        return t
    values = {
        "binary": [0, 1, 0, 1, 1, 0],
        "multiclass": [0, 1, 2, 1, 0, 2],
        "regression": [8, 9, 10, 11, 12, 13],
        "ordinal": [0, 1, 2, 3, 2, 1],
    }[kind]
    t = torch.tensor(values[:n], dtype=torch.float32)
    t[2] = float("nan")
    return t


def test_every_kind_is_registered():
    assert TASK_KINDS.names() == sorted(SPECS)


@pytest.mark.parametrize("kind", sorted(SPECS))
def test_missing_labels_are_masked_not_zero_filled(kind):
    task = task_kind("t", SPECS[kind])
    logits = torch.randn(6, task.out_dim, requires_grad=True)
    target = _targets(kind)
    loss, n = task.loss(logits, target)
    assert n == int((~torch.isnan(target)).sum()) and torch.isfinite(loss)
    loss.backward()
    missing_rows = torch.isnan(target) if target.dim() == 1 else torch.isnan(target).all(dim=1)
    assert torch.all(logits.grad[missing_rows] == 0)
    # the loss is that of the present labels alone: the samples without any label dropped gives the same
    keep = ~missing_rows
    assert task.loss(logits[keep], target[keep])[0].item() == pytest.approx(loss.item())
    # and not the loss of the labels with their gaps filled, whatever the filling
    for fill in (0.0, 1.0):
        filled = task.loss(logits, torch.nan_to_num(target, nan=fill))[0].item()
        assert filled != pytest.approx(loss.item(), rel=1e-6, abs=1e-9), fill
    # no label at all: zero loss and zero count, still in the graph
    none, count = task.loss(logits, torch.full_like(target, float("nan")))
    assert count == 0 and none.item() == 0.0 and none.requires_grad


def test_the_loss_is_a_mean_per_task_so_more_labels_do_not_weigh_more():
    task = task_kind("t", SPECS["binary"])
    logits = torch.zeros(100, 1)
    few, many = torch.full((100,), float("nan")), torch.zeros(100)
    few[:3] = 0
    assert task.loss(logits, few)[0].item() == pytest.approx(task.loss(logits, many)[0].item())


def test_regression_is_trained_standardised_and_predicted_in_original_units():
    task = task_kind("t", SPECS["regression"])
    logits = torch.tensor([[0.0], [1.0], [-0.5]])
    assert task.predict(logits)["prediction"].tolist() == [10.0, 12.0, 9.0]
    assert task.loss(logits, torch.tensor([10.0, 12.0, 9.0]))[0].item() == pytest.approx(0.0)


def test_ordinal_predicts_levels_and_probabilities_that_sum_to_one():
    task = task_kind("t", SPECS["ordinal"])
    logits = torch.tensor([[5.0, 5.0, -5.0], [-5.0, -5.0, -5.0], [5.0, 5.0, 5.0]])
    out = task.predict(logits)
    assert out["prediction"].tolist() == [2, 0, 3]
    torch.testing.assert_close(out["probs"].sum(dim=1), torch.ones(3))


@pytest.mark.parametrize(
    "kind, labels, message",
    [
        ("binary", np.array([0, 1, 2.0]), r"found values \[2.0\], expected \[0.0, 1.0\]"),
        ("multiclass", np.array([0, 3.0, np.nan]), r"expected class indices 0..2"),
        ("ordinal", np.array([0.5, 1.0]), r"expected class indices 0..3"),
        ("multilabel", np.zeros(4), r"expected \[N, 3\] labels"),
        ("regression", np.array([1.0, np.inf]), r"infinite"),
    ],
)
def test_labels_that_do_not_fit_the_head_are_named(kind, labels, message):
    with pytest.raises(LabelError, match=message) as err:
        task_kind("grade", SPECS[kind]).check_labels(labels, "store.zarr labels/grade")
    assert "store.zarr labels/grade" in str(err.value) and "'grade'" in str(err.value)


def test_metrics_ignore_missing_labels_and_summarise():
    kinds = {k: task_kind(k, s) for k, s in SPECS.items()}
    metrics = TaskMetrics(kinds)
    torch.manual_seed(0)
    for _ in range(3):
        for name, kind in kinds.items():
            target = _targets(name)
            # perfect logits for present labels; junk is never read for missing ones
            if name == "binary":
                logits = (torch.nan_to_num(target, nan=0.5) * 2 - 1).unsqueeze(1) * 5
            elif name in ("multiclass",):
                logits = torch.nn.functional.one_hot(torch.nan_to_num(target).long(), 3).float() * 5
            elif name == "multilabel":
                logits = (torch.nan_to_num(target, nan=0.5) * 2 - 1) * 5
            elif name == "regression":
                logits = ((torch.nan_to_num(target, nan=10.0) - 10.0) / 2.0).unsqueeze(1)
            else:
                levels = torch.nan_to_num(target).long()
                logits = (torch.arange(3)[None, :] < levels[:, None]).float() * 10 - 5
            metrics.update(name, logits, target)
    results = metrics.compute()
    assert results["binary/auroc"] == pytest.approx(1.0) and results["multiclass/accuracy"] == pytest.approx(1.0)
    assert results["multilabel/auroc"] == pytest.approx(1.0) and results["regression/r2"] == pytest.approx(1.0)
    assert results["regression/rmse"] == pytest.approx(0.0, abs=1e-5) and results["ordinal/mae"] == 0.0
    assert results["macro/score"] == pytest.approx(1.0) and results["macro/auroc"] == pytest.approx(1.0)
    metrics.reset()
    assert metrics.compute() == {}


def test_a_regression_task_with_one_labelled_sample_scores_nan_instead_of_failing():
    kinds = {"area": task_kind("area", {"kind": "regression"}), "flag": task_kind("flag", {"kind": "binary"})}
    metrics = TaskMetrics(kinds)
    metrics.update("area", torch.tensor([[0.3], [0.1]]), torch.tensor([1.5, float("nan")]))
    metrics.update("flag", torch.tensor([[0.2, 0.9], [0.8, 0.1]]), torch.tensor([1.0, 0.0]))
    results = metrics.compute()
    assert np.isnan(results["area/r2"]) and np.isfinite(results["area/rmse"])
    assert results["macro/score"] == results["flag/auroc"]  # the undefined R² is left out of the macro


def test_each_kind_reads_a_label_column_and_names_the_row_that_cannot_be_one():
    import pandas as pd

    from biofm.tasks.kinds import TASK_KINDS, infer_kind

    cells = pd.Series(["1", "0", None, "1"])
    spec, values = TASK_KINDS.resolve("binary").from_column("flag", cells)
    assert spec == {"kind": "binary"} and values[[0, 1, 3]].tolist() == [1.0, 0.0, 1.0] and np.isnan(values[2])
    with pytest.raises(LabelError, match=r"row 3: label 'flag' is binary but holds 'yes'"):
        TASK_KINDS.resolve("binary").from_column("flag", pd.Series(["1", "0", "yes"]))
    with pytest.raises(LabelError, match="do not fit a binary head"):
        TASK_KINDS.resolve("binary").from_column("flag", pd.Series(["1", "2"]))
    spec, values = TASK_KINDS.resolve("multiclass").from_column("site", pd.Series(["skin", "breast", None, "skin"]))
    assert spec["classes"] == ["breast", "skin"] and values[[0, 1, 3]].tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(LabelError, match="1 distinct values"):
        TASK_KINDS.resolve("ordinal").from_column("grade", pd.Series(["G1", "G1"]))
    with pytest.raises(LabelError, match="a 0/1 column per class"):
        TASK_KINDS.resolve("multilabel").from_column("findings", pd.Series(["1"]))
    assert infer_kind(np.array([0.0, 1.0, np.nan])) == "binary" and infer_kind(np.array([0.0, 2.5])) == "regression"
