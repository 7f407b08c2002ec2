"""CIFAR-FS (Bertinetto et al. 2019) and FC100 (Oreshkin et al. 2018), from the official CIFAR-100.

CIFAR-100 (Krizhevsky 2009) has 100 classes of 600 32 x 32 colour images (500 train + 100 test),
grouped into 20 superclasses of 5. Both few-shot benchmarks use all 600 images of each class:

``cifar-fs``
    The class split of Bertinetto et al. (R2-D2): 64 / 16 / 20 classes, listed by name in
    ``innerloop/data/splits/cifar-fs/{train,val,test}.txt``.
``fc100``
    The superclass split of Oreshkin et al. (TADAM): 12 / 4 / 4 superclasses = 60 / 20 / 20
    classes, listed in ``innerloop/data/splits/fc100/{train,val,test}.txt``; no superclass is
    shared between splits.

Each class's group is its superclass (for ``within_alphabet`` tasks).

Where the files come from, in ``folder`` (``root``, or ``root/cifar100``, else
``$INNERLOOP_DATA/cifar100``, else ``cifar100`` in the user data directory, see
:func:`~innerloop.data.archives.data_folder`), first found:

1. the extracted binary version ``cifar-100-binary/`` (``train.bin``, ``test.bin``,
   ``fine_label_names.txt``, ``coarse_label_names.txt``);
2. the binary archive ``cifar-100-binary.tar.gz``, read as a stream (nothing is extracted to disk;
   every member is checked, see :mod:`innerloop.data.archives`);
3. the Python version ``cifar-100-python/`` or ``cifar-100-python.tar.gz``: its files are
   pickles, loaded only through :func:`~innerloop.data.archives.restricted_unpickle`, which
   admits plain data and numpy arrays and refuses anything that could run code;
4. else the binary archive is downloaded (https only) from :data:`URL` and verified against the
   publisher's MD5 (:data:`MD5`) and the SHA-256 (:data:`SHA256`) registered for the same URL in
   TensorFlow Datasets. An archive already in the folder is checked against a ``SHA256SUMS``
   file beside it when that lists it (as for Omniglot).

The 60000 images are stored once as uint8 ``[60000, 3, 32, 32]`` (train then test images within
each class, classes in CIFAR's label order) and cached atomically (see
:mod:`innerloop.data.images`) under a key made of the image size and the source files'
identity; both splits read that one cache. ``image_size`` other than 32 resizes with Lanczos.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from innerloop.data.archives import (
    data_folder,
    fetch_verified,
    file_identity,
    iter_tar,
    packaged_split,
    restricted_unpickle,
)
from innerloop.data.download import DataError, DownloadError, StrPath, verify_checksum_list
from innerloop.data.images import ImageClassDataset, cache_folder, cache_key, cached, size_pair
from innerloop.tasks import SPLITS

__all__ = ["ARCHIVE", "MD5", "SHA256", "SIZE", "URL", "cifar100_root", "cifar_fs", "fc100", "load_cifar100"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz"
ARCHIVE = "cifar-100-binary.tar.gz"
MD5 = "03b5dce01913d631647c71ecec9e9cb8"
"""The MD5 the CIFAR page gives for the binary version."""
SHA256 = "58a81ae192c23a4be8b1804d68e518ed807d710a4eb253b1f2a199162a40d8ec"
"""The SHA-256 TensorFlow Datasets registers for :data:`URL` (``url_checksums/cifar100.txt``)."""
SIZE = 168_513_733
BINARY_DIR = "cifar-100-binary"
PYTHON_DIR = "cifar-100-python"
PYTHON_ARCHIVE = "cifar-100-python.tar.gz"
RECORD = 2 + 3 * 32 * 32  # coarse label byte, fine label byte, R, G, B planes (row-major)
_BIN_FILES = ("train.bin", "test.bin")
_NAME_FILES = ("fine_label_names.txt", "coarse_label_names.txt")
_MAX_BIN = 256 << 20  # train.bin is 153,700,000 bytes
_MAX_TEXT = 1 << 20


def _present(folder: Path) -> bool:
    return (
        (folder / BINARY_DIR).is_dir()
        or (folder / ARCHIVE).is_file()
        or (folder / PYTHON_DIR).is_dir()
        or (folder / PYTHON_ARCHIVE).is_file()
    )


def cifar100_root(root: StrPath | None = None) -> Path:
    """The folder that holds (or will hold) CIFAR-100; see the module docstring."""
    return data_folder(root, "cifar100", _present)


def _names(text: bytes, what: str, expected: int, where: str) -> list[str]:
    names = [s.strip() for s in text.decode("utf-8", errors="replace").splitlines() if s.strip()]
    if len(names) != expected or len(set(names)) != expected:
        raise DataError(
            f"{where}: {what} lists {len(names)} names ({len(set(names))} distinct), not {expected}; "
            "use the official CIFAR-100 files."
        )
    return names


def _from_records(blobs: Sequence[bytes], where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(pixels [n, 3, 32, 32], fine [n], coarse [n])`` from binary-version record files."""
    arrays = []
    for blob in blobs:
        if len(blob) % RECORD or not blob:
            raise DataError(
                f"{where}: a data file of {len(blob)} bytes is not a whole number of {RECORD}-byte CIFAR-100 "
                "records; the file is truncated or not the binary version. Get the official archive again."
            )
        arrays.append(np.frombuffer(blob, dtype=np.uint8).reshape(-1, RECORD))
    rec = np.concatenate(arrays)
    return rec[:, 2:].reshape(-1, 3, 32, 32), rec[:, 1].astype(np.int64), rec[:, 0].astype(np.int64)


def _read_binary_dir(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    missing = [f for f in (*_BIN_FILES, *_NAME_FILES) if not (folder / f).is_file()]
    if missing:
        raise DataError(
            f"the CIFAR-100 folder {folder} lacks {', '.join(missing)}; put the whole extracted "
            f"{BINARY_DIR}/ there (or {ARCHIVE} beside it)."
        )
    fine_names = _names((folder / _NAME_FILES[0]).read_bytes(), _NAME_FILES[0], 100, str(folder))
    coarse_names = _names((folder / _NAME_FILES[1]).read_bytes(), _NAME_FILES[1], 20, str(folder))
    blobs = [(folder / f).read_bytes() for f in _BIN_FILES]
    return (*_from_records(blobs, str(folder)), fine_names, coarse_names)


def _read_binary_tar(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    wanted = {*_BIN_FILES, *_NAME_FILES}
    got: dict[str, bytes] = {}

    def select(name: str) -> bool:
        return Path(name).name in wanted

    for name, data in iter_tar(path, select, lambda n: _MAX_BIN if n.endswith(".bin") else _MAX_TEXT):
        got[Path(name).name] = data
    missing = sorted(wanted - set(got))
    if missing:
        raise DataError(f"{path} holds no {', '.join(missing)}; is it {ARCHIVE} (the binary version)?")
    fine_names = _names(got[_NAME_FILES[0]], _NAME_FILES[0], 100, str(path))
    coarse_names = _names(got[_NAME_FILES[1]], _NAME_FILES[1], 20, str(path))
    blobs = [got[f] for f in _BIN_FILES]
    return (*_from_records(blobs, str(path)), fine_names, coarse_names)


def _from_pickles(
    files: Mapping[str, bytes], where: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    """The Python version's ``train``, ``test`` and ``meta`` pickles (restricted unpickling)."""
    meta = restricted_unpickle(files["meta"], f"{where}:meta")
    try:
        fine_names = [str(s) for s in meta["fine_label_names"]]
        coarse_names = [str(s) for s in meta["coarse_label_names"]]
        parts = [restricted_unpickle(files[s], f"{where}:{s}") for s in ("train", "test")]
        data = np.concatenate([np.asarray(p["data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for p in parts])
        fine = np.concatenate([np.asarray(p["fine_labels"], dtype=np.int64) for p in parts])
        coarse = np.concatenate([np.asarray(p["coarse_labels"], dtype=np.int64) for p in parts])
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"{where}: not the CIFAR-100 Python version ({type(e).__name__}: {e}); use the official files."
        ) from e
    return data, fine, coarse, fine_names, coarse_names


def _read_python(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], list[str]]:
    wanted = ("train", "test", "meta")
    if path.is_dir():
        missing = [f for f in wanted if not (path / f).is_file()]
        if missing:
            raise DataError(f"the CIFAR-100 folder {path} lacks {', '.join(missing)}.")
        return _from_pickles({f: (path / f).read_bytes() for f in wanted}, str(path))
    got = dict(
        (Path(n).name, d) for n, d in iter_tar(path, lambda n: Path(n).name in wanted, _MAX_BIN)
    )
    missing = [f for f in wanted if f not in got]
    if missing:
        raise DataError(f"{path} holds no {', '.join(missing)}; is it {PYTHON_ARCHIVE}?")
    return _from_pickles(got, str(path))


def _source(folder: Path, download: bool) -> Path:
    for cand in (folder / BINARY_DIR, folder / ARCHIVE, folder / PYTHON_DIR, folder / PYTHON_ARCHIVE):
        if cand.exists():
            if cand.is_file():
                verify_checksum_list(cand)
            return cand
    where = (
        f"put {ARCHIVE} (from {URL}) or its extracted {BINARY_DIR}/ in {folder} (or pass root=<folder>, or set "
        "INNERLOOP_DATA=<folder> with the files in <folder>/cifar100)"
    )
    if not download:
        raise DataError(f"CIFAR-100 is not in {folder}; {where}.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return fetch_verified(URL, folder / ARCHIVE, md5=MD5, sha256=SHA256, size=SIZE)
    except (DownloadError, OSError) as e:
        raise DataError(f"CIFAR-100 is not in {folder} and could not be downloaded ({e}); {where}.") from e


def _identity(src: Path) -> list[dict[str, object]]:
    if src.is_file():
        return [file_identity(src)]
    return [file_identity(p) for p in sorted(src.iterdir()) if p.is_file()]


def load_cifar100(
    root: StrPath | None = None,
    image_size: int | tuple[int, int] = 32,
    cache_dir: StrPath | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> ImageClassDataset:
    """All 100 CIFAR-100 classes, 600 images each (train then test), grouped by superclass.

    Returns:
        An :class:`~innerloop.data.images.ImageClassDataset` whose class ``i`` is fine label
        ``i`` (named as in ``fine_label_names``), group its superclass name; images
        ``[600, 3, H, W]`` (32 x 32 unless ``image_size``), float32 in [0, 1] when read.

    Raises:
        DataError: the files are missing (and cannot be downloaded), or malformed; the message
            says what to put where.
        ChecksumError, CorruptArchiveError, UnsafeArchiveError: see :mod:`innerloop.data.archives`.
    """
    hw = size_pair(image_size)
    folder = cifar100_root(root)
    src = _source(folder, download)
    key = cache_key(kind="cifar100", size=hw, source=src.name, files=_identity(src), resample="lanczos")

    def build() -> ImageClassDataset:
        if src.name == BINARY_DIR:
            data, fine, coarse, fine_names, coarse_names = _read_binary_dir(src)
        elif src.name == ARCHIVE:
            data, fine, coarse, fine_names, coarse_names = _read_binary_tar(src)
        else:
            data, fine, coarse, fine_names, coarse_names = _read_python(src)
        if len(fine_names) != 100 or len(coarse_names) != 20:
            raise DataError(
                f"{src}: {len(fine_names)} classes and {len(coarse_names)} superclasses, not 100 and 20."
            )
        if len(fine) != len(data) or len(coarse) != len(data) or not len(data):
            raise DataError(f"{src}: {len(data)} images but {len(fine)} / {len(coarse)} labels.")
        if int(fine.max()) >= 100 or int(fine.min()) < 0 or int(coarse.max()) >= 20 or int(coarse.min()) < 0:
            raise DataError(f"{src}: a label outside 0..99 (fine) or 0..19 (coarse); use the official files.")
        group = np.full(100, -1, dtype=np.int64)
        for f in range(100):
            cs = np.unique(coarse[fine == f])
            if len(cs) != 1:
                raise DataError(
                    f"{src}: class {fine_names[f]!r} has {len(cs)} superclasses (or no images); use the "
                    "official files."
                )
            group[f] = cs[0]
        order = np.argsort(fine, kind="stable")
        pixels = data[order]
        if hw != (32, 32):
            out = np.empty((len(pixels), 3, *hw), dtype=np.uint8)
            for i, im in enumerate(pixels):
                pil = Image.fromarray(np.ascontiguousarray(im.transpose(1, 2, 0)))
                out[i] = np.asarray(pil.resize((hw[1], hw[0]), Image.Resampling.LANCZOS)).transpose(2, 0, 1)
            pixels = out
        counts = np.bincount(fine, minlength=100)
        return ImageClassDataset(
            torch.from_numpy(np.ascontiguousarray(pixels)),
            counts.tolist(),
            fine_names,
            [coarse_names[int(g)] for g in group],
        )

    return cached(build, cache_folder(cache_dir, use_cache, folder), f"cifar100-{hw[0]}x{hw[1]}", key)


def _split(full: ImageClassDataset, what: str, lists: str, by_superclass: bool) -> dict[str, ImageClassDataset]:
    """``full`` split by the package's ``splits/<lists>/<split>.txt``: lists of class names, or of
    superclass names (``by_superclass``: every class of a listed superclass, in CIFAR's label order)."""
    out: dict[str, ImageClassDataset] = {}
    for s in SPLITS:
        wanted = packaged_split(lists, f"{s}.txt")
        have = set(full.groups if by_superclass else full.names)
        missing = [n for n in wanted if n not in have]
        if missing:
            raise DataError(
                f"the {what} split file splits/{lists}/{s}.txt names {', '.join(missing[:5])}, which the "
                f"CIFAR-100 data does not have ({len(missing)} in all); use the official CIFAR-100 files."
            )
        if by_superclass:
            chosen = set(wanted)
            out[s] = full.subset([i for i, g in enumerate(full.groups) if g in chosen])
        else:
            out[s] = full.subset([full.class_index(n) for n in wanted])
    return out


def cifar_fs(
    root: StrPath | None = None,
    image_size: int | tuple[int, int] = 32,
    cache_dir: StrPath | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> dict[str, ImageClassDataset]:
    """CIFAR-FS: ``{"train": 64 classes, "val": 16, "test": 20}``, 600 images ``[3, H, W]`` each.

    Arguments as :func:`load_cifar100`; the class lists are the package's
    ``splits/cifar-fs/<split>.txt``.
    """
    return _split(load_cifar100(root, image_size, cache_dir, download, use_cache), "CIFAR-FS", "cifar-fs", False)


def fc100(
    root: StrPath | None = None,
    image_size: int | tuple[int, int] = 32,
    cache_dir: StrPath | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> dict[str, ImageClassDataset]:
    """FC100: ``{"train": 60 classes (12 superclasses), "val": 20 (4), "test": 20 (4)}``.

    Arguments as :func:`load_cifar100`; the superclass lists are the package's
    ``splits/fc100/<split>.txt``. Classes keep CIFAR's label order within a split.
    """
    return _split(load_cifar100(root, image_size, cache_dir, download, use_cache), "FC100", "fc100", True)
