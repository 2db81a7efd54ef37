"""A crawler announcing itself to jobsite: POST register at start, deregister at a clean exit.

Pure Python (urllib), no Django: `manage.py runcrawler --announce URL` uses
it, and a crawler on another machine needs only this module and BUS_TOKEN.
Each request is signed with HMAC-SHA256 over
`jobsite-announce/1 <action> <endpoint> <ts> <nonce>` and carries a fresh
timestamp and nonce, so the server can refuse stale and replayed requests.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import random
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from .logfmt import kv

log = logging.getLogger("jobsite_crawler.announce")

ANNOUNCE_PREFIX = "jobsite-announce/1"
ACTIONS = ("register", "deregister")
REQUEST_TIMEOUT = 5.0  # seconds for one request, connect and answer
RETRY_FOR = 60.0  # a failing register is retried this long, then given up (logged)
BACKOFF_BASE = 0.5
BACKOFF_CAP = 10.0
MAX_ANSWER = 2000  # bytes of the server's answer kept for the log


class AnnounceError(Exception):
    """One announcement did not succeed: no connection, a timeout, or an answer other than 2xx."""


def announce_proof(token: str, *, action: str, endpoint: str, ts: str, nonce: str) -> str:
    """hex HMAC-SHA256(key=token, msg="jobsite-announce/1 <action> <endpoint> <ts> <nonce>")."""
    message = f"{ANNOUNCE_PREFIX} {action} {endpoint} {ts} {nonce}"
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


def announcement(
    token: str, *, action: str, endpoint: str, label: str, now: float | None = None, nonce: str | None = None
) -> dict[str, str]:
    """The JSON body of one request; every call has a new timestamp and nonce unless given."""
    if action not in ACTIONS:
        raise ValueError(f"action must be one of {ACTIONS}, not {action!r}")
    ts = f"{time.time() if now is None else now:.3f}"
    nonce = nonce or secrets.token_hex(16)
    return {
        "action": action,
        "endpoint": endpoint,
        "label": label,
        "ts": ts,
        "nonce": nonce,
        "auth": announce_proof(token, action=action, endpoint=endpoint, ts=ts, nonce=nonce),
    }


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer other than 2xx: following it would turn the POST into a GET."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Announcer:
    """Registers one advertised endpoint with jobsite, retrying in a thread; deregisters on request.

    The register thread waits until the crawler listens (`after`), then posts
    until one answer is 2xx, backing off (exponential, full jitter) for at
    most `retry_for` seconds; it never blocks the crawler's sessions.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str,
        endpoint: str,
        label: str = "",
        timeout: float = REQUEST_TIMEOUT,
        retry_for: float = RETRY_FOR,
        backoff_base: float = BACKOFF_BASE,
        backoff_cap: float = BACKOFF_CAP,
    ):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r}: the announce URL must be http:// or https:// with a host")
        if not token:
            raise ValueError("announcing needs BUS_TOKEN: the request is signed with it")
        self.url = url
        self.token = token
        self.endpoint = endpoint
        self.label = label
        self.timeout = timeout
        self.retry_for = retry_for
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self.registered = threading.Event()  # set once a register got a 2xx answer
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._opener = urllib.request.build_opener(_NoRedirects())

    def send(self, action: str) -> int:
        """One request; the 2xx status, or AnnounceError saying what went wrong."""
        body = json.dumps(announcement(self.token, action=action, endpoint=self.endpoint, label=self.label)).encode()
        request = urllib.request.Request(
            self.url, data=body, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                status = int(response.status)
                response.read(MAX_ANSWER)
        except urllib.error.HTTPError as exc:
            with exc:
                answer = exc.read(MAX_ANSWER).decode("utf-8", "replace")
            raise AnnounceError(f"HTTP {exc.code}: {answer.strip()[:500]}") from None
        except (OSError, ValueError) as exc:  # URLError, timeouts, refused connections, bad status lines
            reason = getattr(exc, "reason", exc)
            raise AnnounceError(f"{type(exc).__name__}: {reason}") from None
        if not 200 <= status < 300:
            raise AnnounceError(f"HTTP {status}")
        return status

    def register(self) -> bool:
        """Post register until it succeeds, stop() is called, or retry_for has passed; True on success."""
        deadline = time.monotonic() + self.retry_for
        failures = 0
        while not self._stop.is_set():
            try:
                status = self.send("register")
            except AnnounceError as exc:
                failures += 1
                delay = random.uniform(0, min(self.backoff_cap, self.backoff_base * 2 ** (failures - 1)))
                if time.monotonic() + delay >= deadline:
                    log.error(
                        kv(
                            "crawler.announce.gave_up",
                            url=self.url,
                            endpoint=self.endpoint,
                            attempts=failures,
                            error=exc,
                            retry_for=self.retry_for,
                        )
                    )
                    return False
                log.warning(
                    kv(
                        "crawler.announce.failed",
                        action="register",
                        url=self.url,
                        endpoint=self.endpoint,
                        error=exc,
                        retry_in=round(delay, 3),
                    )
                )
                self._stop.wait(delay)
                continue
            self.registered.set()
            log.info(kv("crawler.announce.registered", url=self.url, endpoint=self.endpoint, status=status))
            return True
        return False

    def start(self, *, after: threading.Event | None = None) -> None:
        """Register in a daemon thread, once `after` is set (the crawler listens)."""

        def run() -> None:
            while after is not None and not after.wait(0.2):
                if self._stop.is_set():
                    return
            self.register()

        self._thread = threading.Thread(target=run, name="crawler-announce", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the register thread, waiting for a request in flight (at most its own timeout).

        Waiting matters: a register that reached the server after the
        deregister would leave the exited crawler registered.
        """
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1.0)

    def deregister(self) -> bool:
        """Stop registering, then post one deregister; a failure is logged, never raised."""
        self.stop()
        try:
            status = self.send("deregister")
        except AnnounceError as exc:
            log.error(
                kv("crawler.announce.failed", action="deregister", url=self.url, endpoint=self.endpoint, error=exc)
            )
            return False
        log.info(kv("crawler.announce.deregistered", url=self.url, endpoint=self.endpoint, status=status))
        return True
