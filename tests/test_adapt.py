"""The one inner loop (:func:`innerloop.adapt.unroll`) and its update rules, in float64.

* Each rule is the arithmetic it names: SGD with fixed, per-tensor, per-element and per-step rates
  and weight decay; the proximal step is gradient descent on the proximal objective; Adam matches
  ``torch.optim.Adam`` step for step.
* The ways of differentiating an inner step (``torch.func.grad``, ``torch.autograd.grad``, and
  checkpointed autograd) give the same trajectory and the same second-order meta-gradient.
* Hessian-vector products agree across modes and with the explicit Hessian.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from innerloop.adapt import (
    adam,
    adapt_trajectory,
    differentiation,
    hessian_vector_product,
    last,
    model_loss,
    sgd,
    sgd_step,
    unroll,
)

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def _data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(7, 2, generator=g, dtype=torch.float64), torch.randn(7, 1, generator=g, dtype=torch.float64)


def _objective(model: nn.Module):
    loss, (x, y) = model_loss(model, torch.nn.functional.mse_loss), _data()
    return lambda p, step: loss(p, {}, x, y)


def test_sgd_rules_are_their_arithmetic():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    objective = _objective(model)
    rates = [0.1, 0.05, 0.2]
    got = list(unroll(objective, params, steps=3, rule=sgd(rates, weight_decay=0.3)))
    current = params
    for j, rate in enumerate(rates):
        g = torch.func.grad(lambda p, j=j: objective(p, j))(current)
        current = {k: current[k] - rate * (g[k] + 0.3 * current[k]) for k in current}
        for k in current:
            torch.testing.assert_close(got[j][k], current[k], **TOL)
    with pytest.raises(ValueError, match="3 per-step learning rates given, but inner step 4"):
        list(unroll(objective, params, steps=4, rule=sgd(rates)))


def test_proximal_step_is_gradient_descent_on_the_proximal_objective():
    model = _mlp()
    theta = {k: v.detach() for k, v in model.named_parameters()}
    start = {k: v + 0.1 for k, v in theta.items()}
    objective, lam, lr = _objective(model), 2.0, 0.05

    def proximal(p: dict[str, Tensor], step: int) -> Tensor:
        return objective(p, step) + 0.5 * lam * sum(((p[k] - theta[k]) ** 2).sum() for k in p)

    ours = last(unroll(objective, start, steps=4, rule=sgd(lr, weight_decay=lam, anchor=theta)), start)
    plain = last(unroll(proximal, start, steps=4, rule=sgd(lr)), start)
    for k in ours:
        torch.testing.assert_close(ours[k], plain[k], **TOL)


def test_adam_rule_matches_torch_optim_adam():
    model = _mlp()
    objective = _objective(model)
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    got = list(unroll(objective, params, steps=5, rule=adam(0.01, betas=(0.5, 0.9))))
    reference = {k: v.clone().requires_grad_() for k, v in params.items()}
    opt = torch.optim.Adam(reference.values(), lr=0.01, betas=(0.5, 0.9))
    for j in range(5):
        opt.zero_grad()
        objective(reference, j).backward()
        opt.step()
        for k in reference:
            torch.testing.assert_close(got[j][k], reference[k].detach(), **TOL)


@pytest.mark.parametrize("first_order", [False, True])
def test_differentiation_modes_give_the_same_meta_gradient(first_order):
    model = _mlp()
    x, y = _data()
    loss = model_loss(model, torch.nn.functional.mse_loss)
    lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
    results = {}
    for mode in ("func", "autograd", "checkpoint"):
        params = dict(model.named_parameters())
        with differentiation(mode):  # type: ignore[arg-type]
            adapted = last(adapt_trajectory(loss, params, {}, x, y, steps=3, lr=lr, first_order=first_order),
                           params)
        outer = loss(adapted, {}, x + 1, y)
        results[mode] = torch.autograd.grad(outer, [*params.values(), lr])
    for mode in ("autograd", "checkpoint"):
        for a, b in zip(results[mode], results["func"], strict=True):
            torch.testing.assert_close(a, b, **TOL)


def test_adapt_names_freeze_the_rest_for_the_inner_problem():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    out = last(unroll(_objective(model), params, steps=2, rule=sgd(0.1), adapt_names=["2.weight", "2.bias"]),
               params)
    assert all(torch.equal(out[k], params[k]) for k in ("0.weight", "0.bias"))
    assert not torch.equal(out["2.weight"], params["2.weight"])


def test_hessian_vector_products_agree_with_the_hessian():
    model = _mlp()
    params = {k: v.detach() for k, v in model.named_parameters()}
    objective = _objective(model)
    names = list(params)
    sizes = [params[k].numel() for k in names]

    def flat_f(v: Tensor) -> Tensor:
        parts = torch.split(v, sizes)
        return objective({k: p.view_as(params[k]) for k, p in zip(names, parts, strict=True)}, 0)

    flat = torch.cat([params[k].reshape(-1) for k in names])
    hessian = torch.autograd.functional.hessian(flat_f, flat)
    g = torch.Generator().manual_seed(2)
    v = {k: torch.randn(params[k].shape, generator=g, dtype=torch.float64) for k in names}
    expected = hessian @ torch.cat([v[k].reshape(-1) for k in names])
    for mode in ("func", "autograd"):
        with differentiation(mode), torch.no_grad():  # type: ignore[arg-type]
            hv = hessian_vector_product(lambda p: objective(p, 0), params)(v)
        torch.testing.assert_close(torch.cat([hv[k].reshape(-1) for k in names]), expected, **TOL)


def test_sgd_step_with_a_float_rate_is_fused_but_equal():
    g = torch.Generator().manual_seed(3)
    p, d = torch.randn(4, generator=g), torch.randn(4, generator=g)
    out = sgd_step({"w": p}, {"w": d}, 0.3)["w"]
    torch.testing.assert_close(out, p - 0.3 * d, rtol=0, atol=1e-7)


def test_the_loss_scale_leaves_every_gradient_path_unchanged(float64):
    """``loss_scale`` (fp16) scales and unscales exactly (a power of two) in the plain and the
    checkpointed inner step, the meta-gradient and iMAML's Hessian-vector products."""
    import innerloop.execution as ex
    from innerloop.adapt import loss_scale
    from innerloop.algorithms import IMAML, MAML
    from innerloop.data import Sinusoid
    from innerloop.models import MLP

    torch.manual_seed(0)
    batch = Sinusoid(shots=5, queries=5).batch("train", range(3)).to(dtype=torch.float64)
    for make in (lambda: MAML(MLP(1, 1, [8]), "regression", inner_lr=0.1, inner_steps=2, task_threads=1),
                 lambda: MAML(MLP(1, 1, [8]), "regression", inner_lr=0.1, inner_steps=2, checkpoint=True),
                 lambda: IMAML(MLP(1, 1, [8]), "regression", inner_lr=0.1, inner_steps=2, task_threads=1)):
        torch.manual_seed(0)
        alg = make()
        want, _ = alg.meta_gradient(batch)
        with loss_scale(2.0**10):
            got, _ = alg.meta_gradient(batch)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-12, atol=1e-14)
        # ... and it is applied: a scale beyond float32's range overflows every path
        alg32 = make().float()
        with loss_scale(2.0**140):
            over, _ = alg32.meta_gradient(batch.to(dtype=torch.float32))
        assert not all(bool(torch.isfinite(g).all()) for g in over.values())
    assert ex.current_loss_scale() == 1.0
