"""TRPO: Fisher-vector products through the adaptation, the KL bound and the line search."""

from __future__ import annotations

import pytest
import torch

from innerloop.numerics import flatten, unflatten
from innerloop.rl.envs import Navigation2D
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP
from innerloop.rl.trpo import fisher_vector_product, trpo_step


def small_problem(inner_steps: int = 1, first_order: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    family = Navigation2D(seed=seed, horizon=15)
    algo = PolicyMAML(GaussianMLP(2, 2, (8,)), inner_lr=0.1, inner_steps=inner_steps, first_order=first_order)
    batch = algo.sample(family, "train", range(4), rollouts=5)
    return algo, batch


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("first_order", [False, True])
def test_fisher_vector_product_is_the_hessian_of_the_kl_through_adaptation(first_order):
    algo, batch = small_problem(first_order=first_order)
    params = algo.params()
    names = list(params)

    def kl_of(vector: torch.Tensor) -> torch.Tensor:
        return algo.surrogate(unflatten(vector, params), batch)[1]

    theta = flatten([p.detach() for p in params.values()])
    hessian = torch.autograd.functional.hessian(kl_of, theta)
    _, kl = algo.surrogate(params, batch)
    assert abs(float(kl.detach())) < 1e-12  # at the sampling policy the KL is 0 ...
    fvp = fisher_vector_product(kl, [params[n] for n in names], damping=0.0)
    v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(fvp(v), hessian @ v, rtol=1e-8, atol=1e-10)
    assert torch.linalg.eigvalsh(hessian).min() > -1e-9  # ... and its Hessian, the Fisher matrix, is PSD


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("max_kl", [0.01, 1e-4])
def test_trpo_step_respects_the_kl_bound_and_improves_the_surrogate(max_kl):
    algo, batch = small_problem()
    before = {k: v.detach().clone() for k, v in algo.params().items()}
    loss0, _ = algo.surrogate(before, batch)
    stats = trpo_step(algo.params(), lambda p: algo.surrogate(p, batch), max_kl=max_kl)
    after = {k: v.detach() for k, v in algo.params().items()}
    loss1, kl1 = algo.surrogate(after, batch)  # measured afresh, not taken from the step's report
    assert stats.step_fraction > 0
    assert float(kl1) <= max_kl
    assert float(kl1) > 0.01 * max_kl  # the step uses the trust region rather than a vanishing step
    assert float(loss1) < float(loss0)
    assert stats.loss_after == pytest.approx(float(loss1), rel=1e-9, abs=1e-12)


@pytest.mark.usefixtures("float64")
def test_trpo_step_with_a_subsampled_fisher_still_checks_the_full_kl():
    algo, batch = small_problem()
    sub = batch.subset(slice(0, 1))
    trpo_step(algo.params(), lambda p: algo.surrogate(p, batch), max_kl=0.01,
              fisher_kl=lambda p: algo.surrogate(p, sub)[1])
    _, kl = algo.surrogate({k: v.detach() for k, v in algo.params().items()}, batch)
    assert float(kl) <= 0.01


@pytest.mark.usefixtures("float64")
def test_trpo_rejects_every_step_that_does_not_improve_and_keeps_the_parameters():
    algo, batch = small_problem()
    before = {k: v.detach().clone() for k, v in algo.params().items()}

    def kl_as_loss(p):  # minimal at the current parameters: no step can improve it
        kl = algo.surrogate(p, batch)[1]
        return kl + 1e-3 * sum((x - before[n]).pow(2).sum() for n, x in p.items()), kl

    stats = trpo_step(algo.params(), kl_as_loss, max_kl=0.01, backtracks=5)
    assert stats.step_fraction == 0.0
    for k, v in algo.params().items():
        assert torch.equal(v.detach(), before[k])


def test_trpo_names_bad_settings():
    algo, batch = small_problem()
    with pytest.raises(ValueError, match="max_kl > 0"):
        trpo_step(algo.params(), lambda p: algo.surrogate(p, batch), max_kl=0.0)


def test_ppo_clipped_surrogate_equals_the_trpo_surrogate_at_the_sampling_policy():
    algo, batch = small_problem()
    params = {k: v.detach() for k, v in algo.params().items()}
    trpo_loss, kl = algo.surrogate(params, batch)
    ppo_loss, _ = algo.clipped_surrogate(params, batch, clip=0.2)
    torch.testing.assert_close(ppo_loss, trpo_loss)
    assert float(kl) == pytest.approx(0.0, abs=1e-6)
