"""Shared helpers of the bus benchmarks (issue 3): real processes, sockets, cheap polling.

    with throwaway_database(backend) as url:           # bench/_django.py
        procs = Procs(url)
        try:
            sock = procs.socket_path()
            procs.manage("runcrawler", "--listen", sock, "--slots", "500", "--noop")
            procs.manage("runbus", "--endpoint", sock)
            ...
        finally:
            procs.stop_all()

Every process is started by this module, logs to a file in a private temp
folder, and is ended by its own id (SIGTERM, then SIGKILL): nothing else on
the machine is touched. `Poller` is a raw DB-API connection (psycopg2 or
sqlite3, autocommit) for tight polling loops that must cost little.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from urllib.parse import urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import BACKENDS, DEFAULT_POSTGRES_URL, ROOT, exit_on_sigterm

# Politeness off unless a benchmark asks for it (issue 11): most benchmarks
# queue many jobs on one host and measure other things than per-host delays;
# with the defaults (HOST_DELAY 1 s, HOST_CONCURRENCY 2, ROBOTS_TXT obey: a
# host's jobs wait for its robots.txt) they would measure politeness. Given to
# every process started here (Procs.env; a caller's own values win) and to
# this process's Django settings, read at django.setup(), which every
# benchmark calls after importing this module (not when this file runs as a
# wrapper, --profile-threads: the command keeps the values it was given).
BENCH_POLITENESS = {"HOST_DELAY": "0", "HOST_CONCURRENCY": "1000000", "ROBOTS_TXT": "ignore"}
if __name__ != "__main__":
    os.environ.update(BENCH_POLITENESS)


class CheckFailed(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100).

    Nearest rank: the smallest value with at least q % of the samples at or
    below it. With 20 samples p99 is the maximum, p50 the 10th value.
    """
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100)
    return ordered[int(rank) - 1]


def verdict(ok: bool) -> str:
    return "OK" if ok else "MISSED"


def load_line() -> str:
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load}"


class Procs:
    """Processes of one benchmark, on one database; `stop_all` ends each by its id."""

    def __init__(self, database_url: str, *, keep_logs: bool = False):
        self.database_url = database_url
        self.folder = Path(tempfile.mkdtemp(prefix="jsb-", dir="/tmp"))  # short: AF_UNIX paths are <108 bytes
        self.started: list[subprocess.Popen] = []
        self.keep_logs = keep_logs
        self._sockets = 0

    def socket_path(self) -> str:
        self._sockets += 1
        return str(self.folder / f"c{self._sockets}.sock")

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        for name in ("BUS_ENDPOINTS", "SUPERVISOR_SOCKET_PATH", "SOCKET_PATH", "LOG_LEVEL", "BUS_AUTOSTART"):
            env.pop(name, None)
        env.update(
            DATABASE_URL=self.database_url,
            DEBUG="true",
            PYTHONUNBUFFERED="1",
            SECRET_KEY="jobsite-bench-not-secret",
            BUS_AUTOSTART="true",
            **BENCH_POLITENESS,
        )
        env.update({key: str(value) for key, value in extra.items()})
        return env

    def start(
        self,
        argv: list[str],
        *,
        env: dict | None = None,
        name: str = "proc",
        new_session: bool = False,
        stdin=subprocess.DEVNULL,
    ) -> subprocess.Popen:
        log = open(self.folder / f"{name}-{len(self.started)}.log", "wb")
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=env or self.env(),
            stdin=stdin,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=new_session,
        )
        log.close()
        proc.log_path = log.name  # type: ignore[attr-defined]
        proc.own_group = new_session  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def manage(
        self, *args: str, env: dict | None = None, new_session: bool = False, python_args: Sequence[str] = ()
    ) -> subprocess.Popen:
        return self.start(
            [sys.executable, *python_args, str(ROOT / "manage.py"), *args],
            env=env,
            name=args[0],
            new_session=new_session,
        )

    def held_crawler(self, path: str, slots: int) -> subprocess.Popen:
        """tests/crawler_peer.py as a process: it takes `slots` assignments and holds them unanswered."""
        # stdin is a pipe that stays open: the peer select()s on it for commands.
        return self.start(
            [sys.executable, str(ROOT / "tests" / "crawler_peer.py"), "--listen", path, "--slots", str(slots)],
            name="held",
            stdin=subprocess.PIPE,
        )

    def log_text(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    @staticmethod
    def stop(proc: subprocess.Popen, *, timeout: float = 6.0) -> None:
        if proc.poll() is None:
            try:
                if getattr(proc, "own_group", False):
                    os.killpg(proc.pid, signal.SIGTERM)  # runserver's autoreloader child is in its group
                else:
                    proc.terminate()
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                try:
                    if getattr(proc, "own_group", False):
                        os.killpg(proc.pid, signal.SIGKILL)
                    else:
                        proc.kill()
                except ProcessLookupError:
                    pass
                proc.wait(5)
        elif getattr(proc, "own_group", False):
            try:  # the leader is gone; a child of its group may still run
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        if proc.stdin:
            try:
                proc.stdin.close()
            except OSError:
                pass

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)
        self.started.clear()
        if not self.keep_logs:
            shutil.rmtree(self.folder, ignore_errors=True)


class Poller:
    """A raw autocommit connection to the benchmark database, for cheap polling queries."""

    def __init__(self, database_url: str):
        parts = urlsplit(database_url)
        if parts.scheme.startswith("sqlite"):
            self.vendor = "sqlite"
            self.conn = sqlite3.connect(database_url[len("sqlite:///") :], isolation_level=None, timeout=20)
        else:
            import psycopg2

            self.vendor = "postgresql"
            self.conn = psycopg2.connect(
                host=parts.hostname or "127.0.0.1",
                port=parts.port or 5432,
                user=parts.username or "postgres",
                password=parts.password,
                dbname=parts.path.lstrip("/"),
            )
            self.conn.autocommit = True
        self.cursor = self.conn.cursor()

    def scalar(self, sql: str, params: Sequence = ()) -> object:
        if self.vendor == "sqlite":
            sql = sql.replace("%s", "?")
        self.cursor.execute(sql, params)
        return self.cursor.fetchone()[0]

    def count(self, status: str) -> int:
        return int(self.scalar("SELECT count(*) FROM jobs_job WHERE status = %s", (status,)))

    def close(self) -> None:
        self.conn.close()


def wait_for(condition: Callable[[], bool], *, timeout: float, interval: float = 0.05, what: str) -> float:
    """Poll until `condition()`; return the monotonic time it first held; CheckFailed at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return time.monotonic()
        if time.monotonic() >= deadline:
            raise CheckFailed(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def enqueue_jobs(count: int, *, max_interruptions: int | None = None) -> list[int]:
    """Queue `count` jobs through jobs.services (Django must be set up); not timed by callers."""
    from jobs import services
    from jobs.models import Job

    ids: list[int] = []
    for start in range(0, count, 5000):
        urls = [f"https://example.com/bench/{i}" for i in range(start, min(count, start + 5000))]
        ids += [job.id for job in services.enqueue_many(urls=urls, actor="bench")]
    if max_interruptions is not None:
        Job.objects.filter(id__in=ids).update(max_interruptions=max_interruptions)
    return ids


def empty_tables() -> None:
    """Remove jobs, events and bus sessions between runs (Django must be set up)."""
    from django.db import connection

    with connection.cursor() as cursor:
        if connection.vendor == "postgresql":
            cursor.execute("TRUNCATE jobs_jobitems, jobs_jobevent, jobs_job, bus_bussession RESTART IDENTITY")
        else:
            for table in ("jobs_jobitems", "jobs_jobevent", "jobs_job", "bus_bussession"):
                cursor.execute(f"DELETE FROM {table}")


def parser_for(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--db", choices=(*BACKENDS, "both"), default="both")
    parser.add_argument(
        "--postgres",
        default=DEFAULT_POSTGRES_URL,
        metavar="URL",
        help=f"PostgreSQL server for the throwaway database (default {DEFAULT_POSTGRES_URL})",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")
    return parser


def per_backend(
    args: argparse.Namespace, script: str, argv: list[str] | None, run: Callable[[argparse.Namespace], int]
) -> int:
    """Run `run(args)` for one backend, or this script once per backend (settings are per process)."""
    if args.db != "both":
        return run(args)
    status = 0
    rest = list(sys.argv[1:] if argv is None else argv)
    cleaned: list[str] = []
    skip = False
    for item in rest:
        if skip:
            skip = False
            continue
        if item == "--db":
            skip = True
            continue
        if item.startswith("--db="):
            continue
        cleaned.append(item)
    exit_on_sigterm()  # so that a SIGTERM reaches the child, which then drops its database
    for backend in BACKENDS:
        process = subprocess.Popen([sys.executable, script, "--db", backend, *cleaned])
        try:
            status = max(status, process.wait())
        except BaseException:
            process.terminate()  # SIGTERM: the child still drops its database
            process.wait()
            raise
    return status


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def backend_label(vendor: str) -> str:
    return {"postgresql": "PostgreSQL", "sqlite": "SQLite"}.get(vendor, vendor)


# --- Profiling every thread of a manage.py command ---------------------------------------
#
#   python bench/_procs.py --profile-threads OUT_DIR manage.py runbus --endpoint ...
#
# `python -m cProfile` profiles the main thread only, and the bus works in
# other threads (session IO, session worker, LISTEN, sweeper). This wraps
# threading.Thread's bootstrap so that each thread (a subclass's run() too) writes OUT_DIR/<thread name>.prof
# when it ends (the main thread too, at exit); merge them with pstats.


def _profile_threads(out_dir: str, argv: list[str]) -> None:
    import atexit
    import cProfile
    import runpy
    import threading

    os.makedirs(out_dir, exist_ok=True)
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self) -> None:  # wraps run(), overridden or not
        profile = cProfile.Profile()
        profile.enable()
        try:
            original(self)
        finally:
            profile.disable()
            name = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in self.name)
            profile.dump_stats(os.path.join(out_dir, f"{name}-{threading.get_ident()}.prof"))

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]
    main_profile = cProfile.Profile()
    atexit.register(lambda: (main_profile.disable(), main_profile.dump_stats(os.path.join(out_dir, "main.prof"))))
    sys.argv = argv
    main_profile.enable()
    runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--profile-threads":
        sys.path.insert(0, str(ROOT))
        _profile_threads(sys.argv[2], sys.argv[3:])
    else:
        sys.exit("usage: python bench/_procs.py --profile-threads OUT_DIR manage.py COMMAND ...")
