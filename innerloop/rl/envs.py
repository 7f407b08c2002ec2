"""Task families of environments, and the 2D point navigation of the MAML paper in torch.

An *environment family* is a distribution of MDPs with ``train`` / ``val`` / ``test`` splits,
like a supervised :class:`~innerloop.tasks.TaskFamily`: task ``i`` of a split is a deterministic
function of (family seed, split, ``i``), so the meta-test tasks are fixed. A task is a small
vector (a goal position, a target velocity, a direction); :meth:`EnvFamily.make` builds one
vectorised environment with one copy per row of a task matrix, stepped all at once.

Vectorised environments follow the gymnasium API with torch tensors and a leading batch
dimension: ``reset(seed) -> (obs [n, obs_dim], info)`` and
``step(action [n, act_dim]) -> (obs, reward [n], terminated [n], truncated [n], info)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from innerloop.tasks import Split, check_split, task_seed


@runtime_checkable
class VectorEnv(Protocol):
    """``n`` environments stepped together (gymnasium's API, batched, on tensors)."""

    num_envs: int

    def reset(self, seed: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]: ...

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]: ...


@runtime_checkable
class EnvFamily(Protocol):
    """A distribution of MDPs with fixed, disjoint splits.

    Attributes:
        name: the family's config name.
        obs_dim, act_dim: observation and action sizes.
        task_dim: size of the vector that defines a task.
        horizon: steps per episode (an episode may terminate earlier).
        seed: fixes every task of every split.
    """

    name: str
    obs_dim: int
    act_dim: int
    task_dim: int
    horizon: int
    seed: int

    def tasks(self, split: Split, indices: Sequence[int]) -> Tensor:
        """``[len(indices), task_dim]``: the tasks ``indices`` of ``split``."""
        ...

    def make(self, tasks: Tensor) -> VectorEnv:
        """One environment per row of ``tasks [n, task_dim]``."""
        ...


def uniform_tasks(seed: int, split: Split, indices: Sequence[int], low: Tensor, high: Tensor, salt: str) -> Tensor:
    """``[n, d]``: task ``i`` drawn from U[low, high] by a generator seeded with :func:`task_seed`
    (drawn in float64, returned in torch's default dtype)."""
    check_split(split)
    rows = []
    for i in indices:
        g = torch.Generator().manual_seed(task_seed(seed, split, int(i), salt))
        u = torch.rand(low.shape, generator=g, dtype=torch.float64, device=low.device)
        rows.append(low + (high - low) * u)
    dtype = torch.get_default_dtype()
    return torch.stack(rows).to(dtype) if rows else torch.empty(0, low.numel(), dtype=dtype, device=low.device)


TERMINATIONS = ("box", "euclidean")


def check_termination(termination: str) -> None:
    """Refuse a 2D-navigation ``termination`` that is not ``box`` or ``euclidean``."""
    if termination not in TERMINATIONS:
        raise ValueError(f"termination must be one of {list(TERMINATIONS)}, got {termination!r}.")


class Navigation2DEnv:
    """Point navigation in the plane (Finn et al. 2017, Sec. 5.3), ``n`` copies at once.

    The agent starts at the origin; the observation is its position ``[n, 2]``; the policy's action
    ``a`` is scaled to a velocity ``action_scale * a``, clipped to ``[-action_bound, action_bound]``
    per coordinate and added to the position; the reward is minus the Euclidean distance to the goal
    after the move. An episode terminates when the agent is within ``goal_radius`` of the goal
    (``termination = "box"``: in each coordinate, as the paper's code tests; ``"euclidean"``: in
    distance) and is truncated at ``horizon`` steps (the paper: 100). A copy that has terminated
    stays put and earns 0 until :meth:`reset`.

    The paper's code wraps the environment in rllab's ``normalize``, which maps a policy action in
    ``[-1, 1]`` linearly onto the action box ``[-0.1, 0.1]``: a policy action is scaled by the
    bound, ``action_scale = action_bound`` (the default). ``action_scale = 1`` and
    ``termination = "euclidean"`` give the environment of innerloop 0.2.0 and earlier (the action taken as
    a velocity, so a policy standard deviation of 1 is ten times the paper's exploration noise).

    Args:
        goals: ``[n, 2]`` goal positions.
        horizon: steps before truncation.
        action_bound: the velocity clip.
        goal_radius: termination distance (0: never terminate early).
        action_scale: velocity per unit of policy action (``None``: ``action_bound``).
        termination: ``"box"`` or ``"euclidean"``.
    """

    def __init__(self, goals: Tensor, horizon: int = 100, action_bound: float = 0.1,
                 goal_radius: float = 0.01, action_scale: float | None = None,
                 termination: str = "box") -> None:
        if goals.dim() != 2 or goals.shape[-1] != 2:
            raise ValueError(f"goals must be [n, 2], got shape {tuple(goals.shape)}.")
        check_termination(termination)
        self.goals = goals
        self.num_envs = goals.shape[0]
        self.horizon, self.action_bound, self.goal_radius = horizon, action_bound, goal_radius
        self.action_scale = action_bound if action_scale is None else action_scale
        self.termination = termination
        self.position = torch.zeros_like(self.goals)
        self.done = torch.zeros(self.num_envs, dtype=torch.bool, device=goals.device)
        self.t = 0

    def reset(self, seed: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Every copy back to the origin (deterministic: ``seed`` is accepted and unused)."""
        self.position = torch.zeros_like(self.goals)
        self.done = torch.zeros_like(self.done)
        self.t = 0
        return self.position.clone(), {}

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``action [n, 2]`` (policy units, unclipped) -> ``(obs [n, 2], reward [n], terminated [n],
        truncated [n], {})``."""
        if action.shape != self.position.shape:
            raise ValueError(f"action must be [{self.num_envs}, 2], got shape {tuple(action.shape)}.")
        live = ~self.done
        move = (self.action_scale * action.to(self.goals.dtype)).clamp(-self.action_bound, self.action_bound)
        self.position = torch.where(live[:, None], self.position + move, self.position)
        offset = self.position - self.goals
        distance = torch.linalg.vector_norm(offset, dim=-1)
        reward = torch.where(live, -distance, torch.zeros_like(distance))
        near = offset.abs().amax(-1) if self.termination == "box" else distance
        self.done = self.done | (live & (near < self.goal_radius))
        self.t += 1
        truncated = torch.full((self.num_envs,), self.t >= self.horizon, device=self.goals.device)
        return self.position.clone(), reward, self.done.clone(), truncated, {}


class Navigation2D:
    """The 2D navigation task family: goals uniform in ``[goal_low, goal_high]^2``.

    The default square ``[-0.5, 0.5]^2`` is the unit square centred on the start, as sampled by
    the MAML paper's code (``point_env_randgoal.py`` of rllab/maml_rl); the paper's text says
    "randomly chosen within a unit square".
    """

    name = "nav2d"
    obs_dim = act_dim = task_dim = 2

    def __init__(self, seed: int = 0, horizon: int = 100, goal_low: float = -0.5, goal_high: float = 0.5,
                 action_bound: float = 0.1, goal_radius: float = 0.01, action_scale: float | None = None,
                 termination: str = "box") -> None:
        if not goal_low < goal_high:
            raise ValueError(f"goal_low ({goal_low}) must be < goal_high ({goal_high}).")
        if horizon < 1 or action_bound <= 0 or goal_radius < 0 or (action_scale is not None and action_scale <= 0):
            raise ValueError(f"need horizon >= 1 (got {horizon}), action_bound > 0 (got {action_bound}), "
                             f"goal_radius >= 0 (got {goal_radius}) and action_scale > 0 or None "
                             f"(got {action_scale}).")
        check_termination(termination)
        self.seed, self.horizon = seed, horizon
        self.goal_low, self.goal_high = goal_low, goal_high
        self.action_bound, self.goal_radius = action_bound, goal_radius
        self.action_scale, self.termination = action_scale, termination

    def tasks(self, split: Split, indices: Sequence[int]) -> Tensor:
        """``[n, 2]`` goal positions."""
        low = torch.full((2,), self.goal_low, dtype=torch.float64, device="cpu")
        high = torch.full((2,), self.goal_high, dtype=torch.float64, device="cpu")
        return uniform_tasks(self.seed, split, indices, low, high, "nav2d")

    def make(self, tasks: Tensor) -> Navigation2DEnv:
        return Navigation2DEnv(tasks, self.horizon, self.action_bound, self.goal_radius, self.action_scale,
                               self.termination)


class SimulatorPool:
    """Simulators that a family keeps between its :meth:`~EnvFamily.make` calls (building one costs
    many of its steps: ``benchmarks/results/rl_sampler.md``), lent to one vector environment at a time.

    :meth:`lend` hands out one simulator per entry of ``kinds`` (the ``j``-th entry of a kind in one
    call gets that kind's ``j``-th simulator, built by ``build(kind)`` the first time it is needed)
    under a new lease; only the latest lease :meth:`holds`, so an environment built before the last
    :meth:`lend` knows that its simulators now serve another one. A family that reuses simulators must
    reset every state they carry (the HalfCheetah and Meta-World families do, and test it).

    Args:
        build: a new simulator of a kind (e.g. a Meta-World skill name).
    """

    def __init__(self, build: Callable[[str], Any]) -> None:
        self.build = build
        self.simulators: dict[str, list[Any]] = {}
        self.lease = 0

    def lend(self, kinds: Sequence[str]) -> tuple[list[Any], int]:
        """``(one simulator per entry of kinds, distinct within the call; the lease)``; the previous lease ends."""
        used: dict[str, int] = {}
        out = []
        for kind in kinds:
            k = used.get(kind, 0)
            pool = self.simulators.setdefault(kind, [])
            while len(pool) <= k:
                pool.append(self.build(kind))
            out.append(pool[k])
            used[kind] = k + 1
        self.lease += 1
        return out, self.lease

    def holds(self, lease: int) -> bool:
        """Whether ``lease`` is the latest (its simulators are still its own)."""
        return lease == self.lease
