"""Where a server listens: an address (``unix:PATH``, ``HOST:PORT``) and the
listening sockets bound for it.

Plain sockets, bound synchronously, so that blksnapd's supervisor (which
imports no engine and runs no event loop) can bind the NBD address once and
hand the sockets to each worker: clients that connect while a worker
restarts wait in the backlog instead of being refused.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
import stat
from dataclasses import dataclass

from blksnap.errors import InvalidArgument, error

log = logging.getLogger("blksnapd.nbd")

BACKLOG = 128


@dataclass(frozen=True)
class Address:
    """Where the server listens: a Unix socket path, or a TCP host and port."""

    kind: str  # "unix" | "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return join_host_port(self.host, self.port)


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified
    except ValueError:
        return host in ("*", "")


def parse_address(spec: str, *, allow_any: bool = False) -> Address:
    """``unix:PATH``, ``HOST:PORT``, ``[V6]:PORT``, ``:PORT`` or ``PORT``.

    Without a host, the loopback address. A wildcard host (``0.0.0.0``,
    ``::``) only with ``allow_any``: the exports are raw disks.
    """
    spec = spec.strip()
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise InvalidArgument("--nbd unix: needs a socket path")
        return Address("unix", path=os.path.abspath(path))
    if "/" in spec:
        raise InvalidArgument(f"--nbd {spec!r}: a Unix socket is written unix:PATH")
    if spec.startswith("["):
        host, sep, rest = spec[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise InvalidArgument(f"--nbd {spec!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif ":" in spec:
        host, _, port_text = spec.rpartition(":")
        if ":" in host:
            raise InvalidArgument(f"--nbd {spec!r}: write IPv6 addresses as [ADDRESS]:PORT")
    else:
        host, port_text = "", spec
    try:
        port = int(port_text, 10)
    except ValueError:
        raise InvalidArgument(f"--nbd {spec!r}: bad port {port_text!r}") from None
    if not 0 <= port <= 65535:
        raise InvalidArgument(f"--nbd {spec!r}: port out of range")
    if not host:
        host = "127.0.0.1"
    elif is_wildcard(host) and not allow_any:
        raise InvalidArgument(
            f"--nbd {spec!r} would serve raw disks on every interface; "
            "name an address, or pass --nbd-any to really mean it"
        )
    return Address("tcp", host=host, port=port)


def bind(address: Address) -> list[socket.socket]:
    """The listening socket(s) of ``address``; errors as :class:`BlksnapError`.
    A Unix socket file left by a server that died is replaced; one something
    answers on is ``EADDRINUSE``. TCP: one socket per address the host
    resolves to (IPv6 ones v6-only)."""
    socks: list[socket.socket] = []
    try:
        if address.kind == "unix":
            socks.append(_bind_unix(address.path))
        else:
            socks += _bind_tcp(address.host, address.port)
    except OSError as exc:
        for sock in socks:
            sock.close()
        raise error(exc.errno or errno.EIO, f"NBD on {address}: {exc.strerror}") from None
    return socks


def _bind_unix(path: str) -> socket.socket:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise OSError(errno.EADDRINUSE, f"something answers on {path}")
        except ConnectionRefusedError:
            os.unlink(path)  # left behind by a server that died
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the exports are raw disks: owner only
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _bind_tcp(host: str, port: int) -> list[socket.socket]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    if any(is_wildcard(str(info[4][0])) for info in infos) and not is_wildcard(host):
        raise OSError(errno.EINVAL, f"{host} resolves to a wildcard address")
    socks: list[socket.socket] = []
    try:
        for family, type_, proto, _, sockaddr in infos:
            sock = socket.socket(family, type_, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:  # one port for every address
                sockaddr = (sockaddr[0], socks[0].getsockname()[1], *sockaddr[2:])
            sock.bind(sockaddr)
            sock.listen(BACKLOG)
    except BaseException:
        for sock in socks:
            sock.close()
        raise
    return socks
