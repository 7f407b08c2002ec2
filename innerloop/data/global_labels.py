"""Ordinary supervised batches with global class labels, as a task family: what the Baseline and
Baseline++ (Chen et al. 2019) pre-train on, drawn from a few-shot family's training classes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from innerloop.data.augment import Augment, augment_labelled
from innerloop.data.images import ImageClassDataset
from innerloop.tasks import Objective, Split, Task, TaskBatch, check_split, task_seed


class GlobalLabelBatches:
    """Ordinary supervised batches with global class labels, as a task family.

    "Task" ``i`` of a split is ``examples`` distinct images drawn uniformly from all images of
    ``splits[split]`` (a deterministic function of ``(seed, split, i)``), labelled with their class
    index in that dataset; the first half is the support, the rest the query (both are training
    data here). A meta-batch of such tasks is one batch of ``tasks * examples`` images.

    With ``augment``, the ``train`` images are augmented (:func:`~innerloop.data.augment.augment_labelled`,
    seeded by ``(seed, split, i)``): rotation classes make ``4 *`` the dataset's classes, each image turned
    by ``k`` quarter turns labelled ``class + k * classes``; the affine distortions move each image.

    Args:
        splits: ``{split: ImageClassDataset}``, e.g. ``FewShotClassification.splits``.
        examples: images per task (>= 2).
        seed: the family seed.
        augment: how the ``train`` images are augmented (``None``: not at all).
    """

    objective: Objective = "classification"

    def __init__(self, splits: Mapping[str, ImageClassDataset], examples: int, seed: int = 0,
                 augment: Augment | None = None) -> None:
        if isinstance(examples, bool) or not isinstance(examples, int) or examples < 2:
            raise ValueError(f"examples per batch must be an integer >= 2, got {examples!r}.")
        self.splits, self.examples, self.seed = dict(splits), examples, int(seed)
        self.augment = augment if augment is not None and augment.active else None

    def num_classes(self, split: Split = "train") -> int:
        """Classes of ``split``'s labels: the dataset's, times 4 for ``train`` with rotation classes."""
        return self._classes(split)

    def _classes(self, split: str) -> int:
        rotations = split == "train" and self.augment is not None and self.augment.class_rotations
        return self._dataset(split).num_classes * (4 if rotations else 1)

    def _dataset(self, split: str) -> ImageClassDataset:
        check_split(split)
        if split not in self.splits:
            raise KeyError(f"no {split!r} split here; there is {', '.join(self.splits) or 'none'}.")
        return self.splits[split]

    def task(self, split: Split, index: int) -> Task:
        """``support_x [examples // 2, C, H, W]``, ``support_y [examples // 2]`` global labels
        (int64), ``query_x``/``query_y`` the other ``examples - examples // 2`` images."""
        ds = self._dataset(split)
        total = int(ds.counts.sum())
        if total < self.examples:
            raise ValueError(f"the {split} split has {total} images, fewer than the {self.examples} per batch.")
        g = torch.Generator().manual_seed(task_seed(self.seed, split, index, "GlobalLabelBatches"))
        flat = torch.randperm(total, generator=g)[: self.examples]
        ends = torch.cumsum(ds.counts, 0)
        classes = torch.bucketize(flat, ends, right=True)
        within = flat - (ends - ds.counts)[classes]
        x = ds.gather(classes, within)
        if split == "train" and self.augment is not None:
            seed = task_seed(self.seed, split, index, "GlobalLabelBatches.augment")
            x, classes = augment_labelled(x, classes, ds.num_classes, self.augment, seed)
        half = self.examples // 2
        return Task(x[:half], classes[:half], x[half:], classes[half:])

    def batch(self, split: Split, indices: Sequence[int]) -> TaskBatch:
        return TaskBatch.stack([self.task(split, int(i)) for i in indices])

    def __repr__(self) -> str:
        aug = f", augment: {self.augment.describe()}" if self.augment is not None else ""
        return (f"GlobalLabelBatches({self.examples} images per task, seed={self.seed}{aug}, classes: "
                + ", ".join(f"{s}={self._classes(s)}" for s in self.splits) + ")")
