"""Figures people would rather see than read: fits before/after adaptation, metric vs steps.

Training imports none of this: a run returns a :class:`~innerloop.training.evaluate.RunResult`
and the command line draws its figures with :func:`plot_run`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from innerloop.algorithms.base import GradientBased
from innerloop.data.regression import Sinusoid
from innerloop.io import atomic_write_bytes
from innerloop.training.config import Config
from innerloop.training.evaluate import EvalResult, RunResult


def save_figure(fig: plt.Figure, path: str | Path) -> None:
    """Write ``fig`` as a PNG to ``path`` atomically and close it."""
    atomic_write_bytes(Path(path), lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def plot_regression_fits(
    algorithms: Mapping[str, GradientBased],
    family: Sinusoid,
    path: str | Path,
    tasks: int = 3,
    steps: Sequence[int] = (1, 10),
) -> None:
    """Like Figure 2 of the MAML paper: for a few test tasks (rows) and each algorithm
    (columns), the true curve, the K support points, and the predictions before and after
    ``steps`` gradient steps on the support set."""
    lo, hi = family.x_range
    x = torch.linspace(lo, hi, 200).unsqueeze(-1)
    fig, axes = plt.subplots(tasks, len(algorithms), figsize=(4.2 * len(algorithms), 2.8 * tasks),
                             squeeze=False, sharex=True)
    colours = plt.cm.viridis_r([0.15 + 0.7 * i / max(1, len(steps)) for i in range(len(steps) + 1)])
    for row in range(tasks):
        task = family.task("test", row)
        amp, phase = family.parameters_of("test", row)
        truth = family.curve(x.double(), amp, phase).float()
        for col, (name, alg) in enumerate(algorithms.items()):
            ax = axes[row][col]
            params = {n: p.detach() for n, p in alg.params().items()}
            one = (task.support_x, task.support_y, x, x)
            with torch.no_grad():  # the algorithm's own test-time inner loop
                preds = {0: alg.predict(alg.model, params, x)}
                for k, p in enumerate(alg.eval_trajectory(alg.model, params, one, max(steps)), start=1):
                    if k in steps:
                        preds[k] = alg.predict(alg.model, p, x)
            ax.plot(x, truth, color="tab:red", lw=2, label="ground truth")
            for c, (k, pred) in zip(colours, preds.items(), strict=True):
                label = "pre-update" if k == 0 else f"after {k} step{'s' * (k != 1)}"
                ax.plot(x, pred, color=c, ls="--" if k == 0 else "-", label=label)
            ax.scatter(task.support_x, task.support_y, marker="^", color="k", zorder=5,
                       label=f"{len(task.support_x)} support points")
            if row == 0:
                ax.set_title(name)
            if row == 0 and col == 0:
                ax.legend(fontsize=7, loc="lower left")
    fig.suptitle("Adaptation to held-out test tasks")
    save_figure(fig, path)


def plot_adaptation_curves(results: Mapping[str, EvalResult], path: str | Path, title: str) -> None:
    """The metric (mean and 95% CI band) against the number of adaptation steps."""
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, res in results.items():
        steps = range(len(res.per_step))
        mean = [s.mean for s in res.per_step]
        ci = [s.ci95 for s in res.per_step]
        ax.plot(steps, mean, marker="o", ms=3, label=name)
        ax.fill_between(steps, [m - c for m, c in zip(mean, ci, strict=True)],
                        [m + c for m, c in zip(mean, ci, strict=True)], alpha=0.25)
    metric = next(iter(results.values())).metric
    ax.set_xlabel("adaptation steps on the support set")
    ax.set_ylabel(f"query {metric}")
    ax.set_title(title, fontsize=8)
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def plot_run(result: RunResult[Any, Any], cfg: Config) -> list[Path]:
    """The figures of a supervised run (:func:`innerloop.training.run.run`) in its folder:
    ``adaptation.png``, and ``fits.png`` for a regression family with known curves. Returns their paths."""
    e, out = cfg.eval, result.out_dir
    written = []
    if e.plot_tasks > 0 and hasattr(result.test_family, "parameters_of"):
        plot_regression_fits(result.trained, result.test_family, out / "fits.png", e.plot_tasks,
                             steps=(1, e.steps) if e.steps > 1 else (e.steps,))
        written.append(out / "fits.png")
    plot_adaptation_curves(result.results, out / "adaptation.png", result.title)
    return [*written, out / "adaptation.png"]
