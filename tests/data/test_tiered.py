"""tieredImageNet from a tiny ImageNet-layout folder and a tiny preprocessed release (Ren et al. split)."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import innerloop.data.tiered as td
from innerloop.data.archives import UnsafePickleError
from innerloop.data.download import DataError
from innerloop.data.factory import image_splits, task_family

SIDE = 8
SPLITS = ("train", "val", "test")


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "user-cache"))
    image_splits.cache_clear()


def image_bytes(k: int, i: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (10 + i, 9), ((k * 7) % 256, (i * 50) % 256, 90)).save(buf, format=fmt)
    return buf.getvalue()


def imagenet_folder(root: Path, per_class: int = 2) -> Path:
    """``root/train/<wnid>/<wnid>_<i>.JPEG`` for all 608 classes of the split."""
    for k, (wnid, _) in enumerate(w for s in SPLITS for w in td.tiered_split(s)):
        (root / "train" / wnid).mkdir(parents=True)
        for i in range(per_class):
            (root / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(image_bytes(k, i, "JPEG"))
    return root


def release(root: Path, split: str, per_class: int = 2) -> None:
    """``<split>_images_png.pkl`` (a list of uint8 arrays of PNG bytes) and ``<split>_labels.pkl``."""
    rows = td.tiered_split(split)
    cats = sorted({c for _, c in rows})
    order = np.random.default_rng(0).permutation(len(rows) * per_class)  # the release is not class-sorted
    specific = (np.arange(len(rows) * per_class) // per_class)[order]
    pngs = [np.frombuffer(image_bytes(int(c), j, "PNG"), dtype=np.uint8) for j, c in enumerate(specific)]
    labels = {
        "label_specific": specific.astype(np.int32),
        "label_general": np.array([cats.index(rows[c][1]) for c in specific], dtype=np.int32),
        "label_specific_str": [f"class {w}" for w, _ in rows],
        "label_general_str": [f"category {c}" for c in cats],
    }
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{split}_images_png.pkl").write_bytes(pickle.dumps(pngs, protocol=2))
    (root / f"{split}_labels.pkl").write_bytes(pickle.dumps(labels, protocol=2))


def test_shipped_split_is_ren_et_al() -> None:
    rows = {s: td.tiered_split(s) for s in SPLITS}
    assert {s: len(r) for s, r in rows.items()} == td.CLASS_COUNTS == {"train": 351, "val": 97, "test": 160}
    assert [len({c for _, c in r}) for r in rows.values()] == [20, 6, 8]
    wnids = [set(w for w, _ in r) for r in rows.values()]
    cats = [set(c for _, c in r) for r in rows.values()]
    assert sum(map(len, wnids)) == len(set().union(*wnids)) == 608
    assert not (cats[0] & cats[1]) and not (cats[0] & cats[2]) and not (cats[1] & cats[2])


def test_imagenet_folder_all_splits_and_task(tmp_path: Path) -> None:
    root = imagenet_folder(tmp_path / "imagenet")
    ds = td.TieredImageNet(root, image_size=SIDE)
    assert {s: ds[s].num_classes for s in SPLITS} == td.CLASS_COUNTS
    assert [len(set(ds[s].groups)) for s in SPLITS] == [20, 6, 8]
    names = [set(ds[s].names) for s in SPLITS]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    x = ds["test"].images(0)
    assert x.shape == (2, 3, SIDE, SIDE) and x.dtype == torch.float32
    assert 0 <= float(x.min()) <= float(x.max()) <= 1
    fam = task_family("tiered-imagenet", shots=1, queries=1, ways=5, image_size=SIDE, data_root=str(root))
    t = fam.task("train", 0)
    assert t.support_x.shape == (5, 3, SIDE, SIDE) and t.query_y.tolist() == [0, 1, 2, 3, 4]


def test_lazy_split_loading_and_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = imagenet_folder(tmp_path / "imagenet", per_class=1)
    ds = td.TieredImageNet(root, image_size=SIDE)
    first = ds["val"]
    assert repr(ds).endswith("loaded: val)")

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache must be used")

    monkeypatch.setattr(td, "load_image", no_decoding)
    again = td.TieredImageNet(root, image_size=SIDE)["val"]
    assert torch.equal(first.data, again.data) and first.names == again.names


def test_preprocessed_release(tmp_path: Path) -> None:
    root = tmp_path / "release"
    release(root, "val")
    val = td.TieredImageNet(root, image_size=SIDE)["val"]
    assert val.num_classes == 97 and len(set(val.groups)) == 6 and val.counts.tolist() == [2] * 97
    assert val.names[0] == f"class {td.tiered_split('val')[0][0]}"
    # the images were regrouped by class: image j of class c has red value (7 c) % 256 in the file
    assert torch.all((val.images(5)[:, 0] * 255).round() == (7 * 5) % 256)
    with pytest.raises(DataError, match=r"image-net\.org"):
        td.TieredImageNet(root, image_size=SIDE)["train"]  # only val is there


def test_release_npz_form_is_flipped_to_rgb(tmp_path: Path) -> None:
    root = tmp_path / "release"
    release(root, "val")
    png = td.TieredImageNet(root, image_size=SIDE, use_cache=False)["val"]
    images = td._release_images(root / "val_images_png.pkl", (9, 10))  # [n, 3, 9, 10]
    np.savez(root / "val_images.npz", images=np.ascontiguousarray(images.transpose(0, 2, 3, 1)[..., ::-1]))
    os.remove(root / "val_images_png.pkl")
    npz = td.TieredImageNet(root, image_size=(9, 10), use_cache=False)["val"]
    assert npz.names == png.names
    assert torch.all((npz.images(5)[:, 0] * 255).round() == (7 * 5) % 256)  # red is red again


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_release_pickle_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "release"
    release(root, "val")
    (root / "val_labels.pkl").write_bytes(pickle.dumps({"label_specific": _Evil()}, protocol=2))
    with pytest.raises(UnsafePickleError, match="system"):
        td.TieredImageNet(root, image_size=SIDE)["val"]
    assert not list((tmp_path / "user-cache").glob("*.npz")) if (tmp_path / "user-cache").exists() else True
    (root / "val_labels.pkl").write_bytes(b"\x80\x02 truncated")
    with pytest.raises(DataError, match="cannot unpickle"):
        td.TieredImageNet(root, image_size=SIDE)["val"]


def test_missing_data_says_how_to_get_imagenet(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="licence"):
        td.TieredImageNet(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"ILSVRC2012_img_train\.tar"):
        td.TieredImageNet(tmp_path / "empty")["train"]
    root = imagenet_folder(tmp_path / "partial", per_class=1)
    missing = td.tiered_split("test")[3][0]
    for f in (root / "train" / missing).iterdir():
        f.unlink()
    with pytest.raises(DataError, match=missing):
        td.TieredImageNet(root, image_size=SIDE)["test"]
