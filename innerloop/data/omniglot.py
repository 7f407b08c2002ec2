"""Omniglot (Lake, Salakhutdinov & Tenenbaum, Science 2015) for few-shot classification.

1623 handwritten characters from 50 alphabets, 20 drawings each, shipped as two archives:
``images_background.zip`` (30 alphabets, 964 characters) and ``images_evaluation.zip``
(20 alphabets, 659 characters), laid out as ``images_<set>/<Alphabet>/characterNN/IIII_DD.png``
(105 x 105, 1 bit, black ink on white).

Where the files come from, in order:

1. ``root`` (an argument): the folder holding the two archives (or a folder whose ``omniglot/``
   sub-folder holds them);
2. else ``$INNERLOOP_DATA/omniglot``;
3. else ``<user data directory>/omniglot`` (``platformdirs.user_data_dir("innerloop")``; on Linux
   ``$XDG_DATA_HOME/innerloop/omniglot``, default ``~/.local/share/innerloop/omniglot``).

An archive that is already in the folder is *not* checked against the official checksum
(copies may be re-encoded: same pixels, different bytes), unless a ``SHA256SUMS`` file beside it
(``<sha256>  images_background.zip`` lines, as ``sha256sum`` writes them) lists it: then a
mismatch is an error naming the file and both digests. A missing archive is downloaded (https
only, at most twice its known size) from the official repository and verified against
:data:`SHA256`; without network the error says exactly where to put the files. Every archive
member is validated before use and capped at ``max_member_bytes`` (64 MiB) uncompressed; every
image at ``PIL.Image.MAX_IMAGE_PIXELS`` pixels (see :func:`innerloop.data.images.load_image`).

Preprocessing runs once: every PNG is converted to 8-bit grey, resized (default 28 x 28, Lanczos)
and inverted so that ink = 1; images are stored as uint8 and read as float32 in [0, 1]. The result
is cached atomically (see :mod:`innerloop.data.images`) in ``cache_dir`` (default
:func:`~innerloop.data.images.cache_root`: ``$INNERLOOP_CACHE``, else the user cache directory,
``~/.cache/innerloop`` on Linux; never the data folder) under a key made of the image size and the
archives' SHA-256. Preprocessing and downloads show a progress bar when stderr is a terminal.

Drawers: every character was drawn once by each of 20 people; the file name ``IIII_DD.png`` holds
the drawer ``DD`` (01-20), read from the archives' directories into :attr:`Omniglot.drawers` (no
image is decoded for it). ``FewShotClassification(distinct_drawers=...)`` uses it for Lake et al.'s
within-alphabet 20-way one-shot protocol (support and query drawn by different people).

Splits (``split=``):

``vinyals``
    The standard class split of Matching Networks / Prototypical Networks, read from
    ``splits/vinyals/{train,val,test}.txt`` (lines ``Alphabet/characterNN/rotDDD``): rotations by
    0/90/180/270 degrees are separate classes, 1028 / 172 / 423 characters = 4112 / 688 / 1692
    classes. The files are looked for in ``splits_root``, then ``<root>/splits/vinyals``, then
    ``<cache root>/omniglot-splits/vinyals``; if absent they are downloaded from the
    Prototypical Networks repository into ``splits_root``, else the cache root (never the data
    folder). No official checksum exists for them: they are validated by
    content instead (every line must name an existing character, the splits must be disjoint).
``lake``
    The original alphabet split: the 30 background alphabets for meta-training, of which
    ``lake_val_alphabets`` (default 5, chosen by a ``split_seed``-seeded draw from the sorted
    names; or the alphabets named, e.g. :data:`META_DATASET_VAL_ALPHABETS`, Meta-Dataset's)
    are held out for meta-validation, and the 20 evaluation alphabets for meta-testing.
    No rotation classes unless ``rotations=True``.
``maml``
    The split of the MAML code (Finn et al. 2017): the 1623 characters in a ``split_seed``-seeded
    random order (alphabets ignored), the first ``maml_train`` (1200) for training and the other
    423 for testing, with rotations as extra classes (``x4``). MAML has no validation split; here
    the last ``maml_val`` (default 100) of the 1200 training characters are held out for
    validation, so ``maml_val=0`` gives MAML's exact 1200-character training set and no ``val``
    split.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from innerloop.data.archives import data_folder
from innerloop.data.download import (
    MAX_MEMBER_BYTES,
    DataError,
    DownloadError,
    StrPath,
    check_member_size,
    download,
    open_zip,
    read_member,
    sha256_file,
    verify_checksum_list,
)
from innerloop.data.images import (
    ImageClassDataset,
    ImagePreprocessing,
    cache_folder,
    cache_key,
    cached,
    progress_bar,
    size_pair,
    user_cache_dir,
)
from innerloop.tasks import SPLITS, Split

__all__ = [
    "ARCHIVES",
    "META_DATASET_VAL_ALPHABETS",
    "SHA256",
    "SIZES",
    "URLS",
    "VINYALS_SPLIT_URL",
    "Omniglot",
    "load_omniglot_characters",
    "omniglot_archives",
    "omniglot_drawer_ids",
    "omniglot_preprocessing",
    "omniglot_root",
]

OmniglotSplit = Literal["vinyals", "lake", "maml"]
META_DATASET_VAL_ALPHABETS: tuple[str, ...] = (
    "Alphabet_of_the_Magi",
    "Blackfoot_(Canadian_Aboriginal_Syllabics)",
    "Inuktitut_(Canadian_Aboriginal_Syllabics)",
    "Ojibwe_(Canadian_Aboriginal_Syllabics)",
    "Tagalog",
)
"""The background alphabets Meta-Dataset holds out for validation (its Omniglot converter: the five
smallest, 81 characters), for ``lake_val_alphabets``."""
ARCHIVES: tuple[str, str] = ("images_background", "images_evaluation")
URLS: dict[str, str] = {
    name: f"https://github.com/brendenlake/omniglot/raw/master/python/{name}.zip" for name in ARCHIVES
}
# SHA-256 of the official archives (9,464,212 and 6,462,886 bytes), as registered for the same
# URLs in TensorFlow Datasets' url_checksums/omniglot.txt. Checked for downloads only.
SHA256: dict[str, str] = {
    "images_background": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
}
SIZES: dict[str, int] = {"images_background": 9_464_212, "images_evaluation": 6_462_886}
SPLIT_FILE_MAX_BYTES = 1 << 20  # a Vinyals split file is ~40 KB
VINYALS_SPLIT_URL = "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/data/omniglot/splits/vinyals/{split}.txt"


def _has_archives(folder: Path) -> bool:
    return any((folder / f"{n}.zip").is_file() for n in ARCHIVES)


def omniglot_root(root: StrPath | None = None) -> Path:
    """The folder that holds (or will hold) the Omniglot archives; see the module docstring."""
    return data_folder(root, "omniglot", _has_archives)


def _where_to_put(folder: Path, names: Sequence[str]) -> str:
    listing = "; ".join(f"{n}.zip from {URLS[n]}" for n in names)
    return (
        f"put {listing} in {folder} (or pass root=<folder with the archives>, or set "
        "INNERLOOP_DATA=<folder> with the archives in <folder>/omniglot)"
    )


def omniglot_archives(root: StrPath | None = None, download_missing: bool = True) -> dict[str, Path]:
    """``{archive name: path}`` for both archives, downloading (and verifying) missing ones.

    An archive already present is checked against a ``SHA256SUMS`` file beside it when that
    file lists it (see :func:`~innerloop.data.download.verify_checksum_list`).

    Raises:
        DataError: an archive is missing and cannot be downloaded; the message says where to put it.
        ChecksumError: a download does not match :data:`SHA256`, or a present archive does not
            match its ``SHA256SUMS`` entry.
    """
    folder = omniglot_root(root)
    paths = {n: folder / f"{n}.zip" for n in ARCHIVES}
    missing = [n for n in ARCHIVES if not paths[n].is_file()]
    for n in ARCHIVES:
        if n not in missing:
            verify_checksum_list(paths[n])
    if missing and not download_missing:
        raise DataError(
            f"Omniglot archive(s) {', '.join(missing)} not found in {folder}; {_where_to_put(folder, missing)}."
        )
    for n in missing:
        try:
            download(URLS[n], paths[n], sha256=SHA256[n], expected_size=SIZES[n])
        except (DownloadError, OSError) as e:
            raise DataError(
                f"Omniglot archive {n}.zip is not in {folder} and could not be downloaded ({e}); "
                f"{_where_to_put(folder, missing)}."
            ) from e
    return paths


def omniglot_preprocessing(size: int | tuple[int, int] = 28) -> ImagePreprocessing:
    """How every Omniglot drawing is stored: 8-bit grey, resized to ``size`` (Lanczos), inverted so that
    ink = 1: uint8 ``[1, H, W]`` (ink = 255). The loader and :class:`~innerloop.training.predict.Predictor`
    both call it."""
    return ImagePreprocessing(size_pair(size), "L", "lanczos", invert=True)


def _read_archive(
    path: Path, size: tuple[int, int], max_member_bytes: int = MAX_MEMBER_BYTES
) -> tuple[list[str], list[int], np.ndarray]:
    """Character names ``Alphabet/characterNN``, drawings per character, uint8 ``[n, 1, H, W]`` (ink = 255).

    Every PNG member's size is checked against ``max_member_bytes`` before any is read.
    """
    with open_zip(path) as (zf, members):
        pngs = sorted(
            (m for m in members if not m.is_dir() and m.filename.lower().endswith(".png")),
            key=lambda m: m.filename,
        )
        for info in pngs:
            check_member_size(info, path, max_member_bytes)
        names: list[str] = []
        counts: list[int] = []
        out = np.empty((len(pngs), 1, *size), dtype=np.uint8)
        prep = omniglot_preprocessing(size)
        with progress_bar(len(pngs), f"preprocessing {path.name}") as bar:
            for i, info in enumerate(pngs):
                bar.update()
                parts = PurePosixPath(info.filename).parts
                if len(parts) < 3:
                    raise DataError(
                        f"unexpected member {info.filename!r} in {path}: Omniglot images are "
                        "<set>/<Alphabet>/<characterNN>/<image>.png; use the official archive."
                    )
                name = f"{parts[-3]}/{parts[-2]}"
                if not names or names[-1] != name:
                    if name in names:
                        raise DataError(f"{path}: the images of {name} are not contiguous; use the official "
                                        "archive.")
                    names.append(name)
                    counts.append(0)
                counts[-1] += 1
                png = read_member(zf, info, path, max_member_bytes)
                out[i] = prep(png, name=f"{path}:{info.filename}")
    if not names:
        raise DataError(f"{path} holds no PNG images; delete it and download it again (or put a good copy there).")
    return names, counts, out


def load_omniglot_characters(
    root: StrPath | None = None,
    image_size: int | tuple[int, int] = 28,
    cache_dir: StrPath | None = None,
    download: bool = True,
    use_cache: bool = True,
) -> tuple[ImageClassDataset, list[str]]:
    """All 1623 characters, unrotated, and the names of the background alphabets.

    Returns:
        ``(characters, background_alphabets)``: ``characters`` has one class per character,
        named ``Alphabet/characterNN`` with group ``Alphabet``, 20 images ``[20, 1, H, W]``
        each (float32 in [0, 1] when read, ink = 1); background-set characters come first.
    """
    hw = size_pair(image_size)
    folder = omniglot_root(root)
    paths = omniglot_archives(folder, download_missing=download)
    digests = {n: sha256_file(p) for n, p in paths.items()}
    with open_zip(paths["images_background"]) as (_, members):
        background = sorted(
            {
                PurePosixPath(m.filename).parts[-3]
                for m in members
                if m.filename.lower().endswith(".png") and len(PurePosixPath(m.filename).parts) >= 3
            }
        )
    key = cache_key(kind="omniglot", size=hw, archives=digests, resample="lanczos", ink="1")

    def build() -> ImageClassDataset:
        names, counts, arrays = [], [], []
        for n in ARCHIVES:
            nm, ct, arr = _read_archive(paths[n], hw)
            names += nm
            counts += ct
            arrays.append(arr)
        data = torch.from_numpy(np.concatenate(arrays))
        return ImageClassDataset(data, counts, names, [s.split("/")[0] for s in names])

    return cached(build, cache_folder(cache_dir, use_cache, folder), f"omniglot-{hw[0]}x{hw[1]}", key), background


def _drawer(filename: str) -> int:
    """The drawer ``DD`` of an Omniglot image ``.../IIII_DD.png`` (1..20), or -1 for another name."""
    stem = PurePosixPath(filename).stem
    head, sep, tail = stem.rpartition("_")
    return int(tail) if sep and head.isdigit() and tail.isdigit() else -1


def omniglot_drawer_ids(paths: Mapping[str, Path]) -> Tensor:
    """The drawer of every image, int64 ``[images]``, in the row order of
    :func:`load_omniglot_characters`'s dataset (both archives, each sorted by member name); read from
    the file names ``IIII_DD.png`` (-1 where a name does not follow that pattern). Only the archives'
    directories are read, so this is cheap and needs no cache."""
    out: list[int] = []
    for n in ARCHIVES:
        with open_zip(paths[n]) as (_, members):
            names = sorted(m.filename for m in members if not m.is_dir() and m.filename.lower().endswith(".png"))
        out += [_drawer(f) for f in names]
    return torch.tensor(out, dtype=torch.int64)


def _vinyals_files(folder: Path, splits_root: Path | None, download_missing: bool) -> dict[str, Path]:
    candidates = [splits_root] if splits_root is not None else []
    candidates += [folder / "splits" / "vinyals", user_cache_dir() / "omniglot-splits" / "vinyals"]
    for c in candidates:
        if all((c / f"{s}.txt").is_file() for s in SPLITS):
            return {s: c / f"{s}.txt" for s in SPLITS}
    target = splits_root or candidates[-1]
    where = (
        f"put train.txt, val.txt and test.txt (from {VINYALS_SPLIT_URL.format(split='<split>')}) in "
        f"{target} (or pass splits_root=<folder>)"
    )
    if not download_missing:
        raise DataError(f"the Vinyals split files are not in {' or '.join(map(str, candidates))}; {where}.")
    out: dict[str, Path] = {}
    for s in SPLITS:
        try:
            # No official checksum exists for these files; _vinyals_splits validates their content.
            out[s] = download(
                VINYALS_SPLIT_URL.format(split=s), target / f"{s}.txt", sha256=None, max_bytes=SPLIT_FILE_MAX_BYTES
            )
        except (DownloadError, OSError) as e:
            raise DataError(
                f"the Vinyals split files are missing and could not be downloaded ({e}); {where}."
            ) from e
    return out


def _vinyals_splits(
    characters: ImageClassDataset, files: Mapping[str, Path], rotations: bool
) -> dict[str, ImageClassDataset]:
    out: dict[str, ImageClassDataset] = {}
    seen: dict[int, str] = {}  # character index -> the split that lists it
    for s in SPLITS:
        idx: list[int] = []
        turns: list[int] = []
        for line_no, line in enumerate(files[s].read_text().splitlines(), start=1):
            line = line.strip()
            if not line:
                continue
            alphabet_char, _, rot = line.rpartition("/")
            if not rot.startswith("rot") or rot[3:] not in ("000", "090", "180", "270"):
                raise DataError(
                    f"{files[s]}, line {line_no}: expected Alphabet/characterNN/rotDDD with "
                    f"DDD in 000/090/180/270, got {line!r}."
                )
            try:
                c = characters.class_index(alphabet_char)
            except KeyError:
                raise DataError(
                    f"{files[s]}, line {line_no}: no Omniglot character {alphabet_char!r}; "
                    "is this the Vinyals split file?"
                ) from None
            if seen.setdefault(c, s) != s:
                raise DataError(
                    f"{files[s]}, line {line_no}: {alphabet_char} is also in the {seen[c]} split; "
                    "the split files must be disjoint."
                )
            if rotations or rot == "rot000":
                idx.append(c)
                turns.append(int(rot[3:]) // 90)
        out[s] = characters.subset(idx, turns) if rotations else characters.subset(idx)
    return out


def _with_rotations(ds: ImageClassDataset, rotations: bool) -> ImageClassDataset:
    return ds.with_rotations() if rotations else ds


class Omniglot(Mapping[str, ImageClassDataset]):
    """Omniglot as a mapping ``split -> ImageClassDataset`` (``train``, ``val``, ``test``).

    Class images are float32 ``[20, 1, H, W]`` in [0, 1] with ink = 1; each class's group is its
    alphabet (for within-alphabet tasks) and :attr:`drawers` names who drew each image (for tasks whose
    support and query come from different drawers, Lake et al.'s one-shot protocol). See the module
    docstring for files, caching and splits.

    Args:
        root: the folder with the archives (default ``$INNERLOOP_DATA/omniglot``).
        split: ``"vinyals"``, ``"lake"`` or ``"maml"``.
        image_size: side (or ``(height, width)``) after resizing; 28 is standard, 56 and 84 are
            common too, 105 keeps the originals (each size is preprocessed once and cached apart).
        cache_dir: where the preprocessed arrays go (default
            :func:`~innerloop.data.images.cache_root`: ``$INNERLOOP_CACHE``, else the user cache).
        download: download missing archives / split files (verified by checksum).
        rotations: add rotations by 90/180/270 degrees as separate classes; default: as the split
            defines it (vinyals and maml: yes, lake: no). False with ``vinyals`` keeps the rot000
            classes only.
        split_seed: seeds the held-out alphabets of ``lake`` and the character order of ``maml``.
        lake_val_alphabets: background alphabets held out for ``val`` in the ``lake`` split: how
            many (drawn by ``split_seed``), or their names (e.g. :data:`META_DATASET_VAL_ALPHABETS`).
        maml_train: characters for train + val in the ``maml`` split (the rest is test).
        maml_val: of those, characters held out for ``val`` (0: no ``val`` split).
        splits_root: the folder with the Vinyals ``{train,val,test}.txt``.
        use_cache: False to neither read nor write the preprocessed cache.
    """

    def __init__(
        self,
        root: StrPath | None = None,
        split: OmniglotSplit = "vinyals",
        image_size: int | tuple[int, int] = 28,
        cache_dir: StrPath | None = None,
        download: bool = True,
        rotations: bool | None = None,
        split_seed: int = 0,
        lake_val_alphabets: int | Sequence[str] = 5,
        maml_train: int = 1200,
        maml_val: int = 100,
        splits_root: StrPath | None = None,
        use_cache: bool = True,
    ) -> None:
        if split not in ("vinyals", "lake", "maml"):
            raise ValueError(f"unknown Omniglot split {split!r}; choose vinyals, lake or maml.")
        self.root = omniglot_root(root)
        self.split = split
        self.characters, self.background_alphabets = load_omniglot_characters(
            self.root, image_size, cache_dir, download, use_cache
        )
        self.drawers = omniglot_drawer_ids({n: self.root / f"{n}.zip" for n in ARCHIVES})
        """The drawer (``DD`` of ``IIII_DD.png``, 1..20) of every stored image, int64 ``[images]``, aligned
        with the rows of ``characters.data`` (which every split shares): image ``j`` of class ``c`` of a
        split ``ds`` was drawn by ``drawers[ds.starts[c] + j]``."""
        if len(self.drawers) != len(self.characters.data):
            raise DataError(f"the Omniglot archives in {self.root} hold {len(self.drawers)} images but the "
                            f"preprocessed cache holds {len(self.characters.data)}; delete the cache "
                            "(see innerloop.data.images.cache_root) to rebuild it.")
        self.splits: dict[str, ImageClassDataset] = {}
        chars = self.characters
        if split == "vinyals":
            files = _vinyals_files(self.root, None if splits_root is None else Path(splits_root), download)
            self.splits = _vinyals_splits(chars, files, rotations is not False)
        elif split == "lake":
            rot = bool(rotations)
            background = sorted(self.background_alphabets)
            if not isinstance(lake_val_alphabets, int):
                names = [lake_val_alphabets] if isinstance(lake_val_alphabets, str) else lake_val_alphabets
                val = {str(a) for a in names}
                unknown = sorted(val - set(background))
                if unknown or len(val) >= len(background):
                    raise ValueError(
                        f"lake_val_alphabets names {', '.join(unknown) or 'every background alphabet'}: name "
                        f"background alphabets ({', '.join(background[:3])}, ...), leaving at least one to train."
                    )
            elif not 0 <= lake_val_alphabets < len(background):
                raise ValueError(
                    f"lake_val_alphabets={lake_val_alphabets} but there are {len(background)} background "
                    f"alphabets; hold out between 0 and {len(background) - 1}."
                )
            else:
                val = set(random.Random(split_seed).sample(background, lake_val_alphabets))
            bg = set(background)
            parts = {
                "train": [i for i, g in enumerate(chars.groups) if g in bg and g not in val],
                "val": [i for i, g in enumerate(chars.groups) if g in val],
                "test": [i for i, g in enumerate(chars.groups) if g not in bg],
            }
            self.splits = {s: _with_rotations(chars.subset(ix), rot) for s, ix in parts.items() if ix}
        else:
            rot = rotations is not False
            n = chars.num_classes
            if not 0 < maml_train < n or not 0 <= maml_val < maml_train:
                raise ValueError(
                    f"maml_train={maml_train}, maml_val={maml_val} with {n} characters: need "
                    f"0 < maml_train < {n} and 0 <= maml_val < maml_train."
                )
            order = list(range(n))
            random.Random(split_seed).shuffle(order)
            parts = {
                "train": order[: maml_train - maml_val],
                "val": order[maml_train - maml_val : maml_train],
                "test": order[maml_train:],
            }
            self.splits = {s: _with_rotations(chars.subset(ix), rot) for s, ix in parts.items() if ix}

    def drawer_ids(self) -> dict[str, Tensor]:
        """``{split: drawers}``: for each split, the drawer of every row of its dataset's ``data`` (the
        same tensor for every split: they share the storage), for ``FewShotClassification(drawers=...)``."""
        return {s: self.drawers for s in self.splits}

    def __getitem__(self, split: str) -> ImageClassDataset:
        try:
            return self.splits[split]
        except KeyError:
            raise KeyError(
                f"the Omniglot {self.split} split has no {split!r} part; it has {', '.join(self.splits)}."
            ) from None

    def __iter__(self) -> Iterator[Split]:
        return iter(s for s in SPLITS if s in self.splits)

    def __len__(self) -> int:
        return len(self.splits)

    def __repr__(self) -> str:
        parts = ", ".join(f"{s}={len(d)} classes" for s, d in self.splits.items())
        return f"Omniglot({self.root}, split={self.split!r}: {parts})"
