"""One factory for every task family a config can name: the regression families and the few-shot
image families (Omniglot, miniImageNet, a folder of class folders)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from innerloop.data.images import ImageClassDataset, MiniImageNet, image_folder_dataset
from innerloop.data.omniglot import Omniglot
from innerloop.data.regression import FAMILIES, make_family
from innerloop.data.sampling import IMAGE_FAMILIES, FewShotClassification
from innerloop.tasks import TaskFamily

__all__ = ["IMAGE_FAMILIES", "TASK_FAMILIES", "MissingDataError", "image_splits", "task_family"]

TASK_FAMILIES: tuple[str, ...] = (*FAMILIES, *IMAGE_FAMILIES)
"""Every name :func:`task_family` takes."""


class MissingDataError(ValueError):
    """An image family was asked for without the folder its images are in."""


def data_root() -> Path | None:
    """``$INNERLOOP_DATA``: the folder that holds ``omniglot/`` and ``miniimagenet/`` (or ``None``)."""
    env = os.environ.get("INNERLOOP_DATA")
    return Path(env) if env else None


@functools.lru_cache(maxsize=4)
def image_splits(family: str, root: str | None, split: str,
                 image_size: int | None) -> Mapping[str, ImageClassDataset]:
    """``{split: ImageClassDataset}`` of an image family, loaded (and cached on disk) once.

    ``root``: Omniglot's archives folder (default ``$INNERLOOP_DATA/omniglot``); miniImageNet's
    images folder (default ``$INNERLOOP_DATA/miniimagenet/images``); for ``image-folder`` a folder
    with ``train/``, ``val/``, ``test/`` of ``<class>/*.png``.
    """
    if family == "omniglot":
        return Omniglot(root, split=split, image_size=image_size or 28)  # type: ignore[arg-type]
    if family == "miniimagenet":
        base = data_root()
        images = root or (base / "miniimagenet" / "images" if base else None)
        if images is None:
            raise MissingDataError("miniImageNet needs its images: set task.data_root or $INNERLOOP_DATA.")
        splits = (base / "miniimagenet" / "splits" / "ravi") if base else Path(images).parent / "splits" / "ravi"
        return MiniImageNet(images, splits, size=image_size or 84)
    if family != "image-folder":
        raise ValueError(f"unknown image family {family!r}; choose one of {IMAGE_FAMILIES}.")
    if root is None:
        raise MissingDataError("task.family = 'image-folder' needs task.data_root (a folder with train/, val/, "
                               "test/).")
    return {s: image_folder_dataset(Path(root) / s, size=image_size or 84)
            for s in ("train", "val", "test") if (Path(root) / s).is_dir()}


def task_family(name: str, *, shots: int, queries: int, seed: int = 0, ways: int = 5, split: str = "vinyals",
                within_alphabet: bool = False, image_size: int | None = None, data_root: str | None = None,
                options: Mapping[str, Any] | None = None) -> TaskFamily:
    """The task family ``name`` (one of :data:`TASK_FAMILIES`) with ``shots`` support and
    ``queries`` query examples per task (regression) or per class (classification)."""
    extra = dict(options or {})
    if name not in IMAGE_FAMILIES:
        return make_family(name, shots=shots, queries=queries, seed=seed, **extra)
    splits = image_splits(name, data_root, split, image_size)
    return FewShotClassification(splits, ways=ways, shots=shots, queries=queries, seed=seed,
                                 within_alphabet=within_alphabet, **extra)
