"""Bus benchmark 1 (issue 3): end-to-end throughput through real `runbus` and `runcrawler --noop`.

    python bench/bus_throughput.py [--db sqlite|postgres|both] [--jobs 20000] [--slots 500] [--runs 3]
                                   [--crawler runcrawler|module|both]

`--crawler both` (the default) runs the two ways to run the reference
crawler in each run, in alternating order: `manage.py runcrawler --noop` and the Django-free
`python -m jobsite_crawler --noop` (issue 12). Target for the second: no
slower than the first (ratio >= 1.00), measured in the same run.

Per run: `--jobs` jobs are queued through jobs.services.enqueue_many (not
timed), then `manage.py runcrawler --noop --slots S` and `manage.py runbus`
are started on a fresh Unix socket (one session). The figure is jobs / time
from the first assign (the earliest `claim` event's timestamp, written by the
bus) to the moment the benchmark's poll (a raw connection, every 50 ms) sees
all jobs `succeeded`. The span between the first claim event and the last
`finished_at` (both stamped by the bus) is printed as a cross-check.
Checked: every job succeeded at attempt 1 with exactly one claim event.

Median of `--runs` runs (fresh tables and processes each). Target: >= 5,000
jobs/s on PostgreSQL; SQLite is reported without a target.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import throwaway_database  # noqa: E402
from bench._procs import (  # noqa: E402
    CheckFailed,
    Poller,
    Procs,
    backend_label,
    check,
    empty_tables,
    enqueue_jobs,
    load_line,
    median,
    parser_for,
    per_backend,
    verdict,
)

TARGET_JOBS_S = {"postgresql": 5000.0}
POLL_INTERVAL = 0.05


def _timestamp(value) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


CRAWLERS = ("runcrawler", "module")
TARGET_MODULE_RATIO = 1.0


def one_run(url: str, args, crawler: str = "runcrawler") -> tuple[float, float, str]:
    from django.db import connection

    empty_tables()
    enqueue_jobs(args.jobs)
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("VACUUM ANALYZE jobs_job")
            cursor.execute("VACUUM ANALYZE jobs_jobevent")
    procs = Procs(url, keep_logs=args.keep_logs)
    poller = Poller(url)
    try:
        sock = procs.socket_path()
        env = procs.env(LOG_LEVEL=args.log_level)
        if crawler == "module":  # the crawler package alone: no Django settings, no database
            procs.start(
                [sys.executable, "-m", "jobsite_crawler", "--listen", sock, "--slots", str(args.slots), "--noop"],
                env=env,
                name="jobsite_crawler",
            )
        else:
            procs.manage("runcrawler", "--listen", sock, "--slots", str(args.slots), "--noop", env=env)
        time.sleep(0.05)
        runbus = procs.manage(
            "runbus",
            "--endpoint",
            sock,
            env=env,
            python_args=(
                (str(Path(__file__).with_name("_procs.py")), "--profile-threads", str(procs.folder / "profile"))
                if args.profile
                else ()
            )
            + ((args.wrap,) if args.wrap else ()),
        )
        deadline = time.monotonic() + args.timeout
        done_at = None
        while time.monotonic() < deadline:
            if poller.count("succeeded") >= args.jobs:
                done_at = time.time()
                break
            if runbus.poll() is not None:
                raise CheckFailed(f"runbus exited with {runbus.returncode}:\n{procs.log_text(runbus)[-2000:]}")
            time.sleep(POLL_INTERVAL)
        check(
            done_at is not None,
            f"not all {args.jobs} jobs succeeded within {args.timeout} s (succeeded: {poller.count('succeeded')})",
        )
        first_claim = poller.scalar("SELECT min(at) FROM jobs_jobevent WHERE kind = 'claim'")
        last_finish = poller.scalar("SELECT max(finished_at) FROM jobs_job")
        check(poller.count("succeeded") == args.jobs, "succeeded count")
        check(int(poller.scalar("SELECT count(*) FROM jobs_job WHERE attempt <> 1")) == 0, "a job ran twice")
        check(
            int(poller.scalar("SELECT count(*) FROM jobs_jobevent WHERE kind = 'claim'")) == args.jobs,
            "one claim event per job",
        )
        start = _timestamp(first_claim)
        polled = args.jobs / (done_at - start)
        stamped = args.jobs / (_timestamp(last_finish) - start)
        if args.profile:
            procs.stop(runbus)
            print(f"# profiles of runbus's threads: {procs.folder / 'profile'}", flush=True)
        return polled, stamped, procs.folder.name
    finally:
        poller.close()
        if args.profile:
            procs.keep_logs = True
        procs.stop_all()


def run_backend(args) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres) as url:
        from django.db import connection

        vendor = connection.vendor
        label = backend_label(vendor)
        crawlers = CRAWLERS if args.crawler == "both" else (args.crawler,)
        print(
            f"# bus_throughput on {label}: {args.jobs} jobs, {' and '.join(crawlers)} --noop --slots {args.slots}, "
            f"one session; {load_line()}",
            flush=True,
        )
        rates: dict[str, list[float]] = {crawler: [] for crawler in crawlers}
        try:
            for number in range(1, args.runs + 1):
                # The order alternates: the second run of a pair must not always be the same one.
                for crawler in crawlers if number % 2 else crawlers[::-1]:
                    rate, stamped, _ = one_run(url, args, crawler)
                    rates[crawler].append(rate)
                    print(
                        f"#   run {number} ({crawler}): {rate:,.0f} jobs/s (bus timestamps: {stamped:,.0f} jobs/s); "
                        f"{load_line()}",
                        flush=True,
                    )
        except CheckFailed as exc:
            print(f"CHECK FAILED ({label}): {exc}", flush=True)
            return 1
        if len(crawlers) == 2:
            ratio = median(rates["module"]) / median(rates["runcrawler"])
            print(
                f"python -m jobsite_crawler vs runcrawler ({label}): {median(rates['module']):,.0f} vs "
                f"{median(rates['runcrawler']):,.0f} jobs/s, ratio {ratio:.2f}  target >= {TARGET_MODULE_RATIO:.2f}  "
                f"{verdict(ratio >= TARGET_MODULE_RATIO)}",
                flush=True,
            )
        rates_list = rates[crawlers[0]]
        figure = median(rates_list)
        target = TARGET_JOBS_S.get(vendor)
        runs = ", ".join(f"{r:,.0f}" for r in rates_list)
        if target:
            print(
                f"end-to-end throughput ({label}, {crawlers[0]}): {figure:,.0f} jobs/s  "
                f"target >= {target:,.0f} jobs/s  "
                f"{verdict(figure >= target)}  (runs: {runs})",
                flush=True,
            )
        else:
            print(
                f"end-to-end throughput ({label}, {crawlers[0]}): {figure:,.0f} jobs/s  (no target)  (runs: {runs})",
                flush=True,
            )
        print(f"# {label} done; {load_line()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--slots", type=int, default=500, help="runcrawler --slots (default 500)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--crawler",
        choices=[*CRAWLERS, "both"],
        default="both",
        help="runcrawler (manage.py), module (python -m jobsite_crawler) or both, alternating (default)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take at most")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of runbus and runcrawler (default INFO)")
    parser.add_argument(
        "--profile", action="store_true", help="profile every thread of runbus with cProfile (keeps the .prof files)"
    )
    parser.add_argument(
        "--wrap",
        metavar="SCRIPT",
        default=None,
        help="experiments: start runbus as `python SCRIPT manage.py runbus ...` (SCRIPT runs argv[1:])",
    )
    args = parser.parse_args(argv)
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
