"""One factory for every task family a config can name: the regression families and the few-shot
image families (Omniglot, miniImageNet, a folder of class folders)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from innerloop.data.augment import Augment, AugmentedFamily, TTAFamily
from innerloop.data.cifar import cifar_fs, fc100
from innerloop.data.cub import cub
from innerloop.data.images import ImageClassDataset, MiniImageNet, image_folder_dataset
from innerloop.data.omniglot import Omniglot
from innerloop.data.regression import FAMILIES, make_family
from innerloop.data.sampling import IMAGE_FAMILIES, FewShotClassification
from innerloop.data.tiered import TieredImageNet
from innerloop.tasks import TaskFamily

__all__ = ["IMAGE_FAMILIES", "TASK_FAMILIES", "MissingDataError", "image_splits", "task_family"]

TASK_FAMILIES: tuple[str, ...] = (*FAMILIES, *IMAGE_FAMILIES)
"""Every name :func:`task_family` takes."""


class MissingDataError(ValueError):
    """An image family was asked for without the folder its images are in, or for a split its data lacks."""


def data_root() -> Path | None:
    """``$INNERLOOP_DATA``: the folder that holds ``omniglot/`` and ``miniimagenet/`` (or ``None``)."""
    env = os.environ.get("INNERLOOP_DATA")
    return Path(env) if env else None


@functools.lru_cache(maxsize=4)
def image_splits(family: str, root: str | None, split: str, image_size: int | None,
                 split_options: tuple[tuple[str, Any], ...] = ()) -> Mapping[str, ImageClassDataset]:
    """``{split: ImageClassDataset}`` of an image family, loaded (and cached on disk) once.

    ``root``: Omniglot's archives folder (default ``$INNERLOOP_DATA/omniglot``); miniImageNet's
    images folder (default ``$INNERLOOP_DATA/miniimagenet/images``); for ``image-folder`` a folder
    with ``train/``, ``val/``, ``test/`` of ``<class>/*.png``. ``split_options``: ``(name, value)``
    pairs of :class:`~innerloop.data.omniglot.Omniglot`'s split keywords (``lake_val_alphabets``, ...).
    """
    if family == "omniglot":
        return Omniglot(root, split=split, image_size=image_size or 28,  # type: ignore[arg-type]
                        **dict(split_options))
    if split_options:
        raise ValueError(f"split options {dict(split_options)} are Omniglot's; {family!r} takes none.")
    if family == "miniimagenet":
        base = data_root()
        images = root or (base / "miniimagenet" / "images" if base else None)
        if images is None:
            raise MissingDataError("miniImageNet needs its images: set task.data_root or $INNERLOOP_DATA.")
        splits = (base / "miniimagenet" / "splits" / "ravi") if base else Path(images).parent / "splits" / "ravi"
        return MiniImageNet(images, splits, size=image_size or 84)
    if family in ("cifar-fs", "fc100"):  # root: the folder with CIFAR-100 (default $INNERLOOP_DATA/cifar100)
        return (cifar_fs if family == "cifar-fs" else fc100)(root, image_size=image_size or 32)
    if family == "cub":  # root: the folder with CUB_200_2011[.tgz] (default $INNERLOOP_DATA/cub)
        return cub(root, image_size=image_size or 84)
    if family == "tiered-imagenet":  # root: the user's ImageNet / release files ($INNERLOOP_DATA/tiered-imagenet)
        return TieredImageNet(root, image_size=image_size or 84)
    if family != "image-folder":
        raise ValueError(f"unknown image family {family!r}; choose one of {IMAGE_FAMILIES}.")
    if root is None:
        raise MissingDataError("task.family = 'image-folder' needs task.data_root (a folder with train/, val/, "
                               "test/).")
    return {s: image_folder_dataset(Path(root) / s, size=image_size or 84)
            for s in ("train", "val", "test") if (Path(root) / s).is_dir()}


def task_family(name: str, *, shots: int, queries: int, seed: int = 0, ways: int = 5, split: str = "vinyals",
                within_alphabet: bool | Mapping[str, bool] = False, image_size: int | None = None,
                data_root: str | None = None, options: Mapping[str, Any] | None = None,
                split_options: Mapping[str, Any] | None = None,
                splits: Sequence[str] | None = None,
                distinct_drawers: bool | Mapping[str, bool] = False,
                augment: Augment | None = None, tta: int = 1,
                tta_augment: Augment | None = None) -> TaskFamily:
    """The task family ``name`` (one of :data:`TASK_FAMILIES`) with ``shots`` support and
    ``queries`` query examples per task (regression) or per class (classification).

    Image families only: ``within_alphabet`` (one flag, or one per split), ``split_options`` (the
    class split's keywords, Omniglot's ``lake_val_alphabets``, ...) and ``splits`` (keep only these
    splits, default all: sizes are checked against them alone, and a lazily loaded dataset such as
    miniImageNet reads only them), ``distinct_drawers`` (one flag, or one per split: support and query by
    different drawers, Omniglot only), ``augment`` (meta-training tasks augmented,
    :class:`~innerloop.data.augment.AugmentedFamily`) and ``tta`` (copies per task for test-time
    augmentation with ``tta_augment``'s distortions, :class:`~innerloop.data.augment.TTAFamily`)."""
    extra = dict(options or {})
    if name not in IMAGE_FAMILIES and ((augment is not None and augment.active) or tta > 1):
        raise ValueError(f"augmentation distorts images; the {name!r} family has none (leave augment, tta out).")
    if name not in IMAGE_FAMILIES:
        return make_family(name, shots=shots, queries=queries, seed=seed, **extra)
    parts = image_splits(name, data_root, split, image_size, tuple(sorted((split_options or {}).items())))
    by_drawer = (any(distinct_drawers.values()) if isinstance(distinct_drawers, Mapping)
                 else bool(distinct_drawers))
    drawers = None
    if by_drawer:
        if not isinstance(parts, Omniglot):
            raise ValueError(f"distinct_drawers needs the drawer of every image, which only Omniglot records; "
                             f"the {name!r} family has none (set it false).")
        drawers = parts.drawer_ids()
    if splits is not None:
        absent = [s for s in splits if s not in parts]
        if absent:
            need = "validation" if absent == ["val"] else "this run"
            raise MissingDataError(f"the {name} data has no {', '.join(absent)} split (it has "
                                   f"{', '.join(parts)}), which {need} needs; give the data that split.")
        parts = {s: parts[s] for s in splits}
    if isinstance(distinct_drawers, Mapping):
        distinct_drawers = {s: v for s, v in distinct_drawers.items() if s in parts}
    family: TaskFamily = FewShotClassification(parts, ways=ways, shots=shots, queries=queries, seed=seed,
                                               within_alphabet=within_alphabet, distinct_drawers=distinct_drawers,
                                               drawers=drawers, **extra)
    if augment is not None and augment.active:
        family = AugmentedFamily(family, augment)
    if tta > 1:
        family = TTAFamily(family, tta_augment or augment or Augment(), tta)
    return family
