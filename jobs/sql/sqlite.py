"""SQLite: the dispatch SQL (claim, hosts) for one machine.

SQLite runs one writer at a time (every transaction starts with BEGIN
IMMEDIATE, jobsite/settings.py), so the reads and writes of a claim all see
the same rows and no row locks are needed. Datetimes are compared as the
text Django stores them as.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from django.db import connection
from django.utils import timezone

from jobs.hosts import LONG_AGO, effective_delay
from jobs.models import Host, Job, JobEvent

from . import claim_host_filters, db_time, db_value, table

# SQLite's default limit on the SELECTs of one compound statement is 500.
MAX_COMPOUND = 400


def upsert_hosts(keys: list[str], at: datetime) -> dict[str, int]:
    """Create the Host rows that do not exist yet; return every key's id."""
    hosts = table(Host)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {hosts} (key, paused, active, top_priority, errors, backoff_reason, ready_at,
                                 robots_state, robots_txt, robots_error, robots_failures, created_at, updated_at)
            SELECT value, 0, 0, 0, 0, '', %s, 'unknown', '', '', 0, %s, %s FROM json_each(%s) WHERE true
            ON CONFLICT (key) DO NOTHING
            """,
            [db_time(LONG_AGO), db_time(at), db_time(at), json.dumps(sorted(keys))],
        )
        cursor.execute(
            f"SELECT key, id FROM {hosts} WHERE key IN (SELECT value FROM json_each(%s))", [json.dumps(list(keys))]
        )
        return dict(cursor.fetchall())


def insert_jobs(
    *,
    urls: list[str],
    hosts: list[int],
    payload: str,
    priority: int,
    limits: dict[str, int],
    at: Any,
    actor: str,
    kind: str = "",
) -> list[int]:
    """Insert queued jobs and their enqueue events (two statements); return the ids in input order."""
    jobs, events = table(Job), table(JobEvent)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {jobs} (url, host_id, payload, priority, kind, status, attempt, max_attempts, failures,
                                backoffs, interruptions, max_interruptions, error, created_at, updated_at)
            SELECT json_extract(u.value, '$[0]'), json_extract(u.value, '$[1]'), %s, %s, %s, 'queued', 0, %s,
                   0, 0, 0, %s, '', %s, %s
            FROM json_each(%s) AS u ORDER BY u.key
            RETURNING id
            """,
            (
                payload,
                priority,
                kind,
                limits["max_attempts"],
                limits["max_interruptions"],
                at,
                at,
                json.dumps(list(zip(urls, hosts))),
            ),
        )
        ids = sorted(row[0] for row in cursor.fetchall())
        cursor.execute(
            f"""
            INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, actor, reason)
            SELECT value, %s, 'enqueue', '', 'queued', 0, %s, '' FROM json_each(%s)
            """,
            (at, actor, json.dumps(ids)),
        )
        return ids


def wake_hosts(priorities: dict[int, int]) -> None:
    """Mark hosts as having queued jobs, raising their best priority."""
    if not priorities:
        return
    hosts = table(Host)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {hosts} SET active = 1,
                top_priority = CASE WHEN active THEN max(top_priority, json_extract(v.value, '$.p'))
                                    ELSE json_extract(v.value, '$.p') END,
                -- A new queued job may be startable at once: forget a wait for retry delays.
                ready_at = max(COALESCE(next_start_at, %s), COALESCE(backoff_until, %s))
            FROM json_each(%s) AS v
            WHERE {hosts}.id = json_extract(v.value, '$.id')
            """,
            [
                db_time(LONG_AGO),
                db_time(LONG_AGO),
                json.dumps([{"id": host, "p": priority} for host, priority in priorities.items()]),
            ],
        )


def claim(
    *,
    limit: int,
    alone: bool,
    session: Any,
    crawler: str,
    lease_seconds: float,
    at: datetime | None,
    actor: str,
    delay: float,
    concurrency: int,
    max_crawl_delay: float,
    robots: bool,
    kinds: list[str] | None = None,
) -> tuple[list[tuple], int, float | None]:
    """Lock-free under SQLite's single writer: ready hosts, their best jobs, start them, move the hosts on.

    `at` None means now, read after the write lock was taken: a start is
    then never dated before an end it saw. With `robots`, only hosts whose
    robots.txt is known are ready. With `kinds` ("" among them), only hosts
    with a queued job of those kinds are looked at and only such jobs picked
    (see postgresql.claim); None adds nothing to the SQL. Returns (id,
    attempt, url, payload, run_alone, host_id, kind) rows in claim order,
    how many ready hosts it looked at, and the seconds until the next
    waiting host is ready (None: none waits).
    """
    at = at or timezone.now()
    jobs, hosts, events = table(Job), table(Host), table(JobEvent)
    now_db = db_time(at)
    busy = f"(SELECT count(*) FROM {jobs} AS r WHERE r.host_id = h.id AND r.status = 'running')"
    # The kinds are a few short names (ready.kinds is bounded): one placeholder each.
    of_kinds = "" if kinds is None else f"AND {{alias}}.kind IN ({', '.join(['%s'] * len(kinds))})"
    kind_params = list(kinds or [])
    # Suspects (run_alone) are few: look only at the hosts that have one.
    only_suspects, has_kinds = claim_host_filters(jobs, of_kinds, alone=alone, kinds=kinds)
    robots_known = "AND h.robots_state IN ('rules', 'unavailable')" if robots else ""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT id, delay, crawl_delay, room FROM (
                SELECT h.id, h.delay, h.crawl_delay, h.top_priority, h.ready_at,
                       COALESCE(h.concurrency, %s) - {busy} AS room
                FROM {hosts} AS h
                WHERE h.active AND NOT h.paused AND h.ready_at <= %s {only_suspects} {has_kinds} {robots_known}
            )
            WHERE room > 0  -- each host's running jobs counted once
            ORDER BY top_priority DESC, ready_at, id
            LIMIT %s
            """,
            [concurrency, now_db, *(kind_params if alone else []), *kind_params, limit],
        )
        ready = cursor.fetchall()
        pauses: dict[int, float] = {}
        takes: list[tuple[int, int]] = []
        for host, host_delay, crawl_delay, room in ready:
            pause = effective_delay(
                delay=host_delay, crawl_delay=min(crawl_delay or 0.0, max_crawl_delay), default=delay
            )
            pauses[host] = pause
            takes.append((host, min(1 if pause > 0 else room, limit)))
        picks: list[tuple[int, int, int]] = []  # (priority, id, host)
        for start in range(0, len(takes), MAX_COMPOUND):
            # Each host's best jobs through its own index range, all in one statement.
            chunk = takes[start : start + MAX_COMPOUND]
            one = f"""
                SELECT * FROM (
                    SELECT priority, id, host_id FROM {jobs}
                    WHERE host_id = %s AND status = 'queued' AND run_alone = %s
                      AND (run_after IS NULL OR run_after <= %s) {of_kinds.format(alias=jobs)}
                    ORDER BY priority DESC, id LIMIT %s
                )"""
            cursor.execute(
                " UNION ALL ".join([one] * len(chunk)),
                [value for host, take in chunk for value in (host, alone, now_db, *kind_params, take)],
            )
            picks.extend(cursor.fetchall())
        picks.sort(key=lambda pick: (-pick[0], pick[1]))
        picked = picks[:limit]
        rows: list[tuple] = []
        if picked:
            session_db = db_value(Job, "lease_session", session)
            cursor.execute(
                f"""
                UPDATE {jobs} SET status = 'running', attempt = attempt + 1,
                    lease_session = %s, lease_expires_at = %s, started_at = %s, crawler = %s,
                    attempt_session = %s, updated_at = %s, run_after = NULL, progress = NULL
                WHERE id IN (SELECT value FROM json_each(%s))
                RETURNING id, attempt, url, payload, run_alone, priority, host_id, kind
                """,
                [
                    session_db,
                    db_time(at + timedelta(seconds=lease_seconds)),
                    now_db,
                    crawler,
                    session_db,
                    now_db,
                    json.dumps([job for _, job, _ in picked]),
                ],
            )
            returned = cursor.fetchall()
            returned.sort(key=lambda row: (-row[5], row[0]))
            rows = [(*row[:5], row[6], row[7]) for row in returned]
            cursor.execute(
                f"""
                INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, session, actor, reason)
                SELECT id, %s, 'claim', 'queued', 'running', attempt, lease_session, %s, ''
                FROM {jobs} WHERE id IN (SELECT value FROM json_each(%s))
                """,
                [now_db, actor, json.dumps([row[0] for row in rows])],
            )
        if ready:
            started = {host for _, _, host in picked}
            moves = [
                {
                    "id": host,
                    "started": host in started,
                    "pause": pauses[host],
                    "next": str(db_time(at + timedelta(seconds=pauses[host]))),
                }
                for host, *_ in ready
            ]
            # The picked jobs are running now: what is still queued is what is left.
            cursor.execute(
                f"""
                UPDATE {hosts} SET
                    last_start_at = CASE WHEN json_extract(v.value, '$.started') THEN %s ELSE last_start_at END,
                    next_start_at = CASE WHEN json_extract(v.value, '$.started')
                                         THEN json_extract(v.value, '$.next') ELSE next_start_at END,
                    ready_at = CASE
                        -- Without a delay a start changes nothing: a back-off sets ready_at itself.
                        WHEN json_extract(v.value, '$.started') AND json_extract(v.value, '$.pause') = 0
                            THEN ready_at
                        WHEN json_extract(v.value, '$.started')
                            THEN max(json_extract(v.value, '$.next'), COALESCE(backoff_until, %s))
                        -- Nothing startable now (retry delays): wait for the soonest instead of
                        -- coming back on every claim.
                        ELSE max(ready_at, COALESCE((
                            SELECT min(COALESCE(w.run_after, '')) FROM {jobs} AS w
                            WHERE w.host_id = {hosts}.id AND w.status = 'queued' AND w.run_alone = %s
                        ), ready_at))
                    END,
                    top_priority = COALESCE((
                        SELECT q.priority FROM {jobs} AS q WHERE q.host_id = {hosts}.id AND q.status = 'queued'
                        ORDER BY q.priority DESC, q.id LIMIT 1
                    ), top_priority),
                    active = EXISTS (SELECT 1 FROM {jobs} AS q WHERE q.host_id = {hosts}.id AND q.status = 'queued'),
                    updated_at = %s
                FROM json_each(%s) AS v
                WHERE {hosts}.id = json_extract(v.value, '$.id')
                """,
                [now_db, now_db, alone, now_db, json.dumps(moves)],
            )
    # A short claim says when to come back (same transaction: the hosts as this claim left them).
    return rows, len(ready), next_ready_in(at) if len(rows) < limit else None


def _aware(value: Any) -> datetime:
    when = value if isinstance(value, datetime) else datetime.fromisoformat(value)
    return when.replace(tzinfo=UTC) if timezone.is_naive(when) else when


def next_ready_in(at: datetime | None) -> float | None:
    """Seconds until the next waiting host becomes ready (delay or back-off over), None if none waits."""
    at = at or timezone.now()
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT min(ready_at) FROM {table(Host)} WHERE active AND NOT paused AND ready_at > %s", [db_time(at)]
        )
        soonest = cursor.fetchone()[0]
    return None if soonest is None else max(0.0, (_aware(soonest) - at).total_seconds())


def apply_outcomes(rows: list[dict[str, Any]], at: Any) -> None:
    """Write recorded outcomes (one dict per job) in one UPDATE ... FROM a JSON parameter."""
    jobs = table(Job)

    def field(name: str) -> str:
        return f"json_extract(v.value, '$.{name}')"

    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {jobs} SET status = {field("status")}, outcome_attempt = {field("outcome_attempt")},
                failures = {field("failures")}, backoffs = {field("backoffs")}, run_after = {field("run_after")},
                error = {field("error")}, finished_at = {field("finished_at")}, result = {field("result")},
                lease_session = NULL, lease_expires_at = NULL, run_alone = 0, updated_at = %s
            FROM json_each(%s) AS v
            WHERE {jobs}.id = {field("id")}
            """,
            [at, json.dumps(rows)],
        )


def reset(
    *,
    target: Any,
    whole_sessions: bool,
    reasons: dict[str, str],
    at: datetime,
    actor: str,
    lonely: Any = None,
) -> tuple[dict[str, int], int, dict[int, int]]:
    """Requeue (or fail as poison) the running jobs of `target`: see postgresql.reset.

    SQLite runs one writer at a time, so the queries and the UPDATE below all
    see the same rows. `lonely()` lists the sessions that hold exactly one
    running job (the evidence of a poison verdict).
    """
    from django.db.models import BooleanField, Case, DateTimeField, F, Q, TextField, Value, When

    events = table(JobEvent)
    at_db = db_value(Job, "updated_at", at)
    sessions = [db_value(Job, "lease_session", lease) for lease in lonely()]
    if len(sessions) > 1000:
        from django.db.models.expressions import RawSQL

        alone = Q(lease_session__in=RawSQL("SELECT value FROM json_each(%s)", [json.dumps(sessions)]))
    else:
        alone = Q(lease_session__in=sessions)
    due = Q(interruptions__gte=F("max_interruptions") - 1)
    poisoned, suspect = due & alone, due & ~alone
    to_status = Case(When(poisoned, then=Value("failed")), default=Value("queued"))
    why = Case(
        When(poisoned, then=Value(reasons["failed"])),
        When(suspect, then=Value(reasons["suspect"])),
        default=Value(reasons["requeued"]),
        output_field=TextField(),
    )
    listed = target.annotate(to_status=to_status, why=why).values(
        "id", "attempt", "lease_session", "to_status", "why", "host_id", "priority"
    )
    listed_sql, listed_params = listed.query.sql_with_params()
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, session, actor, reason)
            SELECT t.id, %s, 'interrupt', 'running', t.to_status, t.attempt, t.lease_session, %s, t.why
            FROM ({listed_sql}) AS t
            """,
            (at_db, actor, *listed_params),
        )
        cursor.execute(
            f"""
            SELECT t.to_status, t.host_id, max(t.priority), count(*), sum(t.why = %s)
            FROM ({listed_sql}) AS t GROUP BY t.to_status, t.host_id
            """,
            (reasons["suspect"], *listed_params),
        )
        moved = cursor.fetchall()
    counts: dict[str, int] = {}
    for status, _, _, n, _ in moved:
        counts[status] = counts.get(status, 0) + n
    suspected = sum(row[4] or 0 for row in moved)
    woken = {host: priority for status, host, priority, _, _ in moved if status == "queued"}
    target.update(
        interruptions=F("interruptions") + 1,
        status=to_status,
        run_alone=Case(When(suspect, then=Value(True)), default=F("run_alone"), output_field=BooleanField()),
        finished_at=Case(When(poisoned, then=Value(at)), default=None, output_field=DateTimeField()),
        error=Case(When(poisoned, then=Value(reasons["failed"])), default=F("error"), output_field=TextField()),
        lease_session=None,
        lease_expires_at=None,
        started_at=None,
        updated_at=at,
    )
    return counts, suspected, woken


EVENT_COLUMNS = ("job_id", "at", "kind", "from_status", "to_status", "attempt", "session", "actor", "reason")


def insert_events(rows: list[dict[str, Any]]) -> None:
    """Write audit events (dicts of EVENT_COLUMNS, database-prepared) in one statement."""
    columns = ", ".join(EVENT_COLUMNS)
    extracted = ", ".join(f"json_extract(value, '$.{name}')" for name in EVENT_COLUMNS)
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table(JobEvent)} ({columns}) SELECT {extracted} FROM json_each(%s)", [json.dumps(rows)]
        )


def notify(channel: str) -> None:
    """Other processes' buses poll SQLite (BUS_POLL_INTERVAL): nothing to send."""
