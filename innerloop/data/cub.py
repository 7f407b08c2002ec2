"""CUB-200-2011 (Wah et al. 2011) with the few-shot class split of Chen et al. 2019.

11,788 photographs of 200 bird species, shipped as ``CUB_200_2011.tgz`` with the layout
``CUB_200_2011/images/<NNN.Species_name>/<image>.jpg`` plus ``classes.txt``, ``images.txt`` and
annotation files. Only the images and their class folders are used: the bounding boxes, part
locations, attributes and the train/test image split are not (few-shot benchmarks split by class).

The split (Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019, their
``write_CUB_filelist.py``): with the 200 class folders sorted by name and numbered ``i = 0..199``,
class ``i`` is in ``train`` (their "base") if ``i % 2 == 0``, ``val`` if ``i % 4 == 1`` and
``test`` ("novel") if ``i % 4 == 3``: 100 / 50 / 50 classes, listed in
``innerloop/data/splits/cub/{train,val,test}.txt``.

Where the files come from, in ``folder`` (``root``, or ``root/cub``, else ``$INNERLOOP_DATA/cub``,
else ``cub`` in the user data directory, see :func:`~innerloop.data.archives.data_folder`), first
found:

1. the extracted folder ``CUB_200_2011/images/<class>/*.jpg``;
2. the archive ``CUB_200_2011.tgz``, read as a stream (nothing is extracted to disk; every member
   is checked, see :mod:`innerloop.data.archives`);
3. else the archive is downloaded (https only) from CaltechDATA (:data:`URL`) and verified
   against the publisher's MD5 (:data:`MD5`). An archive already in the folder is checked against
   a ``SHA256SUMS`` file beside it when that lists it.

Every image is decoded (grey ones converted to RGB), resized to ``image_size`` (default 84 x 84,
Lanczos) and stored as uint8; the result is cached atomically (see :mod:`innerloop.data.images`)
under a key made of the image size and the source files' identity.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image

from innerloop.data.archives import data_folder, fetch_verified, file_identity, iter_tar, packaged_split
from innerloop.data.download import MAX_MEMBER_BYTES, DataError, DownloadError, StrPath, verify_checksum_list
from innerloop.data.images import (
    IMAGE_SUFFIXES,
    ImageClassDataset,
    cache_folder,
    cache_key,
    cached,
    load_image,
    size_pair,
    stat_signature,
)
from innerloop.tasks import SPLITS

__all__ = ["ARCHIVE", "MD5", "SIZE", "URL", "cub", "cub_root", "load_cub"]

URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
ARCHIVE = "CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
"""The MD5 CaltechDATA gives for ``CUB_200_2011.tgz``."""
SIZE = 1_150_585_339
TOP = "CUB_200_2011"


def _present(folder: Path) -> bool:
    return (folder / TOP / "images").is_dir() or (folder / ARCHIVE).is_file()


def cub_root(root: StrPath | None = None) -> Path:
    """The folder that holds (or will hold) CUB-200-2011; see the module docstring."""
    return data_folder(root, "cub", _present)


def _all_classes() -> list[str]:
    return sorted(n for s in SPLITS for n in packaged_split("cub", f"{s}.txt"))


def _image_member(name: str) -> tuple[str, str] | None:
    """``(class, file name)`` of an image member ``CUB_200_2011/images/<class>/<file>``, else None."""
    parts = PurePosixPath(name).parts
    if len(parts) != 4 or parts[0] != TOP or parts[1] != "images" or parts[3].startswith("."):
        return None
    return (parts[2], parts[3]) if parts[3].lower().endswith(IMAGE_SUFFIXES) else None


def _source(folder: Path, download: bool) -> Path:
    if (folder / TOP / "images").is_dir():
        return folder / TOP
    if (folder / ARCHIVE).is_file():
        verify_checksum_list(folder / ARCHIVE)
        return folder / ARCHIVE
    where = (
        f"put {ARCHIVE} (from {URL}) or its extracted {TOP}/ in {folder} (or pass root=<folder>, or set "
        "INNERLOOP_DATA=<folder> with the files in <folder>/cub)"
    )
    if not download:
        raise DataError(f"CUB-200-2011 is not in {folder}; {where}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return fetch_verified(URL, folder / ARCHIVE, md5=MD5, size=SIZE)
    except (DownloadError, OSError) as e:
        raise DataError(f"CUB-200-2011 is not in {folder} and could not be downloaded ({e}); {where}.") from e


def _folder_files(top: Path) -> list[tuple[str, str, Path]]:
    out = []
    for d in sorted(p for p in (top / "images").iterdir() if p.is_dir() and not p.name.startswith(".")):
        for f in sorted(d.iterdir()):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES:
                out.append((d.name, f.name, f))
    return out


def _identity(src: Path) -> object:
    if src.is_file():
        return file_identity(src)
    files = [f for _, _, f in _folder_files(src)]
    return {"folder": str(src.resolve()), "files": stat_signature(files, src / "images")}


def _check_classes(found: list[str], src: Path, classes_txt: bytes | None) -> None:
    expected = _all_classes()
    if found != expected:
        extra = sorted(set(found) - set(expected))[:3]
        missing = sorted(set(expected) - set(found))[:3]
        raise DataError(
            f"{src}: expected the 200 CUB-200-2011 class folders, found {len(found)} (missing e.g. {missing}, "
            f"unexpected e.g. {extra}); use the official {ARCHIVE}."
        )
    if classes_txt is not None:
        lines = classes_txt.decode("utf-8", "replace").splitlines()
        listed = sorted(line.split()[-1] for line in lines if line.strip())
        if listed != expected:
            raise DataError(f"{src}: classes.txt does not list the 200 class folders; use the official {ARCHIVE}.")


def load_cub(
    root: StrPath | None = None,
    image_size: int | tuple[int, int] = 84,
    cache_dir: StrPath | None = None,
    download: bool = True,
    use_cache: bool = True,
    max_member_bytes: int = MAX_MEMBER_BYTES,
) -> ImageClassDataset:
    """All 200 classes (sorted by folder name), each image resized to ``image_size``.

    Returns:
        An :class:`~innerloop.data.images.ImageClassDataset` named by class folder
        (``001.Black_footed_Albatross``, ...), images ``[n_c, 3, H, W]`` (n_c: 41 to 60) in file
        name order, float32 in [0, 1] when read.

    Raises:
        DataError: the files are missing (and cannot be downloaded), an image cannot be decoded,
            or the class folders are not CUB's 200.
        ChecksumError, CorruptArchiveError, UnsafeArchiveError, SizeLimitError: see
            :mod:`innerloop.data.archives`.
    """
    hw = size_pair(image_size)
    folder = cub_root(root)
    src = _source(folder, download)
    key = cache_key(kind="cub", size=hw, source=_identity(src), resample="lanczos")

    def build() -> ImageClassDataset:
        items: list[tuple[str, str, np.ndarray]] = []
        classes_txt: bytes | None = None
        if src.is_dir():
            for cls, name, f in _folder_files(src):
                items.append((cls, name, load_image(f, hw, "RGB", Image.Resampling.LANCZOS)))
            if (src / "classes.txt").is_file():
                classes_txt = (src / "classes.txt").read_bytes()
        else:
            listing = f"{TOP}/classes.txt"
            for member, blob in iter_tar(
                src, lambda n: n == listing or _image_member(n) is not None, max_member_bytes
            ):
                found = _image_member(member)
                if found is None:
                    classes_txt = blob
                    continue
                image = load_image(blob, hw, "RGB", Image.Resampling.LANCZOS, name=f"{src}:{member}")
                items.append((*found, image))
        items.sort(key=lambda t: (t[0], t[1]))
        names = sorted({c for c, _, _ in items})
        _check_classes(names, src, classes_txt)
        index = {c: i for i, c in enumerate(names)}
        counts = [0] * len(names)
        for c, _, _ in items:
            counts[index[c]] += 1
        stored = torch.from_numpy(np.stack([a for _, _, a in items]))
        return ImageClassDataset(stored, counts, names)

    return cached(build, cache_folder(cache_dir, use_cache, folder), f"cub-{hw[0]}x{hw[1]}", key)


def cub(
    root: StrPath | None = None,
    image_size: int | tuple[int, int] = 84,
    cache_dir: StrPath | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> dict[str, ImageClassDataset]:
    """CUB-200-2011 split as Chen et al. 2019: ``{"train": 100 classes, "val": 50, "test": 50}``.

    Arguments as :func:`load_cub`.
    """
    full = load_cub(root, image_size, cache_dir, download, use_cache)
    return {s: full.subset([full.class_index(n) for n in packaged_split("cub", f"{s}.txt")]) for s in SPLITS}
