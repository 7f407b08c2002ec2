"""Inner weight decay, fixed or learned by hypergradient.

Each inner step is ``theta' = theta - alpha (g + lambda theta)``. For MSE linear regression
(``g = H theta - b``, ``H`` constant) the step is linear in ``theta`` with Jacobian
``(1 - alpha lambda) I - alpha H`` (second order) or ``(1 - alpha lambda) I`` (first order: the
gradient is a constant, the decay term is part of the update rule), and for one step the
hypergradient is ``dL_q / d lambda = -alpha theta . g_q(theta')`` (per element; summed per tensor
or over all for the coarser modes). All asserted at 1e-12 in float64, plus finite differences
through an MLP, and the default (no weight decay) is bit-identical to before the option existed.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from innerloop.adapt import sgd_step
from innerloop.algorithms import MAML
from innerloop.algorithms.rates import InnerWeightDecay
from innerloop.data import LinearRegression, Sinusoid
from innerloop.models import MLP
from innerloop.training.config import ConfigError, config_from_dict

TOL = {"rtol": 1e-12, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("float64")


def _augment(x):
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1)


def _batch(tasks=3):
    return LinearRegression(shots=6, queries=5, dim=2, seed=4).batch("train", range(tasks)).to(dtype=torch.float64)


def test_sgd_step_with_weight_decay():
    p, g = {"w": torch.tensor([1.0, -2.0]), "b": torch.tensor([3.0])}, {"w": torch.tensor([0.5, 0.5])}
    out = sgd_step(p, g, 0.1, {"w": torch.tensor([0.2, 0.0])})
    torch.testing.assert_close(out["w"], torch.tensor([1 - 0.1 * (0.5 + 0.2), -2 - 0.1 * 0.5]))
    assert out["b"] is p["b"]  # not in grads: passes through
    assert torch.equal(sgd_step(p, g, 0.1, None)["w"], p["w"] - 0.1 * g["w"])


def test_no_weight_decay_is_bit_identical_and_adds_no_state():
    batch = Sinusoid(shots=5, queries=5, seed=1).batch("train", range(4)).to(dtype=torch.float64)
    results = []
    for kwargs in ({}, {"weight_decay": 0.0, "wd_mode": "fixed"}):
        torch.manual_seed(0)
        maml = MAML(MLP(1, 1, hidden=(8,)), "regression", inner_lr=0.1, inner_steps=2, lr_mode="per_tensor",
                    **kwargs)
        assert not any(k.startswith("inner_wd") for k in maml.state_dict())  # old checkpoints still load
        assert maml.inner_wd.as_dict() is None
        results.append((maml.meta_gradient(batch)[0], maml.evaluate(batch, 3)["mse"]))
    (g0, e0), (g1, e1) = results
    assert all(torch.equal(g0[k], g1[k]) for k in g0) and torch.equal(e0, e1)


def _closed_form(theta, batch, alpha, lam, steps, first_order):
    total = torch.zeros_like(theta)
    eye = torch.eye(len(theta))
    for i in range(len(batch)):
        xs, ys = _augment(batch.support_x[i]), batch.support_y[i][:, 0]
        xq, yq = _augment(batch.query_x[i]), batch.query_y[i][:, 0]
        hs, bs = 2 / len(xs) * xs.T @ xs, 2 / len(xs) * xs.T @ ys
        t = theta.clone()
        for _ in range(steps):
            t = t - alpha * (hs @ t - bs + lam * t)
        gq = 2 / len(xq) * xq.T @ (xq @ t - yq)
        jac = (1 - alpha * lam) * eye - (0 if first_order else alpha * hs)
        total += torch.linalg.matrix_power(jac, steps) @ gq
    return total / len(batch)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_meta_gradient_with_weight_decay_matches_closed_form(steps, first_order, vectorize):
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    maml = MAML(model, "regression", inner_lr=0.1, inner_steps=steps, first_order=first_order,
                vectorize=vectorize, weight_decay=0.3)
    batch = _batch()
    grads, _ = maml.meta_gradient(batch)
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()])
    expected = _closed_form(theta, batch, 0.1, 0.3, steps, first_order)
    torch.testing.assert_close(torch.cat([grads["model.weight"][0], grads["model.bias"]]), expected, **TOL)


@pytest.mark.parametrize("mode", ["scalar", "per_tensor", "per_element"])
def test_learned_weight_decay_gets_the_hypergradient(mode):
    torch.manual_seed(1)
    model = nn.Linear(2, 1)
    alpha, lam = 0.05, 0.2
    maml = MAML(model, "regression", inner_lr=alpha, inner_steps=1, weight_decay=lam, wd_mode=mode)
    batch = _batch()
    grads, _ = maml.meta_gradient(batch)
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()])
    expected = torch.zeros(3)
    for i in range(len(batch)):
        xs, ys = _augment(batch.support_x[i]), batch.support_y[i][:, 0]
        xq, yq = _augment(batch.query_x[i]), batch.query_y[i][:, 0]
        t = theta - alpha * (2 / len(xs) * xs.T @ (xs @ theta - ys) + lam * theta)
        expected += -alpha * theta * (2 / len(xq) * xq.T @ (xq @ t - yq)) / len(batch)
    wd = {k: v for k, v in grads.items() if k.startswith("inner_wd.")}
    if mode == "scalar":
        torch.testing.assert_close(wd["inner_wd.rates.all"], expected.sum(), **TOL)
    elif mode == "per_tensor":
        torch.testing.assert_close(wd["inner_wd.rates.weight"], expected[:2].sum(), **TOL)
        torch.testing.assert_close(wd["inner_wd.rates.bias"], expected[2], **TOL)
    else:
        torch.testing.assert_close(wd["inner_wd.rates.weight"][0], expected[:2], **TOL)
        torch.testing.assert_close(wd["inner_wd.rates.bias"], expected[2:], **TOL)


def _meta_loss(maml, batch):
    params, rates = maml.params(), dict(maml.inner_lr.rates)
    losses = [maml.task_loss(maml.model, params, rates, tuple(t[i] for t in (batch.support_x, batch.support_y,
                                                                          batch.query_x, batch.query_y)))[0]
              for i in range(len(batch))]
    return torch.stack(losses).mean()


def test_hypergradient_matches_finite_differences_through_an_mlp():
    torch.manual_seed(2)
    maml = MAML(MLP(1, 1, hidden=(6,), activation="tanh"), "regression", inner_lr=0.2, inner_steps=3,
                weight_decay=0.1, wd_mode="per_tensor")
    batch = Sinusoid(shots=5, queries=5, seed=3).batch("train", range(3)).to(dtype=torch.float64)
    grads, _ = maml.meta_gradient(batch)
    eps = 1e-6
    with torch.no_grad():
        for key, rate in maml.inner_wd.rates.items():
            orig = rate.item()
            rate.fill_(orig + eps)
            up = _meta_loss(maml, batch)
            rate.fill_(orig - eps)
            down = _meta_loss(maml, batch)
            rate.fill_(orig)
            fd = (up - down) / (2 * eps)
            torch.testing.assert_close(grads[f"inner_wd.rates.{key}"], fd, rtol=1e-6, atol=1e-9, msg=key)


def test_evaluate_applies_the_weight_decay():
    torch.manual_seed(3)
    model = nn.Linear(2, 1)
    maml = MAML(model, "regression", inner_lr=0.1, inner_steps=1, weight_decay=0.5)
    batch = _batch(tasks=2)
    scores = maml.evaluate(batch, steps=2)
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()])
    for i in range(2):
        xs, ys = _augment(batch.support_x[i]), batch.support_y[i][:, 0]
        xq, yq = _augment(batch.query_x[i]), batch.query_y[i][:, 0]
        t = theta.clone()
        for k in range(3):
            torch.testing.assert_close(scores["mse"][i, k], ((xq @ t - yq) ** 2).mean(), **TOL)
            t = t - 0.1 * (2 / len(xs) * xs.T @ (xs @ t - ys) + 0.5 * t)


def test_modes_config_and_errors():
    from innerloop.training.run import build_algorithm, build_family

    params = dict(nn.Linear(2, 1).named_parameters())
    assert InnerWeightDecay(params, 0.0, "scalar").as_dict()["weight"].item() == 0.0  # learned from 0
    with pytest.raises(ValueError, match=r"inner weight decay must be >= 0, got -0\.1"):
        InnerWeightDecay(params, -0.1)
    with pytest.raises(ValueError, match="unknown inner weight-decay mode 'global'"):
        InnerWeightDecay(params, 0.1, "global")  # type: ignore[arg-type]
    cfg = config_from_dict({"algorithm": {"name": "maml", "inner_weight_decay": 0.01,
                                          "weight_decay_mode": "scalar"}})
    algo = build_algorithm(cfg, build_family(cfg))
    assert algo.inner_wd.mode == "scalar" and float(algo.inner_wd.rates["all"].detach()) == pytest.approx(0.01)
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm\.inner_weight_decay' for reptile"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_weight_decay": 0.1}})
    with pytest.raises(ConfigError, match=r"algorithm\.weight_decay = -1\.0 is invalid"):
        config_from_dict({"algorithm": {"inner_weight_decay": -1.0}})
