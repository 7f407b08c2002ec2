"""Proofs for MAML++: equality with a hand-written unroll in float64.

The unroll is MAML as taught (``torch.autograd.grad`` with ``create_graph=True`` for second order,
without for first order), with per-layer, per-step learning rates ``alpha[name][j]``, per-step
BatchNorm weights, and the multi-step loss ``sum_j w_j L_q(phi_{j+1})`` with the weights of the
paper's code re-derived here. The rates and BatchNorm sets are randomised per step, so using the
wrong step's set would show. Also: the training loop drives the annealing (derivative order, MSL
weights) through ``set_progress`` and the cosine-annealed outer rate, checked over two iterations.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from innerloop.algorithms.mamlpp import MAMLPlusPlus, msl_weights
from innerloop.data import Sinusoid
from innerloop.models import MLP
from innerloop.models.conv4 import Conv4
from innerloop.tasks import TaskBatch
from innerloop.training import meta_train
from innerloop.training.config import ConfigError, TrainConfig, config_from_dict

TOL = {"rtol": 1e-12, "atol": 1e-12}


pytestmark = pytest.mark.usefixtures("float64")


def _paper_weights(epoch: int, n: int, msl_epochs: int) -> list[float]:
    """``get_per_step_loss_importance_vector`` of the MAML++ code, with its final-step-only phase."""
    if epoch >= msl_epochs:
        return [0.0] * (n - 1) + [1.0]
    w = [1.0 / n] * n
    decay = 1.0 / n / msl_epochs
    floor = 0.03 / n
    for i in range(n - 1):
        w[i] = max(w[i] - epoch * decay, floor)
    w[-1] = min(w[-1] + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return w


def test_msl_weights():
    assert msl_weights(3, 3, 10) == pytest.approx([1 / 3 - 0.1, 1 / 3 - 0.1, 1 / 3 + 0.2], abs=1e-15)
    assert msl_weights(0, 4, 10) == [0.25] * 4
    assert msl_weights(9, 2, 10) == pytest.approx([max(0.5 - 9 * 0.05, 0.015), min(0.5 + 9 * 0.05, 0.985)])
    assert msl_weights(10, 3, 10) == [0.0, 0.0, 1.0] and msl_weights(0, 3, 0) == [0.0, 0.0, 1.0]
    for it in range(12):
        assert sum(msl_weights(it, 5, 11)) == pytest.approx(1.0, abs=1e-12)
        assert msl_weights(it, 5, 11) == pytest.approx(_paper_weights(it, 5, 11), abs=1e-15)


def _perturb(algo: MAMLPlusPlus, seed: int) -> None:
    """Distinct rates per layer and step, distinct BatchNorm weights per step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in algo.step_lr.values():
            p.mul_(0.5 + torch.rand(p.shape, generator=g, dtype=p.dtype))
        for p in algo.bn_steps.values():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def _hand_unroll(algo: MAMLPlusPlus, batch, loss_fn, iteration: int, msl_iterations: int, first_order: bool):
    model, n_steps = algo.model, algo.inner_steps
    theta = dict(model.named_parameters())
    lrs = {n: algo.step_lr[n.replace(".", "__")] for n in algo.adapt_names}
    bn = {n: algo.bn_steps[n.replace(".", "__")] for n in algo.bn_names} if n_steps > 1 else {}
    weights = _paper_weights(iteration, n_steps, msl_iterations) if msl_iterations else [0.0] * (n_steps - 1) + [1]
    total = 0.0
    for i in range(len(batch)):
        fast = dict(theta)
        for j in range(n_steps):
            bn_j = {n: bn[n][j - 1] for n in bn} if j > 0 else {}
            support = loss_fn(functional_call(model, {**fast, **bn_j}, (batch.support_x[i],)), batch.support_y[i])
            gs = torch.autograd.grad(support, [fast[n] for n in algo.adapt_names], create_graph=not first_order)
            fast = {**fast, **{n: fast[n] - lrs[n][j] * g for n, g in zip(algo.adapt_names, gs, strict=True)}}
            if weights[j]:
                query = functional_call(model, {**fast, **bn_j}, (batch.query_x[i],))
                total = total + weights[j] * loss_fn(query, batch.query_y[i])
    targets = dict(algo.named_parameters())
    grads = torch.autograd.grad(total / len(batch), list(targets.values()), allow_unused=True)
    return {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(targets.items(), grads, strict=True)}


def _sinusoid(tasks=3):
    return Sinusoid(shots=5, queries=6, seed=2).batch("train", range(tasks)).to(dtype=torch.float64)


@pytest.mark.parametrize(("iteration", "first_order"), [(3, True), (7, False), (12, False)])
@pytest.mark.parametrize("vectorize", ["vmap", "loop"])
def test_parity_with_hand_written_unroll(iteration, first_order, vectorize):
    """first_order_iterations = 5 and msl_iterations = 10: iteration 3 is first order with MSL,
    7 second order with MSL, 12 second order on the final step only."""
    torch.manual_seed(0)
    algo = MAMLPlusPlus(MLP(1, 1, hidden=(6, 5), activation="tanh"), "regression", inner_lr=0.1, inner_steps=3,
                        msl_iterations=10, first_order_iterations=5, vectorize=vectorize)
    _perturb(algo, 1)
    algo.set_progress(iteration, 100)
    assert algo.uses_first_order() == first_order
    batch = _sinusoid()
    grads, metrics = algo.meta_gradient(batch)
    expected = _hand_unroll(algo, batch, F.mse_loss, iteration, 10, first_order)
    assert grads.keys() == expected.keys() and any(k.startswith("step_lr.") for k in grads)
    for k, e in expected.items():
        assert e.abs().max() > 0, k
        torch.testing.assert_close(grads[k], e, **TOL, msg=k)
    assert set(metrics) == {"loss", "mse"}


@pytest.mark.parametrize("first_order", [False, True])
def test_conv4_with_per_step_batchnorm_weights(first_order):
    torch.manual_seed(1)
    model = Conv4(1, ways=3, hidden=2, image_size=16)
    algo = MAMLPlusPlus(model, "classification", inner_lr=0.3, inner_steps=2, msl_iterations=4,
                        first_order=first_order)
    assert algo.bn_names and not set(algo.bn_names) & set(algo.adapt_names)  # BatchNorm weights do not adapt
    assert {k for k, _ in algo.named_parameters() if k.startswith("bn_steps.")} == {
        "bn_steps." + n.replace(".", "__") for n in algo.bn_names}
    _perturb(algo, 2)
    algo.set_progress(1, 10)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(torch.rand(2, 6, 1, 16, 16, generator=g), torch.tensor([[0, 0, 1, 1, 2, 2]] * 2),
                      torch.rand(2, 3, 1, 16, 16, generator=g), torch.tensor([[0, 1, 2]] * 2))
    grads, _ = algo.meta_gradient(batch)
    expected = _hand_unroll(algo, batch, F.cross_entropy, 1, 4, first_order)
    for k, e in expected.items():
        torch.testing.assert_close(grads[k], e, **TOL, msg=k)
    assert all(grads[f"bn_steps.{n.replace('.', '__')}"].abs().max() > 0 for n in algo.bn_names)


def test_the_training_loop_anneals_derivative_order_msl_and_the_outer_rate():
    """Two iterations of meta_train (SGD, cosine-annealed rate): iteration 0 is first order with
    MSL weights w(0), iteration 1 second order with w(1); each outer step is theta - lr_t * grad."""
    torch.manual_seed(3)
    algo = MAMLPlusPlus(MLP(1, 1, hidden=(5,), activation="tanh"), "regression", inner_lr=0.05, inner_steps=2,
                        msl_iterations=2, first_order_iterations=1)
    _perturb(algo, 4)
    reference = copy.deepcopy(algo)

    class Float64:
        objective, seed = "regression", 2

        def __init__(self):
            self.family = Sinusoid(shots=5, queries=6, seed=2)

        def task(self, split, index):
            return self.family.task(split, index)

        def batch(self, split, indices):
            return self.family.batch(split, indices).to(dtype=torch.float64)

    family = Float64()
    cfg = TrainConfig(iterations=2, meta_batch_size=2, outer_lr=0.3, final_outer_lr=0.1, lr_schedule="cosine",
                      optimizer="sgd", validate_every=2, val_tasks=2)
    meta_train(algo, family, cfg, progress=False)
    for t in range(2):
        rate = 0.1 + 0.2 * (1 + math.cos(math.pi * t / 2)) / 2
        grads = _hand_unroll(reference, family.batch("train", range(2 * t, 2 * t + 2)), F.mse_loss, t, 2, t == 0)
        with torch.no_grad():
            for k, p in reference.named_parameters():
                p.sub_(rate * grads[k])
    for (k, p), q in zip(algo.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, **TOL, msg=k)


def test_evaluate_uses_the_learned_per_step_rates():
    """Beyond inner_steps the last step's rate applies."""
    torch.manual_seed(5)
    algo = MAMLPlusPlus(MLP(1, 1, hidden=(6,), activation="tanh"), "regression", inner_lr=0.1, inner_steps=2)
    _perturb(algo, 6)
    batch = _sinusoid(tasks=2)
    scores = algo.evaluate(batch, steps=4)
    model = algo.model
    for i in range(2):
        fast = {n: p.detach() for n, p in model.named_parameters()}
        for k in range(5):
            pred = functional_call(model, fast, (batch.query_x[i],))
            torch.testing.assert_close(scores["mse"][i, k], F.mse_loss(pred, batch.query_y[i]), **TOL)
            leaves = {n: v.clone().requires_grad_() for n, v in fast.items()}
            support = F.mse_loss(functional_call(model, leaves, (batch.support_x[i],)), batch.support_y[i])
            gs = torch.autograd.grad(support, list(leaves.values()))
            fast = {n: fast[n] - algo.step_lr[n.replace(".", "__")].detach()[min(k, 1)] * g
                    for n, g in zip(leaves, gs, strict=True)}


def test_config():
    from innerloop.training.run import build_algorithm, build_family

    cfg = config_from_dict({"algorithm": {"name": "mamlpp", "inner_steps": 5, "msl_iterations": 100,
                                          "first_order_iterations": 50},
                            "train": {"lr_schedule": "cosine", "final_outer_lr": 1e-5}})
    algo = build_algorithm(cfg, build_family(cfg))
    assert isinstance(algo, MAMLPlusPlus) and (algo.msl_iterations, algo.first_order_iterations) == (100, 50)
    assert algo.step_lr["head__weight"].shape == (5,)
    with pytest.raises(ConfigError, match=r"unknown config key 'algorithm\.lr_mode' for mamlpp"):
        config_from_dict({"algorithm": {"name": "mamlpp", "lr_mode": "per_tensor"}})
    with pytest.raises(ConfigError, match=r"algorithm\.msl_iterations = -1 is invalid"):
        config_from_dict({"algorithm": {"name": "mamlpp", "msl_iterations": -1}})
