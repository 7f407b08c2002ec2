"""Meta-testing: the metric on a fixed set of tasks after 0..k adaptation steps, with 95% CIs;
and the report of a whole run (``results.json``, ``results.md``), written once for every kind of run."""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn

from innerloop.algorithms.base import Algorithm
from innerloop.io import atomic_write_text
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


def format_table(rows: Mapping[str, EvalResult], steps: list[int], title: str) -> str:
    """A Markdown table: one row per algorithm, one column per number of adaptation steps."""
    metric = next(iter(rows.values())).metric
    head = "| algorithm | " + " | ".join(f"{metric} after {k} step{'s' * (k != 1)}" for k in steps) + " |"
    lines = [title, "", head, "|---" * (len(steps) + 1) + "|"]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(res.per_step[k]) for k in steps) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """The software and processor a run was measured on (for its report)."""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}


A = TypeVar("A", bound=nn.Module)
F = TypeVar("F")


@dataclass(frozen=True)
class RunResult(Mapping[str, Any], Generic[A, F]):
    """What a whole run ended with: as a mapping, the report it wrote to ``results.json``
    (``result["table"]``, ``result["runs"]``, ...); as attributes, what its plots need.

    Attributes:
        report: the JSON report (config, machine, per-run numbers, the table).
        results: the meta-test result of every trained (or untrained) algorithm, by name.
        trained: the algorithms themselves (best-on-validation weights where there is validation).
        test_family: the family they were tested on.
        title: the title of the table (and of the adaptation plot).
        out_dir: the run folder.
    """

    report: dict[str, Any]
    results: dict[str, EvalResult]
    trained: dict[str, A]
    test_family: F
    title: str
    out_dir: Path

    @property
    def table(self) -> str:
        """The Markdown table of ``results`` (also ``results.md``)."""
        return str(self.report["table"])

    def __getitem__(self, key: str) -> Any:
        return self.report[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.report)

    def __len__(self) -> int:
        return len(self.report)


def write_results(result: RunResult[Any, Any]) -> None:
    """Write ``results.json`` (the report) and ``results.md`` (the table) into the run folder, atomically."""
    atomic_write_text(result.out_dir / "results.json", json.dumps(result.report, indent=2))
    atomic_write_text(result.out_dir / "results.md", result.table + "\n")
