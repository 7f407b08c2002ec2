"""Meta-reinforcement learning: MAML over Gaussian policies with TRPO (Finn et al. 2017, Sec. 5.3).

Environments are task families (:mod:`innerloop.rl.envs`: 2D navigation in torch;
:mod:`innerloop.rl.mujoco`: HalfCheetah goal velocity and direction, with ``pip install
'innerloop[rl]'``); :class:`PolicyMAML` adapts a :class:`GaussianMLP` by vanilla policy gradient
with a linear feature baseline, differentiably; :func:`trpo_step` is the outer update;
:func:`run_rl` is ``innerloop rl train``.
"""

from innerloop.numerics import conjugate_gradient
from innerloop.rl.config import RLConfig, load_rl_config, rl_config_from_dict
from innerloop.rl.envs import EnvFamily, Navigation2D, Navigation2DEnv, VectorEnv
from innerloop.rl.episodes import Episodes, advantages, fit_linear_baseline, rollout, rollout_noise
from innerloop.rl.families import ENV_FAMILIES, make_env_family
from innerloop.rl.maml import MetaBatch, PolicyMAML
from innerloop.rl.policy import GaussianMLP, kl_divergence, log_prob
from innerloop.rl.train import meta_test_rl, meta_train_rl, run_rl
from innerloop.rl.trpo import trpo_step
from innerloop.rl.workers import ParallelFamily, WorkerError

__all__ = [
    "ENV_FAMILIES", "EnvFamily", "Episodes", "GaussianMLP", "MetaBatch", "Navigation2D", "Navigation2DEnv",
    "ParallelFamily", "PolicyMAML", "RLConfig", "VectorEnv", "WorkerError", "advantages", "conjugate_gradient",
    "fit_linear_baseline", "kl_divergence", "load_rl_config", "log_prob", "make_env_family", "meta_test_rl",
    "meta_train_rl", "rl_config_from_dict", "rollout", "rollout_noise", "run_rl", "trpo_step",
]
