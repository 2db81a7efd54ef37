"""Fault benchmark 2 (issue 4): PostgreSQL restarted under a load of 1,000 jobs/s.

    python bench/fault_pg_restart.py [--seconds 20] [--rate 1000] [--batch 50] [--drain 300]

PostgreSQL only, on a private server (tests/pg_instance.PrivatePostgres: its
own initdb folder and port, destroyed at the end), so the restart disturbs
nothing else. `manage.py runbus` and the reference crawler `manage.py
runcrawler --noop --slots 200` run against a database on it. A producer
thread in this process (Django set up against that database) calls
`jobs.services.enqueue_many` with a batch of `--batch` jobs every
`--batch/--rate` seconds (50 every 50 ms) for `--seconds`; a batch that fails
is retried until it is committed (every batch has its own URLs, so a commit
whose answer was lost is found again instead of enqueued twice); only
committed jobs count. Half-way the private server is restarted once
(`pg_ctl stop -m fast`, then start): every connection is cut.

Measured, after waiting up to `--drain` s for every committed job to succeed:
- jobs lost: committed jobs not `succeeded` at the drain deadline (target 0);
- duplicates: jobs with more than one `outcome` event (must be 0);
- time until throughput is back: from the start of the restart to the end of
  the first 1-second window (sliding, 50 ms steps, by `finished_at`) with at
  least 80 % of the succeeded-per-second rate of the steady window before the
  restart (from `--warmup` s after the start to the restart). Reported, no
  target.
Checked: every committed job terminal, none running, no outcome recorded
twice, both processes still alive.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import _django_setup, exit_on_sigterm  # noqa: E402
from bench._procs import CheckFailed, Poller, Procs, check, load_line, verdict, wait_for  # noqa: E402
from tests.pg_instance import PrivatePostgres  # noqa: E402

DB_NAME = "jobsite_bench_restart"
BACK_FRACTION = 0.8


class Producer(threading.Thread):
    """Enqueue `batch` jobs every `period` s through jobs.services.enqueue_many; retry a batch until committed."""

    def __init__(self, *, batch: int, period: float, seconds: float):
        super().__init__(name="producer", daemon=True)
        self.batch, self.period, self.seconds = batch, period, seconds
        self.committed: list[int] = []
        self.batches = 0
        self.failures = 0  # failed attempts (each retried)
        self.found_after_failure = 0  # batches whose commit had succeeded although the call failed
        self.longest_retry = 0.0
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def _commit(self, urls: list[str]) -> list[int]:
        from django.db import connection

        from jobs import services
        from jobs.models import Job

        first_failure = None
        while True:
            try:
                if first_failure is not None:
                    # Did an earlier attempt commit before its answer was lost?
                    ids = sorted(Job.objects.filter(url__in=urls).values_list("id", flat=True))
                    if ids:
                        check(len(ids) == len(urls), f"batch partly committed: {len(ids)} of {len(urls)}")
                        self.found_after_failure += 1
                        return ids
                return [job.id for job in services.enqueue_many(urls=urls, actor="bench")]
            except CheckFailed:
                raise
            except Exception:  # the database went away: reconnect and try again
                self.failures += 1
                now = time.monotonic()
                if first_failure is None:
                    first_failure = now
                self.longest_retry = max(self.longest_retry, now - first_failure)
                try:
                    connection.close()
                except Exception:
                    pass
                if self.stop.wait(0.05):
                    raise
            finally:
                if first_failure is not None:
                    self.longest_retry = max(self.longest_retry, time.monotonic() - first_failure)

    def run(self) -> None:
        try:
            start = time.monotonic()
            due = start
            while not self.stop.is_set() and time.monotonic() - start < self.seconds:
                urls = [f"https://example.com/restart/{self.batches}/{i}" for i in range(self.batch)]
                self.committed += self._commit(urls)
                self.batches += 1
                due += self.period
                # No catch-up burst after an outage: the next batch is due one period after this commit at the latest.
                due = max(due, time.monotonic() - self.period)
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            from django.db import connection

            connection.close()


def reconnecting_poller(url: str, timeout: float = 30.0) -> Poller:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Poller(url)
        except Exception:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def recovery_time(finished: list[float], restart_at: float, down_at: float, rate_before: float) -> float | None:
    """Seconds from restart_at to the end of the first 1-s window with >= 80 % of rate_before succeeded.

    Windows start once the server is down (`pg_ctl stop -m fast` returned, every connection cut), so
    outcomes committed in the instant before the stop cannot make the first window look recovered.
    """
    finished = sorted(finished)
    import bisect

    start = down_at
    end_of_data = finished[-1] if finished else restart_at
    while start <= end_of_data:
        count = bisect.bisect_left(finished, start + 1.0) - bisect.bisect_left(finished, start)
        if count >= BACK_FRACTION * rate_before:
            return start + 1.0 - restart_at
        start += 0.05
    return None


def run(args) -> int:
    exit_on_sigterm()
    server = PrivatePostgres()
    procs: Procs | None = None
    producer: Producer | None = None
    poller: Poller | None = None
    try:
        server.start()
        server.create_database(DB_NAME)
        url = server.database_url(DB_NAME)
        _django_setup(url)
        version = server._run("postgres", "--version").stdout.strip()
        print(
            f"# fault_pg_restart on a private PostgreSQL ({version}, fsync off, port {server.port}): producer "
            f"{args.rate:g} jobs/s in batches of {args.batch} for {args.seconds:g} s, restart at "
            f"{args.restart_at:g} s; runcrawler --noop --slots {args.slots}; {load_line()}",
            flush=True,
        )
        procs = Procs(url, keep_logs=args.keep_logs)
        sock = procs.socket_path()
        crawler = procs.manage("runcrawler", "--listen", sock, "--slots", str(args.slots), "--noop")
        bus = procs.manage("runbus", "--endpoint", sock)
        poller = Poller(url)
        wait_for(
            lambda: int(poller.scalar("SELECT count(*) FROM bus_bussession WHERE state = 'connected'")) == 1,
            timeout=60,
            what="the bus connected",
        )
        poller.close()
        poller = None

        producer = Producer(batch=args.batch, period=args.batch / args.rate, seconds=args.seconds)
        began = time.time()
        producer.start()
        time.sleep(args.restart_at)
        load_at_restart = os.getloadavg()[0]
        restart_at = time.time()
        server.stop("fast")
        stopped_at = time.time()
        server.start()
        up_at = time.time()
        producer.join(args.seconds + 120)
        check(not producer.is_alive(), "the producer did not finish")
        if producer.error is not None:
            raise producer.error
        produced_until = time.time()
        committed = producer.committed
        check(len(set(committed)) == len(committed), "the producer got one job id twice")

        poller = reconnecting_poller(url)
        ids_table = "(SELECT unnest(%s::bigint[]) AS id)"
        drain_deadline = time.monotonic() + args.drain
        while True:
            done = int(
                poller.scalar(
                    f"SELECT count(*) FROM jobs_job j JOIN {ids_table} c USING (id) WHERE j.status = 'succeeded'",
                    (committed,),
                )
            )
            if done == len(committed) or time.monotonic() >= drain_deadline:
                break
            time.sleep(0.5)
        drained_at = time.time()
        check(bus.poll() is None, f"runbus exited with {bus.returncode}")
        check(crawler.poll() is None, f"runcrawler exited with {crawler.returncode}")

        lost = len(committed) - done
        poller.cursor.execute(
            f"SELECT j.status, count(*) FROM jobs_job j JOIN {ids_table} c USING (id) GROUP BY j.status", (committed,)
        )
        by_status = dict(poller.cursor.fetchall())
        duplicates = int(
            poller.scalar(
                "SELECT count(*) FROM (SELECT job_id FROM jobs_jobevent WHERE kind = 'outcome' "
                "GROUP BY job_id HAVING count(*) > 1) AS d"
            )
        )
        total_jobs = int(poller.scalar("SELECT count(*) FROM jobs_job"))
        running = poller.count("running")
        interrupts = int(poller.scalar("SELECT count(*) FROM jobs_jobevent WHERE kind = 'interrupt'"))
        stale = int(poller.scalar("SELECT count(*) FROM jobs_jobevent WHERE kind = 'stale'"))
        poller.cursor.execute(
            "SELECT extract(epoch FROM finished_at) FROM jobs_job "
            "WHERE status = 'succeeded' AND finished_at IS NOT NULL"
        )
        finished = [float(row[0]) for row in poller.cursor.fetchall()]

        window_start = began + args.warmup
        before = [t for t in finished if window_start <= t < restart_at]
        rate_before = len(before) / (restart_at - window_start)
        back = recovery_time(finished, restart_at, stopped_at, rate_before)
        first_after = min((t for t in finished if t > stopped_at), default=None)
        steady = sorted(before)
        steady_gap = max((b - a for a, b in zip(steady, steady[1:])), default=0.0)
        # The longest gap between two successive outcomes around the restart: how long work stood still.
        around = sorted(t for t in finished if restart_at - 2 <= t <= up_at + 5)
        gaps = [(b - a, a) for a, b in zip(around, around[1:])]
        stall, stall_from = max(gaps) if gaps else (0.0, restart_at)
        after = [t for t in finished if up_at + 5 <= t < min(produced_until, up_at + 15)]
        rate_after = len(after) / max(1e-9, min(produced_until, up_at + 15) - (up_at + 5))

        print(
            f"# producer: {len(committed)} jobs committed in {producer.batches} batches "
            f"({len(committed) / (produced_until - began):.0f} jobs/s over {produced_until - began:.1f} s); "
            f"{producer.failures} failed attempts, {producer.found_after_failure} batches found committed after "
            f"a failure, longest retry {producer.longest_retry:.2f} s; {total_jobs} jobs in the table",
            flush=True,
        )
        print(
            f"# restart at {restart_at - began:.2f} s: stop (fast) took {stopped_at - restart_at:.2f} s, "
            f"start {up_at - stopped_at:.2f} s (down {up_at - restart_at:.2f} s); load {load_at_restart:.2f} "
            f"at the restart",
            flush=True,
        )
        print(
            f"# succeeded/s: {rate_before:.0f} before the restart ({args.warmup:g} s to the restart), "
            f"{rate_after:.0f} from 5 to 15 s after it was up; longest gap between outcomes "
            f"{stall:.2f} s from {stall_from - restart_at:+.2f} s (longest in the steady window before: "
            f"{steady_gap:.2f} s; outcomes are committed in batches with one finished_at each); first outcome "
            f"after the stop at {(first_after - restart_at) if first_after else float('nan'):+.2f} s; "
            f"drained {drained_at - produced_until:.1f} s "
            f"after the producer stopped; statuses {by_status}; {interrupts} interrupt events, {stale} stale "
            f"events",
            flush=True,
        )
        print(
            f"jobs lost (PostgreSQL restart under {args.rate:g} jobs/s, {len(committed)} committed): {lost}  "
            f"target 0  {verdict(lost == 0)}",
            flush=True,
        )
        print(
            f"duplicates (jobs with more than one outcome event): {duplicates}  target 0  {verdict(duplicates == 0)}",
            flush=True,
        )
        if back is None:
            print(
                f"time until throughput is back (>= {BACK_FRACTION:.0%} of {rate_before:.0f} jobs/s in a 1 s "
                f"window): never  reported, no target",
                flush=True,
            )
        else:
            print(
                f"time until throughput is back (>= {BACK_FRACTION:.0%} of {rate_before:.0f} jobs/s in a 1 s "
                f"window, from the restart): {back:.2f} s ({back - (up_at - restart_at):.2f} s after the server "
                f"was up)  reported, no target",
                flush=True,
            )
        check(running == 0, f"{running} jobs still running after the drain")
        check(duplicates == 0, f"{duplicates} jobs have more than one outcome event")
        check(lost == 0, f"{lost} committed jobs did not succeed within {args.drain:g} s")
        print(f"# done; {load_line()}", flush=True)
        return 0
    except CheckFailed as exc:
        print(f"CHECK FAILED (PostgreSQL restart): {exc}", flush=True)
        if procs is not None and args.keep_logs:
            print(f"# logs in {procs.folder}; server log tail:\n{server.read_log()}", flush=True)
        return 1
    finally:
        if producer is not None:
            producer.stop.set()
        if poller is not None:
            try:
                poller.close()
            except Exception:
                pass
        if procs is not None:
            procs.stop_all()
        if "django.db" in sys.modules:
            from django.db import connections

            try:
                connections.close_all()
            except Exception:
                pass
        server.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the producer runs (default 20)")
    parser.add_argument("--restart-at", type=float, default=None, help="seconds after the start (default half-way)")
    parser.add_argument("--rate", type=float, default=1000.0, help="jobs/s enqueued (default 1000)")
    parser.add_argument("--batch", type=int, default=50, help="jobs per enqueue_many call (default 50)")
    parser.add_argument("--slots", type=int, default=200, help="runcrawler slots (default 200)")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds before the steady window (default 3)")
    parser.add_argument("--drain", type=float, default=300.0, help="drain deadline in s (default 300)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")
    args = parser.parse_args(argv)
    if args.restart_at is None:
        args.restart_at = args.seconds / 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
