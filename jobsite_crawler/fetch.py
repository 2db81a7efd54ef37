"""The reference crawler's HTTP fetcher: one GET with redirects, limits and an address policy.

Standard library only, no Django. Every hop's host is resolved here, checked
against the policy, and the connection goes to that checked address, so a DNS
answer that changes between the check and the connect cannot reach a private host.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import time
import urllib.parse
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from typing import Any

from .job import Cancellation, JobCancelled, JobFailed

DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_BYTES = 5 * 1024 * 1024
DEFAULT_MAX_REDIRECTS = 5
MAX_TITLE = 500
USER_AGENT = "jobsite-crawler/1"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
HTML_TYPES = ("text/html", "application/xhtml+xml")
CHUNK = 64 * 1024


class FetchError(JobFailed):
    """The fetch failed; `retryable` says whether another attempt could succeed.

    `network`: the host could not be reached or dropped the connection, so the
    bus backs the whole host off (the outcome carries `cause: "network"`).
    """

    def __init__(self, message: str, *, retryable: bool, network: bool = False):
        super().__init__(message, retryable=retryable, cause="network" if network else None)
        self.network = network


FetchCancelled = JobCancelled  # the job was cancelled while fetching: there is no outcome to report


# IPv6 ranges that carry or translate to an IPv4 address (or an old private
# scope) the v6 checks below cannot see through: 6to4 embeds any IPv4,
# loopback included (2002:7f00:1::), Teredo and NAT64 reach IPv4 hosts through
# a relay. They are refused whole: a public site is not reached only this way.
TUNNEL_NETWORKS = (
    (ipaddress.IPv6Network("2002::/16"), "6to4"),
    (ipaddress.IPv6Network("2001::/32"), "teredo"),
    (ipaddress.IPv6Network("64:ff9b::/96"), "nat64"),
    (ipaddress.IPv6Network("64:ff9b:1::/48"), "nat64"),
    (ipaddress.IPv6Network("fec0::/10"), "site-local"),
)


def address_refusal(address: str) -> str | None:
    """Why an IP address may not be fetched without allow_private, or None if it may."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv6Address):
        for network, reason in TUNNEL_NETWORKS:
            if ip in network:
                return reason
    # Most specific first: is_private also covers loopback and link-local ranges.
    for reason in ("unspecified", "loopback", "link_local", "multicast", "private", "reserved"):
        if getattr(ip, f"is_{reason}"):
            return reason.replace("_", "-")
    if not ip.is_global:  # e.g. 100.64.0.0/10, shared address space
        return "not globally routable"
    return None


@dataclass
class FetchResult:
    status: int
    final_url: str
    bytes: int
    content_type: str
    title: str
    links: int
    elapsed_ms: int
    truncated: bool
    redirects: int
    # The Retry-After header of a 429 or 503 (the bus backs the host off for it).
    retry_after: str | None = None

    def as_dict(self) -> dict[str, Any]:
        result = asdict(self)
        if self.retry_after is None:
            del result["retry_after"]
        return result


class _PageParser(HTMLParser):
    """Collects the first <title>'s text and counts <a href> tags."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)  # unescapes entities in text
        self.links = 0
        self.title_parts: list[str] = []
        self._in_title = False
        self._title_seen = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a" and any(name == "href" for name, _ in attrs):
            self.links += 1
        elif tag == "title" and not self._title_seen:
            self._in_title = True

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "a" and any(name == "href" for name, _ in attrs):
            self.links += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "title" and self._in_title:
            self._in_title = False
            self._title_seen = True

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title_parts.append(data)


def parse_page(body: bytes, charset: str | None) -> tuple[str, int]:
    """The page's title (unescaped, whitespace collapsed, at most 500 chars) and link count."""
    try:
        text = body.decode(charset or "utf-8", errors="replace")
    except LookupError:  # an unknown charset name in the header
        text = body.decode("utf-8", errors="replace")
    parser = _PageParser()
    try:
        parser.feed(text)
        parser.close()
    except Exception:  # noqa: BLE001 - a hostile page must not fail the job; keep what was parsed
        pass
    title = " ".join("".join(parser.title_parts).split())[:MAX_TITLE]
    return title, parser.links


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to an address checked beforehand while Host stays the URL's host name."""

    def __init__(self, host: str, port: int, *, address: str, timeout: float):
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, *, address: str, timeout: float, tls: ssl.SSLContext):
        super().__init__(host, port, timeout=timeout, context=tls)
        self._address = address
        self._tls = tls

    def connect(self) -> None:
        raw = socket.create_connection((self._address, self.port), self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = self._tls.wrap_socket(raw, server_hostname=self.host)
        except BaseException:
            raw.close()
            raise


class Fetcher:
    """Fetches one URL per call and returns the result dict of a `done` outcome.

    Raises FetchError (retryable for network trouble, not for a refused URL)
    or FetchCancelled. HTTP error statuses are results, not errors.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        timeout: float = DEFAULT_TIMEOUT,
        total_timeout: float | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_redirects: int = DEFAULT_MAX_REDIRECTS,
        user_agent: str = USER_AGENT,
    ):
        self.allow_private = allow_private
        self.timeout = timeout
        self.total_timeout = total_timeout if total_timeout is not None else 3 * timeout
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.user_agent = user_agent
        self._tls = ssl.create_default_context()

    def __call__(self, url: str, *, cancel: Cancellation | None = None) -> dict[str, Any]:
        return self.fetch(url, cancel=cancel).as_dict()

    def fetch_text(self, url: str, *, max_bytes: int, cancel: Cancellation | None = None) -> tuple[int, str]:
        """GET `url` (redirects followed); return the final status and the first `max_bytes` of the body as text.

        For robots.txt (RFC 9309: UTF-8, parse at least 500 KiB). Raises
        FetchError like fetch().
        """
        response, body, _, _, _ = self._get(url, cancel=cancel or Cancellation(), max_bytes=max_bytes)
        return response.status, body.decode("utf-8", "replace")

    def fetch(self, url: str, *, cancel: Cancellation | None = None) -> FetchResult:
        started = time.monotonic()
        response, body, truncated, url, redirects = self._get(url, cancel=cancel or Cancellation())
        content_type = response.getheader("Content-Type", "") or ""
        title, links = "", 0
        if content_type.split(";", 1)[0].strip().lower() in HTML_TYPES:
            title, links = parse_page(body, response.headers.get_content_charset())
        return FetchResult(
            status=response.status,
            final_url=url,
            bytes=len(body),
            content_type=content_type[:200],
            title=title,
            links=links,
            elapsed_ms=round((time.monotonic() - started) * 1000),
            truncated=truncated,
            redirects=redirects,
            retry_after=(response.getheader("Retry-After") or "").strip()[:100] or None
            if response.status in (429, 503)
            else None,
        )

    def _get(
        self, url: str, *, cancel: Cancellation, max_bytes: int | None = None
    ) -> tuple[http.client.HTTPResponse, bytes, bool, str, int]:
        """The final response (closed, headers kept), its body, whether it was cut, the final URL, redirects."""
        started = time.monotonic()
        deadline = started + self.total_timeout
        redirects = 0
        while True:
            cancel.check()
            try:
                scheme, host, port, target = self._split(url)
                addresses = self._resolve(host, port)
                conn = self._connect(scheme, host, port, addresses, deadline, cancel)
                # getresponse() hands the socket over to the response (Connection:
                # close), so keep our own reference for timeouts and cleanup.
                sock = conn.sock
                response = None
                try:
                    response = self._request(conn, sock, target, deadline, cancel)
                    location = response.getheader("Location")
                    if response.status not in REDIRECT_STATUSES or not location:
                        body, truncated = self._read_body(sock, response, deadline, cancel, max_bytes)
                        break
                finally:
                    cancel.unwatch(sock)
                    if response is not None:
                        response.close()
                    conn.close()
                    sock.close()
            except (OSError, http.client.HTTPException) as exc:
                cancel.check()  # a cancel shuts the socket down: that error is the cancel
                raise FetchError(f"{url}: {_describe(exc)}", retryable=True, network=True) from None
            redirects += 1
            if redirects > self.max_redirects:
                raise FetchError(f"too many redirects (more than {self.max_redirects})", retryable=False)
            url = urllib.parse.urljoin(url, location.strip())
        return response, body, truncated, url, redirects

    def _split(self, url: str) -> tuple[str, str, int, str]:
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise FetchError(f"invalid URL {url!r}: {exc}", retryable=False) from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise FetchError(f"refused URL {url!r}: only http and https are fetched", retryable=False)
        host = parts.hostname
        if not host:
            raise FetchError(f"invalid URL {url!r}: no host", retryable=False)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        # http.client sends the target as ASCII: percent-encode what is not.
        target = urllib.parse.quote(target, safe="/?&=%:@;+$,!~*'()[]")
        return scheme, host, port or (443 if scheme == "https" else 80), target

    def _resolve(self, host: str, port: int) -> list[str]:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as exc:
            raise FetchError(f"cannot resolve {host!r}: {_describe(exc)}", retryable=True, network=True) from None
        # A TCP lookup answers AF_INET and AF_INET6 only, whose sockaddr starts with the address text;
        # the (int, bytes) sockaddr in the type is that of other families.
        addresses = list(dict.fromkeys(info[4][0] for info in infos if isinstance(info[4][0], str)))
        if self.allow_private:
            return addresses
        allowed = [address for address in addresses if address_refusal(address) is None]
        if not allowed:
            address = addresses[0]
            raise FetchError(
                f"refused address {address} of host {host!r}: {address_refusal(address)} addresses "
                "are not fetched (start the crawler with --allow-private to allow them)",
                retryable=False,
            )
        return allowed

    def _connect(
        self, scheme: str, host: str, port: int, addresses: list[str], deadline: float, cancel: Cancellation
    ) -> http.client.HTTPConnection:
        error: Exception | None = None
        for address in addresses:
            timeout = self._remaining(deadline)
            if scheme == "https":
                conn: http.client.HTTPConnection = _PinnedHTTPSConnection(
                    host, port, address=address, timeout=timeout, tls=self._tls
                )
            else:
                conn = _PinnedHTTPConnection(host, port, address=address, timeout=timeout)
            try:
                conn.connect()
            except ssl.SSLCertVerificationError as exc:
                conn.close()
                raise FetchError(
                    f"TLS certificate of {host!r} rejected: {exc.verify_message}", retryable=False
                ) from None
            except OSError as exc:
                conn.close()
                error = exc
                cancel.check()
                continue
            cancel.watch(conn.sock)
            return conn
        raise FetchError(f"cannot connect to {host}:{port}: {_describe(error)}", retryable=True, network=True)

    def _request(
        self,
        conn: http.client.HTTPConnection,
        sock: socket.socket,
        target: str,
        deadline: float,
        cancel: Cancellation,
    ) -> http.client.HTTPResponse:
        cancel.check()
        sock.settimeout(self._remaining(deadline))
        conn.request(
            "GET",
            target,
            headers={
                "User-Agent": self.user_agent,
                "Accept": "text/html,application/xhtml+xml,*/*;q=0.8",
                "Accept-Encoding": "identity",  # the size cap counts the bytes we parse
                "Connection": "close",
            },
        )
        return conn.getresponse()

    def _read_body(
        self,
        sock: socket.socket,
        response: http.client.HTTPResponse,
        deadline: float,
        cancel: Cancellation,
        max_bytes: int | None = None,
    ) -> tuple[bytes, bool]:
        body = bytearray()
        max_bytes = self.max_bytes if max_bytes is None else max_bytes
        limit = max_bytes + 1  # one byte more tells whether the body was cut
        while len(body) < limit:
            cancel.check()
            sock.settimeout(self._remaining(deadline))
            chunk = response.read1(min(CHUNK, limit - len(body)))
            if not chunk:
                break
            body += chunk
        cancel.check()
        truncated = len(body) > max_bytes
        return bytes(body[:max_bytes]), truncated

    def _remaining(self, deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"total timeout of {self.total_timeout:g} s exceeded")
        return min(self.timeout, remaining)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no address"
    if isinstance(exc, TimeoutError):  # socket.timeout is an alias of it
        return f"timed out ({exc})" if str(exc) else "timed out"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
