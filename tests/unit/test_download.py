"""rd.download against a local HTTP server on 127.0.0.1 (nothing else is ever contacted).

The server serves generated archives and can cut a connection, ignore Range or answer 404;
the archives include a good fake category, corrupt bytes and unsafe members.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import random
import re
import signal
import socket
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rd import download
from rd.cli.data import add_download_parser
from rd.download import (
    ARCHIVES,
    LICENCE,
    Archive,
    DownloadError,
    download_file,
    download_mvtec,
    safe_extract,
)

TIME_LIMIT_S = 15
RNG = random.Random(0)
PAYLOAD = RNG.randbytes(300_000)  # bigger than one read, so a cut lands mid-body
CUT = 100_000


@pytest.fixture(autouse=True)
def _bounded(monkeypatch):
    """Fail a test that runs too long; no retry pauses; no proxy between us and 127.0.0.1."""
    def expire(signum, frame):
        pytest.fail(f"took longer than {TIME_LIMIT_S} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(TIME_LIMIT_S)
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    for name in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                 "ALL_PROXY", download.BASE_URL_ENV):
        monkeypatch.delenv(name, raising=False)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------------------------- server


class Site:
    """What the server serves and how it misbehaves; it logs each request's Range header."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut_after: int | None = None  # the next response stops after this many bytes
        self.ignore_range = False
        self.ranges: list[str | None] = []
        self.url = ""


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked = self.headers.get("Range")
            site.ranges.append(asked)
            data = site.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            start = 0
            if asked and not site.ignore_range:
                start = int(asked.removeprefix("bytes=").removesuffix("-"))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if site.cut_after is not None:  # promise everything, send part, hang up
                body, site.cut_after = body[:site.cut_after], None
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    return Handler


@pytest.fixture
def site():
    """A ThreadingHTTPServer on 127.0.0.1, an ephemeral port; ``site.url`` is its root."""
    state = Site()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -------------------------------------------------------------------------------- archives


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info, None


def _tar(*members: tuple[tarfile.TarInfo, bytes | None], mode: str = "w:xz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as tar:
        for info, data in members:
            tar.addfile(info, None if data is None else io.BytesIO(data))
    return buffer.getvalue()


def _png() -> bytes:
    return b"\x89PNG\r\n\x1a\n" + RNG.randbytes(64)


WIDGET = [
    _file("widget/train/good/000.png", _png()),
    _file("widget/train/good/001.png", _png()),
    _file("widget/test/good/000.png", _png()),
    _file("widget/test/crack/000.png", _png()),
    _file("widget/ground_truth/crack/000_mask.png", _png()),
    _file("license.txt", b"CC BY-NC-SA 4.0\n"),  # a loose top-level file: not unpacked
]
WIDGET_TAR = _tar(*WIDGET)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ------------------------------------------------------------------------------- download


def test_cut_connection_resumes_with_range_and_is_byte_identical(site, tmp_path):
    site.files["/f.bin"] = PAYLOAD
    site.cut_after = CUT
    dest = download_file(f"{site.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), _sha(PAYLOAD),
                         progress=False, timeout=5)
    assert dest.read_bytes() == PAYLOAD
    assert site.ranges == [None, f"bytes={CUT}-"]
    assert _tree(tmp_path) == ["f.bin"]


def test_broken_run_keeps_part_and_the_next_run_resumes(site, tmp_path):
    site.files["/f.bin"] = PAYLOAD
    site.cut_after = CUT
    with pytest.raises(DownloadError, match=r"broke off after 100,000 bytes.*run the same "
                       r"command again to resume"):
        download_file(f"{site.url}/f.bin", tmp_path / "f.bin", progress=False, timeout=5,
                      retries=0)
    assert (tmp_path / "f.bin.part").stat().st_size == CUT
    assert not (tmp_path / "f.bin").exists()
    download_file(f"{site.url}/f.bin", tmp_path / "f.bin", sha256=_sha(PAYLOAD),
                  progress=False, timeout=5)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert site.ranges == [None, f"bytes={CUT}-"]


def test_server_ignoring_range_restarts_from_zero(site, tmp_path):
    site.files["/f.bin"] = PAYLOAD
    site.ignore_range = True
    _write(tmp_path / "f.bin.part", b"stale bytes that must not survive")
    download_file(f"{site.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), _sha(PAYLOAD),
                  progress=False, timeout=5)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert site.ranges == ["bytes=33-"]


def test_complete_part_of_unknown_size_is_finished_by_a_416(site, tmp_path):
    site.files["/f.bin"] = PAYLOAD
    _write(tmp_path / "f.bin.part", PAYLOAD)
    download_file(f"{site.url}/f.bin", tmp_path / "f.bin", sha256=_sha(PAYLOAD),
                  progress=False, timeout=5)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD
    assert site.ranges == [f"bytes={len(PAYLOAD)}-"]


def test_wrong_checksum_deletes_the_download(site, tmp_path):
    site.files["/f.bin"] = PAYLOAD
    with pytest.raises(DownloadError, match=r"damaged .*SHA-256.*deleted: run the command"):
        download_file(f"{site.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD), "0" * 64,
                      progress=False, timeout=5)
    assert _tree(tmp_path) == []


def test_wrong_size_is_refused_before_the_body(site, tmp_path):
    site.files["/f.bin"] = PAYLOAD
    _write(tmp_path / "f.bin.part", PAYLOAD[:CUT])
    with pytest.raises(DownloadError, match=r"offers 300,000 bytes .* expected 300,001"):
        download_file(f"{site.url}/f.bin", tmp_path / "f.bin", len(PAYLOAD) + 1,
                      progress=False, timeout=5)
    assert _tree(tmp_path) == []


def test_existing_file_is_verified_and_reused(site, tmp_path):
    dest = _write(tmp_path / "f.bin", PAYLOAD)
    assert download_file(f"{site.url}/f.bin", dest, len(PAYLOAD), _sha(PAYLOAD),
                         progress=False, timeout=5) == dest
    with pytest.raises(DownloadError, match=r"f.bin is damaged .*delete it and download again"):
        download_file(f"{site.url}/f.bin", dest, sha256="0" * 64, progress=False, timeout=5)
    assert site.ranges == []


def test_http_404_says_the_link_moved(site, tmp_path):
    with pytest.raises(DownloadError, match=r"HTTP 404 .*--archive FILE"):
        download_file(f"{site.url}/gone.tar.xz", tmp_path / "gone.tar.xz", progress=False,
                      timeout=5)
    assert len(site.ranges) == 1  # a 404 is not retried


def test_unreachable_host_says_so(tmp_path):
    url = f"http://127.0.0.1:{_closed_port()}/f.bin"
    with pytest.raises(DownloadError, match=r"cannot reach 127.0.0.1 .*check your connection, "
                       r"or download the archive manually and pass --archive FILE"):
        download_file(url, tmp_path / "f.bin", progress=False, timeout=5, retries=1)
    assert _tree(tmp_path) == []


# -------------------------------------------------------------------------------- extract


def test_safe_extract_places_the_category_and_leaves_nothing_else(tmp_path):
    archive = _write(tmp_path / "widget.tar.xz", WIDGET_TAR)
    root = tmp_path / "root"
    assert safe_extract(archive, root) == [root / "widget"]
    assert _tree(root) == ["widget", "widget/ground_truth", "widget/ground_truth/crack",
                           "widget/ground_truth/crack/000_mask.png", "widget/test",
                           "widget/test/crack", "widget/test/crack/000.png",
                           "widget/test/good", "widget/test/good/000.png", "widget/train",
                           "widget/train/good", "widget/train/good/000.png",
                           "widget/train/good/001.png"]
    assert (root / "widget/train/good/000.png").read_bytes() == WIDGET[0][1]


@pytest.mark.parametrize("bad, why", [
    (_file("../evil.txt", b"x"), "'../evil.txt' leads outside"),
    (_file("widget/../../evil.txt", b"x"), "leads outside"),
    (_special("widget/link", tarfile.SYMTYPE, "../../evil.txt"), "symlink to '../../evil.txt'"),
    (_special("widget/abs", tarfile.SYMTYPE, "/etc/passwd"), "symlink to '/etc/passwd'"),
    (_special("widget/hard", tarfile.LNKTYPE, "../evil.txt"), "hard link to '../evil.txt'"),
    (_special("widget/tty", tarfile.CHRTYPE), "device or other special file"),
    (_special("widget/fifo", tarfile.FIFOTYPE), "device or other special file"),
])
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, bad, why):
    archive = _write(tmp_path / "bad.tar.xz", _tar(*WIDGET, bad))  # after good members
    root = tmp_path / "a" / "root"
    with pytest.raises(DownloadError, match=f"unsafe archive .*{why}.*nothing was installed"):
        safe_extract(archive, root)
    assert _tree(tmp_path / "a") == ["root"]
    assert _tree(tmp_path) == ["a", "a/root", "bad.tar.xz"]


def test_absolute_member_is_refused(tmp_path):
    target = tmp_path / "outside.txt"
    archive = _write(tmp_path / "bad.tar.gz", _tar(_file(str(target), b"x"), mode="w:gz"))
    with pytest.raises(DownloadError, match="absolute path"):
        safe_extract(archive, tmp_path / "root")
    assert not target.exists()
    assert _tree(tmp_path / "root") == []


@pytest.mark.parametrize("blob", [RNG.randbytes(5000), WIDGET_TAR[:len(WIDGET_TAR) // 2],
                                  b""], ids=["random", "truncated", "empty"])
def test_corrupt_archive_says_delete_and_download_again(tmp_path, blob):
    archive = _write(tmp_path / "widget.tar.xz", blob)
    expected = f"archive is corrupt: delete {archive} and download again"
    with pytest.raises(DownloadError, match=re.escape(expected)):
        safe_extract(archive, tmp_path / "root")
    assert _tree(tmp_path / "root") == []


def test_archive_without_the_layout_is_refused(tmp_path):
    archive = _write(tmp_path / "widget.tar.xz", _tar(_file("widget/readme.txt", b"hi")))
    with pytest.raises(DownloadError, match="holds no widget/train/good"):
        safe_extract(archive, tmp_path / "root", ["widget"])
    with pytest.raises(DownloadError, match="holds no gadget/train/good"):
        safe_extract(_write(tmp_path / "w.tar.xz", WIDGET_TAR), tmp_path / "root", ["gadget"])
    assert _tree(tmp_path / "root") == []


def test_incomplete_existing_folder_is_not_overwritten(tmp_path):
    archive = _write(tmp_path / "widget.tar.xz", WIDGET_TAR)
    _write(tmp_path / "root/widget/note.txt", b"mine")
    with pytest.raises(DownloadError, match="already exists but is incomplete"):
        safe_extract(archive, tmp_path / "root")
    assert _tree(tmp_path / "root") == ["widget", "widget/note.txt"]


# ---------------------------------------------------------------------------------- MVTec


@pytest.fixture
def widget(site, monkeypatch):
    """The server offers widget.tar.xz, and the table lists it as a category."""
    site.files["/widget.tar.xz"] = WIDGET_TAR
    monkeypatch.setitem(ARCHIVES, "widget", Archive(
        "https://www.mydrive.ch/shares/0/0/download/0-0/widget.tar.xz", _sha(WIDGET_TAR), 1,
        len(WIDGET_TAR)))
    return site


def test_download_mvtec_fetches_verifies_and_unpacks(widget, tmp_path, capsys):
    root = tmp_path / "root"
    assert download_mvtec(root, ["widget"], base_url=widget.url + "/", progress=False) == [
        root / "widget"]
    out = capsys.readouterr().out
    assert LICENCE in out
    assert "CC BY-NC-SA 4.0 (non-commercial use only; attribution: Bergmann et al., CVPR " \
           "2019)" in out
    assert "downloading 1 archive(s), about" in out
    assert _tree(root)[:1] == ["widget"] and (root / "widget/test/good/000.png").is_file()
    assert not any(p.name.endswith((".tar.xz", ".part")) or p.name.startswith(".")
                   for p in root.iterdir())


def test_download_mvtec_resumes_a_cut_download(widget, tmp_path, monkeypatch):
    widget.cut_after = len(WIDGET_TAR) // 2
    monkeypatch.setenv(download.BASE_URL_ENV, widget.url)
    download_mvtec(tmp_path, ["widget"])  # with the progress bar
    assert widget.ranges == [None, f"bytes={len(WIDGET_TAR) // 2}-"]
    assert (tmp_path / "widget/train/good/001.png").read_bytes() == WIDGET[1][1]


def test_download_mvtec_corrupt_download_names_the_file(widget, tmp_path, monkeypatch):
    junk = RNG.randbytes(4000)
    widget.files["/widget.tar.xz"] = junk
    monkeypatch.setitem(ARCHIVES, "widget", Archive("x/widget.tar.xz", _sha(junk), 1))
    archive = tmp_path / "widget.tar.xz"
    with pytest.raises(DownloadError, match=re.escape(f"archive is corrupt: delete {archive} ")):
        download_mvtec(tmp_path, ["widget"], base_url=widget.url, progress=False)
    assert not (tmp_path / "widget").exists()


def test_download_mvtec_skips_a_present_category(widget, tmp_path, capsys):
    (tmp_path / "widget/train/good").mkdir(parents=True)
    assert download_mvtec(tmp_path, ["widget"], base_url=widget.url) == [tmp_path / "widget"]
    assert "widget: already in" in capsys.readouterr().out
    assert widget.ranges == []


def test_download_mvtec_defaults_to_all_fifteen(tmp_path):
    for category in ARCHIVES:
        (tmp_path / category / "train/good").mkdir(parents=True)
    assert [p.name for p in download_mvtec(tmp_path)] == list(ARCHIVES)


def test_unknown_category_lists_the_valid_ones(tmp_path):
    with pytest.raises(DownloadError, match=r"unknown MVTec AD category 'nope': choose from "
                       r"bottle, cable, capsule, .*, zipper"):
        download_mvtec(tmp_path, ["bottle", "nope"])
    assert _tree(tmp_path) == []


def test_given_archive_is_unpacked_without_network(widget, tmp_path, capsys):
    archive = _write(tmp_path / "dl" / "widget.tar.xz", WIDGET_TAR)
    root = tmp_path / "root"
    assert download_mvtec(root, archive=archive) == [root / "widget"]  # named after its file
    assert LICENCE in capsys.readouterr().out
    assert (root / "widget/train/good/000.png").is_file() and archive.is_file()
    assert widget.ranges == []


def test_cli_download_and_its_errors(widget, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_download_parser(parser.add_subparsers(dest="command", required=True))
    root = tmp_path / "root"
    args = parser.parse_args(["download", "mvtec", "--category", "widget", "--root", str(root),
                              "--base-url", widget.url, "--quiet"])
    assert args.func(args) == 0
    assert f"MVTec AD in {root}: widget" in capsys.readouterr().out
    args = parser.parse_args(["download", "mvtec", "--category", "widget", "nope",
                              "--root", str(root)])
    with pytest.raises(OSError, match="unknown MVTec AD category 'nope'"):  # rd.cli prints it
        args.func(args)


def test_the_table_lists_fifteen_official_archives():
    assert len(ARCHIVES) == 15
    for category, entry in ARCHIVES.items():
        assert entry.url.startswith("https://www.mydrive.ch/shares/")
        assert entry.url.endswith(f"/download/{entry.url.split('/')[-2]}/{category}.tar.xz")
        assert len(entry.sha256) == 64 and int(entry.sha256, 16) >= 0
        assert entry.size is None or abs(entry.size / 2**20 - entry.mib) < 1


# ------------------------------------------------------------- issue 13 item 12


def test_an_archive_unpacking_past_its_cap_is_refused_before_writing(tmp_path):
    """A small archive of highly compressible members (a zip-bomb's shape) fills no disk."""
    bomb = _tar(*WIDGET, _file("widget/train/good/zeros.png", bytes(2_000_000)))
    archive = _write(tmp_path / "widget.tar.xz", bomb)
    assert len(bomb) < 10_000
    with pytest.raises(DownloadError, match=r"unpacks to more than 1\.0 MB .*zeros\.png"):
        safe_extract(archive, tmp_path / "root", max_unpacked=1_000_000)
    assert _tree(tmp_path / "root") == []
    assert safe_extract(archive, tmp_path / "root", max_unpacked=3_000_000) == [
        tmp_path / "root" / "widget"]


def test_each_run_stages_in_its_own_folder(tmp_path, monkeypatch):
    """Two runs unpacking the same archive once shared (and deleted) one staging folder."""
    import os

    import rd.download

    root = tmp_path / "root"
    running = root / f".extracting-{os.getpid()}-other"  # a concurrent run of this process
    abandoned = root / ".extracting-999999999-killed"  # a run that no longer exists
    old = root / ".extracting-widget.tar.xz"  # the shared name older versions used
    for folder in (running, abandoned, old):
        _write(folder / "widget/train/good/000.png", b"x")
    seen = []
    real = rd.download._extract_checked

    def spy(archive, staging, folders, budget):
        seen.append(staging)
        return real(archive, staging, folders, budget)

    monkeypatch.setattr(rd.download, "_extract_checked", spy)
    safe_extract(_write(tmp_path / "widget.tar.xz", WIDGET_TAR), root)
    assert seen[0] not in (running, abandoned, old) and not seen[0].exists()
    assert running.is_dir() and not abandoned.exists() and not old.exists()
