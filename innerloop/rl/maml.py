"""MAML for reinforcement learning (Finn et al. 2017, Sec. 3.2 and 5.3).

For each task ``i`` of a meta-batch, ``rollouts`` episodes are sampled with the meta-policy
``theta``; one (or more) vanilla policy-gradient steps adapt it::

    theta'_i = theta - inner_lr * grad_theta L_i(theta),
    L_i(theta) = - sum_{valid steps} log pi_theta(a_t | s_t) A_t / (number of valid steps),

with advantages ``A_t`` from a linear feature baseline fitted per task (constants: detached).
The inner step is ``torch.func.grad`` of that loss, vmapped over tasks, so ``theta'_i`` is a
differentiable function of ``theta`` (second order unless ``first_order``). Fresh episodes are
then sampled with each ``theta'_i`` and the outer objective is the importance-weighted surrogate
of the adapted policies,

    S(theta) = - mean_i  sum_t  pi_{theta'_i(theta)}(a_t | s_t) / pi_old_i(a_t | s_t) * A_t / steps_i,

minimised by TRPO under ``mean_i KL(pi_old_i || pi_{theta'_i(theta)}) <= max_kl`` (the paper),
or by PPO's clipped surrogate with Adam.

``estimator = "lvc"`` replaces ``log pi`` in the inner loss by ``pi / stop_gradient(pi)`` (the
low-variance curvature estimator of Rothfuss et al. 2019): the same inner gradient, but its
derivative w.r.t. ``theta`` is then an unbiased estimate of the Hessian of the expected return
of a one-step problem; the paper's ``vpg`` drops the ``E[grad log pi grad log pi^T A]`` term
(``tests/rl/test_rl_gradients.py`` proves both on a Gaussian bandit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor, nn

from innerloop.adapt import Params, last, sgd, unroll
from innerloop.execution import vmap_over_tasks
from innerloop.rl.envs import EnvFamily
from innerloop.rl.episodes import Episodes, advantages, policy_distribution, rollout, rollout_noise
from innerloop.rl.policy import distribution, kl_divergence, log_prob
from innerloop.rl.trpo import trpo_step
from innerloop.tasks import Split

Estimator = Literal["vpg", "lvc"]


@dataclass(frozen=True)
class StepData:
    """The detached data of one policy-gradient step, each ``[tasks, rollouts, horizon, ...]``."""

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    mask: Tensor

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.obs, self.actions, self.advantages, self.mask


@dataclass(frozen=True)
class MetaBatch:
    """The episodes of one meta-iteration.

    Attributes:
        adapt: one :class:`StepData` per inner step (sampled with the policy after that many steps).
        valid: the episodes of the adapted policies, scored by the outer objective.
        old_mean, old_log_std: ``[tasks, rollouts, horizon, act_dim]``: the sampling policy on ``valid``.
        returns: ``[tasks, inner_steps + 1]``: mean undiscounted return after 0..inner_steps steps.
        success: ``[tasks, inner_steps + 1]``: the share of episodes that succeeded after
            0..inner_steps steps (:attr:`Episodes.success`); ``None`` for environments without success.
    """

    adapt: list[StepData]
    valid: StepData
    old_mean: Tensor
    old_log_std: Tensor
    returns: Tensor
    success: Tensor | None = None

    def __len__(self) -> int:
        """The number of tasks."""
        return int(self.returns.shape[0])

    def subset(self, tasks: slice) -> MetaBatch:
        """The same meta-batch restricted to some tasks (e.g. to estimate the Fisher matrix on a share)."""
        def cut(d: StepData) -> StepData:
            return StepData(*(t[tasks] for t in d.tensors()))

        return MetaBatch([cut(d) for d in self.adapt], cut(self.valid), self.old_mean[tasks],
                         self.old_log_std[tasks], self.returns[tasks],
                         None if self.success is None else self.success[tasks])


@dataclass(frozen=True)
class Scores:
    """What :meth:`PolicyMAML.evaluate_scores` measured on each task.

    Attributes:
        returns: ``[tasks, steps + 1]``: mean return after 0..steps policy-gradient steps.
        success: ``[tasks, steps + 1]``: the share of those episodes that succeeded
            (:attr:`Episodes.success`), ``None`` for an environment without success.
        episodes: the episodes of each step (with ``keep_episodes``), else empty.
    """

    returns: Tensor
    success: Tensor | None
    episodes: list[Episodes]


def success_rates(rates: Sequence[Tensor | None]) -> Tensor | None:
    """``[tasks, steps]``: each step's share of successful episodes per task (``[tasks]`` each) side by
    side; ``None`` when a step reported no success."""
    if not rates or any(x is None for x in rates):
        return None
    return torch.stack([x for x in rates if x is not None], 1)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over its valid entries (all but the leading dimension when batched)."""
    return (x * mask).sum() / mask.sum().clamp_min(1)


class OuterSettings(Protocol):
    """What :meth:`PolicyMAML.outer_step` reads of the training settings
    (:class:`~innerloop.rl.config.RLTrainConfig` has these fields)."""

    @property
    def max_kl(self) -> float: ...
    @property
    def cg_iterations(self) -> int: ...
    @property
    def cg_damping(self) -> float: ...
    @property
    def backtracks(self) -> int: ...
    @property
    def fisher_subsample(self) -> float: ...
    @property
    def ppo_epochs(self) -> int: ...
    @property
    def ppo_clip(self) -> float: ...


class PolicyMAML(nn.Module):
    """MAML over a Gaussian policy; the policy's parameters are the meta-parameters.

    Args:
        policy: a :class:`~innerloop.rl.policy.GaussianMLP`.
        inner_lr: the inner step size (the paper: 0.1).
        inner_steps: policy-gradient steps per task in meta-training (0: no adaptation, which
            trains the pre-trained baseline: one policy for all tasks).
        first_order: treat the inner gradient as a constant (first-order MAML).
        estimator: ``vpg`` (the paper's ``log pi * A``) or ``lvc`` (``pi / stop_gradient(pi) * A``).
        discount: the discount of the advantages (the paper's code: 0.99).
        gae_lambda: the GAE lambda of the advantages (the paper's code: 1).
        normalize_advantages: standardise the advantages per task.
    """

    def __init__(self, policy: nn.Module, inner_lr: float = 0.1, inner_steps: int = 1, first_order: bool = False,
                 estimator: Estimator = "vpg", discount: float = 0.99, gae_lambda: float = 1.0,
                 normalize_advantages: bool = True) -> None:
        super().__init__()
        if inner_lr <= 0 or inner_steps < 0 or not 0 < discount <= 1 or not 0 <= gae_lambda <= 1:
            raise ValueError(f"need inner_lr > 0 (got {inner_lr}), inner_steps >= 0 (got {inner_steps}), "
                             f"0 < discount <= 1 (got {discount}) and 0 <= gae_lambda <= 1 (got {gae_lambda}).")
        if estimator not in ("vpg", "lvc"):
            raise ValueError(f"estimator must be 'vpg' or 'lvc', got {estimator!r}.")
        self.policy = policy
        self.inner_lr, self.inner_steps, self.first_order = inner_lr, inner_steps, first_order
        self.estimator, self.discount, self.gae_lambda = estimator, discount, gae_lambda
        self.normalize_advantages = normalize_advantages

    @property
    def name(self) -> str:
        """The checkpoint's name of what this trains: ``maml-rl``, or ``pretrain-rl`` without adaptation."""
        return "maml-rl" if self.inner_steps else "pretrain-rl"

    def params(self) -> Params:
        """The meta-parameters, keyed like ``policy.named_parameters()``."""
        return dict(self.policy.named_parameters())

    # -- the inner loop: pure functions of one task's tensors --------------------------------------

    def inner_loss(self, params: Params, obs: Tensor, actions: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
        """The policy-gradient loss of one task: ``obs [R, T, obs_dim]``, ``actions [R, T, act_dim]``,
        ``adv``, ``mask`` ``[R, T]``. Its gradient is the REINFORCE estimate of minus the gradient
        of the expected return (with the baseline in ``adv``)."""
        mean, log_std = distribution(self.policy, params, obs)
        logp = log_prob(mean, log_std, actions)
        weight = torch.exp(logp - logp.detach()) if self.estimator == "lvc" else logp
        return -masked_mean(weight * adv, mask)

    def inner_step(self, params: Params, obs: Tensor, actions: Tensor, adv: Tensor, mask: Tensor) -> Params:
        """``params - inner_lr * grad inner_loss`` for one task (one step of the inner loop's SGD rule);
        differentiable in ``params`` (second order unless ``first_order``)."""
        step = unroll(lambda p, _: self.inner_loss(p, obs, actions, adv, mask), params, steps=1,
                      rule=sgd(float(self.inner_lr)), first_order=self.first_order)
        return last(step, params)

    def step_batch(self, params: Params, data: StepData, per_task: bool) -> Params:
        """One inner step for every task of ``data``: ``[tasks, ...]`` parameters out; ``params``
        are shared (``per_task = False``) or already one set per task."""
        out: Params = vmap_over_tasks(self.inner_step, params, *data.tensors(), params_per_task=per_task)
        return out

    def adapted(self, params: Params, steps: Sequence[StepData]) -> tuple[Params, bool]:
        """``(parameters after len(steps) inner steps, per_task)``: the chain of inner steps on the
        recorded data, a differentiable function of ``params`` (no adaptation: ``params`` shared)."""
        current, per_task = params, False
        for data in steps:
            current, per_task = self.step_batch(current, data, per_task), True
        return current, per_task

    def step_data(self, episodes: Episodes) -> StepData:
        adv = advantages(episodes, self.discount, self.gae_lambda, self.normalize_advantages)
        return StepData(episodes.obs, episodes.actions, adv, episodes.mask)

    # -- sampling and the outer objective ------------------------------------------------------------

    @torch.no_grad()
    def sample(self, family: EnvFamily, split: Split, indices: Sequence[int], rollouts: int,
               steps: int | None = None, tag: str = "") -> MetaBatch:
        """Sample and adapt on tasks ``indices`` of ``split``: ``rollouts`` episodes per task with the
        policy after 0, 1, ..., ``steps`` (default ``inner_steps``) inner steps; the last batch is
        :attr:`MetaBatch.valid`. Deterministic in (family seed, split, indices, ``tag``)."""
        steps = self.inner_steps if steps is None else steps
        tasks = family.tasks(split, indices)
        params = {k: v.detach() for k, v in self.params().items()}
        current, per_task = params, False
        adapt_data: list[StepData] = []
        returns: list[Tensor] = []
        success: list[Tensor | None] = []
        for k in range(steps + 1):
            noise = rollout_noise(family.seed, split, indices, f"{tag}step{k}", rollouts, family.horizon,
                                  family.act_dim)
            episodes = rollout(family, self.policy, current, tasks, noise, per_task)
            returns.append(episodes.returns().mean(1))
            success.append(None if episodes.success is None else episodes.success.mean(1))
            data = self.step_data(episodes)
            if k == steps:
                mean, log_std = policy_distribution(self.policy, current, data.obs, per_task)
                return MetaBatch(adapt_data, data, mean, log_std, torch.stack(returns, 1), success_rates(success))
            adapt_data.append(data)
            current, per_task = self.step_batch(current, data, per_task), True
        raise AssertionError("unreachable")

    def _valid_terms(self, params: Params, batch: MetaBatch) -> tuple[Tensor, Tensor, Tensor]:
        """``(log-ratio, KL, mask)`` each ``[tasks, rollouts, horizon]`` of the adapted policies on ``valid``."""
        adapted, per_task = self.adapted(params, batch.adapt)
        v = batch.valid
        mean, log_std = policy_distribution(self.policy, adapted, v.obs, per_task)
        log_ratio = log_prob(mean, log_std, v.actions) - log_prob(batch.old_mean, batch.old_log_std, v.actions)
        kl = kl_divergence(batch.old_mean, batch.old_log_std, mean, log_std)
        return log_ratio, kl, v.mask

    def surrogate(self, params: Params, batch: MetaBatch) -> tuple[Tensor, Tensor]:
        """``(surrogate loss, mean KL)`` of the outer TRPO step, each a scalar (means over tasks of
        per-task means over valid steps)."""
        log_ratio, kl, mask = self._valid_terms(params, batch)
        steps = mask.sum((1, 2)).clamp_min(1)
        loss = -((torch.exp(log_ratio) * batch.valid.advantages * mask).sum((1, 2)) / steps).mean()
        return loss, ((kl * mask).sum((1, 2)) / steps).mean()

    def clipped_surrogate(self, params: Params, batch: MetaBatch, clip: float) -> tuple[Tensor, Tensor]:
        """``(PPO's clipped surrogate loss, mean KL)`` on ``valid`` (Schulman et al. 2017)."""
        log_ratio, kl, mask = self._valid_terms(params, batch)
        ratio, adv = torch.exp(log_ratio), batch.valid.advantages
        objective = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
        steps = mask.sum((1, 2)).clamp_min(1)
        return -((objective * mask).sum((1, 2)) / steps).mean(), ((kl * mask).sum((1, 2)) / steps).mean()

    def outer_step(self, batch: MetaBatch, optimizer: torch.optim.Optimizer | None,
                   settings: OuterSettings) -> dict[str, float]:
        """One outer update of the meta-parameters on ``batch`` (from :meth:`sample`), in place.

        TRPO when ``optimizer`` is None (the paper): one trust-region step on :meth:`surrogate`,
        a closure over ``batch`` that TRPO calls at candidate parameters, with Fisher-vector products
        from the KL of the first ``fisher_subsample`` share of the tasks. Otherwise PPO:
        ``ppo_epochs`` steps of ``optimizer`` on :meth:`clipped_surrogate`.

        Returns:
            TRPO: ``surrogate_before``, ``surrogate_after``, ``kl``, ``step_fraction``; PPO:
            ``surrogate_after`` (of the last epoch, before its step) and ``kl``.
        """
        params = self.params()
        if optimizer is None:
            fisher_tasks = max(1, round(len(batch) * settings.fisher_subsample))
            sub = batch.subset(slice(0, fisher_tasks)) if fisher_tasks < len(batch) else None
            stats = trpo_step(
                params, lambda p: self.surrogate(p, batch), settings.max_kl, settings.cg_iterations,
                settings.cg_damping, settings.backtracks,
                fisher_kl=None if sub is None else (lambda p: self.surrogate(p, sub)[1]),
            )
            return {"surrogate_before": stats.loss_before, "surrogate_after": stats.loss_after,
                    "kl": stats.kl, "step_fraction": stats.step_fraction}
        if settings.ppo_epochs < 1:
            raise ValueError(f"PPO needs ppo_epochs >= 1, got {settings.ppo_epochs}.")
        for _ in range(settings.ppo_epochs):
            loss, kl = self.clipped_surrogate(params, batch, settings.ppo_clip)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return {"surrogate_after": float(loss.detach()), "kl": float(kl.detach())}

    # -- meta-testing -------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, family: EnvFamily, split: Split, indices: Sequence[int], steps: int, rollouts: int,
                 lr: float | Sequence[float] | None = None, keep_episodes: bool = False,
                 batch_steps: int | None = None) -> tuple[Tensor, list[Episodes]]:
        """Returns after 0..``steps`` policy-gradient steps on each task (:meth:`evaluate_scores`
        without the success rates).

        Returns:
            ``(returns [tasks, steps + 1], episodes)`` with the episodes of each step when
            ``keep_episodes`` (for plots), else an empty list.
        """
        scores = self.evaluate_scores(family, split, indices, steps, rollouts, lr, keep_episodes, batch_steps)
        return scores.returns, scores.episodes

    @torch.no_grad()
    def evaluate_scores(self, family: EnvFamily, split: Split, indices: Sequence[int], steps: int, rollouts: int,
                        lr: float | Sequence[float] | None = None, keep_episodes: bool = False,
                        batch_steps: int | None = None) -> Scores:
        """Returns and success rates after 0..``steps`` policy-gradient steps on each task.

        At step ``k`` the policy adapted ``k`` times samples ``rollouts`` episodes; their mean
        return (and share of successful episodes, where the environment reports success) is the
        score after ``k`` steps and they drive step ``k + 1``. With ``batch_steps``, a step's batch
        is instead the first of those episodes that hold ``batch_steps`` environment steps
        (:meth:`Episodes.first_steps`; ``rollouts`` is then the most episodes a batch may have), as
        the MAML paper's test script samples (4,000 steps per policy-gradient step): the score is
        the mean over the batch's episodes, and only they drive the next step. ``lr``: the step size
        (``None``: ``inner_lr``), or one per step, the last repeated (``[0.5, 0.25]``: the first step
        0.5, every later one 0.25).

        Returns:
            :class:`Scores`: ``returns`` and ``success`` ``[tasks, steps + 1]``, and the episodes of
            each step when ``keep_episodes`` (for plots; with ``batch_steps``, the episodes outside
            the batch are masked out).
        """
        saved = self.inner_lr
        rates = [saved] if lr is None else ([lr] if isinstance(lr, (int, float)) else list(lr))
        if not rates or not all(math.isfinite(r) and r > 0 for r in rates):  # NaN and inf fail too
            raise ValueError(f"the adaptation's step sizes must be finite and > 0, got {lr!r}: give one step "
                             "size, or one per step (the last repeated).")
        try:
            tasks = family.tasks(split, indices)
            current = {k: v.detach() for k, v in self.params().items()}
            per_task, scores, kept, success = False, [], [], []
            for k in range(steps + 1):
                self.inner_lr = float(rates[min(k, len(rates) - 1)])
                noise = rollout_noise(family.seed, split, indices, f"eval{k}", rollouts, family.horizon,
                                      family.act_dim)
                episodes = rollout(family, self.policy, current, tasks, noise, per_task)
                if batch_steps is None:
                    scores.append(episodes.returns().mean(1))
                    success.append(None if episodes.success is None else episodes.success.mean(1))
                else:
                    episodes, in_batch = episodes.first_steps(batch_steps)
                    count = in_batch.sum(1)
                    scores.append(episodes.returns().sum(1) / count)
                    success.append(None if episodes.success is None else episodes.success.sum(1) / count)
                if keep_episodes:
                    kept.append(episodes)
                if k < steps:
                    current, per_task = self.step_batch(current, self.step_data(episodes), per_task), True
            return Scores(torch.stack(scores, 1), success_rates(success), kept)
        finally:
            self.inner_lr = saved
