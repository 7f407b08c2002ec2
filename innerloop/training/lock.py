"""An exclusive lock on a run folder: one run at a time writes its checkpoints and log.

:func:`run_lock` creates ``RUN_DIR/.lock`` atomically (``O_CREAT | O_EXCL``) holding the owner's
``{"pid", "host", "started"}`` and removes it when the run ends, also on an exception. A second run on
the same folder is refused with :class:`RunLockedError`, naming the owner. A lock left behind by a run
that died (same host, its process no longer alive) is stale: it is taken over with a warning. A lock
from another host cannot be checked from here and is never taken over.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from innerloop.io import pid_alive

LOCK = ".lock"


class RunLockedError(RuntimeError):
    """The run folder is in use by another run (its lock file names the owner)."""


def _read(path: Path, attempts: int = 20) -> dict[str, Any] | None:
    """The lock's owner; ``None`` when unreadable (retried briefly: its owner may be writing it)."""
    for _ in range(attempts):
        try:
            owner = json.loads(path.read_text())
            if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
                return owner
        except FileNotFoundError:
            raise
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return None


def lock_owner(run_dir: str | Path) -> dict[str, Any] | None:
    """The owner (``pid``, ``host``, ``started``) of a live lock on ``run_dir``; ``None`` when the folder
    is not locked or its lock is stale (same host, the process gone)."""
    path = Path(run_dir) / LOCK
    try:
        owner = _read(path)
    except FileNotFoundError:
        return None
    if owner is None:
        return {"pid": None, "host": None, "started": None}
    if owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"]):
        return None
    return owner


def _refusal(path: Path, owner: dict[str, Any] | None) -> RunLockedError:
    if owner is None or owner.get("pid") is None:
        who = "an unknown owner (its lock file is unreadable)"
    else:
        who = f"pid {owner['pid']} on host {owner.get('host')!r}, started {owner.get('started')}"
    return RunLockedError(
        f"the run folder {str(path.parent)!r} is in use by another run: {who}. Wait for it to end, stop it, or "
        f"train into another folder; if no run is using it (e.g. it ran on another machine and died), delete "
        f"{str(path)!r}."
    )


def check_unlocked(run_dir: str | Path) -> None:
    """Raise :class:`RunLockedError` when a live run holds ``run_dir`` (e.g. before deleting its files)."""
    owner = lock_owner(run_dir)
    if owner is not None:
        raise _refusal(Path(run_dir) / LOCK, owner)


def _create(path: Path, me: dict[str, Any]) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(me))
        f.flush()
        os.fsync(f.fileno())
    return True


def acquire(run_dir: str | Path) -> dict[str, Any]:
    """Take the lock on ``run_dir`` (created if missing); returns what the lock file holds.

    Raises :class:`RunLockedError` naming the owner when another live run holds it."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "token": os.urandom(8).hex()}
    for _ in range(5):
        if _create(path, me):
            return me
        try:
            owner = _read(path)
        except FileNotFoundError:
            continue  # released meanwhile: try again
        stale = (owner is not None and owner.get("host") == me["host"] and owner["pid"] != me["pid"]
                 and not pid_alive(owner["pid"]))
        if not stale:
            raise _refusal(path, owner)
        assert owner is not None
        # Move the stale lock aside under a name of our own, then check it is the one judged stale
        # (another process may have taken it over in between); if not, put it back.
        aside = path.with_name(f"{LOCK}.stale.{me['pid']}.{me['token']}")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            continue
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = None
        if moved != owner:
            with contextlib.suppress(OSError):
                os.link(aside, path)  # fails if someone holds the lock already: then theirs stands
            aside.unlink(missing_ok=True)
            continue
        aside.unlink(missing_ok=True)
        warnings.warn(f"taking over the stale lock of {str(run_dir)!r}: its owner, pid {owner['pid']} on this "
                      f"host (started {owner.get('started')}), is no longer running.", stacklevel=3)
    if _create(path, me):
        return me
    raise _refusal(path, lock_owner(run_dir))


def release(run_dir: str | Path, me: dict[str, Any]) -> None:
    """Remove ``run_dir``'s lock if it is still the one :func:`acquire` returned."""
    path = Path(run_dir) / LOCK
    try:
        if json.loads(path.read_text()) == me:
            path.unlink()
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[dict[str, Any]]:
    """Hold the exclusive lock on ``run_dir`` for the ``with`` block (see the module docstring)."""
    me = acquire(run_dir)
    try:
        yield me
    finally:
        release(run_dir, me)


__all__ = ["LOCK", "RunLockedError", "acquire", "check_unlocked", "lock_owner", "release", "run_lock"]
