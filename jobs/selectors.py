"""Read-side questions the web pages and the JSON API ask: dashboard figures, job pages, sessions, crawlers.

Every function here only reads, in a fixed and small number of queries, each
backed by an index at a million jobs (see the comments): pages poll them every
two seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.db import connection
from django.db.models import Count, Q, QuerySet, TextField
from django.db.models.functions import Cast, TruncMinute

from .forms import parse_id
from .models import TERMINAL, BusNode, BusSession, Crawler, EventKind, Job, JobEvent, JobItems, SessionState, Status

SESSION_WINDOW = timedelta(hours=1)  # closed and lost sessions stay on the dashboard this long
MAX_SESSIONS = 200
REQUEUE_WINDOW = timedelta(hours=24)
RECENT_REQUEUES = 10
THROUGHPUT_MINUTES = 60
MAX_CRAWLERS = 2000  # the crawlers page and `manage.py crawlers list` show at most this many
FINISHED_WINDOW = timedelta(hours=1)  # "jobs finished in the last hour" per crawler
MAX_EVENTS = 200  # a job's timeline on its page: the latest ones; the admin pages through the rest

# The list reads only these columns: payload, progress and result can each be
# tens of kilobytes of JSON that a list never shows.
LIST_FIELDS = (
    "id",
    "url",
    "status",
    "priority",
    "kind",
    "attempt",
    "interruptions",
    "failures",
    "lease_session",
    "started_at",
    "finished_at",
    "updated_at",
    "created_at",
)


# --- Bus sessions ----------------------------------------------------------------


@dataclass
class SessionRow:
    """A bus session as an operator reads it."""

    session: UUID
    node: str
    endpoint: str
    crawler: str
    state: str  # the stored state: connected, lost, closed
    display_state: str  # connected, lost, closed, or reconnecting (newest of its endpoint, none connected)
    slots: int
    slots_in_use: int
    connected_at: datetime
    last_heartbeat_at: datetime | None
    closed_at: datetime | None
    close_reason: str
    heartbeat_age: float | None  # seconds since the last heartbeat (or the connection) while connected
    heartbeat_level: str  # "ok", "late" (past HEARTBEAT_TIMEOUT), "overdue" (past 2x), "" when not connected

    @property
    def is_live(self) -> bool:
        """Connected, and heard from within 2 x HEARTBEAT_TIMEOUT: a crawler that is really there."""
        return self.state == SessionState.CONNECTED and self.heartbeat_level != "overdue"


def heartbeat_level(age: float) -> str:
    timeout = settings.HEARTBEAT_TIMEOUT
    if age > 2 * timeout:
        return "overdue"
    if age > timeout:
        return "late"
    return "ok"


def recent_sessions(*, at: datetime) -> list[SessionRow]:
    """Connected sessions, and those that closed or were lost within the last hour (two queries)."""
    since = at - SESSION_WINDOW
    rows = list(
        BusSession.objects.filter(
            Q(state=SessionState.CONNECTED)
            | Q(closed_at__gte=since)
            | Q(closed_at__isnull=True, connected_at__gte=since)
        ).order_by("endpoint", "-connected_at")[:MAX_SESSIONS]
    )
    in_use = slots_in_use([row.session for row in rows])
    connected_endpoints = {row.endpoint for row in rows if row.state == SessionState.CONNECTED}
    newest_seen: set[str] = set()
    sessions = []
    for row in rows:
        display = row.state
        if row.endpoint not in newest_seen:
            newest_seen.add(row.endpoint)
            if row.state != SessionState.CONNECTED and row.endpoint not in connected_endpoints:
                # The bus keeps reconnecting to an endpoint whose session ended.
                display = "reconnecting"
        age = heartbeat_age(row, at)
        level = heartbeat_level(age) if age is not None else None
        sessions.append(
            SessionRow(
                session=row.session,
                node=row.node,
                endpoint=row.endpoint,
                crawler=row.crawler,
                state=row.state,
                display_state=display,
                slots=row.slots,
                slots_in_use=in_use.get(row.session, 0),
                connected_at=row.connected_at,
                last_heartbeat_at=row.last_heartbeat_at,
                closed_at=row.closed_at,
                close_reason=row.close_reason,
                heartbeat_age=age,
                heartbeat_level=level or "",
            )
        )
    return sessions


def slots_in_use(sessions: list[UUID]) -> dict[UUID, int]:
    """Running jobs leased to each session: one GROUP BY on the job_running_session index."""
    if not sessions:
        return {}
    return dict(
        Job.objects.running()
        .filter(lease_session__in=sessions)
        .order_by()
        .values_list("lease_session")
        .annotate(n=Count("id"))
    )


def session_of(job: Job) -> BusSession | None:
    if job.lease_session is None:
        return None
    return BusSession.objects.filter(session=job.lease_session).first()


# --- Crawlers --------------------------------------------------------------------


@dataclass
class CrawlerStatus:
    """A registered crawler as an operator reads it: its registry row, its session and its work."""

    endpoint: str
    label: str
    state: str  # active, draining, paused
    remove_when_drained: bool
    source: str
    owner: str  # the owning bus node, "" when none
    owner_live: bool  # the owner's node lease has not expired
    session: UUID | None
    session_state: str  # of its BusSession: connected, closed, lost; "" without one
    heartbeat_age: float | None  # seconds since the session's last heartbeat, while connected
    heartbeat_level: str  # "ok", "late", "overdue"; "" when not connected
    slots: int
    slots_in_use: int  # running jobs whose attempt was given to this crawler
    finished_last_hour: int
    last_seen_at: datetime | None
    last_error: str

    def as_json(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "label": self.label,
            "state": self.state,
            "remove_when_drained": self.remove_when_drained,
            "source": self.source,
            "owner": self.owner,
            "owner_live": self.owner_live,
            "session": str(self.session) if self.session else None,
            "session_state": self.session_state,
            "heartbeat_age": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
            "slots": self.slots,
            "slots_in_use": self.slots_in_use,
            "finished_last_hour": self.finished_last_hour,
            "last_seen_at": self.last_seen_at.isoformat() if self.last_seen_at else None,
            "last_error": self.last_error,
        }


@dataclass
class FleetStatus:
    crawlers: list[CrawlerStatus]
    cut: bool  # more than MAX_CRAWLERS are registered: the first ones by endpoint are listed


def heartbeat_age(session: BusSession, at: datetime) -> float | None:
    """Seconds since an open session's last heartbeat (its connection until the first); None once it is closed."""
    if session.state != SessionState.CONNECTED:
        return None
    return max(0.0, (at - (session.last_heartbeat_at or session.connected_at)).total_seconds())


def fleet_status(*, at: datetime, limit: int = MAX_CRAWLERS) -> FleetStatus:
    """Every registered crawler (up to `limit`), by endpoint, in five queries whatever their number.

    The crawlers; the nodes that own them; their sessions; running jobs per
    crawler (a GROUP BY over the running jobs, on the job_status_id index); and
    jobs finished in the last hour per crawler (the job_crawler_finished index).
    """
    registered = list(Crawler.objects.order_by("endpoint")[: limit + 1])
    cut = len(registered) > limit
    registered = registered[:limit]
    if not registered:
        return FleetStatus(crawlers=[], cut=False)
    endpoints = [crawler.endpoint for crawler in registered]
    owners = {crawler.owner for crawler in registered if crawler.owner}
    live_nodes = set(
        BusNode.objects.filter(node__in=owners, lease_expires_at__gte=at).values_list("node", flat=True)
        if owners
        else []
    )
    session_ids = [crawler.session for crawler in registered if crawler.session]
    sessions = {row.session: row for row in BusSession.objects.filter(session__in=session_ids)} if session_ids else {}
    running = dict(
        Job.objects.running().filter(crawler__in=endpoints).order_by().values_list("crawler").annotate(n=Count("id"))
    )
    finished = dict(
        Job.objects.filter(crawler__in=endpoints, finished_at__gte=at - FINISHED_WINDOW)
        .order_by()
        .values_list("crawler")
        .annotate(n=Count("id"))
    )
    rows = []
    for crawler in registered:
        session = sessions.get(crawler.session) if crawler.session else None
        age = heartbeat_age(session, at) if session is not None else None
        rows.append(
            CrawlerStatus(
                endpoint=crawler.endpoint,
                label=crawler.label,
                state=crawler.state,
                remove_when_drained=crawler.remove_when_drained,
                source=crawler.source,
                owner=crawler.owner,
                owner_live=crawler.owner in live_nodes,
                session=crawler.session,
                session_state=session.state if session else "",
                heartbeat_age=age,
                heartbeat_level=heartbeat_level(age) if age is not None else "",
                slots=crawler.slots,
                slots_in_use=running.get(crawler.endpoint, 0),
                finished_last_hour=finished.get(crawler.endpoint, 0),
                last_seen_at=crawler.last_seen_at,
                last_error=crawler.last_error,
            )
        )
    return FleetStatus(crawlers=rows, cut=cut)


# --- Dashboard -------------------------------------------------------------------


@dataclass
class ThroughputBar:
    minute: datetime
    succeeded: int
    failed: int  # failed or cancelled

    @property
    def total(self) -> int:
        return self.succeeded + self.failed


@dataclass
class Dashboard:
    at: datetime
    status_counts: dict[str, int]
    sessions: list[SessionRow]
    finished_last_minute: int
    finished_last_hour: int
    throughput: list[ThroughputBar]
    requeues: list[JobEvent]
    oldest_running: Job | None
    waiting_kinds: list[WaitingKind] = field(default_factory=list)
    heartbeat_timeout: float = field(default_factory=lambda: settings.HEARTBEAT_TIMEOUT)

    @property
    def total_jobs(self) -> int:
        return sum(self.status_counts.values())

    @property
    def oldest_running_age(self) -> float | None:
        if self.oldest_running is None or self.oldest_running.started_at is None:
            return None
        return max(0.0, (self.at - self.oldest_running.started_at).total_seconds())

    @property
    def heartbeat_overdue_after(self) -> float:
        return 2 * self.heartbeat_timeout

    @property
    def connected_sessions(self) -> int:
        return sum(1 for row in self.sessions if row.state == SessionState.CONNECTED)


def _finished_events(since: datetime) -> QuerySet:
    # A job finishes when an event takes it to a terminal status (outcome,
    # cancel, poison interrupt). Events have an index on `at`; jobs have none
    # on finished_at, so counting jobs would scan the whole table.
    return JobEvent.objects.filter(at__gte=since, to_status__in=TERMINAL).order_by()


def throughput(*, at: datetime, minutes: int = THROUGHPUT_MINUTES) -> list[ThroughputBar]:
    """Jobs finished per minute over the last `minutes` minutes, oldest first, empty minutes included.

    One GROUP BY on TruncMinute, which Django implements for SQLite and PostgreSQL alike.
    """
    current = at.replace(second=0, microsecond=0)
    start = current - timedelta(minutes=minutes - 1)
    counts: dict[tuple[datetime, bool], int] = {}
    rows = (
        _finished_events(start)
        .annotate(minute=TruncMinute("at"))
        .values_list("minute", "to_status")
        .annotate(n=Count("id"))
    )
    for minute, to_status, n in rows:
        key = (minute, to_status == Status.SUCCEEDED)
        counts[key] = counts.get(key, 0) + n
    bars = []
    for step in range(minutes):
        minute = start + timedelta(minutes=step)
        bars.append(
            ThroughputBar(minute=minute, succeeded=counts.get((minute, True), 0), failed=counts.get((minute, False), 0))
        )
    return bars


@dataclass(frozen=True)
class WaitingKind:
    """Queued jobs of a kind that no connected crawler takes: they wait for one, they have not failed."""

    kind: str
    jobs: int


def waiting_kinds() -> list[WaitingKind]:
    """The kinds of queued jobs that no connected session takes, with their counts (at most two queries).

    A session without kinds (BusSession.kinds null) takes every kind, and
    jobs without a kind go to any crawler: neither ever waits here. The
    count is one GROUP BY over the queued jobs (job_kind_queue, index-only),
    whatever the table's size.
    """
    taken: set[str] = set()
    for kinds in BusSession.objects.filter(state=SessionState.CONNECTED).values_list("kinds", flat=True).distinct():
        if kinds is None:
            return []  # a crawler that takes every kind is connected
        taken.update(kind for kind in kinds if isinstance(kind, str))
    rows = (
        Job.objects.filter(status=Status.QUEUED)
        .exclude(kind="")
        .exclude(kind__in=sorted(taken))
        .order_by()
        .values("kind")
        .annotate(n=Count("id"))
        .values_list("kind", "n")
    )
    return sorted((WaitingKind(kind=kind, jobs=n) for kind, n in rows), key=lambda row: (-row.jobs, row.kind))


MAX_KINDS_LISTED = 100


def queued_kinds(limit: int = MAX_KINDS_LISTED) -> list[str]:
    """The distinct non-empty kinds of queued jobs, in order, at most `limit`.

    A skip scan over job_kind_queue (one index probe per kind found), not a
    DISTINCT over every queued job: there may be millions of them.
    """
    table = connection.ops.quote_name(Job._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH RECURSIVE found(kind, n) AS (
                SELECT (SELECT min(kind) FROM {table} WHERE status = 'queued' AND kind > ''), 1
                UNION ALL
                SELECT (SELECT min(kind) FROM {table} WHERE status = 'queued' AND kind > found.kind), found.n + 1
                FROM found WHERE found.kind IS NOT NULL AND found.n < %s
            )
            SELECT kind FROM found WHERE kind IS NOT NULL
            """,
            [limit],
        )
        return [row[0] for row in cursor.fetchall()]


def dashboard(*, at: datetime) -> Dashboard:
    """Everything the dashboard shows, in nine queries whatever the number of jobs and sessions."""
    finished = _finished_events(at - timedelta(hours=1)).aggregate(
        hour=Count("id"), minute=Count("id", filter=Q(at__gte=at - timedelta(minutes=1)))
    )
    requeues = list(
        JobEvent.objects.filter(kind=EventKind.INTERRUPT, at__gte=at - REQUEUE_WINDOW)
        .select_related("job")
        .only(
            "id",
            "at",
            "reason",
            "actor",
            "session",
            "attempt",
            "to_status",
            "job__id",
            "job__url",
            "job__status",
        )
        .order_by("-at", "-id")[:RECENT_REQUEUES]
    )
    oldest = (
        Job.objects.running()
        .filter(started_at__isnull=False)
        .order_by("started_at")
        .only("id", "url", "started_at", "lease_session")
        .first()
    )
    return Dashboard(
        at=at,
        status_counts=Job.objects.status_counts(),  # one GROUP BY over the table: the page's one scan
        sessions=recent_sessions(at=at),
        finished_last_minute=finished["minute"],
        finished_last_hour=finished["hour"],
        throughput=throughput(at=at),
        requeues=requeues,
        oldest_running=oldest,
        waiting_kinds=waiting_kinds(),
    )


def health(*, at: datetime) -> dict:
    """What /health reports (without the database check, which the view does)."""
    sessions = recent_sessions(at=at)
    oldest = (
        Job.objects.running()
        .filter(started_at__isnull=False)
        .order_by("started_at")
        .values_list("started_at", flat=True)
        .first()
    )
    return {
        "sessions": [
            {
                "session": str(row.session),
                "endpoint": row.endpoint,
                "crawler": row.crawler,
                "state": row.display_state,
                "last_heartbeat_age": None if row.heartbeat_age is None else round(row.heartbeat_age, 3),
            }
            for row in sessions
        ],
        "live_sessions": sum(1 for row in sessions if row.is_live),
        "oldest_running_age": None if oldest is None else round(max(0.0, (at - oldest).total_seconds()), 3),
    }


# --- The job list ----------------------------------------------------------------

# Each order ends with id, so (values..., id) is a unique keyset cursor.
# "id" is index-backed with or without a status filter (pk, job_status_id);
# "priority" is the claim order, index-backed for queued jobs (job_claim_order);
# "updated" sorts the (filtered) table, fine for small statuses, slower for all.
SORTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "id": (("id", True),),
    "priority": (("priority", True), ("id", False)),
    "updated": (("updated_at", True), ("id", True)),
}
DEFAULT_SORT = "id"


def search_jobs(
    queryset: QuerySet, *, status: str | None = None, url: str | None = None, kind: str | None = None
) -> QuerySet:
    """Filter by status, by kind (exactly; "" is no filter) and by URL.

    The URL term matches anywhere (icontains): no index helps, but with the
    keyset's LIMIT the database stops scanning once a page is full, so common
    terms are fast and rare ones read further. "#123" or "123" also match the id.
    """
    if status:
        queryset = queryset.filter(status=status)
    if kind:
        queryset = queryset.filter(kind=kind)
    term = (url or "").strip()
    if term:
        job_id = parse_id(term.removeprefix("#"))
        if job_id is not None:
            queryset = queryset.filter(Q(pk=job_id) | Q(url__icontains=term))
        else:
            queryset = queryset.filter(url__icontains=term)
    return queryset


def _order_by(order: tuple[tuple[str, bool], ...], *, reverse: bool = False) -> list[str]:
    return [("-" if descending != reverse else "") + name for name, descending in order]


def _past(order: tuple[tuple[str, bool], ...], values: dict, *, reverse: bool = False) -> Q:
    """Rows that come after `values` in `order` (before them with reverse=True)."""
    condition = Q()
    equal = Q()
    for name, descending in order:
        lookup = "lt" if descending != reverse else "gt"
        condition |= equal & Q(**{f"{name}__{lookup}": values[name]})
        equal &= Q(**{name: values[name]})
    return condition


@dataclass
class JobPage:
    jobs: list[Job]
    sort: str
    next_cursor: int | None  # ?before=: the page after this one
    previous_cursor: int | None  # ?after=: the page before this one


def job_page(
    *,
    status: str | None = None,
    url: str | None = None,
    kind: str | None = None,
    sort: str = DEFAULT_SORT,
    before: int | None = None,
    after: int | None = None,
    limit: int = 50,
) -> JobPage:
    """One page of jobs by keyset: `before=X` lists the rows after job X in this order, `after=X` those before it.

    Newest first (the default), `before` means smaller ids, as in the API. No
    COUNT(*): the page reads limit + 1 rows to know whether another follows.
    """
    order = SORTS.get(sort) or SORTS[DEFAULT_SORT]
    sort = sort if sort in SORTS else DEFAULT_SORT
    queryset = search_jobs(Job.objects.only(*LIST_FIELDS), status=status, url=url, kind=kind)
    cursor_id = before if before is not None else after
    backwards = before is None and after is not None
    if cursor_id is not None:
        names = [name for name, _ in order]
        values: dict[str, Any] | None
        if names == ["id"]:
            values = {"id": cursor_id}
        else:
            values = Job.objects.filter(pk=cursor_id).values(*names).first()
        if values is not None:
            queryset = queryset.filter(_past(order, values, reverse=backwards))
        else:
            cursor_id = None
            backwards = False
    rows = list(queryset.order_by(*_order_by(order, reverse=backwards))[: limit + 1])
    more = len(rows) > limit
    rows = rows[:limit]
    if backwards and not rows:  # nothing precedes the cursor: show the first page
        return job_page(status=status, url=url, kind=kind, sort=sort, limit=limit)
    if backwards:
        rows.reverse()
        next_cursor = rows[-1].pk
        previous_cursor = rows[0].pk if more else None
    else:
        next_cursor = rows[-1].pk if rows and more else None
        previous_cursor = rows[0].pk if rows and cursor_id is not None else None
    return JobPage(jobs=rows, sort=sort, next_cursor=next_cursor, previous_cursor=previous_cursor)


# --- One job, whatever its JSON holds --------------------------------------------

JSON_FIELDS = ("payload", "progress", "result")
# Python refuses int() of a decimal text past 4,300 digits (sys.get_int_max_str_digits)
# and then str() of such an int: a number that long is shown as its digits, as text.
MAX_INT_DIGITS = 4000


def _int_or_digits(text: str) -> int | str:
    return int(text) if len(text) <= MAX_INT_DIGITS else text


def stored_json(text: str | None):
    """A JSON column's stored text as Python values that every page can print.

    Django's own decoding raises on a number of more than 4,300 digits or a
    nesting deeper than Python's recursion limit, and makes NaN and Infinity
    floats that JSON output cannot carry: this keeps huge numbers as their
    digits, those constants as text, and replaces what cannot be decoded with
    a note saying why, so a stored value can never make a page fail.
    """
    if text is None:
        return None
    try:
        return json.loads(text, parse_int=_int_or_digits, parse_constant=str)
    except RecursionError:
        return {"unreadable": "nested too deeply to show", "stored_characters": len(text)}
    except ValueError as exc:
        return {"unreadable": f"not valid JSON: {exc}", "stored_characters": len(text)}


def job_for_display(job_id: int) -> Job:
    """One job with its JSON fields decoded by stored_json, in one query; raises Job.DoesNotExist."""
    texts = {f"{name}_text": Cast(name, TextField()) for name in JSON_FIELDS}
    # Its stored items' count rides along (a join on their primary key), not their text.
    job = (
        Job.objects.select_related("host", "stored_items")
        .defer(*JSON_FIELDS, "stored_items__lines")
        .annotate(**texts)
        .get(pk=job_id)
    )
    for name in JSON_FIELDS:
        setattr(job, name, stored_json(getattr(job, f"{name}_text")))
    return job


@dataclass(frozen=True)
class StoredItems:
    """What the job page and the API say about a job's stored items (docs/protocol.md section 17)."""

    count: int
    truncated: bool
    attempt: int


def stored_items_of(job: Job) -> StoredItems | None:
    """A job's stored items without their text, or None when it has none (no query for job_for_display's jobs)."""
    try:
        row = job.stored_items
    except JobItems.DoesNotExist:
        return None
    return StoredItems(count=row.count, truncated=row.truncated, attempt=row.attempt)


def stored_items_text(job_id: int) -> str | None:
    """The job's stored items as JSON Lines, or None when it has none."""
    return JobItems.objects.filter(job_id=job_id).values_list("lines", flat=True).first()


def job_with_events(job_id: int) -> tuple[Job, list[JobEvent], bool]:
    """A job and its timeline, oldest event first (at most MAX_EVENTS; the flag says if cut)."""
    job = job_for_display(job_id)
    events = list(job.events.order_by("-id")[: MAX_EVENTS + 1])
    cut = len(events) > MAX_EVENTS
    events = events[:MAX_EVENTS]
    events.reverse()
    return job, events, cut
