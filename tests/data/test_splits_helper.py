"""Splitting a folder of class folders into train/val/test by a seed (split_classes, split_class_folder)."""

from __future__ import annotations

import pytest

from innerloop.data.download import DataError
from innerloop.data.images import image_folder_dataset, split_class_folder, split_classes

NAMES = [f"class{i:02d}" for i in range(20)]


def test_by_seed_deterministic_disjoint_and_whole():
    a = split_classes(NAMES, val=0.2, test=0.25, seed=3)
    assert a == split_classes(list(reversed(NAMES)), val=0.2, test=0.25, seed=3)  # order of the input: no matter
    assert {k: len(v) for k, v in a.items()} == {"train": 11, "val": 4, "test": 5}
    assert sorted(a["train"] + a["val"] + a["test"]) == NAMES
    train, val, test = set(a["train"]), set(a["val"]), set(a["test"])
    assert not (train & val or train & test or val & test)
    assert split_classes(NAMES, val=0.2, test=0.25, seed=4) != a
    counts = split_classes(NAMES, val=2, test=3, seed=0)
    assert (len(counts["val"]), len(counts["test"])) == (2, 3)
    assert split_classes(NAMES, val=0, test=5)["val"] == []


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"val": 1.0}, "a share must be below 1"),
    ({"test": -1}, r"test = -1 is invalid"),
    ({"val": 10, "test": 10}, "20 classes cannot give 10 val and 10 test classes"),
    ({"test": 0}, "at least one test"),
    ({"val": True}, "val = True is invalid"),
])
def test_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_classes(NAMES, **kwargs)
    with pytest.raises(ValueError, match="repeated"):
        split_classes(["a", "a", "b"])


@pytest.mark.parametrize("copy", [False, True])
def test_a_folder_becomes_the_image_folder_layout(image_folder, tmp_path, copy):
    source = image_folder({f"c{i}": 2 for i in range(6)}, root=tmp_path / "flat")
    parts = split_class_folder(source, tmp_path / "split", val=1, test=2, seed=1, copy=copy)
    for split, names in parts.items():
        assert sorted(p.name for p in (tmp_path / "split" / split).iterdir()) == names
        assert image_folder_dataset(tmp_path / "split" / split, size=8, use_cache=False).names == names
    assert (tmp_path / "split" / "train" / parts["train"][0]).is_symlink() is not copy
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left


def test_refuses_what_it_cannot_do_and_leaves_nothing(image_folder, tmp_path):
    source = image_folder({"a": 1, "b": 1}, root=tmp_path / "flat")
    with pytest.raises(DataError, match="does not exist"):
        split_class_folder(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders with images"):
        split_class_folder(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ValueError, match="2 classes cannot give"):
        split_class_folder(source, tmp_path / "out", val=1, test=1)
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists"):
        split_class_folder(source, tmp_path / "taken", val=0, test=1)
