"""N-way K-shot episodes over class-indexed image datasets, and a multi-process meta-batch loader.

Task ``i`` of a split is drawn by a :class:`torch.Generator` seeded with
``task_seed(seed, split, i)``: the same family seed, split and index always give the same
classes, images and label order, in any process, so loading in worker processes changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from innerloop.data.images import ImageClassDataset
from innerloop.tasks import Objective, Split, Task, TaskBatch, TaskFamily, check_split, task_seed

__all__ = ["FewShotClassification", "TaskIndexDataset", "collate_tasks", "task_loader"]


def _check_count(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return value


class FewShotClassification:
    """N-way K-shot classification tasks drawn from per-split class-indexed datasets.

    A task picks ``ways`` distinct classes of the split in a random order - class ``j`` of that
    order gets label ``j`` - and ``shots + queries`` distinct images of each, the first ``shots``
    for the support and the others for the query (so support and query never share an image).

    Shapes of :meth:`task`: ``support_x [ways*shots, C, H, W]`` float32, ``support_y [ways*shots]``
    int64 in ``0..ways-1``, ``query_x [ways*queries, C, H, W]``, ``query_y [ways*queries]``;
    examples are grouped by class (labels ``0,0,..,1,1,..``).

    Args:
        dataset_splits: ``{split: ImageClassDataset}``, e.g. :class:`~innerloop.data.omniglot.Omniglot`;
            every split present is checked here, before any sampling.
        ways: classes per task (N).
        shots: support images per class (K).
        queries: query images per class.
        seed: the family seed.
        within_alphabet: draw all classes of a task from one group (the Omniglot alphabet): the group
            is chosen uniformly among those with at least ``ways`` classes. One flag for every split,
            or ``{split: flag}`` (a split left out: ``False``), e.g. ``{"test": True}``.
        distinct_drawers: draw the support and query images by drawer (Lake et al. 2015's one-shot
            runs): a task picks ``shots`` support drawers and ``queries`` other query drawers among
            the drawers every class of the task has, and every class shows the images of those
            drawers (support image ``k`` of every class by support drawer ``k``, query image ``k``
            by query drawer ``k``). One flag for every split, or ``{split: flag}``.
        drawers: ``{split: drawer ids}`` for the splits with ``distinct_drawers``: the drawer of every
            row of that split's ``data``, int64 ``[len(data)]`` (e.g. :meth:`Omniglot.drawer_ids
            <innerloop.data.omniglot.Omniglot.drawer_ids>`).
    """

    objective: Objective = "classification"

    def __init__(
        self,
        dataset_splits: Mapping[str, ImageClassDataset],
        ways: int = 5,
        shots: int = 1,
        queries: int = 15,
        seed: int = 0,
        within_alphabet: bool | Mapping[str, bool] = False,
        distinct_drawers: bool | Mapping[str, bool] = False,
        drawers: Mapping[str, Tensor] | None = None,
    ) -> None:
        self.ways = _check_count("ways (N)", ways)
        self.shots = _check_count("shots (K)", shots)
        self.queries = _check_count("queries", queries)
        self.seed = int(seed)
        if isinstance(within_alphabet, Mapping):
            for split in within_alphabet:
                check_split(split)
            self._within = {s: bool(within_alphabet.get(s, False)) for s in dataset_splits}
        else:
            self._within = {s: bool(within_alphabet) for s in dataset_splits}
        self.within_alphabet: bool | dict[str, bool] = (
            dict(within_alphabet) if isinstance(within_alphabet, Mapping) else bool(within_alphabet))
        """As given: one flag for every split, or ``{split: flag}``; :meth:`within` reads one split's."""
        if isinstance(distinct_drawers, Mapping):
            for split in distinct_drawers:
                check_split(split)
            self._by_drawer = {s: bool(distinct_drawers.get(s, False)) for s in dataset_splits}
        else:
            self._by_drawer = {s: bool(distinct_drawers) for s in dataset_splits}
        self.distinct_drawers: bool | dict[str, bool] = (
            dict(distinct_drawers) if isinstance(distinct_drawers, Mapping) else bool(distinct_drawers))
        """As given: one flag for every split, or ``{split: flag}``."""
        self._drawers: dict[str, list[dict[int, int]]] = {}  # split -> per class {drawer: first image index}
        self._given_drawers = dict(drawers or {})
        self.splits: dict[str, ImageClassDataset] = {}
        self._groups: dict[str, list[Tensor]] = {}
        for split in dataset_splits:
            check_split(split)
            self.splits[split] = ds = dataset_splits[split]
            self._validate(split, ds)

    def _validate(self, split: str, ds: ImageClassDataset) -> None:
        per_task = self.shots + self.queries
        if ds.num_classes < self.ways:
            raise ValueError(
                f"{self.ways}-way tasks need {self.ways} classes but the {split} split has only "
                f"{ds.num_classes}; use ways <= {ds.num_classes}."
            )
        if ds.num_classes:
            smallest = int(ds.counts.argmin())
            fewest = int(ds.counts[smallest])
            if fewest < per_task:
                raise ValueError(
                    f"shots + queries = {self.shots} + {self.queries} = {per_task} images per class, but class "
                    f"{ds.names[smallest]!r} of the {split} split has only {fewest}; "
                    f"use shots + queries <= {fewest}."
                )
        if self._within[split]:
            groups = [torch.tensor(ix) for ix in ds.group_classes().values() if len(ix) >= self.ways]
            if not groups:
                largest = max((len(ix) for ix in ds.group_classes().values()), default=0)
                raise ValueError(
                    f"within-alphabet {self.ways}-way tasks need a group (alphabet) with {self.ways} classes, "
                    f"but the largest group of the {split} split has {largest}; use ways <= {largest} "
                    f"or within_alphabet=False for the {split} split."
                )
            self._groups[split] = groups
        if self._by_drawer[split]:
            self._drawers[split] = self._drawer_index(split, ds)

    def _drawer_index(self, split: str, ds: ImageClassDataset) -> list[dict[int, int]]:
        ids = self._given_drawers.get(split)
        if ids is None:
            raise ValueError(f"distinct_drawers for the {split} split needs the drawer of every image: pass "
                             "drawers={split: ids} (Omniglot: drawers=omniglot.drawer_ids()), or set "
                             f"distinct_drawers=False for the {split} split.")
        ids = torch.as_tensor(ids, dtype=torch.int64).reshape(-1)
        if ids.numel() != len(ds.data):
            raise ValueError(f"drawers[{split!r}] holds {ids.numel()} ids but the {split} split stores "
                             f"{len(ds.data)} images; give one drawer per stored image (row of data).")
        per_task = self.shots + self.queries
        out: list[dict[int, int]] = []
        for c in range(ds.num_classes):
            start, count = int(ds.starts[c]), int(ds.counts[c])
            index: dict[int, int] = {}
            for j, d in enumerate(ids[start : start + count].tolist()):
                if d < 0:
                    raise ValueError(f"image {j} of class {ds.names[c]!r} ({split} split) has no drawer id; "
                                     "distinct_drawers needs Omniglot's IIII_DD.png names, or set it False.")
                index.setdefault(d, j)
            if len(index) < per_task:
                raise ValueError(
                    f"distinct_drawers: shots + queries = {per_task} drawers per task, but class "
                    f"{ds.names[c]!r} of the {split} split was drawn by only {len(index)}; use shots + "
                    f"queries <= {len(index)} or distinct_drawers=False.")
            out.append(index)
        return out

    def drawers_of(self, split: Split, index: int) -> tuple[list[int], list[int]]:
        """``(support drawers, query drawers)`` of task ``index`` of a ``distinct_drawers`` split."""
        if not self._by_drawer.get(split, False):
            raise ValueError(f"the {split} split does not draw by drawer (distinct_drawers is off for it).")
        classes, g = self._draw(split, index)
        chosen = self._pick_drawers(split, classes, g)
        return chosen[: self.shots], chosen[self.shots :]

    def _pick_drawers(self, split: str, classes: list[int], g: torch.Generator) -> list[int]:
        tables = self._drawers[split]
        common = sorted(set.intersection(*(set(tables[c]) for c in classes)))
        per_task = self.shots + self.queries
        if len(common) < per_task:
            ds = self.splits[split]
            raise ValueError(f"distinct_drawers: the classes {[ds.names[c] for c in classes][:5]} ... share only "
                             f"{len(common)} drawers, fewer than shots + queries = {per_task}; use fewer shots "
                             "or queries, or distinct_drawers=False.")
        order = torch.randperm(len(common), generator=g)[:per_task]
        return [common[int(i)] for i in order]

    def within(self, split: str) -> bool:
        """Whether the tasks of ``split`` draw their classes from one group (alphabet)."""
        return self._within.get(split, False)

    def _dataset(self, split: str) -> ImageClassDataset:
        check_split(split)
        if split not in self.splits:
            raise KeyError(f"no {split!r} split in this task family; it has {', '.join(self.splits) or 'none'}.")
        return self.splits[split]

    def classes_of(self, split: Split, index: int) -> list[int]:
        """The class indices (into ``splits[split]``) of task ``index``, in label order."""
        return self._draw(split, index)[0]

    def _draw(self, split: Split, index: int) -> tuple[list[int], torch.Generator]:
        ds = self._dataset(split)
        g = torch.Generator().manual_seed(task_seed(self.seed, split, index, "FewShotClassification"))
        if self._within[split]:
            groups = self._groups[split]
            pool = groups[int(torch.randint(len(groups), (1,), generator=g))]
            classes = pool[torch.randperm(len(pool), generator=g)[: self.ways]]
        else:
            classes = torch.randperm(ds.num_classes, generator=g)[: self.ways]
        return classes.tolist(), g

    def task(self, split: Split, index: int) -> Task:
        """Task ``index`` of ``split`` (shapes in the class docstring)."""
        ds = self._dataset(split)
        classes, g = self._draw(split, index)
        per_task = self.shots + self.queries
        if self._by_drawer[split]:
            chosen = self._pick_drawers(split, classes, g)
            tables = self._drawers[split]
            picks = torch.tensor([[tables[c][d] for d in chosen] for c in classes], dtype=torch.int64)
        else:
            picks = torch.stack([torch.randperm(ds.num_images(c), generator=g)[:per_task] for c in classes])
        labels = torch.arange(self.ways, dtype=torch.int64)
        cls = torch.tensor(classes, dtype=torch.int64)
        # rows laid out as [all support (class-major), all query (class-major)]: one gather, no copies
        x = ds.gather(
            torch.cat([cls.repeat_interleave(self.shots), cls.repeat_interleave(self.queries)]),
            torch.cat([picks[:, : self.shots].reshape(-1), picks[:, self.shots :].reshape(-1)]),
        )
        n = self.ways * self.shots
        return Task(x[:n], labels.repeat_interleave(self.shots), x[n:], labels.repeat_interleave(self.queries))

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` of ``split`` stacked: ``support_x [len(indices), ways*shots, C, H, W]``, ..."""
        return TaskBatch.stack([self.task(split, int(i)) for i in indices])

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={d.num_classes}" for s, d in self.splits.items())
        return (
            f"FewShotClassification({self.ways}-way {self.shots}-shot, {self.queries} queries, seed={self.seed}, "
            f"within_alphabet={self.within_alphabet}"
            + (f", distinct_drawers={self.distinct_drawers}" if self.distinct_drawers else "")
            + f"; classes: {sizes})"
        )


class TaskIndexDataset(Dataset[Task]):
    """Tasks ``start, start+1, ...`` of one split as a map-style dataset: item ``i`` is task ``start + i``."""

    def __init__(self, family: TaskFamily, split: Split, num_tasks: int, start: int = 0) -> None:
        check_split(split)
        if num_tasks < 0 or start < 0:
            raise ValueError(f"num_tasks and start must be >= 0, got {num_tasks} and {start}.")
        self.family, self.split, self.num_tasks, self.start = family, split, num_tasks, start

    def __len__(self) -> int:
        return self.num_tasks

    def __getitem__(self, i: int) -> Task:
        if not 0 <= i < self.num_tasks:
            raise IndexError(f"task {i} out of range for {self.num_tasks} tasks.")
        return self.family.task(self.split, self.start + i)


def collate_tasks(tasks: Sequence[Task]) -> TaskBatch:
    """Stack tasks into a :class:`TaskBatch` (the DataLoader collate function)."""
    return TaskBatch.stack(list(tasks))


def task_loader(
    family: TaskFamily,
    split: Split,
    meta_batch_size: int,
    num_batches: int,
    start_batch: int = 0,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    multiprocessing_context: Any = None,
) -> DataLoader[Task]:
    """A DataLoader of meta-batches: batch ``b`` stacks tasks ``b*meta_batch_size ... (b+1)*meta_batch_size - 1``.

    Tasks are built in ``num_workers`` worker processes (0: in the calling process) and
    delivered in order; since every task is a function of (seed, split, index) the batches are
    the same for any ``num_workers``. ``start_batch`` resumes a run at batch ``start_batch``.

    Yields:
        :class:`TaskBatch` with ``support_x [meta_batch_size, ways*shots, C, H, W]`` etc.
    """
    _check_count("meta_batch_size", meta_batch_size)
    if num_batches < 0 or start_batch < 0 or num_workers < 0:
        raise ValueError(
            "num_batches, start_batch and num_workers must be >= 0, got "
            f"{num_batches}, {start_batch}, {num_workers}."
        )
    dataset = TaskIndexDataset(family, split, num_batches * meta_batch_size, start_batch * meta_batch_size)
    extra: dict[str, Any] = {}
    if num_workers > 0:
        extra["persistent_workers"] = persistent_workers
        if prefetch_factor is not None:
            extra["prefetch_factor"] = prefetch_factor
        if multiprocessing_context is not None:
            extra["multiprocessing_context"] = multiprocessing_context
    return DataLoader(
        dataset,
        batch_size=meta_batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_tasks,
        pin_memory=pin_memory,
        drop_last=False,
        **extra,
    )


if TYPE_CHECKING:  # static check (mypy): the image task families are TaskFamilies
    from innerloop.data.global_labels import GlobalLabelBatches

    _FAMILY_TYPES: tuple[type[TaskFamily], ...] = (FewShotClassification, GlobalLabelBatches)


IMAGE_FAMILIES: tuple[str, ...] = (
    "omniglot", "miniimagenet", "image-folder", "cifar-fs", "fc100", "cub", "tiered-imagenet"
)
"""The few-shot image families a config can name (``task.family``)."""
