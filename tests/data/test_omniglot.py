"""Omniglot from (fake) archives: preprocessing, the atomic cache, unsafe/corrupt archives, splits."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np
import platformdirs
import pytest
import torch
from fewshot_fakes import FAKE_BACKGROUND, FAKE_DRAWINGS, FAKE_EVALUATION, omniglot_png, write_omniglot_zip
from PIL import Image

import innerloop.data.images as images
import innerloop.data.omniglot as om
from innerloop.data import DataError, Omniglot
from innerloop.data.download import CorruptArchiveError, DownloadError, UnsafeArchiveError
from innerloop.data.omniglot import load_omniglot_characters, omniglot_root

N_CHARS = sum(FAKE_BACKGROUND.values()) + sum(FAKE_EVALUATION.values())


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def _no_download(*args, **kwargs):
    raise AssertionError("must not download")


def test_load_preprocess_and_reuse_cache(fake_omniglot, tmp_path, monkeypatch):
    root = fake_omniglot()
    cache = tmp_path / "cache"
    monkeypatch.setattr(om, "download", _no_download)  # local files: no download, no checksum demand
    chars, background = load_omniglot_characters(root, cache_dir=cache)
    assert chars.num_classes == N_CHARS and chars.names[0] == "Alpha/character01"
    assert background == sorted(FAKE_BACKGROUND)
    assert set(chars.groups) == set(FAKE_BACKGROUND) | set(FAKE_EVALUATION)
    x = chars.images(0)
    assert x.shape == (FAKE_DRAWINGS, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(x.mean()) < 0.5  # ink = 1 on a background of 0
    (cached,) = _files(cache)
    assert cached.startswith("omniglot-28x28-") and cached.endswith(".npz")

    def boom(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(om, "_read_archive", boom)
    again, _ = load_omniglot_characters(root, cache_dir=cache)
    assert again.names == chars.names and torch.equal(again.data, chars.data)
    assert _files(cache) == [cached]


def test_cache_key_includes_image_size(fake_omniglot, tmp_path):
    root, cache = fake_omniglot(), tmp_path / "cache"
    load_omniglot_characters(root, image_size=28, cache_dir=cache)
    small, _ = load_omniglot_characters(root, image_size=14, cache_dir=cache)
    assert small.image_shape == (1, 14, 14)
    assert len(_files(cache)) == 2


def test_ink_is_one_and_lanczos_resize(tmp_path):
    root = tmp_path / "omniglot"
    root.mkdir()
    write_omniglot_zip(root / "images_background.zip", "images_background", {"A": 1}, drawings=1)
    write_omniglot_zip(root / "images_evaluation.zip", "images_evaluation", {"B": 1}, drawings=1, first_id=2)
    full, _ = load_omniglot_characters(root, image_size=105, use_cache=False)
    original = np.asarray(Image.open(io.BytesIO(omniglot_png(1 * 31 + 1))).convert("L"), dtype=np.float32) / 255
    assert torch.equal(full.images(0)[0, 0], torch.from_numpy(1.0 - original))  # black ink -> 1
    small, _ = load_omniglot_characters(root, image_size=28, use_cache=False)
    ref = Image.open(io.BytesIO(omniglot_png(32))).convert("L").resize((28, 28), Image.Resampling.LANCZOS)
    expected = 1.0 - torch.from_numpy(np.asarray(ref, dtype=np.float32)) / 255
    assert torch.allclose(small.images(0)[0, 0], expected)


@pytest.mark.parametrize("bad", ["../evil.png", "/tmp/evil.png", "images_background/../../evil.png"])
def test_unsafe_member_rejected_and_no_cache(fake_omniglot, tmp_path, bad):
    root = fake_omniglot(extra_background=[(bad, omniglot_png(0))])
    cache = tmp_path / "cache"
    with pytest.raises(UnsafeArchiveError) as err:
        Omniglot(root, split="lake", cache_dir=cache, lake_val_alphabets=1)
    assert repr(bad) in str(err.value) and "images_background.zip" in str(err.value)
    assert _files(cache) == []


def test_truncated_archive_clear_error_and_no_cache(fake_omniglot, tmp_path):
    root = fake_omniglot()
    zpath = root / "images_evaluation.zip"
    zpath.write_bytes(zpath.read_bytes()[: zpath.stat().st_size // 2])
    cache = tmp_path / "cache"
    with pytest.raises(CorruptArchiveError) as err:
        load_omniglot_characters(root, cache_dir=cache)
    assert str(zpath) in str(err.value) and "download it again" in str(err.value)
    assert _files(cache) == []


def test_error_while_preprocessing_leaves_no_cache(fake_omniglot, tmp_path, monkeypatch):
    root, cache = fake_omniglot(), tmp_path / "cache"
    calls = []

    def failing_image(*args, **kwargs):
        calls.append(1)
        if len(calls) > 10:
            raise DataError("disk on fire")
        return np.zeros((1, 28, 28), dtype=np.uint8)

    monkeypatch.setattr(images, "load_image", failing_image)  # what omniglot_preprocessing decodes with
    with pytest.raises(DataError, match="disk on fire"):
        load_omniglot_characters(root, cache_dir=cache)
    assert _files(cache) == []


def test_missing_files_without_network(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "omniglot"

    def offline(url, dest, sha256=None, **kwargs):
        raise DownloadError(f"could not download {url}: network unreachable")

    monkeypatch.setattr(om, "download", offline)
    with pytest.raises(DataError) as err:
        Omniglot(folder, cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert str(folder) in msg and "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert om.URLS["images_background"] in msg and "INNERLOOP_DATA" in msg
    with pytest.raises(DataError, match=str(folder)):
        Omniglot(folder, download=False)


def test_missing_archive_is_downloaded_with_official_checksum(fake_omniglot, tmp_path, monkeypatch):
    source = fake_omniglot(folder=tmp_path / "source")
    root = tmp_path / "root"
    calls = []

    def fake_download(url, dest, sha256=None, **kwargs):
        calls.append((url, sha256))
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes((source / Path(dest).name).read_bytes())
        return dest

    monkeypatch.setattr(om, "download", fake_download)
    chars, _ = load_omniglot_characters(root, cache_dir=tmp_path / "cache")
    assert chars.num_classes == N_CHARS
    assert sorted(calls) == sorted((om.URLS[n], om.SHA256[n]) for n in om.ARCHIVES)


def test_root_from_argument_or_environment(tmp_path, monkeypatch, fake_omniglot):
    monkeypatch.setenv("INNERLOOP_DATA", str(tmp_path / "env"))
    assert omniglot_root() == tmp_path / "env" / "omniglot"
    assert omniglot_root(tmp_path / "x") == tmp_path / "x"
    fake_omniglot(folder=tmp_path / "parent" / "omniglot")
    assert omniglot_root(tmp_path / "parent") == tmp_path / "parent" / "omniglot"  # the data folder works too


def test_without_root_or_environment_the_data_is_in_the_user_data_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("INNERLOOP_DATA", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))  # platformdirs' user data directory on Linux
    assert omniglot_root() == Path(platformdirs.user_data_dir("innerloop", appauthor=False)) / "omniglot"
    if sys.platform.startswith("linux"):
        assert omniglot_root() == tmp_path / "xdg" / "innerloop" / "omniglot"


def test_default_cache_is_the_user_cache_never_the_data_folder(fake_omniglot, tmp_path, monkeypatch):
    root = fake_omniglot()
    monkeypatch.delenv("INNERLOOP_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # platformdirs' user cache on Linux
    load_omniglot_characters(root)
    assert not (root / ".cache").exists()
    assert len(_files(tmp_path / "xdg" / "innerloop")) == 1


def test_innerloop_cache_puts_the_cache_elsewhere(fake_omniglot, tmp_path, monkeypatch):
    root = fake_omniglot()
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_omniglot_characters(root)
    assert len(_files(tmp_path / "mine")) == 1
    assert not (tmp_path / "xdg").exists() and not (root / ".cache").exists()
    again = load_omniglot_characters(root)[0]  # read back from there
    assert again.num_classes == N_CHARS


def test_read_only_root_is_left_alone(fake_omniglot, tmp_path, monkeypatch):
    root = fake_omniglot()
    monkeypatch.setenv("INNERLOOP_CACHE", str(tmp_path / "mine"))
    root.chmod(0o555)
    try:
        load_omniglot_characters(root)
    finally:
        root.chmod(0o755)
    assert not (root / ".cache").exists() and len(_files(tmp_path / "mine")) == 1


def _vinyals_files(folder: Path, parts: dict[str, list[str]]) -> Path:
    folder.mkdir(parents=True)
    for split, chars in parts.items():
        lines = [f"{c}/rot{d:03d}" for c in chars for d in (0, 90, 180, 270)]
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


def test_vinyals_split_rotation_classes(fake_omniglot, tmp_path):
    root = fake_omniglot()
    parts = {
        "train": ["Alpha/character01", "Alpha/character02", "Beta/character01", "Delta/character02"],
        "val": ["Gamma/character01", "Gamma/character02"],
        "test": ["Epsilon/character01", "Epsilon/character02", "Alpha/character03"],
    }
    splits_root = _vinyals_files(tmp_path / "splits", parts)
    data = Omniglot(root, "vinyals", cache_dir=tmp_path / "cache", splits_root=splits_root)
    assert {s: len(data[s]) for s in data} == {s: 4 * len(c) for s, c in parts.items()}
    train = data["train"]
    base = train.images(train.class_index("Alpha/character02/rot000"))
    for k in (1, 2, 3):
        turned = train.images(train.class_index(f"Alpha/character02/rot{90 * k:03d}"))
        assert torch.equal(turned, torch.rot90(base, k, dims=(-2, -1)))
    assert set(train.groups) == {"Alpha", "Beta", "Delta"}
    plain = Omniglot(root, "vinyals", cache_dir=tmp_path / "cache", splits_root=splits_root, rotations=False)
    assert len(plain["val"]) == 2 and plain["val"].names == ["Gamma/character01", "Gamma/character02"]


def test_vinyals_split_file_errors(fake_omniglot, tmp_path):
    root = fake_omniglot()
    good = {"train": ["Alpha/character01"], "val": ["Beta/character01"], "test": ["Delta/character01"]}
    splits = _vinyals_files(tmp_path / "s1", {**good, "test": ["Nope/character09"]})
    with pytest.raises(DataError, match=r"test.txt, line 1: no Omniglot character 'Nope/character09'"):
        Omniglot(root, "vinyals", cache_dir=tmp_path / "cache", splits_root=splits)
    splits = _vinyals_files(tmp_path / "s2", {**good, "val": ["Alpha/character01"]})
    with pytest.raises(DataError, match="disjoint"):
        Omniglot(root, "vinyals", cache_dir=tmp_path / "cache", splits_root=splits)


def test_missing_vinyals_files_offline_say_where(fake_omniglot, tmp_path, monkeypatch):
    root = fake_omniglot()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def offline(url, dest, sha256=None, **kwargs):
        raise DownloadError("offline")

    monkeypatch.setattr(om, "download", offline)
    with pytest.raises(DataError, match=r"train.txt, val.txt and test.txt .* in .*splits"):
        Omniglot(root, "vinyals", cache_dir=tmp_path / "cache")


def test_lake_split_is_by_alphabet(fake_omniglot, tmp_path):
    root = fake_omniglot()
    data = Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets=1, split_seed=3)
    train, val, test = (set(data[s].groups) for s in ("train", "val", "test"))
    assert len(val) == 1 and train | val == set(FAKE_BACKGROUND) and not train & val
    assert test == set(FAKE_EVALUATION)
    assert all("/rot" not in n for n in data["train"].names)
    again = Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets=1, split_seed=3)
    assert again["val"].names == data["val"].names  # deterministic
    with pytest.raises(ValueError, match="lake_val_alphabets=3"):
        Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets=3)


def test_maml_split(fake_omniglot, tmp_path):
    root = fake_omniglot()
    data = Omniglot(root, "maml", cache_dir=tmp_path / "cache", maml_train=8, maml_val=2)
    chars = {s: {n.rsplit("/", 1)[0] for n in data[s].names} for s in data}
    assert [len(chars[s]) for s in ("train", "val", "test")] == [6, 2, N_CHARS - 8]
    assert not (chars["train"] & chars["val"] or chars["train"] & chars["test"] or chars["val"] & chars["test"])
    assert len(data["train"]) == 4 * 6  # rotations are classes
    no_val = Omniglot(root, "maml", cache_dir=tmp_path / "cache", maml_train=8, maml_val=0)
    assert list(no_val) == ["train", "test"]
    with pytest.raises(KeyError, match="no 'val' part"):
        no_val["val"]
    with pytest.raises(ValueError, match="unknown Omniglot split"):
        Omniglot(root, "nope", cache_dir=tmp_path / "cache")  # type: ignore[arg-type]


def test_lake_split_with_named_val_alphabets(fake_omniglot, tmp_path):
    root = fake_omniglot()
    data = Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets=["Beta"])
    assert set(data["val"].groups) == {"Beta"} and set(data["train"].groups) == {"Alpha", "Gamma"}
    assert set(Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets="Gamma")["val"].groups) == {
        "Gamma"}  # one name, not its letters
    with pytest.raises(ValueError, match="names Tagalog"):
        Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets=["Beta", "Tagalog"])
    with pytest.raises(ValueError, match="every background alphabet"):
        Omniglot(root, "lake", cache_dir=tmp_path / "cache", lake_val_alphabets=["Alpha", "Beta", "Gamma"])
