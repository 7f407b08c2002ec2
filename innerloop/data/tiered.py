"""tieredImageNet (Ren et al., ICLR 2018) with its class split: 351 / 97 / 160 classes.

608 ImageNet (ILSVRC-2012) classes grouped into 34 high-level categories by the WordNet
hierarchy; the splits are by category - 20 / 6 / 8 categories for train / val / test - so no
category is shared between them. The class lists (``wnid,category wnid`` rows) are the original
repository's ``tiered_imagenet_split/{train,val,test}.csv``, shipped as
``innerloop/data/splits/tiered/``. Each class's group is its category.

ImageNet's licence does not allow redistribution, so nothing is downloaded: the images come from
the user's copy, in ``folder`` (``root``, or ``root/tiered-imagenet``, else
``$INNERLOOP_DATA/tiered-imagenet``, else ``tiered-imagenet`` in the user data directory, see
:func:`~innerloop.data.archives.data_folder`), in one of two forms, first found per split:

``<split>_images_png.pkl`` + ``<split>_labels.pkl`` (or ``<split>_images.npz`` + labels)
    The common preprocessed release (84 x 84 images). Its files are pickles: they are loaded only
    through :func:`~innerloop.data.archives.restricted_unpickle`, which admits plain data and numpy
    arrays and refuses anything that could run code (a pickle naming any other global is an
    :class:`~innerloop.data.archives.UnsafePickleError`). Class names are the release's
    ``label_specific_str``, groups its ``label_general_str``. The ``.npz`` form (written by the
    release's decompression script with OpenCV, so in BGR order) is read with
    ``allow_pickle=False`` and flipped to RGB.
the ImageNet training folder ``<wnid>/*.JPEG`` (or ``train/<wnid>/*.JPEG``)
    e.g. ``ILSVRC2012_img_train.tar`` with its per-class tars extracted. Every image of the
    split's classes is decoded, resized to ``image_size`` (bicubic, as the release's OpenCV
    ``INTER_CUBIC``) and stored as uint8; classes are named by wnid, in the split file's order.

Each split is loaded on first access and cached atomically (see :mod:`innerloop.data.images`)
under a key made of the image size and the source files' identity.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from innerloop.data.archives import data_folder, file_identity, packaged_split, restricted_unpickle
from innerloop.data.download import DataError, StrPath
from innerloop.data.images import (
    IMAGE_SUFFIXES,
    ImageClassDataset,
    LazySplits,
    cache_key,
    load_image,
    stat_signature,
)
from innerloop.tasks import SPLITS, check_split

__all__ = ["CLASS_COUNTS", "TieredImageNet", "tiered_root", "tiered_split"]

CLASS_COUNTS: dict[str, int] = {"train": 351, "val": 97, "test": 160}
"""Classes per split in Ren et al.'s split (from 20 / 6 / 8 categories)."""
_HOW_TO_GET = (
    "ImageNet cannot be downloaded automatically (its licence forbids redistribution): register at "
    "https://image-net.org, download ILSVRC2012_img_train.tar, extract it and each class's tar into "
    "<folder>/<wnid>/, or put the preprocessed release's <split>_images_png.pkl and <split>_labels.pkl "
    "in <folder>"
)


def tiered_split(split: str) -> list[tuple[str, str]]:
    """``[(wnid, category wnid)]`` of a split, in the split file's order."""
    check_split(split)
    rows = [line.split(",") for line in packaged_split("tiered", f"{split}.csv")]
    return [(r[0].strip(), r[1].strip()) for r in rows]


def _release_files(folder: Path, split: str) -> tuple[Path, Path] | None:
    labels = folder / f"{split}_labels.pkl"
    for images in (folder / f"{split}_images_png.pkl", folder / f"{split}_images.npz"):
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def _imagenet_folder(folder: Path) -> Path | None:
    for cand in (folder, folder / "train"):
        if any((cand / w).is_dir() for w, _ in tiered_split("train")[:20] + tiered_split("test")[:20]):
            return cand
    return None


def _present(folder: Path) -> bool:
    return any(_release_files(folder, s) for s in SPLITS) or _imagenet_folder(folder) is not None


def tiered_root(root: StrPath | None = None) -> Path:
    """The folder that holds the user's tieredImageNet files; see the module docstring."""
    return data_folder(root, "tiered-imagenet", _present)


def _text(x: Any) -> str:
    return x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x)


def _labels(path: Path) -> dict[str, Any]:
    raw = restricted_unpickle(path)
    if not isinstance(raw, dict):
        raise DataError(f"{path} holds a {type(raw).__name__}, not the release's dict of labels.")
    labels = {_text(k): v for k, v in raw.items()}
    missing = [k for k in ("label_specific", "label_specific_str") if k not in labels]
    if missing:
        raise DataError(f"{path} lacks {', '.join(missing)}; is it a tieredImageNet <split>_labels.pkl?")
    return labels


def _release_images(path: Path, size: tuple[int, int]) -> np.ndarray:
    """uint8 ``[n, 3, H, W]`` RGB from ``<split>_images_png.pkl`` or ``<split>_images.npz``."""
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as z:
                bgr = z["images"]
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"cannot read {path} ({e}); it must be an .npz with an 'images' array.") from e
        if bgr.ndim != 4 or bgr.shape[-1] != 3 or bgr.dtype != np.uint8:
            raise DataError(f"{path}: 'images' is {bgr.dtype} {bgr.shape}, not uint8 [n, H, W, 3].")
        rgb = np.ascontiguousarray(bgr[..., ::-1])
        if rgb.shape[1:3] == size:
            return rgb.transpose(0, 3, 1, 2).copy()
        out = np.empty((len(rgb), 3, *size), dtype=np.uint8)
        for i, im in enumerate(rgb):
            pil = Image.fromarray(im).resize((size[1], size[0]), Image.Resampling.BICUBIC)
            out[i] = np.asarray(pil).transpose(2, 0, 1)
        return out
    encoded = restricted_unpickle(path)
    if not isinstance(encoded, list | tuple):
        raise DataError(f"{path} holds a {type(encoded).__name__}, not the release's list of PNG images.")
    out = np.empty((len(encoded), 3, *size), dtype=np.uint8)
    for i, blob in enumerate(encoded):
        raw = blob.tobytes() if isinstance(blob, np.ndarray) else blob
        if not isinstance(raw, bytes):
            raise DataError(f"{path}: item {i} is a {type(blob).__name__}, not encoded image bytes.")
        out[i] = load_image(raw, size, "RGB", Image.Resampling.BICUBIC, name=f"{path}[{i}]")
    return out


def _class_files(root: Path, wnid: str) -> list[Path]:
    d = root / wnid
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class TieredImageNet(LazySplits):
    """tieredImageNet as a mapping ``split -> ImageClassDataset`` (``train``, ``val``, ``test``).

    A split is loaded on first access; images are float32 ``[n_c, 3, H, W]`` in [0, 1] when read
    (84 x 84 unless ``image_size``). See the module docstring for the sources and caching.

    Args:
        root: the folder with the release files or the ImageNet class folders.
        image_size: side (or ``(height, width)``) of the stored images.
        cache_dir: where the preprocessed splits go (default
            :func:`~innerloop.data.images.cache_root`: ``$INNERLOOP_CACHE``, else the user cache;
            never the data folder).
        use_cache: False to neither read nor write a cache.

    Raises (on first access of a split):
        DataError: neither form holds the split (the message says how to get ImageNet), a class
            folder is missing or empty, or the release's classes are not Ren et al.'s count.
        UnsafePickleError: a release pickle names a global that could run code.
    """

    def __init__(
        self,
        root: StrPath | None = None,
        image_size: int | tuple[int, int] = 84,
        cache_dir: StrPath | None = None,
        use_cache: bool = True,
    ) -> None:
        self.root = tiered_root(root)
        super().__init__(image_size, cache_dir, use_cache)
        if not self.root.is_dir():
            raise DataError(f"tieredImageNet: the folder {self.root} does not exist. {_HOW_TO_GET}.")

    def __repr__(self) -> str:
        return f"TieredImageNet({self.root}, size={self.size}, loaded: {', '.join(self._splits) or 'none'})"

    def _load(self, split: str) -> ImageClassDataset:
        release = _release_files(self.root, split)
        if release is not None:
            key = cache_key(kind="tiered-release", split=split, size=self.size,
                            files=[file_identity(p) for p in release])
            return self._cached(lambda: self._from_release(split, *release), f"tiered-{split}", key, self.root)
        images_root = _imagenet_folder(self.root)
        if images_root is None:
            raise DataError(
                f"tieredImageNet: no {split}_images_png.pkl + {split}_labels.pkl and no ImageNet class folders "
                f"(<wnid>/*.JPEG) in {self.root}. {_HOW_TO_GET.replace('<folder>', str(self.root))}."
            )
        rows = tiered_split(split)
        files = {w: _class_files(images_root, w) for w, _ in rows}
        missing = [w for w, fs in files.items() if not fs]
        if missing:
            raise DataError(
                f"tieredImageNet {split}: {len(missing)} of its {len(rows)} ImageNet classes have no images in "
                f"{images_root} (first: {', '.join(missing[:3])}). "
                f"{_HOW_TO_GET.replace('<folder>', str(self.root))}."
            )
        every = [f for w, _ in rows for f in files[w]]
        key = cache_key(kind="tiered-imagenet", split=split, size=self.size, root=str(images_root.resolve()),
                        files=stat_signature(every, images_root), resample="bicubic")

        def build() -> ImageClassDataset:
            out = np.empty((len(every), 3, *self.size), dtype=np.uint8)
            for i, f in enumerate(every):
                out[i] = load_image(f, self.size, "RGB", Image.Resampling.BICUBIC)
            return ImageClassDataset(
                torch.from_numpy(out), [len(files[w]) for w, _ in rows], [w for w, _ in rows], [c for _, c in rows]
            )

        return self._cached(build, f"tiered-{split}", key, self.root)

    def _from_release(self, split: str, images_path: Path, labels_path: Path) -> ImageClassDataset:
        labels = _labels(labels_path)
        specific = np.asarray(labels["label_specific"]).astype(np.int64).reshape(-1)
        names = [_text(s) for s in labels["label_specific_str"]]
        general = np.asarray(labels.get("label_general", np.zeros_like(specific))).astype(np.int64).reshape(-1)
        general_names = [_text(s) for s in labels.get("label_general_str", ["all"])]
        images = _release_images(images_path, self.size)
        if len(images) != len(specific) or len(general) != len(specific):
            raise DataError(
                f"{images_path} holds {len(images)} images but {labels_path} labels {len(specific)} "
                f"(and {len(general)} categories); use the files of one release."
            )
        present = np.unique(specific)
        if len(present) != CLASS_COUNTS[split] or len(names) != CLASS_COUNTS[split]:
            raise DataError(
                f"{labels_path}: {len(present)} classes with images and {len(names)} class names, but Ren "
                f"et al.'s {split} split has {CLASS_COUNTS[split]}; is this the tieredImageNet release?"
            )
        if int(present.min()) < 0 or int(present.max()) >= len(names) or (
            len(general) and (int(general.min()) < 0 or int(general.max()) >= len(general_names))
        ):
            raise DataError(f"{labels_path}: a label outside the class or category names; use the release files.")
        order = np.argsort(specific, kind="stable")
        counts = np.bincount(specific, minlength=len(names))
        first = order[np.cumsum(counts) - counts]
        groups = [general_names[int(general[i])] for i in first]
        return ImageClassDataset(torch.from_numpy(images[order]), counts.tolist(), names, groups)
