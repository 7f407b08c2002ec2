"""Class-indexed image datasets, the atomic cache, image folders and miniImageNet (fake images)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from fewshot_fakes import real_data_root
from PIL import Image

import innerloop.data.images as im
from innerloop.data import DataError, FewShotClassification, ImageClassDataset, MiniImageNet, image_folder_dataset
from innerloop.data.images import cache_key, cached, load_cache, save_cache


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _small() -> ImageClassDataset:
    data = torch.arange(5 * 3 * 2 * 2, dtype=torch.uint8).reshape(5, 3, 2, 2)
    return ImageClassDataset(data, [2, 3], ["a", "b"], ["g", "g"])


def test_dataset_access_and_dict_round_trip():
    ds = _small()
    assert len(ds) == 2 and ds.image_shape == (3, 2, 2) and ds.num_images(1) == 3
    assert torch.equal(ds["b"], ds.data[2:].float() / 255)
    assert torch.equal(ds.images(1, [2, 0]), ds.data[[4, 2]].float() / 255)
    again = ImageClassDataset.from_dict({"a": ds.data[:2], "b": ds.data[2:]})
    assert torch.equal(again.data, ds.data) and again.names == ["a", "b"]
    assert {k: v.shape for k, v in ds.to_dict().items()} == {"a": (2, 3, 2, 2), "b": (3, 3, 2, 2)}
    sub = ds.subset([1])
    assert sub.names == ["b"] and torch.equal(sub.images(0), ds.images(1))
    assert ds.group_classes() == {"g": [0, 1]}
    with pytest.raises(IndexError, match="class 'a' has 2 images"):
        ds.images(0, [2])
    with pytest.raises(KeyError, match="no class named 'z'"):
        ds["z"]


def test_dataset_validation_errors():
    data = torch.zeros(4, 1, 2, 2)
    with pytest.raises(ValueError, match=r"must be \[total, C, H, W\]"):
        ImageClassDataset(torch.zeros(4, 2, 2), [4], ["a"])
    with pytest.raises(ValueError, match="unique; repeated: \\['a'\\]"):
        ImageClassDataset(data, [2, 2], ["a", "a"])
    with pytest.raises(ValueError, match="outside the 4 stored images"):
        ImageClassDataset(data, [3, 2], ["a", "b"])
    with pytest.raises(ValueError, match="2 class counts but 1 names"):
        ImageClassDataset(data, [2, 2], ["a"])
    with pytest.raises(ValueError, match="square"):
        ImageClassDataset(torch.zeros(1, 1, 2, 3), [1], ["a"], rotations=[1])


def test_cache_round_trip_and_key(tmp_path):
    ds = _small()
    path = save_cache(tmp_path / "c.npz", ds, "k1")
    back = load_cache(path, "k1")
    assert back is not None and torch.equal(back.data, ds.data) and back.names == ds.names
    assert back.groups == ds.groups and back.data.dtype == torch.uint8
    assert load_cache(path, "k2") is None  # another key: rebuilt, not reused
    assert cache_key(size=(28, 28), src="x") != cache_key(size=(14, 14), src="x")


def test_corrupt_cache_is_rebuilt(tmp_path):
    path = tmp_path / f"n-{'k'}.npz"
    path.write_bytes(b"not a zip")
    with pytest.warns(UserWarning, match="unreadable cache"):
        out = cached(_small, tmp_path, "n", "k")
    assert torch.equal(out.data, _small().data)
    assert load_cache(path, "k") is not None


def test_failed_write_leaves_no_cache(tmp_path, monkeypatch):
    def half_write(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(im.np, "savez", half_write)
    with pytest.raises(OSError, match="disk full"):
        save_cache(tmp_path / "c.npz", _small(), "k")
    assert _files(tmp_path) == []
    with pytest.warns(UserWarning, match="could not write the preprocessed cache"):
        out = cached(_small, tmp_path, "c", "k")  # the data still comes back
    assert out.num_classes == 2 and _files(tmp_path) == []


def test_failed_build_leaves_no_cache(tmp_path):
    def build() -> ImageClassDataset:
        raise DataError("bad image")

    with pytest.raises(DataError):
        cached(build, tmp_path, "c", "k")
    assert _files(tmp_path) == []


def test_image_folder_dataset_resizes_and_caches(image_folder, tmp_path, monkeypatch):
    root = image_folder({"cat": 3, "dog": 4}, suffixes=(".png", ".jpg", ".JPEG"))
    (root / "cat" / "notes.txt").write_text("ignored")
    cache = tmp_path / "cache"
    ds = image_folder_dataset(root, size=(8, 6), cache_dir=cache)
    assert ds.names == ["cat", "dog"] and ds.counts.tolist() == [3, 4]
    assert ds.images(1).shape == (4, 3, 8, 6) and ds.data.dtype == torch.uint8
    assert abs(float(ds.images(0)[0, 2].mean()) - 200 / 255) < 0.02  # blue channel of the first cat
    assert len(_files(cache)) == 1

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(im, "load_image", boom)
    again = image_folder_dataset(root, size=(8, 6), cache_dir=cache)
    assert torch.equal(again.data, ds.data)
    monkeypatch.undo()
    grey = image_folder_dataset(root, size=5, mode="L", cache_dir=cache)
    assert grey.image_shape == (1, 5, 5) and len(_files(cache)) == 2  # size and mode are in the key
    family = FewShotClassification({"train": ds}, ways=2, shots=1, queries=2)
    assert family.task("train", 0).query_x.shape == (4, 3, 8, 6)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        image_folder_dataset(tmp_path / "absent")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataError, match=r"no images found in .*empty"):
        image_folder_dataset(tmp_path / "empty")
    (tmp_path / "bad" / "cls").mkdir(parents=True)
    (tmp_path / "bad" / "cls" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"cannot read the image .*x.png"):
        image_folder_dataset(tmp_path / "bad", use_cache=False)


def _mini(tmp_path: Path, layout: str) -> tuple[Path, Path]:
    """3 / 2 / 2 classes of 3 tiny JPEGs per split; ``layout`` 'flat' (images/) or 'classes'."""
    images, splits = tmp_path / "mini", tmp_path / "splits"
    splits.mkdir()
    k = 0
    for split, n_classes in (("train", 3), ("val", 2), ("test", 2)):
        rows = []
        for c in range(n_classes):
            label = f"n{k:08d}"
            k += 1
            for i in range(3):
                name = f"{label}{i:08d}.jpg"
                folder = images / ("images" if layout == "flat" else label)
                folder.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (10 + i, 12), (30 * c, 60, 90)).save(folder / name)
                rows.append((name, label))
        with open(splits / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
    return images, splits


@pytest.mark.parametrize("layout", ["flat", "classes"])
def test_mini_imagenet_from_user_folder(tmp_path, layout):
    images, splits = _mini(tmp_path, layout)
    data = MiniImageNet(images, splits, cache_dir=tmp_path / "cache")
    assert list(data) == ["train", "val", "test"]
    assert [len(data[s]) for s in data] == [3, 2, 2]
    train = data["train"]
    assert train.image_shape == (3, 84, 84) and train.counts.tolist() == [3, 3, 3]
    assert train.names == ["n00000000", "n00000001", "n00000002"]
    assert not set(train.names) & set(data["test"].names)
    assert len(_files(tmp_path / "cache")) == 3
    cached_again = MiniImageNet(images, splits, cache_dir=tmp_path / "cache")["val"]
    assert torch.equal(cached_again.data, data["val"].data)
    family = FewShotClassification(data, ways=2, shots=1, queries=2, seed=0)
    task = family.task("test", 0)
    assert task.support_x.shape == (2, 3, 84, 84) and task.query_y.tolist() == [0, 0, 1, 1]


def test_mini_imagenet_missing_images_say_where(tmp_path):
    images, splits = _mini(tmp_path, "flat")
    missing = next((images / "images").glob("n00000004*.jpg"))
    missing.unlink()
    data = MiniImageNet(images, splits, use_cache=False)
    assert len(data["train"]) == 3
    with pytest.raises(DataError) as err:
        data["val"]
    msg = str(err.value)
    assert "1 of the 6 miniImageNet val images" in msg and missing.name in msg and str(images / "images") in msg
    with pytest.raises(DataError, match=r"image folder .* does not exist\. Put the images there"):
        MiniImageNet(tmp_path / "absent", splits)


def test_mini_imagenet_split_file_errors(tmp_path):
    images, splits = _mini(tmp_path, "flat")
    with pytest.raises(DataError, match=r"split file .*nowhere.*train.csv is missing"):
        MiniImageNet(images, tmp_path / "nowhere")["train"]
    (splits / "val.csv").write_text("file,class\na.jpg,n1\n")
    with pytest.raises(DataError, match="must start with the header 'filename,label'"):
        MiniImageNet(images, splits, use_cache=False)["val"]
    (splits / "test.csv").write_text("filename,label\na.jpg\n")
    with pytest.raises(DataError, match=r"test.csv, line 2: expected 'filename,label'"):
        MiniImageNet(images, splits, use_cache=False)["test"]


def test_real_ravi_split_files():
    folder = real_data_root() / "miniimagenet" / "splits" / "ravi"
    if not folder.is_dir():
        pytest.skip(f"no Ravi split CSVs in {folder}")
    labels = {}
    for split in ("train", "val", "test"):
        rows = im._read_split_csv(folder / f"{split}.csv")
        names, counts = np.unique([label for _, label in rows], return_counts=True)
        labels[split] = set(names.tolist())
        assert set(counts.tolist()) == {600}
        assert len({f for f, _ in rows}) == len(rows)
    assert [len(labels[s]) for s in ("train", "val", "test")] == [64, 16, 20]
    assert not (
        labels["train"] & labels["val"] or labels["train"] & labels["test"] or labels["val"] & labels["test"]
    )
