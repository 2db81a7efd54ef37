"""The reference crawler's fetcher against a real local HTTP server: results, limits, address policy."""

from __future__ import annotations

import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobsite_crawler.fetch import Cancellation, FetchCancelled, Fetcher, FetchError, address_refusal, parse_page
from tests.conftest import free_port, wait_until

PAGE = (
    "<!doctype html><html><head><meta charset=utf-8>"
    "<title>\n  Caf\u00e9 &amp; Friends &lt;home&gt;  </title></head>"
    "<body><a href='/one'>1</a> <a href=\"/two\">2</a> <a name=x>no href</a> <a href=/three /></body></html>"
)


class LocalSite:
    """A ThreadingHTTPServer in a thread, with pages for each case; `release` frees slow requests."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.slow_requests = 0
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/page":
                    self._send(200, PAGE.encode(), "text/html; charset=utf-8")
                elif path == "/redirect":
                    self._redirect("/page")
                elif path == "/loop":
                    self._redirect("/loop")
                elif path == "/to-ftp":
                    self._redirect("ftp://example.com/file")
                elif path == "/big":
                    self._send(200, b"x" * 100_000, "application/octet-stream")
                elif path == "/text":
                    self._send(200, b"<title>not html</title>", "text/plain")
                elif path == "/slow":
                    site.slow_requests += 1
                    site.release.wait(30)
                    self._send(200, b"<title>slow</title>", "text/html")
                else:
                    self._send(404, b"<title>Not here</title>", "text/html")

            def _send(self, status: int, body: bytes, content_type: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass  # the fetcher stopped reading (size cap, cancel)

            def _redirect(self, location: str) -> None:
                self.send_response(302)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def __enter__(self) -> LocalSite:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


@pytest.fixture
def site():
    with LocalSite() as local_site:
        yield local_site


def test_page_result_has_status_title_links_and_sizes(site):
    result = Fetcher(allow_private=True)(site.url("/page"))

    assert result["status"] == 200
    assert result["final_url"] == site.url("/page")
    assert result["bytes"] == len(PAGE.encode())
    assert result["content_type"] == "text/html; charset=utf-8"
    assert result["title"] == "Caf\u00e9 & Friends <home>"
    assert result["links"] == 3
    assert result["truncated"] is False
    assert isinstance(result["elapsed_ms"], int) and result["elapsed_ms"] >= 0


def test_redirect_is_followed_and_final_url_reported(site):
    result = Fetcher(allow_private=True)(site.url("/redirect"))

    assert result["status"] == 200
    assert result["final_url"] == site.url("/page")
    assert result["redirects"] == 1


def test_redirect_loop_stops_at_the_cap_and_is_not_retryable(site):
    with pytest.raises(FetchError, match="too many redirects") as caught:
        Fetcher(allow_private=True, max_redirects=3)(site.url("/loop"))
    assert caught.value.retryable is False


def test_every_redirect_hop_is_checked(site):
    with pytest.raises(FetchError, match="only http and https") as caught:
        Fetcher(allow_private=True)(site.url("/to-ftp"))
    assert caught.value.retryable is False


def test_http_error_status_is_a_result_not_an_error(site):
    result = Fetcher(allow_private=True)(site.url("/missing"))

    assert result["status"] == 404
    assert result["title"] == "Not here"


def test_body_over_the_size_cap_is_cut_and_marked_truncated(site):
    result = Fetcher(allow_private=True, max_bytes=1000)(site.url("/big"))

    assert result["bytes"] == 1000
    assert result["truncated"] is True


def test_title_and_links_only_for_html(site):
    result = Fetcher(allow_private=True)(site.url("/text"))

    assert result["title"] == ""
    assert result["links"] == 0


def test_loopback_is_refused_without_allow_private_and_not_retryable(site):
    for url in (site.url("/page"), f"http://localhost:{site.port}/page"):
        with pytest.raises(FetchError, match="loopback.*--allow-private") as caught:
            Fetcher()(url)
        assert caught.value.retryable is False
    assert site.slow_requests == 0


@pytest.mark.parametrize(
    "host, reason",
    [
        ("[2002:7f00:1::1]", "6to4"),
        ("[64:ff9b::7f00:1]", "nat64"),
        ("[2001:0:4136:e378::1]", "teredo"),
        ("[fec0::1]", "site-local"),
    ],
)
def test_ipv6_forms_of_private_hosts_are_refused_before_connecting(site, host, reason):
    with pytest.raises(FetchError, match=f"{reason}.*--allow-private") as caught:
        Fetcher()(f"http://{host}:{site.port}/page")
    assert caught.value.retryable is False
    assert site.slow_requests == 0


@pytest.mark.parametrize("url", ["ftp://example.com/", "file:///etc/passwd", "javascript:alert(1)", "http:///nohost"])
def test_bad_scheme_or_url_is_refused_and_not_retryable(url):
    with pytest.raises(FetchError) as caught:
        Fetcher()(url)
    assert caught.value.retryable is False


@pytest.mark.parametrize(
    "address, reason",
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("192.168.0.1", "private"),
        ("172.16.0.1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1", "link-local"),
        ("224.0.0.1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "private"),
        ("240.0.0.1", "private"),
        ("100.64.0.1", "not globally routable"),
        ("93.184.216.34", None),
        ("2606:4700::1111", None),
        # IPv6 forms that reach an IPv4 host (loopback here) or an old private scope.
        ("2002:7f00:1::1", "6to4"),
        ("2002:808:808::1", "6to4"),
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "teredo"),
        ("64:ff9b::7f00:1", "nat64"),
        ("64:ff9b::808:808", "nat64"),
        ("64:ff9b:1::a00:1", "nat64"),
        ("fec0::1", "site-local"),
        ("feff::1", "site-local"),
        ("2001:db8::1", "private"),
    ],
)
def test_address_policy(address, reason):
    assert address_refusal(address) == reason


def test_connection_refused_is_retryable():
    with pytest.raises(FetchError, match="cannot connect") as caught:
        Fetcher(allow_private=True, timeout=2)(f"http://127.0.0.1:{free_port()}/")
    assert caught.value.retryable is True


def test_read_timeout_is_retryable(site):
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out") as caught:
        Fetcher(allow_private=True, timeout=0.3)(site.url("/slow"))
    assert caught.value.retryable is True
    assert time.monotonic() - started < 5


def test_cancel_ends_a_blocked_fetch_at_once(site):
    cancel = Cancellation()
    outcome = []

    def fetch() -> None:
        try:
            Fetcher(allow_private=True, timeout=30)(site.url("/slow"), cancel=cancel)
            outcome.append("done")
        except FetchCancelled:
            outcome.append("cancelled")
        except FetchError as exc:
            outcome.append(f"failed: {exc}")

    thread = threading.Thread(target=fetch)
    thread.start()
    try:
        wait_until(lambda: site.slow_requests == 1, message="the slow request to arrive")
        cancel.cancel()
        thread.join(5)
        assert not thread.is_alive()
        assert outcome == ["cancelled"]
    finally:
        site.release.set()
        thread.join(10)


def test_parse_page_survives_broken_html_and_caps_the_title():
    title, links = parse_page(b"<title>" + b"a " * 1000 + b"</title><a href=x><a href='<", "utf-8")
    assert len(title) == 500
    assert links >= 1
    assert parse_page(b"<title>x</title>", "no-such-charset") == ("x", 0)


def test_localhost_socket_sanity():
    # The address policy is checked on resolved addresses: make sure the
    # resolver used above gives loopback for localhost on this machine.
    addresses = {info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)}
    assert all(address_refusal(address) == "loopback" for address in addresses)
