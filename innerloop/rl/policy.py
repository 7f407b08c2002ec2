"""Gaussian MLP policies, used as pure functions of their parameters.

``pi(a | s) = N(a; mu_theta(s), diag(exp(log_std)^2))`` with ``mu_theta`` an MLP (the MAML paper:
two hidden layers of 100 ReLU units) and a learned, state-independent ``log_std`` (rllab's
``GaussianMLPPolicy``, initial standard deviation 1).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from innerloop.adapt import Params
from innerloop.models.mlp import MLP

LOG_2PI = math.log(2 * math.pi)


class GaussianMLP(nn.Module):
    """``obs [..., obs_dim] -> (mean [..., act_dim], log_std [..., act_dim])``.

    Args:
        obs_dim: observation size.
        act_dim: action size.
        hidden: hidden widths of the mean network (``()``: a linear mean).
        activation: ``relu``, ``tanh`` or ``gelu``.
        init_std: the initial standard deviation of every action coordinate.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (100, 100), activation: str = "relu",
                 init_std: float = 1.0) -> None:
        super().__init__()
        if init_std <= 0:
            raise ValueError(f"init_std must be > 0, got {init_std}.")
        self.mean = MLP(obs_dim, act_dim, hidden, activation)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        mean = self.mean(obs)
        return mean, self.log_std.expand_as(mean)


def distribution(policy: nn.Module, params: Params, obs: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, log_std)``, each ``[..., act_dim]``, of ``policy`` with ``params`` at ``obs [..., obs_dim]``."""
    return functional_call(policy, params, (obs,))


def log_prob(mean: Tensor, log_std: Tensor, action: Tensor) -> Tensor:
    """``[...]``: log density of ``action [..., act_dim]`` under the diagonal Gaussian."""
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.pow(2) - log_std - 0.5 * LOG_2PI).sum(-1)


def kl_divergence(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """``[...]``: KL(N0 || N1) of two diagonal Gaussians, summed over the action coordinates."""
    var0, var1 = torch.exp(2 * log_std0), torch.exp(2 * log_std1)
    return (log_std1 - log_std0 + (var0 + (mean0 - mean1).pow(2)) / (2 * var1) - 0.5).sum(-1)
