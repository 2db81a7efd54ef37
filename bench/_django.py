"""Shared set-up for the benchmarks: Django on a throwaway database.

    with throwaway_database("sqlite"):            # or "postgres", postgres_url=...
        from jobs.services import claim_jobs      # import models only inside
        ...

SQLite: a temporary file (the project's own settings apply: WAL,
synchronous=NORMAL, BEGIN IMMEDIATE). PostgreSQL: a database named
jobsite_bench_<pid>, created on the server given by `postgres_url` and dropped
at the end. Either way the schema comes from `migrate`, run quietly, so the
benchmark measures the real indexes and constraints.

Settings read the environment once, at django.setup(): one backend per
process. A script that measures several backends runs itself once per backend.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgres://postgres@127.0.0.1:5432/postgres"
BACKENDS = ("sqlite", "postgres")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _server_connection(url: str):
    import psycopg2

    parts = urlsplit(url)
    conn = psycopg2.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=parts.username or "postgres",
        password=parts.password,
        dbname=(parts.path or "/postgres").lstrip("/") or "postgres",
    )
    conn.autocommit = True
    return conn


def _django_setup(database_url: str) -> None:
    os.environ["DJANGO_SETTINGS_MODULE"] = "jobsite.settings"
    os.environ["DEBUG"] = "true"
    os.environ.setdefault("SECRET_KEY", "jobsite-bench-not-secret")
    os.environ["DATABASE_URL"] = database_url
    # A benchmark must not start a bus or talk to a supervisor.
    os.environ["BUS_AUTOSTART"] = "false"
    for name in ("BUS_ENDPOINTS", "SUPERVISOR_SOCKET_PATH", "SOCKET_PATH"):
        os.environ.pop(name, None)
    os.environ.setdefault("LOG_LEVEL", "WARNING")  # no "jobs.reset" line per run

    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", verbosity=0, interactive=False)


def exit_on_sigterm() -> None:
    """Turn SIGTERM (timeout, kill) into SystemExit, so the database is still removed."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


@contextmanager
def throwaway_database(backend: str, *, postgres_url: str = DEFAULT_POSTGRES_URL) -> Iterator[str]:
    """Set Django up on a fresh database of `backend`; yield its URL; remove it afterwards."""
    exit_on_sigterm()
    if backend == "sqlite":
        folder = tempfile.mkdtemp(prefix="jobsite-bench-")
        url = f"sqlite:///{folder}/bench.sqlite3"
        try:
            _django_setup(url)
            yield url
        finally:
            _close_django_connections()
            shutil.rmtree(folder, ignore_errors=True)
    elif backend == "postgres":
        name = f"jobsite_bench_{os.getpid()}"
        server = _server_connection(postgres_url)
        try:
            with server.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}"')
                cursor.execute(f'CREATE DATABASE "{name}"')
            try:
                url = _with_database(postgres_url, name)
                _django_setup(url)
                yield url
            finally:
                _close_django_connections()
                with server.cursor() as cursor:
                    cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            server.close()
    else:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _close_django_connections() -> None:
    if "django.db" in sys.modules:
        from django.db import connections

        connections.close_all()


def describe_machine() -> str:
    """One line: cores and load, for the record (the machine is shared)."""
    load = ", ".join(f"{value:.2f}" for value in os.getloadavg())
    return f"{os.cpu_count()} cores, load average {load}"


def cpu_seconds() -> float:
    """CPU time used so far by this process plus, on a local PostgreSQL, its database backend.

    On a shared machine wall-clock time depends on what else runs; CPU time
    measures what the code itself costs. None-safe: a backend whose process
    cannot be read (remote server) counts as 0, so compare like with like.
    """
    import time

    from django.db import connection

    total = time.process_time()
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total
