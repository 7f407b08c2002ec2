"""Tasks, meta-batches of tasks, and the task-family protocol.

A *task* is a small supervised problem with a support split (the data the learner adapts on)
and a query split (the data the adapted learner is scored on). A *meta-batch* stacks several
tasks of the same shape along a leading ``tasks`` dimension so that an algorithm can process
them as one vectorised computation.

A *task family* is a distribution of tasks with three disjoint splits (``train``, ``val``,
``test``). Task ``i`` of a split is a deterministic function of the family's seed, the split
and ``i``: test sets are fixed and results are comparable across runs and algorithms.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

Split = Literal["train", "val", "test"]
SPLITS: tuple[Split, ...] = ("train", "val", "test")
Objective = Literal["regression", "classification"]


def _check_pair(name: str, x: Tensor, y: Tensor, batched: bool) -> None:
    lead = 2 if batched else 1
    what = "[tasks, examples, ...]" if batched else "[examples, ...]"
    if x.dim() < lead or y.dim() < lead:
        raise ValueError(
            f"{name}: x has shape {tuple(x.shape)} and y has shape {tuple(y.shape)}; both need "
            f"at least {lead} dimension(s), laid out as {what}."
        )
    if x.shape[:lead] != y.shape[:lead]:
        raise ValueError(
            f"{name}: x has shape {tuple(x.shape)} but y has shape {tuple(y.shape)}; their leading "
            f"{what[:-6]}] dimensions must match (one target per example)."
        )


def _check_splits(support: tuple[Tensor, Tensor], query: tuple[Tensor, Tensor], lead: int) -> None:
    (sx, sy), (qx, qy) = support, query
    if sx.shape[lead:] != qx.shape[lead:]:
        raise ValueError(
            f"support x has example shape {tuple(sx.shape[lead:])} but query x has "
            f"{tuple(qx.shape[lead:])}; support and query must hold the same kind of input."
        )
    if sy.shape[lead:] != qy.shape[lead:] or sy.dtype != qy.dtype:
        raise ValueError(
            f"support y is {tuple(sy.shape[lead:])} {sy.dtype} per example but query y is "
            f"{tuple(qy.shape[lead:])} {qy.dtype}; support and query targets must match."
        )


@dataclass(frozen=True)
class Task:
    """One task.

    Attributes:
        support_x: ``[support, *input_shape]`` inputs the learner adapts on.
        support_y: ``[support, *target_shape]`` targets (float for regression, int64 labels for
            classification).
        query_x: ``[query, *input_shape]`` inputs the adapted learner is scored on.
        query_y: ``[query, *target_shape]``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        _check_pair("support", self.support_x, self.support_y, batched=False)
        _check_pair("query", self.query_x, self.query_y, batched=False)
        _check_splits((self.support_x, self.support_y), (self.query_x, self.query_y), lead=1)


@dataclass(frozen=True)
class TaskBatch:
    """A meta-batch: tasks of equal shape stacked along a leading ``tasks`` dimension.

    Attributes:
        support_x: ``[tasks, support, *input_shape]``.
        support_y: ``[tasks, support, *target_shape]``.
        query_x: ``[tasks, query, *input_shape]``.
        query_y: ``[tasks, query, *target_shape]``.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        _check_pair("support", self.support_x, self.support_y, batched=True)
        _check_pair("query", self.query_x, self.query_y, batched=True)
        if self.support_x.shape[0] != self.query_x.shape[0]:
            raise ValueError(
                f"support holds {self.support_x.shape[0]} tasks but query holds "
                f"{self.query_x.shape[0]}; both splits must stack the same tasks."
            )
        _check_splits((self.support_x, self.support_y), (self.query_x, self.query_y), lead=2)

    @staticmethod
    def stack(tasks: Sequence[Task]) -> TaskBatch:
        """Stack tasks of equal shape into a meta-batch."""
        if not tasks:
            raise ValueError("cannot stack an empty list of tasks; a meta-batch needs >= 1 task.")
        shapes = {(t.support_x.shape, t.query_x.shape) for t in tasks}
        if len(shapes) != 1:
            raise ValueError(
                f"tasks of different shapes cannot be stacked: found {sorted(map(str, shapes))}; "
                "sample every task of a meta-batch with the same shots and queries."
            )
        return TaskBatch(
            torch.stack([t.support_x for t in tasks]),
            torch.stack([t.support_y for t in tasks]),
            torch.stack([t.query_x for t in tasks]),
            torch.stack([t.query_y for t in tasks]),
        )

    def __len__(self) -> int:
        return self.support_x.shape[0]

    def task(self, i: int) -> Task:
        """Task ``i`` of the batch."""
        return Task(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i])

    def __getitem__(self, index: slice) -> TaskBatch:
        """A sub-batch (``batch[a:b]``), e.g. one rank's shard of a meta-batch."""
        return TaskBatch(
            self.support_x[index], self.support_y[index], self.query_x[index], self.query_y[index]
        )

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None, *,
           non_blocking: bool = False) -> TaskBatch:
        """Move to a device; ``dtype`` converts floating-point tensors only (labels stay int64).
        ``non_blocking``: an asynchronous copy (from pinned memory, see :meth:`pin_memory`)."""

        def conv(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if t.is_floating_point() else None, non_blocking=non_blocking)

        return TaskBatch(*(conv(t) for t in (self.support_x, self.support_y, self.query_x, self.query_y)))

    def pin_memory(self) -> TaskBatch:
        """The batch in page-locked host memory, so that ``to(cuda, non_blocking=True)`` overlaps with
        compute (needs CUDA; returns ``self`` where pinning is not available)."""
        if not torch.cuda.is_available():
            return self
        return TaskBatch(*(t.pin_memory() for t in (self.support_x, self.support_y, self.query_x, self.query_y)))


@runtime_checkable
class TaskFamily(Protocol):
    """A distribution of tasks with disjoint ``train`` / ``val`` / ``test`` splits.

    ``task(split, i)`` must be deterministic in (family seed, split, i).

    ``objective`` and ``seed`` are read-only members: a family may provide them as plain
    attributes (annotate ``objective: Objective``, or a bare ``"regression"`` is inferred as
    ``str``) or as properties.
    """

    @property
    def objective(self) -> Objective:
        """``"regression"`` or ``"classification"``: the loss and metric algorithms use."""
        ...

    @property
    def seed(self) -> int:
        """The family seed that, with the split and index, determines every task."""
        ...

    def task(self, split: Split, index: int) -> Task: ...

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch: ...


def task_seed(seed: int, split: str, index: int, salt: str = "") -> int:
    """A 63-bit seed for task ``index`` of ``split``: stable across runs, platforms and Pythons."""
    if index < 0:
        raise ValueError(f"task index must be >= 0, got {index}.")
    digest = hashlib.blake2b(f"{salt}|{seed}|{split}|{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}.")
