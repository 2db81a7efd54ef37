"""Every change of a job's status happens here.

Views, admin actions, commands, signal receivers and the bus call these
keyword-only functions; each runs in one transaction, is safe against
concurrent callers (row locks, SKIP LOCKED, conditional updates), writes the
audit events, and returns what it did. The hot paths (enqueue, claim,
outcomes, reset, audit events) are set-based statements whatever the batch
size, one JSON or array parameter instead of a row per statement; see
docs/benchmarks.md for their figures. Their SQL lives in jobs/sql (one
module per database), and the claim's rules in jobs/dispatch.py: this
module keeps the decisions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import connection, transaction
from django.db.models import (
    Case,
    Count,
    F,
    Max,
    PositiveIntegerField,
    Q,
    Value,
    When,
)
from django.db.models.expressions import RawSQL
from django.db.models.functions import Greatest
from django.dispatch import Signal
from django.utils import timezone

from jobsite_crawler.logfmt import kv
from jobsite_crawler.wire import MAX_KIND_LENGTH

from .dispatch import ClaimedJob, claim_jobs  # noqa: F401  (re-exported: services.claim_jobs)
from .hosts import BACKOFF_STATUSES, HostKeyError, backoff_for, effective_delay, host_key
from .models import BusSession, EventKind, Host, Job, JobEvent, JobItems, Status
from .outcomes import Outcome  # noqa: F401  (re-exported: services.Outcome)
from .sql import column as _column
from .sql import db_value, dialect

log = logging.getLogger("jobs.services")

MAX_URL_LENGTH = 2048
MAX_PAYLOAD_BYTES = 64 * 1024

# Sent after a commit that made jobs claimable, so an in-process bus wakes up
# at once (on PostgreSQL a NOTIFY on NOTIFY_CHANNEL reaches other processes).
jobs_available = Signal()
NOTIFY_CHANNEL = "jobsite_jobs"


def now() -> datetime:
    """The one clock of the services: tests and callers may pass `now` instead."""
    return timezone.now()


def _announce_queued() -> None:
    """Tell buses that jobs became claimable, once the transaction commits."""
    dialect().notify(NOTIFY_CHANNEL)  # PostgreSQL: delivered at commit
    transaction.on_commit(lambda: jobs_available.send(sender=Job))


def _queued_on(priorities: dict[int, int]) -> None:
    """Jobs of these hosts (host id: best priority) became queued: mark the hosts, tell the buses.

    Every transition to `queued` calls this in its transaction, after the
    jobs changed: the claim only looks at active hosts, and a host goes
    inactive when a claim finds nothing queued on it.
    """
    priorities = {host: priority for host, priority in priorities.items() if host is not None}
    dialect().wake_hosts(priorities)
    _announce_queued()


def _hosts_of(jobs: Any) -> dict[int, int]:
    """{host id: best priority} of a queryset of jobs."""
    return dict(jobs.order_by().values("host_id").annotate(p=Max("priority")).values_list("host_id", "p"))


def _id_in(ids: Iterable[int], field: str = "id") -> Q:
    """`field IN ids` that also works past SQLite's limit of bound parameters (admin "select all")."""
    return _values_in(field, list(ids))


def _values_in(field: str, values: list[Any]) -> Q:
    """`field IN values` for JSON-serialisable values (database-prepared), past SQLite's parameter limit too."""
    if connection.vendor == "sqlite" and len(values) > 1000:
        return Q(**{f"{field}__in": RawSQL("SELECT value FROM json_each(%s)", [json.dumps(values)])})
    return Q(**{f"{field}__in": values})


def _events(rows: Iterable[dict[str, Any]]) -> None:
    """Write audit events in one statement whatever their number (bulk_create would
    split them into batches of a few dozen rows on SQLite)."""
    defaults = {"from_status": "", "to_status": "", "attempt": 0, "session": None, "reason": ""}
    prepared = []
    for row in rows:
        row = {**defaults, **row}
        prepared.append(
            {
                "job_id": row["job_id"],
                "at": str(_event_db("at", row["at"])),
                "kind": str(row["kind"]),
                "from_status": str(row["from_status"]),
                "to_status": str(row["to_status"]),
                "attempt": row["attempt"],
                "session": None if row["session"] is None else str(_event_db("session", row["session"])),
                "actor": row["actor"],
                "reason": row["reason"],
            }
        )
    if prepared:
        dialect().insert_events(prepared)


def _event_db(field_name: str, value: Any) -> Any:
    return _column(JobEvent, field_name).get_db_prep_value(value, connection)


def _db(field_name: str, value: Any) -> Any:
    """Adapt a Python value for a raw SQL parameter of Job.<field_name>."""
    return db_value(Job, field_name, value)


# --- Enqueue -----------------------------------------------------------------

_url_validator = URLValidator(schemes=["http", "https"])


def _validate_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ValidationError({"url": "a URL is required"})
    url = url.strip()
    control = next((char for char in url if ord(char) < 0x20 or 0x7F <= ord(char) < 0xA0), None)
    if control is not None:
        # PostgreSQL text cannot hold NUL, and no URL carries a raw control character.
        raise ValidationError(
            {"url": f"URL contains the control character U+{ord(control):04X}; percent-encode it or remove it"}
        )
    if len(url) > MAX_URL_LENGTH:
        raise ValidationError({"url": f"URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are allowed"})
    try:
        _url_validator(url)
    except ValidationError:
        raise ValidationError({"url": f"{url[:200]!r} is not a valid http:// or https:// URL"}) from None
    try:
        host_key(url)
    except HostKeyError as exc:
        raise ValidationError({"url": str(exc)}) from None
    return url


def _untextual(value: Any) -> str | None:
    """Why a string somewhere in `value` (keys included) cannot be stored as text, or None.

    JSON may carry "\\u0000" and lone surrogates ("\\ud800"); PostgreSQL's text
    and jsonb refuse both, so they are refused here, with a reason, before any
    statement runs (not as a database error half-way through a batch).
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if "\x00" in item:
                return "holds a NUL character (\\u0000), which the database cannot store"
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return "holds a lone surrogate escape (\\ud800-\\udfff), which is not text"
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


def _validate_payload_and_priority(payload: Any, priority: Any) -> tuple[dict, int]:
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ValidationError({"payload": "payload must be a JSON object"})
    problem = _untextual(payload)
    if problem:
        raise ValidationError({"payload": f"payload {problem}"})
    try:
        size = len(json.dumps(payload, allow_nan=False).encode())
    except (TypeError, ValueError) as exc:
        raise ValidationError({"payload": f"payload is not valid JSON: {exc}"}) from None
    if size > MAX_PAYLOAD_BYTES:
        raise ValidationError({"payload": f"payload is {size} bytes; at most {MAX_PAYLOAD_BYTES} are allowed"})
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ValidationError({"priority": "priority must be a whole number"})
    if not -(2**31) <= priority < 2**31:
        raise ValidationError({"priority": "priority is out of range"})
    return payload, priority


def validate_kind(kind: Any) -> str:
    """A job's kind (which crawlers take it, docs/protocol.md section 16): "" (any crawler) or a name.

    The same bounds as a crawler's ready.kinds, so that every kind can be
    named by some crawler; NUL is refused (PostgreSQL text cannot hold it).
    """
    if kind is None:
        return ""
    if not isinstance(kind, str):
        raise ValidationError({"kind": "kind must be a string"})
    if len(kind) > MAX_KIND_LENGTH:
        raise ValidationError({"kind": f"kind is {len(kind)} characters long; at most {MAX_KIND_LENGTH} are allowed"})
    problem = _untextual(kind)
    if problem:
        raise ValidationError({"kind": f"kind {problem}"})
    return kind


def validate_job_spec(
    *, url: Any, payload: Any = None, priority: Any = 0, kind: Any = ""
) -> tuple[str, dict, int, str]:
    """Check one job's fields; raise ValidationError naming the bad field."""
    url = _validate_url(url)
    payload, priority = _validate_payload_and_priority(payload, priority)
    return url, payload, priority, validate_kind(kind)


def enqueue(*, url: str, payload: dict | None = None, priority: int = 0, kind: str = "", actor: str) -> Job:
    """Queue one job; a bad field raises ValidationError keyed by the field's name."""
    # Checked here as well so the error names the field (message_dict) rather
    # than enqueue_many's "line 1: ..." list, which has no field to point at.
    url, payload, priority, kind = validate_job_spec(url=url, payload=payload, priority=priority, kind=kind)
    return enqueue_many(urls=[url], payload=payload, priority=priority, kind=kind, actor=actor)[0]


def enqueue_many(
    *, urls: Sequence[str], payload: dict | None = None, priority: int = 0, kind: str = "", actor: str
) -> list[Job]:
    """Queue several jobs, all or none: any invalid URL raises before anything is written.

    The ValidationError lists every bad entry as "line N: reason" (1-based).
    The jobs and their enqueue events are written by two set-based statements
    whatever the count (no per-row INSERTs: a batch of 40,000 stays fast).
    `kind` "" lets any crawler take them; a name, only crawlers that take it.
    """
    payload, priority = _validate_payload_and_priority(payload, priority)
    kind = validate_kind(kind)
    problems: list[str] = []
    checked: list[str] = []
    for number, url in enumerate(urls, start=1):
        try:
            checked.append(_validate_url(url))
        except ValidationError as exc:
            reasons = "; ".join(msg for msgs in exc.message_dict.values() for msg in msgs)
            problems.append(f"line {number}: {reasons}")
    if problems:
        raise ValidationError(problems)
    if not checked:
        raise ValidationError("no URLs given")
    keys = [host_key(url) for url in checked]
    at = now()
    limits = {name: _column(Job, name).default for name in ("max_attempts", "max_interruptions")}
    sql = dialect()
    with transaction.atomic():
        hosts = sql.upsert_hosts(sorted(set(keys)), at)
        ids = sql.insert_jobs(
            urls=checked,
            hosts=[hosts[key] for key in keys],
            payload=json.dumps(payload),
            priority=priority,
            kind=kind,
            limits=limits,
            at=_db("created_at", at),
            actor=actor,
        )
        _queued_on({hosts[key]: priority for key in keys})
    jobs = list(Job.objects.filter(_id_in(ids)).order_by("id"))
    log.info(kv("jobs.enqueued", count=len(jobs), actor=actor))
    return jobs


# --- Reset (requeue) -----------------------------------------------------------


@dataclass(frozen=True)
class ResetCounts:
    requeued: int = 0
    failed: int = 0
    suspected: int = 0  # of the requeued: reached max_interruptions in company, now run alone first

    @property
    def total(self) -> int:
        return self.requeued + self.failed


def _running_filter(*, session: UUID | None, job_ids: Iterable[int] | None, lease_expired_before: datetime | None):
    jobs = Job.objects.running()
    if session is not None:
        jobs = jobs.filter(lease_session=session)
    if job_ids is not None:
        jobs = jobs.filter(_id_in(job_ids))
    if lease_expired_before is not None:
        jobs = jobs.filter(lease_expires_at__lt=lease_expired_before)
    return jobs


def reset_running_jobs(
    *,
    session: UUID | None = None,
    job_ids: Iterable[int] | None = None,
    lease_expired_before: datetime | None = None,
    reason: str,
    actor: str,
    at: datetime | None = None,
) -> ResetCounts:
    """Requeue running jobs; the one function signals, admin and commands share.

    Only running jobs move; the filters combine (no filter: every running
    job). Each moved job loses its lease and started_at and counts one
    interruption. The poison verdict is fair: a job that reaches
    max_interruptions becomes failed only if it was alone in its session
    (the evidence points at it); a job that shared its session with others
    is requeued as a suspect (run_alone) instead, and the next session that
    holds nothing runs it alone, so an innocent job is never failed for a
    crawler that died holding many. One transaction, set-based; concurrent
    or repeated calls never count an interruption twice, because a job is
    moved only while it is still running under the row lock (PostgreSQL) or
    write lock (SQLite).
    """
    if not reason:
        raise ValidationError("a reason is required to reset jobs")
    if job_ids is not None:
        job_ids = list(job_ids)
        if not job_ids:
            return ResetCounts()
    at = at or now()
    failed_reason = f"{reason} (interrupted too many times: max_interruptions reached, alone in its session)"
    suspect_reason = (
        f"{reason} (max_interruptions reached while it shared its session with other jobs: "
        "it runs alone next, before any verdict)"
    )
    target = _running_filter(session=session, job_ids=job_ids, lease_expired_before=lease_expired_before)
    with transaction.atomic():
        counts, suspected, woken = dialect().reset(
            target=target,
            # Without an id or lease filter the target holds every running job of its sessions.
            whole_sessions=job_ids is None and lease_expired_before is None,
            reasons={"requeued": reason, "failed": failed_reason, "suspect": suspect_reason},
            at=at,
            actor=actor,
            lonely=lambda: _lonely_sessions(target),
        )
        result = ResetCounts(requeued=counts.get("queued", 0), failed=counts.get("failed", 0), suspected=suspected)
        if result.requeued:
            _queued_on(woken)
    if result.total:
        log.info(
            kv(
                "jobs.reset",
                requeued=result.requeued,
                failed=result.failed,
                suspected=result.suspected,
                reason=reason,
                actor=actor,
                session=session,
                expired_before=lease_expired_before and lease_expired_before.isoformat(),
            )
        )
    return result


def preview_reset(
    *,
    session: UUID | None = None,
    job_ids: Iterable[int] | None = None,
    lease_expired_before: datetime | None = None,
) -> ResetCounts:
    """What reset_running_jobs would do with the same filters, changing nothing (dry runs)."""
    jobs = _running_filter(session=session, job_ids=job_ids, lease_expired_before=lease_expired_before)
    due = jobs.filter(interruptions__gte=F("max_interruptions") - 1)
    failing = due.filter(lease_session__in=_lonely_sessions(jobs)).count()
    return ResetCounts(requeued=jobs.count() - failing, failed=failing, suspected=due.count() - failing)


def _lonely_sessions(jobs: Any) -> list[UUID]:
    """The sessions of `jobs` that hold exactly one running job (the evidence of a poison verdict)."""
    return list(
        Job.objects.running()
        .filter(lease_session__in=jobs.values("lease_session"))
        .order_by()
        .values("lease_session")
        .annotate(n=Count("id"))
        .filter(n=1)
        .values_list("lease_session", flat=True)
    )


def expire_leases(*, at: datetime | None = None, actor: str = "sweeper") -> ResetCounts:
    """Requeue running jobs whose lease ran out (their bus died without telling)."""
    at = at or now()
    return reset_running_jobs(lease_expired_before=at, reason="lease expired", actor=actor, at=at)


# --- Outcomes (fencing) ----------------------------------------------------------

RECORDED = "recorded"
STALE = "stale"


def retry_delay(failures: int) -> timedelta:
    base = settings.JOB_RETRY_BACKOFF_BASE
    return timedelta(seconds=min(settings.JOB_RETRY_BACKOFF_CAP, base * 2 ** max(0, failures - 1)))


def record_outcomes(
    *,
    session: UUID | None,
    outcomes: Sequence[Outcome],
    crawler: str = "",
    actor: str = "bus",
    at: datetime | None = None,
    audit_stale: int | None = None,
) -> list[str]:
    """Apply PROTOCOL.md's fencing rules to a batch of outcomes; return an ack status for each.

    `session` sends the outcomes on behalf of `crawler` (its endpoint). Only
    the crawler an attempt was assigned to may record its outcome:
    1. running with that attempt, leased to this session or assigned to this
       crawler (a resend after a reconnect): record -> "recorded"
    2. that attempt's outcome is already recorded: change nothing -> "recorded"
    3. queued, its latest attempt is this one and it was assigned to this
       crawler: record -> "recorded" (a late result is never thrown away)
    4. anything else: change nothing -> "stale", with an audit event for the
       first `audit_stale` of them (None: all), so that one crawler cannot
       grow the audit trail without bound.
    A `done` recorded under rule 1 or 3 that carries items (docs/protocol.md
    section 17) stores them in the same transaction, replacing the job's
    earlier ones; rules 2 and 4 never touch them.
    The caller acks only after this returns, i.e. after the commit.
    """
    if not outcomes:
        return []
    at = at or now()
    acks: list[str] = []
    audit_left = len(outcomes) if audit_stale is None else audit_stale
    with transaction.atomic():
        ids = sorted({outcome.job_id for outcome in outcomes})
        fields = (
            "id",
            "status",
            "attempt",
            "outcome_attempt",
            "failures",
            "max_attempts",
            "error",
            "lease_session",
            "crawler",
            "attempt_session",
            "host_id",
            "priority",
            "backoffs",
        )
        jobs = {
            row["id"]: row for row in Job.objects.select_for_update().filter(_id_in(ids)).order_by("id").values(*fields)
        }
        older = [(o.job_id, o.attempt) for o in outcomes if o.job_id in jobs and o.attempt < jobs[o.job_id]["attempt"]]
        recorded_before = set()
        if older:
            recorded_before = set(
                JobEvent.objects.filter(
                    _id_in({pair[0] for pair in older}, "job_id"), kind=EventKind.OUTCOME
                ).values_list("job_id", "attempt")
            )
        changed: dict[int, Job] = {}
        with_items: dict[int, Outcome] = {}
        events: list[dict[str, Any]] = []
        requeued: dict[int, int] = {}  # host: best priority of the jobs going back to the queue
        hosts = _HostReports(at)
        ages = _session_ages(session, jobs.values())
        for outcome in outcomes:
            job = jobs.get(outcome.job_id)
            pair = (outcome.job_id, outcome.attempt)
            if job is not None and (job["outcome_attempt"] == outcome.attempt or pair in recorded_before):
                acks.append(RECORDED)  # rule 2: a resend
                continue
            why = _stale_reason(job, outcome, session=session, crawler=crawler, ages=ages)
            if why:
                acks.append(STALE)
                if audit_left > 0:
                    audit_left -= 1
                    log.info(kv("outcome.stale", job=outcome.job_id, attempt=outcome.attempt, session=session, why=why))
                    if job is not None:
                        events.append(
                            dict(
                                job_id=outcome.job_id,
                                at=at,
                                kind=EventKind.STALE,
                                attempt=outcome.attempt,
                                session=session,
                                actor=actor,
                                reason=f"stale {'done' if outcome.succeeded else 'failed'} for attempt "
                                f"{outcome.attempt}: {why}"
                                + ("" if outcome.succeeded else f"; error: {outcome.error[:500]}"),
                            )
                        )
                continue
            assert job is not None
            # Rules 1 and 3.
            backoff = hosts.report(job["host_id"], outcome, job_backoffs=job["backoffs"])
            update = Job(
                id=outcome.job_id,
                outcome_attempt=outcome.attempt,
                failures=job["failures"],
                lease_session=None,
                lease_expires_at=None,
                updated_at=at,
                run_after=None,
                result=None,
                error="",
                finished_at=at,
            )
            update.backoffs = job["backoffs"]
            if backoff is not None:
                # The host said "slow down": back to the queue, no attempt spent. The
                # attempt's outcome is recorded all the same (a resend is rule 2).
                update.status, update.finished_at, update.backoffs = Status.QUEUED, None, job["backoffs"] + 1
                update.error = reason = (
                    f"host backing off: {backoff.reason} "
                    f"(sent back {update.backoffs} of {settings.HOST_BACKOFF_JOB_LIMIT} times, no attempt spent)"
                )
                requeued[job["host_id"]] = max(job["priority"], requeued.get(job["host_id"], job["priority"]))
            elif outcome.succeeded:
                update.status, update.result = Status.SUCCEEDED, outcome.result
                reason = ""
            else:
                update.error = outcome.error
                if outcome.retryable:
                    update.failures = job["failures"] + 1
                if outcome.retryable and update.failures < job["max_attempts"]:
                    update.status, update.finished_at = Status.QUEUED, None
                    update.run_after = at + retry_delay(update.failures)
                    requeued[job["host_id"]] = max(job["priority"], requeued.get(job["host_id"], job["priority"]))
                    reason = f"retryable failure {update.failures} of {job['max_attempts']}: {outcome.error[:500]}"
                else:
                    update.status = Status.FAILED
                    reason = outcome.error[:1000]
            changed[outcome.job_id] = update
            if outcome.succeeded and outcome.items is not None:
                with_items[outcome.job_id] = outcome
            events.append(
                dict(
                    job_id=outcome.job_id,
                    at=at,
                    kind=EventKind.OUTCOME,
                    from_status=job["status"],
                    to_status=update.status,
                    attempt=outcome.attempt,
                    session=session,
                    actor=actor,
                    reason=reason,
                )
            )
            job.update(status=update.status, outcome_attempt=update.outcome_attempt, failures=update.failures)
            acks.append(RECORDED)
        if changed:
            _apply_outcomes(changed.values(), at)
        if with_items:
            _store_items(with_items.values(), at)
        _events(events)
        hosts.save()
        if requeued:
            _queued_on(requeued)
    return acks


class _HostReports:
    """What a batch of outcomes says about their hosts: back-offs (429, 503, connection errors) and recoveries.

    A "slow down" backs the host off for the whole fleet: Retry-After when
    the reply gave one (seconds or an HTTP date), else HOST_BACKOFF doubled
    per report in a row, capped at HOST_BACKOFF_MAX. A job is sent back this
    way at most HOST_BACKOFF_JOB_LIMIT times; after that its outcome is
    recorded as it came. Hosts are locked in id order, after the jobs.
    """

    def __init__(self, at: datetime):
        self.at = at
        self.hosts: dict[int, dict[str, Any]] = {}
        self.recovered: set[int] = set()

    def _host(self, host_id: int) -> dict[str, Any]:
        if host_id not in self.hosts:
            row = Host.objects.select_for_update().filter(id=host_id).values("errors", "backoff_until").first()
            self.hosts[host_id] = {"errors": 0, "backoff_until": None, **(row or {}), "changed": False}
        return self.hosts[host_id]

    def report(self, host_id: int | None, outcome: Outcome, *, job_backoffs: int):
        """The BackOff `outcome` puts its host in, or None (a recovery resets the error count)."""
        if host_id is None:
            return None
        status, retry_after = outcome.answer()
        slow_down = outcome.network or status in BACKOFF_STATUSES
        if not slow_down:
            if outcome.succeeded:
                self.recovered.add(host_id)  # reset at save, without a lock per host
            return None
        if job_backoffs >= settings.HOST_BACKOFF_JOB_LIMIT:
            return None
        host = self._host(host_id)
        host["errors"] += 1
        backoff = backoff_for(
            status=status,
            retry_after=retry_after,
            network=outcome.network,
            errors=host["errors"],
            at=self.at,
            base=settings.HOST_BACKOFF,
            cap=settings.HOST_BACKOFF_MAX,
        )
        if backoff is None:
            return None
        until = backoff.until(self.at)
        if host["backoff_until"] is None or until > host["backoff_until"]:
            host.update(backoff_until=until, reason=backoff.reason)
        host["changed"] = True
        return backoff

    def save(self) -> None:
        recovered = self.recovered - set(self.hosts)
        if recovered:
            # Only the rare host with errors in a row is written (and locked).
            Host.objects.filter(_id_in(recovered), errors__gt=0).update(errors=0, updated_at=self.at)
        for host_id in sorted(self.hosts):
            host = self.hosts[host_id]
            if not host["changed"]:
                continue
            fields: dict[str, Any] = {"errors": host["errors"], "updated_at": self.at}
            if "reason" in host:
                fields.update(
                    backoff_until=host["backoff_until"],
                    backoff_reason=host["reason"][:500],
                    ready_at=Greatest(F("ready_at"), Value(host["backoff_until"])),
                )
            Host.objects.filter(id=host_id).update(**fields)


def _session_ages(session: UUID | None, jobs: Iterable[dict[str, Any]]) -> dict[UUID, datetime]:
    """When `session` and the sessions that claimed the attempts of `jobs` connected, where it matters.

    Only needed for outcomes from a session that does not hold the job's
    lease (resends after a reconnect, and forgeries): one query, and none at
    all when every job is leased to `session`.
    """
    others = {
        job["attempt_session"]
        for job in jobs
        if job["lease_session"] != session and job["attempt_session"] not in (None, session)
    }
    if session is None or not others:
        return {}
    return dict(BusSession.objects.filter(session__in=[session, *others]).values_list("session", "connected_at"))


def _stale_reason(
    job: dict[str, Any] | None,
    outcome: Outcome,
    *,
    session: UUID | None,
    crawler: str,
    ages: dict[UUID, datetime],
) -> str:
    """Why `session` (of `crawler`) may not record `outcome` for `job` (rules 1, 3 and 4); "" if it may.

    The crawler an attempt was given to speaks for it through the session
    that claimed it or any later session (a resend after a reconnect), never
    through an older one: an older session's backlog, processed after the
    session closed, cannot answer for an attempt that did not exist when it
    was sent. Sessions are ordered by when they connected (BusSession).
    """
    if job is None:
        return "unknown job"
    # Attempt 0 was never assigned (a job's first claim makes it 1), so an
    # outcome for it is stale, not a late result of a queued job.
    if outcome.attempt < 1 or job["attempt"] != outcome.attempt:
        return f"job is at attempt {job['attempt']} ({job['status']})"
    if job["status"] not in (Status.RUNNING, Status.QUEUED):
        return f"job is {job['status']}"
    if job["status"] == Status.RUNNING and job["lease_session"] == session:
        return ""
    if job["crawler"] != crawler:  # the bus always names it: its endpoint
        return f"attempt {outcome.attempt} was assigned to another crawler"
    claimed_by = job["attempt_session"]
    if claimed_by in ages and session in ages and ages[session] < ages[claimed_by]:
        return f"attempt {outcome.attempt} was claimed by a later session of this crawler ({claimed_by})"
    return ""


def _apply_outcomes(jobs: Iterable[Job], at: datetime) -> None:
    """Write recorded outcomes in one UPDATE ... FROM a JSON parameter.

    bulk_update builds a CASE per row and field; at 500 outcomes a batch that
    Python work, not the database, capped the bus at ~700 jobs/s.
    """
    rows = [
        {
            "id": job.id,
            "status": job.status,
            "outcome_attempt": job.outcome_attempt,
            "failures": job.failures,
            "backoffs": job.backoffs,
            "run_after": None if job.run_after is None else str(_db("run_after", job.run_after)),
            "result": job.result,
            "error": job.error,
            "finished_at": None if job.finished_at is None else str(_db("finished_at", job.finished_at)),
        }
        for job in jobs
    ]
    dialect().apply_outcomes(rows, _db("updated_at", at))


def _store_items(outcomes: Iterable[Outcome], at: datetime) -> None:
    """Store recorded `done`s' items as JSON Lines, one row per job, replacing the job's row in one upsert.

    Capped again here at JOB_ITEMS_MAX (the bus already cuts them as it reads
    the frame), so that no caller stores more. Lines are UTF-8 text unless an
    item holds a lone surrogate (valid JSON, not encodable): that job's lines
    are then written with ASCII escapes, which every JSON parser reads back.
    """
    cap = settings.JOB_ITEMS_MAX
    if cap <= 0:
        return
    rows = []
    for outcome in outcomes:
        items = outcome.items or []
        kept = items[:cap]
        lines = "".join(json.dumps(item, ensure_ascii=False, separators=(",", ":")) + "\n" for item in kept)
        try:
            lines.encode("utf-8")
        except UnicodeEncodeError:
            lines = "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in kept)
        rows.append(
            JobItems(
                job_id=outcome.job_id,
                attempt=outcome.attempt,
                count=len(kept),
                truncated=outcome.items_truncated or len(items) > cap,
                lines=lines,
                recorded_at=at,
            )
        )
    JobItems.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["job"],
        update_fields=["attempt", "count", "truncated", "lines", "recorded_at"],
    )


def record_outcome(*, session: UUID | None, outcome: Outcome, crawler: str = "", actor: str = "bus") -> str:
    return record_outcomes(session=session, outcomes=[outcome], crawler=crawler, actor=actor)[0]


# --- Lease upkeep from the crawler's reports --------------------------------------


def mark_started(*, session: UUID, job_id: int, attempt: int, at: datetime | None = None) -> bool:
    """Record the crawler's `started`; False when the job is not leased to this session and attempt."""
    return bool(Job.objects.leased_to(session).filter(id=job_id, attempt=attempt).update(started_at=at or now()))


def record_progress(*, session: UUID, job_id: int, attempt: int, progress: dict) -> bool:
    """Store the crawler's latest progress report; False when the job is not leased to it."""
    return bool(
        Job.objects.leased_to(session).filter(id=job_id, attempt=attempt).update(progress=progress, updated_at=now())
    )


def renew_leases(
    *, session: UUID, running: Sequence[tuple[int, int]], lease_seconds: float, at: datetime | None = None
) -> set[tuple[int, int]]:
    """Extend the leases of the listed (job_id, attempt) pairs held by `session`.

    Returns the pairs that were renewed; a listed pair missing from the result
    is not leased to this session (cancelled, re-assigned, unknown).
    """
    if not running:
        return set()
    at = at or now()
    listed = set(running)
    held = set(
        Job.objects.leased_to(session).filter(_id_in({job_id for job_id, _ in listed})).values_list("id", "attempt")
    )
    renewed = listed & held
    if renewed:
        Job.objects.filter(_id_in({job_id for job_id, _ in renewed}), lease_session=session).update(
            lease_expires_at=at + timedelta(seconds=lease_seconds)
        )
    return renewed


def extend_leases(*, session: UUID, lease_seconds: float, at: datetime | None = None) -> int:
    """Extend every lease held by a live session (its bus calls this while the session lasts).

    Leases protect against a bus that dies silently; while the session is
    alive its jobs are accounted for, whether or not the crawler lists them.
    """
    at = at or now()
    return Job.objects.leased_to(session).update(lease_expires_at=at + timedelta(seconds=lease_seconds))


def re_lease_jobs(
    *,
    session: UUID,
    running: Sequence[tuple[int, int]],
    lease_seconds: float,
    crawler: str = "",
    take_over: bool = False,
    at: datetime | None = None,
    actor: str = "bus",
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Give a new session the jobs its crawler (`crawler`) still runs from an earlier one.

    A job is re-leased when it is still queued at that same attempt, that
    attempt was assigned to this same crawler, and its outcome is not
    recorded (nobody took it since); the rest are returned as the second
    list, for the bus to send `cancel`. A crawler cannot take another
    crawler's job by listing it.

    With take_over (the caller owns the crawler endpoint: jobs.fleet), a job
    still running under another session of the same crawler is re-leased
    too: that session belongs to an owner that is gone or handed the
    crawler over, so the job moves to the new session without a requeue.
    """
    at = at or now()
    taken: list[tuple[int, int, str]] = []
    refused: list[tuple[int, int]] = []
    lease = dict(
        status=Status.RUNNING,
        lease_session=session,
        updated_at=at,
        run_after=None,
        lease_expires_at=at + timedelta(seconds=lease_seconds),
    )
    with transaction.atomic():
        for job_id, attempt in running:
            same = Job.objects.filter(id=job_id, attempt=attempt, crawler=crawler).exclude(outcome_attempt=attempt)
            if same.filter(status=Status.QUEUED).update(started_at=at, **lease):
                taken.append((job_id, attempt, Status.QUEUED))
            elif take_over and same.running().exclude(lease_session=session).update(**lease):
                taken.append((job_id, attempt, Status.RUNNING))
            else:
                refused.append((job_id, attempt))
        _events(
            dict(
                job_id=job_id,
                at=at,
                kind=EventKind.RELEASE,
                from_status=from_status,
                to_status=Status.RUNNING,
                attempt=attempt,
                session=session,
                actor=actor,
                reason="the crawler still runs it after reconnecting"
                if from_status == Status.QUEUED
                else "the crawler still runs it: taken over from its earlier bus session",
            )
            for job_id, attempt, from_status in taken
        )
    return [(job_id, attempt) for job_id, attempt, _ in taken], refused


def requeue_orphans(*, crawler: str, keep_session: UUID | None, actor: str, reason: str) -> ResetCounts:
    """Requeue the jobs of `crawler` still running under any session but `keep_session`.

    The owner of a crawler endpoint calls this after taking it over (once the
    new session re-leased what the crawler still runs), or when the crawler
    cannot be reached: those sessions are gone, and their jobs with them.
    """
    orphans = Job.objects.running().filter(crawler=crawler)
    if keep_session is not None:
        orphans = orphans.exclude(lease_session=keep_session)
    ids = list(orphans.values_list("id", flat=True))
    return reset_running_jobs(job_ids=ids, actor=actor, reason=reason) if ids else ResetCounts()


# --- A person's actions -------------------------------------------------------------


@dataclass(frozen=True)
class ChangeResult:
    changed: int
    skipped: int
    running: list[tuple[int, int, UUID]] = field(default_factory=list)  # (id, attempt, session) that were running


def cancel_jobs(*, job_ids: Iterable[int], actor: str, reason: str = "cancelled by a person") -> ChangeResult:
    """Cancel queued or running jobs; finished ones are skipped.

    A running job's late outcome is then acked stale (rule 4); the bus tells
    the crawler to stop it when the crawler next lists it.
    """
    job_ids = sorted(set(job_ids))
    at = now()
    with transaction.atomic():
        rows = list(
            Job.objects.select_for_update()
            .filter(_id_in(job_ids), status__in=[Status.QUEUED, Status.RUNNING])
            .order_by("id")
            .values_list("id", "status", "attempt", "lease_session")
        )
        ids = [row[0] for row in rows]
        Job.objects.filter(_id_in(ids)).update(
            status=Status.CANCELLED,
            lease_session=None,
            lease_expires_at=None,
            finished_at=at,
            updated_at=at,
            run_after=None,
        )
        _events(
            dict(
                job_id=job_id,
                at=at,
                kind=EventKind.CANCEL,
                from_status=status,
                to_status=Status.CANCELLED,
                attempt=attempt,
                session=lease,
                actor=actor,
                reason=reason,
            )
            for job_id, status, attempt, lease in rows
        )
    running = [(job_id, attempt, lease) for job_id, status, attempt, lease in rows if status == Status.RUNNING]
    if rows:
        log.info(kv("jobs.cancelled", count=len(rows), running=len(running), actor=actor))
    return ChangeResult(changed=len(rows), skipped=len(job_ids) - len(rows), running=running)


def retry_jobs(*, job_ids: Iterable[int], actor: str, reason: str = "retried by a person") -> ChangeResult:
    """Put failed or cancelled jobs back in the queue with fresh failure and interruption budgets.

    The attempt counter is the fencing token and only grows. A job whose
    latest attempt never reported an outcome (cancelled or failed as poison
    while running) moves on to a new attempt number, so a late result of the
    abandoned attempt is stale instead of being recorded under rule 3.
    """
    job_ids = sorted(set(job_ids))
    at = now()
    with transaction.atomic():
        rows = list(
            Job.objects.select_for_update()
            .filter(_id_in(job_ids), status__in=[Status.FAILED, Status.CANCELLED, Status.DISALLOWED])
            .order_by("id")
            .values_list("id", "status", "attempt")
        )
        abandoned = Q(attempt__gt=0) & (Q(outcome_attempt__isnull=True) | ~Q(outcome_attempt=F("attempt")))
        Job.objects.filter(_id_in([row[0] for row in rows])).update(
            status=Status.QUEUED,
            failures=0,
            interruptions=0,
            run_alone=False,
            error="",
            finished_at=None,
            run_after=None,
            updated_at=at,
            attempt=Case(
                When(abandoned, then=F("attempt") + 1), default=F("attempt"), output_field=PositiveIntegerField()
            ),
        )
        attempts = dict(Job.objects.filter(_id_in([row[0] for row in rows])).values_list("id", "attempt"))
        _events(
            dict(
                job_id=job_id,
                at=at,
                kind=EventKind.RETRY,
                from_status=status,
                to_status=Status.QUEUED,
                attempt=attempts[job_id],
                actor=actor,
                reason=reason,
            )
            for job_id, status, attempt in rows
        )
        if rows:
            _queued_on(_hosts_of(Job.objects.filter(_id_in([row[0] for row in rows]))))
    if rows:
        log.info(kv("jobs.retried", count=len(rows), actor=actor))
    return ChangeResult(changed=len(rows), skipped=len(job_ids) - len(rows))


# --- Hosts ---------------------------------------------------------------------


@dataclass(frozen=True)
class HostRepair:
    hosted: int = 0  # queued jobs that had no host (created outside enqueue) and got one
    woken: int = 0  # hosts with queued jobs that were not marked active

    @property
    def total(self) -> int:
        return self.hosted + self.woken


def repair_hosts() -> HostRepair:
    """Give hostless queued jobs their host and wake hosts whose queued jobs the claim would not see.

    Every transition to `queued` marks its host itself (_queued_on); this
    safety net, run by the bus at start and then once a minute, finds what a
    job created outside the services (a data migration, a raw INSERT) left
    behind. It logs a warning when it changes anything.
    """
    hosted = 0
    with transaction.atomic():
        hostless = list(Job.objects.queued().filter(host__isnull=True).values_list("id", "url")[:10_000])
        if hostless:
            keys: dict[int, str] = {}
            for job_id, url in hostless:
                try:
                    keys[job_id] = host_key(url)
                except HostKeyError:
                    keys[job_id] = "invalid"
            hosts = dialect().upsert_hosts(sorted(set(keys.values())), now())
            for key in set(keys.values()):
                hosted += Job.objects.filter(
                    _id_in([job_id for job_id, job_key in keys.items() if job_key == key]), host__isnull=True
                ).update(host_id=hosts[key])
        sleeping = dict(
            Job.objects.queued()
            .filter(host__active=False)
            .order_by()
            .values("host_id")
            .annotate(p=Max("priority"))
            .values_list("host_id", "p")
        )
        if sleeping or hosted:
            _queued_on(sleeping | _hosts_of(Job.objects.queued().filter(_id_in([job_id for job_id, _ in hostless]))))
    result = HostRepair(hosted=hosted, woken=len(sleeping))
    if result.total:
        log.warning(kv("hosts.repaired", hosted=result.hosted, woken=result.woken))
    return result


HOST_FIELDS = ("delay", "concurrency", "paused")


def update_host(*, key: str, actor: str, **changes: Any) -> Host:
    """Change a host's delay, concurrency or pause (None: follow the settings); bad values raise ValidationError.

    The change applies to the next claim. Resuming a host or shortening its
    wait wakes the buses so that its jobs start at once.
    """
    unknown = set(changes) - set(HOST_FIELDS)
    if unknown:
        raise ValidationError(f"unknown host fields: {', '.join(sorted(unknown))}")
    errors: dict[str, str] = {}
    if "delay" in changes and changes["delay"] is not None:
        delay = changes["delay"]
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or not 0 <= delay <= 86400:
            errors["delay"] = "delay must be a number of seconds from 0 to 86400, or empty for HOST_DELAY"
    if "concurrency" in changes and changes["concurrency"] is not None:
        concurrency = changes["concurrency"]
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or not 1 <= concurrency <= 100_000:
            errors["concurrency"] = "concurrency must be a whole number from 1 to 100000, or empty for HOST_CONCURRENCY"
    if "paused" in changes and not isinstance(changes["paused"], bool):
        errors["paused"] = "paused must be true or false"
    if errors:
        raise ValidationError(errors)
    with transaction.atomic():
        host = Host.objects.select_for_update().get(key=key)
        before = {name: getattr(host, name) for name in changes}
        for name, value in changes.items():
            setattr(host, name, value)
        if "delay" in changes and host.last_start_at is not None:
            # A shorter delay applies at once: the next start moves to last start + new delay.
            pause = effective_delay(delay=host.delay, crawl_delay=host.crawl_delay, default=settings.HOST_DELAY)
            host.next_start_at = host.last_start_at + timedelta(seconds=pause)
            host.ready_at = max(filter(None, (host.next_start_at, host.backoff_until)))
        host.save()
        if any(before[name] != getattr(host, name) for name in changes):
            log.info(kv("hosts.changed", host=key, actor=actor, **{name: getattr(host, name) for name in changes}))
            _announce_queued()
    return host


def end_backoff(*, key: str, actor: str) -> Host:
    """Lift a host's back-off now (a person decided the site is fine again)."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(key=key)
        if host.backoff_until is not None:
            host.backoff_until, host.errors = None, 0
            host.backoff_reason = f"back-off lifted by {actor}"[:500]
            host.ready_at = host.next_start_at or now()
            host.save()
            log.info(kv("hosts.backoff_lifted", host=key, actor=actor))
            _announce_queued()
    return host


def disallow_jobs(
    *, job_ids: Sequence[int], from_status: str, reason: str, at: datetime | None = None, actor: str = "bus"
) -> int:
    """End jobs whose URL robots.txt disallows: `disallowed`, never fetched (jobs.robots decides which).

    Queued jobs are ended when their host's rules arrive; running ones only
    in the claim that just took them, before any crawler saw them. Returns
    how many were ended (a job that moved on meanwhile is left alone).
    """
    if not job_ids:
        return 0
    at = at or now()
    with transaction.atomic():
        ended = list(
            Job.objects.select_for_update()
            .filter(_id_in(job_ids), status=from_status)
            .order_by("id")
            .values_list("id", "attempt", "lease_session")
        )
        Job.objects.filter(_id_in([row[0] for row in ended])).update(
            status=Status.DISALLOWED,
            lease_session=None,
            lease_expires_at=None,
            finished_at=at,
            updated_at=at,
            run_after=None,
            error=reason[:1000],
        )
        _events(
            dict(
                job_id=job_id,
                at=at,
                kind=EventKind.ROBOTS,
                from_status=from_status,
                to_status=Status.DISALLOWED,
                attempt=attempt,
                session=lease,
                actor=actor,
                reason=reason,
            )
            for job_id, attempt, lease in ended
        )
    if ended:
        log.info(kv("jobs.disallowed", count=len(ended), reason=reason[:200]))
    return len(ended)
