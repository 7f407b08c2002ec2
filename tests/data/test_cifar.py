"""CIFAR-FS and FC100 from tiny archives in the official CIFAR-100 layouts (binary and Python)."""

from __future__ import annotations

import hashlib
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fewshot_fakes import write_tar

import innerloop.data.archives as ar
import innerloop.data.cifar as cf
from innerloop.data.archives import UnsafePickleError, packaged_split, restricted_unpickle
from innerloop.data.download import ChecksumError, CorruptArchiveError, DataError, UnsafeArchiveError
from innerloop.data.factory import task_family

PER_CLASS = (5, 2)  # train, test images per class: 7 in all


def hierarchy() -> tuple[list[str], list[str], dict[str, str]]:
    """CIFAR-100's fine and coarse names (sorted, as CIFAR orders its labels) and fine -> coarse."""
    rows = packaged_split("cifar100", "classes.csv")[1:]
    pairs = [r.split(",") for r in rows]
    parent = {f: c for c, f in pairs}
    return sorted(parent), sorted(set(parent.values())), parent


def records(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """``{"train"|"test": (pixels [n, 3072], fine [n], coarse [n])}``, every class, shuffled."""
    fine_names, coarse_names, parent = hierarchy()
    out = {}
    for part, n in zip(("train", "test"), PER_CLASS, strict=True):
        fine = np.repeat(np.arange(100), n)
        rng.shuffle(fine)
        coarse = np.array([coarse_names.index(parent[fine_names[f]]) for f in fine])
        pixels = rng.integers(0, 256, size=(len(fine), 3072), dtype=np.uint8)
        pixels[:, 0] = fine  # the first red pixel tells the class: checked after loading
        out[part] = (pixels, fine, coarse)
    return out


def write_binary(folder: Path, seed: int = 0, extract: bool = False) -> Path:
    """The binary version: ``cifar-100-binary.tar.gz`` (or its extracted folder) in ``folder``."""
    fine_names, coarse_names, _ = hierarchy()
    files = {
        "fine_label_names.txt": ("\n".join(fine_names) + "\n").encode(),
        "coarse_label_names.txt": ("\n".join(coarse_names) + "\n\n").encode(),
    }
    for part, (pix, fine, coarse) in records(np.random.default_rng(seed)).items():
        rec = np.concatenate([coarse[:, None].astype(np.uint8), fine[:, None].astype(np.uint8), pix], axis=1)
        files[f"{part}.bin"] = rec.tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    if extract:
        (folder / "cifar-100-binary").mkdir()
        for name, data in files.items():
            (folder / "cifar-100-binary" / name).write_bytes(data)
        return folder / "cifar-100-binary"
    return write_tar(folder / cf.ARCHIVE, {f"cifar-100-binary/{n}": data for n, data in files.items()})


def write_python(folder: Path, seed: int = 0) -> Path:
    """The Python version ``cifar-100-python.tar.gz``: pickles of dicts with numpy arrays."""
    fine_names, coarse_names, _ = hierarchy()
    files = {"meta": pickle.dumps({"fine_label_names": fine_names, "coarse_label_names": coarse_names}, 2)}
    for part, (pix, fine, coarse) in records(np.random.default_rng(seed)).items():
        batch = {"data": pix, "fine_labels": fine.tolist(), "coarse_labels": coarse.tolist(), "filenames": [b"x"]}
        files[part] = pickle.dumps(batch, protocol=2)
    folder.mkdir(parents=True, exist_ok=True)
    return write_tar(folder / cf.PYTHON_ARCHIVE, {f"cifar-100-python/{n}": data for n, data in files.items()})


pytestmark = pytest.mark.usefixtures("offline_loaders")


def _check_splits(splits: dict[str, object], sizes: dict[str, int]) -> None:
    assert {s: len(d) for s, d in splits.items()} == sizes  # type: ignore[arg-type]
    names = [set(d.names) for d in splits.values()]  # type: ignore[attr-defined]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])


def test_cifar_fs_and_fc100_splits_from_the_binary_archive(tmp_path: Path) -> None:
    write_binary(tmp_path / "cifar100")
    cache = tmp_path / "cache"
    fs = cf.cifar_fs(tmp_path, cache_dir=cache)
    _check_splits(fs, {"train": 64, "val": 16, "test": 20})  # type: ignore[arg-type]
    fc = cf.fc100(tmp_path, cache_dir=cache)
    _check_splits(fc, {"train": 60, "val": 20, "test": 20})  # type: ignore[arg-type]
    supers = [set(d.groups) for d in fc.values()]
    assert [len(g) for g in supers] == [12, 4, 4] and not (supers[0] & supers[1]) and not (supers[0] & supers[2])
    assert len(list(cache.glob("cifar100-32x32-*.npz"))) == 1  # one cache for both benchmarks
    fine_names, _, parent = hierarchy()
    ds = fs["train"]
    for c in range(ds.num_classes):
        x = ds.images(c)
        assert x.shape == (sum(PER_CLASS), 3, 32, 32) and x.dtype == torch.float32
        # the class marker written into pixel 0 survived reordering: images belong to their class
        assert torch.all((x[:, 0, 0, 0] * 255).round() == fine_names.index(ds.names[c]))
        assert ds.groups[c] == parent[ds.names[c]]
    assert float(ds.data.float().max()) <= 255 and ds.data.dtype == torch.uint8


def test_registered_families_sample_tasks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_binary(tmp_path / "data" / "cifar100")
    monkeypatch.setenv("INNERLOOP_DATA", str(tmp_path / "data"))
    for name, classes in (("cifar-fs", 64), ("fc100", 60)):
        fam = task_family(name, shots=1, queries=5, ways=5, seed=3)
        assert fam.splits["train"].num_classes == classes  # type: ignore[attr-defined]
        t = fam.task("train", 0)
        assert t.support_x.shape == (5, 3, 32, 32) and t.query_x.shape == (25, 3, 32, 32)
        assert t.support_y.tolist() == [0, 1, 2, 3, 4]
        assert float(t.support_x.min()) >= 0.0 and float(t.query_x.max()) <= 1.0
        assert torch.equal(fam.task("test", 7).query_x, fam.task("test", 7).query_x)


def test_extracted_folder_and_cache_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_binary(tmp_path, extract=True)
    first = cf.load_cifar100(tmp_path, cache_dir=tmp_path / "c")
    assert first.num_classes == 100 and len(first.group_classes()) == 20

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache must be used")

    monkeypatch.setattr(cf, "_read_binary_dir", boom)
    again = cf.load_cifar100(tmp_path, cache_dir=tmp_path / "c")
    assert torch.equal(first.data, again.data) and first.names == again.names


def test_python_version_through_the_restricted_unpickler(tmp_path: Path) -> None:
    write_python(tmp_path)
    write_binary(tmp_path / "bin", extract=True)
    a = cf.load_cifar100(tmp_path, use_cache=False)
    b = cf.load_cifar100(tmp_path / "bin", use_cache=False)
    assert a.names == b.names and a.groups == b.groups and torch.equal(a.data, b.data)


class _Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_malicious_pickle_is_refused(tmp_path: Path) -> None:
    blob = pickle.dumps({"data": _Evil()})
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system|nt\.system"):
        restricted_unpickle(blob, "evil")
    obj_array = pickle.dumps(np.array([1, "x"], dtype=object))
    with pytest.raises(UnsafePickleError, match="object dtype"):
        restricted_unpickle(obj_array, "objects")
    # in place of CIFAR's meta file: refused before anything is built
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test"):
        (folder / name).write_bytes(pickle.dumps({"data": np.zeros((1, 3072), np.uint8)}))
    (folder / "meta").write_bytes(blob)
    with pytest.raises(UnsafePickleError):
        cf.load_cifar100(tmp_path, use_cache=False)
    assert not list(tmp_path.rglob("*.npz"))
    assert restricted_unpickle(pickle.dumps({"a": [1, 2.0, b"x", np.arange(3)]}))["a"][3].tolist() == [0, 1, 2]


def test_checksum_mismatch_and_missing_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_download(url: str, dest: Path, sha256: str | None = None, **kwargs: object) -> Path:
        assert url == cf.URL and url.startswith("https://") and sha256 == cf.SHA256
        Path(dest).write_bytes(b"not the archive")  # what a network that skipped the sha256 check hands over
        return Path(dest)

    monkeypatch.setattr(ar, "download", fake_download)
    with pytest.raises(DataError, match="md5"):
        cf.load_cifar100(tmp_path / "net", use_cache=False)
    assert not list((tmp_path / "net").iterdir())  # nothing left under any name
    with pytest.raises(DataError, match=r"cifar-100-binary\.tar\.gz"):
        cf.load_cifar100(tmp_path / "none", download=False)
    # a SHA256SUMS beside a local archive is honoured
    path = write_binary(tmp_path / "sums")
    (path.parent / "SHA256SUMS").write_text(f"{'0' * 64}  {path.name}\n")
    with pytest.raises(ChecksumError, match="SHA256SUMS"):
        cf.load_cifar100(path.parent, use_cache=False)
    (path.parent / "SHA256SUMS").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    assert cf.load_cifar100(path.parent, use_cache=False).num_classes == 100


def test_corrupt_and_unsafe_archives_are_refused(tmp_path: Path) -> None:
    path = write_binary(tmp_path / "trunc")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CorruptArchiveError, match="truncated or corrupt"):
        cf.load_cifar100(path.parent, cache_dir=tmp_path / "c1")
    assert not (tmp_path / "c1").exists() or not list((tmp_path / "c1").iterdir())
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / cf.ARCHIVE).write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(CorruptArchiveError):
        cf.load_cifar100(tmp_path / "junk", use_cache=False)
    bad = tmp_path / "unsafe"
    bad.mkdir()
    write_tar(bad / cf.ARCHIVE, {"../escape.txt": b"x"})
    with pytest.raises(UnsafeArchiveError, match=r"'\.\./escape\.txt'"):
        cf.load_cifar100(bad, use_cache=False)
    link = tmp_path / "link"
    link.mkdir()
    with tarfile.open(link / cf.ARCHIVE, "w:gz") as tf:
        info = tarfile.TarInfo("cifar-100-binary/train.bin")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(info)
    with pytest.raises(UnsafeArchiveError, match="symbolic link"):
        cf.load_cifar100(link, use_cache=False)
    short = write_binary(tmp_path / "short", extract=True)
    (short / "test.bin").write_bytes((short / "test.bin").read_bytes()[:-7])
    with pytest.raises(DataError, match="whole number"):
        cf.load_cifar100(short.parent, use_cache=False)


def test_shipped_split_files() -> None:
    fine, coarse, _ = hierarchy()
    assert len(fine) == 100 and len(coarse) == 20
    fs = {s: packaged_split("cifar-fs", f"{s}.txt") for s in ("train", "val", "test")}
    assert [len(v) for v in fs.values()] == [64, 16, 20] and sorted(n for v in fs.values() for n in v) == fine
    fc = {s: packaged_split("fc100", f"{s}.txt") for s in ("train", "val", "test")}
    assert [len(v) for v in fc.values()] == [12, 4, 4] and sorted(n for v in fc.values() for n in v) == coarse
    # TADAM's superclass indices (CIFAR's sorted coarse labels)
    assert [coarse.index(c) for c in fc["val"]] == [8, 11, 13, 16]
    assert [coarse.index(c) for c in fc["test"]] == [0, 7, 12, 14]


def _with_dtype_state(blob: bytes, old: bytes, new: bytes) -> bytes:
    assert blob.count(old) == 1
    return blob.replace(old, new)


def test_pickle_cannot_rewrite_a_dtype_or_call_ndarray() -> None:
    """A pickle's BUILD can rewrite a numpy dtype's flags after it is made (numpy then treats raw bytes as
    object pointers); the state is checked before numpy applies it, and ``numpy.ndarray`` is not callable."""
    plain = pickle.dumps(np.zeros(2, np.uint8), protocol=2)
    # the dtype's state ends with its flags (BININT1 0, TUPLE): make them claim object references
    tail = b"J\xff\xff\xff\xffJ\xff\xff\xff\xffK"
    for flags, message in ((b"\x3f", "object dtype"), (b"\x02", "unaltered")):
        with pytest.raises(UnsafePickleError, match=message):
            restricted_unpickle(_with_dtype_state(plain, tail + b"\x00t", tail + flags + b"t"), "flags")
    call = b"\x80\x02cnumpy\nndarray\nK\x10\x85X\x02\x00\x00\x00u1\x86R."  # numpy.ndarray((16,), "u1")
    with pytest.raises(CorruptArchiveError, match="not callable"):
        restricted_unpickle(call, "call")
    huge = b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\nJ\x00\x00\x00\x40\x85C\x01b\x87R."
    with pytest.raises(UnsafePickleError, match="not an empty one"):
        restricted_unpickle(huge, "huge")
    structured = pickle.dumps(np.zeros(2, [("a", "<u8")]), protocol=2)
    with pytest.raises(UnsafePickleError, match="only plain"):
        restricted_unpickle(structured, "structured")
    got = restricted_unpickle(plain)
    assert type(got) is np.ndarray and got.tolist() == [0, 0]  # numpy's own pickles still load, as plain arrays
    assert type(restricted_unpickle(pickle.dumps([np.arange(3)]))[0]) is np.ndarray
