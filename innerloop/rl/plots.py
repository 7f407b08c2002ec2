"""Trajectories of 2D navigation before and after adaptation (like Figure 4 of the MAML paper)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from innerloop.plotting import plot_adaptation_curves, save_figure
from innerloop.rl.config import RLConfig
from innerloop.rl.envs import EnvFamily, Navigation2D
from innerloop.rl.maml import PolicyMAML
from innerloop.training.evaluate import RunResult


def plot_navigation(algorithms: Mapping[str, PolicyMAML], family: Navigation2D, path: str | Path, tasks: int = 4,
                    steps: int = 3, rollouts: int = 20, lr: float | None = None, shown: int = 2) -> None:
    """One row per policy, one column per test task: the goal, and ``shown`` of the sampled
    trajectories before adaptation (dashed) and after 1..``steps`` policy-gradient steps, each
    step taken on ``rollouts`` episodes as in meta-testing."""
    fig, axes = plt.subplots(len(algorithms), tasks, figsize=(3.0 * tasks, 3.0 * len(algorithms)), squeeze=False)
    colours = plt.cm.viridis_r([0.15 + 0.75 * k / max(1, steps) for k in range(steps + 1)])
    goals = family.tasks("test", range(tasks))
    for row, (name, algorithm) in enumerate(algorithms.items()):
        returns, episodes = algorithm.evaluate(family, "test", range(tasks), steps, rollouts, lr,
                                               keep_episodes=True)
        for col in range(tasks):
            ax = axes[row][col]
            for k, ep in enumerate(episodes):
                for j in range(min(shown, rollouts)):
                    valid = ep.mask[col, j] > 0
                    xy = ep.obs[col, j][valid]
                    label = None
                    if j == 0:
                        label = ("pre-update" if k == 0 else f"after {k} step{'s' * (k != 1)}") + \
                            f" ({returns[col, k]:.1f})"
                    ax.plot(xy[:, 0], xy[:, 1], color=colours[k], lw=1.0, ls="--" if k == 0 else "-", label=label)
            ax.scatter([0.0], [0.0], marker="o", color="k", s=15, zorder=5)
            ax.scatter(goals[col, :1], goals[col, 1:], marker="*", color="tab:red", s=120, zorder=5, label="goal")
            ax.set_xlim(-0.7, 0.7)
            ax.set_ylim(-0.7, 0.7)
            ax.set_aspect("equal")
            ax.tick_params(labelsize=6)
            ax.legend(fontsize=5, loc="lower left")
            if row == 0:
                ax.set_title(f"test task {col}", fontsize=8)
            if col == 0:
                ax.set_ylabel(name)
    fig.suptitle("2D navigation: trajectories before and after adaptation (mean return in brackets)", fontsize=9)
    save_figure(fig, path)


def plot_rl_run(result: RunResult[PolicyMAML, EnvFamily], cfg: RLConfig) -> list[Path]:
    """The figures of a meta-RL run (:func:`innerloop.rl.train.run_rl`) in its folder:
    ``adaptation.png``, and ``trajectories.png`` for 2D navigation. Returns their paths."""
    e, out = cfg.eval, result.out_dir
    plot_adaptation_curves(result.results, out / "adaptation.png", result.title)
    written = [out / "adaptation.png"]
    if isinstance(result.test_family, Navigation2D) and e.plot_tasks > 0:
        plot_navigation(result.trained, result.test_family, out / "trajectories.png",
                        min(e.plot_tasks, e.test_tasks), max(1, e.steps), e.rollouts,
                        e.inner_lr or cfg.algorithm.inner_lr)
        written.append(out / "trajectories.png")
    return written
