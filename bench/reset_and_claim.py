"""Benchmarks of issue 2: reset_running_jobs on many running jobs, and claim throughput.

    python bench/reset_and_claim.py [--db sqlite|postgres|both] [--jobs 100000]
                                    [--claim-jobs 50000] [--runs 3] [--postgres URL]

1. reset: `--jobs` running jobs (with a lease and a claim event each) are
   inserted with one INSERT ... SELECT (not timed); only the call
   reset_running_jobs(reason="bench", actor="bench") is timed, audit rows and
   commit included. Afterwards every job must be queued with one interruption
   and one interrupt event must exist per job.
2. claim: `--claim-jobs` queued jobs (not timed to insert); claim_jobs in
   batches of 100, a fresh session per batch, until the queue is empty. The
   whole loop is timed. Afterwards every job must have been claimed exactly
   once (ids returned, status running, attempt 1, one claim event each).

Each measurement runs `--runs` times on a fresh table; the median is reported
with the runs. A missed target prints MISSED but exits 0 (this is a
measurement); a failed check of the result exits 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from uuid import uuid4

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import (  # noqa: E402
    BACKENDS,
    DEFAULT_POSTGRES_URL,
    cpu_seconds,
    describe_machine,
    throwaway_database,
)
from bench._procs import per_backend  # noqa: E402

# Targets of issue 2, by Django vendor name.
RESET_TARGET_S = {"postgresql": 1.0, "sqlite": 2.0}
CLAIM_TARGET_JOBS_S = {"postgresql": 20_000.0}
CLAIM_BATCH = 100
SESSIONS = 100  # running jobs are spread over this many bus sessions


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


# --- Fast set-up with raw SQL (not timed) -------------------------------------------


def _empty_tables() -> None:
    from django.db import connection

    from jobs.models import Job, JobEvent

    jobs, events = (connection.ops.quote_name(m._meta.db_table) for m in (Job, JobEvent))
    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute(f"TRUNCATE jobs_jobitems, {events}, {jobs} RESTART IDENTITY")
        else:
            cursor.execute(f"DELETE FROM {events}")
            cursor.execute(f"DELETE FROM {jobs}")


def _settle() -> None:
    """Give the planner fresh statistics and flush dirty pages before a timed call."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("VACUUM ANALYZE")
            cursor.execute("CHECKPOINT")
        else:
            cursor.execute("ANALYZE")
            cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def insert_jobs(count: int, *, running: bool) -> None:
    """Insert `count` jobs, queued or running (leased to one of SESSIONS sessions, with a claim event)."""
    from datetime import timedelta

    from django.db import connection, transaction
    from django.utils import timezone

    from jobs.models import Host, Job, JobEvent

    _empty_tables()
    jobs, events = (connection.ops.quote_name(m._meta.db_table) for m in (Job, JobEvent))
    at = timezone.now()
    ts = Job._meta.get_field("created_at").get_db_prep_value(at, connection)
    until = Job._meta.get_field("lease_expires_at").get_db_prep_value(at + timedelta(seconds=600), connection)
    if connection.vendor == "postgresql":
        numbers = "SELECT generate_series(1, %s) AS i"
        session = f"md5((i %% {SESSIONS})::text)::uuid"
    else:
        numbers = "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < %s) SELECT i FROM s"
        session = f"printf('%%032x', i %% {SESSIONS})"
    if running:
        status, attempt, lease, lease_until, started = "'running'", 1, session, "%s", "%s"
        params = [until, ts, ts, ts, count]
    else:
        status, attempt, lease, lease_until, started = "'queued'", 0, "NULL", "NULL", "NULL"
        params = [ts, ts, count]
    with transaction.atomic(), connection.cursor() as cursor:
        # Every job on one host, with politeness out of the way (bench/_procs.py's settings):
        # the claim as it was before hosts, measured with the host rules in place.
        host, _ = Host.objects.get_or_create(key="example.com")
        Host.objects.filter(id=host.id).update(active=not running, top_priority=4)
        cursor.execute(
            f"""
            INSERT INTO {jobs} (url, host_id, payload, priority, status, attempt, max_attempts, failures,
                backoffs, interruptions, max_interruptions, lease_session, lease_expires_at, started_at,
                error, created_at, updated_at)
            SELECT 'https://example.com/page/' || i, {host.id}, '{{}}', i %% 5, {status}, {attempt}, 5, 0,
                0, 0, 3, {lease}, {lease_until}, {started}, '', %s, %s
            FROM ({numbers}) AS numbers
            """,
            params,
        )
        if running:
            cursor.execute(
                f"""
                INSERT INTO {events} (job_id, at, kind, from_status, to_status, attempt, session, actor, reason)
                SELECT id, %s, 'claim', 'queued', 'running', attempt, lease_session, 'bus', '' FROM {jobs}
                """,
                [ts],
            )
    inserted = Job.objects.filter(status="running" if running else "queued").count()
    check(inserted == count, "set-up inserted too few jobs")
    _settle()


# --- The measurements ----------------------------------------------------------------


def reset_once(count: int) -> tuple[float, float]:
    """Return (wall-clock seconds, CPU seconds of this process and its database backend)."""
    from jobs.models import EventKind, Job, JobEvent
    from jobs.services import reset_running_jobs

    insert_jobs(count, running=True)
    cpu = cpu_seconds()
    started = time.perf_counter()
    counts = reset_running_jobs(reason="bench", actor="bench")
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    check(counts.requeued == count and counts.failed == 0, f"reset returned {counts}, expected {count} requeued")
    check(Job.objects.queued().count() == count, "not every job is queued after the reset")
    check(Job.objects.running().count() == 0, "running jobs are left after the reset")
    check(
        Job.objects.filter(interruptions=1, lease_session__isnull=True, started_at__isnull=True).count() == count,
        "not every job counts exactly one interruption with its lease and started_at cleared",
    )
    interrupts = JobEvent.objects.filter(kind=EventKind.INTERRUPT, actor="bench", reason="bench")
    check(interrupts.count() == count, f"{interrupts.count()} interrupt events, expected {count}")
    check(interrupts.values("job_id").distinct().count() == count, "an interrupt event is missing or doubled")
    return elapsed, cpu


def claim_once(count: int) -> tuple[float, float]:
    """Return (wall-clock seconds, CPU seconds of this process and its database backend)."""
    from jobs.models import EventKind, Job, JobEvent
    from jobs.services import claim_jobs

    insert_jobs(count, running=False)
    claimed: list[int] = []
    cpu = cpu_seconds()
    started = time.perf_counter()
    while True:
        batch = claim_jobs(session=uuid4(), limit=CLAIM_BATCH, lease_seconds=120)
        if not batch:
            break
        claimed.extend(job.id for job in batch)
    elapsed = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    check(len(claimed) == count, f"claimed {len(claimed)} jobs, expected {count}")
    check(len(set(claimed)) == count, "a job was claimed twice")
    check(Job.objects.queued().count() == 0, "queued jobs are left")
    check(Job.objects.running().filter(attempt=1).count() == count, "not every job is running at attempt 1")
    claims = JobEvent.objects.filter(kind=EventKind.CLAIM)
    check(
        claims.count() == count and claims.values("job_id").distinct().count() == count,
        "not exactly one claim event per job",
    )
    return elapsed, cpu


def _runs(values: list[float], fmt: str) -> str:
    return "runs " + ", ".join(fmt.format(value) for value in values)


def run_backend(args: argparse.Namespace) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres):
        from django.db import connection

        vendor = connection.vendor
        with connection.cursor() as cursor:
            cursor.execute("SELECT version()" if vendor == "postgresql" else "SELECT sqlite_version()")
            version = cursor.fetchone()[0].split(" on ")[0]
        print(f"# {vendor}: {version}; {describe_machine()}", flush=True)
        try:
            runs = [reset_once(args.jobs) for _ in range(args.runs)]
            times = [wall for wall, _ in runs]
            median = statistics.median(times)
            target = RESET_TARGET_S[vendor]
            verdict = "OK" if median <= target else "MISSED"
            cpu = statistics.median(cpu for _, cpu in runs)
            print(
                f"reset {args.jobs} running jobs ({vendor}): {median:.2f} s  target <= {target} s  {verdict}"
                f"  ({_runs(times, '{:.2f} s')}; CPU median {cpu:.2f} s)",
                flush=True,
            )

            runs = [claim_once(args.claim_jobs) for _ in range(args.runs)]
            rates = [args.claim_jobs / wall for wall, _ in runs]
            median = statistics.median(rates)
            target = CLAIM_TARGET_JOBS_S.get(vendor)
            verdict = ("OK" if median >= target else "MISSED") if target else "(no target)"
            target_text = f"target >= {target:,.0f} jobs/s  " if target else ""
            cpu_rate = (
                statistics.median(args.claim_jobs / cpu for _, cpu in runs if cpu > 0)
                if any(cpu > 0 for _, cpu in runs)
                else 0.0
            )
            print(
                f"claim {args.claim_jobs} jobs in batches of {CLAIM_BATCH} ({vendor}): {median:,.0f} jobs/s  "
                f"{target_text}{verdict}  ({_runs(rates, '{:,.0f}')} jobs/s; "
                f"per CPU second {cpu_rate:,.0f} jobs)",
                flush=True,
            )
        except CheckFailed as exc:
            print(f"CHECK FAILED ({vendor}): {exc}", flush=True)
            return 1
        print(f"# {vendor} done; {describe_machine()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument("--jobs", type=int, default=100_000, help="running jobs to reset (default 100000)")
    parser.add_argument("--claim-jobs", type=int, default=50_000, help="queued jobs to claim (default 50000)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES_URL,
        metavar="URL",
        help=f"PostgreSQL server for the throwaway database (default {DEFAULT_POSTGRES_URL})",
    )
    args = parser.parse_args(argv)
    if min(args.jobs, args.claim_jobs, args.runs) < 1:
        parser.error("--jobs, --claim-jobs and --runs must be >= 1")
    # Settings are read once per process: one child process per backend.
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
