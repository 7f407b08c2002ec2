"""Downloading files safely, verifying checksums, and reading zip archives safely.

* :func:`download` accepts only ``https://`` URLs and follows only redirects that stay on https
  (:class:`HttpsOnlyRedirectHandler`); it streams into a temporary file next to the destination,
  checks the SHA-256 while streaming, aborts once ``max_bytes`` is exceeded, and only then moves
  the file into place with :func:`os.replace` (permissions as the user's umask gives), so a
  half-downloaded, oversized or wrong file never sits under the final name.
* :func:`verify_checksum_list` checks a local file against a ``SHA256SUMS`` file beside it
  (``<sha256>  <name>`` lines, as ``sha256sum`` writes them) when there is one.
* :func:`safe_members` validates *every* member of a zip archive before any of it is used:
  absolute paths, ``..`` components, drive letters and symbolic links are refused, naming the
  bad member. :func:`iter_zip`, :func:`read_member` and :func:`extract_zip` are built on it and
  refuse a member whose uncompressed size exceeds a cap before reading it; members are read in
  chunks, and the bytes read are counted against the cap.
* :func:`extract_zip` never deletes what it did not create: it extracts into an empty or new
  folder, or over a previous extraction of the same archive (recorded in a marker file).
* A truncated or corrupt archive (:class:`zipfile.BadZipFile`, a CRC mismatch, a broken
  deflate stream) becomes a :class:`CorruptArchiveError` that names the file and the way out.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeAlias

from tqdm import tqdm

from innerloop.io import current_umask

__all__ = [
    "DEFAULT_MAX_DOWNLOAD_BYTES",
    "EXTRACT_MARKER",
    "MAX_MEMBER_BYTES",
    "SUMS_FILE",
    "ChecksumError",
    "CorruptArchiveError",
    "DataError",
    "DownloadError",
    "HttpsOnlyRedirectHandler",
    "InsecureURLError",
    "SizeLimitError",
    "StrPath",
    "UnsafeArchiveError",
    "check_member_size",
    "check_url",
    "corrupt_archive",
    "download",
    "extract_zip",
    "https_opener",
    "iter_zip",
    "member_problem",
    "open_zip",
    "read_member",
    "safe_members",
    "sha256_file",
    "size_text",
    "unsafe_archive",
    "verify_checksum_list",
]

_CHUNK = 1 << 20

DEFAULT_MAX_DOWNLOAD_BYTES = 2 << 30
"""The download size cap when neither ``max_bytes`` nor ``expected_size`` is given (2 GiB)."""
MAX_MEMBER_BYTES = 64 << 20
"""The default cap on a zip member's uncompressed size (64 MiB; an Omniglot PNG is < 1 KiB)."""
SUMS_FILE = "SHA256SUMS"
"""The checksum list looked for beside a local archive."""
EXTRACT_MARKER = ".innerloop-extract.json"
"""The file :func:`extract_zip` writes into its destination to record what it created."""

StrPath: TypeAlias = str | os.PathLike[str]
"""A file-system path argument: a ``str`` or a :class:`pathlib.Path` (any ``os.PathLike[str]``)."""


class DataError(RuntimeError):
    """Base class of the data-pipeline errors: missing, corrupt, unsafe or mismatched files."""


class DownloadError(DataError):
    """A download failed (no network, HTTP error, ...)."""


class InsecureURLError(DownloadError, ValueError):
    """A URL (or a redirect target) is not https; nothing is fetched from it."""


class ChecksumError(DataError):
    """A file's SHA-256 differs from the expected one (a download's, or a ``SHA256SUMS`` entry)."""


class SizeLimitError(DataError):
    """A download, an archive member or an image is larger than its cap."""


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


def _chmod_as_umask(path: StrPath) -> None:
    """Give a file made by :func:`tempfile.mkstemp` (always 0600) the mode a plain ``open`` would."""
    os.chmod(path, 0o666 & ~current_umask())


# ----------------------------------------------------------------------------------------------
# downloads


def check_url(url: str) -> None:
    """Refuse anything but an ``https://`` URL with a host.

    Raises:
        InsecureURLError (a ValueError): another scheme (``http``, ``file``, ``data``, ``ftp``, ...)
            or no host; the message names the URL.
    """
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError as e:
        raise InsecureURLError(f"refusing to download {url!r}: it is not a valid URL ({e}).") from e
    if parts.scheme.lower() != "https" or not host:
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise InsecureURLError(
            f"refusing to download {url!r}: only https:// URLs are accepted (got {got}"
            f"{'' if host or not parts.scheme else ', no host'}). Use the https address of the file, "
            "or put the file in place by hand."
        )


class HttpsOnlyRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows a redirect only if its target is https too; a downgrade raises :class:`InsecureURLError`."""

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: http.client.HTTPMessage,
        newurl: str,
    ) -> urllib.request.Request | None:
        target = urllib.parse.urljoin(req.full_url, newurl)
        if urllib.parse.urlsplit(target).scheme.lower() != "https":
            with suppress(Exception):
                fp.close()
            raise InsecureURLError(
                f"refusing the redirect of {req.full_url} to {target} (HTTP {code}): it leaves https. "
                "Nothing was downloaded from it; use an https source, or put the file in place by hand."
            )
        return super().redirect_request(req, fp, code, msg, headers, target)


def https_opener(*handlers: urllib.request.BaseHandler) -> urllib.request.OpenerDirector:
    """A urllib opener whose redirects must stay on https (``handlers`` are added, e.g. for tests)."""
    return urllib.request.build_opener(HttpsOnlyRedirectHandler(), *handlers)


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``"1.5 MiB (1572864 bytes)"``, or ``"512 bytes"`` under 1 KiB."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n} bytes)"
    return f"{n} bytes"


def download(
    url: str,
    dest: StrPath,
    sha256: str | None = None,
    timeout: float = 60.0,
    progress: Callable[[int, int | None], None] | bool | None = None,
    *,
    max_bytes: int | None = None,
    expected_size: int | None = None,
    opener: urllib.request.OpenerDirector | None = None,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    Only ``https://`` URLs are fetched, and only redirects that stay on https are followed. The
    bytes go to a temporary file in ``dest``'s folder; the file is moved to ``dest`` with
    :func:`os.replace` only once complete, within ``max_bytes`` and (when ``sha256`` is given)
    verified, so ``dest`` is either absent or whole. An existing ``dest`` is replaced. The file
    gets the permissions the user's umask gives a new file.

    Args:
        url: what to fetch (``https://`` only).
        dest: where the file goes; its folder is created if needed.
        sha256: the expected hex SHA-256, or None to skip verification (only for files whose
            checksum is not known).
        timeout: socket timeout in seconds.
        progress: called as ``progress(bytes_so_far, total_or_None)`` after each chunk; ``None``
            (the default): a tqdm bar on stderr when it is a terminal; ``False``: nothing.
        max_bytes: abort (and remove the partial file) once more bytes than this arrive, or at
            once when the server announces more. Default: twice ``expected_size`` when given,
            else :data:`DEFAULT_MAX_DOWNLOAD_BYTES` (2 GiB).
        expected_size: the file's known size in bytes, if any (sets the default ``max_bytes``).
        opener: the urllib opener to use (default :func:`https_opener`); for tests.

    Raises:
        InsecureURLError: ``url`` is not https, or a redirect leaves https (also a ValueError).
        DownloadError: the URL could not be fetched; the message says where to put the file by hand.
        SizeLimitError: more than ``max_bytes`` arrived (or were announced); nothing is left.
        ChecksumError: the bytes do not match ``sha256``; nothing is left under ``dest``.
    """
    check_url(url)
    dest = Path(dest)
    if max_bytes is None:
        max_bytes = 2 * expected_size if expected_size else DEFAULT_MAX_DOWNLOAD_BYTES
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}.")
    by_hand = f"download {url} by hand (on a machine with network) and put it at {dest}"

    def too_large(what: str) -> SizeLimitError:
        return SizeLimitError(
            f"refusing to download {url}: {what}, over the cap of {size_text(max_bytes)} (max_bytes). "
            f"Nothing was written to {dest}. If the file is genuinely this large, pass a larger "
            f"max_bytes, or {by_hand} after checking it."
        )

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
    bar: tqdm[Any] | None = None
    if progress is None and sys.stderr.isatty():
        bar = tqdm(desc=f"downloading {dest.name}", unit="B", unit_scale=True, leave=False, file=sys.stderr)

        def progress(done: int, total: int | None) -> None:
            assert bar is not None
            if total is not None and bar.total != total:
                bar.total = total
            bar.update(done - bar.n)

    report = progress if callable(progress) else None
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "innerloop"})
                with (opener or https_opener()).open(request, timeout=timeout) as response:
                    total = response.headers.get("Content-Length")
                    total_n = int(total) if total and total.isdigit() else None
                    if total_n is not None and total_n > max_bytes:
                        raise too_large(f"the server announces {size_text(total_n)}")
                    done = 0
                    for chunk in iter(lambda: response.read(_CHUNK), b""):
                        done += len(chunk)
                        if done > max_bytes:
                            raise too_large(f"more than {size_text(max_bytes)} arrived")
                        out.write(chunk)
                        h.update(chunk)
                        if report is not None:
                            report(done, total_n)
            except (InsecureURLError, SizeLimitError):
                raise
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
        _chmod_as_umask(tmp)
        os.replace(tmp, dest)
    except BaseException:
        remove_quietly(tmp)
        raise
    finally:
        if bar is not None:
            bar.close()
    return dest


# ----------------------------------------------------------------------------------------------
# checksum lists

_SUMS_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")


def _read_sums(sums: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        text = sums.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read the checksum list {sums}: {e}; fix or delete it.") from e
    for line_no, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _SUMS_LINE.match(line)
        if m is None:
            raise DataError(
                f"{sums}, line {line_no}: expected '<sha256>  <file name>' (as sha256sum writes it), "
                f"got {line!r}; fix or delete the checksum list."
            )
        name = m.group(2).strip()
        out[name[2:] if name.startswith("./") else name] = m.group(1).lower()
    return out


def verify_checksum_list(path: StrPath, sums_name: str = SUMS_FILE) -> bool:
    """Check ``path`` against the checksum list ``sums_name`` in its folder, when there is one.

    Returns:
        True if the list names the file and the digest matches; False if there is no list or
        it does not name the file (nothing is checked then).

    Raises:
        ChecksumError: the list names the file with another SHA-256; the message names the
            file, the list, the expected and the actual digest.
        DataError: the list cannot be read or has a malformed line.
    """
    path = Path(path)
    sums = path.parent / sums_name
    if not sums.is_file():
        return False
    expected = _read_sums(sums).get(path.name)
    if expected is None:
        return False
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path} does not match its entry in {sums}: expected sha256 {expected}, got {actual}. The "
            f"file is damaged or was replaced; delete it and get it again, or correct {sums} if this "
            "copy is the one you mean to use."
        )
    return True


# ----------------------------------------------------------------------------------------------
# zip archives

_DRIVE = re.compile(r"^[A-Za-z]:")


def member_problem(name: str) -> str | None:
    """Why the path ``name`` (of a zip or tar member, or in an extraction marker) is unsafe (empty,
    NUL byte, absolute, drive letter, ``..``), or None if it is fine."""
    if not name or "\x00" in name:
        return "an empty name or a NUL byte in its name"
    if name.startswith(("/", "\\")) or _DRIVE.match(name):
        return "an absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "a '..' component (it would escape the extraction folder)"
    return None


def _member_problem(info: zipfile.ZipInfo) -> str | None:
    """Why ``info`` is unsafe to use, or None if it is fine."""
    problem = member_problem(info.filename)
    if problem is not None:
        return problem
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return None


def corrupt_archive(kind: str, path: Path, err: BaseException, member: str | None = None) -> CorruptArchiveError:
    """The error for a truncated or damaged ``kind`` (``"zip"``, ``"tar"``) archive, naming the way out."""
    where = f" (member {member!r})" if member else ""
    return CorruptArchiveError(
        f"the {kind} archive {path} is truncated or corrupt{where}: {err}. Delete it and download it again "
        f"(or put a good copy of {path.name} in {path.parent})."
    )


def unsafe_archive(kind: str, path: StrPath | None, member: str, problem: str) -> UnsafeArchiveError:
    """The error for a ``kind`` archive whose ``member`` has ``problem`` (see :func:`member_problem`)."""
    return UnsafeArchiveError(
        f"refusing to use the {kind} archive {path}: member {member!r} has {problem}. The archive is damaged "
        "or malicious; delete it and get the file from its official source."
    )


def _too_big_member(path: StrPath, member: str, what: str, max_bytes: int) -> SizeLimitError:
    return SizeLimitError(
        f"refusing to read member {member!r} of the zip archive {path}: {what}, over the cap of "
        f"{size_text(max_bytes)} per member (max_member_bytes). The archive is damaged or hostile; delete it "
        "and get it from its official source (if the member is genuinely this large, pass a larger "
        "max_member_bytes)."
    )


def check_member_size(info: zipfile.ZipInfo, path: StrPath, max_bytes: int = MAX_MEMBER_BYTES) -> None:
    """Refuse a member whose declared uncompressed size exceeds ``max_bytes`` (before reading it).

    Raises:
        SizeLimitError: naming the member, the archive, its size and the cap.
    """
    if info.file_size > max_bytes:
        raise _too_big_member(path, info.filename, f"it is {size_text(info.file_size)} uncompressed", max_bytes)


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
            raise unsafe_archive("zip", shown, info.filename, problem)
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
        raise corrupt_archive("zip", path, e) from e
    with zf:
        members = safe_members(zf, path)
        try:
            yield zf, members
        except (zipfile.BadZipFile, zlib.error, EOFError) as e:
            raise corrupt_archive("zip", path, e) from e


def _copy_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: StrPath, max_bytes: int, write: Callable[[bytes], object]
) -> None:
    """Stream a member to ``write`` in chunks, counting the bytes against ``max_bytes``."""
    check_member_size(info, path, max_bytes)
    done = 0
    try:
        with zf.open(info) as src:
            for chunk in iter(lambda: src.read(_CHUNK), b""):
                done += len(chunk)
                if done > max_bytes:
                    what = f"more than {size_text(max_bytes)} decompressed"
                    raise _too_big_member(path, info.filename, what, max_bytes)
                write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:
        raise corrupt_archive("zip", Path(path), e, info.filename) from e


def read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, path: StrPath, max_bytes: int = MAX_MEMBER_BYTES
) -> bytes:
    """The bytes of one member, read in chunks; refused before reading if over ``max_bytes``.

    Raises:
        SizeLimitError: the member is (or decompresses to) more than ``max_bytes``.
        CorruptArchiveError: a CRC mismatch or a broken stream, naming the member.
    """
    buf = bytearray()
    _copy_member(zf, info, path, max_bytes, buf.extend)
    return bytes(buf)


def iter_zip(
    path: StrPath, suffixes: tuple[str, ...] | None = None, max_member_bytes: int = MAX_MEMBER_BYTES
) -> Iterator[tuple[str, bytes]]:
    """Yield ``(member name, bytes)`` for the files of a zip archive, sorted by name.

    Every member is validated (:func:`safe_members`) and every chosen member's size checked
    against ``max_member_bytes`` before the first one is read; directory entries are skipped;
    ``suffixes`` (lower-case, e.g. ``(".png",)``) keeps only matching names. CRCs are checked
    while reading.

    Raises:
        CorruptArchiveError, UnsafeArchiveError: see :func:`open_zip`.
        SizeLimitError: a chosen member is larger than ``max_member_bytes``.
    """
    path = Path(path)
    with open_zip(path) as (zf, members):
        chosen = [
            m for m in members if not m.is_dir() and (suffixes is None or m.filename.lower().endswith(suffixes))
        ]
        for info in chosen:
            check_member_size(info, path, max_member_bytes)
        for info in sorted(chosen, key=lambda m: m.filename):
            yield info.filename, read_member(zf, info, path, max_member_bytes)


def _norm(name: str) -> str:
    return PurePosixPath(name.replace("\\", "/")).as_posix()


def _inside(root: Path, target: Path) -> bool:
    """Whether ``target``'s folder, with symbolic links resolved, lies inside ``root``."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(target.parent)
    return real == real_root or real.startswith(real_root + os.sep)


def _previous_extraction(path: Path, dest: Path) -> tuple[set[str], set[str]]:
    """``(files, folders)`` a previous extraction of ``path`` into ``dest`` recorded (empty if none).

    Raises:
        DataError: ``dest`` is not a folder, holds files that innerloop did not extract, or
            records the extraction of another archive; nothing is changed.
    """
    if not dest.exists():
        return set(), set()
    refuse = f"refusing to extract {path} into {dest}"
    if not dest.is_dir():
        raise DataError(f"{refuse}: it exists and is not a folder; choose another destination.")
    marker = dest / EXTRACT_MARKER
    if marker.is_file():
        try:
            record = json.loads(marker.read_text(encoding="utf-8"))
            archive = str(record["archive"])
            files = {_norm(str(f)) for f in record["files"]}
            folders = {_norm(str(d)) for d in record["dirs"]}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise DataError(
                f"{refuse}: its record {marker} of a previous extraction is unreadable ({e}); nothing was "
                f"changed. Delete {dest} yourself if it holds nothing you need, or choose another destination."
            ) from e
        if archive != path.name:
            raise DataError(
                f"{refuse}: that folder holds an extraction of {archive}, not of {path.name}; nothing was "
                "changed. Choose another destination."
            )
        for name in files | folders:
            problem = member_problem(name)
            if problem is not None or not _inside(dest, dest / name):
                raise DataError(
                    f"{refuse}: its record {marker} lists {name!r}, which is outside the folder; nothing was "
                    f"changed. Delete {marker} and {dest} yourself if they are yours."
                )
        return files, folders
    others = sorted(e.name for e in dest.iterdir() if not e.name.startswith(".extract-"))
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise DataError(
            f"{refuse}: the folder exists and holds files innerloop did not extract ({shown}); nothing was "
            "changed or deleted. Extract into a new or empty folder, or move those files away."
        )
    return set(), set()


def _write_marker(dest: Path, archive: Path, files: set[str], folders: set[str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f"{EXTRACT_MARKER}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"archive": archive.name, "files": sorted(files), "dirs": sorted(folders)}, f, indent=1)
        _chmod_as_umask(tmp)
        os.replace(tmp, dest / EXTRACT_MARKER)
    except BaseException:
        remove_quietly(tmp)
        raise


def extract_zip(path: StrPath, dest: StrPath, max_member_bytes: int = MAX_MEMBER_BYTES) -> Path:
    """Extract a zip archive into ``dest`` (created if needed) and return ``dest``.

    All members are validated, and their sizes checked against ``max_member_bytes``, before
    anything is written; the archive is extracted into a temporary folder inside ``dest`` whose
    files are then moved into place, so a corrupt archive leaves no partial files behind.

    Nothing that innerloop did not create is deleted: ``dest`` must be new, empty, or a previous
    extraction of an archive of the same name, recorded in ``dest/.innerloop-extract.json``
    (:data:`EXTRACT_MARKER`); then only the files and (empty) folders that extraction made are
    replaced. Files added there since are kept; a member that would overwrite one is refused.

    Raises:
        CorruptArchiveError, UnsafeArchiveError: see :func:`open_zip`.
        SizeLimitError: a member is larger than ``max_member_bytes``.
        DataError: ``dest`` holds files innerloop did not extract, or another archive's extraction.
    """
    path, dest = Path(path), Path(dest)
    old_files, old_dirs = _previous_extraction(path, dest)
    with open_zip(path) as (zf, members):
        for info in members:
            if _norm(info.filename).split("/")[0] == EXTRACT_MARKER:
                raise UnsafeArchiveError(
                    f"refusing to use the zip archive {path}: member {info.filename!r} has the name of "
                    "innerloop's extraction record."
                )
            if not info.is_dir():
                check_member_size(info, path, max_member_bytes)
        dest.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest, prefix=".extract-"))
        try:
            files: set[str] = set()
            folders: set[str] = set()
            for info in members:
                name = _norm(info.filename)
                target = tmp / name
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    folders.add(name)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with open(target, "wb") as out:
                    _copy_member(zf, info, path, max_member_bytes, out.write)
                files.add(name)
            folders |= {p.as_posix() for f in files for p in PurePosixPath(f).parents if p.as_posix() != "."}
            folders -= files
            _install(path, dest, tmp, files, folders, old_files, old_dirs)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _install(
    path: Path, dest: Path, tmp: Path, files: set[str], folders: set[str], old_files: set[str], old_dirs: set[str]
) -> None:
    """Move the extracted ``files`` from ``tmp`` into ``dest``, replacing only the previous extraction's."""
    recorded = old_files | old_dirs
    for name in sorted(files | folders):
        target = dest / name
        clash = (target.exists() or target.is_symlink()) and name not in recorded
        clash = clash and not (name in folders and target.is_dir())
        if name in files and target.is_dir() and not target.is_symlink():
            # A folder of ours where a file now goes: replaced only if all it holds is ours.
            inner = (p.relative_to(dest).as_posix() for p in target.rglob("*"))
            clash = clash or not all(n in recorded for n in inner)
        if clash or not _inside(dest, target):
            raise DataError(
                f"refusing to extract {path} into {dest}: member {name!r} would replace {target}, which "
                "innerloop did not extract; nothing was changed. Move it away, or extract into a new folder."
            )
    # Record the union first: killed half-way, the next extraction still knows all it made.
    _write_marker(dest, path, files | old_files, folders | old_dirs)
    for name in sorted(old_files - files):
        target = dest / name
        if target.is_symlink() or target.is_file():
            remove_quietly(target)
    for name in sorted(old_dirs - folders, key=lambda n: -n.count("/")):
        with suppress(OSError):
            (dest / name).rmdir()  # only if empty: files added by the user are kept
    for name in sorted(folders, key=lambda n: n.count("/")):
        target = dest / name
        if target.is_symlink() or (target.exists() and not target.is_dir()):
            remove_quietly(target)  # one of ours (checked above): a file where a folder now goes
        target.mkdir(exist_ok=True)
    for name in sorted(files):
        target = dest / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)  # a folder the previous extraction made where a file now goes
        os.replace(tmp / name, target)
    _write_marker(dest, path, files, folders)
