"""Meta-World task families: ML1 (one manipulation skill, held-out goals) and ML10 (held-out skills).

Meta-World (Yu et al. 2019; the ``metaworld`` package, gymnasium API) simulates a Sawyer arm in
MuJoCo: a 39-dimensional observation (hand position, gripper opening, two objects' poses, the
previous step's copy of these, and the goal, which the ML benchmarks hide as zeros), 4 actions in
[-1, 1] (hand displacement and gripper; clipped to that box here), a reward in [0, 10] per step
and ``info["success"]`` (0 or 1) per step; an episode lasts ``max_path_length`` = 500 steps.

* ``metaworld-ml1`` (option ``env_name``, e.g. ``reach-v3``, ``push-v3``, ``pick-place-v3``): one
  skill; ``train`` tasks are ``metaworld.ML1(env_name, seed)``'s 50 train goal positions and
  ``test`` tasks its 50 held-out goal positions (Meta-World draws them with ``seed + 1``).
* ``metaworld-ml10``: ``train`` tasks are the 50 goals of each of ``metaworld.ML10(seed)``'s 10
  train skills, ``test`` tasks the 50 goals of each of its 5 held-out skills.

The benchmark is built with Meta-World's own seed = the family seed, so the test tasks are fixed.
Test task ``i`` is deterministic: ML1 goal ``i``; ML10 skill ``i % 5``, goal ``i // 5`` (the first
40 test tasks cover the 5 skills 8 times each). Train task ``i`` is position ``i % N`` of a
permutation of all ``N`` train tasks drawn with :func:`~innerloop.tasks.task_seed` for the pass
``i // N``, so consecutive meta-batches cycle over every train task (ML10: every skill) before any
repeats. Meta-World has no validation split: ``val`` is refused (nothing in meta-RL's training or
testing asks for it).

A task is the row ``[split, skill, goal]`` (split 0 = train, 1 = test; ``skill`` indexes the
split's skills, ``goal`` that skill's task list). :meth:`MetaWorldFamily.make` reuses simulators:
each skill's environments are built once per family (building one costs many of its steps) and
given the row's task with ``set_task`` at every reset (tested: a reused simulator's episodes equal a
fresh one's bit for bit). A family therefore serves one vector environment at a time: stepping one
after the family built the next raises an error. Pickling a family keeps the benchmark's tasks and
drops the simulators (each process builds its own).

Episodes are not ended at success: ``success`` of an episode is whether any of its steps succeeded
(the count of Meta-World's own evaluation, ``metaworld.evaluation``, which ends an episode at its
first success), and the return sums the reward of all steps. ``horizon`` may cut episodes shorter
than 500 steps (they are then truncated there).

Needs the ``metaworld`` extra: ``pip install 'innerloop[metaworld]'`` (``metaworld``, which pins its
own MuJoCo).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from innerloop.rl.envs import SimulatorPool
from innerloop.tasks import Split, check_split, task_seed

INSTALL_HINT = "pip install 'innerloop[metaworld]'"
MAX_PATH_LENGTH = 500
"""Meta-World's episode length (``SawyerXYZEnv.max_path_length``); its simulators refuse to step further."""
SPLIT_CODES: dict[str, int] = {"train": 0, "test": 1}


class MissingMetaWorldError(ImportError):
    """The ``metaworld`` package is not installed; the message names the extra to install."""


def require_metaworld() -> Any:
    """Import the ``metaworld`` package, or raise :class:`MissingMetaWorldError` with the way out."""
    # imported here, not at the top: Meta-World (and the MuJoCo it pins) is an optional extra, needed
    # only by these families
    try:
        return importlib.import_module("metaworld")
    except ImportError as err:
        raise MissingMetaWorldError(
            f"the Meta-World environments need the metaworld package, which is not installed ({err}). "
            f"Install the Meta-World extra: {INSTALL_HINT}"
        ) from err


def ml1_env_names() -> list[str]:
    """The skills ML1 accepts as ``env_name`` (Meta-World's v3 environments)."""
    return list(require_metaworld().ML1.ENV_NAMES)


class MetaWorldVectorEnv:
    """``n`` Meta-World simulators stepped in a loop, each given its task at every reset.

    Args:
        pool: where the simulators come from (:class:`~innerloop.rl.envs.SimulatorPool`, by skill name).
        names: the skill of each copy.
        tasks: Meta-World ``Task`` objects, one per copy.
        horizon: steps before truncation (at most 500).
    """

    def __init__(self, pool: SimulatorPool, names: Sequence[str], tasks: Sequence[Any], horizon: int) -> None:
        if not 1 <= horizon <= MAX_PATH_LENGTH:
            raise ValueError(f"horizon must lie in [1, {MAX_PATH_LENGTH}], got {horizon}.")
        self.pool, self.tasks, self.horizon = pool, list(tasks), horizon
        self.envs, self.lease = pool.lend(names)
        self.num_envs = len(self.envs)
        self.t = 0

    def _check_lease(self) -> None:
        if not self.pool.holds(self.lease):
            raise RuntimeError("this Meta-World vector environment's simulators were lent to a later make() of "
                               "the same family; a family serves one vector environment at a time (use a copy "
                               "of the family, e.g. pickled, for each one run at once).")

    def reset(self, seed: Sequence[int] | None = None) -> tuple[Tensor, dict[str, Any]]:
        """Give every copy its task and reset it: ``obs [n, 39]``. Deterministic: Meta-World fixes the
        objects' and goal's positions by the task and adds no reset noise (``seed`` is accepted, checked
        for length and unused)."""
        self._check_lease()
        if seed is not None and len(seed) != self.num_envs:
            raise ValueError(f"give one seed per environment ({self.num_envs}), got {len(seed)}.")
        obs = []
        for env, task in zip(self.envs, self.tasks, strict=True):
            env.set_task(task)
            obs.append(env.reset()[0])
        self.t = 0
        return torch.as_tensor(np.stack(obs), dtype=torch.get_default_dtype(), device="cpu"), {}

    def step(self, action: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, dict[str, Any]]:
        """``action [n, 4]`` (clipped to [-1, 1]) -> ``(obs [n, 39], reward [n], terminated [n],
        truncated [n], info)``; ``info["success"]`` is ``[n]`` (1.0 where the step succeeded).
        Never terminates; truncated at ``horizon``."""
        self._check_lease()
        if action.shape != (self.num_envs, 4):
            raise ValueError(f"action must be [{self.num_envs}, 4], got shape {tuple(action.shape)}.")
        if self.t >= self.horizon:
            raise RuntimeError(f"the episode ended at the horizon ({self.horizon} steps): reset() first.")
        a = action.detach().double().clamp(-1.0, 1.0).numpy()
        obs, reward, success = [], [], []
        for env, act in zip(self.envs, a, strict=True):
            o, r, _, _, info = env.step(act)
            obs.append(o)
            reward.append(float(r))
            success.append(float(info["success"]))
        self.t += 1
        n, cpu, dtype = self.num_envs, torch.device("cpu"), torch.get_default_dtype()
        return (torch.as_tensor(np.stack(obs), dtype=dtype, device=cpu),
                torch.tensor(reward, dtype=dtype, device=cpu),
                torch.zeros(n, dtype=torch.bool, device=cpu), torch.full((n,), self.t >= self.horizon, device=cpu),
                {"success": torch.tensor(success, dtype=dtype, device=cpu)})


class MetaWorldFamily:
    """A Meta-World benchmark as an :class:`~innerloop.rl.envs.EnvFamily` (see the module's docstring).

    Args:
        benchmark: ``"ML1"`` or ``"ML10"``.
        env_name: ML1's skill (ignored by ML10, which must not be given one).
        seed: Meta-World's benchmark seed; fixes every task.
        horizon: steps per episode, at most 500 (Meta-World's).
    """

    obs_dim, act_dim, task_dim = 39, 4, 3

    def __init__(self, benchmark: str, env_name: str | None = None, seed: int = 0,
                 horizon: int = MAX_PATH_LENGTH) -> None:
        metaworld = require_metaworld()
        if benchmark not in ("ML1", "ML10"):
            raise ValueError(f"benchmark must be 'ML1' or 'ML10', got {benchmark!r}.")
        if benchmark == "ML1":
            names = list(metaworld.ML1.ENV_NAMES)
            if env_name not in names:
                raise ValueError(f"env_name = {env_name!r} is not a Meta-World environment; choose one of "
                                 f"{names} (e.g. env.options = {{env_name = \"reach-v3\"}}).")
        elif env_name is not None:
            raise ValueError(f"ML10 has its own 15 skills; it takes no env_name (got {env_name!r}).")
        if not 1 <= horizon <= MAX_PATH_LENGTH:
            raise ValueError(f"horizon must lie in [1, {MAX_PATH_LENGTH}] (Meta-World's episode length), "
                             f"got {horizon}.")
        self.benchmark, self.env_name, self.seed, self.horizon = benchmark, env_name, seed, horizon
        self.name = "metaworld-ml1" if benchmark == "ML1" else "metaworld-ml10"
        self._splits: dict[str, tuple[list[str], list[list[Any]]]] | None = None
        self._classes: dict[str, Any] = {}
        self._pool: SimulatorPool | None = None

    # -- the benchmark, built on first use (ML10's is slow to build) and kept when pickled ------------

    def _load(self) -> dict[str, tuple[list[str], list[list[Any]]]]:
        """``{split: (skill names, each skill's tasks in Meta-World's order)}``."""
        if self._splits is None:
            metaworld = require_metaworld()
            bench = (metaworld.ML1(self.env_name, seed=self.seed) if self.benchmark == "ML1"
                     else metaworld.ML10(seed=self.seed))
            splits = {}
            for split, classes, tasks in (("train", bench.train_classes, bench.train_tasks),
                                          ("test", bench.test_classes, bench.test_tasks)):
                names = list(classes)
                self._classes.update(classes)
                splits[split] = (names, [[t for t in tasks if t.env_name == n] for n in names])
            self._splits = splits
        return self._splits

    def __getstate__(self) -> dict[str, Any]:
        """The family with its benchmark's tasks (built first if need be, so that a worker process does not
        rebuild ML10 itself) and without its simulators (MuJoCo state does not pickle; each process builds
        its own)."""
        self._load()
        state = self.__dict__.copy()
        state["_pool"] = None
        return state

    def skills(self, split: Split) -> list[str]:
        """The skill names of ``split`` (ML1: the one ``env_name``)."""
        return list(self._load()[self._split(split)][0])

    def num_tasks(self, split: Split) -> int:
        """How many distinct tasks ``split`` has (ML1: 50; ML10: 500 train, 250 test)."""
        return sum(len(t) for t in self._load()[self._split(split)][1])

    def _split(self, split: Split) -> str:
        check_split(split)
        if split == "val":
            raise ValueError("Meta-World has no validation split: its benchmarks define train and test tasks "
                             "only; use split 'train' or 'test'.")
        return split

    # -- the EnvFamily protocol ---------------------------------------------------------------------------

    def tasks(self, split: Split, indices: Sequence[int]) -> Tensor:
        """``[len(indices), 3]`` rows ``[split, skill, goal]`` (see the module's docstring for the order)."""
        names, lists = self._load()[self._split(split)]
        code = SPLIT_CODES[split]
        rows: list[list[float]] = []
        if split == "test":
            per_skill = min(len(t) for t in lists)
            total = per_skill * len(names)
            for i in indices:
                if not 0 <= int(i) < total:
                    raise ValueError(f"test task {int(i)} does not exist: {self.name} has {total} test tasks "
                                     f"(0..{total - 1}); ask for fewer (eval.test_tasks).")
                rows.append([code, int(i) % len(names), int(i) // len(names)])
        else:
            flat = [(c, g) for c, t in enumerate(lists) for g in range(len(t))]
            perms: dict[int, Tensor] = {}
            for i in indices:
                if int(i) < 0:
                    raise ValueError(f"task index must be >= 0, got {int(i)}.")
                epoch, pos = divmod(int(i), len(flat))
                if epoch not in perms:
                    g = torch.Generator().manual_seed(task_seed(self.seed, split, epoch, f"{self.name}/order"))
                    perms[epoch] = torch.randperm(len(flat), generator=g, device="cpu")
                c, goal = flat[int(perms[epoch][pos])]
                rows.append([code, c, goal])
        return torch.tensor(rows, dtype=torch.get_default_dtype(), device="cpu").reshape(-1, 3)

    def _decode(self, tasks: Tensor) -> tuple[list[str], list[Any]]:
        if tasks.dim() != 2 or tasks.shape[1] != 3:
            raise ValueError(f"tasks must be [n, 3] rows [split, skill, goal], got shape {tuple(tasks.shape)}.")
        splits = self._load()
        by_code = {v: k for k, v in SPLIT_CODES.items()}
        names, objs = [], []
        for row in tasks.tolist():
            code, c, g = (round(x) for x in row)
            if code not in by_code:
                raise ValueError(f"task row {row}: the split code must be 0 (train) or 1 (test).")
            skills, lists = splits[by_code[code]]
            if not (0 <= c < len(skills) and 0 <= g < len(lists[c])):
                raise ValueError(f"task row {row} does not exist in {self.name}'s {by_code[code]} split.")
            names.append(skills[c])
            objs.append(lists[c][g])
        return names, objs

    def task_classes(self, tasks: Tensor) -> list[str]:
        """The skill name of each row of ``tasks [n, 3]`` (the groups of the per-skill success rates)."""
        return self._decode(tasks)[0]

    def _build(self, skill: str) -> Any:
        """A new simulator of ``skill`` (Meta-World's environment class of that name)."""
        return self._classes[skill]()

    def make(self, tasks: Tensor) -> MetaWorldVectorEnv:
        """One simulator per row of ``tasks [n, 3]``, reused from this family's earlier calls."""
        names, objs = self._decode(tasks)
        if self._pool is None:
            self._pool = SimulatorPool(self._build)
        return MetaWorldVectorEnv(self._pool, names, objs, self.horizon)


def make_metaworld_family(name: str, seed: int = 0, horizon: int | None = None, **options: Any) -> MetaWorldFamily:
    """``metaworld-ml1`` (option ``env_name``) or ``metaworld-ml10`` (no options)."""
    h = MAX_PATH_LENGTH if horizon is None else horizon
    if name == "metaworld-ml1":
        unknown = set(options) - {"env_name"}
        if unknown or "env_name" not in options:
            require_metaworld()
            raise ValueError(f"metaworld-ml1 takes one option, env_name (e.g. \"reach-v3\"); got "
                             f"{sorted(options)}. Choose env_name among {ml1_env_names()}.")
        return MetaWorldFamily("ML1", str(options["env_name"]), seed, h)
    if name == "metaworld-ml10":
        if options:
            raise ValueError(f"metaworld-ml10 takes no options, got {sorted(options)}.")
        return MetaWorldFamily("ML10", None, seed, h)
    raise ValueError(f"unknown Meta-World family {name!r}; choose metaworld-ml1 or metaworld-ml10.")
