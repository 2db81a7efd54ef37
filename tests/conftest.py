"""Shared test helpers: deadlines instead of sleeps, free ports, real subprocesses."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wait_until(predicate, *, timeout: float = 10.0, interval: float = 0.01, message: str = "condition"):
    """Poll `predicate` until it returns a truthy value or the deadline passes."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}; last value: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def local_site(title: str, *, held: bool = False):
    """A local http.server answering every GET with a small HTML page titled `title`.

    Yields (base URL, release, requests): with held=True each request waits
    until the test sets `release`; `requests` lists (path, monotonic time).
    """
    release, requests = threading.Event(), []
    if not held:
        release.set()
    body = f"<html><head><title>{title}</title></head><body>ok</body></html>".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append((self.path, time.monotonic()))
            release.wait(30)
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", release, requests
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def database_url() -> str:
    """The URL of the database the tests use, for processes the tests start."""
    from django.db import connection

    config = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{config['NAME']}"
    user = config.get("USER") or "postgres"
    password = f":{config['PASSWORD']}" if config.get("PASSWORD") else ""
    host = config.get("HOST") or "127.0.0.1"
    port = config.get("PORT") or 5432
    return f"postgres://{user}{password}@{host}:{port}/{config['NAME']}"


def is_postgres() -> bool:
    from django.db import connection

    return connection.vendor == "postgresql"


class Processes:
    """Starts real subprocesses (manage.py commands) and ends every one of them."""

    def __init__(self, tmp_path: Path):
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen] = []

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        env.update(
            DATABASE_URL=database_url(),
            DEBUG="true",
            PYTHONUNBUFFERED="1",
            BUS_AUTOSTART="true",
        )
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def manage(self, *args: str, env: dict | None = None, name: str | None = None, **popen) -> subprocess.Popen:
        name = name or args[0]
        log = open(self.tmp_path / f"{name}-{len(self.started)}.log", "wb")
        popen.setdefault("start_new_session", True)  # its own process group: see stop_all
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "manage.py"), *args],
            cwd=ROOT,
            env=env or self.env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            **popen,
        )
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def output(self, proc: subprocess.Popen) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def print_logs(self, lines: int = 200) -> None:
        """The end of every started process's output: what a failed test needs to be understood."""
        for proc in self.started:
            path = getattr(proc, "log_path", None)
            if path and os.path.exists(path):
                tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
                print(f"--- {Path(path).name} (pid {proc.pid}, exit {proc.poll()}) ---", *tail, sep="\n")

    def stop_all(self) -> None:
        """Kill every process started, and their children: runserver's autoreloader
        serves (and runs its bus) in a child that would outlive its killed parent
        and keep sweeping the test database."""
        for proc in self.started:
            for send in (lambda sig: os.killpg(proc.pid, sig), lambda sig: os.kill(proc.pid, sig)):
                try:
                    send(signal.SIGCONT)
                    send(signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        for proc in self.started:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def vacuumed_tables():
    """On PostgreSQL, VACUUM ANALYZE the job tables first (from a connection of its own).

    Tests roll back what they insert, and the dead rows stay until autovacuum
    comes: after the 40,000-job reset test, the state-machine property test's
    thousands of small queries took 246 s instead of 69 s. Real deployments
    have autovacuum on a live workload; a test that issues 35,000 queries in
    a few minutes needs the tables clean when it starts.
    """
    from django.db import connection

    if connection.vendor == "postgresql":
        import psycopg2

        conn = psycopg2.connect(**connection.get_connection_params())
        try:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE jobs_job, jobs_jobevent")
        finally:
            conn.close()
    yield


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.when == "call":
        item.call_failed = report.failed
    return report


@pytest.fixture
def processes(tmp_path, request):
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()
    if getattr(request.node, "call_failed", False):
        procs.print_logs()


@pytest.fixture
def short_socket_path():
    """A Unix socket path short enough for AF_UNIX (pytest's tmp_path can be too long)."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="js-", dir="/tmp")
    yield os.path.join(folder, "crawler.sock")
    import shutil

    shutil.rmtree(folder, ignore_errors=True)


# Modules whose tests use no database at all: the crawler side (jobsite_crawler,
# Django-free) and the wire format. bin/test runs them once, in the SQLite run,
# and sets DATABASE_INDEPENDENT_TESTS=once-elsewhere for the PostgreSQL and
# Django 6 runs, where they would repeat the same checks (CI has 30 minutes).
DATABASE_INDEPENDENT = frozenset(
    {
        "test_crawler.py",
        "test_crawler_fleet_side.py",
        "test_crawler_library.py",
        "test_crawlercheck.py",
        "test_endpoints.py",
        "test_fetch.py",
        "test_protocol.py",
    }
)


def pytest_collection_modifyitems(config, items):
    from django.db import connection

    if connection.vendor != "postgresql":
        skip = pytest.mark.skip(reason="needs PostgreSQL (set DATABASE_URL=postgres://...)")
        for item in items:
            if "postgres" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("DATABASE_INDEPENDENT_TESTS") == "once-elsewhere":
        kept = [item for item in items if item.path.name not in DATABASE_INDEPENDENT]
        config.hook.pytest_deselected(items=[item for item in items if item.path.name in DATABASE_INDEPENDENT])
        items[:] = kept


class HeldCrawler:
    """tests/crawler_peer.py as a real process that holds its jobs; its JSON lines are collected."""

    def __init__(self, path: str, *args: str):
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "crawler_peer.py"), "--listen", path, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wait_until(lambda: any("listening" in line for line in self.lines), timeout=10, message="crawler listening")

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.lines.append(json.loads(line))
            except ValueError:
                self.lines.append({"text": line})

    def assigned(self) -> list[tuple[int, int]]:
        return [(line["assign"], line["attempt"]) for line in list(self.lines) if "assign" in line]

    def acks(self) -> dict[tuple[int, int], str]:
        return {(line["ack"], line["attempt"]): line["status"] for line in list(self.lines) if "ack" in line}

    def command(self, text: str) -> None:
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def held_crawlers():
    started: list[HeldCrawler] = []

    def start(path: str, *args: str) -> HeldCrawler:
        crawler = HeldCrawler(path, *args)
        started.append(crawler)
        return crawler

    yield start
    for crawler in started:
        crawler.stop()


@pytest.fixture
def session_a():
    return uuid.uuid4()


@pytest.fixture
def session_b():
    return uuid.uuid4()
