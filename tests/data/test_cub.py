"""CUB-200-2011 from a tiny archive in the official layout, with the split of Chen et al. 2019."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from fewshot_fakes import write_tar
from PIL import Image

import innerloop.data.archives as ar
import innerloop.data.cub as cb
from innerloop.data.archives import packaged_split
from innerloop.data.download import ChecksumError, CorruptArchiveError, DataError, UnsafeArchiveError
from innerloop.data.factory import task_family

IMAGES = 3  # per class
SIDE = 8  # stored image side in these tests


def classes() -> list[str]:
    return sorted(n for s in ("train", "val", "test") for n in packaged_split("cub", f"{s}.txt"))


def jpeg(k: int, i: int, mode: str = "RGB") -> bytes:
    im = Image.new(mode, (13 + i, 10 + k % 5), (k % 256, (40 * i) % 256, 200) if mode == "RGB" else k % 256)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def members(names: list[str]) -> dict[str, bytes]:
    out = {"CUB_200_2011/classes.txt": "".join(f"{i + 1} {n}\n" for i, n in enumerate(names)).encode(),
           "attributes.txt": b"1 has_bill_shape::curved\n"}
    for k, name in enumerate(names):
        for i in range(IMAGES):
            mode = "L" if (k, i) == (3, 0) else "RGB"  # CUB has a few grey photographs
            out[f"CUB_200_2011/images/{name}/{name[4:]}_{i:04d}_{k}.jpg"] = jpeg(k, i, mode)
    return out


def write_archive(folder: Path, files: dict[str, bytes] | None = None) -> Path:
    return write_tar(folder / cb.ARCHIVE, files if files is not None else members(classes()))


pytestmark = pytest.mark.usefixtures("offline_loaders")


def test_split_rule_of_chen_et_al() -> None:
    names = classes()
    assert len(names) == 200 and names[0] == "001.Black_footed_Albatross"
    assert names[-1] == "200.Common_Yellowthroat"
    split = {s: packaged_split("cub", f"{s}.txt") for s in ("train", "val", "test")}
    assert split["train"] == [n for i, n in enumerate(names) if i % 2 == 0]
    assert split["val"] == [n for i, n in enumerate(names) if i % 4 == 1]
    assert split["test"] == [n for i, n in enumerate(names) if i % 4 == 3]


def test_archive_splits_and_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_archive(tmp_path / "data" / "cub")
    parts = cb.cub(tmp_path / "data", image_size=SIDE)  # found in data/cub, cached in $INNERLOOP_CACHE
    assert {s: len(d) for s, d in parts.items()} == {"train": 100, "val": 50, "test": 50}
    sets = [set(d.names) for d in parts.values()]
    assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    x = parts["val"].images(0)
    assert x.shape == (IMAGES, 3, SIDE, SIDE) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    grey = parts["test"].images(parts["test"].class_index(classes()[3]))  # class 3 (i % 4 == 3): test
    assert grey.shape == (IMAGES, 3, SIDE, SIDE)
    assert len(list((tmp_path / "user-cache").glob("cub-8x8-*.npz"))) == 1
    monkeypatch.setenv("INNERLOOP_DATA", str(tmp_path / "data"))
    monkeypatch.setattr(cb, "iter_tar", None)  # the family below must come from the cache written above
    fam = task_family("cub", shots=1, queries=2, ways=5, seed=1, image_size=SIDE)
    assert fam.splits["test"].num_classes == 50  # type: ignore[attr-defined]


def test_registered_family_samples_a_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_archive(tmp_path / "cub")
    fam = task_family("cub", shots=1, queries=2, ways=5, seed=0, image_size=SIDE, data_root=str(tmp_path))
    t = fam.task("train", 4)
    assert t.support_x.shape == (5, 3, SIDE, SIDE) and t.query_x.shape == (10, 3, SIDE, SIDE)
    assert t.query_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4] and t.support_x.dtype == torch.float32


def test_extracted_folder_matches_archive(tmp_path: Path) -> None:
    write_archive(tmp_path / "a")
    for name, data in members(classes()).items():
        (tmp_path / "b" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / name).write_bytes(data)
    a = cb.load_cub(tmp_path / "a", image_size=SIDE, use_cache=False)
    b = cb.load_cub(tmp_path / "b", image_size=SIDE, use_cache=False)
    assert a.names == b.names and torch.equal(a.data, b.data) and a.counts.tolist() == [IMAGES] * 200


def test_checksum_corrupt_unsafe_and_wrong_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def wrong_bytes(url: str, dest: Path, sha256: str | None = None, **kwargs: object) -> Path:
        assert url == cb.URL and url.startswith("https://")
        Path(dest).write_bytes(b"not CUB")
        return Path(dest)

    monkeypatch.setattr(ar, "download", wrong_bytes)
    with pytest.raises(ChecksumError, match=cb.MD5):
        cb.load_cub(tmp_path / "net", use_cache=False)
    assert not list((tmp_path / "net").iterdir())
    with pytest.raises(DataError, match=r"CUB_200_2011\.tgz"):
        cb.load_cub(tmp_path / "none", download=False)

    path = write_archive(tmp_path / "trunc")
    path.write_bytes(path.read_bytes()[:-2000])
    with pytest.raises(CorruptArchiveError):
        cb.load_cub(path.parent, image_size=SIDE, cache_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists() or not list((tmp_path / "c").glob("*.npz"))

    files = members(classes())
    write_archive(tmp_path / "unsafe", {**files, "/etc/cron.d/x": b"x"})
    with pytest.raises(UnsafeArchiveError, match="absolute path"):
        cb.load_cub(tmp_path / "unsafe", image_size=SIDE, use_cache=False)

    fewer = {k: v for k, v in files.items() if classes()[7] not in k}
    write_archive(tmp_path / "fewer", fewer)
    with pytest.raises(DataError, match="199"):
        cb.load_cub(tmp_path / "fewer", image_size=SIDE, use_cache=False)

    broken = dict(files)
    broken[next(k for k in files if k.endswith(".jpg"))] = b"\xff\xd8 not a jpeg"
    write_archive(tmp_path / "broken", broken)
    with pytest.raises(DataError, match="cannot read the image"):
        cb.load_cub(tmp_path / "broken", image_size=SIDE, cache_dir=tmp_path / "c2")
    assert not (tmp_path / "c2").exists() or not list((tmp_path / "c2").glob("*.npz"))
