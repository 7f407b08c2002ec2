"""Continual meta-training tasks: a trajectory of one class (or a few) and a remember batch.

The OML objective (Javed & White 2019; ANML, Beaulieu et al. 2020, follows it): the inner loop
trains on a *trajectory*, the images of ``trajectory_classes`` classes one after another, one image
per SGD step; the meta-loss is measured after the trajectory on the trajectory's images plus a
*remember* batch drawn from all meta-training classes. One task is a :class:`~innerloop.tasks.TaskBatch`
entry with ``support`` = the trajectory (in the order the inner loop sees it) and ``query`` = the
remember batch; labels are the classes' indices in the dataset (the model's output rows).

Every batch is a pure function of ``(seed, index)``: outer step ``t`` of a run always trains on
batch ``t``, so a resumed run continues exactly.
"""

from __future__ import annotations

import torch

from innerloop.data.download import StrPath
from innerloop.data.images import ImageClassDataset
from innerloop.data.omniglot import Omniglot
from innerloop.tasks import TaskBatch

__all__ = ["ContinualClasses", "ContinualOmniglot", "seeded"]


def seeded(seed: int, index: int) -> torch.Generator:
    """A CPU generator that depends on ``(seed, index)`` only (distinct streams for distinct pairs)."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + int(index)) % (1 << 62))


class ContinualClasses:
    """Continual tasks over the classes of ``dataset`` (the meta-training classes).

    Args:
        dataset: the classes; every one needs at least ``shots`` images.
        trajectory_classes: classes per trajectory (the papers: 1).
        shots: images of each trajectory class, in a random order (the papers: all 20 of an
            Omniglot character).
        remember: images in the remember batch, drawn uniformly over (class, image) pairs of all
            classes (ANML: 64).
        tasks: tasks per batch (trajectories per outer step).
        seed: seeds every batch.
    """

    def __init__(self, dataset: ImageClassDataset, *, trajectory_classes: int = 1, shots: int = 20,
                 remember: int = 64, tasks: int = 1, seed: int = 0) -> None:
        n = dataset.num_classes
        if not 1 <= trajectory_classes <= n:
            raise ValueError(f"trajectory_classes={trajectory_classes} with {n} classes: choose 1..{n}.")
        fewest = int(dataset.counts.min()) if n else 0
        if not 1 <= shots <= fewest:
            raise ValueError(f"shots={shots} but the smallest class has {fewest} images; choose 1..{fewest}.")
        if remember < 0 or tasks < 1:
            raise ValueError(f"need remember >= 0 and tasks >= 1, got remember={remember}, tasks={tasks}.")
        self.dataset = dataset
        self.trajectory_classes, self.shots, self.remember = trajectory_classes, shots, remember
        self.tasks, self.seed = tasks, seed

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def trajectory_length(self) -> int:
        """Inner steps per task: ``trajectory_classes * shots``."""
        return self.trajectory_classes * self.shots

    def _task(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        ds = self.dataset
        classes = torch.randperm(ds.num_classes, generator=g)[: self.trajectory_classes]
        cls = classes.repeat_interleave(self.shots)
        img = torch.cat([torch.randperm(int(ds.counts[c]), generator=g)[: self.shots] for c in classes.tolist()])
        r_cls = torch.randint(ds.num_classes, (self.remember,), generator=g)
        r_img = (torch.rand(self.remember, generator=g) * ds.counts[r_cls]).long()
        return ds.gather(cls, img), cls, ds.gather(r_cls, r_img), r_cls

    def batch(self, index: int) -> TaskBatch:
        """Batch ``index``: ``support_x [tasks, T, C, H, W]`` (the trajectories, ``T =
        trajectory_length``), ``support_y [tasks, T]``, ``query_x [tasks, remember, C, H, W]`` and
        ``query_y [tasks, remember]`` (class indices)."""
        if index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}.")
        g = seeded(self.seed, index)
        parts = [self._task(g) for _ in range(self.tasks)]
        return TaskBatch(*(torch.stack([p[k] for p in parts]) for k in range(4)))


class ContinualOmniglot(ContinualClasses):
    """:class:`ContinualClasses` over Omniglot's background set (the 964 characters of the 30
    background alphabets: the papers' meta-training classes), with the evaluation set (659
    characters of the 20 evaluation alphabets) as :attr:`evaluation` for the meta-test streams.

    Args:
        root: the folder with the Omniglot archives (default ``$INNERLOOP_DATA/omniglot``).
        image_size: side in pixels (28: ANML's; OML used 84).
        download: download missing archives.
        trajectory_classes: as in :class:`ContinualClasses`.
        shots: as in :class:`ContinualClasses`.
        remember: as in :class:`ContinualClasses`.
        tasks: as in :class:`ContinualClasses`.
        seed: as in :class:`ContinualClasses`.
    """

    def __init__(self, root: StrPath | None = None, image_size: int = 28, download: bool = True,
                 trajectory_classes: int = 1, shots: int = 20, remember: int = 64, tasks: int = 1,
                 seed: int = 0) -> None:
        data = Omniglot(root, split="lake", image_size=image_size, lake_val_alphabets=0, download=download)
        super().__init__(data["train"], trajectory_classes=trajectory_classes, shots=shots, remember=remember,
                         tasks=tasks, seed=seed)
        self.evaluation: ImageClassDataset = data["test"]
