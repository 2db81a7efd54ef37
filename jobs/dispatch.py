"""Dispatch: which queued jobs a crawler session gets, and how many. The one home of these rules.

- How many: a session is offered what its free slots allow (at most
  MAX_CLAIM_BATCH per claim), and nothing while a suspected poison job runs
  alone in it; a session that holds nothing may take a suspect, alone.
- Which: the best-priority jobs among the hosts that are ready, where a host
  is ready when it is not paused, its delay since the last start and any
  back-off have passed, and fewer of its jobs run than its concurrency. A
  host that must wait is skipped, never waited for; each host gives at most
  one job per claim when it has a delay, and up to its free concurrency
  when it has none.
- robots.txt (ROBOTS_TXT=obey): a host's jobs start only once its robots.txt
  is known (jobs.robots), and a claimed URL its rules disallow is ended as
  `disallowed` in the claim's own transaction, never assigned.
- Kinds: a session whose crawler named the kinds it takes (ready.kinds)
  gets only jobs of those kinds and jobs without a kind; a host with none
  of them queued is not looked at by that session (nor moved on by it:
  it stays ready for the others). `kinds` None (a crawler that did not
  say) runs exactly the claim without kinds.
- When to ask again: a claim that came back short says when the next
  waiting host becomes ready (`Claim.wait`, counted from the claim's own
  clock so that no host slips between the claim and the question), so that
  idle sessions wake for it.

The claim is one atomic step per database (jobs.sql.postgresql,
jobs.sql.sqlite); the rules here feed it its parameters. A new rule (a
quota per project, fairness between users) belongs here and in those two
statements, nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from django.conf import settings
from django.db import transaction

from . import robots
from .hosts import MAX_CRAWL_DELAY
from .sql import dialect, json_value

# The most jobs one claim hands to one session (a bigger free capacity is
# filled by several claims, so that outcomes are never kept waiting long).
MAX_CLAIM_BATCH = 500
# A claim looks at as many ready hosts as it wants jobs; when some of them had
# nothing startable, it looks again (they were moved on), a bounded number of times.
CLAIM_ROUNDS = 3


@dataclass(frozen=True)
class ClaimedJob:
    id: int
    attempt: int
    url: str
    payload: dict
    run_alone: bool = False
    kind: str = ""


@dataclass(frozen=True)
class Ask:
    """What a session should claim now: up to `limit` jobs; `alone` when it holds nothing."""

    limit: int
    alone: bool


def ask(*, slots: int, outstanding: int, running_suspect: bool) -> Ask:
    """How many jobs a session with `slots` and `outstanding` assignments should claim."""
    if running_suspect:
        return Ask(0, False)  # a suspect runs alone: nothing else until its verdict
    return Ask(max(0, min(slots - outstanding, MAX_CLAIM_BATCH)), alone=outstanding == 0)


@dataclass(frozen=True)
class Claim:
    """What a claim gave: the jobs, and when a host that had to wait becomes ready (seconds; None: none waits)."""

    jobs: list[ClaimedJob]
    wait: float | None


def claim_jobs(
    *,
    session: UUID,
    limit: int,
    lease_seconds: float,
    crawler: str = "",
    alone: bool = False,
    at: datetime | None = None,
    actor: str = "bus",
    kinds: list[str] | None = None,
) -> list[ClaimedJob]:
    """claim(), the jobs only."""
    return claim(
        session=session,
        limit=limit,
        lease_seconds=lease_seconds,
        crawler=crawler,
        alone=alone,
        at=at,
        actor=actor,
        kinds=kinds,
    ).jobs


def claim(
    *,
    session: UUID,
    limit: int,
    lease_seconds: float,
    crawler: str = "",
    alone: bool = False,
    at: datetime | None = None,
    actor: str = "bus",
    kinds: list[str] | None = None,
) -> Claim:
    """Lease up to `limit` queued jobs to `session` (a session of `crawler`), under the host rules.

    Each claimed job becomes running with attempt + 1 (the new fencing token)
    and remembers the crawler it was given to: only that crawler may record
    the attempt's outcome. Two concurrent claimers never get the same job or
    the same host's turn: PostgreSQL skips rows another claimer has locked;
    SQLite serialises writers (BEGIN IMMEDIATE).

    A suspected poison job (`run_alone`) goes only to a session that holds
    nothing (`alone`), and alone: the claim then returns just that job, and
    the caller claims nothing more while it runs.

    `kinds` (the crawler's ready.kinds): only jobs of these kinds or of no
    kind; None takes every kind.
    """
    if limit <= 0:
        return Claim(jobs=[], wait=None)
    rules = {
        "delay": settings.HOST_DELAY,
        "concurrency": settings.HOST_CONCURRENCY,
        "max_crawl_delay": MAX_CRAWL_DELAY,
        "robots": robots.obeyed(),
    }
    sql = dialect()
    common = {
        "session": session,
        "crawler": crawler,
        "lease_seconds": lease_seconds,
        "at": at,
        "actor": actor,
        # A job without a kind goes to any crawler: "" is among every session's kinds.
        "kinds": None if kinds is None else sorted({"", *kinds}),
    }
    wait: float | None = None
    with transaction.atomic():
        rows: list[tuple] = []
        if alone:
            rows, _, _ = sql.claim(limit=1, alone=True, **common, **rules)
        for _ in range(CLAIM_ROUNDS if not rows else 0):
            taken, considered, wait = sql.claim(limit=limit - len(rows), alone=False, **common, **rules)
            rows += taken
            if len(rows) >= limit or considered < limit - len(rows) + len(taken):
                break  # enough, or every ready host was looked at
            # As many hosts as jobs wanted, and fewer jobs: some ready hosts had nothing
            # startable now (retry delays). The claim moved them on; look further.
        # The last word of robots.txt: a URL its rules disallow is ended here, never assigned.
        refused = robots.check_claimed([(row[0], row[2], row[5]) for row in rows])
    jobs = [
        ClaimedJob(
            id=row[0], attempt=row[1], url=row[2], payload=json_value(row[3]), run_alone=bool(row[4]), kind=row[6]
        )
        for row in rows
        if row[0] not in refused
    ]
    return Claim(jobs=jobs, wait=wait)


def next_ready_in(*, at: datetime | None = None) -> float | None:
    """Seconds until a host now waiting (delay, back-off, retry delay) becomes ready; None if none waits."""
    return dialect().next_ready_in(at)
