"""Helpers shared by the image-data tests: fake Omniglot PNGs and archives, tar archives in memory."""

from __future__ import annotations

import http.client
import io
import os
import tarfile
import urllib.error
import urllib.request
import urllib.response
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[2]


def add_to_tar(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a regular file ``name`` holding ``data`` to the open tar archive ``tf``."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar(path: Path, files: Mapping[str, bytes]) -> Path:
    """A ``.tar.gz`` at ``path`` holding ``{member name: bytes}`` as regular files, in that order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            add_to_tar(tf, name, data)
    return path


def omniglot_png(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG, white with a black (ink) rectangle placed according to ``seed``."""
    im = Image.new("1", (size, size), 1)
    x, y = 5 + (seed * 7) % (size - 40), 5 + (seed * 13) % (size - 40)
    ImageDraw.Draw(im).rectangle([x, y, x + 20 + seed % 10, y + 25], fill=0)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


FAKE_BACKGROUND = {"Alpha": 3, "Beta": 2, "Gamma": 2}
FAKE_EVALUATION = {"Delta": 2, "Epsilon": 2}
FAKE_DRAWINGS = 4


def write_omniglot_zip(
    path: Path,
    top: str,
    alphabets: Mapping[str, int],
    drawings: int = FAKE_DRAWINGS,
    first_id: int = 1,
    extra: Sequence[tuple[str, bytes]] = (),
) -> int:
    """Write a fake ``images_<set>.zip``; returns the next character id."""
    cid = first_id
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, n_chars in alphabets.items():
            for c in range(1, n_chars + 1):
                for d in range(1, drawings + 1):
                    name = f"{top}/{alphabet}/character{c:02d}/{cid:04d}_{d:02d}.png"
                    zf.writestr(name, omniglot_png(cid * 31 + d))
                cid += 1
        for name, data in extra:
            zf.writestr(name, data)
    return cid


def write_fake_omniglot(root: Path) -> Path:
    """Both fake archives (``FAKE_BACKGROUND``, ``FAKE_EVALUATION``) in ``root`` (made if missing)."""
    root.mkdir(parents=True, exist_ok=True)
    nxt = write_omniglot_zip(root / "images_background.zip", "images_background", FAKE_BACKGROUND)
    write_omniglot_zip(root / "images_evaluation.zip", "images_evaluation", FAKE_EVALUATION, first_id=nxt)
    return root


def real_data_root() -> Path:
    """``$INNERLOOP_DATA`` or ``../shared/data`` from the repository root."""
    env = os.environ.get("INNERLOOP_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


class FakeHTTPS(urllib.request.BaseHandler):
    """A urllib handler that serves ``https://`` URLs from a dict, with no network.

    ``routes[url] = (status, headers, body)``; an unknown URL is a connection error. Every
    request's URL is appended to ``seen``. Redirects (3xx with a ``Location``) go through the
    opener's redirect handler as real responses would.
    """

    handler_order = 100  # before urllib's own HTTPSHandler

    def __init__(self, routes: Mapping[str, tuple[int, Mapping[str, str], bytes]]) -> None:
        self.routes = dict(routes)
        self.seen: list[str] = []

    def https_open(self, req: urllib.request.Request) -> urllib.response.addinfourl:
        self.seen.append(req.full_url)
        if req.full_url not in self.routes:
            raise urllib.error.URLError(f"no route to {req.full_url} (fake network)")
        status, headers, body = self.routes[req.full_url]
        msg = http.client.HTTPMessage()
        for k, v in headers.items():
            msg[k] = v
        response = urllib.response.addinfourl(io.BytesIO(body), msg, req.full_url, status)
        response.msg = "OK" if status < 300 else "Redirect"  # type: ignore[attr-defined]
        return response
