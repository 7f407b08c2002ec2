"""Rollouts of many tasks at once, returns, the linear feature baseline and advantages.

A batch of episodes is stored task-major as ``[tasks, rollouts, horizon, ...]`` with a ``mask``
that is 1 for the steps actually taken (an episode that terminates early is padded with zeros).
All randomness of a rollout (the policy's action noise and the environments' reset seeds) comes
from one generator per task, seeded with :func:`~innerloop.tasks.task_seed`, so the episodes of
task ``i`` are the same whether it is sampled alone or in a meta-batch, and a resumed run samples
exactly what the uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from innerloop.adapt import Params
from innerloop.execution import vmap_over_tasks
from innerloop.rl.envs import EnvFamily
from innerloop.rl.policy import distribution
from innerloop.tasks import Split, task_seed


@dataclass(frozen=True)
class Episodes:
    """Trajectories of ``tasks x rollouts`` episodes.

    Attributes:
        obs: ``[tasks, rollouts, horizon, obs_dim]``: the observation each action was taken in.
        actions: ``[tasks, rollouts, horizon, act_dim]``: the sampled (unclipped) actions.
        rewards: ``[tasks, rollouts, horizon]`` (0 after an episode ended).
        mask: ``[tasks, rollouts, horizon]``: 1.0 where a step was taken, else 0.0.
        success: ``[tasks, rollouts]``: 1.0 for an episode in which any step taken succeeded
            (``info["success"]`` of the environment, e.g. Meta-World's), else 0.0; ``None`` for an
            environment that reports no success.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    mask: Tensor
    success: Tensor | None = None

    def returns(self) -> Tensor:
        """``[tasks, rollouts]``: undiscounted return of each episode."""
        return (self.rewards * self.mask).sum(-1)

    def first_steps(self, batch_steps: int) -> tuple[Episodes, Tensor]:
        """The first episodes of each task that together hold at least ``batch_steps`` steps (all of
        them when they hold fewer), as rllab's batch sampler collects a batch of ``batch_steps``
        samples: ``(episodes with the others masked out, kept [tasks, rollouts])`` with ``kept``
        1.0 for a kept episode. An episode that ends early leaves room for more, so a policy that
        reaches its goal fast gets more (and shorter) episodes in its batch."""
        if batch_steps < 1:
            raise ValueError(f"batch_steps must be >= 1, got {batch_steps}.")
        lengths = self.mask.sum(-1)
        before = torch.cumsum(lengths, dim=1) - lengths
        kept = (before < batch_steps).to(self.mask.dtype)
        mask = self.mask * kept[..., None]
        success = None if self.success is None else self.success * kept
        return Episodes(self.obs, self.actions, self.rewards * mask, mask, success), kept

    def task(self, i: int) -> Episodes:
        """The episodes of task ``i`` alone, keeping a leading task dimension of 1."""
        s = slice(i, i + 1)
        return Episodes(self.obs[s], self.actions[s], self.rewards[s], self.mask[s],
                        None if self.success is None else self.success[s])


@dataclass(frozen=True)
class Noise:
    """The randomness of one rollout: ``actions [tasks, rollouts, horizon, act_dim]`` standard
    normal draws and ``reset_seeds [tasks, rollouts]``."""

    actions: Tensor
    reset_seeds: Tensor


def rollout_noise(seed: int, split: Split, indices: Sequence[int], tag: str, rollouts: int, horizon: int,
                  act_dim: int) -> Noise:
    """The randomness of rolling out tasks ``indices`` of ``split``; ``tag`` names the phase (e.g.
    ``"adapt0"``, ``"valid"``) so that different phases draw independent noise. Drawn on the CPU (the
    same numbers whatever the device; :func:`rollout` moves the action noise to the policy)."""
    acts, seeds = [], []
    for i in indices:
        g = torch.Generator().manual_seed(task_seed(seed, split, int(i), f"rollout/{tag}"))
        seeds.append(torch.randint(0, 2**31 - 1, (rollouts,), generator=g, device="cpu"))
        acts.append(torch.randn(rollouts, horizon, act_dim, generator=g, device="cpu"))
    return Noise(torch.stack(acts), torch.stack(seeds))


def policy_distribution(policy: nn.Module, params: Params, obs: Tensor, per_task: bool) -> tuple[Tensor, Tensor]:
    """``(mean, log_std)`` at ``obs [tasks, ..., obs_dim]``; with ``per_task`` the parameters carry a
    leading ``tasks`` dimension (one adapted policy per task) and the call is vmapped over it."""
    if per_task:
        out: tuple[Tensor, Tensor] = vmap_over_tasks(lambda p, o: distribution(policy, p, o), params, obs,
                                                     params_per_task=True)
        return out
    return distribution(policy, params, obs)


@torch.no_grad()
def rollout(family: EnvFamily, policy: nn.Module, params: Params, tasks: Tensor, noise: Noise,
            per_task: bool = False) -> Episodes:
    """Roll out ``rollouts`` episodes of each task with the Gaussian policy.

    Args:
        family: builds the environments.
        policy: a :class:`~innerloop.rl.policy.GaussianMLP` (called functionally).
        params: its parameters, shared by all tasks, or ``[tasks, ...]`` each with ``per_task``.
        tasks: ``[tasks, task_dim]``.
        noise: from :func:`rollout_noise`; its shape fixes rollouts and horizon.
        per_task: whether ``params`` holds one policy per task.

    Returns:
        :class:`Episodes` of shape ``[tasks, rollouts, horizon, ...]``, on the policy's device (the
        environments step where ``tasks`` are, the CPU: observations and actions cross each step);
        with ``success`` when the environment's ``info`` holds ``"success" [n]`` at every step.
    """
    B, R, T, _ = noise.actions.shape
    if tasks.shape[0] != B:
        raise ValueError(f"{tasks.shape[0]} tasks but noise for {B}.")
    device = next(iter(params.values())).device
    host = tasks.device
    env = family.make(tasks.repeat_interleave(R, dim=0))
    obs, _ = env.reset(seed=noise.reset_seeds.reshape(-1).tolist())
    action_noise = noise.actions.to(device)
    alive = torch.ones(B * R, device=device)
    all_obs, all_act, all_rew, all_mask = [], [], [], []
    succeeded: Tensor | None = torch.zeros(B * R, device=device)
    for t in range(T):
        o = obs.reshape(B, R, -1).to(device)
        mean, log_std = policy_distribution(policy, params, o, per_task)
        action = mean + torch.exp(log_std) * action_noise[:, :, t]
        obs, reward, terminated, _, info = env.step(action.reshape(B * R, -1).to(host))
        reward, terminated = reward.to(device), terminated.to(device)
        if succeeded is not None:  # any step taken (alive) that succeeded; None once a step reports none
            success = info.get("success")
            succeeded = (None if success is None else
                         torch.maximum(succeeded, (success.to(device) > 0).to(alive.dtype) * alive))
        all_obs.append(o)
        all_act.append(action)
        all_rew.append((reward * alive).reshape(B, R))
        all_mask.append(alive.reshape(B, R))
        alive = alive * (~terminated).to(alive.dtype)
    return Episodes(torch.stack(all_obs, 2), torch.stack(all_act, 2), torch.stack(all_rew, 2),
                    torch.stack(all_mask, 2), None if succeeded is None or T == 0 else succeeded.reshape(B, R))


def discounted_returns(rewards: Tensor, mask: Tensor, discount: float) -> Tensor:
    """``[..., horizon]``: ``G_t = sum_k discount^k r_{t+k}`` within each episode."""
    out = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = (rewards[..., t] + discount * running) * mask[..., t]
        out[..., t] = running
    return out


def baseline_features(obs: Tensor) -> Tensor:
    """``[tasks, rollouts, horizon, 2 obs_dim + 4]``: rllab's ``LinearFeatureBaseline`` features
    ``[o, o^2, t/100, (t/100)^2, (t/100)^3, 1]`` with ``o`` the observation clipped to [-10, 10]."""
    o = obs.clamp(-10, 10)
    t = torch.arange(obs.shape[-2], dtype=obs.dtype, device=obs.device) / 100.0
    t = t.view(*(1,) * (obs.dim() - 2), -1, 1).expand(*obs.shape[:-1], 1)
    return torch.cat([o, o * o, t, t * t, t * t * t, torch.ones_like(t)], dim=-1)


def fit_linear_baseline(obs: Tensor, returns: Tensor, mask: Tensor, reg: float = 1e-5) -> Tensor:
    """Fit a linear value function per task by ridge regression and return its values.

    ``beta_i = argmin sum_{valid steps} (x^T beta - G)^2 + reg |beta|^2`` on the features of
    :func:`baseline_features`, solved in float64 per task (the regulariser grows tenfold, up to
    five times, if the solve is not finite, as in rllab).

    Args:
        obs: ``[tasks, rollouts, horizon, obs_dim]``.
        returns: ``[tasks, rollouts, horizon]`` discounted returns (the regression targets).
        mask: ``[tasks, rollouts, horizon]``.

    Returns:
        ``[tasks, rollouts, horizon]`` fitted values (0 on padded steps).
    """
    X = baseline_features(obs).double().flatten(1, 2)  # [tasks, R*T, F]
    w = mask.double().flatten(1, 2).unsqueeze(-1)
    y = returns.double().flatten(1, 2).unsqueeze(-1)
    XtX, Xty = X.transpose(1, 2) @ (w * X), X.transpose(1, 2) @ (w * y)
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    for _ in range(5):
        beta = torch.linalg.solve(XtX + reg * eye, Xty)
        if torch.isfinite(beta).all():
            break
        reg *= 10
    return ((X @ beta).squeeze(-1) * w.squeeze(-1)).reshape(returns.shape).to(returns.dtype)


def advantages(episodes: Episodes, discount: float, gae_lambda: float = 1.0, normalize: bool = True) -> Tensor:
    """``[tasks, rollouts, horizon]`` advantages with the linear feature baseline fitted per task.

    Generalised advantage estimation ``A_t = sum_k (discount * lambda)^k delta_{t+k}``,
    ``delta_t = r_t + discount * V_{t+1} - V_t`` with ``V`` the baseline (0 after the last step,
    as in rllab); ``lambda = 1`` gives ``G_t - V_t``. With ``normalize`` they are standardised per task
    over the valid steps. Detached: the inner and outer losses treat them as constants.
    """
    r, m = episodes.rewards.detach(), episodes.mask
    values = fit_linear_baseline(episodes.obs, discounted_returns(r, m, discount), m)
    next_values = torch.cat([values[..., 1:], torch.zeros_like(values[..., :1])], dim=-1)
    deltas = (r + discount * next_values - values) * m
    adv = discounted_returns(deltas, m, discount * gae_lambda)
    if normalize:
        n = m.sum((1, 2), keepdim=True).clamp_min(1)
        mean = (adv * m).sum((1, 2), keepdim=True) / n
        var = ((adv - mean).pow(2) * m).sum((1, 2), keepdim=True) / n
        adv = (adv - mean) / (var.sqrt() + 1e-8) * m
    return adv
