"""Bus benchmark 5 (issue 3): CPU used by an idle, connected `runbus` over 30 s.

    python bench/bus_idle_cpu.py [--db sqlite|postgres|both] [--seconds 30] [--settle 2]

`manage.py runcrawler --noop` listens on a fresh Unix socket and
`manage.py runbus` connects to it; no job is queued. Once the session is up
(its BusSession row is `connected`) and `--settle` seconds have passed since
runbus started (start-up excluded), runbus's utime + stime are read from
/proc/<pid>/stat, and again `--seconds` later; figure = CPU seconds / wall
seconds, in percent of one core. What the bus costs PostgreSQL in that time
(its database backends' CPU, from /proc) is printed for information.
Checked: the session stayed connected and runbus is still running.
Target: <= 1 %.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import throwaway_database  # noqa: E402
from bench._procs import (  # noqa: E402
    CheckFailed,
    Poller,
    Procs,
    backend_label,
    check,
    load_line,
    parser_for,
    per_backend,
    proc_cpu_seconds,
    verdict,
    wait_for,
)

TARGET_PERCENT = 1.0


def backend_pids(poller: Poller) -> list[int]:
    """PostgreSQL backends of the benchmark database other than the poller's own."""
    if poller.vendor != "postgresql":
        return []
    poller.cursor.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    return [row[0] for row in poller.cursor.fetchall()]


def cpu_of(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            total += proc_cpu_seconds(pid)
        except (OSError, IndexError, ValueError):
            pass
    return total


def run_backend(args) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres) as url:
        from django.db import connection

        label = backend_label(connection.vendor)
        print(
            f"# bus_idle_cpu on {label}: {args.seconds:g} s after {args.settle:g} s of start-up; {load_line()}",
            flush=True,
        )
        connection.close()
        procs = Procs(url, keep_logs=args.keep_logs)
        poller = Poller(url)
        try:
            sock = procs.socket_path()
            procs.manage("runcrawler", "--listen", sock, "--slots", "10", "--noop")
            time.sleep(0.5)
            started = time.monotonic()
            runbus = procs.manage("runbus", "--endpoint", sock)
            wait_for(
                lambda: poller.scalar("SELECT count(*) FROM bus_bussession WHERE state = 'connected'") == 1,
                timeout=30,
                interval=0.1,
                what="the bus session to connect",
            )
            time.sleep(max(0.0, started + args.settle - time.monotonic()))
            pids = backend_pids(poller)
            cpu_before, db_before, wall_before = proc_cpu_seconds(runbus.pid), cpu_of(pids), time.monotonic()
            time.sleep(args.seconds)
            cpu_after, db_after, wall_after = proc_cpu_seconds(runbus.pid), cpu_of(pids), time.monotonic()
            check(runbus.poll() is None, "runbus exited")
            check(
                poller.scalar("SELECT count(*) FROM bus_bussession WHERE state = 'connected'") == 1,
                "the session did not stay connected",
            )
        except CheckFailed as exc:
            print(f"CHECK FAILED ({label}): {exc}", flush=True)
            return 1
        finally:
            poller.close()
            procs.stop_all()
        wall = wall_after - wall_before
        percent = (cpu_after - cpu_before) / wall * 100
        if pids:
            print(
                f"# PostgreSQL backends of the bus ({len(pids)}): {(db_after - db_before) / wall * 100:.2f} % "
                f"of a core over the same {wall:.1f} s",
                flush=True,
            )
        print(
            f"idle runbus CPU ({label}): {percent:.2f} % of a core ({cpu_after - cpu_before:.2f} s CPU in "
            f"{wall:.1f} s)  target <= {TARGET_PERCENT:g} %  {verdict(percent <= TARGET_PERCENT)}",
            flush=True,
        )
        print(f"# {label} done; {load_line()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=2.0, help="start-up seconds excluded (default 2)")
    args = parser.parse_args(argv)
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
