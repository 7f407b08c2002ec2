"""Proofs for Reptile: one outer update through the real training loop equals the hand computation.

By hand: for each task, a deep copy of the model is trained on the support set with
``torch.optim.SGD`` or ``torch.optim.Adam`` (k full-batch steps), giving ``phi_i``; the update is
``theta + eps * (mean_i phi_i - theta)``. The algorithm side is :func:`meta_train` with the SGD
outer optimiser at ``outer_lr = eps`` (and the linear annealing of ``eps``). All in float64.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from innerloop.adapt import adam_init, adam_step
from innerloop.algorithms.reptile import Reptile
from innerloop.data import Sinusoid
from innerloop.models import MLP
from innerloop.training import meta_train
from innerloop.training.config import ConfigError, TrainConfig, config_from_dict
from innerloop.training.schedule import outer_lr_at

TOL = {"rtol": 1e-12, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("float64")


class Float64:
    """A task family whose batches are float64 (the library's families are float32)."""

    objective = "regression"

    def __init__(self, family) -> None:
        self.family, self.seed = family, family.seed

    def task(self, split, index):
        return self.family.task(split, index)

    def batch(self, split, indices):
        return self.family.batch(split, indices).to(dtype=torch.float64)


def _family():
    return Float64(Sinusoid(shots=6, queries=4, seed=3))


def _hand_phi(model, sx, sy, steps, lr, optimizer, betas=(0.0, 0.999)):
    m = copy.deepcopy(model)
    if optimizer == "sgd":
        opt = torch.optim.SGD(m.parameters(), lr=lr)
    else:
        opt = torch.optim.Adam(m.parameters(), lr=lr, betas=betas, eps=1e-8)
    for _ in range(steps):
        opt.zero_grad()
        F.mse_loss(m(sx), sy).backward()
        opt.step()
    return {n: p.detach() for n, p in m.named_parameters()}


def _hand_update(model, batch, eps, steps, lr, optimizer, betas=(0.0, 0.999)):
    phis = [_hand_phi(model, batch.support_x[i], batch.support_y[i], steps, lr, optimizer, betas)
            for i in range(len(batch))]
    return {n: p.detach() + eps * (torch.stack([phi[n] for phi in phis]).mean(0) - p.detach())
            for n, p in model.named_parameters()}


def _train_cfg(iterations=1, tasks=3, eps=0.5, **extra) -> TrainConfig:
    return TrainConfig(iterations=iterations, meta_batch_size=tasks, outer_lr=eps, optimizer="sgd",
                       validate_every=iterations, val_tasks=2, log_every=1, **extra)


@pytest.mark.parametrize(("optimizer", "betas"), [("sgd", (0.0, 0.999)), ("adam", (0.0, 0.999)),
                                                  ("adam", (0.9, 0.99))])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_one_update_equals_the_hand_computation(optimizer, betas, vectorize):
    torch.manual_seed(0)
    model = MLP(1, 1, hidden=(8, 8), activation="tanh")
    lr = 0.05 if optimizer == "sgd" else 0.01
    reptile = Reptile(model, "regression", inner_lr=lr, inner_steps=4, inner_optimizer=optimizer, betas=betas,
                      vectorize=vectorize)
    family = _family()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    expected = _hand_update(model, family.batch("train", range(3)), 0.5, 4, lr, optimizer, betas)
    meta_train(reptile, family, _train_cfg(), progress=False)
    for n, p in model.named_parameters():
        assert (p.detach() - before[n]).abs().max() > 1e-4, n  # it moved
        torch.testing.assert_close(p.detach(), expected[n], **TOL, msg=n)


def test_the_meta_gradient_is_theta_minus_the_mean_adapted_weights():
    torch.manual_seed(1)
    model = MLP(1, 1, hidden=(6,), activation="tanh")
    reptile = Reptile(model, "regression", inner_lr=0.1, inner_steps=3)
    batch = _family().batch("train", range(4))
    grads, metrics = reptile.meta_gradient(batch)
    phis = [_hand_phi(model, batch.support_x[i], batch.support_y[i], 3, 0.1, "sgd") for i in range(4)]
    for n, p in model.named_parameters():
        expected = p.detach() - torch.stack([phi[n] for phi in phis]).mean(0)
        torch.testing.assert_close(grads[f"model.{n}"], expected, **TOL, msg=n)
    # the reported loss is the query loss at phi_i
    losses = []
    for i, phi in enumerate(phis):
        pred = torch.func.functional_call(model, phi, (batch.query_x[i],))
        losses.append(F.mse_loss(pred, batch.query_y[i]))
    assert math.isclose(metrics["loss"], float(torch.stack(losses).mean()), rel_tol=1e-12)


def test_linear_annealing_of_the_outer_step_size():
    """Three iterations with eps_t = eps0 * (1 - t/3), written out by hand."""
    torch.manual_seed(2)
    model = MLP(1, 1, hidden=(5,), activation="tanh")
    reference = copy.deepcopy(model)
    family = _family()
    reptile = Reptile(model, "regression", inner_lr=0.05, inner_steps=2)
    meta_train(reptile, family, _train_cfg(iterations=3, tasks=2, eps=0.6, lr_schedule="linear"), progress=False)
    for t in range(3):
        batch = family.batch("train", range(2 * t, 2 * t + 2))
        new = _hand_update(reference, batch, 0.6 * (1 - t / 3), 2, 0.05, "sgd")
        with torch.no_grad():
            for n, p in reference.named_parameters():
                p.copy_(new[n])
    for (n, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), **TOL, msg=n)


def test_schedules_by_hand():
    cfg = TrainConfig(iterations=4, outer_lr=1.0, final_outer_lr=0.2, lr_schedule="linear")
    assert [outer_lr_at(cfg, t) for t in range(4)] == pytest.approx([1.0, 0.8, 0.6, 0.4], abs=1e-15)
    cfg = dataclasses.replace(cfg, lr_schedule="cosine")
    expected = [0.2 + 0.8 * (1 + math.cos(math.pi * t / 4)) / 2 for t in range(4)]
    assert [outer_lr_at(cfg, t) for t in range(4)] == pytest.approx(expected, abs=1e-15)
    assert outer_lr_at(cfg, 0) == 1.0
    cfg = dataclasses.replace(cfg, lr_schedule="constant")
    assert outer_lr_at(cfg, 3) == 1.0


def test_a_resumed_annealed_run_is_exact(tmp_path):
    """A run that dies after its step-2 checkpoint and is resumed equals the uninterrupted one:
    the annealed rate is a function of the step, not scheduler state."""
    family = _family()

    def run(folder, hook=None):
        torch.manual_seed(3)
        reptile = Reptile(MLP(1, 1, hidden=(5,)), "regression", inner_lr=0.05, inner_steps=2)
        cfg = _train_cfg(iterations=4, tasks=2, eps=0.5, lr_schedule="cosine", final_outer_lr=0.1)
        cfg = dataclasses.replace(cfg, validate_every=2)
        meta_train(reptile, family, cfg, folder, progress=False, grad_hook=hook)
        return reptile

    calls = []

    def crash_in_third_iteration(grads):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("killed")
        return grads

    straight = run(tmp_path / "a")
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "b", crash_in_third_iteration)
    resumed = run(tmp_path / "b")
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), n


def test_pure_adam_step_matches_torch_adam():
    torch.manual_seed(4)
    w = torch.randn(3, 2, requires_grad=True)
    opt = torch.optim.Adam([w], lr=0.03, betas=(0.8, 0.95), eps=1e-8)
    params = {"w": w.detach().clone()}
    state = adam_init(params)
    for _ in range(5):
        g = torch.randn(3, 2)
        w.grad = g.clone()
        opt.step()
        params, state = adam_step(params, {"w": g}, state, 0.03, (0.8, 0.95), 1e-8)
    torch.testing.assert_close(params["w"], w.detach(), rtol=1e-14, atol=1e-15)
    assert state[2] == 5


def test_evaluate_fine_tunes_with_the_inner_optimizer():
    torch.manual_seed(5)
    model = MLP(1, 1, hidden=(6,), activation="tanh")
    reptile = Reptile(model, "regression", inner_lr=0.02, inner_steps=2, inner_optimizer="adam")
    batch = _family().batch("test", range(2))
    scores = reptile.evaluate(batch, steps=3)
    assert scores["mse"].shape == (2, 4)
    for i in range(2):
        for k in range(4):
            phi = _hand_phi(model, batch.support_x[i], batch.support_y[i], k, 0.02, "adam")
            pred = torch.func.functional_call(model, phi, (batch.query_x[i],))
            torch.testing.assert_close(scores["mse"][i, k], F.mse_loss(pred, batch.query_y[i]), **TOL)


def test_parameters_outside_adapt_keep_their_value():
    torch.manual_seed(6)
    model = MLP(1, 1, hidden=(6,))
    reptile = Reptile(model, "regression", inner_lr=0.1, inner_steps=2, adapt="head.*")
    grads, _ = reptile.meta_gradient(_family().batch("train", range(2)))
    assert not grads["model.features.0.weight"].any() and grads["model.head.weight"].any()


def test_config_and_errors():
    from innerloop.training.run import build_algorithm, build_family

    cfg = config_from_dict({"algorithm": {"name": "reptile", "inner_steps": 5, "inner_optimizer": "adam",
                                          "inner_betas": [0.0, 0.99]},
                            "train": {"optimizer": "sgd", "outer_lr": 0.1, "lr_schedule": "linear"}})
    algo = build_algorithm(cfg, build_family(cfg))
    assert isinstance(algo, Reptile) and algo.inner_optimizer == "adam" and algo.betas == (0.0, 0.99)
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm\.inner_optimizer' for maml"):
        config_from_dict({"algorithm": {"name": "maml", "inner_optimizer": "adam"}})
    with pytest.raises(ConfigError, match=r"algorithm.betas = \(0.9, 1.0\) is invalid"):
        config_from_dict({"algorithm": {"name": "reptile", "inner_betas": [0.9, 1.0]}})
    with pytest.raises(ConfigError, match=r"final_outer_lr = -1\.0 is invalid"):
        config_from_dict({"train": {"final_outer_lr": -1.0}})
    with pytest.raises(ValueError, match="inner_optimizer = 'rmsprop' is not allowed: choose one of"):
        Reptile(MLP(), "regression", inner_optimizer="rmsprop")  # type: ignore[arg-type]
