"""Benchmark of issue 9: the job page and the admin's job page of a job with 100,000 events.

    python bench/event_pages.py [--db sqlite|postgres|both] [--events 100000] [--runs 5]
                                [--old-events 2000] [--postgres URL]

One job gets `--events` stale-outcome events (one INSERT ... SELECT, not
timed), as a crawler flooding stale outcomes leaves them. Then, signed in as a
superuser through Django's test client (the whole request: middleware,
queries, template), each page is fetched once to warm up and `--runs` times
timed: `/jobs/<id>/`, its live part `?fragment=1`, the admin change page and
the admin's event list of that job. The median is reported with the runs;
the target is 300 ms per page.

For comparison, the admin change page as it was (every event an inline row)
is timed on a job with `--old-events` events (0 to skip): the old page grew
with the events, 12.7 s at 20,000 on the probe's machine.

A missed target prints MISSED but exits 0 (a measurement); a page that is not
200 or shows more than the cap exits 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import (  # noqa: E402
    BACKENDS,
    DEFAULT_POSTGRES_URL,
    describe_machine,
    throwaway_database,
)
from bench._procs import per_backend  # noqa: E402

TARGET_S = 0.300


class CheckFailed(Exception):
    pass


def insert_events(job_id: int, count: int) -> None:
    """`count` stale events on one job, in one statement."""
    from django.db import connection

    if connection.vendor == "postgresql":
        series = "SELECT n FROM generate_series(1, %s) AS n"
        uuid = "md5(n::text)::uuid"
    else:
        series = "WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < %s) SELECT n FROM s"
        uuid = "'6f1c2a4e-0000-4000-8000-000000000001'"
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO jobs_jobevent (job_id, at, kind, from_status, to_status, attempt, session, actor, reason) "
            f"SELECT %s, CURRENT_TIMESTAMP, 'stale', '', '', n + 1, {uuid}, 'bus', 'stale outcome ' || n "
            f"FROM ({series}) AS numbers",
            [job_id, count],
        )
        if connection.vendor == "postgresql":
            cursor.execute("ANALYZE jobs_jobevent")


def timed(client, url: str, runs: int, *, most_events: int | None = None) -> list[float]:
    response = client.get(url)  # warm-up: templates compiled, caches filled
    if response.status_code != 200:
        raise CheckFailed(f"{url} answered {response.status_code}")
    if most_events is not None:
        shown = response.content.count(b"stale outcome ")
        if shown > most_events:
            raise CheckFailed(f"{url} shows {shown} events, more than {most_events}")
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        client.get(url)
        samples.append(time.perf_counter() - start)
    return samples


def report(label: str, samples: list[float], target: float | None) -> None:
    median = statistics.median(samples)
    runs = ", ".join(f"{s * 1000:.0f}" for s in samples)
    verdict = "" if target is None else ("  OK" if median <= target else "  MISSED")
    goal = "" if target is None else f" (target <= {target * 1000:.0f} ms)"
    print(f"  {label}: median {median * 1000:.0f} ms, runs {runs} ms{goal}{verdict}", flush=True)


def run_backend(args: argparse.Namespace) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres):
        from django.contrib.auth import get_user_model
        from django.db import connection
        from django.test import Client
        from django.test.utils import setup_test_environment

        import jobs.admin
        from jobs import selectors, services

        setup_test_environment()  # the test client's template hooks; ALLOWED_HOSTS gains "testserver"
        user = get_user_model().objects.create_superuser("bench", "bench@example.org", "bench-password")
        client = Client()
        client.force_login(user)
        job = services.enqueue_many(urls=["https://example.com/flooded"], priority=0, actor="bench")[0]
        start = time.perf_counter()
        insert_events(job.pk, args.events)
        print(
            f"{connection.vendor}: {args.events:,} events on job {job.pk} inserted in "
            f"{time.perf_counter() - start:.1f} s; {describe_machine()}",
            flush=True,
        )
        try:
            pages = [
                ("job page /jobs/<id>/", f"/jobs/{job.pk}/", selectors.MAX_EVENTS),
                ("its live part ?fragment=1", f"/jobs/{job.pk}/?fragment=1", selectors.MAX_EVENTS),
                ("admin change page", f"/admin/jobs/job/{job.pk}/change/", jobs.admin.INLINE_EVENTS),
                ("admin event list ?job=<id>", f"/admin/jobs/jobevent/?job={job.pk}", 100),
            ]
            for label, url, cap in pages:
                report(label, timed(client, url, args.runs, most_events=cap), TARGET_S)
            if args.old_events:
                old = services.enqueue_many(urls=["https://example.com/old"], priority=0, actor="bench")[0]
                insert_events(old.pk, args.old_events)
                jobs.admin.INLINE_EVENTS = 10**9  # the old page: every event an inline row
                report(
                    f"old admin change page, every event a row, {args.old_events:,} events",
                    timed(client, f"/admin/jobs/job/{old.pk}/change/", min(args.runs, 3)),
                    None,
                )
        except CheckFailed as exc:
            print(f"  CHECK FAILED: {exc}", flush=True)
            return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--db", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument("--events", type=int, default=100_000, help="events on the job (default 100000)")
    parser.add_argument("--runs", type=int, default=5, help="timed fetches per page; the median is reported")
    parser.add_argument(
        "--old-events", type=int, default=2_000, help="events for the old uncapped admin page, 0 to skip (default 2000)"
    )
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES_URL,
        metavar="URL",
        help=f"PostgreSQL server for the throwaway database (default {DEFAULT_POSTGRES_URL})",
    )
    args = parser.parse_args(argv)
    if min(args.events, args.runs) < 1 or args.old_events < 0:
        parser.error("--events and --runs must be >= 1, --old-events >= 0")
    # Settings are read once per process: one child process per backend.
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
