"""Crawler endpoints: where a bus connects and where a crawler listens.

Pure Python, no Django: settings, the bus and the reference crawler all parse
endpoints here so they agree on what `/x.sock`, `unix:/x.sock` and
`tcp://host:port` mean. It lives in the project package, not in the bus app,
because settings validate the endpoints at start-up and settings import no app.
"""

from __future__ import annotations

import os
import socket
import stat
from dataclasses import dataclass


class EndpointError(ValueError):
    pass


@dataclass(frozen=True)
class Endpoint:
    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"

    @property
    def is_tcp(self) -> bool:
        return self.kind == "tcp"

    def connect(self, timeout: float) -> socket.socket:
        """Open a blocking connection with a connect timeout."""
        if self.kind == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(self.path)
            except BaseException:
                sock.close()
                raise
            return sock
        sock = socket.create_connection((self.host, self.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def listen(self, backlog: int = 64) -> socket.socket:
        """Bind and listen; a stale Unix socket file left by a dead process is replaced."""
        if self.kind == "unix":
            if os.path.lexists(self.path):
                if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    raise EndpointError(f"{self}: {self.path} exists and is not a socket; refusing to replace it")
                probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    probe.connect(self.path)
                except OSError:
                    os.unlink(self.path)  # nobody listens there any more
                else:
                    probe.close()
                    raise EndpointError(f"{self}: another process is listening there")
                finally:
                    probe.close()
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(self.path)
        else:
            family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        sock.listen(backlog)
        return sock


def parse_endpoint(text: str) -> Endpoint:
    text = text.strip()
    if not text:
        raise EndpointError("empty endpoint")
    if text.startswith("tcp://"):
        rest = text[len("tcp://") :]
        if rest.startswith("["):
            host, sep, port_text = rest[1:].partition("]:")
        else:
            host, sep, port_text = rest.rpartition(":")
        if not sep or not host:
            raise EndpointError(f"{text!r}: expected tcp://host:port")
        if not (port_text.isascii() and port_text.isdigit()):
            raise EndpointError(f"{text!r}: port {port_text!r} is not a number")
        port = int(port_text)
        if not 0 < port < 65536:
            raise EndpointError(f"{text!r}: port must be between 1 and 65535")
        return Endpoint(kind="tcp", host=host, port=port)
    path = text[len("unix:") :] if text.startswith("unix:") else text
    if "://" in path:
        raise EndpointError(f"{text!r}: unknown scheme (use /abs/path.sock, unix:/abs/path.sock or tcp://host:port)")
    if not path.startswith("/"):
        raise EndpointError(f"{text!r}: a Unix socket path must be absolute")
    return Endpoint(kind="unix", path=path)


def parse_endpoints(texts: list[str]) -> list[Endpoint]:
    endpoints = [parse_endpoint(text) for text in texts]
    if len(set(endpoints)) != len(endpoints):
        raise EndpointError("the same endpoint is listed twice")
    return endpoints
