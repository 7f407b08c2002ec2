"""Files a run writes: atomic replacement, and the JSON-lines log cut back to a checkpoint.

A crash (or a kill) never leaves a half-written file behind: every file is written to a
temporary file beside its destination (``.NAME.tmp-PID-RANDOM``) and renamed into place; the
temporary files of a writer that was killed are removed by :func:`clean_partial_writes` at the
next start. Files are created with the permissions the user's umask gives (not ``mkstemp``'s 0600).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "clean_partial_writes", "current_umask", "pid_alive",
           "truncate_jsonl"]

TMP_MARK = ".tmp-"
"""Temporary files are ``.{name}.tmp-{pid}-{random}`` beside ``name``."""
_TMP = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)-[a-z0-9_]+$")
_OLD_TMP = re.compile(r"^\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp$")  # innerloop <= 0.2: no pid in the name


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux: /proc)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it into place, so a
    crash never leaves a half-written ``path``; the file gets ``0o666 & ~umask``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_MARK}{os.getpid()}-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        if not hasattr(os, "fchmod"):
            os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _boot_time() -> float | None:
    try:
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where the system says (Linux); None if unknown."""
    boot = _boot_time()
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime, after "pid (comm) "
        return None if boot is None else boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with ``pid`` exists on this host (another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    except OSError:
        return False
    return True


def _writer_gone(pid: int, mtime: float, own_start: float) -> bool:
    """Whether the process that wrote a temporary file last modified at ``mtime`` is gone: ``pid`` is
    not alive, or the process now under that pid started after the file was written (a reused pid,
    this process included)."""
    if pid == os.getpid():
        return mtime < own_start
    if not pid_alive(pid):
        return True
    started = _process_start(pid)
    return started is not None and mtime < started - 1.0  # 1 s: the clock-tick rounding of the start time


_IMPORTED = time.time()


def clean_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files of atomic writes into ``folder`` (not below it) that were interrupted
    (their writer was killed): those whose writer's pid is no longer alive, or whose pid now belongs
    to a process that started after the file was written; plus files in the naming of innerloop
    <= 0.2 (no pid) older than this process. A live writer's file is left alone.

    Returns:
        the files deleted (none when ``folder`` does not exist).
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own_start = _process_start(os.getpid()) or _IMPORTED
    removed = []
    for entry in folder.iterdir():
        m, old = _TMP.match(entry.name), _OLD_TMP.match(entry.name)
        if not (m or old):
            continue
        try:
            st = entry.lstat()
            if not entry.is_file() or entry.is_symlink():
                continue
            gone = _writer_gone(int(m.group("pid")), st.st_mtime, own_start) if m else st.st_mtime < own_start
            if gone:
                entry.unlink()
                removed.append(entry)
        except (FileNotFoundError, ValueError):  # finished (renamed) meanwhile, or an absurd pid
            continue
    return removed


def truncate_jsonl(path: str | Path, step: int, key: str = "step") -> None:
    """Drop the lines of the JSON-lines file ``path`` whose ``key`` exceeds ``step`` (the log lines
    a run wrote after its last checkpoint, before it died), and any line a crash or a full disk cut
    short (one that does not parse, or has no ``key``); nothing when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if (at := _step_of(ln, key)) is not None and at <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))


def _step_of(line: str, key: str) -> float | None:
    """The number under ``key`` of one JSON-lines record, or ``None`` for a line that is not one."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    value = record.get(key) if isinstance(record, dict) else None
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None
