"""Reading tar archives and pickles without trusting them.

* :func:`iter_tar` streams the regular files of a ``.tar`` / ``.tar.gz`` / ``.tgz`` archive
  into memory, one member at a time: nothing is written to disk, so no member can land outside
  a folder. Every member is still checked as it arrives: an absolute path, a ``..`` component,
  a drive letter, a NUL byte, a symbolic or hard link, a device or a FIFO makes the whole
  archive an :class:`~innerloop.data.download.UnsafeArchiveError`, and a member larger than
  ``max_member_bytes`` a :class:`~innerloop.data.download.SizeLimitError`, refused from its
  header before it is read. Callers build their dataset from the whole pass and cache it only
  when the pass completes, so an archive refused half-way leaves nothing behind. A truncated or
  damaged archive becomes a :class:`~innerloop.data.download.CorruptArchiveError`.
* :func:`fetch_verified` downloads an official archive (https only, through
  :func:`~innerloop.data.download.download`) and checks it against the publisher's MD5 (and a
  SHA-256 where one is registered) before it takes its final name.
* :func:`packaged_split` reads a class list shipped with the package (``innerloop/data/splits``).
* :func:`restricted_unpickle` loads a pickle that may hold only plain data - ``None``, bools,
  numbers, ``str``, ``bytes``, lists, tuples, dicts, sets - and numpy arrays and scalars of a
  plain dtype (bool, integer, float, complex, bytes or str: no object, void or structured dtype).
  Any other global a pickle names (a function, a class, ``os.system``, ...) is refused *before* it
  is looked up, so loading cannot run code: an :class:`UnsafePickleError`. ``numpy.ndarray`` is
  not callable from the pickle, and a dtype or array state that a pickle's BUILD rewrites (flags,
  fields) is checked before numpy applies it.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import lzma
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import IO, Any

import numpy as np
import platformdirs

from innerloop.data.download import (
    MAX_MEMBER_BYTES,
    ChecksumError,
    CorruptArchiveError,
    SizeLimitError,
    StrPath,
    UnsafeArchiveError,
    corrupt_archive,
    download,
    member_problem,
    remove_quietly,
    size_text,
    unsafe_archive,
)

__all__ = [
    "UnsafePickleError",
    "data_folder",
    "fetch_verified",
    "file_identity",
    "iter_tar",
    "md5_file",
    "packaged_split",
    "restricted_unpickle",
]

_CHUNK = 1 << 20


class UnsafePickleError(UnsafeArchiveError):
    """A pickle names a global (function, class) that is not on the short list of plain data types."""


def data_folder(root: StrPath | None, name: str, present: Callable[[Path], bool]) -> Path:
    """Where a dataset's files are (or will go).

    ``root`` when given (or ``root/<name>`` when only that holds the files, by ``present``);
    else ``$INNERLOOP_DATA/<name>``; else ``<user data directory>/<name>``
    (``platformdirs.user_data_dir("innerloop")``: ``$XDG_DATA_HOME/innerloop``, default
    ``~/.local/share/innerloop``, on Linux).
    """
    if root is not None:
        folder = Path(root).expanduser()
        return folder / name if not present(folder) and present(folder / name) else folder
    env = os.environ.get("INNERLOOP_DATA")
    if env:
        return Path(env).expanduser() / name
    return Path(platformdirs.user_data_dir("innerloop", appauthor=False)) / name


def file_identity(path: Path) -> dict[str, object]:
    """A cheap identity of a (large) source file for a cache key: its path, size and modification time."""
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def packaged_split(*parts: str) -> list[str]:
    """The non-empty lines of the class list ``innerloop/data/splits/<parts...>`` shipped with the package."""
    res = resources.files("innerloop.data").joinpath("splits", *parts)
    try:
        text = res.read_text(encoding="utf-8")
    except OSError as e:  # pragma: no cover - only a broken installation lacks them
        raise FileNotFoundError(
            f"the class list splits/{'/'.join(parts)} is missing from the installed innerloop package ({e}); "
            "reinstall innerloop."
        ) from e
    return [line.strip() for line in text.splitlines() if line.strip()]


def md5_file(path: StrPath) -> str:
    """Hex MD5 of a file's bytes (the checksum some publishers give; SHA-256 is checked too where known)."""
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_verified(url: str, dest: StrPath, *, md5: str, size: int, sha256: str | None = None) -> Path:
    """Download ``url`` to ``dest`` and verify it; ``dest`` appears only once it matches.

    The bytes go through :func:`~innerloop.data.download.download` (https only, capped at twice
    ``size``, SHA-256 checked while streaming when ``sha256`` is given) into a hidden file beside
    ``dest``, whose MD5 is then compared with the publisher's ``md5``; only a match is renamed to
    ``dest``.

    Raises:
        ChecksumError: the SHA-256 or MD5 differs; nothing is left under ``dest``.
        DownloadError, SizeLimitError, InsecureURLError: see :func:`~innerloop.data.download.download`.
    """
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.unverified")
    try:
        download(url, tmp, sha256=sha256, expected_size=size)
        actual = md5_file(tmp)
        if actual != md5.lower():
            raise ChecksumError(
                f"checksum mismatch for {url}: expected md5 {md5.lower()} (the publisher's), got {actual}. The "
                f"download was discarded (nothing written to {dest}); retry, or download it by hand and put it "
                f"at {dest} after checking it."
            )
        os.replace(tmp, dest)
    except BaseException:
        remove_quietly(tmp)
        raise
    return dest


def iter_tar(
    path: StrPath,
    select: Callable[[str], bool] | None = None,
    max_member_bytes: int | Callable[[str], int] = MAX_MEMBER_BYTES,
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, bytes)`` for the regular files of a tar archive, in archive order.

    The archive (plain, gzip, bzip2 or xz; detected from its bytes) is read as one stream.
    Every member is checked (see the module docstring), chosen or not; ``select(name)`` keeps a
    regular file (default: all); ``max_member_bytes`` caps a chosen member's size (an int, or a
    function of the member name) and is checked from the header before the member is read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafeArchiveError: an unsafe member (path or type); the message names it.
        SizeLimitError: a chosen member is larger than its cap.
        CorruptArchiveError: the archive is not a tar archive, or is truncated or damaged.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no tar archive at {path}.")
    cap = max_member_bytes if callable(max_member_bytes) else (lambda _name, n=max_member_bytes: n)
    try:
        with open(path, "rb") as raw:
            stream = _decompressed(raw, path)
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                for info in tf:
                    yield from _member(tf, info, path, select, cap)
            # tarfile takes a truncated archive's end for the end of the archive: reading the
            # compressed stream to its end checks its end-of-stream marker and checksum.
            while stream.read(_CHUNK):
                pass
    except (tarfile.TarError, EOFError, zlib.error, lzma.LZMAError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise corrupt_archive("tar", path, e) from e


def _decompressed(raw: IO[bytes], path: Path) -> IO[bytes]:
    """The tar bytes of ``raw``: gzip, bzip2 or xz by its magic bytes, else plain (then checked for
    the end-of-archive marker, since an uncompressed archive has no checksum of its own)."""
    magic = raw.read(6)
    raw.seek(0)
    if magic[:2] == b"\x1f\x8b":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if magic[:3] == b"BZh":
        return bz2.BZ2File(raw, mode="rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.LZMAFile(raw, mode="rb")
    size = path.stat().st_size
    raw.seek(max(size - 1024, 0))
    tail = raw.read(1024)
    raw.seek(0)
    if size % 512 or size < 1024 or tail.count(0) != len(tail):
        raise tarfile.ReadError(
            f"it is {size} bytes and does not end with the two zero blocks that close a tar archive"
        )
    return raw


def _member(
    tf: tarfile.TarFile,
    info: tarfile.TarInfo,
    path: Path,
    select: Callable[[str], bool] | None,
    cap: Callable[[str], int],
) -> Iterator[tuple[str, bytes]]:
    """Check one member (see :func:`iter_tar`); yield it if it is a chosen regular file."""
    name = info.name
    problem = member_problem(name)
    if problem is None and (info.issym() or info.islnk()):
        problem = f"a {'symbolic' if info.issym() else 'hard'} link (to {info.linkname!r})"
    if problem is None and not (info.isfile() or info.isdir()):
        problem = "a special file type (device, FIFO, ...)"
    if problem is not None:
        raise unsafe_archive("tar", path, name, problem)
    if info.isdir() or (select is not None and not select(name)):
        return
    limit = cap(name)
    if info.size > limit:
        raise SizeLimitError(
            f"refusing to read member {name!r} of the tar archive {path}: it is {size_text(info.size)}, over "
            f"the cap of {size_text(limit)} for it. The archive is damaged or hostile; delete it and get it from "
            "its official source."
        )
    f = tf.extractfile(info)
    data = b"" if f is None else f.read()
    if len(data) != info.size:
        short = EOFError(f"member {name!r} ends after {len(data)} of {info.size} bytes")
        raise corrupt_archive("tar", path, short)
    yield name, data


# ----------------------------------------------------------------------------------------------
# restricted unpickling

_RECONSTRUCT_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
_PLAIN_KINDS = "biufcSU"  # bool, integers, floats, complex, bytes, str: no void, structured or object


def _plain_dtype(dt: Any, where: str) -> np.dtype[Any]:
    """``dt`` as a numpy dtype, refused unless it is a plain one (see :data:`_PLAIN_KINDS`) exactly as
    numpy itself builds it: a pickle's BUILD can rewrite a dtype's flags and fields after it was made."""
    try:
        out: np.dtype[Any] = np.dtype(dt)
    except TypeError as e:
        raise UnsafePickleError(f"{where}: the pickle asks for an invalid numpy dtype {dt!r} ({e}).") from e
    if out.hasobject:
        raise UnsafePickleError(
            f"{where}: the pickle holds a numpy array of object dtype, which would unpickle arbitrary "
            "objects; only arrays of numbers, bytes or strings are accepted."
        )
    fresh = np.dtype(out.str) if out.kind in _PLAIN_KINDS and out.fields is None and out.subdtype is None else None
    if fresh is None or fresh.flags != out.flags or fresh.itemsize != out.itemsize:
        raise UnsafePickleError(
            f"{where}: the pickle holds the numpy dtype {out!r} (kind {out.kind!r}, flags {out.flags}); only "
            "plain numbers, bytes and strings, unaltered, are accepted."
        )
    return out


class _NdarrayName:
    """What the global ``numpy.ndarray`` unpickles to: a marker for ``_reconstruct``, not callable, so a
    pickle cannot call ``numpy.ndarray(shape, dtype, buffer, ...)`` itself."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()


class _GuardedArray(np.ndarray):
    """The arrays being unpickled: their ``__setstate__`` (the pickle's BUILD) checks the dtype and the
    data before numpy copies them in; :func:`_plain` turns them into plain arrays afterwards."""

    _where = "<pickle>"

    def __setstate__(self, state: Any) -> None:
        where = self._where
        if not (isinstance(state, tuple) and len(state) == 5):
            raise UnsafePickleError(f"{where}: a numpy array with a state of {type(state).__name__}.")
        if not isinstance(state[2], np.dtype) or not isinstance(state[4], bytes | str):
            raise UnsafePickleError(f"{where}: a numpy array whose state is not a dtype and raw bytes.")
        _plain_dtype(state[2], where)
        super().__setstate__(state)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only numpy arrays / dtypes / scalars of plain dtype, and ``_codecs.encode`` to bytes."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file, encoding="latin1")  # latin1: Python 2 pickles of numpy arrays
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        where = self.where
        if module in _RECONSTRUCT_MODULES and name == "_reconstruct":

            def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
                if subtype is not _NDARRAY:
                    raise UnsafePickleError(f"{where}: the pickle rebuilds an array of type {subtype!r}.")
                if not isinstance(shape, tuple) or not all(type(n) is int and n >= 0 for n in shape) or (
                    int(np.prod(shape)) != 0
                ):  # numpy pickles an empty array, then fills it from its state: anything else is not numpy's
                    raise UnsafePickleError(
                        f"{where}: the pickle rebuilds an array of shape {shape!r}, not an empty one."
                    )
                arr = np.ndarray.__new__(_GuardedArray, shape, _plain_dtype(dtype, where))
                arr._where = where
                return arr

            return reconstruct
        if module in _RECONSTRUCT_MODULES and name == "scalar":

            def scalar(dtype: Any, data: Any = None) -> Any:
                dt = _plain_dtype(dtype, where)
                raw = data.encode("latin1") if isinstance(data, str) else data
                if not isinstance(raw, bytes) or len(raw) != dt.itemsize:
                    raise UnsafePickleError(f"{where}: a numpy scalar of {dt} with {type(data).__name__} data.")
                return np.frombuffer(raw, dtype=dt)[0]

            return scalar
        if module == "numpy" and name == "ndarray":
            return _NDARRAY
        if module == "numpy" and name == "dtype":

            def dtype(obj: Any, align: bool = False, copy: bool = False) -> np.dtype[Any]:
                if not isinstance(obj, str):
                    raise UnsafePickleError(
                        f"{where}: the pickle builds a numpy dtype from a {type(obj).__name__}, not a name."
                    )
                made: np.dtype[Any] = np.dtype(obj, bool(align), bool(copy))
                return _plain_dtype(made, where)

            return dtype
        if module == "_codecs" and name == "encode":

            def encode(text: Any, encoding: Any = "utf-8") -> bytes:
                if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
                    raise UnsafePickleError(f"{where}: the pickle calls _codecs.encode on {type(text).__name__}.")
                return text.encode("latin1")

            return encode
        raise UnsafePickleError(
            f"refusing to unpickle {where}: it names the global {module}.{name}, and only plain data (numbers, "
            "strings, bytes, lists, dicts, numpy arrays) is accepted: a pickle that names a function or class "
            "can run code when loaded. If this file is genuine, convert it to .npz (numpy.savez) on a trusted "
            "machine."
        )


def _plain(obj: Any, where: str, depth: int = 0) -> Any:
    """``obj`` checked to be plain data, with the arrays being unpickled turned into plain ndarrays."""
    if depth > 64:
        raise UnsafePickleError(f"{where}: the pickled data is nested more than 64 levels deep.")
    if isinstance(obj, np.ndarray | np.generic):
        if obj.dtype.hasobject:
            raise UnsafePickleError(f"{where}: the pickle holds a numpy array of object dtype.")
        _plain_dtype(obj.dtype, where)
        return obj.view(np.ndarray) if isinstance(obj, np.ndarray) else obj
    if obj is None or isinstance(obj, bool | int | float | complex | str | bytes | bytearray):
        return obj
    if isinstance(obj, list):
        return [_plain(x, where, depth + 1) for x in obj]
    if isinstance(obj, tuple | set | frozenset):
        return type(obj)(_plain(x, where, depth + 1) for x in obj)
    if isinstance(obj, dict):
        return {_plain(k, where, depth + 1): _plain(v, where, depth + 1) for k, v in obj.items()}
    raise UnsafePickleError(f"{where}: the pickle holds an object of type {type(obj).__name__}.")


def restricted_unpickle(source: StrPath | bytes, name: str | None = None) -> Any:
    """Load a pickle of plain data (see the module docstring) from a file path or bytes.

    Python 2 pickles are read with ``encoding="latin1"`` (their ``str`` become ``str``).

    Raises:
        UnsafePickleError: the pickle names a global off the list, or holds an object-dtype array.
        CorruptArchiveError: the bytes are not a valid pickle.
    """
    where = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        if isinstance(source, bytes):
            obj = _RestrictedUnpickler(io.BytesIO(source), where).load()
        else:
            with open(source, "rb") as f:
                obj = _RestrictedUnpickler(f, where).load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise CorruptArchiveError(
            f"cannot unpickle {where}: {type(e).__name__}: {e}. The file is truncated or not the expected "
            "pickle; delete it and get it again."
        ) from e
    return _plain(obj, where)
