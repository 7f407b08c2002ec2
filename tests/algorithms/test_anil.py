"""Proofs for ANIL (adapt ``head.*``) and BOIL (adapt ``features.*``).

With ``A`` the adapted parameters and ``F`` the frozen ones (not adapted in the inner loop), one
inner step gives ``phi_A = theta_A - alpha * grad_A L_s(theta)``. Writing
``u = d L_q / d theta_F`` and ``v = d L_q / d phi_A``, both partial derivatives at
``(theta_F, phi_A)``:

* first order (any number of steps): the frozen parameters get exactly ``u``, the gradient of the
  plain query loss at the adapted parameters, and the adapted ones get ``v``;
* second order (one step): ``grad_F = u - alpha * d<grad_A L_s(theta), v>/d theta_F`` and
  ``grad_A = v - alpha * d<grad_A L_s(theta), v>/d theta_A = (I - alpha H_AA) v``.

Every term is computed here with plain ``torch.autograd`` in float64 and compared at 1e-12.
"""

from __future__ import annotations

import fnmatch

import pytest
import torch
from torch.func import functional_call

from innerloop.algorithms.anil import ANIL, BOIL
from innerloop.data import Sinusoid
from innerloop.execution import plan
from innerloop.models import MLP
from innerloop.models.conv4 import Conv4
from innerloop.tasks import TaskBatch
from innerloop.training.config import ConfigError, config_from_dict

TOL = {"rtol": 1e-12, "atol": 1e-12}


def _batch3() -> TaskBatch:
    return TaskBatch(torch.rand(2, 6, 1, 16, 16), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                     torch.rand(2, 3, 1, 16, 16), torch.tensor([[0, 1, 2]] * 2))



pytestmark = pytest.mark.usefixtures("float64")


def _hand(model, loss_fn, batch: TaskBatch, pattern: str, alpha: float, steps: int, first_order: bool):
    """The meta-gradient of a partially adapted MAML, term by term with torch.autograd."""
    theta = {n: p for n, p in model.named_parameters()}
    adapted = [n for n in theta if fnmatch.fnmatchcase(n, pattern)]
    frozen = [n for n in theta if n not in adapted]

    def loss(params, x, y):
        return loss_fn(functional_call(model, params, (x,)), y)

    total = {n: torch.zeros_like(p) for n, p in theta.items()}
    for i in range(len(batch)):
        sx, sy, qx, qy = batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i]
        phi = {n: theta[n].detach() for n in adapted}
        for _ in range(steps):  # the adapted values (no graph)
            cur = {**theta, **{n: phi[n].requires_grad_() for n in adapted}}
            gs = torch.autograd.grad(loss(cur, sx, sy), [cur[n] for n in adapted])
            phi = {n: (phi[n] - alpha * g).detach() for n, g in zip(adapted, gs, strict=True)}
        leaves = {n: phi[n].requires_grad_() for n in adapted}
        lq = loss({**theta, **leaves}, qx, qy)
        grads = torch.autograd.grad(lq, [theta[n] for n in frozen] + [leaves[n] for n in adapted])
        u = dict(zip(frozen, grads[: len(frozen)], strict=True))
        v = dict(zip(adapted, grads[len(frozen) :], strict=True))
        if first_order:
            for n in frozen:
                total[n] += u[n] / len(batch)
            for n in adapted:
                total[n] += v[n] / len(batch)
            continue
        assert steps == 1, "the second-order formula here is for one step"
        gs = torch.autograd.grad(loss(theta, sx, sy), [theta[n] for n in adapted], create_graph=True)
        inner = sum((g * v[n]).sum() for n, g in zip(adapted, gs, strict=True))
        mixed = torch.autograd.grad(inner, list(theta.values()), allow_unused=True)
        mixed = {n: torch.zeros_like(theta[n]) if m is None else m
                 for n, m in zip(theta, mixed, strict=True)}
        for n in frozen:
            total[n] += (u[n] - alpha * mixed[n]) / len(batch)
        for n in adapted:
            total[n] += (v[n] - alpha * mixed[n]) / len(batch)
    return total


def _sinusoid_batch(tasks=3):
    return Sinusoid(shots=6, queries=5, seed=7).batch("train", range(tasks)).to(dtype=torch.float64)


@pytest.mark.parametrize("cls", [ANIL, BOIL])
@pytest.mark.parametrize(("steps", "first_order"), [(1, True), (2, True), (1, False)])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_mlp_meta_gradient_by_hand(cls, steps, first_order, vectorize):
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(5, 4), activation="tanh")
    algo = cls(model, "regression", inner_lr=0.3, inner_steps=steps, first_order=first_order,
               vectorize=vectorize)
    pattern = cls.adapt_pattern
    assert algo.adapt_names == [n for n, _ in model.named_parameters() if fnmatch.fnmatchcase(n, pattern)]
    batch = _sinusoid_batch()
    grads, metrics = algo.meta_gradient(batch)
    expected = _hand(model, torch.nn.functional.mse_loss, batch, pattern, 0.3, steps, first_order)
    assert set(grads) == {f"model.{n}" for n in expected}
    for n, g in expected.items():
        assert g.abs().max() > 0, n  # every parameter is meta-learned, adapted or not
        torch.testing.assert_close(grads[f"model.{n}"], g, **TOL, msg=n)
    assert set(metrics) == {"loss", "mse"}


@pytest.mark.parametrize("cls", [ANIL, BOIL])
@pytest.mark.parametrize("first_order", [True, False])
def test_conv4_with_batchnorm_by_hand(cls, first_order):
    """The same on the image backbone (BatchNorm with batch statistics, per-task loop)."""
    torch.manual_seed(1)
    model = Conv4(1, ways=3, hidden=3, image_size=16)
    algo = cls(model, "classification", inner_lr=0.2, inner_steps=1, first_order=first_order)
    assert not plan(algo.execution, algo.model, _batch3(), second_order=not first_order).vmap
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 6, 1, 16, 16, generator=g), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                      torch.rand(2, 3, 1, 16, 16, generator=g), torch.tensor([[0, 1, 2]] * 2))
    grads, metrics = algo.meta_gradient(batch)
    expected = _hand(model, torch.nn.functional.cross_entropy, batch, cls.adapt_pattern, 0.2, 1, first_order)
    for n, e in expected.items():
        torch.testing.assert_close(grads[f"model.{n}"], e, **TOL, msg=n)
    assert set(metrics) == {"loss", "accuracy"}


def test_evaluate_adapts_only_the_chosen_part():
    torch.manual_seed(0)
    batch = _sinusoid_batch(tasks=2)
    for cls in (ANIL, BOIL):
        algo = cls(MLP(1, 1, hidden=(6,)), "regression", inner_lr=0.1, inner_steps=1)
        scores = algo.evaluate(batch, steps=3)
        assert scores["mse"].shape == (2, 4)
        assert not torch.equal(scores["mse"][:, 0], scores["mse"][:, 3])


def test_models_without_head_or_body_are_refused():
    net = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match=r"anil adapts the model's head \(parameters 'head\.\*'\).*'0\.weight'"):
        ANIL(net, "regression")
    with pytest.raises(ValueError, match=r"boil adapts the model's body \(parameters 'features\.\*'\)"):
        BOIL(net, "regression")


def test_config_names_and_fixed_adapt():
    from innerloop.training.run import build_algorithm, build_family

    for name, cls in (("anil", ANIL), ("boil", BOIL)):
        cfg = config_from_dict({"algorithm": {"name": name, "inner_steps": 2, "first_order": True}})
        algo = build_algorithm(cfg, build_family(cfg))
        assert type(algo) is cls and algo.name == name and algo.inner_steps == 2 and algo.first_order
        with pytest.raises(ConfigError, match=f"key 'algorithm.adapt' for {name} \\({name} always adapts"):
            config_from_dict({"algorithm": {"name": name, "adapt": "head.*"}})
