"""Image bytes from a server path (``local_url``) or a URL (``remote_url``), with the guards
of RELIABILITY.md (P and U rows). Both are off unless the server was started with
``--allow-local-root DIR`` / ``--allow-remote``.

What comes back is the encoded file, unchecked: it goes through the same safe decoder as an
uploaded image (format allow-list, pixel cap), so nothing here looks inside it.

Local paths: the path is resolved (symlinks, ``..``) and must lie under a root by
``os.path.commonpath``; anything outside is refused the same way whether it exists or not.
The file is then opened component by component from the root with ``O_NOFOLLOW`` (a
directory swapped for a symlink after the check is refused, no TOCTOU), and must be a
regular file with one link and at most ``cap`` bytes.

Remote URLs: http/https on a few ports, no credentials; the host is resolved once, every
address must be public (``is_global``, not multicast/reserved, IPv4 embedded in IPv6
unwrapped), and the connection goes to that pinned address (a second DNS answer can never
redirect it: DNS rebinding). Redirects are followed by hand, each hop checked the same way;
one total deadline (a watchdog closes a dripping connection), a byte cap on the body and on
what ``gzip`` inflates to, and any upstream failure is one generic 502 that never echoes
what the upstream said. At most :data:`MAX_FETCHES` fetches run at once; more get 503.

Standard library only, and never torch.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http.client
import ipaddress
import logging
import os
import re
import socket
import ssl
import stat
import threading
import time
import zlib
from collections.abc import Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from lensforge.errors import ConfigError, RequestError

log = logging.getLogger(__name__)

MAX_PATH_CHARS = 4096  # PATH_MAX on Linux: anything longer is not a path (P7)
MAX_URL_CHARS = 4096
ALLOWED_SCHEMES = ("http", "https")
ALLOWED_PORTS: tuple[int, ...] = (80, 443, 8080, 8443)  # web ports only: no :22, :6379... (U10)
MAX_REDIRECTS = 3
MAX_FETCHES = 8  # outbound fetches at once per process: the server must not be an amplifier (U15)
DEADLINE_GRACE_S = 0.5  # past the fetch deadline, the async caller stops waiting (the watchdog normally ends it first)
READ_CHUNK = 64 * 1024
# Names that are internal whatever they resolve to here (U4): cloud metadata services and
# loopback names. Everything else is judged by the addresses it resolves to.
DENIED_HOSTS = frozenset({"localhost", "metadata", "metadata.google.internal", "metadata.goog",
                          "instance-data", "instance-data.ec2.internal"})
DENIED_SUFFIXES = (".localhost", ".internal", ".local")

_PERCENT_ESCAPE = re.compile(r"%[0-9A-Fa-f]{2}")  # paths are taken literally: %2e%2e%2f is an attack, not a name
_DRIVE = re.compile(r"^[A-Za-z]:")  # C:\... or C:/...: a Windows path, never ours
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # RFC 6052 well-known prefix: last 32 bits are the IPv4 host
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")  # RFC 8215 local-use: site-specific, never public
_IPV4_COMPAT = ipaddress.ip_network("::/96")  # deprecated IPv4-compatible form ::a.b.c.d
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC | getattr(os, "O_PATH", 0)
# O_NONBLOCK: a FIFO or device swapped in after the check must not block the open (P6);
# regular files ignore it. O_NOCTTY: never adopt a terminal.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY

_PATH_NOT_ALLOWED = ("path_not_allowed: local_url must name a file inside a directory this server allows "
                     "(--allow-local-root)")
_FETCH_FAILED = "could not fetch remote image"  # the one message for every upstream failure (U14)


# -- local paths ------------------------------------------------------------------------------

def resolve_roots(dirs: Sequence[str | os.PathLike[str]]) -> tuple[Path, ...]:
    """``--allow-local-root`` directories, symlinks resolved (the containment check compares
    resolved paths). A root that is not an existing directory is a :class:`ConfigError`."""
    roots = []
    for d in dirs:
        real = Path(os.path.realpath(Path(d).expanduser()))
        if not real.is_dir():
            raise ConfigError(f"--allow-local-root {d}: not an existing directory; create it or fix the path")
        roots.append(real)
    if roots:
        log.warning("local_url enabled: requests may read regular files under %s", ", ".join(map(str, roots)))
    return tuple(roots)


def read_local(path_text: Any, roots: Sequence[Path], cap: int) -> bytes:
    """The bytes of the file ``path_text`` names, if it lies under one of ``roots``.

    path_text: absolute, or relative to the first root. roots: the allowed directories
        (empty: the feature is off). cap: most bytes returned.
    Raises :class:`RequestError`: 403 disabled / outside every root / symlink or hard link /
    not a regular file / unreadable; 400 empty, NUL byte or over 4096 characters; 404 missing
    under a root; 413 over ``cap``. The message never contains the path.
    """
    if not roots:
        raise RequestError(403, "local_disabled", "local paths are disabled")
    if not isinstance(path_text, str) or not path_text or "\x00" in path_text or len(path_text) > MAX_PATH_CHARS:
        raise RequestError(400, "invalid_path", f"invalid local_url: give a non-empty path of at most "
                                                f"{MAX_PATH_CHARS} characters, without NUL bytes")
    # Backslashes, drive letters and percent escapes are literal characters on POSIX: a
    # client sending them means another OS's path or a decoded-twice traversal (P2).
    if "\\" in path_text or _DRIVE.match(path_text) or _PERCENT_ESCAPE.search(path_text):
        raise RequestError(403, "path_not_allowed", _PATH_NOT_ALLOWED)
    real_roots = [os.path.realpath(r) for r in roots]
    candidate = path_text if os.path.isabs(path_text) else os.path.join(real_roots[0], path_text)
    real = os.path.realpath(candidate)  # resolves '..' and every symlink, whether the file exists or not
    # commonpath, not startswith: /data/images2 is not under /data/images (P5)
    root = next((r for r in real_roots if os.path.commonpath([r, real]) == r), None)
    if root is None:
        raise RequestError(403, "path_not_allowed", _PATH_NOT_ALLOWED)
    fd = _open_beneath(root, os.path.relpath(real, root))
    try:
        return _read_regular(fd, cap)
    finally:
        os.close(fd)


def _open_beneath(root: str, rel: str) -> int:
    """Open ``root/rel`` one component at a time with ``O_NOFOLLOW``; the fd of a regular file.

    ``rel`` comes from a realpath, so it has no symlinks now; one appearing later (a race)
    makes the open fail instead of being followed.
    """
    parts = [] if rel == os.curdir else rel.split(os.sep)
    if not parts:
        raise RequestError(403, "not_regular_file", "local_url must name a regular file, not a directory")
    with _os_errors():
        dir_fd = os.open(root, _DIR_FLAGS)
        try:
            for part in parts[:-1]:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=dir_fd)
                os.close(dir_fd)
                dir_fd = next_fd
            # Look before opening: opening a device, FIFO or socket can block or have side effects (P6).
            before = os.stat(parts[-1], dir_fd=dir_fd, follow_symlinks=False)
            _check_file(before)
            fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=dir_fd)
        finally:
            os.close(dir_fd)
    try:
        now = os.fstat(fd)
        _check_file(now)
        if (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):  # swapped between stat and open
            raise RequestError(403, "path_not_allowed", _PATH_NOT_ALLOWED)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_file(st: os.stat_result) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise RequestError(403, "path_not_allowed", _PATH_NOT_ALLOWED)
    if not stat.S_ISREG(st.st_mode):
        raise RequestError(403, "not_regular_file", "local_url must name a regular file "
                                                    "(not a directory, device, FIFO or socket)")
    if st.st_nlink > 1:  # a hard link inside the root can be the same inode as a file outside it (P4)
        raise RequestError(403, "hard_linked", "local_url names a file with several hard links; "
                                               "copy it into the allowed directory instead")


def _read_regular(fd: int, cap: int) -> bytes:
    """At most ``cap`` bytes of an open regular file; 413 when it is (or grows) larger."""
    size = os.fstat(fd).st_size
    if size > cap:  # judged before reading a byte (P8)
        raise RequestError(413, "image_too_large", f"image too large: over {cap} bytes")
    if size == 0:  # an empty file, or a /proc or /sys file whose size is not what it yields (P6)
        raise RequestError(400, "empty", "empty image")
    chunks: list[bytes] = []
    size = 0
    with _os_errors():
        while size <= cap:  # cap + 1 at most: enough to know it is too big
            chunk = os.read(fd, min(READ_CHUNK, cap + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    if size > cap:
        raise RequestError(413, "image_too_large", f"image too large: over {cap} bytes")
    return b"".join(chunks)


@contextlib.contextmanager
def _os_errors() -> Iterator[None]:
    """OSErrors of a path under a root → the client's status; anything unexpected stays a 500."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            raise RequestError(404, "path_not_found", "local_url not found under the allowed directories") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise RequestError(403, "unreadable", "local_url is not readable by the server") from None
        if e.errno == errno.ELOOP:  # a symlink appeared where the check saw none
            raise RequestError(403, "path_not_allowed", _PATH_NOT_ALLOWED) from None
        if e.errno in (errno.ENXIO, errno.ENODEV, errno.EISDIR):
            raise RequestError(403, "not_regular_file", "local_url must name a regular file") from None
        raise


# -- remote URLs ------------------------------------------------------------------------------

def address_allowed(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether the server may connect to ``ip``: a public unicast address (U3–U6).

    ``is_global`` alone is not enough: it is True for multicast and for IPv6 forms that carry
    an IPv4 address (IPv4-mapped, NAT64, 6to4), which are judged by the address they carry.
    Teredo, IPv4-compatible and local-use NAT64 addresses are always refused.
    """
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:  # the kernel connects to the IPv4 address itself
            return address_allowed(ip.ipv4_mapped)
        if ip in _NAT64:
            return address_allowed(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.teredo is not None or ip in _NAT64_LOCAL or ip in _IPV4_COMPAT:
            return False
        if ip.sixtofour is not None and not address_allowed(ip.sixtofour):
            return False
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified
                                 or ip.is_loopback or ip.is_link_local or ip.is_private)


@dataclass(frozen=True)
class _Target:
    url: str
    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # path and query, what goes on the request line


def _parse_url(url: Any, allowed_ports: Collection[int]) -> _Target:
    if (not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS or not url.isascii()
            or any(c <= " " or c in "\x7f\\" for c in url)):
        raise RequestError(400, "invalid_url", f"invalid remote_url: give an http(s) URL of at most {MAX_URL_CHARS} "
                                               "ASCII characters (percent-encode the rest), without spaces")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ALLOWED_SCHEMES:
        raise RequestError(403, "scheme_not_allowed", "scheme not allowed: remote_url must start with http:// or https://")
    if "@" in parts.netloc:
        raise RequestError(403, "url_not_allowed", "url_not_allowed: credentials in remote_url are not allowed")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise RequestError(400, "invalid_url", "invalid remote_url: bad port") from None
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise RequestError(400, "invalid_url", "invalid remote_url: no host")
    if port not in allowed_ports:
        raise RequestError(403, "url_not_allowed", f"url_not_allowed: port {port} is not allowed "
                                                   f"(allowed: {', '.join(map(str, sorted(allowed_ports)))})")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target(url, scheme, host, port, path)


def _resolve(target: _Target) -> tuple[int, tuple[Any, ...]]:
    """Resolve once and check every answer (U7); the (family, sockaddr) to connect to."""
    if target.host in DENIED_HOSTS or target.host.endswith(DENIED_SUFFIXES):
        log.info("remote_url refused: internal host name %s", target.host)
        raise RequestError(403, "url_not_allowed", "url_not_allowed: remote_url must point to a public address")
    try:
        infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # gaierror is an OSError
        log.info("remote_url %s: could not resolve %s", target.url, target.host)
        raise RequestError(502, "remote_failed", _FETCH_FAILED) from None
    addresses = [(family, sockaddr, ipaddress.ip_address(sockaddr[0])) for family, _, _, _, sockaddr in infos]
    bad = [str(ip) for _, _, ip in addresses if not address_allowed(ip)]
    if bad or not addresses:
        # any private answer refuses the lot: a client may not pick which answer we use
        log.info("remote_url refused: %s resolves to non-public %s", target.host, ", ".join(bad))
        raise RequestError(403, "url_not_allowed", "url_not_allowed: remote_url must point to a public address")
    family, sockaddr, _ = addresses[0]
    return family, (sockaddr[0], target.port, *sockaddr[2:])  # IPv6 keeps flowinfo and scope


class _Watchdog:
    """Shuts the connection's socket down at the deadline, so a read blocked on a dripping
    upstream (1 byte per second keeps every per-read timeout happy) returns at once (U11)."""

    def __init__(self, seconds: float) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._done = False
        self.fired = False
        self._timer = threading.Timer(max(seconds, 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sock = sock
            if self.fired:
                self._shutdown()

    def _fire(self) -> None:
        with self._lock:
            if not self._done:
                self.fired = True
                self._shutdown()

    def _shutdown(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):  # already closed: nothing to wake
                socket.socket.shutdown(self._sock, socket.SHUT_RDWR)  # the fd itself, under any TLS layer

    def cancel(self) -> None:
        with self._lock:  # after this, _fire never touches the socket (it is about to be closed)
            self._done = True
        self._timer.cancel()


class _PinnedConnection(http.client.HTTPConnection):
    """HTTP to a pre-resolved address; the Host header still names the URL's host."""

    def __init__(self, target: _Target, family: int, sockaddr: tuple[Any, ...], timeout: float,
                 watchdog: _Watchdog) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self._family, self._sockaddr, self._watchdog = family, sockaddr, watchdog

    def _open_socket(self) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            self._watchdog.watch(sock)
            sock.settimeout(self.timeout)
            sock.connect(self._sockaddr)  # the checked address: never resolved again
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self) -> None:
        self.sock = self._open_socket()


class _PinnedTLSConnection(_PinnedConnection):
    """HTTPS to a pre-resolved address, the certificate verified against the URL's host name."""

    default_port = 443  # so the Host header leaves out :443

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tls = ssl.create_default_context()  # CERT_REQUIRED + check_hostname

    def connect(self) -> None:
        raw = self._open_socket()
        try:
            tls = self._tls.wrap_socket(raw, server_hostname=self.host, do_handshake_on_connect=False)
        except BaseException:
            raw.close()
            raise
        self.sock = tls
        self._watchdog.watch(tls)  # the handshake itself is under the deadline too
        tls.do_handshake()


def fetch_remote(url: Any, *, cap: int, timeout_s: float, max_redirects: int = MAX_REDIRECTS,
                 allowed_ports: Collection[int] | None = None) -> bytes:
    """GET ``url`` (http/https) and return the body, at most ``cap`` bytes, within ``timeout_s``.

    allowed_ports: default :data:`ALLOWED_PORTS`. Blocking; call it from a worker thread
    (:func:`fetch_remote_async` runs it in the fetch pool, under the concurrency cap).
    Raises :class:`RequestError`: 400 malformed URL; 403 scheme, credentials, port, or any
    non-public address, for the URL and every redirect; 413 body (or its inflated form) over
    ``cap``; 502 ``could not fetch remote image`` for timeouts, too many redirects, HTTP
    errors and broken connections (what the upstream sent is never echoed).
    """
    ports = ALLOWED_PORTS if allowed_ports is None else allowed_ports
    deadline = time.monotonic() + timeout_s
    for _ in range(max_redirects + 1):
        target = _parse_url(url, ports)
        family, sockaddr = _resolve(target)
        status, location, body = _get(target, family, sockaddr, deadline, cap)
        if location is None:
            if status != 200:
                log.info("remote_url %s: upstream answered HTTP %d", target.url, status)
                raise RequestError(502, "remote_status", _FETCH_FAILED)
            return body
        url = urljoin(target.url, location)  # checked like the first URL on the next turn (U9)
    log.info("remote_url: more than %d redirects", max_redirects)
    raise RequestError(502, "too_many_redirects", _FETCH_FAILED)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _get(target: _Target, family: int, sockaddr: tuple[Any, ...], deadline: float, cap: int
         ) -> tuple[int, str | None, bytes]:
    """One GET: (status, redirect location or None, body of a 200)."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RequestError(502, "remote_timeout", _FETCH_FAILED)
    watchdog = _Watchdog(remaining)
    kind = _PinnedTLSConnection if target.scheme == "https" else _PinnedConnection
    conn = kind(target, family, sockaddr, remaining, watchdog)
    response: http.client.HTTPResponse | None = None
    try:
        # identity: no transparent decompression; a server that compresses anyway is inflated under the cap (U13)
        conn.request("GET", target.path, headers={"Accept": "image/*", "Accept-Encoding": "identity",
                                                  "User-Agent": "lensforge", "Connection": "close"})
        response = conn.getresponse()
        if response.status in _REDIRECTS:
            location = response.getheader("Location")
            if not location:
                raise RequestError(502, "remote_status", _FETCH_FAILED)
            return response.status, location, b""
        if response.status != 200:
            return response.status, None, b""  # the body is never read, let alone echoed (U14)
        body = _read_body(response, cap)
        if watchdog.fired:  # a body without a length "ends" when the watchdog closes the socket
            raise TimeoutError("deadline passed while reading")
        return 200, None, body
    except RequestError:
        raise
    except (OSError, http.client.HTTPException, ssl.SSLError, zlib.error, ValueError) as e:
        timed_out = watchdog.fired or time.monotonic() >= deadline
        log.info("remote_url %s: %s (%s)", target.url, "deadline passed" if timed_out else "failed", type(e).__name__)
        raise RequestError(502, "remote_timeout" if timed_out else "remote_failed", _FETCH_FAILED) from None
    finally:
        watchdog.cancel()
        if response is not None:
            response.close()
        conn.close()


def _read_body(response: http.client.HTTPResponse, cap: int) -> bytes:
    """The body, at most ``cap`` bytes both as sent and once inflated (U12, U13)."""
    if response.length is not None and response.length > cap:  # Content-Length: 10G is refused unread
        raise RequestError(413, "image_too_large", f"image too large: over {cap} bytes")
    encoding = (response.getheader("Content-Encoding") or "identity").strip().lower()
    if encoding not in ("identity", "gzip", "x-gzip", "deflate"):
        log.info("remote_url: unsupported Content-Encoding %r", encoding[:40])
        raise RequestError(502, "remote_encoding", _FETCH_FAILED)
    # wbits 32 + 15: gzip or zlib header, detected; max_length bounds every step of inflation
    inflater = None if encoding == "identity" else zlib.decompressobj(wbits=32 + zlib.MAX_WBITS)
    out = bytearray()
    received = 0
    while True:
        chunk = response.read1(READ_CHUNK)  # read1: one recv at most, so the watchdog can interrupt
        if not chunk:
            break
        received += len(chunk)
        if inflater is not None:
            chunk = inflater.decompress(chunk, cap + 1 - len(out))  # > 0: len(out) <= cap here
        out += chunk
        if received > cap or len(out) > cap:
            raise RequestError(413, "image_too_large", f"image too large: over {cap} bytes")
    if response.length:  # read1 returns b"" on an early EOF instead of raising: a cut body
        raise http.client.IncompleteRead(bytes(out), response.length)
    if inflater is not None:
        out += inflater.flush()
        if len(out) > cap:
            raise RequestError(413, "image_too_large", f"image too large: over {cap} bytes")
        if not inflater.eof:
            raise zlib.error("compressed body ends early")
    return bytes(out)


# -- concurrency cap --------------------------------------------------------------------------

_slots = threading.BoundedSemaphore(MAX_FETCHES)
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _fetch_pool() -> ThreadPoolExecutor:
    """Fetches get their own threads: a slow upstream must never hold a decode thread."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=MAX_FETCHES, thread_name_prefix="fetch")
        return _pool


def _take_slot() -> threading.BoundedSemaphore:
    slots = _slots
    if not slots.acquire(blocking=False):
        raise RequestError(503, "too_many_fetches", "server busy: too many remote images being fetched; retry later")
    return slots


def fetch_remote_limited(url: Any, **kwargs: Any) -> bytes:
    """:func:`fetch_remote` in the calling thread, under the process-wide cap (503 above it)."""
    slots = _take_slot()
    try:
        return fetch_remote(url, **kwargs)
    finally:
        slots.release()


async def fetch_remote_async(url: Any, **kwargs: Any) -> bytes:
    """:func:`fetch_remote` in the fetch pool, under the process-wide cap: when
    :data:`MAX_FETCHES` are running, 503 at once instead of queueing (U15)."""
    slots = _take_slot()

    def run() -> bytes:
        try:
            return fetch_remote(url, **kwargs)
        finally:
            slots.release()  # in the thread: a client that disconnects does not free the slot early

    try:
        future = asyncio.get_running_loop().run_in_executor(_fetch_pool(), run)
    except BaseException:
        slots.release()
        raise
    # The watchdog ends the connection at the deadline, but name resolution (getaddrinfo)
    # cannot be interrupted: the client gets its 502 on time anyway, and the thread keeps
    # its slot until the resolver gives up.
    timeout_s = float(kwargs.get("timeout_s", 10.0))
    try:
        return await asyncio.wait_for(future, timeout_s + DEADLINE_GRACE_S)
    except (asyncio.TimeoutError, TimeoutError):
        log.info("remote_url %s: no answer within the deadline (name resolution?)", url)
        raise RequestError(502, "remote_timeout", _FETCH_FAILED) from None
