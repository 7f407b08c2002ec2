"""Fixtures shared by the test files."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test writes its preprocessed caches (and downloaded split files) into a temporary folder,
    never the user's cache directory: ``$INNERLOOP_CACHE`` for the whole session (subprocesses too)."""
    old = os.environ.get("INNERLOOP_CACHE")
    os.environ["INNERLOOP_CACHE"] = str(tmp_path_factory.mktemp("innerloop-cache"))
    yield
    if old is None:
        os.environ.pop("INNERLOOP_CACHE", None)
    else:
        os.environ["INNERLOOP_CACHE"] = old


@pytest.fixture
def float64():
    """Run the test with float64 as torch's default dtype (gradient proofs need its precision)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def fewshot_folder(tmp_path_factory):
    """An image folder ``train/``, ``val/``, ``test/`` with 6 classes each and 8 16x16 images per class;
    a class is a bright square at its own place on a dark noisy background (easy to learn)."""
    root = tmp_path_factory.mktemp("fewshot")
    rng = np.random.default_rng(0)
    for s, split in enumerate(("train", "val", "test")):
        for c in range(6):
            d = root / split / f"class{s}{c}"
            d.mkdir(parents=True)
            for i in range(8):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
                r, col = divmod(c, 3)
                img[2 + 6 * r : 8 + 6 * r, 1 + 5 * col : 6 + 5 * col] = 255
                Image.fromarray(img).save(d / f"{i}.png")
    return root
