"""HalfCheetah goal velocity and forward/backward direction (Finn et al. 2017, Sec. 5.3).

MuJoCo through gymnasium's ``HalfCheetah-v5`` (17-dimensional observation: joint positions
without the root's x, then velocities; 6 torques in [-1, 1]; ``dt`` = 0.05 s, 5 physics steps per
action), with the rewards of the MAML paper's code (``half_cheetah_env_rand.py`` and
``half_cheetah_env_rand_direc.py`` of maml_rl/rllab):

* goal velocity: ``r = -|v - v_goal| - 0.05 * |a|^2``, ``v_goal ~ U[0, 2]``;
* direction: ``r = d * v - 0.05 * |a|^2``, ``d`` = +1 (forward) or -1 (backward), each with
  probability 1/2;

with ``v`` the forward velocity of the root, ``(x_after - x_before) / dt`` (gymnasium's
``x_velocity``; rllab read the torso's centre-of-mass velocity) and ``a`` the action clipped to
the actuators' range [-1, 1] (rllab's ``normalize`` wrapper clipped likewise). Horizon 200.

Building a simulator (``HalfCheetahEnv()``: parsing the model, allocating its data) costs many of
its steps (``benchmarks/results/rl_sampler.md``: fresh against reused simulators), and
:func:`~innerloop.rl.episodes.rollout` asks for fresh environments every rollout; so a family keeps a
:class:`~innerloop.rl.envs.SimulatorPool` and :meth:`make` reuses its simulators. A reset with a seed
(what ``rollout`` does) clears the simulator's whole state (``mj_resetData``) and reseeds its generator,
so a reused simulator gives bit for bit the episodes a fresh one gives
(``tests/rl/test_rl_mujoco.py``). The rule that keeps this safe: the environment a :meth:`make`
returns owns its simulators until the next :meth:`make` of the same family; stepping or resetting an
older one then raises (``reuse_simulators=False`` builds fresh simulators for every call instead, as
before, for code that keeps several environments of one family alive at once).

Needs the ``rl`` extra: ``pip install 'innerloop[rl]'`` (``gymnasium`` and ``mujoco``).
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from innerloop.rl.envs import SimulatorPool, uniform_tasks
from innerloop.tasks import Split, check_split, task_seed

INSTALL_HINT = "pip install 'innerloop[rl]'"
CTRL_COST = 0.05


class MissingMuJoCoError(ImportError):
    """gymnasium or MuJoCo is not installed; the message names the extra to install."""


def require_mujoco() -> Any:
    """Import gymnasium's HalfCheetah-v5 class, or raise :class:`MissingMuJoCoError` with the way out."""
    # imported here, not at the top: gymnasium and MuJoCo are an optional extra, needed only by
    # the HalfCheetah families (2D navigation and the rest of the package run without them)
    try:
        mujoco = importlib.import_module("mujoco")
        module = importlib.import_module("gymnasium.envs.mujoco.half_cheetah_v5")
    except ImportError as err:
        raise MissingMuJoCoError(
            f"the HalfCheetah environments need gymnasium and MuJoCo, which are not installed ({err}). "
            f"Install the RL extra: {INSTALL_HINT}"
        ) from err
    mujoco.set_mju_user_warning(_warn)
    return module.HalfCheetahEnv


def _warn(message: str) -> None:
    """MuJoCo's warnings as Python warnings (MuJoCo's default writes MUJOCO_LOG.TXT into the working
    directory), except the deprecation of ``settotalmass`` in gymnasium's own cheetah XML."""
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message}", RuntimeWarning, stacklevel=2)


SIMULATOR = "HalfCheetah-v5"
"""The one kind of simulator in a HalfCheetah family's :class:`~innerloop.rl.envs.SimulatorPool`."""


def build_simulator(kind: str) -> Any:
    """A new gymnasium ``HalfCheetah-v5`` simulator (``kind``: :data:`SIMULATOR`)."""
    if kind != SIMULATOR:
        raise ValueError(f"a HalfCheetah family builds {SIMULATOR!r} simulators only, not {kind!r}.")
    return require_mujoco()()


class HalfCheetahVectorEnv:
    """``n`` gymnasium HalfCheetah-v5 simulations stepped in a loop, with a task-dependent reward.

    Args:
        tasks: ``[n, 1]``: the goal velocity (``mode = "velocity"``) or direction +-1 (``"direction"``).
        mode: ``velocity`` or ``direction``.
        horizon: steps before truncation.
        pool: take the simulators from this pool (they stay this environment's until the pool's next
            :meth:`~innerloop.rl.envs.SimulatorPool.lend`; then stepping or resetting this one raises);
            ``None``: build ``n`` fresh ones.
    """

    def __init__(self, tasks: Tensor, mode: str, horizon: int = 200, pool: SimulatorPool | None = None) -> None:
        if tasks.dim() != 2 or tasks.shape[1] != 1:
            raise ValueError(f"tasks must be [n, 1], got shape {tuple(tasks.shape)}.")
        if mode not in ("velocity", "direction"):
            raise ValueError(f"mode must be 'velocity' or 'direction', got {mode!r}.")
        cls = require_mujoco()
        self.tasks = tasks[:, 0].double().numpy()
        self.mode, self.horizon, self.num_envs = mode, horizon, tasks.shape[0]
        self.pool = pool
        if pool is None:
            self.envs, self.lease = [cls() for _ in range(self.num_envs)], 0
        else:
            self.envs, self.lease = pool.lend([SIMULATOR] * self.num_envs)
        self.t = 0

    def check_lease(self) -> None:
        """Raise if a later ``make`` of the family has taken this environment's simulators."""
        if self.pool is not None and not self.pool.holds(self.lease):
            raise RuntimeError(
                "this HalfCheetah environment was built by an earlier make() of its family, and a later make() "
                "now reuses its simulators: step one environment of a family at a time (as rollout does), or "
                "build the family with reuse_simulators=False to keep several alive at once.")

    def reset(self, seed: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Reset every copy (gymnasium's reset noise of scale 0.1; copy ``j`` seeded with ``seed[j]``).
        Returns ``(obs [n, 17], {})``."""
        self.check_lease()
        if seed is not None and len(seed) != self.num_envs:
            raise ValueError(f"give one seed per environment ({self.num_envs}), got {len(seed)}.")
        obs = [env.reset(seed=None if seed is None else int(seed[j]))[0] for j, env in enumerate(self.envs)]
        self.t = 0
        return torch.as_tensor(np.stack(obs), dtype=torch.get_default_dtype(), device="cpu"), {}

    def forward_velocity(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Step every copy with ``action [n, 6]`` (clipped); returns ``(obs [n, 17], x velocity [n])``."""
        obs, vel = [], []
        for env, a in zip(self.envs, action, strict=True):
            x_before = env.data.qpos[0]
            env.do_simulation(a, env.frame_skip)  # what HalfCheetah-v5's step does, without its reward
            vel.append((env.data.qpos[0] - x_before) / env.dt)
            obs.append(env._get_obs())
        return np.stack(obs), np.asarray(vel)

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``action [n, 6]`` -> ``(obs [n, 17], reward [n], terminated [n], truncated [n], info)``;
        ``info`` holds ``x_velocity [n]`` and ``ctrl_cost [n]``."""
        if action.shape != (self.num_envs, 6):
            raise ValueError(f"action must be [{self.num_envs}, 6], got shape {tuple(action.shape)}.")
        self.check_lease()
        a = action.detach().double().clamp(-1.0, 1.0).numpy()
        obs, vel = self.forward_velocity(a)
        ctrl = CTRL_COST * np.square(a).sum(-1)
        forward = -np.abs(vel - self.tasks) if self.mode == "velocity" else self.tasks * vel
        self.t += 1
        n, cpu = self.num_envs, torch.device("cpu")  # the simulator's tensors live on the host
        dtype = torch.get_default_dtype()
        return (torch.as_tensor(obs, dtype=dtype, device=cpu),
                torch.as_tensor(forward - ctrl, dtype=dtype, device=cpu),
                torch.zeros(n, dtype=torch.bool, device=cpu), torch.full((n,), self.t >= self.horizon, device=cpu),
                {"x_velocity": torch.as_tensor(vel, device=cpu), "ctrl_cost": torch.as_tensor(ctrl, device=cpu)})


class HalfCheetahFamily:
    """What both HalfCheetah families share: the simulator pool and :meth:`make`.

    Args:
        reuse_simulators: keep a :class:`~innerloop.rl.envs.SimulatorPool` and reuse its simulators in every
            :meth:`make` (the environment returned owns them until the next :meth:`make`); ``False``:
            build fresh ones each call. The episodes are the same either way.
    """

    mode = "velocity"
    horizon: int
    _pool: SimulatorPool | None

    def __init__(self, reuse_simulators: bool = True) -> None:
        require_mujoco()
        self.reuse_simulators = bool(reuse_simulators)
        self._pool = SimulatorPool(build_simulator) if self.reuse_simulators else None

    def make(self, tasks: Tensor) -> HalfCheetahVectorEnv:
        """``n`` simulations for ``tasks [n, 1]``; with ``reuse_simulators``, from the family's pool
        (the environment this returned before can then no longer be stepped)."""
        return HalfCheetahVectorEnv(tasks, self.mode, self.horizon, self._pool)

    def __getstate__(self) -> dict[str, Any]:
        """The settings without the simulators (which do not pickle): an unpickled copy, e.g. in a
        worker process, builds its own pool."""
        return {k: v for k, v in self.__dict__.items() if k != "_pool"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._pool = SimulatorPool(build_simulator) if state.get("reuse_simulators", True) else None


class HalfCheetahVel(HalfCheetahFamily):
    """HalfCheetah goal velocity: task ``[v_goal]`` with ``v_goal ~ U[low, high]`` (the paper: [0, 2]).
    ``reuse_simulators``: see :class:`HalfCheetahFamily`."""

    name = "cheetah-vel"
    obs_dim, act_dim, task_dim = 17, 6, 1
    mode = "velocity"

    def __init__(self, seed: int = 0, horizon: int = 200, low: float = 0.0, high: float = 2.0,
                 reuse_simulators: bool = True) -> None:
        super().__init__(reuse_simulators)
        if not low < high or horizon < 1:
            raise ValueError(f"need low < high (got {low}, {high}) and horizon >= 1 (got {horizon}).")
        self.seed, self.horizon, self.low, self.high = seed, horizon, low, high

    def tasks(self, split: Split, indices: Sequence[int]) -> Tensor:
        """``[n, 1]`` goal velocities."""
        low = torch.tensor([self.low], dtype=torch.float64, device="cpu")
        high = torch.tensor([self.high], dtype=torch.float64, device="cpu")
        return uniform_tasks(self.seed, split, indices, low, high, "cheetah-vel")


class HalfCheetahDir(HalfCheetahFamily):
    """HalfCheetah forward/backward: task ``[d]``, ``d`` = +1 or -1 with probability 1/2 each.
    ``reuse_simulators``: see :class:`HalfCheetahFamily`."""

    name = "cheetah-dir"
    obs_dim, act_dim, task_dim = 17, 6, 1
    mode = "direction"

    def __init__(self, seed: int = 0, horizon: int = 200, reuse_simulators: bool = True) -> None:
        super().__init__(reuse_simulators)
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}.")
        self.seed, self.horizon = seed, horizon

    def tasks(self, split: Split, indices: Sequence[int]) -> Tensor:
        """``[n, 1]`` directions, +1 or -1."""
        check_split(split)
        signs = [1.0 if task_seed(self.seed, split, int(i), "cheetah-dir") % 2 == 0 else -1.0 for i in indices]
        return torch.tensor(signs, device="cpu").reshape(-1, 1)
