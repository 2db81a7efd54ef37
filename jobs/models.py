"""Job state and its audit trail.

Only jobs/services.py changes a job's status; this module declares the state,
the invariants the database enforces, and the read-side questions
(`Job.objects.running()`, `.leased_to(session)`, `.lease_expired(at)`).
"""

from __future__ import annotations

from django.db import models
from django.db.models import Q
from django.db.models.functions import Greatest
from django.urls import reverse

from .hosts import long_ago


class Status(models.TextChoices):
    QUEUED = "queued", "Queued"
    RUNNING = "running", "Running"
    SUCCEEDED = "succeeded", "Succeeded"
    FAILED = "failed", "Failed"
    CANCELLED = "cancelled", "Cancelled"
    DISALLOWED = "disallowed", "Disallowed by robots.txt"


TERMINAL = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED, Status.DISALLOWED)


class JobQuerySet(models.QuerySet):
    def queued(self):
        return self.filter(status=Status.QUEUED)

    def running(self):
        return self.filter(status=Status.RUNNING)

    def claimable(self, now):
        return self.queued().filter(Q(run_after__isnull=True) | Q(run_after__lte=now))

    def leased_to(self, session):
        return self.running().filter(lease_session=session)

    def lease_expired(self, at):
        return self.running().filter(lease_expires_at__lt=at)

    def terminal(self):
        return self.filter(status__in=TERMINAL)

    def status_counts(self) -> dict[str, int]:
        """How many jobs are in each status, every status listed (zeros included)."""
        counts = dict(self.order_by().values_list("status").annotate(n=models.Count("id")))
        return {status: counts.get(status, 0) for status in Status.values}


class Job(models.Model):
    url = models.URLField(max_length=2048)
    # The politeness unit the URL belongs to (jobs.hosts.host_key), set at enqueue.
    host = models.ForeignKey(
        "Host",
        on_delete=models.PROTECT,
        related_name="jobs",
        null=True,
        blank=True,
        db_constraint=False,
        db_index=False,  # job_host_status serves "jobs of host H" and counts them per status
    )
    payload = models.JSONField(default=dict, blank=True)
    # Which crawlers may run it (ready.kinds, docs/protocol.md section 16); empty: any crawler.
    kind = models.CharField(
        max_length=100, blank=True, default="", db_default="", help_text="Empty: any crawler takes it."
    )
    priority = models.IntegerField(default=0, help_text="Higher runs first.")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.QUEUED)

    # attempt is the fencing token of PROTOCOL.md: +1 on every assignment.
    attempt = models.PositiveIntegerField(default=0)
    max_attempts = models.PositiveIntegerField(default=5)
    # Retryable failures so far; a retryable `failed` requeues while
    # failures < max_attempts. Interruptions have their own budget.
    failures = models.PositiveIntegerField(default=0)
    # Times the job went back to the queue because its host said "slow down"
    # (429, 503, unreachable): no attempt spent, but bounded (HOST_BACKOFF_JOB_LIMIT).
    backoffs = models.PositiveIntegerField(default=0, db_default=0)
    interruptions = models.PositiveIntegerField(default=0)
    max_interruptions = models.PositiveIntegerField(default=3)
    # The attempt whose outcome (done/failed) was last recorded: tells a resend
    # of a recorded outcome (rule 2) from a late one for a requeued job (rule 3).
    outcome_attempt = models.PositiveIntegerField(null=True, blank=True)

    # The crawler endpoint the latest attempt was assigned to (kept after the
    # lease ends): only that crawler may record the attempt's outcome.
    crawler = models.CharField(max_length=500, blank=True, default="", db_default="")
    # The session the latest attempt was claimed by (a re-lease keeps it): a
    # session of the same crawler older than it never speaks for the attempt.
    attempt_session = models.UUIDField(null=True, blank=True)
    # A suspected poison job: it reached max_interruptions but was never alone
    # in a session that died, so it runs alone once before any verdict.
    run_alone = models.BooleanField(default=False, db_default=False)

    # The lease: which bus session holds the running job, and until when.
    lease_session = models.UUIDField(null=True, blank=True)
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    run_after = models.DateTimeField(null=True, blank=True, help_text="Not claimable before this time.")

    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    progress = models.JSONField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    error = models.TextField(blank=True, default="")

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-id"]
        indexes = [
            # "Next queued jobs by priority": an index scan in claim order.
            models.Index(fields=["-priority", "id"], condition=Q(status="queued"), name="job_claim_order"),
            # The claim's "best queued jobs of host H" and "is anything of H still queued".
            models.Index(fields=["host", "-priority", "id"], condition=Q(status="queued"), name="job_host_queue"),
            # The hosts pages' counts per status: an index-only scan, whatever the host's size.
            models.Index(fields=["host", "status"], name="job_host_status"),
            # A session that names its kinds: "has host H a queued job of kind K" (one probe per kind),
            # and the dashboard's queued jobs per kind (an index-only scan).
            models.Index(fields=["kind", "host"], condition=Q(status="queued"), name="job_kind_queue"),
            # "How many jobs of host H are in flight" (the concurrency limit).
            models.Index(fields=["host"], condition=Q(status="running"), name="job_host_running"),
            # Suspects waiting to run alone, taken first by a session that holds nothing.
            models.Index(
                fields=["-priority", "id"], condition=Q(status="queued", run_alone=True), name="job_run_alone_order"
            ),
            # "Running jobs of session S".
            models.Index(fields=["lease_session"], condition=Q(status="running"), name="job_running_session"),
            # The sweeper's "running jobs whose lease expired".
            models.Index(fields=["lease_expires_at"], condition=Q(status="running"), name="job_running_lease"),
            models.Index(fields=["status", "id"], name="job_status_id"),
            # The crawlers page's "jobs finished in the last hour" per crawler.
            models.Index(
                fields=["crawler", "finished_at"], condition=Q(finished_at__isnull=False), name="job_crawler_finished"
            ),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(status__in=Status.values), name="job_status_valid"),
            # A running job has a lease; no other job has one.
            models.CheckConstraint(
                condition=(
                    Q(status="running", lease_session__isnull=False, lease_expires_at__isnull=False)
                    | (~Q(status="running") & Q(lease_session__isnull=True, lease_expires_at__isnull=True))
                ),
                name="job_lease_iff_running",
            ),
            models.CheckConstraint(
                condition=Q(max_attempts__gte=1) & Q(max_interruptions__gte=1),
                name="job_limits_positive",
            ),
        ]

    def __str__(self) -> str:
        return f"Job {self.pk} {self.status} {self.url}"

    def save(self, *args, **kwargs):
        """A job saved through the ORM (not jobs.services.enqueue) gets its host too, and a queued one wakes it."""
        if self.host_id is None and self.url:
            from .hosts import HostKeyError, host_key

            try:
                key = host_key(self.url)
            except HostKeyError:
                key = "invalid"
            self.host, _ = Host.objects.get_or_create(key=key)
        super().save(*args, **kwargs)
        if self.status == Status.QUEUED and self.host_id is not None:
            Host.objects.filter(pk=self.host_id).update(
                active=True,
                top_priority=models.Case(
                    models.When(active=True, then=Greatest("top_priority", models.Value(self.priority))),
                    default=models.Value(self.priority),
                ),
            )

    def get_absolute_url(self) -> str:
        return reverse("jobs:detail", args=[self.pk])

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL


class JobItems(models.Model):
    """The items a crawler stored with a job's recorded `done` (docs/protocol.md section 17), as JSON Lines.

    One row per job, replaced when a later attempt records its own; capped
    by JOB_ITEMS_MAX items and the frame size, so no crawler grows it
    without bound.
    """

    job = models.OneToOneField(Job, on_delete=models.CASCADE, primary_key=True, related_name="stored_items")
    attempt = models.PositiveIntegerField()
    count = models.PositiveIntegerField()
    truncated = models.BooleanField(default=False, help_text="The crawler or the cap left items out.")
    lines = models.TextField(help_text="One JSON object per line.")
    recorded_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.count} items of job {self.job_id}"


class EventKind(models.TextChoices):
    ENQUEUE = "enqueue", "Enqueued"
    CLAIM = "claim", "Assigned"
    RELEASE = "re_lease", "Re-leased"
    OUTCOME = "outcome", "Outcome recorded"
    STALE = "stale", "Stale outcome"
    INTERRUPT = "interrupt", "Interrupted"
    RETRY = "retry", "Retried"
    CANCEL = "cancel", "Cancelled"
    ROBOTS = "robots", "Disallowed by robots.txt"


class JobEvent(models.Model):
    """One row per transition (and per stale outcome): a job's history."""

    # No database-level foreign key and no single-column index: every event is
    # written by the statement that changes its job, (job, id) already serves
    # lookups, and the per-row key checks at commit cost a third of a
    # 100,000-job reset (docs/benchmarks.md). Deletes still cascade via the ORM.
    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="events", db_constraint=False, db_index=False)
    at = models.DateTimeField()
    kind = models.CharField(max_length=16, choices=EventKind.choices)
    from_status = models.CharField(max_length=16, blank=True, default="")
    to_status = models.CharField(max_length=16, blank=True, default="")
    attempt = models.PositiveIntegerField(default=0)
    session = models.UUIDField(null=True, blank=True)
    actor = models.CharField(max_length=150)
    reason = models.TextField(blank=True, default="")

    class Meta:
        ordering = ["id"]
        indexes = [
            models.Index(fields=["job", "id"], name="jobevent_job_id"),
            models.Index(fields=["at"], name="jobevent_at"),
        ]
        constraints = [
            # At most one recorded outcome per attempt: a resend can never be
            # recorded twice, whatever the races.
            models.UniqueConstraint(
                fields=["job", "attempt"], condition=Q(kind="outcome"), name="jobevent_one_outcome_per_attempt"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.at:%Y-%m-%d %H:%M:%S} {self.kind} {self.from_status}->{self.to_status}"


class SessionState(models.TextChoices):
    CONNECTED = "connected", "Connected"
    CLOSED = "closed", "Closed"
    LOST = "lost", "Lost"


class BusSessionQuerySet(models.QuerySet["BusSession"]):
    def open(self) -> BusSessionQuerySet:
        return self.filter(state=SessionState.CONNECTED)


class BusSession(models.Model):
    """One row per bus connection to a crawler: who holds `Job.lease_session`.

    Written by the bus, read by pages served from any process, so that connection
    health is visible wherever the page is served. It lives in jobs (not bus) so
    that the pages read it without importing the bus; its table keeps the name
    it was created with, `bus_bussession`.
    """

    session = models.UUIDField(primary_key=True)
    node = models.CharField(max_length=200, help_text="The bus node id (host:pid unless BUS_NODE is set).")
    endpoint = models.CharField(max_length=500)
    crawler = models.CharField(max_length=200, blank=True, default="")
    state = models.CharField(max_length=16, choices=SessionState.choices, default=SessionState.CONNECTED)
    slots = models.PositiveIntegerField(default=0)
    # The job kinds the crawler takes (its ready.kinds); null: every kind.
    kinds = models.JSONField(null=True, blank=True)
    connected_at = models.DateTimeField()
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    close_reason = models.TextField(blank=True, default="")

    objects = BusSessionQuerySet.as_manager()

    class Meta:
        db_table = "bus_bussession"
        ordering = ["-connected_at"]
        indexes = [
            models.Index(fields=["state", "-connected_at"], name="bussession_state"),
            models.Index(fields=["node", "state"], name="bussession_node"),
        ]

    def __str__(self) -> str:
        return f"{self.crawler or 'crawler'} @ {self.endpoint} ({self.state})"


# --- Hosts: politeness, enforced by the claim ------------------------------------


class RobotsState(models.TextChoices):
    UNKNOWN = "unknown", "Not fetched yet"
    ALLOWED = "rules", "Rules in force"  # 2xx: the file's rules apply
    UNAVAILABLE = "unavailable", "Unavailable (4xx): all allowed"
    UNREACHABLE = "unreachable", "Unreachable (5xx, no answer): nothing allowed"


# With these, the claim may start the host's jobs (ROBOTS_TXT=obey).
ROBOTS_CRAWLABLE = (RobotsState.ALLOWED, RobotsState.UNAVAILABLE)


class Host(models.Model):
    """One politeness unit (a hostname, plus the port when not the default) and its dispatch state.

    The claim (jobs.dispatch) starts a job of a host only when the host is
    `active` (it may have queued jobs), not paused, `ready_at` has passed
    (the delay since the last start, and any back-off) and fewer than its
    concurrency are running. `delay` and `concurrency` left empty follow the
    HOST_DELAY and HOST_CONCURRENCY settings.
    """

    key = models.CharField(max_length=300, unique=True, help_text="hostname[:port], lowercased, IDNA-encoded")
    delay = models.FloatField(
        null=True, blank=True, help_text="Seconds between two starts; empty: the HOST_DELAY setting."
    )
    concurrency = models.PositiveIntegerField(
        null=True, blank=True, help_text="Most jobs running at once; empty: the HOST_CONCURRENCY setting."
    )
    crawl_delay = models.FloatField(null=True, blank=True, help_text="The Crawl-delay robots.txt asks for.")
    paused = models.BooleanField(default=False, help_text="No job of a paused host starts.")

    # Dispatch state, written by the claim and by back-offs.
    active = models.BooleanField(default=False, help_text="May have queued jobs (set whenever one is queued).")
    top_priority = models.IntegerField(default=0, help_text="The best priority among its queued jobs.")
    next_start_at = models.DateTimeField(null=True, blank=True, help_text="No job starts before this.")
    backoff_until = models.DateTimeField(null=True, blank=True)
    backoff_reason = models.CharField(max_length=500, blank=True, default="")
    errors = models.PositiveIntegerField(default=0, help_text="Connection errors in a row (exponential back-off).")
    # max(next_start_at, backoff_until): what the claim and the wake-up timer look at.
    ready_at = models.DateTimeField(default=long_ago)
    last_start_at = models.DateTimeField(null=True, blank=True)

    # robots.txt (jobs.robots): fetched by a crawler that offers it, at most once per ROBOTS_TTL.
    robots_state = models.CharField(max_length=16, choices=RobotsState.choices, default=RobotsState.UNKNOWN)
    robots_txt = models.TextField(blank=True, default="", help_text="The file as fetched (at most 500 KiB).")
    robots_status = models.PositiveIntegerField(null=True, blank=True, help_text="HTTP status; 0: no answer.")
    robots_error = models.CharField(max_length=500, blank=True, default="")
    robots_fetched_at = models.DateTimeField(null=True, blank=True)
    robots_due_at = models.DateTimeField(null=True, blank=True, help_text="When to fetch it again (empty: now).")
    robots_failures = models.PositiveIntegerField(default=0, help_text="Fetches in a row that got no usable answer.")
    # A fetch in progress: the session asked, until when (another may ask after).
    robots_session = models.UUIDField(null=True, blank=True)
    robots_lease_until = models.DateTimeField(null=True, blank=True)

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["key"]
        indexes = [
            # The claim's scan: ready hosts, best priority first, longest waiting first.
            models.Index(
                fields=["-top_priority", "ready_at", "id"],
                condition=Q(active=True, paused=False),
                name="host_dispatch_order",
            ),
            # The wake-up timer's "when is the next host ready".
            models.Index(fields=["ready_at"], condition=Q(active=True, paused=False), name="host_ready_at"),
        ]
        constraints = [
            models.CheckConstraint(condition=Q(delay__isnull=True) | Q(delay__gte=0), name="host_delay_not_negative"),
            models.CheckConstraint(
                condition=Q(concurrency__isnull=True) | Q(concurrency__gte=1), name="host_concurrency_positive"
            ),
        ]

    def __str__(self) -> str:
        return self.key

    def get_absolute_url(self) -> str:
        return reverse("jobs:host", args=[self.key])


# --- The fleet: crawlers, bus nodes, and who owns which crawler ------------------------


class CrawlerState(models.TextChoices):
    ACTIVE = "active", "Active"
    DRAINING = "draining", "Draining"
    PAUSED = "paused", "Paused"


class CrawlerSource(models.TextChoices):
    SETTINGS = "settings", "Settings"  # BUS_ENDPOINTS / SUPERVISOR_SOCKET_PATH / SOCKET_PATH / runbus --endpoint
    PERSON = "person", "Added by a person"  # admin, pages, manage.py crawlers add
    ANNOUNCED = "announced", "Announced itself"  # POST /crawlers/announce (runcrawler --announce)


# States in which a crawler has (or is waiting for) an owning bus and a session.
OWNED_STATES = (CrawlerState.ACTIVE, CrawlerState.DRAINING)


class CrawlerQuerySet(models.QuerySet["Crawler"]):
    def ownable(self) -> CrawlerQuerySet:
        return self.filter(state__in=OWNED_STATES)


class Crawler(models.Model):
    """One crawler endpoint of the fleet, and the bus process that owns it.

    At most one bus process holds a session to an endpoint: the one named in
    `owner`, for as long as its BusNode lease lasts. `owner_epoch` is the
    fencing token: it grows on every change of owner, and the owner's
    database writes that only an owner may make check it (jobs.fleet).
    """

    endpoint = models.CharField(max_length=500, unique=True, help_text="unix:/abs/path.sock or tcp://host:port")
    label = models.CharField(max_length=200, blank=True, default="")
    state = models.CharField(max_length=16, choices=CrawlerState.choices, default=CrawlerState.ACTIVE)
    remove_when_drained = models.BooleanField(default=False, help_text="Removed once its running jobs finish.")
    source = models.CharField(max_length=16, choices=CrawlerSource.choices, default=CrawlerSource.PERSON)

    owner = models.CharField(max_length=200, blank=True, default="", help_text="The owning bus node.")
    owner_epoch = models.PositiveBigIntegerField(default=0)
    owned_at = models.DateTimeField(null=True, blank=True)
    session = models.UUIDField(null=True, blank=True, help_text="The open session, if any.")
    slots = models.PositiveIntegerField(default=0)
    last_seen_at = models.DateTimeField(null=True, blank=True, help_text="Last sign of life from the crawler.")
    last_error = models.CharField(max_length=500, blank=True, default="")

    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = CrawlerQuerySet.as_manager()

    class Meta:
        ordering = ["endpoint"]
        indexes = [models.Index(fields=["owner"], name="crawler_owner")]
        constraints = [models.CheckConstraint(condition=Q(state__in=CrawlerState.values), name="crawler_state_valid")]

    def __str__(self) -> str:
        return self.label or self.endpoint

    def get_absolute_url(self) -> str:
        return reverse("jobs:crawlers")


class BusNode(models.Model):
    """One live (or recently live) bus process and its lease.

    A node renews `lease_expires_at` (database time) several times a lease;
    a node whose lease has expired owns nothing, and stops its sessions
    before that moment by its own clock (bus.runtime).
    """

    node = models.CharField(max_length=200, unique=True)
    host = models.CharField(max_length=200, blank=True, default="")
    pid = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField()
    lease_expires_at = models.DateTimeField()
    stopping = models.BooleanField(default=False, help_text="Handing its crawlers over before it exits.")

    class Meta:
        ordering = ["node"]

    def __str__(self) -> str:
        return self.node


class AnnounceNonce(models.Model):
    """Nonces of accepted crawler announcements, kept while their timestamp is acceptable: no replay."""

    nonce = models.CharField(max_length=128, unique=True)
    at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.nonce
