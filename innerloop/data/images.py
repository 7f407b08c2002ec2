"""Class-indexed image datasets, an atomic preprocessed cache, image folders and miniImageNet.

:class:`ImageClassDataset` holds the images of many classes in one storage tensor
``[total, C, H, W]`` (uint8, read as ``value / 255``, or float32 read as is); class ``c`` is
a contiguous run of it, optionally seen rotated by a multiple of 90 degrees, so subsets and
rotation classes share storage.

Preprocessing (decode, resize; with a progress bar on a terminal) runs once; the result is saved
with :func:`save_cache` - ``np.savez`` into a temporary file that is then moved into place with
:func:`os.replace` - and reused when the cache key (format version, image size, source files)
matches. A failure while preprocessing or writing leaves no cache file behind, and inside
:func:`deferred_cache_writes` (a run building its task families) nothing is written unless the
whole block succeeds.

Where the cache goes (:func:`cache_root`): ``$INNERLOOP_CACHE`` when set, else the user cache
directory (``platformdirs.user_cache_dir("innerloop")``: ``~/.cache/innerloop`` on Linux,
``~/Library/Caches/innerloop`` on macOS); never the data folder, unless a ``cache_dir`` names it.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import random
import shutil
import sys
import tempfile
import warnings
import zipfile
from abc import abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import platformdirs
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from tqdm import tqdm

from innerloop.data.download import DataError, StrPath, remove_quietly
from innerloop.io import current_umask
from innerloop.tasks import SPLITS, check_split

__all__ = [
    "IMAGE_SUFFIXES",
    "RESAMPLING",
    "ImageClassDataset",
    "ImagePreprocessing",
    "ImageSource",
    "LazySplits",
    "MiniImageNet",
    "array_image",
    "cache_folder",
    "cache_key",
    "cache_root",
    "cached",
    "convert_image",
    "default_cache_dir",
    "deferred_cache_writes",
    "image_folder_dataset",
    "load_cache",
    "load_image",
    "save_cache",
    "split_class_folder",
    "split_classes",
    "stat_signature",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
CACHE_VERSION = 1


def size_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """``size`` as ``(height, width)``; an int means a square."""
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or not all(isinstance(s, int) and s >= 1 for s in hw):
        raise ValueError(f"image size must be an int >= 1 or a (height, width) pair of them, got {size!r}.")
    return hw


class ImageClassDataset:
    """Images grouped by class.

    Args:
        data: ``[total, C, H, W]`` storage, uint8 (pixel ``v`` reads as ``v / 255``) or float.
        counts: ``[classes]`` images per class; with ``starts`` absent the classes are consecutive
            runs of ``data`` in order.
        names: one name per class (unique).
        groups: one group per class (e.g. the Omniglot alphabet), used for within-group sampling;
            defaults to each class being its own group.
        starts: ``[classes]`` first row of each class in ``data``.
        rotations: ``[classes]`` quarter turns (0..3, counter-clockwise, ``torch.rot90``) applied to
            the images of each class when read.
    """

    def __init__(
        self,
        data: Tensor,
        counts: Sequence[int] | Tensor,
        names: Sequence[str],
        groups: Sequence[str] | None = None,
        starts: Sequence[int] | Tensor | None = None,
        rotations: Sequence[int] | Tensor | None = None,
    ) -> None:
        if data.dim() != 4:
            raise ValueError(f"image data must be [total, C, H, W], got shape {tuple(data.shape)}.")
        if data.dtype != torch.uint8 and not data.is_floating_point():
            raise ValueError(f"image data must be uint8 or floating point, got {data.dtype}.")
        counts_t = torch.as_tensor(counts, dtype=torch.int64).reshape(-1)
        n = counts_t.numel()
        if starts is None:
            starts_t = torch.cumsum(counts_t, 0) - counts_t
        else:
            starts_t = torch.as_tensor(starts, dtype=torch.int64).reshape(-1)
        rot_t = (
            torch.zeros(n, dtype=torch.int64)
            if rotations is None
            else torch.as_tensor(rotations, dtype=torch.int64).reshape(-1) % 4
        )
        names = [str(s) for s in names]
        groups = list(names) if groups is None else [str(s) for s in groups]
        if not (len(names) == len(groups) == starts_t.numel() == rot_t.numel() == n):
            raise ValueError(
                f"{n} class counts but {len(names)} names, {len(groups)} groups, {starts_t.numel()} starts "
                f"and {rot_t.numel()} rotations; give one of each per class."
            )
        if len(set(names)) != n:
            dup = sorted({s for s in names if names.count(s) > 1})[:5]
            raise ValueError(f"class names must be unique; repeated: {dup}.")
        if n and (
            int(counts_t.min()) < 0 or int(starts_t.min()) < 0 or int((starts_t + counts_t).max()) > len(data)
        ):
            raise ValueError(f"class runs (starts, counts) fall outside the {len(data)} stored images.")
        if data.shape[-1] != data.shape[-2] and bool((rot_t % 2 == 1).any()):
            raise ValueError(f"odd quarter turns need square images, got {tuple(data.shape[-2:])}.")
        self.data = data
        self.counts, self.starts, self.rotations = counts_t, starts_t, rot_t
        self.names, self.groups = names, groups
        self._index = {s: i for i, s in enumerate(names)}

    # --- construction ---------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, images: Mapping[str, Tensor], groups: Mapping[str, str] | None = None) -> ImageClassDataset:
        """From ``{class name: [n, C, H, W] images}`` (all of one dtype and image shape)."""
        if not images:
            raise ValueError("an image dataset needs at least one class; got an empty mapping.")
        names = list(images)
        tensors = [torch.as_tensor(images[k]) for k in names]
        shapes = {tuple(t.shape[1:]) for t in tensors}
        if len(shapes) != 1 or any(t.dim() != 4 for t in tensors):
            raise ValueError(f"every class needs [n, C, H, W] images of one shape, found shapes {sorted(shapes)}.")
        return cls(
            torch.cat(tensors),
            [len(t) for t in tensors],
            names,
            None if groups is None else [groups[k] for k in names],
        )

    def to_dict(self) -> dict[str, Tensor]:
        """``{class name: [n, C, H, W] float32 images}``."""
        return {name: self.images(i) for i, name in enumerate(self.names)}

    def subset(
        self, classes: Sequence[int] | Tensor, quarter_turns: Sequence[int] | Tensor | None = None
    ) -> ImageClassDataset:
        """The classes ``classes`` (indices, repeats allowed with distinct turns), in that order.

        ``quarter_turns`` (one per chosen class) rotates each chosen class further by that many
        quarter turns and names it ``<name>/rotDDD``. Storage is shared.
        """
        idx = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
        names = [self.names[i] for i in idx.tolist()]
        rot = self.rotations[idx]
        if quarter_turns is not None:
            ks = torch.as_tensor(quarter_turns, dtype=torch.int64).reshape(-1) % 4
            if ks.numel() != idx.numel():
                raise ValueError(f"{idx.numel()} classes but {ks.numel()} quarter turns; give one per class.")
            names = [f"{s}/rot{90 * k:03d}" for s, k in zip(names, ks.tolist(), strict=True)]
            rot = (rot + ks) % 4
        return ImageClassDataset(
            self.data, self.counts[idx], names, [self.groups[i] for i in idx.tolist()], self.starts[idx], rot
        )

    def with_rotations(self, quarter_turns: Sequence[int] = (0, 1, 2, 3)) -> ImageClassDataset:
        """Every class once per rotation, as separate classes named ``<name>/rotDDD``; same groups."""
        ks = torch.as_tensor([int(k) % 4 for k in quarter_turns], dtype=torch.int64)
        order = torch.arange(self.num_classes).repeat_interleave(len(ks))
        return self.subset(order, ks.repeat(self.num_classes))

    # --- access ---------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return self.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.data.shape[1:]
        return int(c), int(h), int(w)

    def num_images(self, c: int) -> int:
        return int(self.counts[c])

    def class_index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no class named {name!r} (the dataset has {self.num_classes} classes).") from None

    def images(self, c: int, index: Sequence[int] | Tensor | None = None) -> Tensor:
        """Images ``index`` (default: all) of class ``c`` as float32 ``[len(index), C, H, W]``."""
        start, count = int(self.starts[c]), int(self.counts[c])
        if index is None:
            x = self.data[start : start + count]
        else:
            idx = torch.as_tensor(index, dtype=torch.int64)
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= count):
                raise IndexError(
                    f"class {self.names[c]!r} has {count} images; index out of range: {idx.tolist()}."
                )
            x = self.data.index_select(0, start + idx)  # much faster than data[...] on CPU
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        k = int(self.rotations[c])
        return torch.rot90(x, k, dims=(-2, -1)) if k else x

    def gather(self, classes: Sequence[int] | Tensor, index: Sequence[int] | Tensor) -> Tensor:
        """Image ``index[i]`` of class ``classes[i]`` for every ``i``, as float32 ``[m, C, H, W]``.

        One gather for the whole batch (the sampler's hot path); rotations are applied per class.
        """
        cls = torch.as_tensor(classes, dtype=torch.int64).reshape(-1)
        idx = torch.as_tensor(index, dtype=torch.int64).reshape(-1)
        if cls.numel() != idx.numel():
            raise ValueError(f"{cls.numel()} classes but {idx.numel()} image indices; give one class per image.")
        if idx.numel():
            bad = (idx < 0) | (idx >= self.counts[cls])
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise IndexError(
                    f"image {int(idx[i])} of class {self.names[int(cls[i])]!r} requested, but it has "
                    f"{int(self.counts[cls[i]])} images."
                )
        x = self.data.index_select(0, self.starts[cls] + idx)  # index_select: far faster than data[rows]
        turns = self.rotations[cls]
        for k in (1, 2, 3):
            sel = (turns == k).nonzero().reshape(-1)
            if sel.numel():
                x.index_copy_(0, sel, torch.rot90(x.index_select(0, sel), k, dims=(-2, -1)))
        return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()

    def __getitem__(self, key: int | str) -> Tensor:
        """All images of a class (by index or name), float32 ``[n, C, H, W]``."""
        return self.images(self.class_index(key) if isinstance(key, str) else int(key))

    def group_classes(self) -> dict[str, list[int]]:
        """``{group: [class indices]}``, groups in order of first appearance."""
        out: dict[str, list[int]] = {}
        for i, g in enumerate(self.groups):
            out.setdefault(g, []).append(i)
        return out

    def __repr__(self) -> str:
        return (
            f"ImageClassDataset({self.num_classes} classes, {int(self.counts.sum())} images of "
            f"{self.image_shape}, {len(set(self.groups))} groups)"
        )


# ----------------------------------------------------------------------------------------------
# the preprocessed cache


def cache_key(**parts: object) -> str:
    """A short stable hash of JSON-able key parts (image size, source identity, version, ...)."""
    blob = json.dumps({"version": CACHE_VERSION, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _may_write(folder: Path) -> bool:
    """Whether the permission bits let us write in ``folder``; honoured for root too, who could write
    anyway: a data folder marked read-only (e.g. a shared copy) is left alone."""
    if getattr(os, "geteuid", lambda: -1)() == 0:
        return bool(folder.stat().st_mode & 0o222)
    return os.access(folder, os.W_OK)


def writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (created here if missing)."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            return False
        existing = existing.parent
    if not existing.is_dir() or not _may_write(existing):
        return False
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError:
        return False
    return True


CACHE_ENV = "INNERLOOP_CACHE"
"""The environment variable that puts the preprocessed caches (and downloaded split files) elsewhere."""


def cache_root() -> Path:
    """Where caches go by default: ``$INNERLOOP_CACHE`` when set, else the user cache directory
    (``platformdirs.user_cache_dir("innerloop")``, which honours ``$XDG_CACHE_HOME`` on Linux)."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("innerloop", appauthor=False))


def user_cache_dir() -> Path:
    """The cache folder: :func:`cache_root` (kept under this name for callers of earlier versions)."""
    return cache_root()


def default_cache_dir(root: StrPath | None = None) -> Path:
    """The preprocessed cache's folder for data read from ``root``: :func:`cache_root`, whatever
    ``root`` is (a data folder is never written into unless a ``cache_dir`` names it)."""
    return cache_root()


def cache_folder(cache_dir: StrPath | None, use_cache: bool, root: StrPath | None = None) -> Path | None:
    """The ``cache_dir`` a loader hands to :func:`cached`: None when ``use_cache`` is False (no cache),
    else ``cache_dir`` when given, else :func:`default_cache_dir` of the data folder ``root``."""
    if not use_cache:
        return None
    return Path(cache_dir) if cache_dir is not None else default_cache_dir(root)


_PENDING: list[list[tuple[Path, ImageClassDataset, str]]] = []


@contextlib.contextmanager
def deferred_cache_writes() -> Iterator[None]:
    """Hold back the cache writes of :func:`cached` inside the block: they are written when it ends
    without an exception and dropped when it raises, so a run that fails its checks after
    preprocessing (more ways than classes, a missing split) leaves no cache behind."""
    pending: list[tuple[Path, ImageClassDataset, str]] = []
    _PENDING.append(pending)
    try:
        yield
    except BaseException:
        _PENDING.remove(pending)
        raise
    _PENDING.remove(pending)
    for path, dataset, key in pending:
        _write_cache(path, dataset, key)


def _write_cache(path: Path, dataset: ImageClassDataset, key: str) -> None:
    if _PENDING:  # inside deferred_cache_writes: written when the block succeeds
        _PENDING[-1].append((path, dataset, key))
        return
    try:
        save_cache(path, dataset, key)
    except OSError as e:
        warnings.warn(
            f"could not write the preprocessed cache {path} ({e}); pass a writable cache_dir (or set "
            f"{CACHE_ENV}) to avoid preprocessing again next time.",
            stacklevel=3,
        )


def progress_bar(total: int, desc: str) -> tqdm[Any]:
    """A tqdm bar on stderr, shown only when stderr is a terminal (logs and tests stay clean)."""
    return tqdm(total=total, desc=desc, unit="img", leave=False, disable=not sys.stderr.isatty(), file=sys.stderr)


def save_cache(path: StrPath, dataset: ImageClassDataset, key: str) -> Path:
    """Write ``dataset`` (consecutive, unrotated classes) to ``path`` atomically.

    ``np.savez`` writes into a temporary file in the same folder which is moved onto ``path``
    with :func:`os.replace`; on any error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    if bool((dataset.rotations != 0).any()) or not torch.equal(
        dataset.starts, torch.cumsum(dataset.counts, 0) - dataset.counts
    ):
        raise ValueError("only datasets of consecutive, unrotated classes can be cached.")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                key=np.array(key),
                data=dataset.data.numpy(),
                counts=dataset.counts.numpy(),
                names=np.array(dataset.names, dtype=str),
                groups=np.array(dataset.groups, dtype=str),
            )
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it 0600; the user's umask decides
        os.replace(tmp, path)
    except BaseException:
        remove_quietly(tmp)
        raise
    return path


def load_cache(path: StrPath, key: str) -> ImageClassDataset | None:
    """The dataset cached at ``path``, or None if absent, unreadable or made with another key."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            return ImageClassDataset(
                torch.from_numpy(z["data"].copy()),
                z["counts"].tolist(),
                z["names"].tolist(),
                z["groups"].tolist(),
            )
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        warnings.warn(f"ignoring the unreadable cache {path} ({e}); it will be rebuilt.", stacklevel=2)
        return None


def cached(
    build: Callable[[], ImageClassDataset], cache_dir: StrPath | None, name: str, key: str
) -> ImageClassDataset:
    """Load ``<cache_dir>/<name>-<key>.npz``, or ``build()`` the dataset and cache it there.

    ``cache_dir=None`` disables caching. If the cache cannot be written (e.g. a read-only
    folder) a warning is issued and the built dataset is returned anyway. Inside
    :func:`deferred_cache_writes` the write waits for the block to succeed.
    """
    if cache_dir is None:
        return build()
    path = Path(cache_dir) / f"{name}-{key}.npz"
    hit = load_cache(path, key)
    if hit is not None:
        return hit
    dataset = build()  # an exception here leaves no cache file
    _write_cache(path, dataset, key)
    return dataset


# ----------------------------------------------------------------------------------------------
# decoding and resizing


def load_image(
    source: bytes | StrPath,
    size: int | tuple[int, int],
    mode: str = "RGB",
    resample: Image.Resampling = Image.Resampling.LANCZOS,
    name: str | None = None,
    max_pixels: int | None = None,
) -> np.ndarray:
    """Decode an image file (path or bytes), convert to ``mode`` and resize: uint8 ``[C, H, W]``.

    The header's width x height is checked against ``max_pixels`` before any pixel is decoded,
    so a decompression bomb (a small file that claims a huge image) is a :class:`DataError`.

    Args:
        source: a file path, or the encoded bytes.
        size: ``(height, width)`` or an int for a square.
        mode: a Pillow mode, ``"RGB"`` (C = 3) or ``"L"`` (grey, C = 1).
        resample: the Pillow resampling filter.
        name: how to call the image in error messages (defaults to the path).
        max_pixels: the most pixels an image may have; default ``PIL.Image.MAX_IMAGE_PIXELS``
            (read at each call; None there disables the cap).

    Raises:
        DataError: the file cannot be decoded, or it has more than ``max_pixels`` pixels.
    """
    h, w = size_pair(size)
    shown = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    cap = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    knob = "max_pixels" if max_pixels is not None else f"PIL.Image.MAX_IMAGE_PIXELS, now {Image.MAX_IMAGE_PIXELS}"
    way_out = (
        "it may be a decompression bomb; replace or delete the file (if it is genuine, downscale it, "
        f"or raise {knob})"
    )
    try:
        with warnings.catch_warnings():
            # Pillow only warns between 1x and 2x its cap: make that an error too.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            f = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"refusing to decode the image {shown}: {e} ({way_out}).") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read the image {shown}: {e}; replace or delete the file.") from e
    try:
        with f:
            width, height = f.size
            if cap is not None and width * height > cap:
                raise DataError(
                    f"refusing to decode the image {shown}: it is {width} x {height} = {width * height} pixels, "
                    f"over the cap of {cap} pixels ({way_out})."
                )
            return convert_image(f, (h, w), mode, resample)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read the image {shown}: {e}; replace or delete the file.") from e


def convert_image(
    image: Image.Image,
    size: int | tuple[int, int],
    mode: str = "RGB",
    resample: Image.Resampling = Image.Resampling.LANCZOS,
) -> np.ndarray:
    """A decoded image converted to ``mode`` and resized to ``size`` (``(height, width)``) with
    ``resample`` when its size differs: uint8 ``[C, H, W]`` (C = 1 for ``L``, 3 for ``RGB``). The step
    every loader (through :func:`load_image`) and :class:`ImagePreprocessing` share."""
    h, w = size_pair(size)
    im = image.convert(mode)
    if im.size != (w, h):
        im = im.resize((w, h), resample=resample)
    arr = np.asarray(im, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


RESAMPLING: dict[str, Image.Resampling] = {r.name.lower(): r for r in Image.Resampling}
"""Pillow's resampling filters by the names an :class:`ImagePreprocessing` gives (``lanczos``, ...)."""
ImageSource = bytes | str | os.PathLike[str] | Image.Image | np.ndarray
"""One image as a loader or a predictor takes it: a file path, encoded bytes, a Pillow image, or an
array (see :func:`array_image`)."""


def array_image(array: np.ndarray, name: str = "the array") -> Image.Image:
    """A Pillow image of an array: ``[H, W]`` (grey), ``[H, W, 1]``, ``[H, W, 3]`` (RGB) or ``[H, W, 4]``
    (RGBA); uint8 (0..255), or floating point in [0, 1] (scaled by 255 and rounded), or bool.

    Raises:
        DataError: another shape or dtype, or floats outside [0, 1] (naming ``name`` and the way out)."""
    a = np.asarray(array)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise DataError(f"{name} has shape {a.shape}; give an image as [H, W] (grey), [H, W, 1], [H, W, 3] (RGB) "
                        "or [H, W, 4] (RGBA), channels last.")
    if a.dtype == np.bool_:
        a = a.astype(np.uint8) * 255
    elif np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise DataError(f"{name} is a float array with values in [{np.nanmin(a):g}, {np.nanmax(a):g}]; floats "
                            "must lie in [0, 1] (or give uint8 pixels 0..255).")
        a = np.rint(a * 255).astype(np.uint8)
    elif a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.integer) and a.min() >= 0 and a.max() <= 255:
            a = a.astype(np.uint8)
        else:
            raise DataError(f"{name} has dtype {a.dtype}; give uint8 pixels (0..255) or floats in [0, 1].")
    mode = "L" if a.ndim == 2 else ("RGB" if a.shape[-1] == 3 else "RGBA")
    return Image.fromarray(np.ascontiguousarray(a), mode)


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a loader turns one source image into the uint8 ``[C, H, W]`` it stores (read as ``v / 255``):
    convert to ``mode``, resize to ``size`` with ``resample`` (:func:`convert_image`), then, when
    ``invert``, ``255 - v`` (Omniglot: black ink on white becomes ink = 1). A checkpoint stores it
    (:meth:`to_dict`), so images preprocess for a trained model as they did for its training.

    Attributes:
        size: ``(height, width)`` after resizing.
        mode: ``"L"`` (grey, C = 1) or ``"RGB"`` (C = 3).
        resample: a key of :data:`RESAMPLING`.
        invert: store ``255 - v``.
    """

    size: tuple[int, int]
    mode: str = "RGB"
    resample: str = "lanczos"
    invert: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", size_pair(self.size))
        if self.mode not in ("L", "RGB"):
            raise ValueError(f"image mode {self.mode!r} is invalid: choose 'L' (grey) or 'RGB'.")
        if self.resample not in RESAMPLING:
            raise ValueError(f"resample {self.resample!r} is invalid: choose one of {list(RESAMPLING)}.")

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of a preprocessed image."""
        return self.channels, *self.size

    def __call__(self, source: ImageSource, name: str | None = None, max_pixels: int | None = None) -> np.ndarray:
        """``source`` preprocessed: uint8 ``[C, H, W]``. Files and bytes are decoded by :func:`load_image`
        (its pixel cap, ``max_pixels``), arrays read by :func:`array_image`.

        Raises:
            DataError: an image that cannot be read (naming ``name``, default the path)."""
        resample = RESAMPLING[self.resample]
        if isinstance(source, bytes | str | os.PathLike):
            arr = load_image(source, self.size, self.mode, resample, name=name, max_pixels=max_pixels)
        elif isinstance(source, Image.Image):
            arr = convert_image(source, self.size, self.mode, resample)
        elif isinstance(source, np.ndarray):
            arr = convert_image(array_image(source, name or "the array"), self.size, self.mode, resample)
        else:
            raise DataError(f"{name or 'an image'} is a {type(source).__name__}; give a file path, bytes, a PIL "
                            "image or a numpy array.")
        return np.subtract(255, arr, dtype=np.uint8) if self.invert else arr

    def to_dict(self) -> dict[str, Any]:
        """Plain data (a checkpoint's ``inputs.preprocessing``)."""
        return {"size": list(self.size), "mode": self.mode, "resample": self.resample, "invert": self.invert}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImagePreprocessing:
        """The inverse of :meth:`to_dict`."""
        return cls(tuple(data["size"]), str(data["mode"]), str(data["resample"]), bool(data["invert"]))


def stat_signature(files: Sequence[Path], root: Path) -> str:
    """A hash of the files' paths relative to ``root`` (``/``-separated), sizes and modification times:
    the identity of a folder of source images in a cache key."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(root).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _decode_all(files: Sequence[Path], prep: ImagePreprocessing, desc: str = "preprocessing images") -> Tensor:
    """``[len(files), C, H, W]`` uint8: every file through ``prep``."""
    out = np.empty((len(files), *prep.shape), dtype=np.uint8)
    with progress_bar(len(files), desc) as bar:
        for i, f in enumerate(files):
            out[i] = prep(f)
            bar.update()
    return torch.from_numpy(out)


def _folder_classes(root: Path) -> Iterator[tuple[str, list[Path]]]:
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            yield d.name, files


def image_folder_dataset(
    root: StrPath,
    size: int | tuple[int, int] = 84,
    mode: str = "RGB",
    cache_dir: StrPath | None = None,
    resample: Image.Resampling = Image.Resampling.LANCZOS,
    use_cache: bool = True,
) -> ImageClassDataset:
    """A few-shot dataset from ``root/<class>/*.png|jpg|jpeg``: classes sorted by folder name.

    Every image is resized to ``size`` with Pillow and stored as uint8 ``[n, C, H, W]``
    (C = 3 for ``RGB``, 1 for ``L``); reading a class gives float32 in [0, 1].

    Args:
        root: the folder of class folders.
        size: ``(height, width)`` or an int for a square.
        mode: ``"RGB"`` or ``"L"``.
        cache_dir: where the preprocessed arrays go; default :func:`cache_root` (``$INNERLOOP_CACHE``,
            else the user cache directory).
        resample: the Pillow resampling filter.
        use_cache: False to neither read nor write a cache.
    """
    root = Path(root)
    hw = size_pair(size)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; put one sub-folder of images per class there.")
    classes = list(_folder_classes(root))
    if not classes:
        raise DataError(
            f"no images found in {root}: expected {root}/<class>/<image> files ending in "
            f"{', '.join(IMAGE_SUFFIXES)}."
        )
    files = [f for _, fs in classes for f in fs]
    prep = ImagePreprocessing(hw, mode, Image.Resampling(resample).name.lower())
    key = cache_key(
        kind="folder",
        root=str(root.resolve()),
        size=hw,
        mode=mode,
        resample=int(resample),
        files=stat_signature(files, root),
    )

    def build() -> ImageClassDataset:
        return ImageClassDataset(
            _decode_all(files, prep, f"preprocessing {root.name}"),
            [len(fs) for _, fs in classes], [c for c, _ in classes],
        )

    return cached(build, cache_folder(cache_dir, use_cache, root), f"folder-{root.name}-{hw[0]}x{hw[1]}", key)


def _count(value: float | int, n: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"{name} = {value!r} is invalid: give a share in [0, 1) or a number of classes >= 0.")
    if isinstance(value, float):
        if not value < 1:
            raise ValueError(f"{name} = {value!r} is invalid: a share must be below 1 (or give a number of "
                             "classes).")
        return round(value * n)
    return value


def split_classes(names: Sequence[str], val: float | int = 0.16, test: float | int = 0.2,
                  seed: int = 0) -> dict[str, list[str]]:
    """``{"train": [...], "val": [...], "test": [...]}``: the class ``names`` split at random by ``seed``.

    The names are sorted, shuffled with ``random.Random(seed)``, and the first ``test`` go to test,
    the next ``val`` to val, the rest to train; ``val`` and ``test`` are shares of the classes (a
    float in [0, 1), rounded to whole classes) or numbers of classes (an int). The same names and
    seed give the same split on every machine; the parts are disjoint and sorted.

    Raises:
        ValueError: a repeated name, a share out of range, or sizes that leave a split empty
            (``val = 0`` is allowed: no val split).
    """
    ordered = sorted(str(n) for n in names)
    if len(set(ordered)) != len(ordered):
        dup = sorted({n for n in ordered if ordered.count(n) > 1})[:5]
        raise ValueError(f"class names must be unique; repeated: {dup}.")
    n = len(ordered)
    n_val, n_test = _count(val, n, "val"), _count(test, n, "test")
    if n_test < 1 or n - n_val - n_test < 1:
        raise ValueError(f"{n} classes cannot give {n_val} val and {n_test} test classes with at least one test "
                         "and one train class; use more classes, or smaller val / test.")
    random.Random(seed).shuffle(ordered)
    parts = {"test": ordered[:n_test], "val": ordered[n_test : n_test + n_val], "train": ordered[n_test + n_val :]}
    return {s: sorted(parts[s]) for s in ("train", "val", "test")}


def split_class_folder(source: StrPath, dest: StrPath, val: float | int = 0.16, test: float | int = 0.2,
                       seed: int = 0, copy: bool = False) -> dict[str, list[str]]:
    """Lay out the class folders of ``source`` (``source/<class>/<images>``) as ``dest/train/``,
    ``dest/val/`` and ``dest/test/`` by :func:`split_classes` (``seed``, ``val``, ``test``): the layout
    ``task.family = "image-folder"`` reads (``task.data_root = dest``).

    Each class becomes a symbolic link to its folder in ``source`` (``copy=True``: a copy of it). The
    layout is made in a temporary folder beside ``dest`` and moved into place once whole, so ``dest``
    is either absent or complete; an existing ``dest`` is refused (never overwritten). A split that
    gets no class (``val = 0``) has no folder. Returns the split (class names per part).

    Raises:
        DataError: ``source`` is missing or holds no class folder with images, or ``dest`` exists.
        ValueError: sizes :func:`split_classes` refuses.
    """
    source, dest = Path(source), Path(dest)
    if not source.is_dir():
        raise DataError(f"class folder {source} does not exist; give a folder with one sub-folder of images per "
                        "class.")
    classes = [c for c, _ in _folder_classes(source)]
    if not classes:
        raise DataError(f"no class folders with images in {source}: expected {source}/<class>/<image> files "
                        f"ending in {', '.join(IMAGE_SUFFIXES)}.")
    if dest.exists() or dest.is_symlink():
        raise DataError(f"{dest} already exists; choose a new folder (nothing was written), or delete it first.")
    parts = split_classes(classes, val, test, seed)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp"))
    try:
        for split, names in parts.items():
            for name in names:
                target = tmp / split / name
                target.parent.mkdir(parents=True, exist_ok=True)
                if copy:
                    shutil.copytree(source / name, target)
                else:
                    target.symlink_to((source / name).resolve(), target_is_directory=True)
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the user's umask decides
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return parts


# ----------------------------------------------------------------------------------------------
# miniImageNet


def _read_split_csv(path: Path) -> list[tuple[str, str]]:
    """``(filename, label)`` rows of a Ravi split CSV (header ``filename,label``)."""
    if not path.is_file():
        raise DataError(
            f"the miniImageNet split file {path} is missing; put the Ravi & Larochelle split CSVs "
            f"(train.csv, val.csv, test.csv with 'filename,label' rows) in {path.parent}."
        )
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
        raise DataError(
            f"{path} must start with the header 'filename,label', got {rows[0] if rows else 'nothing'}."
        )
    out = []
    for line, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {line}: expected 'filename,label', got {row!r}.")
        out.append((row[0].strip(), row[1].strip()))
    if not out:
        raise DataError(f"{path} lists no images.")
    return out


class LazySplits(Mapping[str, ImageClassDataset]):
    """A mapping ``split -> ImageClassDataset`` (``train``, ``val``, ``test``) that loads a split on its
    first access (:meth:`_load`, which subclasses write) and keeps it; :meth:`_cached` caches what a
    split builds as :func:`cached` does.

    Args:
        size: ``(height, width)`` or an int for a square: the stored images' size.
        cache_dir: where preprocessed splits go; default :func:`cache_root`.
        use_cache: False to neither read nor write a cache.
    """

    def __init__(self, size: int | tuple[int, int], cache_dir: StrPath | None, use_cache: bool) -> None:
        self.size = size_pair(size)
        self._cache_dir = None if cache_dir is None else Path(cache_dir)
        self.use_cache = use_cache
        self._splits: dict[str, ImageClassDataset] = {}

    @abstractmethod
    def _load(self, split: str) -> ImageClassDataset:
        """Build (or read from the cache) the split ``split``."""

    def __getitem__(self, split: str) -> ImageClassDataset:
        check_split(split)
        if split not in self._splits:
            self._splits[split] = self._load(split)
        return self._splits[split]

    def __iter__(self) -> Iterator[str]:
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)

    def _cached(
        self, build: Callable[[], ImageClassDataset], name: str, key: str, root: Path
    ) -> ImageClassDataset:
        """``build()``, cached as ``<name>-<H>x<W>-<key>`` in :func:`cache_folder` (data read from ``root``)."""
        where = cache_folder(self._cache_dir, self.use_cache, root)
        return cached(build, where, f"{name}-{self.size[0]}x{self.size[1]}", key)


class MiniImageNet(LazySplits):
    """miniImageNet (Vinyals et al. 2016) with the Ravi & Larochelle split: 64 / 16 / 20 classes.

    A mapping ``split -> ImageClassDataset`` (``train``, ``val``, ``test``), each split loaded on
    first access, resized to ``size`` (84 x 84 RGB by default, with Lanczos as in Ravi's script)
    and cached.

    Args:
        images_root: the user's images (ImageNet licence, not distributed with this project), laid
            out flat - ``images_root/images/<filename>`` or ``images_root/<filename>`` - or by
            class - ``images_root/<label>/<filename>``.
        split_root: the folder with ``train.csv``, ``val.csv``, ``test.csv`` (``filename,label``).
        size: ``(height, width)`` or an int for a square.
        cache_dir: where preprocessed splits go; default :func:`cache_root` (``$INNERLOOP_CACHE``,
            else the user cache directory).
        use_cache: False to neither read nor write a cache.
    """

    def __init__(
        self,
        images_root: StrPath,
        split_root: StrPath,
        size: int | tuple[int, int] = 84,
        cache_dir: StrPath | None = None,
        use_cache: bool = True,
    ) -> None:
        self.images_root, self.split_root = Path(images_root), Path(split_root)
        super().__init__(size, cache_dir, use_cache)
        if not self.images_root.is_dir():
            raise DataError(
                f"the miniImageNet image folder {self.images_root} does not exist. Put the images there, "
                "either flat (images/<filename> or <filename>) or one folder per class (<label>/<filename>), "
                "with the file names of the split CSVs."
            )

    def _locate(self, filename: str, label: str) -> Path | None:
        for cand in (
            self.images_root / "images" / filename,
            self.images_root / filename,
            self.images_root / label / filename,
        ):
            if cand.is_file():
                return cand
        return None

    def _load(self, split: str) -> ImageClassDataset:
        csv_path = self.split_root / f"{split}.csv"
        rows = _read_split_csv(csv_path)
        labels = sorted({label for _, label in rows})
        by_label: dict[str, list[Path]] = {label: [] for label in labels}
        missing = []
        for filename, label in rows:
            p = self._locate(filename, label)
            if p is None:
                missing.append(f"{label}/{filename}")
            else:
                by_label[label].append(p)
        if missing:
            raise DataError(
                f"{len(missing)} of the {len(rows)} miniImageNet {split} images listed in {csv_path} are not "
                f"in {self.images_root} (first: {', '.join(missing[:3])}). Put them there, flat as "
                f"{self.images_root / 'images'}/<filename> or by class as {self.images_root}/<label>/<filename>."
            )
        files = [p for label in labels for p in by_label[label]]
        key = cache_key(
            kind="miniimagenet",
            split=split,
            size=self.size,
            root=str(self.images_root.resolve()),
            csv=hashlib.sha256(csv_path.read_bytes()).hexdigest(),
            files=stat_signature(files, self.images_root),
        )

        def build() -> ImageClassDataset:
            data = _decode_all(files, ImagePreprocessing(self.size, "RGB", "lanczos"),
                               f"preprocessing miniImageNet {split}")
            return ImageClassDataset(data, [len(by_label[k]) for k in labels], labels)

        return self._cached(build, f"miniimagenet-{split}", key, self.images_root)
