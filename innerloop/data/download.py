"""Downloading files with SHA-256 verification, and reading zip archives safely.

* :func:`download` fetches a URL into a temporary file next to the destination, checks its
  SHA-256 while streaming and only then moves it into place with :func:`os.replace`, so a
  half-downloaded or wrong file never sits under the final name.
* :func:`safe_members` validates *every* member of a zip archive before any of it is used:
  absolute paths, ``..`` components, drive letters and symbolic links are refused, naming the
  bad member. :func:`iter_zip` and :func:`extract_zip` are built on it.
* A truncated or corrupt archive (:class:`zipfile.BadZipFile`, a CRC mismatch, a broken
  deflate stream) becomes a :class:`CorruptArchiveError` that names the file and the way out.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import TypeAlias

__all__ = [
    "ChecksumError",
    "CorruptArchiveError",
    "DataError",
    "DownloadError",
    "StrPath",
    "UnsafeArchiveError",
    "download",
    "extract_zip",
    "iter_zip",
    "open_zip",
    "safe_members",
    "sha256_file",
]

_CHUNK = 1 << 20

StrPath: TypeAlias = str | os.PathLike[str]
"""A file-system path argument: a ``str`` or a :class:`pathlib.Path` (any ``os.PathLike[str]``)."""


class DataError(RuntimeError):
    """Base class of the data-pipeline errors: missing, corrupt, unsafe or mismatched files."""


class DownloadError(DataError):
    """A download failed (no network, HTTP error, ...)."""


class ChecksumError(DataError):
    """A downloaded file's SHA-256 differs from the expected one."""


class UnsafeArchiveError(DataError):
    """A zip archive holds a member that could write or read outside its folder."""


class CorruptArchiveError(DataError):
    """A zip archive is truncated or damaged."""


def sha256_file(path: StrPath) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def remove_quietly(path: StrPath) -> None:
    with suppress(FileNotFoundError):
        os.unlink(path)


def download(
    url: str,
    dest: StrPath,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    The bytes go to a temporary file in ``dest``'s folder; the file is moved to ``dest`` with
    :func:`os.replace` only once complete and (when ``sha256`` is given) verified, so ``dest``
    is either absent or whole. An existing ``dest`` is replaced.

    Args:
        url: what to fetch.
        dest: where the file goes; its folder is created if needed.
        sha256: the expected hex SHA-256, or None to skip verification (only for files whose
            checksum is not known).
        timeout: socket timeout in seconds.
        progress: called as ``progress(bytes_so_far, total_or_None)`` after each chunk.

    Raises:
        DownloadError: the URL could not be fetched; the message says where to put the file by hand.
        ChecksumError: the bytes do not match ``sha256``; nothing is left under ``dest``.
    """
    dest = Path(dest)
    by_hand = f"download {url} by hand (on a machine with network) and put it at {dest}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(
            f"cannot create the folder {dest.parent} for {url}: {e}; choose a writable folder, or {by_hand}."
        ) from e
    try:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    except OSError as e:
        raise DownloadError(
            f"cannot write into {dest.parent} to download {url}: {e}; choose a writable folder, or {by_hand}."
        ) from e
    h = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "innerloop"})
                with urllib.request.urlopen(request, timeout=timeout) as response:
                    total = response.headers.get("Content-Length")
                    total_n = int(total) if total and total.isdigit() else None
                    done = 0
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        out.write(chunk)
                        h.update(chunk)
                        done += len(chunk)
                        if progress is not None:
                            progress(done, total_n)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DownloadError(
                    f"could not download {url}: {e}. If this machine is offline, {by_hand}."
                ) from e
        actual = h.hexdigest()
        if sha256 is not None and actual.lower() != sha256.lower():
            raise ChecksumError(
                f"checksum mismatch for {url}: expected sha256 {sha256.lower()}, got {actual}. The download "
                f"was discarded (nothing written to {dest}); retry, or {by_hand} after checking it."
            )
        os.replace(tmp, dest)
    except BaseException:
        remove_quietly(tmp)
        raise
    return dest


# ----------------------------------------------------------------------------------------------
# zip archives

_DRIVE = re.compile(r"^[A-Za-z]:")


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` is unsafe to use, or None if it is fine."""
    name = info.filename
    if not name or "\x00" in name:
        return "an empty name or a NUL byte in its name"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' component (it would escape the extraction folder)"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return None


def _corrupt(path: Path, err: BaseException, member: str | None = None) -> CorruptArchiveError:
    where = f" (member {member!r})" if member else ""
    return CorruptArchiveError(
        f"the zip archive {path} is truncated or corrupt{where}: {err}. Delete it and download it again "
        f"(or put a good copy of {path.name} in {path.parent})."
    )


def safe_members(archive: zipfile.ZipFile, path: StrPath | None = None) -> list[zipfile.ZipInfo]:
    """Every member of ``archive``, after checking that *all* of them are safe.

    Raises:
        UnsafeArchiveError: a member has an absolute path, a ``..`` component, a drive letter or
            is a symbolic link; the message names the member and the archive.
    """
    shown = path if path is not None else archive.filename
    infos = archive.infolist()
    for info in infos:
        problem = _member_problem(info)
        if problem is not None:
            raise UnsafeArchiveError(
                f"refusing to use the zip archive {shown}: member {info.filename!r} has {problem}. "
                "The archive is damaged or malicious; delete it and get the file from its official source."
            )
    return infos


@contextmanager
def open_zip(path: StrPath) -> Iterator[tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]]:
    """Open a zip archive and validate all its members: ``with open_zip(p) as (zf, members)``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptArchiveError: the archive is truncated or damaged (also for errors raised while
            reading members inside the ``with`` block).
        UnsafeArchiveError: see :func:`safe_members`.
    """
    path = Path(path)
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise _corrupt(path, e) from e
    with zf:
        members = safe_members(zf, path)
        try:
            yield zf, members
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise _corrupt(path, e) from e


def iter_zip(path: StrPath, suffixes: tuple[str, ...] | None = None) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, bytes)`` for the files of a zip archive, sorted by name.

    Every member is validated (:func:`safe_members`) before the first one is read; directory
    entries are skipped; ``suffixes`` (lower-case, e.g. ``(".png",)``) keeps only matching names.
    CRCs are checked while reading.

    Raises:
        CorruptArchiveError, UnsafeArchiveError: see :func:`open_zip`.
    """
    path = Path(path)
    with open_zip(path) as (zf, members):
        chosen = [
            m for m in members if not m.is_dir() and (suffixes is None or m.filename.lower().endswith(suffixes))
        ]
        for info in sorted(chosen, key=lambda m: m.filename):
            try:
                data = zf.read(info)
            except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                raise _corrupt(path, e, info.filename) from e
            yield info.filename, data


def extract_zip(path: StrPath, dest: StrPath) -> Path:
    """Extract a zip archive into ``dest`` (created if needed) and return ``dest``.

    All members are validated before anything is written; the archive is extracted into a
    temporary folder beside ``dest`` whose entries are then moved into ``dest``, so a corrupt
    archive leaves no partial files behind.

    Raises:
        CorruptArchiveError, UnsafeArchiveError: see :func:`open_zip`.
    """
    path, dest = Path(path), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
    try:
        with open_zip(path) as (zf, members):
            for info in members:
                target = tmp / PurePosixPath(info.filename.replace("\\", "/"))
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    with zf.open(info) as src, open(target, "wb") as out:
                        shutil.copyfileobj(src, out, _CHUNK)
                except (zipfile.BadZipFile, zlib.error, EOFError) as e:
                    raise _corrupt(path, e, info.filename) from e
        for entry in tmp.iterdir():
            final = dest / entry.name
            if final.is_dir() and entry.is_dir():
                shutil.rmtree(final)
            os.replace(entry, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
