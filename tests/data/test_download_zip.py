"""Downloads with SHA-256 verification (served by a fake https handler, no network) and safe zip reading."""

from __future__ import annotations

import hashlib
import stat
import zipfile
from pathlib import Path

import pytest
from fewshot_fakes import FakeHTTPS

from innerloop.data.download import (
    ChecksumError,
    CorruptArchiveError,
    DownloadError,
    UnsafeArchiveError,
    download,
    extract_zip,
    https_opener,
    iter_zip,
    sha256_file,
)

URL = "https://example.org/data/file.bin"


def _source(data: bytes = b"hello omniglot" * 1000) -> tuple[FakeHTTPS, str]:
    served = FakeHTTPS({URL: (200, {"Content-Length": str(len(data))}, data)})
    return served, hashlib.sha256(data).hexdigest()


def test_download_verifies_and_writes_atomically(tmp_path):
    served, digest = _source()
    seen = []
    dest = download(
        URL, tmp_path / "out" / "file.bin", sha256=digest, progress=lambda n, t: seen.append(n),
        opener=https_opener(served),
    )
    assert sha256_file(dest) == digest
    assert seen and seen[-1] == dest.stat().st_size == 14000
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temporary left


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    served, digest = _source()
    dest = tmp_path / "out" / "file.bin"
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as err:
        download(URL, dest, sha256=wrong, opener=https_opener(served))
    msg = str(err.value)
    assert URL in msg and wrong in msg and digest in msg and str(dest) in msg
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_download_failure_says_where_to_put_the_file(tmp_path):
    url = "https://example.org/nowhere/file.zip"
    dest = tmp_path / "out" / "file.zip"
    with pytest.raises(DownloadError) as err:
        download(url, dest, opener=https_opener(FakeHTTPS({})))
    assert url in str(err.value) and str(dest) in str(err.value) and "by hand" in str(err.value)
    assert list(dest.parent.iterdir()) == []


def _zip(path: Path, members: list[tuple[str, bytes]], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
        if symlink is not None:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        ("../evil.png", ".."),
        ("a/b/../../../evil.png", ".."),
        ("/abs/evil.png", "absolute"),
        ("C:/evil.png", "absolute"),
        ("\\evil.png", "absolute"),
    ],
)
def test_unsafe_members_are_rejected_before_use(tmp_path, bad, why):
    path = _zip(tmp_path / "a.zip", [("good/a.png", b"x"), (bad, b"evil")])
    with pytest.raises(UnsafeArchiveError) as err:
        next(iter_zip(path))  # even the good member is not handed out
    assert repr(bad) in str(err.value) and why in str(err.value) and str(path) in str(err.value)
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError):
        extract_zip(path, dest)
    assert not dest.exists()  # refused before anything was created
    assert not (tmp_path / "evil.png").exists()


def test_symlink_member_is_rejected(tmp_path):
    path = _zip(tmp_path / "a.zip", [("good/a.png", b"x")], symlink="good/link.png")
    with pytest.raises(UnsafeArchiveError, match=r"'good/link.png' has a symbolic link"):
        list(iter_zip(path))


def test_truncated_zip_gives_a_clear_error(tmp_path):
    path = _zip(tmp_path / "a.zip", [(f"d/{i}.png", bytes(range(256)) * 20) for i in range(5)])
    path.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(CorruptArchiveError) as err:
        list(iter_zip(path))
    assert str(path) in str(err.value) and "download it again" in str(err.value)


def test_crc_error_names_the_member(tmp_path):
    data = b"A" * 5000
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("d/one.png", data)
    raw = bytearray(path.read_bytes())
    at = raw.index(data)
    raw[at + 100] ^= 0xFF  # flip a byte of the stored data: only the CRC can tell
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptArchiveError, match=r"d/one.png") as err:
        list(iter_zip(path))
    assert "CRC" in str(err.value)
    dest = tmp_path / "out"
    with pytest.raises(CorruptArchiveError):
        extract_zip(path, dest)
    assert list(dest.iterdir()) == []  # no partial extraction


def test_iter_and_extract_good_zip(tmp_path):
    path = _zip(tmp_path / "a.zip", [("d/b.png", b"2"), ("d/a.png", b"1"), ("d/notes.txt", b"t")])
    assert list(iter_zip(path, (".png",))) == [("d/a.png", b"1"), ("d/b.png", b"2")]
    dest = extract_zip(path, tmp_path / "out")
    assert (dest / "d" / "a.png").read_bytes() == b"1" and (dest / "d" / "notes.txt").read_bytes() == b"t"
    assert sorted(p.name for p in dest.iterdir()) == [".innerloop-extract.json", "d"]


def test_missing_zip_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_zip(tmp_path / "absent.zip"))
