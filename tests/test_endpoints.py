"""Tests of jobsite_crawler/endpoints.py: parsing every endpoint form, listening and connecting over real sockets."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from jobsite_crawler.endpoints import Endpoint, EndpointError, parse_endpoint, parse_endpoints
from tests.conftest import wait_until

# --- Parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "canonical"),
    [
        ("/run/crawler.sock", Endpoint(kind="unix", path="/run/crawler.sock"), "unix:/run/crawler.sock"),
        ("unix:/run/crawler.sock", Endpoint(kind="unix", path="/run/crawler.sock"), "unix:/run/crawler.sock"),
        ("  /run/crawler.sock\n", Endpoint(kind="unix", path="/run/crawler.sock"), "unix:/run/crawler.sock"),
        ("tcp://127.0.0.1:9000", Endpoint(kind="tcp", host="127.0.0.1", port=9000), "tcp://127.0.0.1:9000"),
        ("tcp://crawler.internal:1", Endpoint(kind="tcp", host="crawler.internal", port=1), "tcp://crawler.internal:1"),
        ("tcp://localhost:65535", Endpoint(kind="tcp", host="localhost", port=65535), "tcp://localhost:65535"),
        ("tcp://[::1]:9000", Endpoint(kind="tcp", host="::1", port=9000), "tcp://[::1]:9000"),
        ("tcp://[fe80::1%eth0]:80", Endpoint(kind="tcp", host="fe80::1%eth0", port=80), "tcp://[fe80::1%eth0]:80"),
    ],
)
def test_parse_endpoint_reads_every_form(text, expected, canonical):
    endpoint = parse_endpoint(text)
    assert endpoint == expected
    assert str(endpoint) == canonical
    assert endpoint.is_tcp == (expected.kind == "tcp")
    assert parse_endpoint(str(endpoint)) == endpoint  # the canonical form parses back to itself


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty endpoint"),
        ("   ", "empty endpoint"),
        ("crawler.sock", "must be absolute"),
        ("./crawler.sock", "must be absolute"),
        ("unix:crawler.sock", "must be absolute"),
        ("unix:", "must be absolute"),
        ("http://crawler:80", "unknown scheme"),
        ("udp://crawler:80", "unknown scheme"),
        ("tcp://crawler", "expected tcp://host:port"),
        ("tcp://:9000", "expected tcp://host:port"),
        ("tcp://", "expected tcp://host:port"),
        ("tcp://[::1]", "expected tcp://host:port"),
        ("tcp://[]:9000", "expected tcp://host:port"),
        ("tcp://crawler:", "is not a number"),
        ("tcp://crawler:http", "is not a number"),
        ("tcp://crawler:80/path", "is not a number"),
        ("tcp://[::1]:", "is not a number"),
        ("tcp://crawler:0", "between 1 and 65535"),
        ("tcp://crawler:65536", "between 1 and 65535"),
        ("tcp://crawler:-1", "not a number"),
    ],
)
def test_parse_endpoint_rejects_malformed_text_with_a_message(text, message):
    with pytest.raises(EndpointError, match=message):
        parse_endpoint(text)


def test_endpoint_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_endpoint("relative.sock")


def test_parse_endpoints_keeps_order():
    assert parse_endpoints([]) == []
    assert parse_endpoints(["tcp://b:2", "/a.sock", "unix:/c.sock"]) == [
        Endpoint(kind="tcp", host="b", port=2),
        Endpoint(kind="unix", path="/a.sock"),
        Endpoint(kind="unix", path="/c.sock"),
    ]


@pytest.mark.parametrize(
    "texts",
    [
        ["/a.sock", "/a.sock"],
        ["/a.sock", "unix:/a.sock"],
        ["tcp://h:1", " tcp://h:1 "],
        ["tcp://[::1]:5", "tcp://::1:5"],
    ],
)
def test_parse_endpoints_rejects_the_same_endpoint_twice(texts):
    with pytest.raises(EndpointError, match="twice"):
        parse_endpoints(texts)


def test_parse_endpoints_names_a_bad_entry():
    with pytest.raises(EndpointError, match="'tcp://h:x'"):
        parse_endpoints(["/a.sock", "tcp://h:x"])


# --- Listening and connecting over real sockets --------------------------------------------


def exchange(listener: socket.socket, client: socket.socket) -> None:
    """Both directions of a connection carry bytes."""
    server, _ = listener.accept()
    with server:
        client.sendall(b'{"type":"welcome"}\n')
        assert server.recv(100) == b'{"type":"welcome"}\n'
        server.sendall(b'{"type":"hello"}\n')
        assert client.recv(100) == b'{"type":"hello"}\n'


def test_connect_and_listen_over_unix(short_socket_path):
    endpoint = parse_endpoint(short_socket_path)
    with endpoint.listen() as listener:
        assert listener.family == socket.AF_UNIX
        with endpoint.connect(timeout=5) as client:
            assert client.gettimeout() == 5
            exchange(listener, client)


def test_connect_and_listen_over_tcp():
    with Endpoint(kind="tcp", host="127.0.0.1", port=0).listen() as listener:
        port = listener.getsockname()[1]
        endpoint = parse_endpoint(f"tcp://127.0.0.1:{port}")
        with endpoint.connect(timeout=5) as client:
            assert client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            exchange(listener, client)


def test_connect_and_listen_over_tcp_ipv6():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        listener = Endpoint(kind="tcp", host="::1", port=0).listen()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback: {exc}")
    with listener:
        assert listener.family == socket.AF_INET6
        endpoint = parse_endpoint(f"tcp://[::1]:{listener.getsockname()[1]}")
        with endpoint.connect(timeout=5) as client:
            exchange(listener, client)


def test_connect_fails_when_nobody_listens(short_socket_path):
    with pytest.raises(OSError):
        parse_endpoint(short_socket_path).connect(timeout=1)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(OSError):
            parse_endpoint(f"tcp://127.0.0.1:{port}").connect(timeout=1)


def test_listen_replaces_a_stale_socket_file(short_socket_path):
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(short_socket_path)
    dead.listen()
    dead.close()  # the file stays behind, as after a crash
    assert os.path.exists(short_socket_path)

    endpoint = parse_endpoint(short_socket_path)
    with endpoint.listen() as listener:
        with endpoint.connect(timeout=5) as client:
            exchange(listener, client)


def test_listen_refuses_a_path_where_another_process_listens(short_socket_path):
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
            import socket, sys
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind({short_socket_path!r})
            sock.listen()
            print("listening", flush=True)
            sys.stdin.read()
        """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert other.stdout.readline() == b"listening\n"
        endpoint = parse_endpoint(short_socket_path)
        with pytest.raises(EndpointError, match="another process is listening"):
            endpoint.listen()
        assert os.path.exists(short_socket_path)  # the other process's socket is left alone
        with endpoint.connect(timeout=5):
            pass  # and it still answers
    finally:
        other.stdin.close()
        other.wait(timeout=10)

    # Once that process is gone, its file is stale and the path can be taken over.
    with parse_endpoint(short_socket_path).listen():
        pass


def test_listen_takes_over_after_the_listener_was_killed(short_socket_path):
    other = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import socket, time; s = socket.socket(socket.AF_UNIX); "
            f"s.bind({short_socket_path!r}); s.listen(); time.sleep(60)",
        ],
    )
    try:
        endpoint = parse_endpoint(short_socket_path)
        wait_until(lambda: os.path.exists(short_socket_path), message="the other listener")
        with pytest.raises(EndpointError):
            endpoint.listen()
    finally:
        other.kill()
        other.wait(timeout=10)
    assert os.path.exists(short_socket_path)  # SIGKILL leaves the file behind
    with endpoint.listen() as listener:
        with endpoint.connect(timeout=5) as client:
            exchange(listener, client)


def test_listen_does_not_delete_a_regular_file_at_the_socket_path(short_socket_path):
    with open(short_socket_path, "w") as config:
        config.write("not a socket")
    with pytest.raises((EndpointError, OSError)):
        parse_endpoint(short_socket_path).listen()
    assert os.path.exists(short_socket_path)


@pytest.mark.parametrize("text", ["tcp://h:8_0", "tcp://h: 80", "tcp://h:+80", "tcp://h:٨٠"])
def test_tcp_port_must_be_plain_ascii_digits(text):
    with pytest.raises(EndpointError, match="not a number"):
        parse_endpoint(text)
