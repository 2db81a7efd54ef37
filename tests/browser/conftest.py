"""Browser tests: Playwright for Python driving Debian's Chromium against a real jobsite.

A test here starts `manage.py runserver` (with its bus) and the reference
crawler `manage.py runcrawler` as real processes on the test database, a local
`http.server` for the crawler to fetch, and a headless /usr/bin/chromium.
Playwright never downloads a browser: no `playwright install`.

Without /usr/bin/chromium (or without the playwright package) these tests are
skipped on a developer's machine and fail in CI (CI=true), where .ci/run
installs Debian's chromium.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, wait_until

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--no-first-run",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]
SCREENSHOTS = ROOT / "test-output" / "screenshots"
PASSWORD = "browser-test-password"
# Playwright's default wait is 30 s; on a slow shared box a live page may need a few polls more.
EXPECT_TIMEOUT_MS = 30_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: browser tests must run; .ci/run installs Debian's chromium)")
    pytest.skip(reason)


# --- The browser --------------------------------------------------------------------


@pytest.fixture
def browser():
    """A headless Debian Chromium, one per test.

    Not session-scoped: while Playwright's sync API is active its event loop
    counts as running in this thread, so Django would refuse ORM calls as
    "async unsafe", and keeps the connections they open apart from the
    thread's own (asgiref's Local follows the context while a loop runs).
    The flag that allows them is set only while the browser lives, and those
    connections are closed before it goes: one left open would keep
    PostgreSQL from dropping the test database at the end of the run.
    """
    if not os.path.exists(CHROMIUM):
        _unavailable(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("the playwright package is missing: pip install -r requirements-dev.txt")
    from playwright.sync_api import expect

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    previous = os.environ.get("DJANGO_ALLOW_ASYNC_UNSAFE")
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                yield chromium
            finally:
                chromium.close()
                from django.db import connections

                connections.close_all()  # the ORM connections opened while the loop ran
    finally:
        if previous is None:
            os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)
        else:
            os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = previous


def screenshot(page, name: str, *, full_page: bool = True) -> Path:
    """Save a PNG under test-output/screenshots/ and return its path."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=full_page)
    return path


# --- A local web site for the crawler to fetch --------------------------------------------


@dataclass
class LocalWeb:
    """Three small pages at /page/1..3, and /slow/N which holds its answer until `fast` is set (or 60 s)."""

    server: ThreadingHTTPServer
    fast: threading.Event = field(default_factory=threading.Event)

    @property
    def base(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return f"{self.base}{path}"


PAGE_TITLES = {1: "First test page", 2: "Second test page", 3: "Third test page"}


def _page_html(number: int) -> bytes:
    links = "".join(f'<li><a href="/page/{other}">page {other}</a></li>' for other in PAGE_TITLES if other != number)
    return (
        f"<!doctype html><html><head><title>{PAGE_TITLES[number]}</title></head>"
        f'<body><h1>{PAGE_TITLES[number]}</h1><ul>{links}<li><a href="/slow/1">slow</a></li></ul>'
        f"</body></html>"
    ).encode()


@pytest.fixture
def local_web():
    web: LocalWeb

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            match = re.fullmatch(r"/(page|slow)/(\d+)", self.path)
            if not match:
                self.send_error(404)
                return
            kind, number = match.group(1), int(match.group(2))
            if kind == "page" and number in PAGE_TITLES:
                body = _page_html(number)
            elif kind == "slow":
                web.fast.wait(60)  # a job that stays running until the test lets it finish
                body = f"<!doctype html><title>Slow page {number}</title><p>done".encode()
            else:
                self.send_error(404)
                return
            try:
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except OSError:
                pass  # the crawler that asked was killed

        def log_message(self, format, *args):  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    web = LocalWeb(server)
    thread = threading.Thread(target=server.serve_forever, name="local-web", daemon=True)
    thread.start()
    try:
        yield web
    finally:
        web.fast.set()  # release the held handlers
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


# --- jobsite: server, bus, crawler -------------------------------------------------------


class Site:
    """runserver (whose bus talks to one crawler socket) and the reference crawler, as real processes."""

    def __init__(self, processes, socket_path: str):
        self.processes = processes
        self.socket_path = socket_path
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.server = None
        self.crawler = None

    def env(self) -> dict[str, str]:
        env = self.processes.env(
            BUS_ENDPOINTS=self.socket_path,
            HEARTBEAT_TIMEOUT="2",
            BUS_BACKOFF_CAP="0.5",
            BUS_POLL_INTERVAL="0.5",
            BUS_SWEEP_INTERVAL="1",
        )
        env.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)  # the browser fixture's flag is for this process only
        return env

    def url(self, path: str) -> str:
        return self.base_url + path

    def start_crawler(self, *extra: str):
        # A generous fetch timeout: the slow pages must keep their jobs running until the test says so.
        self.crawler = self.processes.manage(
            "runcrawler",
            "--listen",
            self.socket_path,
            "--slots",
            "4",
            "--allow-private",
            "--timeout",
            "90",
            *extra,
            env=self.env(),
            name="runcrawler",
        )
        wait_until(self._crawler_listening, timeout=30, interval=0.05, message="the crawler listening")
        return self.crawler

    def _crawler_listening(self) -> bool:
        if self.crawler.poll() is not None:
            raise AssertionError(f"runcrawler exited:\n{self.processes.output(self.crawler)}")
        return "crawler.listening" in self.processes.output(self.crawler)

    def kill_crawler(self) -> None:
        self.crawler.kill()  # SIGKILL: no bye, the socket just closes
        self.crawler.wait(timeout=10)

    def start_server(self):
        self.server = self.processes.manage(
            "runserver", "--noreload", f"127.0.0.1:{self.port}", env=self.env(), name="runserver"
        )
        wait_until(self._serving, timeout=60, interval=0.1, message="runserver answering")
        return self.server

    def _serving(self) -> bool:
        if self.server.poll() is not None:
            raise AssertionError(f"runserver exited:\n{self.processes.output(self.server)}")
        try:
            with urllib.request.urlopen(self.url("/accounts/login/"), timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def wait_connected(self, timeout: float = 30) -> None:
        from bus.models import BusSession

        wait_until(
            lambda: BusSession.objects.open().exists(), timeout=timeout, interval=0.1, message="a connected bus session"
        )

    def sign_in(self, page, username: str = "admin") -> None:
        from playwright.sync_api import expect

        page.goto(self.url("/"))
        expect(page.locator("#login-form")).to_be_visible()
        page.fill("#login-form [name=username]", username)
        page.fill("#login-form [name=password]", PASSWORD)
        page.click("#login-submit")
        expect(page.locator("#current-user")).to_have_text(username)


@pytest.fixture
def site_socket():
    folder = tempfile.mkdtemp(prefix="jsb-", dir="/tmp")  # AF_UNIX paths must stay short
    try:
        yield os.path.join(folder, "crawler.sock")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def admin_user(transactional_db):
    from django.contrib.auth import get_user_model

    return get_user_model().objects.create_superuser("admin", "admin@example.org", PASSWORD)


@pytest.fixture
def site(processes, site_socket, admin_user):
    """A running jobsite: the crawler is up and the server's bus has a connected session."""
    started = Site(processes, site_socket)
    try:
        started.start_crawler()
        started.start_server()
        started.wait_connected()
        yield started
    finally:
        processes.stop_all()


def deadline_loop(seconds: float):
    """Yield until `seconds` have passed (for checks that something does NOT happen)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        yield
        time.sleep(0.1)
