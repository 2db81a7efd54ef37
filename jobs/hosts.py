"""Host keys and the arithmetic of politeness: no Django model access here.

A host key names the unit that politeness rules apply to: the lowercased,
IDNA-encoded hostname, plus the port when it is not the scheme's default
(`example.com`, `example.com:8080`, `[::1]:8000`). Two URLs with the same key
share one delay, one concurrency limit and one back-off, fleet-wide.
"""

from __future__ import annotations

import email.utils
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import urlsplit

DEFAULT_PORTS = {"http": 80, "https": 443}
# A Crawl-delay or Retry-After longer than this is taken as this: a robots.txt
# or a reply must not be able to stop a host for days (Heritrix caps at 300 s).
MAX_CRAWL_DELAY = 300.0
# Statuses that mean "slow down" for the whole host (RFC 9110 §15.6.4, RFC 6585 §4).
BACKOFF_STATUSES = frozenset({429, 503})


# The ready time of a host nobody has started a job on: ready, whatever clock a caller passes.
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def long_ago() -> datetime:
    return LONG_AGO


class HostKeyError(ValueError):
    pass


def host_key(url: str) -> str:
    """The politeness key of `url`; HostKeyError when it has no usable host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise HostKeyError(f"invalid URL {url!r}: {exc}") from None
    hostname = parts.hostname
    if not hostname:
        raise HostKeyError(f"URL {url!r} has no host")
    hostname = hostname.rstrip(".")
    if ":" in hostname:  # an IPv6 literal: keep it bracketed so the port stays readable
        name = f"[{hostname}]"
    else:
        try:
            name = hostname.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise HostKeyError(f"URL {url!r}: host {hostname!r} is not a valid IDNA name ({exc})") from None
    name = name.lower()
    if port is not None and port != DEFAULT_PORTS.get(parts.scheme.lower()):
        return f"{name}:{port}"
    return name


def effective_delay(*, delay: float | None, crawl_delay: float | None, default: float) -> float:
    """Seconds between two starts on a host: the larger of its configured delay and its Crawl-delay."""
    configured = default if delay is None else delay
    return max(configured, min(crawl_delay or 0.0, MAX_CRAWL_DELAY))


def parse_retry_after(value: object, *, at: datetime) -> float | None:
    """Seconds a Retry-After value asks for (delay-seconds or an HTTP date), or None when unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        if not text or len(text) > 100:
            return None
        if text.isdigit():
            seconds = float(text)
        else:
            try:
                when = email.utils.parsedate_to_datetime(text)
            except (TypeError, ValueError, IndexError):
                return None
            if when is None:
                return None
            if when.tzinfo is None:
                when = when.replace(tzinfo=UTC)
            seconds = (when - at).total_seconds()
    else:
        return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class BackOff:
    """How long a host is backed off, and why (shown on the hosts page and in job timelines)."""

    seconds: float
    reason: str

    def until(self, at: datetime) -> datetime:
        return at + timedelta(seconds=self.seconds)


def backoff_for(
    *,
    status: int | None,
    retry_after: object,
    network: bool,
    errors: int,
    at: datetime,
    base: float,
    cap: float,
) -> BackOff | None:
    """The back-off a crawler's report calls for, or None when the report is not a "slow down".

    A 429 or 503 backs off for Retry-After (seconds or an HTTP date, capped),
    else for `base` doubled per connection error in a row, capped. A
    connection error (`network`) backs off exponentially: `errors` is the
    count in a row including this one.
    """
    if status in BACKOFF_STATUSES:
        asked = parse_retry_after(retry_after, at=at)
        if asked is not None:
            seconds = min(asked, cap)
            return BackOff(seconds, f"HTTP {status}, Retry-After {retry_after!s:.60}: {seconds:g} s")
        seconds = min(cap, base * 2 ** max(0, errors - 1))
        return BackOff(seconds, f"HTTP {status} without Retry-After: {seconds:g} s")
    if network:
        seconds = min(cap, base * 2 ** max(0, errors - 1))
        return BackOff(seconds, f"connection error {errors} in a row: {seconds:g} s")
    return None
