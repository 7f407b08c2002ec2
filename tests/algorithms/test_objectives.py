"""Custom losses and metrics, shape checks between prediction and target, and dtype following the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from innerloop.algorithms import MAML, ObjectiveFns, ProtoNet, Reptile, custom_objective
from innerloop.data import Sinusoid
from innerloop.models import MLP
from innerloop.tasks import TaskBatch


def _batch():
    return Sinusoid(shots=5, queries=5).batch("train", range(3))


def l1(pred, target):
    return (pred - target).abs().mean()


def test_a_custom_loss_is_what_maml_differentiates():
    torch.manual_seed(0)
    model = MLP(1, 1, [8])
    ours = MAML(model, custom_objective(l1, kind="regression", metric_name="mae"), inner_lr=0.1)
    assert ours.metric_name == "mae" and ours.higher_is_better is False
    grads, metrics = ours.meta_gradient(_batch())
    # by hand: the same meta-gradient from the loss written into the inner and outer objective
    b = _batch()
    params = dict(model.named_parameters())
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for i in range(len(b)):
        inner = l1(torch.func.functional_call(model, params, (b.support_x[i],)), b.support_y[i])
        g = torch.autograd.grad(inner, list(params.values()), create_graph=True)
        adapted = {k: v - 0.1 * gi for (k, v), gi in zip(params.items(), g, strict=True)}
        outer = l1(torch.func.functional_call(model, adapted, (b.query_x[i],)), b.query_y[i]) / len(b)
        for k, gk in zip(params, torch.autograd.grad(outer, list(params.values())), strict=True):
            total[k] += gk
    for k in params:
        torch.testing.assert_close(grads[f"model.{k}"], total[k], rtol=1e-5, atol=1e-6)
    assert set(metrics) == {"loss", "mae"}


def test_a_metric_with_higher_is_better():
    def within(pred, target):
        return ((pred - target).abs() < 0.5).float().mean()

    obj = custom_objective(F.mse_loss, within, kind="regression", higher_is_better=True, metric_name="within")
    alg = Reptile(MLP(1, 1, [8]), obj)
    alg.eval()
    scores = alg.evaluate(_batch(), steps=1)
    assert set(scores) == {"loss", "within"} and bool(((scores["within"] >= 0) & (scores["within"] <= 1)).all())
    with pytest.raises(ValueError, match="higher_is_better=True or False"):
        custom_objective(F.mse_loss, within, kind="regression")


def test_a_custom_classification_loss_in_protonets():
    def smoothed(logits, labels):
        return F.cross_entropy(logits, labels, label_smoothing=0.1)

    obj = custom_objective(smoothed, lambda lg, y: (lg.argmax(-1) == y).float().mean(), kind="classification",
                           higher_is_better=True, metric_name="acc")
    g = torch.Generator().manual_seed(0)
    b = TaskBatch(torch.randn(2, 6, 4, generator=g), torch.arange(3).repeat(2).expand(2, -1).contiguous(),
                  torch.randn(2, 6, 4, generator=g), torch.arange(3).repeat(2).expand(2, -1).contiguous())
    model = torch.nn.Sequential(torch.nn.Linear(4, 8))
    ours, _ = ProtoNet(model, obj).meta_gradient(b)
    plain, _ = ProtoNet(model, "classification").meta_gradient(b)
    assert not torch.allclose(ours["model.0.weight"], plain["model.0.weight"])  # the smoothing is used
    with pytest.raises(ValueError, match="protonet learns classification tasks, not regression"):
        ProtoNet(model, custom_objective(l1, kind="regression"))


def test_shape_mismatches_are_refused_with_both_shapes():
    b = _batch()
    flat = TaskBatch(b.support_x, b.support_y[..., 0], b.query_x, b.query_y[..., 0])
    with pytest.raises(ValueError, match=r"prediction of shape \(5, 1\) and a target of shape \(5,\)"):
        MAML(MLP(1, 1, [8]), "regression").meta_gradient(flat)
    images = TaskBatch(torch.randn(1, 4, 3), torch.zeros(1, 4, 2, dtype=torch.long), torch.randn(1, 4, 3),
                       torch.zeros(1, 4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"classification needs \[n, classes\] scores and \[n\] integer labels"):
        MAML(torch.nn.Linear(3, 5), "classification").meta_gradient(images)
    with pytest.raises(ValueError, match="unknown objective 'ranking'"):
        MAML(MLP(1, 1, [8]), "ranking")
    with pytest.raises(TypeError, match="objective loss must be a callable"):
        ObjectiveFns("mse", l1, "mae", False)  # type: ignore[arg-type]


@pytest.mark.parametrize("cls", [MAML, Reptile])
def test_a_float64_model_takes_float32_batches(cls):
    model = MLP(1, 1, [8]).double()
    alg = cls(model, "regression")
    grads, _ = alg.meta_gradient(_batch())  # the family's float32 batch
    assert all(g.dtype == torch.float64 for g in grads.values())
    alg.eval()
    assert alg.evaluate(_batch(), steps=1)["mse"].dtype == torch.float64
