"""The environment families by config name (``env.name`` of an RL config).

This module sits above the homes of families: :mod:`innerloop.rl.envs` (the protocols, the task
sampler and 2D navigation), :mod:`innerloop.rl.mujoco` (HalfCheetah, which imports gymnasium and
MuJoCo only when a HalfCheetah family is built) and :mod:`innerloop.rl.metaworld` (Meta-World ML1
and ML10, which import ``metaworld`` only when built), so importing this needs none of them.
"""

from __future__ import annotations

from typing import Any

from innerloop.rl.envs import EnvFamily, Navigation2D
from innerloop.rl.metaworld import make_metaworld_family
from innerloop.rl.mujoco import HalfCheetahDir, HalfCheetahVel

ENV_FAMILIES: tuple[str, ...] = ("nav2d", "cheetah-vel", "cheetah-dir", "metaworld-ml1", "metaworld-ml10")


def make_env_family(name: str, seed: int = 0, horizon: int | None = None, **options: Any) -> EnvFamily:
    """An environment family by config name: ``nav2d``, ``cheetah-vel``, ``cheetah-dir``,
    ``metaworld-ml1`` (option ``env_name``, e.g. ``reach-v3``) or ``metaworld-ml10``.

    The HalfCheetah families need MuJoCo (``pip install 'innerloop[rl]'``); asking for one
    without it raises a :class:`~innerloop.rl.mujoco.MissingMuJoCoError` (an :class:`ImportError`)
    that says so. The Meta-World families need ``pip install 'innerloop[metaworld]'``
    (:class:`~innerloop.rl.metaworld.MissingMetaWorldError` otherwise).
    """
    if name == "nav2d":
        return Navigation2D(seed=seed, horizon=horizon or 100, **options)
    if name in ("cheetah-vel", "cheetah-dir"):
        cls = HalfCheetahVel if name == "cheetah-vel" else HalfCheetahDir
        return cls(seed=seed, horizon=horizon or 200, **options)
    if name in ("metaworld-ml1", "metaworld-ml10"):
        return make_metaworld_family(name, seed, horizon, **options)
    raise ValueError(f"unknown environment family {name!r}; choose one of {list(ENV_FAMILIES)}.")
