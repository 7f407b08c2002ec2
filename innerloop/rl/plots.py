"""Trajectories of 2D navigation before and after adaptation (like Figure 4 of the MAML paper)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from innerloop.plotting import plot_adaptation_curves, save_figure
from innerloop.rl.config import RLConfig
from innerloop.rl.envs import EnvFamily, Navigation2D
from innerloop.rl.maml import PolicyMAML
from innerloop.rl.train import meta_test_lr
from innerloop.training.evaluate import RunResult


def plot_navigation(algorithms: Mapping[str, PolicyMAML], family: Navigation2D, path: str | Path, tasks: int = 4,
                    steps: int = 3, rollouts: int = 20, lr: float | Sequence[float] | None = None, shown: int = 2,
                    *, batch_steps: int | None = None) -> None:
    """One row per policy, one column per test task: the goal, and ``shown`` of the sampled
    trajectories before adaptation (dashed) and after 1..``steps`` policy-gradient steps, each
    step taken as in meta-testing (:meth:`~innerloop.rl.maml.PolicyMAML.evaluate_scores`: ``rollouts``
    episodes, or with ``batch_steps`` the first episodes holding that many steps; ``lr`` one step size
    or one per step)."""
    fig, axes = plt.subplots(len(algorithms), tasks, figsize=(3.0 * tasks, 3.0 * len(algorithms)), squeeze=False)
    colours = plt.cm.viridis_r([0.15 + 0.75 * k / max(1, steps) for k in range(steps + 1)])
    goals = family.tasks("test", range(tasks))
    for row, (name, algorithm) in enumerate(algorithms.items()):
        returns, episodes = algorithm.evaluate(family, "test", range(tasks), steps, rollouts, lr,
                                               keep_episodes=True, batch_steps=batch_steps)
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


def read_curve(metrics: str | Path) -> tuple[list[int], dict[int, list[float]]]:
    """``(iterations, {k: test return after k steps at each of them})`` from a run's ``metrics.jsonl``
    (the rows with ``test_return_*``, logged by a run with ``eval.curve_every``; iteration ``i`` is the
    policy after ``i`` updates). Empty when the run logged no curve."""
    iterations: list[int] = []
    curve: dict[int, list[float]] = {}
    path = Path(metrics)
    if not path.exists():
        return iterations, curve
    for line in path.read_text().splitlines():
        row = json.loads(line)
        keys = sorted(int(k[len("test_return_"):]) for k in row if k.startswith("test_return_"))
        if not keys:
            continue
        iterations.append(int(row["step"]) - 1)  # logged with the step that ran after it
        for k in keys:
            curve.setdefault(k, []).append(float(row[f"test_return_{k}"]))
    return iterations, curve


def plot_learning_curve(runs: Mapping[str, Path], path: str | Path, title: str) -> bool:
    """Test return after 0..k policy-gradient steps against training iterations, one panel per run
    (``runs``: name -> run folder with ``metrics.jsonl``). Returns False (and draws nothing) when no
    run logged a curve."""
    curves = {name: read_curve(Path(folder) / "metrics.jsonl") for name, folder in runs.items()}
    curves = {name: c for name, c in curves.items() if c[0]}
    if not curves:
        return False
    fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.2), squeeze=False)
    for ax, (name, (iterations, curve)) in zip(axes[0], curves.items(), strict=True):
        colours = plt.cm.viridis_r([0.15 + 0.75 * k / max(1, len(curve) - 1) for k in range(len(curve))])
        for k, values in sorted(curve.items()):
            ax.plot(iterations, values, color=colours[k], marker=".", lw=1.0,
                    label="pre-update" if k == 0 else f"after {k} step{'s' * (k != 1)}")
        ax.set_xlabel("training iteration")
        ax.set_ylabel("test return")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return True


def plot_rl_run(result: RunResult[PolicyMAML, EnvFamily], cfg: RLConfig) -> list[Path]:
    """The figures of a meta-RL run (:func:`innerloop.rl.train.run_rl`) in its folder:
    ``adaptation.png``, ``curve.png`` when the run logged a learning curve (``eval.curve_every``), and
    ``trajectories.png`` for 2D navigation, ``success.png`` for Meta-World (success rate per test
    skill). Returns their paths."""
    e, out = cfg.eval, result.out_dir
    plot_adaptation_curves(result.results, out / "adaptation.png", result.title)
    written = [out / "adaptation.png"]
    folders = {"MAML": out, "pre-trained": out / "pretrain"}
    curve_title = (f"{cfg.env.name}: mean test return on {min(e.curve_tasks, e.test_tasks)} fixed test tasks "
                   f"during training")
    if plot_learning_curve(folders, out / "curve.png", curve_title):
        written.append(out / "curve.png")
    per_class = {name: run.get("success_per_class") for name, run in result.report["runs"].items()}
    if plot_success_per_task(per_class, out / "success.png",
                             f"{cfg.env.name}: success rate per test skill ({e.test_tasks} fixed test tasks)"):
        written.append(out / "success.png")
    if isinstance(result.test_family, Navigation2D) and e.plot_tasks > 0:
        plot_navigation(result.trained, result.test_family, out / "trajectories.png",
                        min(e.plot_tasks, e.test_tasks), max(1, e.steps), e.rollouts, meta_test_lr(cfg),
                        batch_steps=e.batch_steps)  # the test protocol of the run's table
        written.append(out / "trajectories.png")
    return written


def plot_success_per_task(runs: Mapping[str, Mapping[str, list[float]] | None], path: str | Path, title: str,
                          steps: int | None = None) -> bool:
    """Meta-World: the test success rate of each skill before adaptation and after ``steps``
    policy-gradient steps (default: the last measured), one panel per policy.

    Args:
        runs: policy name -> ``{skill: success rate after 0..k steps}`` (a run's
            ``results.json`` ``runs[name]["success_per_class"]``; ML10: the 5 held-out skills; a
            policy with ``None`` or no skills is left out).
        path: the figure's file.
        title: the figure's title.
        steps: the adaptation steps of the second bar of each skill.

    Returns:
        False (and draws nothing) when no run measured success per skill.
    """
    shown = {name: per_class for name, per_class in runs.items() if per_class}
    if not shown:
        return False
    width = max(3.5, 1.1 * max(len(r) for r in shown.values()) + 1.5)
    fig, axes = plt.subplots(1, len(shown), figsize=(width * len(shown), 3.4), squeeze=False, sharey=True)
    for ax, (name, per_class) in zip(axes[0], shown.items(), strict=True):
        skills = list(per_class)
        k = len(next(iter(per_class.values()))) - 1 if steps is None else steps
        x = range(len(skills))
        before = [per_class[s][0] for s in skills]
        after = [per_class[s][k] for s in skills]
        ax.bar([i - 0.2 for i in x], before, width=0.4, color="tab:gray", label="pre-update")
        ax.bar([i + 0.2 for i in x], after, width=0.4, color="tab:blue", label=f"after {k} step{'s' * (k != 1)}")
        ax.set_xticks(list(x))
        ax.set_xticklabels(skills, rotation=30, ha="right", fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("test success rate")
    fig.suptitle(title, fontsize=9)
    save_figure(fig, path)
    return True
