"""Download and archive safety (issue 13, item 7 and the size caps of item 4), all without network.

https only (and no downgrade on redirect), a size cap on downloads, local archives checked
against a ``SHA256SUMS`` beside them, the user's umask respected, ``extract_zip`` never deleting
what it did not create, archive members capped in size, and image decompression bombs turned
into a :class:`DataError`.
"""

from __future__ import annotations

import hashlib
import http.server
import importlib
import io
import os
import struct
import threading
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from fewshot_fakes import FakeHTTPS, omniglot_png
from PIL import Image

from innerloop.data.download import (
    EXTRACT_MARKER,
    ChecksumError,
    CorruptArchiveError,
    DataError,
    DownloadError,
    HttpsOnlyRedirectHandler,
    InsecureURLError,
    SizeLimitError,
    check_url,
    download,
    extract_zip,
    https_opener,
    iter_zip,
    read_member,
    verify_checksum_list,
)
from innerloop.data.images import image_folder_dataset, load_image
from innerloop.data.omniglot import _read_archive, load_omniglot_characters
from innerloop.io import current_umask

dl = importlib.import_module("innerloop.data.download")  # the package's `download` is the function
URL = "https://example.org/data/file.bin"
BODY = b"0123456789abcdef" * 64  # 1 KiB


# ----------------------------------------------------------------------------------------------
# https only


@pytest.mark.parametrize(
    "url",
    [
        "http://example.org/file.zip",
        "file:///etc/passwd",
        "data:text/plain;base64,aGVsbG8=",
        "ftp://example.org/file.zip",
        "HTTP://example.org/file.zip",
        "https:///no-host.zip",
        "/just/a/path.zip",
        "example.org/file.zip",
    ],
)
def test_non_https_urls_are_refused_before_anything_happens(tmp_path, url):
    dest = tmp_path / "out" / "file.zip"
    served = FakeHTTPS({})
    with pytest.raises(InsecureURLError) as err:
        download(url, dest, opener=https_opener(served))
    assert isinstance(err.value, ValueError) and isinstance(err.value, DownloadError)
    assert repr(url) in str(err.value) and "https" in str(err.value)
    assert not dest.parent.exists() and served.seen == []  # no folder made, nothing fetched
    with pytest.raises(ValueError):
        check_url(url)


def test_https_url_is_accepted():
    check_url("https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip")
    check_url("HTTPS://example.org/x")


@pytest.fixture
def local_http_server() -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 serving BODY, recording the paths requested."""
    requested: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/file.bin", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_plain_http_server_is_never_contacted(tmp_path, local_http_server):
    url, requested = local_http_server
    # The server works (urllib alone fetches it) ...
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.read() == BODY
    requested.clear()
    # ... but download() refuses the URL without contacting it.
    with pytest.raises(InsecureURLError, match="only https"):
        download(url, tmp_path / "file.bin")
    assert requested == [] and not (tmp_path / "file.bin").exists()


def _redirect(handler: HttpsOnlyRedirectHandler, from_url: str, to_url: str) -> urllib.request.Request | None:
    import http.client

    req = urllib.request.Request(from_url)
    return handler.redirect_request(req, io.BytesIO(b""), 302, "Found", http.client.HTTPMessage(), to_url)


@pytest.mark.parametrize("target", ["http://example.org/file.bin", "file:///etc/passwd", "ftp://example.org/f"])
def test_redirect_handler_refuses_a_downgrade(target):
    with pytest.raises(InsecureURLError) as err:
        _redirect(HttpsOnlyRedirectHandler(), URL, target)
    assert URL in str(err.value) and target in str(err.value) and "leaves https" in str(err.value)


def test_redirect_handler_follows_https_and_relative_targets():
    new = _redirect(HttpsOnlyRedirectHandler(), URL, "https://cdn.example.org/file.bin")
    assert new is not None and new.full_url == "https://cdn.example.org/file.bin"
    new = _redirect(HttpsOnlyRedirectHandler(), URL, "/other/file.bin")
    assert new is not None and new.full_url == "https://example.org/other/file.bin"


def test_download_refuses_https_to_http_redirect_end_to_end(tmp_path):
    http_url = "http://example.org/file.bin"
    served = FakeHTTPS({URL: (302, {"Location": http_url}, b"")})
    dest = tmp_path / "file.bin"
    with pytest.raises(InsecureURLError, match="leaves https"):
        download(URL, dest, opener=https_opener(served))
    assert served.seen == [URL] and list(tmp_path.iterdir()) == []


def test_download_follows_https_to_https_redirect(tmp_path):
    mirror = "https://mirror.example.org/file.bin"
    served = FakeHTTPS({URL: (301, {"Location": mirror}, b""), mirror: (200, {}, BODY)})
    digest = hashlib.sha256(BODY).hexdigest()
    dest = download(URL, tmp_path / "file.bin", sha256=digest, opener=https_opener(served))
    assert dest.read_bytes() == BODY and served.seen == [URL, mirror]


def test_default_opener_uses_the_https_only_redirect_handler():
    opener = https_opener()
    assert any(isinstance(h, HttpsOnlyRedirectHandler) for h in opener.handlers)
    assert not any(type(h) is urllib.request.HTTPRedirectHandler for h in opener.handlers)


# ----------------------------------------------------------------------------------------------
# size cap


def test_announced_size_over_the_cap_is_refused_before_streaming(tmp_path):
    served = FakeHTTPS({URL: (200, {"Content-Length": str(10 << 30)}, BODY)})
    dest = tmp_path / "file.bin"
    with pytest.raises(SizeLimitError) as err:
        download(URL, dest, max_bytes=1000, opener=https_opener(served))
    msg = str(err.value)
    assert URL in msg and "announces" in msg and "max_bytes" in msg and str(dest) in msg
    assert list(tmp_path.iterdir()) == []


def test_stream_over_the_cap_is_aborted_and_the_partial_file_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(dl, "_CHUNK", 100)
    served = FakeHTTPS({URL: (200, {}, BODY)})  # no Content-Length: only counting can tell
    progress: list[int] = []
    with pytest.raises(SizeLimitError, match="more than 500 bytes arrived"):
        download(URL, tmp_path / "file.bin", max_bytes=500, opener=https_opener(served),
                 progress=lambda n, t: progress.append(n))
    assert progress[-1] <= 500  # stopped at the cap, not after the whole stream
    assert list(tmp_path.iterdir()) == []


def test_default_cap_is_twice_the_expected_size(tmp_path):
    served = FakeHTTPS({URL: (200, {}, BODY)})
    with pytest.raises(SizeLimitError, match="max_bytes"):
        download(URL, tmp_path / "a.bin", expected_size=len(BODY) // 3, opener=https_opener(served))
    ok = download(URL, tmp_path / "b.bin", expected_size=len(BODY) // 2 + 1, opener=https_opener(served))
    assert ok.is_file()
    assert dl.DEFAULT_MAX_DOWNLOAD_BYTES == 2 << 30


def test_size_cap_error_is_not_mistaken_for_a_checksum_error(tmp_path):
    served = FakeHTTPS({URL: (200, {}, BODY)})
    with pytest.raises(SizeLimitError):
        download(URL, tmp_path / "file.bin", sha256="0" * 64, max_bytes=10, opener=https_opener(served))


# ----------------------------------------------------------------------------------------------
# umask


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_downloaded_file_respects_the_umask(tmp_path, umask, mode):
    served = FakeHTTPS({URL: (200, {}, BODY)})
    old = os.umask(umask)
    try:
        dest = download(URL, tmp_path / "file.bin", opener=https_opener(served))
        assert current_umask() == umask
    finally:
        os.umask(old)
    assert dest.stat().st_mode & 0o777 == mode


# ----------------------------------------------------------------------------------------------
# SHA256SUMS beside local archives


def _sums(folder: Path, entries: dict[str, str], star: bool = False) -> Path:
    path = folder / "SHA256SUMS"
    path.write_text("".join(f"{d} {'*' if star else ' '}{n}\n" for n, d in entries.items()))
    return path


def test_checksum_list_verifies_matching_files(tmp_path):
    f = tmp_path / "a.zip"
    f.write_bytes(BODY)
    assert verify_checksum_list(f) is False  # no list: nothing checked
    _sums(tmp_path, {"other.zip": "1" * 64})
    assert verify_checksum_list(f) is False  # not listed: nothing checked
    _sums(tmp_path, {"a.zip": hashlib.sha256(BODY).hexdigest(), "other.zip": "1" * 64})
    assert verify_checksum_list(f) is True
    _sums(tmp_path, {"a.zip": hashlib.sha256(BODY).hexdigest().upper()}, star=True)  # sha256sum -b
    assert verify_checksum_list(f) is True


def test_checksum_list_mismatch_names_file_and_both_digests(tmp_path):
    f = tmp_path / "a.zip"
    f.write_bytes(BODY)
    sums = _sums(tmp_path, {"a.zip": "ab" * 32})
    with pytest.raises(ChecksumError) as err:
        verify_checksum_list(f)
    msg = str(err.value)
    assert str(f) in msg and str(sums) in msg and "ab" * 32 in msg and hashlib.sha256(BODY).hexdigest() in msg


def test_malformed_checksum_list_is_a_clear_error(tmp_path):
    f = tmp_path / "a.zip"
    f.write_bytes(BODY)
    (tmp_path / "SHA256SUMS").write_text("# comment\n\nnot-a-digest  a.zip\n")
    with pytest.raises(DataError, match=r"SHA256SUMS, line 3"):
        verify_checksum_list(f)


def test_local_omniglot_archive_checked_against_sha256sums(fake_omniglot):
    root = fake_omniglot()
    digests = {n: hashlib.sha256((root / n).read_bytes()).hexdigest()
               for n in ("images_background.zip", "images_evaluation.zip")}
    _sums(root, digests)
    chars, _ = load_omniglot_characters(root, download=False, use_cache=False)
    assert chars.num_classes > 0
    _sums(root, {**digests, "images_evaluation.zip": "0" * 64})
    with pytest.raises(ChecksumError) as err:
        load_omniglot_characters(root, download=False, use_cache=False)
    msg = str(err.value)
    assert "images_evaluation.zip" in msg and "0" * 64 in msg and digests["images_evaluation.zip"] in msg


# ----------------------------------------------------------------------------------------------
# extract_zip never deletes what it did not create


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_refuses_a_folder_with_foreign_files(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"d/x.txt": b"x"})
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "mine.txt").write_text("precious")
    (dest / "d").mkdir()
    (dest / "d" / "keep.txt").write_text("precious too")
    with pytest.raises(DataError) as err:
        extract_zip(archive, dest)
    assert str(dest) in str(err.value) and "mine.txt" in str(err.value) and "did not extract" in str(err.value)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["d", "d/keep.txt", "mine.txt"]
    assert (dest / "mine.txt").read_text() == "precious"


def test_extract_into_an_empty_existing_folder(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"d/x.txt": b"x"})
    (tmp_path / "out").mkdir()
    dest = extract_zip(archive, tmp_path / "out")
    assert (dest / "d" / "x.txt").read_bytes() == b"x" and (dest / EXTRACT_MARKER).is_file()


def test_reextracting_the_same_archive_replaces_only_its_own_files(tmp_path):
    dest = tmp_path / "out"
    extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"old", "d/gone.txt": b"g", "e/only.txt": b"o"}), dest)
    (dest / "d" / "user.txt").write_text("added by the user")
    (dest / "notes.txt").write_text("also the user's")
    extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"new", "f/y.txt": b"y"}), dest)
    assert (dest / "d" / "x.txt").read_bytes() == b"new" and (dest / "f" / "y.txt").read_bytes() == b"y"
    assert not (dest / "d" / "gone.txt").exists() and not (dest / "e").exists()  # ours: removed
    assert (dest / "d" / "user.txt").read_text() == "added by the user"  # not ours: kept
    assert (dest / "notes.txt").read_text() == "also the user's"
    assert not any(p.name.startswith(".extract-") for p in dest.iterdir())


def test_extract_refuses_another_archives_extraction(tmp_path):
    dest = tmp_path / "out"
    extract_zip(_zip(tmp_path / "a.zip", {"x.txt": b"a"}), dest)
    with pytest.raises(DataError, match=r"holds an extraction of a\.zip, not of b\.zip"):
        extract_zip(_zip(tmp_path / "b.zip", {"x.txt": b"b"}), dest)
    assert (dest / "x.txt").read_bytes() == b"a"


def test_extract_refuses_to_overwrite_a_file_the_user_added(tmp_path):
    dest = tmp_path / "out"
    extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"1"}), dest)
    (dest / "d" / "y.txt").write_text("the user's")
    with pytest.raises(DataError, match=r"'d/y.txt' would replace"):
        extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"2", "d/y.txt": b"archive"}), dest)
    assert (dest / "d" / "y.txt").read_text() == "the user's" and (dest / "d" / "x.txt").read_bytes() == b"1"


def test_a_tampered_marker_cannot_make_extraction_delete_outside(tmp_path):
    dest = tmp_path / "out"
    extract_zip(_zip(tmp_path / "a.zip", {"x.txt": b"a"}), dest)
    victim = tmp_path / "victim.txt"
    victim.write_text("outside")
    (dest / EXTRACT_MARKER).write_text('{"archive": "a.zip", "files": ["../victim.txt"], "dirs": []}')
    with pytest.raises(DataError, match="outside the folder"):
        extract_zip(tmp_path / "a.zip", dest)
    assert victim.read_text() == "outside"


def test_extract_refuses_a_file_as_destination(tmp_path):
    dest = tmp_path / "out"
    dest.write_text("a file")
    with pytest.raises(DataError, match="not a folder"):
        extract_zip(_zip(tmp_path / "a.zip", {"x.txt": b"a"}), dest)
    assert dest.read_text() == "a file"


# ----------------------------------------------------------------------------------------------
# archive members capped in size


def test_member_over_the_cap_is_refused_before_anything_is_read(tmp_path, monkeypatch):
    archive = _zip(tmp_path / "a.zip", {"a/small.png": b"s", "z/big.png": b"\0" * 5000})
    opened: list[str] = []
    real_open = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(getattr(name, "filename", name))
        return real_open(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    with pytest.raises(SizeLimitError) as err:
        next(iter_zip(archive, max_member_bytes=1000))  # even the small first member is not handed out
    msg = str(err.value)
    assert "'z/big.png'" in msg and str(archive) in msg and "max_member_bytes" in msg and "5000 bytes" in msg
    assert opened == []
    with pytest.raises(SizeLimitError, match=r"z/big\.png"):
        extract_zip(archive, tmp_path / "out", max_member_bytes=1000)
    assert opened == [] and not (tmp_path / "out").exists()
    assert [n for n, _ in iter_zip(archive, max_member_bytes=5000)] == ["a/small.png", "z/big.png"]


def test_a_member_whose_header_understates_its_size_is_corrupt_not_unbounded(tmp_path):
    archive = _zip(tmp_path / "a.zip", {"big.bin": b"A" * 100_000})
    with zipfile.ZipFile(archive) as zf:
        info = zf.getinfo("big.bin")
        info.file_size = 10  # a lying header: reading stops at the declared size and the CRC fails
        with pytest.raises(CorruptArchiveError, match=r"big\.bin"):
            read_member(zf, info, archive, max_bytes=1000)


def test_members_are_read_in_chunks(tmp_path, monkeypatch):
    data = bytes(range(256)) * 40
    archive = _zip(tmp_path / "a.zip", {"m.bin": data})
    monkeypatch.setattr(dl, "_CHUNK", 97)
    assert list(iter_zip(archive)) == [("m.bin", data)]
    assert (extract_zip(archive, tmp_path / "out") / "m.bin").read_bytes() == data


def test_omniglot_member_over_the_cap_is_refused(fake_omniglot):
    big = ("images_background/Zeta/character01/big.png", omniglot_png(1) + bytes(10_000))
    root = fake_omniglot(extra_background=[big])
    with pytest.raises(SizeLimitError, match=r"Zeta/character01/big.png"):
        _read_archive(root / "images_background.zip", (28, 28), max_member_bytes=5000)


# ----------------------------------------------------------------------------------------------
# image decompression bombs


def _png_claiming(width: int, height: int) -> bytes:
    """A ~70-byte PNG whose header claims ``width x height`` (1-bit grey) pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, 128).save(buf, format="PNG")
    return buf.getvalue()


def test_png_claiming_20000_by_20000_is_a_data_error(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(20000, 20000))
    assert bomb.stat().st_size < 200
    with pytest.raises(DataError) as err:
        load_image(bomb, 28, "L")
    msg = str(err.value)
    assert str(bomb) in msg and "400000000" in msg and "decompression bomb" in msg and "MAX_IMAGE_PIXELS" in msg
    assert not isinstance(err.value, Image.DecompressionBombError)


@pytest.mark.parametrize(("side", "why"), [(20, "pixels"), (12, "pixels")])  # 400 > 2x cap; 144 in (1x, 2x]
def test_images_over_a_lowered_pixel_cap_are_data_errors(tmp_path, monkeypatch, side, why):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    f = tmp_path / "big.png"
    f.write_bytes(_png((side, side)))
    with pytest.raises(DataError, match=why) as err:
        load_image(f, 8, "L")
    assert str(f) in str(err.value) and "MAX_IMAGE_PIXELS" in str(err.value)
    assert load_image(_png((9, 9)), 8, "L").shape == (1, 8, 8)  # 81 pixels: under the cap


def test_explicit_max_pixels(tmp_path):
    with pytest.raises(DataError, match=r"30 x 20 = 600 pixels, over the cap of 500 pixels") as err:
        load_image(_png((30, 20)), 8, "L", name="x.png", max_pixels=500)
    assert "x.png" in str(err.value) and "max_pixels" in str(err.value)
    assert load_image(_png((30, 20)), 8, "L", max_pixels=600).shape == (1, 8, 8)


def test_bomb_in_an_image_folder_is_a_data_error(tmp_path, image_folder, monkeypatch):
    root = image_folder({"a": 2, "b": 2})
    (root / "b" / "bomb.png").write_bytes(_png_claiming(20000, 20000))
    with pytest.raises(DataError, match=r"bomb\.png"):
        image_folder_dataset(root, size=8, use_cache=False)


def test_bomb_in_the_omniglot_archive_names_the_member(fake_omniglot):
    bomb = ("images_background/Zeta/character01/bomb.png", _png_claiming(20000, 20000))
    root = fake_omniglot(extra_background=[bomb])
    with pytest.raises(DataError, match=r"images_background.zip:images_background/Zeta/character01/bomb.png"):
        load_omniglot_characters(root, download=False, use_cache=False)


def test_a_folder_of_ours_holding_user_files_is_not_replaced_by_a_file(tmp_path):
    dest = tmp_path / "out"
    extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"1"}), dest)
    (dest / "d" / "user.txt").write_text("the user's")
    with pytest.raises(DataError, match=r"'d' would replace"):
        extract_zip(_zip(tmp_path / "a.zip", {"d": b"now a file"}), dest)
    assert (dest / "d" / "user.txt").read_text() == "the user's"
    (dest / "d" / "user.txt").unlink()
    extract_zip(_zip(tmp_path / "a.zip", {"d": b"now a file"}), dest)  # all ours: replaced
    assert (dest / "d").read_bytes() == b"now a file"


def test_extract_through_a_symlinked_destination(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"1"}), link)
    extract_zip(_zip(tmp_path / "a.zip", {"d/x.txt": b"2"}), link)
    assert (real / "d" / "x.txt").read_bytes() == b"2"
