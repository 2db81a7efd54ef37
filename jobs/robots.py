"""robots.txt, fleet-wide: who fetches it, when, and which URLs it allows (RFC 9309, with protego).

The control plane may have no route to the web, so crawlers fetch robots.txt
for it (docs/protocol.md section 15): a session whose crawler said
`"robots": true` in `ready` is asked, host by host, through a `robots`
frame, and answers with the status and the file. One fetch per host per
ROBOTS_TTL for the whole fleet: the request is leased to one session at a
time (the Host row's robots_session / robots_lease_until).

What an answer means (RFC 9309 §2.3.1):
- 2xx: the file's rules apply (`rules`), its Crawl-delay raises the host's delay;
- 4xx: "unavailable", everything is allowed;
- 5xx or no answer: "unreachable", nothing is allowed; asked again after
  60 s, doubling per failure, at most ROBOTS_TTL. A host with rules younger
  than 30 days keeps them meanwhile.
A URL the rules disallow for CRAWLER_USER_AGENT ends as `disallowed`,
never fetched: the queued jobs of a host are checked when its rules arrive,
and every claim checks its jobs again against the rules in force.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from uuid import UUID

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone
from protego import Protego

from jobsite_crawler.logfmt import kv

from .hosts import MAX_CRAWL_DELAY
from .models import ROBOTS_CRAWLABLE, Host, Job, RobotsState, Status

log = logging.getLogger("jobs.robots")

# RFC 9309 §2.5: parse at least the first 500 KiB.
MAX_ROBOTS_BYTES = 500 * 1024
# How long one session may take to answer a robots request before another may be asked.
FETCH_LEASE = timedelta(seconds=60)
RETRY_FIRST = 60.0
# A host's last good rules stay in force this long while robots.txt is unreachable (RFC 9309 §2.3.1.4).
KEEP_RULES_WHEN_UNREACHABLE = timedelta(days=30)
# Queued jobs checked per statement when a host's rules arrive.
CHECK_BATCH = 2000


def obeyed() -> bool:
    return settings.ROBOTS_TXT == "obey"


@functools.lru_cache(maxsize=1024)
def _rules(host_id: int, fetched_at: datetime, text: str) -> Protego:
    return Protego.parse(text)


def rules_of(host: Host) -> Protego | None:
    """The parsed rules in force for `host`, or None when everything is allowed."""
    if host.robots_state != RobotsState.ALLOWED or host.robots_fetched_at is None:
        return None
    return _rules(host.pk, host.robots_fetched_at, host.robots_txt)


def allows(rules: Protego | None, url: str) -> bool:
    return rules is None or bool(rules.can_fetch(url, settings.CRAWLER_USER_AGENT))


@dataclass(frozen=True)
class RobotsRequest:
    host: str  # the host key
    url: str


def claim_fetches(*, session: UUID, limit: int, at: datetime | None = None) -> list[RobotsRequest]:
    """Lease up to `limit` due robots.txt fetches to `session` (hosts with queued work first)."""
    if limit <= 0 or not obeyed():
        return []
    at = at or timezone.now()
    with transaction.atomic():
        due = list(
            Host.objects.select_for_update(skip_locked=True)
            .filter(active=True, paused=False)
            .filter(Q(robots_due_at__isnull=True) | Q(robots_due_at__lte=at))
            .filter(Q(robots_lease_until__isnull=True) | Q(robots_lease_until__lte=at))
            .order_by("-top_priority", "id")
            .values_list("id", "key")[:limit]
        )
        if not due:
            return []
        Host.objects.filter(id__in=[host_id for host_id, _ in due]).update(
            robots_session=session, robots_lease_until=at + FETCH_LEASE
        )
        requests = []
        for host_id, key in due:
            sample = Job.objects.filter(host_id=host_id).order_by("-id").values_list("url", flat=True).first()
            scheme = urlsplit(sample).scheme.lower() if sample else "https"
            requests.append(
                RobotsRequest(host=key, url=f"{scheme if scheme in ('http', 'https') else 'https'}://{key}/robots.txt")
            )
    log.info(kv("robots.asked", session=session, hosts=len(requests)))
    return requests


def release_fetches(*, session: UUID) -> int:
    """The session ended: its unanswered robots requests may go to another session at once."""
    return Host.objects.filter(robots_session=session, robots_lease_until__isnull=False).update(
        robots_lease_until=None, robots_session=None
    )


@dataclass(frozen=True)
class RobotsAnswer:
    recorded: bool
    reason: str = ""
    disallowed: int = 0


def record_answer(
    *, session: UUID, host: str, status: int, body: str = "", error: str = "", at: datetime | None = None
) -> RobotsAnswer:
    """Store a crawler's answer to a robots request; only the session that was asked may answer."""
    at = at or timezone.now()
    with transaction.atomic():
        row = Host.objects.select_for_update().filter(key=host).first()
        if row is None:
            return RobotsAnswer(False, "unknown host")
        if row.robots_session != session:
            return RobotsAnswer(False, "this session was not asked for this host's robots.txt")
        row.robots_session, row.robots_lease_until = None, None
        row.robots_status, row.robots_error = status, error[:500]
        ttl = timedelta(seconds=settings.ROBOTS_TTL)
        if 200 <= status < 300:
            text = body.encode("utf-8", "replace")[:MAX_ROBOTS_BYTES].decode("utf-8", "ignore")
            rules = Protego.parse(text)
            delay = rules.crawl_delay(settings.CRAWLER_USER_AGENT)
            row.robots_state, row.robots_txt, row.robots_fetched_at = RobotsState.ALLOWED, text, at
            row.crawl_delay = None if delay is None else min(float(delay), MAX_CRAWL_DELAY)
            row.robots_due_at, row.robots_failures = at + ttl, 0
        elif 300 <= status < 500:
            # 4xx (and a redirect chain the crawler gave up on): "unavailable", all allowed.
            row.robots_state, row.robots_txt, row.robots_fetched_at = RobotsState.UNAVAILABLE, "", at
            row.crawl_delay, row.robots_due_at, row.robots_failures = None, at + ttl, 0
        else:
            row.robots_failures += 1
            retry = min(settings.ROBOTS_TTL, RETRY_FIRST * 2 ** (row.robots_failures - 1))
            row.robots_due_at = at + timedelta(seconds=retry)
            keep = (
                row.robots_state in ROBOTS_CRAWLABLE
                and row.robots_fetched_at is not None
                and at - row.robots_fetched_at < KEEP_RULES_WHEN_UNREACHABLE
            )
            if not keep:
                row.robots_state = RobotsState.UNREACHABLE
        row.save()
        disallowed = _settle_queued(row, at) if row.robots_state == RobotsState.ALLOWED else 0
    log.info(
        kv("robots.recorded", host=host, status=status, state=row.robots_state, disallowed=disallowed, session=session)
    )
    from .services import _announce_queued  # the host may be crawlable now: wake the buses

    with transaction.atomic():
        _announce_queued()
    return RobotsAnswer(True, disallowed=disallowed)


def _settle_queued(host: Host, at: datetime) -> int:
    """End the host's queued jobs that its rules disallow (in batches); return how many."""
    from .services import disallow_jobs

    rules = rules_of(host)
    if rules is None:
        return 0
    ended, last = 0, 0
    while True:
        batch = list(
            Job.objects.filter(host_id=host.pk, status=Status.QUEUED, id__gt=last)
            .order_by("id")
            .values_list("id", "url")[:CHECK_BATCH]
        )
        if not batch:
            return ended
        last = batch[-1][0]
        refused = [job_id for job_id, url in batch if not allows(rules, url)]
        ended += disallow_jobs(job_ids=refused, from_status=Status.QUEUED, reason=refusal(host), at=at)


def refusal(host: Host) -> str:
    return f"robots.txt of {host.key} disallows this URL for {settings.CRAWLER_USER_AGENT}"


def check_claimed(rows: list[tuple[Any, ...]]) -> set[int]:
    """Of freshly claimed (id, url, host_id) rows, the ids robots.txt disallows.

    They are ended here, in the claim's own transaction: no crawler sees them.
    """
    from .services import disallow_jobs

    if not rows or not obeyed():
        return set()
    host_ids = {row[2] for row in rows if row[2] is not None}
    hosts = {
        host.pk: host
        for host in Host.objects.filter(id__in=host_ids, robots_state=RobotsState.ALLOWED).only(
            "id", "key", "robots_state", "robots_txt", "robots_fetched_at"
        )
    }
    refused: dict[int, list[int]] = {}
    for job_id, url, host_id in rows:
        host = hosts.get(host_id)
        if host is not None and not allows(rules_of(host), url):
            refused.setdefault(host_id, []).append(job_id)
    for host_id, job_ids in refused.items():
        disallow_jobs(job_ids=job_ids, from_status=Status.RUNNING, reason=refusal(hosts[host_id]))
    return {job_id for job_ids in refused.values() for job_id in job_ids}
