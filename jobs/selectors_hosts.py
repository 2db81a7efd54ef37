"""Read-side questions of the hosts pages: one page of hosts with their job counts, one host and its latest jobs.

A fixed number of queries whatever the number of hosts or jobs: the page of
hosts (plus the paginator's count), then ONE grouped count of the page's jobs
by host and status (on the job table's host_id index), so 50 rows never cost
50 queries. Pages poll these every two seconds.

A host's robots.txt (up to 500 KiB) is never read by the list: only the host
page reads it, and only its first ROBOTS_FILE_SHOWN characters, cut by the
database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from django.conf import settings
from django.core.paginator import Page, Paginator
from django.db.models import BooleanField, Case, Count, Exists, OuterRef, QuerySet, Value, When
from django.db.models.functions import Length, Substr

from .hosts import MAX_CRAWL_DELAY, effective_delay
from .models import ROBOTS_CRAWLABLE, TERMINAL, Host, Job, RobotsState, Status

HOSTS_PER_PAGE = 50
RECENT_JOBS = 20
MAX_QUERY = 300  # a key is at most 300 characters: a longer search matches nothing anyway

# ?state= on the hosts page: value -> label.
STATES = {
    "all": "All",
    "backing-off": "Backing off",
    "paused": "Paused",
    "active": "With queued jobs",
    "robots-waiting": "Waiting for robots.txt",
}
# robots.txt states in which a host's queued jobs wait (ROBOTS_TXT=obey): not known yet, or unreachable.
ROBOTS_WAITING = (RobotsState.UNKNOWN, RobotsState.UNREACHABLE)
# The host page shows this many characters of a robots.txt (which may hold 500 KiB).
ROBOTS_FILE_SHOWN = 20_000

# What the hosts pages call each robots.txt state.
ROBOTS_WORDS: dict[str, str] = {
    RobotsState.UNKNOWN.value: "not fetched yet",
    RobotsState.ALLOWED.value: "rules in force",
    RobotsState.UNAVAILABLE.value: "unavailable (4xx): all allowed",
    RobotsState.UNREACHABLE.value: "unreachable: nothing allowed",
}

# The columns a recent-jobs row shows: payload, progress and result can each be tens of kilobytes.
RECENT_JOB_FIELDS = ("id", "url", "status", "priority", "attempt", "started_at", "finished_at", "updated_at")


def seconds_text(value: float) -> str:
    """Seconds as a person writes them: 1, 2.5, 0.25, 86400."""
    return f"{value:g}"


@dataclass(frozen=True)
class JobCounts:
    queued: int = 0
    running: int = 0
    finished: int = 0  # succeeded, failed, cancelled or disallowed
    disallowed: int = 0  # ended because robots.txt disallows their URL


@dataclass(frozen=True)
class HostRow:
    """A host as an operator reads it: its settings made effective, its state relative to `at`, its jobs."""

    host: Host
    counts: JobCounts
    at: datetime
    default_delay: float = field(default_factory=lambda: settings.HOST_DELAY)
    default_concurrency: int = field(default_factory=lambda: settings.HOST_CONCURRENCY)
    robots_obeyed: bool = field(default_factory=lambda: settings.ROBOTS_TXT == "obey")

    @property
    def key(self) -> str:
        return self.host.key

    @property
    def configured_delay(self) -> float:
        """The host's own delay, or HOST_DELAY when it has none."""
        return self.default_delay if self.host.delay is None else self.host.delay

    @property
    def delay_is_default(self) -> bool:
        return self.host.delay is None

    @property
    def delay(self) -> float:
        """Seconds between two starts, as the claim applies them (robots' Crawl-delay when larger, capped)."""
        return effective_delay(delay=self.host.delay, crawl_delay=self.host.crawl_delay, default=self.default_delay)

    @property
    def delay_text(self) -> str:
        return seconds_text(self.delay)

    @property
    def configured_delay_text(self) -> str:
        return seconds_text(self.configured_delay)

    @property
    def default_delay_text(self) -> str:
        return seconds_text(self.default_delay)

    @property
    def crawl_delay_text(self) -> str:
        return "" if self.host.crawl_delay is None else seconds_text(self.host.crawl_delay)

    @property
    def crawl_delay_applies(self) -> bool:
        """The robots.txt Crawl-delay is what sets the delay (it is longer than the configured one)."""
        return self.delay > self.configured_delay

    @property
    def crawl_delay_capped(self) -> bool:
        return (self.host.crawl_delay or 0.0) > MAX_CRAWL_DELAY

    @property
    def concurrency(self) -> int:
        return self.default_concurrency if self.host.concurrency is None else self.host.concurrency

    @property
    def concurrency_is_default(self) -> bool:
        return self.host.concurrency is None

    @property
    def backing_off(self) -> bool:
        return self.host.backoff_until is not None and self.host.backoff_until > self.at

    @property
    def backoff_seconds(self) -> float:
        """Seconds the back-off still holds the host (0 when none)."""
        if self.host.backoff_until is None:
            return 0.0
        return max(0.0, (self.host.backoff_until - self.at).total_seconds())

    @property
    def ready(self) -> bool:
        """No wait (delay or back-off) holds the host's next start back."""
        return self.host.ready_at <= self.at

    @property
    def wait_seconds(self) -> float:
        """Seconds until the host may start a job again (0 when ready)."""
        return max(0.0, (self.host.ready_at - self.at).total_seconds())

    @property
    def busy(self) -> bool:
        """As many jobs run as its concurrency allows: the next start waits for one to end."""
        return self.counts.running >= self.concurrency

    # --- robots.txt ----------------------------------------------------------------------

    @property
    def robots_code(self) -> str:
        """The robots.txt state as data-robots shows it: a RobotsState value, or "ignored" (ROBOTS_TXT=ignore)."""
        return self.host.robots_state if self.robots_obeyed else "ignored"

    @property
    def robots_words(self) -> str:
        """The robots.txt state in words (without the next try of an unreachable one: the template adds it)."""
        if not self.robots_obeyed:
            return "ignored"
        state = str(self.host.robots_state)
        return ROBOTS_WORDS.get(state, state)

    @property
    def robots_fetching(self) -> bool:
        """A crawler has been asked for the file and may still answer."""
        return self.host.robots_lease_until is not None and self.host.robots_lease_until > self.at

    @property
    def robots_unreachable(self) -> bool:
        return self.robots_obeyed and self.host.robots_state == RobotsState.UNREACHABLE

    @property
    def robots_waiting(self) -> bool:
        """Its jobs may not start for want of robots.txt (not known yet, or unreachable)."""
        return self.robots_obeyed and self.host.robots_state in ROBOTS_WAITING

    @property
    def robots_kept_rules(self) -> bool:
        """The last fetches failed, and the host keeps the answer it had before (for 30 days)."""
        return self.host.robots_state in ROBOTS_CRAWLABLE and self.host.robots_failures > 0

    @property
    def robots_due_seconds(self) -> float:
        """Seconds until robots.txt is asked for again (0: due now, or never fetched)."""
        if self.host.robots_due_at is None:
            return 0.0
        return max(0.0, (self.host.robots_due_at - self.at).total_seconds())


@dataclass(frozen=True)
class HostPage:
    rows: list[HostRow]
    page: Page
    query: str
    state: str
    at: datetime


def _has_queued() -> Case:
    """True when the host has a queued job: probed only for `active` hosts (every queued job marks its host active)."""
    queued = Job.objects.queued().filter(host_id=OuterRef("pk"))
    return Case(When(active=True, then=Exists(queued)), default=Value(False), output_field=BooleanField())


def _filtered(*, query: str, state: str, at: datetime) -> QuerySet[Host]:
    hosts = Host.objects.defer("robots_txt").annotate(has_queued=_has_queued())
    if query:
        hosts = hosts.filter(key__contains=query.lower())  # keys are stored lowercased
    if state == "backing-off":
        hosts = hosts.filter(backoff_until__gt=at)
    elif state == "paused":
        hosts = hosts.filter(paused=True)
    elif state == "active":
        hosts = hosts.filter(has_queued=True)
    elif state == "robots-waiting":
        if settings.ROBOTS_TXT != "obey":
            return hosts.none()  # robots.txt ignored: no job waits for it
        hosts = hosts.filter(has_queued=True, robots_state__in=ROBOTS_WAITING)
    return hosts


def job_counts(host_ids: list[int]) -> dict[int, JobCounts]:
    """Queued, running, finished and disallowed jobs of each host, in ONE grouped query over the host_id index."""
    if not host_ids:
        return {}
    tally: dict[int, dict[str, int]] = {host_id: {} for host_id in host_ids}
    rows = (
        Job.objects.filter(host_id__in=host_ids)
        .order_by()
        .values_list("host_id", "status")
        .annotate(n=Count("*"))
        .values_list("host_id", "status", "n")
    )
    for host_id, status, n in rows:
        tally[host_id][status] = n
    return {
        host_id: JobCounts(
            queued=by_status.get(Status.QUEUED, 0),
            running=by_status.get(Status.RUNNING, 0),
            finished=sum(by_status.get(status, 0) for status in TERMINAL),
            disallowed=by_status.get(Status.DISALLOWED, 0),
        )
        for host_id, by_status in tally.items()
    }


def host_page(*, query: str = "", state: str = "all", page: int | str | None = 1, at: datetime) -> HostPage:
    """One page of hosts, those with queued jobs first, then by key; three queries whatever the numbers.

    The paginator counts the filtered hosts; the page's rows are read; their
    jobs are counted in one grouped query (job_counts). Sorting by "has queued
    jobs" probes the job_host_queue index once per active host (about 8 ms for
    10,000 active hosts on PostgreSQL): the `active` flag alone can stay set
    after the last queued job of a paused or waiting host is cancelled.
    """
    state = state if state in STATES else "all"
    query = query.strip()[:MAX_QUERY]
    hosts = _filtered(query=query, state=state, at=at).order_by("-has_queued", "key")
    current = Paginator(hosts, HOSTS_PER_PAGE).get_page(page)
    listed = list(current.object_list)
    counts = job_counts([host.pk for host in listed])
    rows = [HostRow(host=host, counts=counts.get(host.pk, JobCounts()), at=at) for host in listed]
    return HostPage(rows=rows, page=current, query=query, state=state, at=at)


@dataclass(frozen=True)
class RobotsFile:
    """The start of a host's robots.txt as the page shows it."""

    text: str  # at most ROBOTS_FILE_SHOWN characters
    length: int  # characters in the whole file

    @property
    def cut(self) -> bool:
        return self.length > len(self.text)

    @property
    def length_text(self) -> str:
        return f"{self.length:,}"

    @property
    def shown_text(self) -> str:
        return f"{len(self.text):,}"


@dataclass(frozen=True)
class HostDetail:
    row: HostRow
    recent_jobs: list[Job]
    robots_file: RobotsFile | None = None  # None when not asked for (the live part never shows it)


def host_detail(*, key: str, at: datetime, with_robots_file: bool = False) -> HostDetail:
    """One host, its job counts and its RECENT_JOBS latest jobs, in three queries; raises Host.DoesNotExist.

    With `with_robots_file`, the host's query also brings the first
    ROBOTS_FILE_SHOWN characters of its robots.txt and the file's length,
    never the whole file.
    """
    hosts = Host.objects.defer("robots_txt")
    if with_robots_file:
        hosts = hosts.annotate(
            robots_head=Substr("robots_txt", 1, ROBOTS_FILE_SHOWN), robots_length=Length("robots_txt")
        )
    host = hosts.get(key=key)
    counts = job_counts([host.pk])[host.pk]
    recent = list(Job.objects.filter(host_id=host.pk).only(*RECENT_JOB_FIELDS).order_by("-id")[:RECENT_JOBS])
    robots_file = (
        RobotsFile(text=host.robots_head or "", length=host.robots_length or 0)  # type: ignore[attr-defined]
        if with_robots_file
        else None
    )
    return HostDetail(row=HostRow(host=host, counts=counts, at=at), recent_jobs=recent, robots_file=robots_file)
