"""Meta-testing: the metric on a fixed set of tasks after 0..k adaptation steps, with 95% CIs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from innerloop.algorithms.base import Algorithm
from innerloop.runtime import tune_malloc
from innerloop.tasks import Split, TaskFamily
from innerloop.training.distributed import gather_rows, shard


@dataclass(frozen=True)
class StepStats:
    """Mean and 95% confidence half-width of a per-task metric."""

    mean: float
    ci95: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.ci95:.3f}"


def mean_ci95(values: torch.Tensor) -> StepStats:
    """Mean and 1.96 standard errors of ``values [tasks]`` (normal approximation; use >= 600
    tasks as the few-shot literature does)."""
    v = values.double()
    n = v.numel()
    sem = float(v.std(unbiased=True)) / math.sqrt(n) if n > 1 else float("nan")
    return StepStats(float(v.mean()), 1.96 * sem)


@dataclass(frozen=True)
class EvalResult:
    """Per-step statistics of a meta-test.

    Attributes:
        metric: the metric's name (``mse`` or ``accuracy``).
        tasks: number of tasks.
        per_step: ``per_step[k]`` is the metric after ``k`` adaptation steps.
        loss_per_step: the query loss after ``k`` steps.
    """

    metric: str
    tasks: int
    per_step: list[StepStats]
    loss_per_step: list[StepStats]

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "tasks": self.tasks,
            "per_step": [{"step": k, "mean": s.mean, "ci95": s.ci95} for k, s in enumerate(self.per_step)],
            "loss_per_step": [{"step": k, "mean": s.mean, "ci95": s.ci95}
                              for k, s in enumerate(self.loss_per_step)],
        }


def meta_test(
    algorithm: Algorithm,
    family: TaskFamily,
    split: Split = "test",
    tasks: int = 600,
    steps: int = 10,
    chunk: int = 100,
) -> EvalResult:
    """Evaluate on tasks ``0..tasks-1`` of ``split`` (a fixed set: every algorithm and run sees
    the same tasks). Tasks are processed ``chunk`` at a time to bound memory. Under
    ``torch.distributed`` each rank evaluates a disjoint share and every rank gets the result."""
    if tasks < 1:
        raise ValueError(f"meta-test needs >= 1 task, got {tasks}.")
    tune_malloc()
    mine = shard(range(tasks))  # all tasks in one process; a disjoint share of them per rank
    was_training = algorithm.training
    algorithm.eval()
    try:
        rows = [torch.empty(0, 2, steps + 1)]
        for start in range(0, len(mine), chunk):
            scores = algorithm.evaluate(family.batch(split, mine[start : start + chunk]), steps)
            rows.append(torch.stack([scores["loss"], scores[algorithm.metric_name]], dim=1).float().cpu())
    finally:
        algorithm.train(was_training)
    both = gather_rows(torch.cat(rows))
    lo, m = both[:, 0], both[:, 1]
    return EvalResult(
        algorithm.metric_name, tasks,
        [mean_ci95(m[:, k]) for k in range(steps + 1)],
        [mean_ci95(lo[:, k]) for k in range(steps + 1)],
    )
