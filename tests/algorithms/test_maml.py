"""Proofs that MAML's meta-gradient is right.

1. A linear model, where the meta-gradient has a closed form (first and second order, one and
   two steps, learned inner learning rates).
2. Float64 finite differences of the second-order meta-gradient of a small MLP.
3. Parity with a hand-written unroll in plain autograd (``create_graph=True``).
4. Vectorised (vmap) == looped.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from innerloop.algorithms import MAML
from innerloop.data import LinearRegression, Sinusoid
from innerloop.models import MLP

pytestmark = pytest.mark.usefixtures("float64")


def _batch(family, tasks=4):
    return family.batch("train", range(tasks)).to(dtype=torch.float64)


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1)


def _closed_form(theta, batch, alpha, steps, first_order):
    """Hand-derived MAML meta-gradient of MSE linear regression, theta = [w; b] (shape [d+1]).

    For L(theta) = mean((X theta - y)^2) over n points: grad = (2/n) X^T (X theta - y) and the
    Hessian H = (2/n) X^T X is constant, so after k steps theta_k = theta - alpha sum grad and
    d L_q(theta_k) / d theta = (I - alpha H_s)^k grad_q(theta_k)   (second order)
                             = grad_q(theta_k)                     (first order).
    """
    total = torch.zeros_like(theta)
    for i in range(len(batch)):
        xs, ys = _augment(batch.support_x[i]), batch.support_y[i][:, 0]
        xq, yq = _augment(batch.query_x[i]), batch.query_y[i][:, 0]
        hs = 2.0 / len(xs) * xs.T @ xs
        t = theta.clone()
        for _ in range(steps):
            t = t - alpha * 2.0 / len(xs) * xs.T @ (xs @ t - ys)
        gq = 2.0 / len(xq) * xq.T @ (xq @ t - yq)
        if not first_order:
            gq = torch.linalg.matrix_power(torch.eye(len(theta)) - alpha * hs, steps) @ gq
        total += gq
    return total / len(batch)


@pytest.mark.parametrize("steps", [1, 2])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_linear_model_meta_gradient_matches_closed_form(steps, first_order, vectorize):
    torch.manual_seed(0)
    family = LinearRegression(shots=5, queries=7, dim=3, seed=1)
    model = nn.Linear(3, 1)
    alpha = 0.1
    maml = MAML(model, "regression", inner_lr=alpha, inner_steps=steps, first_order=first_order,
                vectorize=vectorize)
    batch = _batch(family)
    grads, _ = maml.meta_gradient(batch)
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()])
    expected = _closed_form(theta, batch, alpha, steps, first_order)
    got = torch.cat([grads["model.weight"][0], grads["model.bias"]])
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("lr_mode", ["scalar", "per_tensor", "per_element"])
def test_learned_inner_lr_gets_the_hypergradient(lr_mode):
    """One step: theta' = theta - alpha * g_s, so dL_q/d alpha = -g_q(theta') * g_s(theta)
    (elementwise for Meta-SGD, summed over a tensor for per-tensor, over all for scalar)."""
    torch.manual_seed(0)
    family = LinearRegression(shots=6, queries=6, dim=2, seed=3)
    model = nn.Linear(2, 1)
    maml = MAML(model, "regression", inner_lr=0.05, inner_steps=1, lr_mode=lr_mode)
    batch = _batch(family, tasks=3)
    grads, _ = maml.meta_gradient(batch)
    theta = torch.cat([model.weight.detach()[0], model.bias.detach()])
    expected = torch.zeros(3)
    for i in range(len(batch)):
        xs, ys = _augment(batch.support_x[i]), batch.support_y[i][:, 0]
        xq, yq = _augment(batch.query_x[i]), batch.query_y[i][:, 0]
        gs = 2.0 / len(xs) * xs.T @ (xs @ theta - ys)
        t = theta - 0.05 * gs
        gq = 2.0 / len(xq) * xq.T @ (xq @ t - yq)
        expected += -gq * gs / len(batch)
    rates = {k: v for k, v in grads.items() if k.startswith("inner_lr.")}
    if lr_mode == "scalar":
        torch.testing.assert_close(rates["inner_lr.rates.all"], expected.sum(), rtol=1e-12, atol=1e-12)
    elif lr_mode == "per_tensor":
        torch.testing.assert_close(rates["inner_lr.rates.weight"], expected[:2].sum(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rates["inner_lr.rates.bias"], expected[2], rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(rates["inner_lr.rates.weight"][0], expected[:2], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rates["inner_lr.rates.bias"], expected[2:], rtol=1e-12, atol=1e-12)


def _meta_loss(maml: MAML, batch) -> torch.Tensor:
    params, rates = maml.params(), dict(maml.inner_lr.rates)
    losses = [maml.task_loss(maml.model, params, rates, (batch.support_x[i], batch.support_y[i],
                                                       batch.query_x[i], batch.query_y[i]))[0]
              for i in range(len(batch))]
    return torch.stack(losses).mean()


def test_second_order_meta_gradient_matches_finite_differences():
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(6, 5), activation="tanh")
    maml = MAML(model, "regression", inner_lr=0.3, inner_steps=2, lr_mode="per_tensor")
    batch = _batch(Sinusoid(shots=5, queries=5, seed=2), tasks=3)
    grads, _ = maml.meta_gradient(batch)
    eps = 1e-6
    with torch.no_grad():
        for name, p in maml.named_parameters():
            flat = p.view(-1)
            fd = torch.empty_like(flat)
            for j in range(flat.numel()):
                orig = flat[j].item()
                flat[j] = orig + eps
                up = _meta_loss(maml, batch)
                flat[j] = orig - eps
                down = _meta_loss(maml, batch)
                flat[j] = orig
                fd[j] = (up - down) / (2 * eps)
            torch.testing.assert_close(grads[name].view(-1), fd, rtol=1e-6, atol=1e-8, msg=name)


def _hand_unroll(model, batch, lr, steps, first_order):
    """MAML written out in plain autograd, the way it is taught."""
    names = [n for n, _ in model.named_parameters()]
    theta = [p for _, p in model.named_parameters()]
    total = 0.0
    for i in range(len(batch)):
        fast = list(theta)
        for _ in range(steps):
            out = torch.func.functional_call(model, dict(zip(names, fast, strict=True)), (batch.support_x[i],))
            loss = ((out - batch.support_y[i]) ** 2).mean()
            gs = torch.autograd.grad(loss, fast, create_graph=not first_order)
            fast = [w - lr * g for w, g in zip(fast, gs, strict=True)]
        out = torch.func.functional_call(model, dict(zip(names, fast, strict=True)), (batch.query_x[i],))
        total = total + ((out - batch.query_y[i]) ** 2).mean()
    grads = torch.autograd.grad(total / len(batch), theta)
    return dict(zip(names, grads, strict=True))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_parity_with_hand_written_unroll(first_order, vectorize):
    torch.manual_seed(1)
    model = MLP(1, 1, hidden=(10, 10), activation="relu")
    maml = MAML(model, "regression", inner_lr=0.02, inner_steps=3, first_order=first_order,
                vectorize=vectorize)
    batch = _batch(Sinusoid(shots=10, queries=10, seed=4), tasks=5)
    grads, _ = maml.meta_gradient(batch)
    expected = _hand_unroll(model, batch, 0.02, 3, first_order)
    for name, g in expected.items():
        torch.testing.assert_close(grads["model." + name], g, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("first_order", [False, True])
def test_vectorised_equals_looped(first_order):
    torch.manual_seed(2)
    batch = _batch(Sinusoid(shots=7, queries=9, seed=5), tasks=6)
    grads = {}
    for vectorize in ("vmap", "loop"):
        torch.manual_seed(2)
        maml = MAML(MLP(1, 1, hidden=(12, 12)), "regression", inner_lr=0.05, inner_steps=2,
                    first_order=first_order, lr_mode="per_element", vectorize=vectorize)
        grads[vectorize], metrics = maml.meta_gradient(batch)
        assert set(metrics) == {"loss", "mse"}
    assert grads["vmap"].keys() == grads["loop"].keys()
    for name in grads["vmap"]:
        torch.testing.assert_close(grads["vmap"][name], grads["loop"][name], rtol=1e-10, atol=1e-12)


def test_adapt_selects_parameters():
    """Only the named parameters move in the inner loop (ANIL-style ``head.*``)."""
    torch.manual_seed(0)
    maml = MAML(MLP(1, 1, hidden=(8,)), "regression", inner_lr=0.1, adapt=["head.*"])
    assert maml.adapt_names == ["head.weight", "head.bias"]
    task = Sinusoid(seed=0).task("train", 0)
    from innerloop.adapt import adapt, model_loss

    params = {n: p.detach().double() for n, p in maml.params().items()}
    loss = model_loss(maml.model, maml.fns.loss)
    out = adapt(loss, params, {}, task.support_x.double(), task.support_y.double(), steps=2,
                lr=0.1, adapt_names=maml.adapt_names)
    assert torch.equal(out["features.0.weight"], params["features.0.weight"])
    assert not torch.equal(out["head.weight"], params["head.weight"])
    with pytest.raises(ValueError, match="match no parameter"):
        MAML(MLP(), "regression", adapt=["nothing.*"])
