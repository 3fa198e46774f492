"""Seed ``local_url`` and ``remote_url``: the P and U rows of RELIABILITY.md.

Unit level against :mod:`lensforge.serve.fetch` (real files, FIFOs, sockets and links in a
temporary root; a real loopback HTTP upstream), then end to end through a live server.
No network: "public" hosts are literal addresses whose checks refuse before any
connection, or a patched resolver; the loopback upstream is reached only in tests that
declare 127.0.0.1 public for themselves.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import gzip
import http.server
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from serving import LiveServer

from lensforge.errors import ConfigError, RequestError
from lensforge.runtime import DetectionResult
from lensforge.serve import create_app, fetch, inputs
from lensforge.serve.seed import seed_preds

CAP = 1_000_000  # body/image cap of the live test servers
SMALL_CAP = 200_000  # cap of the unit fetches (U12/U13 need little traffic)
SECRET = "UPSTREAM-SECRET-7f3a Traceback (most recent call last)"  # must never reach a client


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _error(fn: Callable[[], Any]) -> RequestError:
    with pytest.raises(RequestError) as info:
        fn()
    return info.value


# -- a local root with every kind of trap ------------------------------------------------------

@pytest.fixture(scope="module")
def jpeg(shapes_dir: Path) -> bytes:
    return min(shapes_dir.glob("*/*.jpg")).read_bytes()


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, jpeg: bytes) -> Iterator[dict[str, Path]]:
    """``images/`` (the root) beside ``images2/`` (sibling prefix) and ``outside/``."""
    base = tmp_path_factory.mktemp("fetch")
    root, sibling, outside = base / "images", base / "images2", base / "outside"
    for d in (root / "sub", sibling, outside / "dir"):
        d.mkdir(parents=True)
    (root / "img.jpg").write_bytes(jpeg)
    (root / "sub" / "deep.jpg").write_bytes(jpeg)
    (root / "note.txt").write_text("not an image\n")
    (root / "empty.jpg").write_bytes(b"")
    (root / "big.jpg").write_bytes(jpeg + b"\0" * CAP)  # over both caps
    (root / "locked.jpg").write_bytes(jpeg)
    (root / "locked.jpg").chmod(0)
    (sibling / "x.jpg").write_bytes(jpeg)
    (outside / "secret.jpg").write_bytes(jpeg)
    (outside / "dir" / "secret.jpg").write_bytes(jpeg)
    (root / "link_out.jpg").symlink_to(outside / "secret.jpg")
    (root / "link_dir").symlink_to(outside / "dir")
    (root / "link_in.jpg").symlink_to(root / "img.jpg")  # stays inside: allowed, resolved to its target
    os.link(outside / "secret.jpg", root / "hard.jpg")
    os.mkfifo(root / "fifo.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(root / "sock.jpg"))
    yield {"root": root, "sibling": sibling, "outside": outside, "base": base}
    listener.close()


# (path, where it is relative to: "root" prefixes the root's absolute path, "rel" sends it as
#  is, "outside"/"sibling"/"base" prefix those), status, code
P_ROWS = [
    # P2: outside every root, whether it exists or not; traversal in every spelling
    ("/etc/passwd", "abs", 403, "path_not_allowed"),
    ("/etc/no-such-file", "abs", 403, "path_not_allowed"),
    ("secret.jpg", "outside", 403, "path_not_allowed"),
    ("missing.jpg", "outside", 403, "path_not_allowed"),
    ("../../etc/passwd", "rel", 403, "path_not_allowed"),
    ("../outside/secret.jpg", "rel", 403, "path_not_allowed"),
    ("sub/../../outside/secret.jpg", "rel", 403, "path_not_allowed"),
    ("sub/../../outside/missing.jpg", "rel", 403, "path_not_allowed"),
    ("%2e%2e%2f%2e%2e%2fetc%2fpasswd", "rel", 403, "path_not_allowed"),
    ("%2E%2E/outside/secret.jpg", "rel", 403, "path_not_allowed"),
    ("..\\..\\etc\\passwd", "rel", 403, "path_not_allowed"),
    ("C:\\Windows\\win.ini", "rel", 403, "path_not_allowed"),
    ("C:/Windows/win.ini", "rel", 403, "path_not_allowed"),
    ("\\\\host\\share\\x.jpg", "rel", 403, "path_not_allowed"),
    ("//host/share/x.jpg", "rel", 403, "path_not_allowed"),
    # P3: symlink out, symlinked parent directory
    ("link_out.jpg", "rel", 403, "path_not_allowed"),
    ("link_dir/secret.jpg", "rel", 403, "path_not_allowed"),
    ("link_dir/missing.jpg", "rel", 403, "path_not_allowed"),
    ("link_out.jpg", "root", 403, "path_not_allowed"),
    # P4: hard link to an outside file
    ("hard.jpg", "rel", 403, "hard_linked"),
    # P5: sibling prefix of the root
    ("x.jpg", "sibling", 403, "path_not_allowed"),
    ("../images2/x.jpg", "rel", 403, "path_not_allowed"),
    # P6: not regular files, never blocking
    ("fifo.jpg", "rel", 403, "not_regular_file"),
    ("sock.jpg", "rel", 403, "not_regular_file"),
    ("sub", "rel", 403, "not_regular_file"),
    (".", "rel", 403, "not_regular_file"),
    ("", "root", 403, "not_regular_file"),
    ("/dev/zero", "abs", 403, "path_not_allowed"),
    ("/proc/self/environ", "abs", 403, "path_not_allowed"),
    # P7: malformed
    ("", "rel", 400, "invalid_path"),
    ("img\x00.jpg", "rel", 400, "invalid_path"),
    ("a" * 10_000, "rel", 400, "invalid_path"),
    # P8: inside the root
    ("missing.jpg", "rel", 404, "path_not_found"),
    ("sub/missing/deeper.jpg", "rel", 404, "path_not_found"),
    ("img.jpg/child", "rel", 404, "path_not_found"),
    ("big.jpg", "rel", 413, "image_too_large"),
    ("empty.jpg", "rel", 400, "empty"),
]


def _path(tree: dict[str, Path], text: str, where: str) -> str:
    if where in ("rel", "abs"):
        return text
    return str(tree[where]) + ("/" + text if text else "")


@pytest.mark.parametrize(("text", "where", "status", "code"), P_ROWS)
def test_local_path_rows(tree: dict[str, Path], text: str, where: str, status: int, code: str) -> None:
    started = time.perf_counter()
    e = _error(lambda: fetch.read_local(_path(tree, text, where), [tree["root"]], SMALL_CAP))
    assert (e.status, e.code) == (status, code), str(e)
    assert time.perf_counter() - started < 1  # never blocks (P6)
    assert str(tree["base"]) not in str(e) and "/etc" not in str(e)  # no path in any message


@pytest.mark.parametrize(("text", "where"), [("img.jpg", "rel"), ("sub/deep.jpg", "rel"), ("./sub/../img.jpg", "rel"),
                                             ("img.jpg", "root"), ("link_in.jpg", "rel")])
def test_local_path_inside_root_reads_the_file(tree: dict[str, Path], jpeg: bytes, text: str, where: str) -> None:
    assert fetch.read_local(_path(tree, text, where), [tree["root"]], SMALL_CAP) == jpeg


def test_local_second_root_and_relative_paths_start_in_the_first(tree: dict[str, Path], jpeg: bytes) -> None:
    roots = [tree["root"], tree["sibling"]]
    assert fetch.read_local(str(tree["sibling"] / "x.jpg"), roots, SMALL_CAP) == jpeg
    assert _error(lambda: fetch.read_local("x.jpg", roots, SMALL_CAP)).status == 404  # images/x.jpg


def test_local_outside_is_the_same_answer_whether_the_file_exists_or_not(tree: dict[str, Path]) -> None:
    def answer(path: str) -> tuple[int, str, str]:
        e = _error(lambda: fetch.read_local(path, [tree["root"]], SMALL_CAP))
        return e.status, e.code, str(e)

    assert answer("/etc/passwd") == answer("/etc/no-such-file")
    assert answer(str(tree["outside"] / "secret.jpg")) == answer(str(tree["outside"] / "missing.jpg"))
    assert answer("link_dir/secret.jpg") == answer("link_dir/missing.jpg")


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_local_devices_refused_even_under_a_root(device: str) -> None:
    e = _error(lambda: fetch.read_local(device, [Path("/dev")], SMALL_CAP))
    assert (e.status, e.code) == (403, "not_regular_file")


def test_local_proc_files_are_never_read(tmp_path: Path) -> None:
    # under a /proc root (a bad idea that must still fail safe): size 0, never read
    e = _error(lambda: fetch.read_local("/proc/self/environ", [Path("/proc")], SMALL_CAP))
    assert e.status in (400, 403)


def test_local_fifo_swapped_in_after_the_check_does_not_block(tree: dict[str, Path],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The race P3/P6 guard against: the pre-open stat sees a regular file, the open finds a
    FIFO. O_NONBLOCK keeps the open from waiting for a writer; fstat on the fd refuses it."""
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if path == "fifo.jpg":
            return real_stat(tree["root"] / "img.jpg")
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(fetch.os, "stat", stat)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(fetch.read_local, "fifo.jpg", [tree["root"]], SMALL_CAP)
        with pytest.raises(RequestError) as info:
            future.result(timeout=5)
    assert (info.value.status, info.value.code) == (403, "not_regular_file")


def test_local_file_swapped_between_stat_and_open_is_refused(tree: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    real_stat = os.stat

    def stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        if path == "img.jpg":
            return real_stat(tree["root"] / "sub" / "deep.jpg")  # another inode
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(fetch.os, "stat", stat)
    e = _error(lambda: fetch.read_local("img.jpg", [tree["root"]], SMALL_CAP))
    assert (e.status, e.code) == (403, "path_not_allowed")


def test_local_unreadable_file_is_403(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() == 0:  # root reads mode-000 files: make the kernel's answer EACCES as it is for others
        real_open = os.open

        def deny(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            if path == "locked.jpg":
                raise PermissionError(errno.EACCES, "Permission denied", path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(fetch.os, "open", deny)
    e = _error(lambda: fetch.read_local("locked.jpg", [tree["root"]], SMALL_CAP))
    assert (e.status, e.code) == (403, "unreadable")


def test_local_disabled_without_roots() -> None:
    for payload in ({"local_url": "/etc/passwd"}, {"local_url": "img.jpg"}):
        e = _error(lambda p=payload: inputs.seed_image(p, CAP))
        assert (e.status, str(e)) == (403, "local paths are disabled")  # P1


def test_local_rows_leak_no_fds(tree: dict[str, Path], jpeg: bytes) -> None:
    before = _fd_count()
    for _ in range(3):
        for text, where, _status, _code in P_ROWS:
            with pytest.raises(RequestError):
                fetch.read_local(_path(tree, text, where), [tree["root"]], SMALL_CAP)
        assert fetch.read_local("img.jpg", [tree["root"]], SMALL_CAP) == jpeg
    assert _fd_count() == before


@pytest.mark.parametrize(("roots", "ok"), [(["images"], True), (["images", "images2"], True),
                                           (["missing"], False), (["images/img.jpg"], False)])
def test_resolve_roots(tree: dict[str, Path], roots: list[str], ok: bool) -> None:
    dirs = [tree["base"] / r for r in roots]
    if ok:
        assert fetch.resolve_roots(dirs) == tuple(Path(os.path.realpath(d)) for d in dirs)
    else:
        with pytest.raises(ConfigError, match="--allow-local-root"):
            fetch.resolve_roots(dirs)


# -- the address classifier ----------------------------------------------------------------------

ADDRESS_ROWS = [
    # U3 loopback / unspecified
    ("127.0.0.1", False), ("127.255.255.254", False), ("::1", False), ("0.0.0.0", False), ("::", False),
    # U4 metadata services
    ("169.254.169.254", False), ("fd00:ec2::254", False), ("100.100.100.200", False),
    # U5 private, CGNAT, link-local, multicast, reserved, benchmark, broadcast
    ("10.0.0.1", False), ("172.16.0.1", False), ("172.31.255.255", False), ("192.168.1.1", False),
    ("100.64.0.1", False), ("fd00::1", False), ("fe80::1", False), ("224.0.0.1", False), ("239.255.255.250", False),
    ("ff02::1", False), ("ff0e::1", False), ("240.0.0.1", False), ("255.255.255.255", False), ("198.18.0.1", False),
    ("192.0.0.170", False), ("192.0.2.1", False), ("2001:db8::1", False),
    # U6 IPv4 embedded in IPv6
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("::ffff:10.0.0.1", False),
    ("64:ff9b::a9fe:a9fe", False), ("64:ff9b::7f00:1", False), ("64:ff9b:1::5db8:d822", False),
    ("2002:7f00:1::", False), ("2002:a9fe:a9fe::1", False), ("2002:c0a8:101::1", False),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
    ("::7f00:1", False), ("::5db8:d822", False),  # IPv4-compatible (deprecated)
    # public: allowed, including public IPv4 carried in IPv6
    ("93.184.216.34", True), ("8.8.8.8", True), ("1.1.1.1", True), ("2606:2800::1", True),
    ("2606:2800:220:1:248:1893:25c8:1946", True), ("2a00:1450:4001:81b::200e", True),
    ("::ffff:93.184.216.34", True), ("64:ff9b::5db8:d822", True), ("2002:5db8:d822::1", True),
]


@pytest.mark.parametrize(("address", "allowed"), ADDRESS_ROWS)
def test_address_allowed(address: str, allowed: bool) -> None:
    assert fetch.address_allowed(ipaddress.ip_address(address)) is allowed


# -- remote URLs refused before any connection -----------------------------------------------------

@pytest.fixture
def no_connection(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Fails the test on any outbound connection attempt; the attempted sockaddrs, if any."""
    attempts: list[Any] = []

    def refuse(self: Any) -> socket.socket:
        attempts.append(self._sockaddr)
        raise AssertionError(f"connection attempted to {self._sockaddr}")

    monkeypatch.setattr(fetch._PinnedConnection, "_open_socket", refuse)
    return attempts


def _fetch(url: str, **kwargs: Any) -> bytes:
    kwargs.setdefault("cap", SMALL_CAP)
    kwargs.setdefault("timeout_s", 5)
    return fetch.fetch_remote(url, **kwargs)


U_REFUSED_ROWS = [
    # U2 schemes
    ("file:///etc/passwd", 403, "scheme_not_allowed"), ("gopher://93.184.216.34:70/_x", 403, "scheme_not_allowed"),
    ("ftp://93.184.216.34/x.jpg", 403, "scheme_not_allowed"), ("dict://93.184.216.34:11211/stat", 403, "scheme_not_allowed"),
    ("jar:http://93.184.216.34/x.jar!/", 403, "scheme_not_allowed"), ("javascript:alert(1)", 403, "scheme_not_allowed"),
    ("//93.184.216.34/x.jpg", 403, "scheme_not_allowed"), ("93.184.216.34/x.jpg", 403, "scheme_not_allowed"),
    # U3 loopback in every spelling (checked on the resolved address)
    ("http://127.0.0.1/x.jpg", 403, "url_not_allowed"), ("http://[::1]/x.jpg", 403, "url_not_allowed"),
    ("http://2130706433/x.jpg", 403, "url_not_allowed"), ("http://0x7f000001/x.jpg", 403, "url_not_allowed"),
    ("http://127.1/x.jpg", 403, "url_not_allowed"), ("http://0177.0.0.1/x.jpg", 403, "url_not_allowed"),
    ("http://0.0.0.0/x.jpg", 403, "url_not_allowed"), ("http://0/x.jpg", 403, "url_not_allowed"),
    ("http://localhost/x.jpg", 403, "url_not_allowed"), ("http://LOCALHOST./x.jpg", 403, "url_not_allowed"),
    ("http://foo.localhost/x.jpg", 403, "url_not_allowed"), ("HTTPS://127.0.0.1/x.jpg", 403, "url_not_allowed"),
    # U4 metadata
    ("http://169.254.169.254/latest/meta-data/", 403, "url_not_allowed"),
    ("http://[fd00:ec2::254]/latest/meta-data/", 403, "url_not_allowed"),
    ("http://metadata.google.internal/computeMetadata/v1/", 403, "url_not_allowed"),
    ("http://metadata/computeMetadata/v1/", 403, "url_not_allowed"),
    ("http://100.100.100.200/latest/meta-data/", 403, "url_not_allowed"),
    # U5 private ranges
    ("http://10.1.2.3/x.jpg", 403, "url_not_allowed"), ("http://172.16.5.4/x.jpg", 403, "url_not_allowed"),
    ("http://192.168.0.1/x.jpg", 403, "url_not_allowed"), ("http://100.64.0.1/x.jpg", 403, "url_not_allowed"),
    ("http://[fd00::1]/x.jpg", 403, "url_not_allowed"), ("http://[fe80::1]/x.jpg", 403, "url_not_allowed"),
    ("http://224.0.0.1/x.jpg", 403, "url_not_allowed"),
    # U6 embedded IPv4
    ("http://[::ffff:127.0.0.1]/x.jpg", 403, "url_not_allowed"), ("http://[64:ff9b::a9fe:a9fe]/", 403, "url_not_allowed"),
    ("http://[2002:7f00:1::]/x.jpg", 403, "url_not_allowed"),
    # U10 credentials, ports
    ("http://user:pass@93.184.216.34/x.jpg", 403, "url_not_allowed"), ("http://user@93.184.216.34/", 403, "url_not_allowed"),
    ("http://93.184.216.34@127.0.0.1/", 403, "url_not_allowed"), ("http://93.184.216.34:22/", 403, "url_not_allowed"),
    ("http://93.184.216.34:6379/", 403, "url_not_allowed"), ("https://93.184.216.34:25/", 403, "url_not_allowed"),
    # malformed
    ("", 400, "invalid_url"), ("http://", 400, "invalid_url"), ("http://93.184.216.34:99999/", 400, "invalid_url"),
    ("http://93.184.216.34:port/", 400, "invalid_url"), ("http://93.184.216.34/a b.jpg", 400, "invalid_url"),
    ("http://93.184.216.34/\x00.jpg", 400, "invalid_url"), ("http://exämple.com/x.jpg", 400, "invalid_url"),
    ("http://93.184.216.34\\@127.0.0.1/", 400, "invalid_url"), ("http://93.184.216.34/" + "a" * 5000, 400, "invalid_url"),
]


@pytest.mark.parametrize(("url", "status", "code"), U_REFUSED_ROWS)
def test_remote_refused_without_connecting(no_connection: list[Any], url: str, status: int, code: str) -> None:
    e = _error(lambda: _fetch(url))
    assert (e.status, e.code) == (status, code), str(e)
    assert no_connection == []


@pytest.mark.parametrize("value", [None, 42, ["http://93.184.216.34/"], {"url": "x"}])
def test_remote_non_string_is_400(no_connection: list[Any], value: Any) -> None:
    assert _error(lambda: _fetch(value)).status == 400


def test_remote_disabled() -> None:
    e = _error(lambda: inputs.seed_image({"remote_url": "http://93.184.216.34/x.jpg"}, CAP))
    assert (e.status, str(e)) == (403, "remote URLs are disabled")  # U1


def _answers(*addresses: str, port: int = 80) -> list[tuple[Any, ...]]:
    """What ``socket.getaddrinfo`` answers for a host with these addresses."""
    out = []
    for a in addresses:
        if ":" in a:
            out.append((socket.AF_INET6, socket.SOCK_STREAM, 6, "", (a, port, 0, 0)))
        else:
            out.append((socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)))
    return out


@pytest.mark.parametrize("answers", [("93.184.216.34", "10.0.0.1"), ("10.0.0.1", "93.184.216.34"),
                                     ("93.184.216.34", "::1"), ("2606:2800::1", "fd00::1"), ("93.184.216.34", "169.254.169.254"),
                                     ()])
def test_remote_mixed_dns_answers_refused(no_connection: list[Any], monkeypatch: pytest.MonkeyPatch,
                                          answers: tuple[str, ...]) -> None:
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: _answers(*answers))  # U7
    e = _error(lambda: _fetch("http://images.example.com/x.jpg"))
    assert (e.status, e.code) == (403, "url_not_allowed")
    assert no_connection == []


def test_remote_unresolvable_host_is_generic_502(no_connection: list[Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fail)
    e = _error(lambda: _fetch("http://no-such-host.example/x.jpg"))
    assert (e.status, str(e)) == (502, "could not fetch remote image")


# -- remote URLs against a loopback upstream (127.0.0.1 declared public for these tests only) ---------

class Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, jpeg: bytes) -> None:
        super().__init__(("127.0.0.1", 0), UpstreamHandler)
        self.jpeg = jpeg
        self.bomb = gzip.compress(b"\0" * 50_000_000, 9)  # ~50 KB that inflates to 50 MB
        self.seen: list[tuple[str, str]] = []  # (path, Host header)
        self.stop = threading.Event()
        self.release = threading.Event()
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class UpstreamHandler(http.server.BaseHTTPRequestHandler):
    server: Upstream
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, status: int, body: bytes, **headers: str) -> None:
        self.send_response(status)
        headers.setdefault("Content-Length", str(len(body)))
        headers.setdefault("Connection", "close")
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def _drip(self, data: bytes) -> None:
        for i in range(len(data)):
            if self.server.stop.wait(0.05):
                return
            self.wfile.write(data[i:i + 1])
            self.wfile.flush()

    def do_GET(self) -> None:  # one route per upstream behaviour: a table in code
        s = self.server
        s.seen.append((self.path, self.headers.get("Host", "")))
        path = self.path
        port = s.server_address[1]
        try:
            if path == "/img.jpg":
                self._send(200, s.jpeg, Content_Type="image/jpeg")
            elif path.startswith("/chain/"):  # /chain/N: N more redirects, then the image
                n = int(path.rsplit("/", 1)[1])
                self._send(302, b"", Location=f"/chain/{n - 1}" if n > 1 else "/img.jpg")
            elif path == "/loop":
                self._send(302, b"", Location=f"http://127.0.0.1:{port}/loop")
            elif path.startswith("/to/"):  # /to/<url>: redirect there
                self._send(302, b"", Location=path[len("/to/"):])
            elif path == "/no-location":
                self._send(302, b"")
            elif path.startswith("/status/"):
                self._send(int(path.rsplit("/", 1)[1]), SECRET.encode(), Content_Type="text/plain")
            elif path == "/page.html":
                self._send(200, f"<html><body>{SECRET}</body></html>".encode(), Content_Type="text/html")
            elif path == "/drip":  # U11: a valid start, then one byte every 50 ms
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n")
                self._drip(b"x" * 1000)
            elif path == "/drip-headers":
                self._drip(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"y" * 1000)
            elif path == "/hang":
                s.stop.wait(10)
            elif path == "/huge-length":  # U12: a 10 GB promise
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10737418240\r\n\r\n" + b"x" * 1000)
            elif path == "/endless":  # U12: chunked, never ends
                self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                chunk = b"x" * 65536
                while not s.stop.is_set():
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif path == "/gzip-bomb":  # U13
                self._send(200, s.bomb, Content_Encoding="gzip")
            elif path == "/gzip-image":
                self._send(200, gzip.compress(s.jpeg), Content_Encoding="gzip", Content_Type="image/jpeg")
            elif path == "/brotli":
                self._send(200, b"\x1b\x00", Content_Encoding="br")
            elif path == "/hold":  # U15: hold the connection until released
                with s.lock:
                    s.active += 1
                    s.peak = max(s.peak, s.active)
                s.release.wait(10)
                with s.lock:
                    s.active -= 1
                self._send(200, s.jpeg)
            else:
                self._send(404, SECRET.encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up: what the deadline tests want


@pytest.fixture(scope="module")
def upstream(jpeg: bytes) -> Iterator[Upstream]:
    server = Upstream(jpeg)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop.set()
    server.release.set()
    server.shutdown()
    server.server_close()


@pytest.fixture
def loopback_public(monkeypatch: pytest.MonkeyPatch, upstream: Upstream) -> Upstream:
    """127.0.0.1 counts as public and the upstream's port as allowed, for this test only."""
    real = fetch.address_allowed
    loopback = ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(fetch, "address_allowed", lambda ip: ip == loopback or real(ip))
    monkeypatch.setattr(fetch, "ALLOWED_PORTS", (80, 443, upstream.server_address[1]))
    upstream.seen.clear()
    return upstream


def test_remote_fetches_the_image(loopback_public: Upstream, jpeg: bytes) -> None:
    assert _fetch(loopback_public.base + "/img.jpg") == jpeg
    assert _fetch(loopback_public.base + "/gzip-image") == jpeg  # inflated, under the cap
    assert inputs.seed_image({"remote_url": loopback_public.base + "/img.jpg"}, CAP, allow_remote=True) == jpeg


def test_remote_connects_to_the_pinned_address(loopback_public: Upstream, monkeypatch: pytest.MonkeyPatch,
                                               jpeg: bytes) -> None:
    """U8: the name is resolved once; a second answer (rebinding to a private address) is
    never asked for, and the Host header still names the URL's host."""
    calls: list[str] = []

    def rebinding(host: str, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        calls.append(host)
        return _answers("127.0.0.1" if len(calls) == 1 else "10.0.0.1", port=port)

    monkeypatch.setattr(socket, "getaddrinfo", rebinding)
    port = loopback_public.server_address[1]
    assert _fetch(f"http://rebind.example:{port}/img.jpg") == jpeg
    assert calls == ["rebind.example"]
    assert loopback_public.seen == [("/img.jpg", f"rebind.example:{port}")]


@pytest.mark.parametrize(("path", "status", "code", "hops"), [
    ("/to/http://10.0.0.1/x.jpg", 403, "url_not_allowed", 1),
    ("/to/http://169.254.169.254/latest/meta-data/", 403, "url_not_allowed", 1),
    ("/to/http://[::1]:80/x.jpg", 403, "url_not_allowed", 1),
    ("/to/http://localhost/x.jpg", 403, "url_not_allowed", 1),
    ("/to/file:///etc/passwd", 403, "scheme_not_allowed", 1),
    ("/to/http://127.0.0.1:6379/", 403, "url_not_allowed", 1),
    ("/to/http://u:p@127.0.0.1/", 403, "url_not_allowed", 1),
    ("/loop", 502, "too_many_redirects", 4),
    ("/chain/10", 502, "too_many_redirects", 4),
    ("/no-location", 502, "remote_status", 1),
])
def test_remote_redirects_are_checked(loopback_public: Upstream, path: str, status: int, code: str, hops: int) -> None:
    e = _error(lambda: _fetch(loopback_public.base + path, max_redirects=3))
    assert (e.status, e.code) == (status, code)
    assert len(loopback_public.seen) == hops  # the refused target was never contacted


def test_remote_redirects_within_the_cap_are_followed(loopback_public: Upstream, jpeg: bytes) -> None:
    assert _fetch(loopback_public.base + "/chain/3", max_redirects=3) == jpeg
    assert [p for p, _ in loopback_public.seen] == ["/chain/3", "/chain/2", "/chain/1", "/img.jpg"]


@pytest.mark.parametrize("path", ["/drip", "/drip-headers", "/hang"])
def test_remote_deadline_is_total(loopback_public: Upstream, path: str) -> None:
    started = time.perf_counter()
    e = _error(lambda: _fetch(loopback_public.base + path, timeout_s=1.0))  # U11
    elapsed = time.perf_counter() - started
    assert (e.status, e.code, str(e)) == (502, "remote_timeout", "could not fetch remote image")
    assert 0.9 < elapsed < 2.0


@pytest.mark.parametrize(("path", "status", "code"), [
    ("/huge-length", 413, "image_too_large"),  # U12: refused on the header
    ("/endless", 413, "image_too_large"),  # U12: counted while streaming
    ("/gzip-bomb", 413, "image_too_large"),  # U13: counted while inflating
    ("/brotli", 502, "remote_encoding"),
    ("/status/404", 502, "remote_status"),  # U14
    ("/status/500", 502, "remote_status"),
    ("/status/503", 502, "remote_status"),
    ("/status/204", 502, "remote_status"),
])
def test_remote_upstream_faults(loopback_public: Upstream, path: str, status: int, code: str) -> None:
    started = time.perf_counter()
    e = _error(lambda: _fetch(loopback_public.base + path))
    assert (e.status, e.code) == (status, code)
    assert time.perf_counter() - started < 2
    assert "SECRET" not in str(e)
    if status == 502:
        assert str(e) == "could not fetch remote image"


def test_remote_html_page_comes_back_as_bytes_for_the_decoder(loopback_public: Upstream) -> None:
    # the decoder's allow-list answers 415 for it (end to end below); nothing here trusts Content-Type
    assert _fetch(loopback_public.base + "/page.html").startswith(b"<html>")


def test_remote_tls_and_connection_errors_are_generic_502(loopback_public: Upstream) -> None:
    port = loopback_public.server_address[1]
    e = _error(lambda: _fetch(f"https://127.0.0.1:{port}/img.jpg"))  # TLS handshake with a plain HTTP server
    assert (e.status, str(e)) == (502, "could not fetch remote image")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    e = _error(lambda: _fetch(f"http://127.0.0.1:{closed}/img.jpg", allowed_ports=(closed,)))
    assert (e.status, str(e)) == (502, "could not fetch remote image")


@pytest.fixture(scope="module")
def tls_upstream(jpeg: bytes, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Upstream, Path]]:
    """The upstream behind TLS with a self-signed certificate for ``images.test``; (server, cert)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=images.test", "-addext", "subjectAltName=DNS:images.test"],
                   check=True, capture_output=True)
    server = Upstream(jpeg)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, cert
    server.stop.set()
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize(("host", "trusted", "ok"), [("images.test", True, True), ("other.test", True, False),
                                                     ("images.test", False, False)])
def test_remote_https_is_pinned_and_verified_against_the_url_host(
        tls_upstream: tuple[Upstream, Path], monkeypatch: pytest.MonkeyPatch, jpeg: bytes,
        host: str, trusted: bool, ok: bool) -> None:
    """The TLS connection goes to the pinned address, with SNI and certificate checks for the
    URL's host name: a certificate for another name, or an untrusted one, is a generic 502."""
    server, cert = tls_upstream
    port = server.server_address[1]
    real_allowed, loopback = fetch.address_allowed, ipaddress.ip_address("127.0.0.1")
    monkeypatch.setattr(fetch, "address_allowed", lambda ip: ip == loopback or real_allowed(ip))
    monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: _answers("127.0.0.1", port=port))
    if trusted:
        make = ssl.create_default_context
        monkeypatch.setattr(fetch.ssl, "create_default_context", lambda: make(cafile=str(cert)))
    url = f"https://{host}:{port}/img.jpg"
    if ok:
        assert _fetch(url, allowed_ports=(port,)) == jpeg
        assert server.seen[-1] == ("/img.jpg", f"{host}:{port}")
    else:
        e = _error(lambda: _fetch(url, allowed_ports=(port,)))
        assert (e.status, e.code, str(e)) == (502, "remote_failed", "could not fetch remote image")


def test_remote_concurrency_is_capped(loopback_public: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """U15: with 2 slots, 2 fetches reach the upstream and 3 more get 503 at once."""
    monkeypatch.setattr(fetch, "_slots", threading.BoundedSemaphore(2))
    loopback_public.release.clear()
    loopback_public.peak = 0
    url = loopback_public.base + "/hold"

    async def run() -> list[Any]:
        tasks = [asyncio.ensure_future(fetch.fetch_remote_async(url, cap=CAP, timeout_s=5)) for _ in range(5)]
        await asyncio.sleep(0.3)
        refused = [t for t in tasks if t.done()]
        assert len(refused) == 3 and all(t.exception().status == 503 for t in refused)  # type: ignore[union-attr]
        loopback_public.release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    results = asyncio.run(run())
    assert sum(isinstance(r, bytes) for r in results) == 2
    assert loopback_public.peak == 2
    slots = fetch._slots
    assert slots.acquire(blocking=False) and slots.acquire(blocking=False)  # every slot came back
    slots.release()
    slots.release()
    loopback_public.release.clear()


def test_remote_slow_name_resolution_still_answers_at_the_deadline(monkeypatch: pytest.MonkeyPatch) -> None:
    """getaddrinfo cannot be interrupted: the client gets its 502 at the deadline (+ grace),
    and the slot stays taken until the resolver thread is done."""
    slots = threading.BoundedSemaphore(1)
    monkeypatch.setattr(fetch, "_slots", slots)

    def slow(*args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        time.sleep(1.5)
        return _answers("10.0.0.1")

    monkeypatch.setattr(socket, "getaddrinfo", slow)
    started = time.perf_counter()
    with pytest.raises(RequestError) as info:
        asyncio.run(fetch.fetch_remote_async("http://slow-dns.example/x.jpg", cap=CAP, timeout_s=0.5))
    assert (info.value.status, info.value.code) == (502, "remote_timeout")
    assert 0.9 < time.perf_counter() - started < 1.4  # timeout_s + DEADLINE_GRACE_S
    assert not slots.acquire(blocking=False)  # still resolving
    deadline = time.monotonic() + 3
    while not slots.acquire(blocking=False):
        assert time.monotonic() < deadline, "the resolving thread never gave its slot back"
        time.sleep(0.05)
    slots.release()


def test_remote_fetches_leak_no_fds(loopback_public: Upstream, jpeg: bytes) -> None:
    paths = ["/img.jpg", "/gzip-image", "/to/http://10.0.0.1/", "/loop", "/huge-length", "/gzip-bomb",
             "/status/500", "/brotli"]
    _fetch(loopback_public.base + "/img.jpg")  # warm-up: lazily opened files, if any
    before = _fd_count()
    for _ in range(3):
        for path in paths:
            with contextlib.suppress(RequestError):
                _fetch(loopback_public.base + path)
    deadline = time.monotonic() + 5  # the upstream's handler threads close their ends asynchronously
    while _fd_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _fd_count() <= before


# -- detection results in the seed answer ---------------------------------------------------------

def test_seed_preds_for_detection_results() -> None:
    result = DetectionResult(boxes=np.array([[1, 2, 30, 40], [5, 5, 9, 9], [0, 0, 4, 4]], np.float32),
                             scores=np.array([0.9, 0.6, 0.2], np.float32), class_ids=np.array([1, 0, 1]),
                             classes=("cat", "dog"), threshold=0.5, image_size=(64, 48))
    preds = seed_preds(result, top_k=5)
    assert preds == [{"label": "dog", "score": "0.9", "box": [1.0, 2.0, 30.0, 40.0]},
                     {"label": "cat", "score": "0.6", "box": [5.0, 5.0, 9.0, 9.0]}]
    empty = DetectionResult(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), ("cat",))
    assert seed_preds(empty, top_k=5) == []


# -- end to end through the live server ----------------------------------------------------------

@pytest.fixture(scope="module")
def live_off(shapes_bundle: Path) -> Iterator[LiveServer]:
    with LiveServer(create_app([shapes_bundle], max_body_bytes=CAP)) as server:
        yield server


@pytest.fixture(scope="module")
def live_on(shapes_bundle: Path, tree: dict[str, Path]) -> Iterator[LiveServer]:
    app = create_app([shapes_bundle], max_body_bytes=CAP, timeout_s=5, local_roots=[tree["root"]], allow_remote=True)
    with LiveServer(app) as server:
        yield server


def _post(server: LiveServer, payload: dict[str, Any]) -> requests.Response:
    return requests.post(server.url + "/predict", json=payload, timeout=15)


def _clean(response: requests.Response, tree: dict[str, Path]) -> None:
    text = response.text
    assert "Traceback" not in text and "SECRET" not in text and 'File "' not in text
    assert str(tree["base"]) not in text and "/tmp" not in text and "/etc" not in text


def _raw_preds(server: LiveServer, jpeg: bytes) -> Any:
    r = _post(server, {"raw_file": base64.b64encode(jpeg).decode()})
    assert r.status_code == 200, r.text
    return r.json()["preds"]


@pytest.mark.parametrize(("payload", "message"), [
    ({"local_url": "/etc/passwd"}, "local paths are disabled"),
    ({"local_url": "img.jpg"}, "local paths are disabled"),
    ({"remote_url": "http://93.184.216.34/x.jpg"}, "remote URLs are disabled"),
    ({"remote_url": "http://127.0.0.1/x.jpg"}, "remote URLs are disabled"),
])
def test_e2e_disabled_by_default(live_off: LiveServer, tree: dict[str, Path], payload: dict[str, str],
                                 message: str) -> None:
    r = _post(live_off, payload)
    assert r.status_code == 403 and r.json() == {"status": "Error", "error": message}
    _clean(r, tree)


def test_e2e_local_path_predicts_like_raw_file(live_on: LiveServer, tree: dict[str, Path], jpeg: bytes) -> None:
    expected = _raw_preds(live_on, jpeg)
    for path in ("img.jpg", str(tree["root"] / "sub" / "deep.jpg")):
        r = _post(live_on, {"local_url": path})
        assert r.status_code == 200, r.text
        assert r.json() == {"preds": expected, "status": "Success"}


@pytest.mark.parametrize(("payload", "status", "needle"), [
    ({"local_url": "/etc/passwd"}, 403, "path_not_allowed"),
    ({"local_url": "../outside/secret.jpg"}, 403, "path_not_allowed"),
    ({"local_url": "link_out.jpg"}, 403, "path_not_allowed"),
    ({"local_url": "hard.jpg"}, 403, "hard links"),
    ({"local_url": "fifo.jpg"}, 403, "regular file"),
    ({"local_url": ""}, 400, "invalid local_url"),
    ({"local_url": 7}, 400, "invalid local_url"),
    ({"local_url": "missing.jpg"}, 404, "not found"),
    ({"local_url": "big.jpg"}, 413, "too large"),
    ({"local_url": "note.txt"}, 415, "unsupported image format"),
    ({"local_url": "empty.jpg"}, 400, "empty image"),
    ({"remote_url": "http://127.0.0.1/x.jpg"}, 403, "url_not_allowed"),
    ({"remote_url": "http://2130706433/x.jpg"}, 403, "url_not_allowed"),
    ({"remote_url": "http://[::ffff:169.254.169.254]/"}, 403, "url_not_allowed"),
    ({"remote_url": "http://metadata.google.internal/"}, 403, "url_not_allowed"),
    ({"remote_url": "file:///etc/passwd"}, 403, "scheme not allowed"),
    ({"remote_url": "http://u:p@93.184.216.34/"}, 403, "url_not_allowed"),
])
def test_e2e_refusals(live_on: LiveServer, tree: dict[str, Path], payload: dict[str, Any], status: int,
                      needle: str) -> None:
    r = _post(live_on, payload)
    assert r.status_code == status, r.text
    assert r.json()["status"] == "Error" and needle in r.json()["error"]
    _clean(r, tree)


def test_e2e_remote(live_on: LiveServer, loopback_public: Upstream, tree: dict[str, Path], jpeg: bytes) -> None:
    expected = _raw_preds(live_on, jpeg)
    r = _post(live_on, {"remote_url": loopback_public.base + "/img.jpg"})
    assert r.status_code == 200 and r.json() == {"preds": expected, "status": "Success"}, r.text
    for path, status in (("/status/500", 502), ("/page.html", 415), ("/gzip-bomb", 413),
                         ("/to/http://169.254.169.254/", 403)):
        r = _post(live_on, {"remote_url": loopback_public.base + path})
        assert r.status_code == status, (path, r.text)
        _clean(r, tree)
    r = _post(live_on, {"remote_url": loopback_public.base + "/status/500"})
    assert r.json() == {"status": "Error", "error": "could not fetch remote image"}


def test_e2e_server_fine_afterwards(live_on: LiveServer, jpeg: bytes) -> None:
    assert requests.get(live_on.url + "/healthz", timeout=5).status_code == 200
    assert _post(live_on, {"raw_file": base64.b64encode(jpeg).decode()}).status_code == 200
    assert _post(live_on, {"local_url": "img.jpg"}).status_code == 200


# -- configuration ----------------------------------------------------------------------------------

def test_create_app_refuses_a_missing_root(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--allow-local-root"):  # before any bundle is read
        create_app([tmp_path / "bundle"], local_roots=[tmp_path / "nope"])


@pytest.mark.parametrize(("argv", "roots", "remote"), [
    ([], [], False),
    (["--allow-local-root", "/data/a", "--allow-local-root", "/data/b"], ["/data/a", "/data/b"], False),
    (["--allow-remote"], [], True),
])
def test_cli_serve_options(argv: list[str], roots: list[str], remote: bool) -> None:
    from lensforge.cli import build_parser

    args = build_parser().parse_args(["serve", "bundle", *argv])
    assert (args.allow_local_root, args.allow_remote) == (roots, remote)
