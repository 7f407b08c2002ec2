"""Proofs for iMAML.

1. Linear regression (``nn.Linear``), where the support Hessian ``H = (2/n) X^T X`` is constant:
   the proximal inner problem has the closed-form solution
   ``phi* = (H + lambda I)^{-1} (lambda theta + b)`` with ``b = (2/n) X^T y``, and the implicit
   meta-gradient is ``(I + H / lambda)^{-1} grad L_q(phi*)``. With enough inner steps and as many
   conjugate-gradient iterations as unknowns, the algorithm agrees to float64 precision.
2. Unconverged inner loops: the meta-gradient is the same formula at the algorithm's own
   ``phi`` (gradient descent on the proximal objective, written out by hand).
3. Nonlinear models (an MLP with MSE, and with cross-entropy): conjugate gradient with
   Hessian-vector products equals an exact solve with the full Hessian from
   ``torch.autograd.functional.hessian``.
4. Memory: the peak of allocated memory (from the torch profiler) does not grow with the number
   of inner steps, while second-order MAML's does.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from innerloop.algorithms.imaml import IMAML, conjugate_gradient
from innerloop.algorithms.maml import MAML
from innerloop.data import LinearRegression, Sinusoid
from innerloop.execution import plan
from innerloop.models import MLP
from innerloop.tasks import TaskBatch
from innerloop.training.config import ConfigError, config_from_dict

pytestmark = pytest.mark.usefixtures("float64")


def _augment(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(*x.shape[:-1], 1)], dim=-1)


def _linear_batch(tasks=4):
    return LinearRegression(shots=6, queries=5, dim=3, seed=1).batch("train", range(tasks)).to(dtype=torch.float64)


def _quadratic(x, y):
    """``H``, ``b`` of ``mean((X theta - y)^2)``: gradient ``H theta - b``."""
    xa = _augment(x)
    return 2.0 / len(xa) * xa.T @ xa, 2.0 / len(xa) * xa.T @ y[:, 0]


def _theta(model: nn.Linear) -> torch.Tensor:
    return torch.cat([model.weight.detach()[0], model.bias.detach()])


def _flat(grads):
    return torch.cat([grads["model.weight"][0], grads["model.bias"]])


@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_linear_regression_closed_form(vectorize):
    torch.manual_seed(0)
    model, lam = nn.Linear(3, 1), 2.0
    imaml = IMAML(model, "regression", inner_lr=0.1, inner_steps=200, reg_lambda=lam, cg_steps=4,
                  vectorize=vectorize)
    batch = _linear_batch()
    grads, metrics = imaml.meta_gradient(batch)
    theta, eye = _theta(model), torch.eye(4)
    expected, loss = torch.zeros(4), 0.0
    for i in range(len(batch)):
        hs, bs = _quadratic(batch.support_x[i], batch.support_y[i])
        hq, bq = _quadratic(batch.query_x[i], batch.query_y[i])
        phi = torch.linalg.solve(hs + lam * eye, lam * theta + bs)  # the exact inner solution
        got_phi = imaml.inner_solve(imaml.params(), {}, batch.support_x[i], batch.support_y[i])
        torch.testing.assert_close(torch.cat([got_phi["weight"][0], got_phi["bias"]]), phi,
                                   rtol=1e-12, atol=1e-13)
        expected += torch.linalg.solve(eye + hs / lam, hq @ phi - bq) / len(batch)
        loss += float(((_augment(batch.query_x[i]) @ phi - batch.query_y[i][:, 0]) ** 2).mean()) / len(batch)
    torch.testing.assert_close(_flat(grads), expected, rtol=1e-10, atol=1e-12)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-10)


def test_unconverged_inner_loop_uses_the_implicit_formula_at_its_own_phi():
    torch.manual_seed(1)
    model, lam, lr = nn.Linear(3, 1), 0.5, 0.05
    imaml = IMAML(model, "regression", inner_lr=lr, inner_steps=3, reg_lambda=lam, cg_steps=4)
    batch = _linear_batch(tasks=3)
    grads, _ = imaml.meta_gradient(batch)
    theta, eye = _theta(model), torch.eye(4)
    expected = torch.zeros(4)
    for i in range(len(batch)):
        hs, bs = _quadratic(batch.support_x[i], batch.support_y[i])
        hq, bq = _quadratic(batch.query_x[i], batch.query_y[i])
        phi = theta.clone()
        for _ in range(3):
            phi = phi - lr * (hs @ phi - bs + lam * (phi - theta))
        expected += torch.linalg.solve(eye + hs / lam, hq @ phi - bq) / len(batch)
    torch.testing.assert_close(_flat(grads), expected, rtol=1e-10, atol=1e-12)


def test_conjugate_gradient_solves_spd_systems():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g)
    a = m @ m.T + 0.5 * torch.eye(5)
    b = {"u": torch.randn(2, generator=g), "v": torch.randn(3, generator=g)}

    def matvec(x):
        y = a @ torch.cat([x["u"], x["v"]])
        return {"u": y[:2], "v": y[2:]}

    x = conjugate_gradient(matvec, b, steps=5)
    torch.testing.assert_close(torch.cat([x["u"], x["v"]]), torch.linalg.solve(a, torch.cat([b["u"], b["v"]])),
                               rtol=1e-10, atol=1e-12)
    # a zero right-hand side: no division by zero, the solution stays 0
    zero = conjugate_gradient(matvec, {"u": torch.zeros(2), "v": torch.zeros(3)}, steps=3)
    assert all(bool((t == 0).all()) for t in zero.values())


def _classification_batch(tasks=2):
    g = torch.Generator().manual_seed(3)
    return TaskBatch(torch.randn(tasks, 6, 2, generator=g), torch.tensor([[0, 0, 1, 1, 2, 2]] * tasks),
                     torch.randn(tasks, 3, 2, generator=g), torch.tensor([[0, 1, 2]] * tasks))


@pytest.mark.parametrize("objective", ["regression", "classification"])
def test_nonlinear_model_matches_an_exact_hessian_solve(objective):
    torch.manual_seed(2)
    if objective == "regression":
        model, batch, loss_fn = MLP(1, 1, hidden=(4,), activation="tanh"), None, F.mse_loss
        batch = Sinusoid(shots=5, queries=5, seed=0).batch("train", range(2)).to(dtype=torch.float64)
    else:
        model, batch, loss_fn = MLP(2, 3, hidden=(3,), activation="tanh"), _classification_batch(), F.cross_entropy
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    count = sum(p.numel() for p in model.parameters())
    lam = 4.0
    imaml = IMAML(model, objective, inner_lr=0.05, inner_steps=5, reg_lambda=lam, cg_steps=count)
    grads, _ = imaml.meta_gradient(batch)

    def unflatten(v):
        return dict(zip(names, (t.view(s) for t, s in zip(v.split([s.numel() for s in shapes]), shapes,
                                                           strict=True)), strict=True))

    expected = torch.zeros(count)
    for i in range(len(batch)):
        phi = imaml.inner_solve(imaml.params(), {}, batch.support_x[i], batch.support_y[i])
        flat_phi = torch.cat([phi[n].reshape(-1) for n in names])

        def support(v, i=i):
            pred = torch.func.functional_call(model, unflatten(v), (batch.support_x[i],))
            return loss_fn(pred, batch.support_y[i])

        def query(v, i=i):
            return loss_fn(torch.func.functional_call(model, unflatten(v), (batch.query_x[i],)), batch.query_y[i])

        hess = torch.autograd.functional.hessian(support, flat_phi)
        a = torch.eye(count) + hess / lam
        assert bool((torch.linalg.eigvalsh(a) > 0).all())  # conjugate gradient's assumption holds
        gq = torch.autograd.functional.jacobian(query, flat_phi)
        expected += torch.linalg.solve(a, gq) / len(batch)
    got = torch.cat([grads[f"model.{n}"].reshape(-1) for n in names])
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-11)


def _peak_bytes(fn) -> int:
    """Peak of allocated CPU memory while ``fn`` runs: the running sum, in time order, of what
    each op allocates minus what it frees (``self_cpu_memory_usage`` of the torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def test_memory_does_not_grow_with_inner_steps():
    batch = Sinusoid(shots=10, queries=10, seed=0).batch("train", range(1)).to(dtype=torch.float64)
    peaks = {}
    for name, cls in (("imaml", IMAML), ("maml", MAML)):
        for steps in (3, 12):
            torch.manual_seed(0)
            model = MLP(1, 1, hidden=(32, 32), activation="tanh")
            algo = cls(model, "regression", inner_lr=0.01, inner_steps=steps, vectorize="loop")
            peaks[name, steps] = _peak_bytes(lambda algo=algo: algo.meta_gradient(batch))
    # the control: MAML keeps every inner step's graph, so its peak grows with the steps (3.1x here) ...
    assert peaks["maml", 12] > 2 * peaks["maml", 3], peaks
    # ... iMAML keeps none: the same peak for 3 and 12 inner steps (measured equal; a little slack)
    assert peaks["imaml", 12] <= 1.05 * peaks["imaml", 3], peaks


def test_evaluate_runs_the_proximal_inner_loop():
    torch.manual_seed(4)
    model, lam, lr = nn.Linear(3, 1), 1.5, 0.1
    imaml = IMAML(model, "regression", inner_lr=lr, inner_steps=2, reg_lambda=lam)
    batch = _linear_batch(tasks=2)
    scores = imaml.evaluate(batch, steps=3)
    theta = _theta(model)
    for i in range(2):
        hs, bs = _quadratic(batch.support_x[i], batch.support_y[i])
        phi = theta.clone()
        for k in range(4):
            mse = ((_augment(batch.query_x[i]) @ phi - batch.query_y[i][:, 0]) ** 2).mean()
            torch.testing.assert_close(scores["mse"][i, k], mse, rtol=1e-12, atol=1e-13)
            phi = phi - lr * (hs @ phi - bs + lam * (phi - theta))


def test_batchnorm_models_run_as_a_loop_and_errors_are_named():
    from innerloop.models.conv4 import Conv4

    torch.manual_seed(5)
    imaml = IMAML(Conv4(1, ways=3, hidden=2, image_size=16), "classification", inner_lr=0.1, inner_steps=2)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 6, 1, 16, 16, generator=g), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                      torch.rand(2, 3, 1, 16, 16, generator=g), torch.tensor([[0, 1, 2]] * 2))
    assert not plan(imaml.execution, imaml.model, batch, second_order=True).vmap
    grads, metrics = imaml.meta_gradient(batch)
    assert all(bool(torch.isfinite(v).all()) for v in grads.values()) and set(metrics) == {"loss", "accuracy"}
    with pytest.raises(ValueError, match=r"reg_lambda = 0\.0 is invalid: must be > 0"):
        IMAML(MLP(), "regression", reg_lambda=0.0)
    with pytest.raises(ValueError, match="cg_steps = 0 is invalid: must be an integer >= 1"):
        IMAML(MLP(), "regression", cg_steps=0)


def test_config():
    from innerloop.training.run import build_algorithm, build_family

    cfg = config_from_dict({"algorithm": {"name": "imaml", "inner_steps": 16, "reg_lambda": 0.5, "cg_steps": 3}})
    algo = build_algorithm(cfg, build_family(cfg))
    assert isinstance(algo, IMAML) and (algo.inner_steps, algo.reg_lambda, algo.cg_steps) == (16, 0.5, 3)
    with pytest.raises(ConfigError, match=r"algorithm.reg_lambda = -1\.0 is invalid: must be > 0"):
        config_from_dict({"algorithm": {"name": "imaml", "reg_lambda": -1.0}})
    with pytest.raises(ConfigError, match=r"algorithm\.cg_steps = 0 is invalid"):
        config_from_dict({"algorithm": {"name": "imaml", "cg_steps": 0}})
