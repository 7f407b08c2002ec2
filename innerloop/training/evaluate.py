"""Meta-testing: the metric on a fixed set of tasks after 0..k adaptation steps, with 95% CIs;
and the report of a whole run (``results.json``, ``results.md``), written once for every kind of run."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch
from torch import nn
from tqdm.auto import tqdm

from innerloop.algorithms.base import Algorithm, ObjectiveFns
from innerloop.data.augment import Augment
from innerloop.io import atomic_write_text
from innerloop.numerics import student_t_quantile
from innerloop.tasks import Split, TaskFamily
from innerloop.training.device import place, to_device
from innerloop.training.distributed import gather_rows, rank, shard


@dataclass(frozen=True)
class StepStats:
    """Mean and 95% confidence half-width of a per-task metric."""

    mean: float
    ci95: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} ± {self.ci95:.3f}"


CI_METHOD = "95% confidence interval of the mean over tasks, Student t with n - 1 degrees of freedom"
"""How every ``±`` of innerloop's tables is computed (named under each table)."""


def mean_ci95(values: torch.Tensor) -> StepStats:
    """Mean of ``values [tasks]`` and the half-width of its 95% confidence interval: ``t * s / sqrt(n)``
    with ``t`` the 0.975 quantile of Student's t with ``n - 1`` degrees of freedom (1.964 for 600
    tasks, 2.023 for 40, where the normal 1.96 would be 3% too narrow). NaN for one task."""
    v = values.double()
    n = v.numel()
    if n < 2:
        return StepStats(float(v.mean()), float("nan"))
    sem = float(v.std(unbiased=True)) / math.sqrt(n)
    return StepStats(float(v.mean()), student_t_quantile(0.975, n - 1) * sem)


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


def tta_objective(fns: ObjectiveFns, copies: int) -> ObjectiveFns:
    """``fns`` with its metric scored on predictions averaged over ``copies`` copies of each query.

    The query predictions ``pred [copies * q, ...]`` are laid out copy-major (rows ``j*q .. (j+1)*q - 1``:
    copy ``j``, as :func:`~innerloop.data.augment.tta_batch` lays them out) and ``target``'s first ``q`` rows
    are the labels. Classification: the class probabilities (softmax) are averaged and the metric gets their
    log (a valid logit); regression: the predictions are averaged. The loss is unchanged (it adapts on the
    support and scores each query copy: the loss column under TTA is the mean over copies)."""
    if copies == 1:
        return fns
    metric, kind = fns.metric, fns.kind

    def averaged(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if pred.shape[0] % copies:
            raise ValueError(f"test-time augmentation: {pred.shape[0]} query predictions are not {copies} copies "
                             "of the same queries; build the tasks with innerloop.data.augment.tta_batch.")
        q = pred.shape[0] // copies
        per_copy = pred.reshape(copies, q, *pred.shape[1:])
        if kind == "classification":
            mean = torch.logsumexp(torch.log_softmax(per_copy, dim=-1), dim=0) - math.log(copies)
        else:
            mean = per_copy.mean(0)
        return metric(mean, target[:q])

    return dataclasses.replace(fns, metric=averaged)


def tta_note(copies: int, aug: Augment) -> str:
    """What a results table says of test-time augmentation: ``none``, or the copies and the distortions."""
    if copies == 1:
        return "none"
    return (f"{copies} copies per task (the task and {copies - 1} distorted: {aug.describe()}); support copies "
            "pooled, query class probabilities averaged")


def meta_test(
    algorithm: Algorithm,
    family: TaskFamily,
    split: Split = "test",
    tasks: int = 600,
    steps: int = 10,
    chunk: int = 100,
    *,
    device: torch.device | None = None,
    progress: bool = True,
    desc: str | None = None,
) -> EvalResult:
    """Evaluate on tasks ``0..tasks-1`` of ``split`` (a fixed set: every algorithm and run sees
    the same tasks). Tasks are processed ``chunk`` at a time to bound memory. Under
    ``torch.distributed`` each rank evaluates a disjoint share and every rank gets the result.

    It runs on the algorithm's ``execution.device`` (resolved before any work, the algorithm moved
    there; ``device``: already resolved, as by :func:`~innerloop.training.loop.meta_train`) in its
    ``execution.precision``; each batch follows it, and the statistics come back on the CPU (per-task
    scores in float64, whatever the model's dtype).

    ``progress``: a progress bar over the tasks (``desc`` its label, default ``meta-test <split>``), on
    the lead process, where stderr is a terminal (tqdm's rule); ``False``: none.

    A family with ``tta_copies > 1`` (:class:`~innerloop.data.augment.TTAFamily`) is scored with test-time
    augmentation: the metric is that of each query's predictions averaged over its copies
    (:func:`tta_objective`)."""
    if tasks < 1:
        raise ValueError(f"meta-test needs >= 1 task, got {tasks}.")
    if device is None:
        device = place(algorithm, algorithm.execution.device, algorithm.execution.precision)
    mine = shard(range(tasks))  # all tasks in one process; a disjoint share of them per rank
    # a family whose tasks differ in shape (Meta-Dataset episodes) stacks at most max_meta_batch at once
    chunk = min(chunk, int(getattr(family, "max_meta_batch", chunk)))
    was_training = algorithm.training
    fns = algorithm.fns
    copies = int(getattr(family, "tta_copies", 1))
    bar = tqdm(total=len(mine), desc=desc or f"meta-test {split}", unit="task", leave=False,
               dynamic_ncols=True, disable=None if progress and rank() == 0 else True)
    algorithm.fns = tta_objective(fns, copies)  # swapped back in `finally`, whatever fails after this line
    algorithm.eval()
    try:
        rows = [torch.empty(0, 2, steps + 1, dtype=torch.float64, device="cpu")]
        for start in range(0, len(mine), chunk):
            batch = to_device(family.batch(split, mine[start : start + chunk]), device)
            scores = algorithm.evaluate(batch, steps)
            both = torch.stack([scores["loss"], scores[algorithm.metric_name]], dim=1)
            rows.append(both.to("cpu", torch.float64))
            bar.update(len(both))
    finally:
        bar.close()
        algorithm.train(was_training)
        algorithm.fns = fns
    both = gather_rows(torch.cat(rows))
    lo, m = both[:, 0], both[:, 1]
    return EvalResult(
        algorithm.metric_name, tasks,
        [mean_ci95(m[:, k]) for k in range(steps + 1)],
        [mean_ci95(lo[:, k]) for k in range(steps + 1)],
    )


def format_table(rows: Mapping[str, EvalResult], steps: list[int], title: str, note: str = "") -> str:
    """A Markdown table: one row per algorithm, one column per number of adaptation steps; ``note``
    (e.g. :func:`run_note`: device, precision, BatchNorm policy) is a line between title and table."""
    metric = next(iter(rows.values())).metric
    head = "| algorithm | " + " | ".join(f"{metric} after {k} step{'s' * (k != 1)}" for k in steps) + " |"
    lines = [title, "", *([note, ""] if note else []), head, "|---" * (len(steps) + 1) + "|"]
    for name, res in rows.items():
        lines.append(f"| {name} | " + " | ".join(str(res.per_step[k]) for k in steps) + " |")
    tasks = sorted({res.tasks for res in rows.values()})
    lines += ["", f"Mean ± {CI_METHOD}; {', '.join(map(str, tasks))} fixed test tasks."]
    return "\n".join(lines)


def machine(device: torch.device | str | None = None) -> dict[str, Any]:
    """The software and processor a run was measured on (for its report); with a CUDA ``device``,
    also the GPU's name and CUDA's version."""
    out: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()}
    if device is not None and torch.device(device).type == "cuda":
        out.update(gpu=torch.cuda.get_device_name(torch.device(device)), cuda=torch.version.cuda)
    return out


BATCH_NORM_TEXT: dict[str, str] = {
    "batch": "batch statistics (transductive)",
    "running": "running statistics (non-transductive)",
    "per_step": "per-step running statistics (MAML++, non-transductive)",
}
"""How a results table names a BatchNorm policy (``algorithm.batch_norm``, :mod:`innerloop.norm`);
others by their name."""


def batch_norm_policy(model_norm: str | None, policy: str = "batch") -> str:
    """What a table says of BatchNorm: ``none`` for a model without it (``model.norm = "none"``, or
    ``None`` for a network that has no such option, as an MLP), else the policy's description."""
    if model_norm in (None, "none"):
        return "none"
    return BATCH_NORM_TEXT.get(policy, policy)


def run_note(device: torch.device | str, precision: str, batch_norm: str, tta: str | None = None,
             refine_steps: int = 0) -> str:
    """The line under a results table's title: ``device cpu, precision fp32, BatchNorm: none``, and with
    ``tta`` (:func:`tta_note`, for image tasks) ``, test-time augmentation: none``; ``refine_steps``
    (ProtoNets' ``transductive_steps``) ``, prototypes refined by 3 soft k-means steps on the queries
    (transductive)``."""
    note = f"device {torch.device(device)}, precision {precision}, BatchNorm: {batch_norm}"
    note = note if tta is None else f"{note}, test-time augmentation: {tta}"
    if refine_steps:
        note += f", prototypes refined by {refine_steps} soft k-means steps on the queries (transductive)"
    return note


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
