"""Fixtures for the image-data tests: fake Omniglot archives, image folders, the real data folder."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest
from fewshot_fakes import FAKE_BACKGROUND, FAKE_EVALUATION, real_data_root, write_omniglot_zip
from PIL import Image

import innerloop.data.archives as ar
from innerloop.data.factory import image_splits


@pytest.fixture
def fake_omniglot(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``fake_omniglot(extra_background=[(name, bytes)])`` -> folder with both fake archives."""

    def make(extra_background: Sequence[tuple[str, bytes]] = (), folder: Path | None = None) -> Path:
        root = folder or tmp_path / "omniglot"
        root.mkdir(parents=True, exist_ok=True)
        nxt = write_omniglot_zip(
            root / "images_background.zip", "images_background", FAKE_BACKGROUND, extra=extra_background
        )
        write_omniglot_zip(root / "images_evaluation.zip", "images_evaluation", FAKE_EVALUATION, first_id=nxt)
        return root

    return make


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_folder(layout={class: n_images}, suffixes=...)`` -> a folder of tiny images."""

    def make(
        layout: Mapping[str, int], root: Path | None = None, suffixes: Sequence[str] = (".png", ".jpg")
    ) -> Path:
        root = root or tmp_path / "images"
        for k, (cls, n) in enumerate(layout.items()):
            (root / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                colour = ((40 * k + 10 * i) % 256, (17 * i) % 256, 200)
                suffix = suffixes[i % len(suffixes)]
                size = (6 + i, 5 + k)  # different sizes: every image is resized
                Image.new("RGB", size, colour).save(root / cls / f"{cls}_{i:03d}{suffix}")
        return root

    return make


@pytest.fixture
def offline_loaders(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Caches in ``tmp_path/user-cache``, no download from :mod:`innerloop.data.archives` (one fails the
    test), and a fresh :func:`~innerloop.data.factory.image_splits` memo."""
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "user-cache"))

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("must not download")

    monkeypatch.setattr(ar, "download", no_network)
    image_splits.cache_clear()


@pytest.fixture(scope="session")
def real_omniglot_root() -> Path:
    root = real_data_root() / "omniglot"
    if not all((root / f"{n}.zip").is_file() for n in ("images_background", "images_evaluation")):
        pytest.skip(f"the real Omniglot archives are not in {root} (set INNERLOOP_DATA)")
    return root


@pytest.fixture(scope="session")
def real_omniglot_cache(real_omniglot_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A per-session cache folder, filled once by preprocessing the real archives (timed)."""
    from innerloop.data.omniglot import load_omniglot_characters

    cache = tmp_path_factory.mktemp("omniglot-cache")
    start = time.perf_counter()
    chars, _ = load_omniglot_characters(real_omniglot_root, cache_dir=cache, download=False)
    seconds = time.perf_counter() - start
    print(f"\npreprocessed {int(chars.counts.sum())} real Omniglot images in {seconds:.1f} s")
    return cache
