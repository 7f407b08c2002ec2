"""Files a run writes: atomic replacement, and the JSON-lines log cut back to a checkpoint.

A crash (or a kill) never leaves a half-written file behind: every file is written to a
temporary file beside its destination and renamed into place.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write_bytes", "atomic_write_text", "truncate_jsonl"]


def atomic_write_bytes(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Call ``write(file)`` on a temporary file beside ``path`` and rename it into place, so a
    crash never leaves a half-written ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def truncate_jsonl(path: str | Path, step: int, key: str = "step") -> None:
    """Drop the lines of the JSON-lines file ``path`` whose ``key`` exceeds ``step`` (the log lines
    a run wrote after its last checkpoint, before it died); nothing when ``path`` does not exist."""
    path = Path(path)
    if not path.exists():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln)[key] <= step]
    atomic_write_text(path, "".join(ln + "\n" for ln in kept))
