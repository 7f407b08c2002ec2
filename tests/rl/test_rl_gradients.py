"""Proofs of the policy-gradient estimators on a Gaussian bandit, where everything is known in closed form.

One step, no state: ``a ~ N(mu, sigma^2)`` with ``sigma = exp(s)``, reward ``r(a) = -(a - c)^2``, so

    J(mu, s) = E[r] = -((mu - c)^2 + sigma^2),
    grad J = (-2 (mu - c), -2 sigma^2),   Hess J = [[-2, 0], [0, -4 sigma^2]].

The inner step of :class:`PolicyMAML` must estimate ``grad J`` without bias, and its derivative
w.r.t. the meta-parameters (what second-order MAML differentiates) has a known expectation: the
exact Hessian with the ``lvc`` estimator, and with the paper's ``vpg`` estimator (samples held
fixed) ``E[Hess log pi * r]``, which misses the ``E[grad log pi grad log pi^T r]`` term:

    [[(d^2 + sigma^2) / sigma^2, 4 d], [4 d, 2 (d^2 + 3 sigma^2)]],   d = mu - c.
"""

from __future__ import annotations

import math

import pytest
import torch

from innerloop.rl.maml import PolicyMAML
from innerloop.rl.policy import GaussianMLP, kl_divergence, log_prob

MU, SIGMA, C, LR = 0.3, 0.5, 1.0, 0.1


def bandit(estimator: str, n: int, seed: int) -> tuple[PolicyMAML, tuple[torch.Tensor, ...]]:
    """A linear-mean policy whose mean is its bias (the observation is 0), and n samples with rewards."""
    algo = PolicyMAML(GaussianMLP(1, 1, hidden=(), init_std=SIGMA), inner_lr=LR, estimator=estimator,
                      normalize_advantages=False)
    with torch.no_grad():
        algo.policy.mean.head.weight.zero_()
        algo.policy.mean.head.bias.fill_(MU)
    g = torch.Generator().manual_seed(seed)
    actions = MU + SIGMA * torch.randn(n, 1, 1, generator=g)
    rewards = -(actions[..., 0] - C) ** 2
    return algo, (torch.zeros(n, 1, 1), actions, rewards, torch.ones(n, 1))


def batches_mean_and_se(values: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.stack(values)
    return v.mean(0), v.std(0) / math.sqrt(len(values))


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("estimator", ["vpg", "lvc"])
def test_inner_gradient_estimates_the_exact_policy_gradient(estimator):
    exact = torch.tensor([-2 * (MU - C), -2 * SIGMA**2])
    estimates = []
    for seed in range(20):
        algo, data = bandit(estimator, 20000, seed)
        grads = torch.func.grad(algo.inner_loss)(algo.params(), *data)
        estimates.append(-torch.cat([grads["mean.head.bias"], grads["log_std"]]))  # minus the loss gradient
    mean, se = batches_mean_and_se(estimates)
    assert torch.all((mean - exact).abs() < 4 * se + 1e-12), (mean, exact, se)
    assert torch.all(se < 0.01)  # the check is sharp: the estimate is within 1% of the scale


def inner_step_jacobian(estimator: str, n: int, seed: int) -> torch.Tensor:
    """d(mu', s') / d(mu, s) of one differentiable inner step on n fixed samples."""
    algo, data = bandit(estimator, n, seed)
    params = {k: v.detach() for k, v in algo.params().items()}

    def step(theta: torch.Tensor) -> torch.Tensor:
        p = {**params, "mean.head.bias": theta[:1], "log_std": theta[1:]}
        out = algo.inner_step(p, *data)
        return torch.cat([out["mean.head.bias"], out["log_std"]])

    return torch.autograd.functional.jacobian(step, torch.tensor([MU, math.log(SIGMA)]))


@pytest.mark.usefixtures("float64")
def test_lvc_inner_step_is_unbiased_for_the_exact_second_order_term():
    """E[d theta' / d theta] = I + lr * Hess J: autograd through the sampled inner step matches the
    derivative of the exact inner step theta + lr * grad J(theta) in expectation."""
    exact = torch.eye(2) + LR * torch.tensor([[-2.0, 0.0], [0.0, -4 * SIGMA**2]])
    mean, se = batches_mean_and_se([inner_step_jacobian("lvc", 20000, seed) for seed in range(20)])
    assert torch.all((mean - exact).abs() < 4 * se + 1e-12), (mean, exact, se)


@pytest.mark.usefixtures("float64")
def test_vpg_inner_step_curvature_is_the_papers_biased_estimate():
    """With log pi * A (the MAML paper's inner loss) and the samples held fixed, the expected
    Jacobian is I + lr * E[Hess log pi * r]: the closed form below, not the exact Hessian."""
    d, s2 = MU - C, SIGMA**2
    biased = torch.eye(2) + LR * torch.tensor([[(d * d + s2) / s2, 4 * d], [4 * d, 2 * (d * d + 3 * s2)]])
    mean, se = batches_mean_and_se([inner_step_jacobian("vpg", 20000, seed) for seed in range(20)])
    assert torch.all((mean - biased).abs() < 4 * se + 1e-12), (mean, biased, se)
    exact = torch.eye(2) + LR * torch.tensor([[-2.0, 0.0], [0.0, -4 * s2]])
    assert (mean - exact).abs().max() > 50 * se.max()  # the bias is real, not noise


@pytest.mark.usefixtures("float64")
def test_log_prob_and_kl_match_torch_distributions():
    g = torch.Generator().manual_seed(0)
    m0, m1, a = (torch.randn(5, 3, generator=g) for _ in range(3))
    s0, s1 = torch.randn(5, 3, generator=g) * 0.3, torch.randn(5, 3, generator=g) * 0.3
    n0 = torch.distributions.Normal(m0, s0.exp())
    n1 = torch.distributions.Normal(m1, s1.exp())
    torch.testing.assert_close(log_prob(m0, s0, a), n0.log_prob(a).sum(-1))
    torch.testing.assert_close(kl_divergence(m0, s0, m1, s1), torch.distributions.kl_divergence(n0, n1).sum(-1))
