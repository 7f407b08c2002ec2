"""Typed configuration of a meta-RL run (``innerloop rl train --config FILE``).

Sections ``env``, ``policy``, ``algorithm``, ``train``, ``eval`` and ``execution`` (the device); a
file sets only what it changes, and the defaults are the MAML paper's 2D navigation set-up.
Validated before any work starts, with the same rules and messages as :mod:`innerloop.training.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from innerloop.execution import check_device_name
from innerloop.models.mlp import ACTIVATIONS
from innerloop.training.config import (
    MAX_TASKS,
    ConfigError,
    MemoryEstimate,
    apply_overrides,
    check_types,
    from_dict,
    read_config_file,
    refuse_what_cannot_fit,
    training_bytes,
)
from innerloop.training.loggers import LOGGER_NAMES

ENV_SIZES: dict[str, tuple[int, int, int]] = {
    "nav2d": (2, 2, 100), "cheetah-vel": (17, 6, 200), "cheetah-dir": (17, 6, 200),
    "metaworld-ml1": (39, 4, 500), "metaworld-ml10": (39, 4, 500),
}
"""``(observation size, action size, default horizon)`` of each ``env.name`` (for the memory estimates)."""


@dataclass(frozen=True)
class EnvConfig:
    """The task family of MDPs."""

    name: Literal["nav2d", "cheetah-vel", "cheetah-dir", "metaworld-ml1", "metaworld-ml10"] = "nav2d"
    """``nav2d`` (2D point navigation, torch), ``cheetah-vel`` (HalfCheetah goal velocity),
    ``cheetah-dir`` (forward/backward), ``metaworld-ml1`` (one Meta-World skill, held-out goal positions;
    option ``env_name``) or ``metaworld-ml10`` (Meta-World's 10 train and 5 held-out skills); the
    HalfCheetah families need ``pip install 'innerloop[rl]'``, the Meta-World ones
    ``pip install 'innerloop[metaworld]'``."""
    horizon: int | None = None
    """Steps per episode (``None``: the paper's, 100 for nav2d and 200 for HalfCheetah; Meta-World's 500,
    which is also the most a Meta-World episode can have)."""
    seed: int = 0
    """Family seed: fixes every task of every split, and the rollout noise."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments of the family (nav2d: ``goal_low``, ``goal_high``, ``action_bound``,
    ``goal_radius``, ``action_scale``, ``termination``; cheetah-vel: ``low``, ``high``; metaworld-ml1:
    ``env_name``, e.g. ``"reach-v3"``, ``"push-v3"``, ``"pick-place-v3"``)."""


@dataclass(frozen=True)
class PolicyConfig:
    """The Gaussian MLP policy."""

    hidden: list[int] = field(default_factory=lambda: [100, 100])
    activation: str = "relu"
    init_std: float = 1.0


@dataclass(frozen=True)
class RLAlgorithmConfig:
    """The inner loop (vanilla policy gradient with a linear feature baseline per task)."""

    inner_lr: float = 0.1
    inner_steps: int = 1
    """Policy-gradient steps per task in meta-training."""
    rollouts: int = 20
    """Episodes per task per step (the paper: 20)."""
    first_order: bool = False
    estimator: Literal["vpg", "lvc"] = "vpg"
    """``vpg``: the paper's ``log pi * A``; ``lvc``: ``pi / stop_grad(pi) * A`` (unbiased curvature)."""
    discount: float = 0.99
    gae_lambda: float = 1.0
    normalize_advantages: bool = True


@dataclass(frozen=True)
class RLTrainConfig:
    """The outer loop."""

    iterations: int = 500
    meta_batch_size: int = 20
    """Tasks per meta-iteration (the paper: 20 for nav2d, 40 for HalfCheetah)."""
    optimizer: Literal["trpo", "ppo"] = "trpo"
    max_kl: float = 0.01
    """TRPO's trust region on the mean KL."""
    cg_iterations: int = 10
    cg_damping: float = 1e-5
    backtracks: int = 15
    fisher_subsample: float = 1.0
    """Share of the meta-batch's tasks whose KL gives the Fisher-vector products (1: all)."""
    ppo_epochs: int = 5
    ppo_clip: float = 0.2
    ppo_lr: float = 3e-4
    seed: int = 0
    """Seed of the policy's initialisation."""
    checkpoint_every: int = 10
    """Write ``last.pt`` every this many iterations (and at the end)."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl"])
    """Where the metrics go: any of ``jsonl`` (``metrics.jsonl``), ``csv``, ``tensorboard``, ``wandb``;
    ``[]``: none. Not part of a checkpoint's identity."""


@dataclass(frozen=True)
class RLEvalConfig:
    """Meta-testing: returns after 0..steps policy-gradient steps on fixed test tasks, 95% CIs."""

    test_tasks: int = 40
    steps: int = 3
    rollouts: int = 20
    inner_lr: float | None = None
    """Step size of test-time adaptation (``None``: ``algorithm.inner_lr``)."""
    later_lr: float | None = None
    """Step size of the test-time steps after the first (``None``: the first's). The MAML paper's
    test script for 2D navigation took its first step at the training step size, 0.5, and the
    later ones at half of it."""
    batch_steps: int | None = None
    """``None``: each test-time step samples ``rollouts`` episodes. N: each step's batch is the first
    episodes that hold N environment steps, at most ``rollouts`` of them, and the score is the mean
    return over the batch's episodes -- the MAML paper's test script (rllab's ``VPG`` with
    ``batch_size = 4000``, 2D navigation), where a policy that reaches its goal fast has more, shorter
    episodes in its batch."""
    pretrain: bool = True
    """Also train and test the pre-trained baseline (one policy trained on all tasks, no adaptation)."""
    pretrain_iterations: int | None = None
    """Iterations of the baseline (``None``: as many as meta-training)."""
    random_init: bool = True
    """Also test the untrained policy (random initialisation), adapted the same way."""
    plot_tasks: int = 4
    """nav2d: tasks in the trajectory plot."""
    curve_every: int | None = None
    """Log the test return after 0..``steps`` steps on the first ``curve_tasks`` test tasks every this
    many training iterations (from iteration 0; ``test_return_k`` in the metrics, drawn in
    ``curve.png``); ``None``: no learning curve. Its rollouts take their own fixed noise, so the
    training itself does not change."""
    curve_tasks: int = 10
    """Test tasks of the learning curve (the first ones of the test split)."""


@dataclass(frozen=True)
class RLExecutionConfig:
    """Where the policy computes (the environments step on the CPU; observations and actions cross)."""

    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``: the policy, the
    episodes' tensors, the inner steps and the outer (TRPO / PPO) step live there. Checked to exist when
    the run starts. Meta-RL runs in float32."""
    workers: int = 0
    """Processes that step the environments (:class:`~innerloop.rl.workers.ParallelFamily`): ``0``: in
    the main process; ``N >= 1``: the copies of each rollout split into ``N`` chunks, each stepped in a
    worker process (started once per run, stopped when it ends). The episodes, and so every result
    and checkpoint, do not depend on it (not part of a checkpoint's identity: a run resumes with
    another value); only the speed does (``benchmarks/results/rl_sampler.md``)."""

    def __post_init__(self) -> None:
        check_device_name(self.device)
        if isinstance(self.workers, int) and not isinstance(self.workers, bool) and self.workers < 0:
            raise ConfigError(f"execution.workers = {self.workers!r} is invalid: must be >= 0 (0: step the "
                              "environments in the main process; N: in N worker processes).")


@dataclass(frozen=True)
class RLConfig:
    """A whole meta-RL run."""

    env: EnvConfig = field(default_factory=EnvConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    algorithm: RLAlgorithmConfig = field(default_factory=RLAlgorithmConfig)
    train: RLTrainConfig = field(default_factory=RLTrainConfig)
    eval: RLEvalConfig = field(default_factory=RLEvalConfig)
    execution: RLExecutionConfig = field(default_factory=RLExecutionConfig)
    out_dir: str = "runs/rl-nav2d"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def __post_init__(self) -> None:
        self._check()

    def validate(self) -> RLConfig:
        """The config itself: checked when built and frozen after (valid by construction)."""
        return self

    def override(self, changes: Mapping[str, Any]) -> RLConfig:
        """A new config with the dotted keys of ``changes`` set (``"train.iterations"``), checked."""
        return rl_config_from_dict(apply_overrides(self.to_dict(), changes))

    def _check(self) -> None:
        """Types (for a config built in Python) and the ranges that types alone cannot express;
        raises :class:`ConfigError`."""
        for section in ("env", "policy", "algorithm", "train", "eval", "execution"):
            check_types(getattr(self, section), section)

        def need(ok: bool, key: str, value: Any, rule: str) -> None:
            if not ok:
                raise ConfigError(f"{key} = {value!r} is invalid: {rule}.")

        e, p, a, t, v = self.env, self.policy, self.algorithm, self.train, self.eval
        need(e.horizon is None or e.horizon >= 1, "env.horizon", e.horizon, "must be >= 1 or null")
        need(all(h >= 1 for h in p.hidden), "policy.hidden", p.hidden, "widths must be >= 1")
        need(p.activation in ACTIVATIONS, "policy.activation", p.activation, f"choose one of {list(ACTIVATIONS)}")
        need(p.init_std > 0, "policy.init_std", p.init_std, "must be > 0")
        need(a.inner_lr > 0, "algorithm.inner_lr", a.inner_lr, "must be > 0")
        need(a.inner_steps >= 1, "algorithm.inner_steps", a.inner_steps,
             "must be >= 1 (the pre-trained baseline, 0 steps, is eval.pretrain)")
        need(a.rollouts >= 2, "algorithm.rollouts", a.rollouts, "must be >= 2 (the baseline needs several)")
        need(0 < a.discount <= 1, "algorithm.discount", a.discount, "must lie in (0, 1]")
        need(0 <= a.gae_lambda <= 1, "algorithm.gae_lambda", a.gae_lambda, "must lie in [0, 1]")
        need(t.iterations >= 1, "train.iterations", t.iterations, "must be >= 1")
        need(t.meta_batch_size >= 1, "train.meta_batch_size", t.meta_batch_size, "must be >= 1")
        need(t.max_kl > 0, "train.max_kl", t.max_kl, "must be > 0 (the paper: 0.01)")
        need(t.cg_iterations >= 1, "train.cg_iterations", t.cg_iterations, "must be >= 1")
        need(t.cg_damping >= 0, "train.cg_damping", t.cg_damping, "must be >= 0")
        need(t.backtracks >= 1, "train.backtracks", t.backtracks, "must be >= 1")
        need(0 < t.fisher_subsample <= 1, "train.fisher_subsample", t.fisher_subsample, "must lie in (0, 1]")
        need(t.ppo_epochs >= 1, "train.ppo_epochs", t.ppo_epochs, "must be >= 1")
        need(0 < t.ppo_clip < 1, "train.ppo_clip", t.ppo_clip, "must lie in (0, 1)")
        need(t.ppo_lr > 0, "train.ppo_lr", t.ppo_lr, "must be > 0")
        need(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every, "must be >= 1")
        need(all(n in LOGGER_NAMES for n in t.loggers), "train.loggers", t.loggers,
             f"choose among {list(LOGGER_NAMES)}")
        need(len(set(t.loggers)) == len(t.loggers), "train.loggers", t.loggers, "name each logger once")
        need(v.test_tasks >= 2, "eval.test_tasks", v.test_tasks, "must be >= 2 (a CI needs several tasks)")
        need(v.steps >= 0, "eval.steps", v.steps, "must be >= 0")
        need(v.rollouts >= 2, "eval.rollouts", v.rollouts, "must be >= 2")
        need(v.inner_lr is None or v.inner_lr > 0, "eval.inner_lr", v.inner_lr, "must be > 0 or null")
        need(v.later_lr is None or v.later_lr > 0, "eval.later_lr", v.later_lr, "must be > 0 or null")
        need(v.batch_steps is None or v.batch_steps >= 1, "eval.batch_steps", v.batch_steps,
             "must be >= 1 or null")
        need(v.pretrain_iterations is None or v.pretrain_iterations >= 1, "eval.pretrain_iterations",
             v.pretrain_iterations, "must be >= 1 or null")
        need(v.plot_tasks >= 0, "eval.plot_tasks", v.plot_tasks, "must be >= 0")
        need(v.curve_every is None or v.curve_every >= 1, "eval.curve_every", v.curve_every,
             "must be >= 1 or null")
        need(v.curve_tasks >= 2, "eval.curve_tasks", v.curve_tasks, "must be >= 2 (a CI needs several tasks)")
        need(v.test_tasks <= MAX_TASKS, "eval.test_tasks", v.test_tasks,
             f"at most {MAX_TASKS:,} tasks are evaluated")
        refuse_what_cannot_fit(self.memory_estimates())

    def memory_estimates(self) -> list[MemoryEstimate]:
        """Lower bounds on the bytes of the episodes one meta-batch (and one evaluation) keeps, and of
        the policy's parameters with their gradient: ``(key, value, bytes, what)``. An episode step holds
        an observation, an action, a reward, a mask and an advantage in float32 (26 numbers for
        HalfCheetah, 46 for Meta-World's 39-dimensional observations; :data:`ENV_SIZES`)."""
        e, p, a, t, v = self.env, self.policy, self.algorithm, self.train, self.eval
        obs_dim, act_dim, default_horizon = ENV_SIZES[e.name]
        horizon = e.horizon or default_horizon
        step = 4 * (obs_dim + act_dim + 3)
        params = training_bytes([obs_dim, *p.hidden, act_dim])
        return [
            ("train.meta_batch_size", t.meta_batch_size,
             t.meta_batch_size * a.rollouts * horizon * step * (a.inner_steps + 1), "episodes for one meta-batch"),
            ("eval.test_tasks", v.test_tasks, v.test_tasks * v.rollouts * horizon * step * (v.steps + 1),
             "episodes for the evaluation"),
            ("policy.hidden", p.hidden, params, "parameters, gradient and optimiser state"),
        ]


def rl_config_from_dict(data: dict[str, Any]) -> RLConfig:
    """Build and validate an :class:`RLConfig`; unknown keys and wrong types raise ConfigError."""
    cfg: RLConfig = from_dict(RLConfig, data)
    return cfg


def load_rl_config(path: str | Path) -> RLConfig:
    """Read a ``.toml`` or ``.json`` RL config; everything it omits keeps its default."""
    data = read_config_file(path)
    if "task" in data or "model" in data:
        raise ConfigError(f"{str(path)!r} has [task]/[model] sections: it is a supervised config; run it with "
                          "`innerloop train --config`, not `innerloop rl train`.")
    return rl_config_from_dict(data)
