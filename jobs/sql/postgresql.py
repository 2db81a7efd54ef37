"""PostgreSQL: the dispatch SQL (claim, hosts), row locks with SKIP LOCKED so concurrent claimers never wait.

Lock order, to stay free of deadlocks: whoever changes jobs and hosts in
one transaction locks the jobs first and the hosts after, in id order
(wake_hosts); the claim locks hosts and then jobs, but with SKIP LOCKED on
both, so it never waits for anyone.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from django.db import connection

from jobs.hosts import LONG_AGO
from jobs.models import Host, Job, JobEvent

from . import claim_host_filters, db_time, db_value, table


def upsert_hosts(keys: list[str], at: datetime) -> dict[str, int]:
    """Create the Host rows that do not exist yet; return every key's id."""
    hosts = table(Host)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {hosts} (key, paused, active, top_priority, errors, backoff_reason, ready_at,
                                 robots_state, robots_txt, robots_error, robots_failures, created_at, updated_at)
            SELECT k, false, false, 0, 0, '', %s, 'unknown', '', '', 0, %s, %s FROM unnest(%s::text[]) AS k ORDER BY k
            ON CONFLICT (key) DO NOTHING
            """,
            [db_time(LONG_AGO), db_time(at), db_time(at), sorted(keys)],
        )
        cursor.execute(f"SELECT key, id FROM {hosts} WHERE key = ANY(%s::text[])", [list(keys)])
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
    """Insert queued jobs and their enqueue events in one statement; return the ids in input order."""
    jobs, events = table(Job), table(JobEvent)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH added AS (
                INSERT INTO {jobs} (url, host_id, payload, priority, kind, status, attempt, max_attempts, failures,
                                    backoffs, interruptions, max_interruptions, error, created_at, updated_at)
                SELECT u.url, u.host, %s::jsonb, %s, %s, 'queued', 0, %s, 0, 0, 0, %s, '', %s, %s
                FROM unnest(%s::text[], %s::bigint[]) WITH ORDINALITY AS u(url, host, n) ORDER BY u.n
                RETURNING id
            ),
            logged AS (
                INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, actor, reason)
                SELECT id, %s, 'enqueue', '', 'queued', 0, %s, '' FROM added
            )
            SELECT id FROM added ORDER BY id
            """,
            (
                payload,
                priority,
                kind,
                limits["max_attempts"],
                limits["max_interruptions"],
                at,
                at,
                urls,
                hosts,
                at,
                actor,
            ),
        )
        return [row[0] for row in cursor.fetchall()]


def wake_hosts(priorities: dict[int, int]) -> None:
    """Mark hosts as having queued jobs, raising their best priority (locks in id order)."""
    if not priorities:
        return
    hosts = table(Host)
    ids = sorted(priorities)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            WITH locked AS (SELECT id FROM {hosts} WHERE id = ANY(%s) ORDER BY id FOR UPDATE)
            UPDATE {hosts} AS h SET active = true,
                top_priority = CASE WHEN h.active THEN GREATEST(h.top_priority, v.p) ELSE v.p END,
                -- A new queued job may be startable at once: forget a wait for retry delays.
                ready_at = GREATEST(COALESCE(h.next_start_at, %s), COALESCE(h.backoff_until, %s))
            FROM locked, jsonb_to_recordset(%s::jsonb) AS v(id bigint, p integer)
            WHERE h.id = locked.id AND h.id = v.id
            """,
            [
                ids,
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
    """Two statements: lock the ready hosts; then, on a snapshot taken after the locks, start their best jobs.

    The second snapshot is what makes the concurrency limit hold: a claim
    of the same host that committed while this one waited for nothing (SKIP
    LOCKED) is seen when the host's running jobs are counted. `at` None
    means the database's clock, read after each statement's snapshot: a
    start is never dated before an end it saw. With `robots`, only hosts
    whose robots.txt is known are ready. With `kinds` (the kinds this
    session takes, "" among them), only hosts with a queued job of those
    kinds are locked, and only such jobs are picked: the other hosts are
    left as they are, ready for other sessions. None adds nothing to the
    SQL. Returns (id, attempt, url, payload, run_alone, host_id, kind) rows
    in claim order, how many ready hosts it looked at, and the seconds until
    the next host that was not ready becomes ready (None: none waits).
    """
    jobs, hosts, events = table(Job), table(Host), table(JobEvent)
    of_kinds = "" if kinds is None else "AND {alias}.kind = ANY(%(kinds)s::text[])"
    # Suspects (run_alone) are few: look only at the hosts that have one.
    only_suspects, has_kinds = claim_host_filters(jobs, of_kinds, alone=alone, kinds=kinds)
    pause = "GREATEST(COALESCE(h.delay, %(delay)s), LEAST(COALESCE(h.crawl_delay, 0), %(max_crawl)s))"
    busy = f"(SELECT count(*) FROM {jobs} AS r WHERE r.host_id = h.id AND r.status = 'running')"
    waiting = f"""
        SELECT EXTRACT(EPOCH FROM min(w.ready_at) - %(since)s::timestamptz) FROM {hosts} AS w
        WHERE w.active AND NOT w.paused AND w.ready_at > %(since)s::timestamptz"""
    params = {
        "at": db_time(at),
        "delay": float(delay),
        "max_crawl": float(max_crawl_delay),
        "concurrency": int(concurrency),
        "limit": int(limit),
        "alone": bool(alone),
        "session": db_value(Job, "lease_session", session),
        "lease": float(lease_seconds),
        "crawler": crawler,
        "actor": actor,
        "robots_off": not robots,
        "kinds": kinds,
    }
    lock = f"""
        WITH clock AS MATERIALIZED (SELECT COALESCE(%(at)s::timestamptz, clock_timestamp()) AS at),
        locked AS (
            SELECT h.id FROM {hosts} AS h CROSS JOIN clock
            WHERE h.active AND NOT h.paused AND h.ready_at <= clock.at
              AND {busy} < COALESCE(h.concurrency, %(concurrency)s) {only_suspects} {has_kinds}
              AND (%(robots_off)s OR h.robots_state IN ('rules', 'unavailable'))
            ORDER BY h.top_priority DESC, h.ready_at, h.id
            LIMIT %(limit)s
            FOR UPDATE OF h SKIP LOCKED
        )
        SELECT id, NULL FROM locked
        UNION ALL SELECT NULL, at FROM clock
    """
    with connection.cursor() as cursor:
        cursor.execute(lock, params)
        locked = cursor.fetchall()
        ids = [row[0] for row in locked if row[0] is not None]
        params["since"] = next(row[1] for row in locked if row[0] is None)
        if not ids:
            cursor.execute(waiting, params)
            row = cursor.fetchone()
            return [], 0, None if row is None or row[0] is None else max(0.0, float(row[0]))
        params["hosts"] = ids
        cursor.execute(
            f"""
            WITH clock AS MATERIALIZED (SELECT COALESCE(%(at)s::timestamptz, clock_timestamp()) AS at),
            ready AS (
                SELECT h.id, {pause} AS pause, COALESCE(h.concurrency, %(concurrency)s) - {busy} AS room
                FROM {hosts} AS h WHERE h.id = ANY(%(hosts)s)
            ),
            picks AS (
                SELECT c.id, c.priority, r.id AS host_id
                FROM ready AS r
                CROSS JOIN LATERAL (
                    SELECT j.id, j.priority FROM {jobs} AS j
                    WHERE j.host_id = r.id AND j.status = 'queued' AND j.run_alone = %(alone)s
                      AND (j.run_after IS NULL OR j.run_after <= (SELECT at FROM clock)) {of_kinds.format(alias="j")}
                    ORDER BY j.priority DESC, j.id
                    LIMIT CASE WHEN r.pause > 0 THEN LEAST(1, GREATEST(r.room, 0))
                               ELSE LEAST(GREATEST(r.room, 0), %(limit)s) END
                    FOR UPDATE OF j SKIP LOCKED
                ) AS c
            ),
            picked AS (SELECT id, host_id FROM picks ORDER BY priority DESC, id LIMIT %(limit)s),
            claimed AS (
                UPDATE {jobs} AS j SET status = 'running', attempt = j.attempt + 1,
                    lease_session = %(session)s, lease_expires_at = clock.at + make_interval(secs => %(lease)s),
                    started_at = clock.at, crawler = %(crawler)s, attempt_session = %(session)s,
                    updated_at = clock.at, run_after = NULL, progress = NULL
                FROM picked, clock WHERE j.id = picked.id
                RETURNING j.id, j.attempt, j.url, j.payload, j.run_alone, j.priority, j.host_id, j.kind
            ),
            logged AS (
                INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, session, actor, reason)
                SELECT claimed.id, clock.at, 'claim', 'queued', 'running', claimed.attempt, %(session)s,
                       %(actor)s, ''
                FROM claimed, clock
            ),
            started AS (SELECT host_id, count(*) AS n FROM claimed GROUP BY host_id),
            settled AS (
                UPDATE {hosts} AS h SET
                    last_start_at = CASE WHEN s.n IS NULL THEN h.last_start_at ELSE clock.at END,
                    next_start_at = CASE WHEN s.n IS NULL THEN h.next_start_at
                                         ELSE clock.at + make_interval(secs => r.pause) END,
                    ready_at = CASE
                        -- Without a delay a start changes nothing: a back-off sets ready_at itself.
                        WHEN s.n IS NOT NULL AND r.pause = 0 THEN h.ready_at
                        WHEN s.n IS NOT NULL THEN GREATEST(
                            clock.at + make_interval(secs => r.pause), COALESCE(h.backoff_until, clock.at))
                        -- At its concurrency: unchanged (an end frees it).
                        WHEN r.room <= 0 THEN h.ready_at
                        -- Nothing startable now (retry delays): wait for the soonest instead of
                        -- coming back on every claim.
                        ELSE GREATEST(h.ready_at, COALESCE((
                            SELECT min(COALESCE(w.run_after, '-infinity'::timestamptz)) FROM {jobs} AS w
                            WHERE w.host_id = r.id AND w.status = 'queued' AND w.run_alone = %(alone)s
                        ), h.ready_at))
                    END,
                    top_priority = COALESCE(nxt.priority, h.top_priority),
                    active = nxt.priority IS NOT NULL,
                    updated_at = clock.at
                FROM ready AS r
                CROSS JOIN clock
                LEFT JOIN started AS s ON s.host_id = r.id
                LEFT JOIN LATERAL (
                    SELECT q.priority FROM {jobs} AS q
                    WHERE q.host_id = r.id AND q.status = 'queued' AND q.id NOT IN (SELECT id FROM picked)
                    ORDER BY q.priority DESC, q.id LIMIT 1
                ) AS nxt ON true
                WHERE h.id = r.id
                RETURNING h.id, h.ready_at, h.active, h.paused
            ),
            -- The next wait counts from the first statement's clock: a host that became
            -- ready in between is then due at once (0), not missed.
            soonest AS (
                SELECT min(ready_at) AS at FROM (
                    SELECT ready_at FROM settled WHERE active AND NOT paused AND ready_at > %(since)s::timestamptz
                    UNION ALL
                    SELECT w.ready_at FROM {hosts} AS w
                    WHERE w.active AND NOT w.paused AND w.ready_at > %(since)s::timestamptz
                      AND w.id <> ALL(%(hosts)s)
                ) AS t
            )
            SELECT id, attempt, url, payload, run_alone, priority, host_id, NULL::double precision, kind
            FROM claimed
            UNION ALL
            SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   EXTRACT(EPOCH FROM soonest.at - GREATEST(clock.at, %(since)s::timestamptz))::double precision,
                   NULL
            FROM soonest, clock
            """,
            params,
        )
        returned = cursor.fetchall()
    wait = next(row[7] for row in returned if row[0] is None)
    rows = sorted((row for row in returned if row[0] is not None), key=lambda row: (-row[5], row[0]))
    return [(*row[:5], row[6], row[8]) for row in rows], len(ids), None if wait is None else max(0.0, float(wait))


def next_ready_in(at: datetime | None) -> float | None:
    """Seconds until the next waiting host becomes ready (delay or back-off over), None if none waits."""
    hosts = table(Host)
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            SELECT EXTRACT(EPOCH FROM min(h.ready_at) - COALESCE(%s::timestamptz, clock_timestamp()))
            FROM {hosts} AS h
            WHERE h.active AND NOT h.paused AND h.ready_at > COALESCE(%s::timestamptz, clock_timestamp())
            """,
            [db_time(at), db_time(at)],
        )
        row = cursor.fetchone()
    return None if row is None or row[0] is None else max(0.0, float(row[0]))


def apply_outcomes(rows: list[dict[str, Any]], at: Any) -> None:
    """Write recorded outcomes (one dict per job) in one UPDATE ... FROM a JSON parameter."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            UPDATE {table(Job)} AS j SET status = v.status, outcome_attempt = v.outcome_attempt,
                failures = v.failures, backoffs = v.backoffs, run_after = v.run_after, error = v.error,
                finished_at = v.finished_at,
                result = CASE WHEN jsonb_typeof(v.result) = 'null' THEN NULL ELSE v.result END,
                lease_session = NULL, lease_expires_at = NULL, run_alone = false, updated_at = %s
            FROM jsonb_to_recordset(%s::jsonb) AS v(id bigint, status text, outcome_attempt integer,
                failures integer, backoffs integer, run_after timestamptz, result jsonb, error text,
                finished_at timestamptz)
            WHERE j.id = v.id
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
    """Requeue (or fail as poison) the running jobs of `target` in one statement.

    `target` is a queryset of running jobs; `reasons` holds "requeued",
    "failed" and "suspect" texts; `whole_sessions` says the target holds
    every running job of its sessions (then it counts them itself). Returns
    the count per new status, how many became suspects, and {host: best
    priority} of the requeued jobs.
    """
    jobs, events = table(Job), table(JobEvent)
    at = db_time(at)
    target_sql, target_params = (
        target.order_by("id").values("id", "lease_session").select_for_update().query.sql_with_params()
    )
    # held.n: how many jobs the job's session held when it was interrupted.
    held_sql = (
        "SELECT lease_session, count(*) AS n FROM target GROUP BY lease_session"
        if whole_sessions
        else f"""SELECT h.lease_session, count(*) AS n FROM {jobs} AS h
                 WHERE h.status = 'running'
                   AND h.lease_session = ANY(ARRAY(SELECT DISTINCT lease_session FROM target))
                 GROUP BY h.lease_session"""
    )
    sql = f"""
        WITH target AS ({target_sql}),
        held AS ({held_sql}),
        moved AS (
            UPDATE {jobs} AS j SET
                interruptions = j.interruptions + 1,
                status = CASE WHEN j.interruptions + 1 >= j.max_interruptions AND held.n = 1
                              THEN 'failed' ELSE 'queued' END,
                run_alone = j.run_alone OR (j.interruptions + 1 >= j.max_interruptions AND held.n > 1),
                finished_at = CASE WHEN j.interruptions + 1 >= j.max_interruptions AND held.n = 1
                              THEN %s::timestamptz ELSE NULL END,
                error = CASE WHEN j.interruptions + 1 >= j.max_interruptions AND held.n = 1
                              THEN %s ELSE j.error END,
                lease_session = NULL, lease_expires_at = NULL, started_at = NULL,
                updated_at = %s
            FROM target JOIN held ON held.lease_session = target.lease_session
            WHERE j.id = target.id
            RETURNING j.id, j.status, j.attempt, target.lease_session, j.host_id, j.priority,
                      (j.interruptions >= j.max_interruptions AND held.n > 1) AS suspect
        ),
        logged AS (
            INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, session, actor, reason)
            SELECT id, %s, 'interrupt', 'running', status, attempt, lease_session, %s,
                   CASE WHEN status = 'failed' THEN %s WHEN suspect THEN %s ELSE %s END
            FROM moved
        )
        SELECT status, host_id, max(priority), count(*), count(*) FILTER (WHERE suspect)
        FROM moved GROUP BY status, host_id
    """
    params = (
        *target_params,
        at,
        reasons["failed"],
        at,
        at,
        actor,
        reasons["failed"],
        reasons["suspect"],
        reasons["requeued"],
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        moved = cursor.fetchall()
    counts: dict[str, int] = {}
    for status, _, _, n, _ in moved:
        counts[status] = counts.get(status, 0) + n
    suspected = sum(row[4] for row in moved)
    woken = {host: priority for status, host, priority, _, _ in moved if status == "queued"}
    return counts, suspected, woken


EVENT_COLUMNS = ("job_id", "at", "kind", "from_status", "to_status", "attempt", "session", "actor", "reason")
_EVENT_TYPES = ("bigint", "timestamptz", "text", "text", "text", "integer", "uuid", "text", "text")


def insert_events(rows: list[dict[str, Any]]) -> None:
    """Write audit events (dicts of EVENT_COLUMNS, database-prepared) in one statement."""
    columns = ", ".join(EVENT_COLUMNS)
    record = ", ".join(f"{name} {kind}" for name, kind in zip(EVENT_COLUMNS, _EVENT_TYPES))
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table(JobEvent)} ({columns}) "
            f"SELECT {columns} FROM jsonb_to_recordset(%s::jsonb) AS r({record})",
            [json.dumps(rows)],
        )


def notify(channel: str) -> None:
    """Tell the buses of other processes (LISTEN), at commit."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_notify(%s, '')", [channel])
