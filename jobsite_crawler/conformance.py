"""Conformance checker: plays the bus against a crawler and judges it rule by rule.

    python -m jobsite_crawler.conformance ENDPOINT [--token T] [--timeout S] [--only RULES]
    manage.py crawlercheck ENDPOINT [--token T]          (the same, defaults from settings)

A crawler written in any language is checked over its socket, as the bus
would see it, against PROTOCOL.md (and docs/protocol.md where jobsite made a
choice the contract leaves open). Each rule prints one line,
`PASS|FAIL|SKIP <rule>: <reason>`, then a summary line; the exit status is 0
when nothing failed, 1 when a rule failed, 2 for a usage error (a bad
endpoint, a crawler that cannot be reached or refuses our token).

The jobs it assigns fetch pages from a small HTTP server the checker runs on
a free port of 127.0.0.1: `/page/NAME` answers at once, `/slow/NAME` holds
the request until the checker releases it, which is how it sees jobs running
and can cancel them or end their session mid-job. So the crawler under test
must fetch each job's URL and be allowed to reach loopback addresses (the
reference crawler needs `--allow-private`).

What is required and what is optional follows PROTOCOL.md: resuming jobs
across sessions (ready.running, bye.resume_within) is optional, so a crawler
without it gets a SKIP there, as long as it stops the jobs of an ended
session, which is required. No Django here: crawler authors run it on its own.
"""

from __future__ import annotations

import argparse
import http.server
import itertools
import os
import random
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .argtypes import seconds, whole_number
from .endpoints import Endpoint, EndpointError, parse_endpoint
from .wire import (
    BAD_FRAME,
    DEFAULT_MAX_FRAME,
    HANDSHAKE_TIMEOUT,
    PROTOCOL_VERSION,
    UNAUTHORIZED,
    UNKNOWN_TYPE,
    FieldError,
    Frame,
    FrameError,
    FrameReader,
    JobKey,
    ack_frame,
    assign_frame,
    attempt_of,
    bye_frame,
    cancel_frame,
    encode_frame,
    error_frame,
    heartbeat_frame,
    hello_frame,
    hello_proof,
    job_id_of,
    new_nonce,
    nonce_ok,
    number_of,
    proof_matches,
    ready_proof,
    running_of,
    slots_of,
)

HEARTBEAT = 1.0  # hello.heartbeat of the checker's sessions: short, so that liveness is seen quickly
CADENCE_HEARTBEAT = 0.5  # the interval the cadence rule asks for
CADENCE_WINDOW = 3.0  # how long the cadence rule watches
CADENCE_SLACK = 2.0  # a gap of up to this many intervals passes...
SCHEDULING_SLACK = 0.25  # ...plus this, for a busy machine
MAX_RECEIVED = 100_000  # frames kept per session: a flooding crawler ends its session, not the checker's memory
MAX_SLOT_JOBS = 8  # the slots rule fills at most this many slots with held jobs
RESUME_WITHIN = 10.0  # bye.resume_within of the hand-over rule
LOOPBACK_NOTE = "the crawler must be allowed to fetch loopback addresses (the reference crawler: --allow-private)"

# Every rule, in the order they run and print; `--only` picks by name or prefix.
RULES = {
    "handshake.welcome": "welcome: protocol 1, a crawler name, a fresh nonce of >= 32 hex digits",
    "handshake.ready": "ready answers hello within 10 s, with slots and a well-formed running list",
    "auth.ready_proof": "with a token: ready.auth is the HMAC proof over hello.nonce and the session",
    "auth.hello_checked": "with a token: a hello with a wrong or no proof gets unauthorized and the session ends",
    "auth.no_token": "without a token: a hello carrying auth is refused (optional)",
    "heartbeat.cadence": "a complete frame at least every hello.heartbeat, heartbeats with ts and running",
    "jobs.run": "an assigned job is fetched and answered done with its job_id, attempt and a result object",
    "heartbeat.running": "heartbeats list every unfinished job (one left out twice in a row is requeued as lost)",
    "slots": "never more running jobs than slots; capacity frames well-formed; assigned jobs all finish",
    "outcomes.resent": "an unacked outcome is resent after the next ready, unchanged",
    "outcomes.acked_once": "an outcome acked recorded is not sent again",
    "late.cancelled": "a cancelled attempt sends no outcome and leaves running",
    "late.stale": "an outcome acked stale is dropped, not resent",
    "session_end.stops_jobs": "a job of a dropped session is stopped, or listed in the next ready.running",
    "session_end.resume_within": "after bye with resume_within the job is listed in the next ready.running (optional)",
    "frames.too_long": "a line over the frame limit: bad_frame, close; the crawler lives on",
    "frames.not_utf8": "bytes that are not UTF-8: bad_frame, close; the crawler lives on",
    "frames.not_json": "a line that is not JSON: bad_frame, close; the crawler lives on",
    "frames.not_object": "a JSON array: bad_frame, close; the crawler lives on",
    "frames.no_type": "an object without type: bad_frame, close; the crawler lives on",
    "frames.unknown_type": "a frame of an unknown type: unknown_type error, the session stays",
    "frames.bad_assign": "an assign with a string job_id or attempt 0: an error, nothing runs, the session stays",
}


class UsageError(Exception):
    """Nothing can be checked: a bad option, or a crawler that cannot be reached or refuses our token."""


class Fail(Exception):
    """The rule being checked failed; the message is the reason."""


class Skip(Exception):
    """The rule cannot apply to this crawler (or names an optional behaviour it lacks)."""


@dataclass
class Result:
    status: str  # PASS, FAIL or SKIP
    rule: str
    reason: str

    def line(self) -> str:
        return f"{self.status} {self.rule}: {' '.join(self.reason.split())}"


# --- Test pages ------------------------------------------------------------------


class PageServer:
    """A threaded HTTP server on 127.0.0.1 serving the pages the checker's jobs fetch.

    `/page/NAME` answers 200 at once; `/slow/NAME` holds the request until
    release(NAME) (or release_all, or hold_max seconds), so a job is seen
    running for as long as the checker needs. `seen(NAME)` tells whether the
    crawler asked for a page: proof that it works the job, and that a job
    that must not run did not.
    """

    def __init__(self, hold_max: float):
        self.hold_max = hold_max
        self._lock = threading.Lock()
        self._requests: dict[str, int] = {}
        self._releases: dict[str, threading.Event] = {}
        self._closing = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            server_version = "crawlercheck"

            def do_GET(self) -> None:
                kind, _, name = self.path.lstrip("/").partition("/")
                if kind not in ("page", "slow") or not name:
                    self.send_error(404)
                    return
                server._seen(name)
                if kind == "slow":
                    server._hold(name)
                body = f"<html><head><title>crawlercheck {name}</title></head><body>ok</body></html>".encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the crawler gave up on the request (its job was cancelled): as it should

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name="crawlercheck-pages", daemon=True)
        self._thread.start()

    def url(self, kind: str, name: str) -> str:
        return f"{self.base}/{kind}/{name}"

    def _seen(self, name: str) -> None:
        with self._lock:
            self._requests[name] = self._requests.get(name, 0) + 1

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            return self._releases.setdefault(name, threading.Event())

    def _hold(self, name: str) -> None:
        event = self._event(name)
        deadline = time.monotonic() + self.hold_max
        while not event.wait(0.1):
            if self._closing.is_set() or time.monotonic() >= deadline:
                return

    def seen(self, name: str) -> bool:
        with self._lock:
            return name in self._requests

    def release(self, name: str) -> None:
        self._event(name).set()

    def release_all(self) -> None:
        with self._lock:
            events = list(self._releases.values())
        for event in events:
            event.set()

    def close(self) -> None:
        self._closing.set()
        self.release_all()
        self._server.shutdown()
        self._server.server_close()


# --- One bus session ----------------------------------------------------------------


@dataclass(eq=False)
class Received:
    at: float  # monotonic arrival time of the complete frame
    frame: Frame
    running: list[JobKey] | None = None  # a heartbeat's parsed running list (None: absent or malformed)


class SessionClosed(Fail):
    pass


class BusSession:
    """One connection to the crawler under test, playing the bus's side of it.

    A reader thread collects every complete frame with its arrival time and
    answers outcomes as the checker's ack policy says (recorded, stale, or
    withheld); a heartbeat thread sends the bus's heartbeats once the
    session is ready. The checking thread waits on what was received.
    """

    def __init__(self, checker: Checker, sock: socket.socket):
        self.checker = checker
        self.sock = sock
        self.received: list[Received] = []
        self.closed: str | None = None  # why the session ended, once it has
        self.welcome: Frame | None = None
        self.ready: Frame | None = None
        self.ready_index = 0  # index in `received` of the ready frame
        self.session_id = str(uuid.uuid4())
        self.hello_nonce = new_nonce()
        self.heartbeat = HEARTBEAT
        self.slots = 0  # the latest from ready or a capacity frame
        self.slots_in_ready = 0
        self.ready_running: list[JobKey] = []
        self.problems: list[str] = []  # malformed frames the crawler sent in passing (ids of outcomes)
        self._cond = threading.Condition()
        self._send_lock = threading.Lock()
        self._stop = threading.Event()
        self._cancelled: set[JobKey] = set()
        self._reader = threading.Thread(target=self._read, name="crawlercheck-reader", daemon=True)
        self._beater: threading.Thread | None = None
        sock.settimeout(None)
        self._reader.start()

    # --- Sending ---

    def send(self, frame: Frame) -> None:
        self.send_raw(encode_frame(frame))

    def send_raw(self, data: bytes) -> None:
        """Send bytes; a crawler that closed meanwhile is noticed by the reader, not raised here."""
        with self._send_lock:
            try:
                self.sock.sendall(data)
            except OSError:
                pass  # the crawler closed: the reader sees the end after the frames it sent before

    def start_heartbeats(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat / 3):
                if self.closed:
                    return
                self.send(heartbeat_frame())

        self._beater = threading.Thread(target=beat, name="crawlercheck-heartbeat", daemon=True)
        self._beater.start()

    def close(self) -> None:
        """Drop the connection (no bye): the crawler sees EOF."""
        self._stop.set()  # first: the reader then knows whose end it sees
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(5)
        self.sock.close()
        self._closed("closed by the checker")

    # --- Receiving (reader thread) ---

    def _closed(self, reason: str) -> None:
        with self._cond:
            if self.closed is None:
                self.closed = reason
            self._cond.notify_all()

    def _read(self) -> None:
        reader = FrameReader(self.checker.max_frame)
        while True:
            try:
                data = self.sock.recv(256 * 1024)
            except OSError as exc:
                self._closed(f"connection error: {exc}")
                return
            if not data:
                self._closed("closed by the checker" if self._stop.is_set() else "the crawler closed the connection")
                return
            try:
                frames = reader.feed(data)
                bad = None
            except FrameError as exc:
                frames, bad = exc.frames, exc
            if len(self.received) + len(frames) > MAX_RECEIVED:
                self._closed(f"the crawler sent more than {MAX_RECEIVED} frames on one session")
                return
            for frame in frames:
                try:
                    self._on_frame(frame)
                except Exception as exc:  # noqa: BLE001 - a frame that trips the checker must not hang the check
                    self._closed(f"checker error on {frame['type']!r:.40} frame: {type(exc).__name__}: {exc}")
                    return
            if bad is not None:
                self.send(error_frame(BAD_FRAME, str(bad)))
                self._closed(f"the crawler sent a malformed frame: {bad}")
                return

    def _on_frame(self, frame: Frame) -> None:
        received = Received(time.monotonic(), frame)
        kind = frame["type"]
        if kind == "heartbeat" and "running" in frame:
            try:
                received.running = running_of(frame)
            except FieldError:
                pass  # judged by the cadence rule
        with self._cond:
            self.received.append(received)
            self._cond.notify_all()
        if kind in ("done", "failed"):
            try:
                key = (job_id_of(frame), attempt_of(frame))
            except FieldError as exc:
                self.problems.append(f"{kind} with bad ids: {exc}")
                return
            status = self.checker.ack_status(key)
            if status is not None:
                self.send(ack_frame(key[0], key[1], status))
        elif kind == "capacity":
            try:
                self.slots = slots_of(frame)
            except FieldError as exc:
                self.problems.append(f"capacity frame {frame!r:.200}: {exc}")
        elif received.running:
            # Like the bus: a listed job this run never assigned (a leftover) gets a cancel.
            for key in received.running:
                if key not in self.checker.assigned and key not in self._cancelled:
                    self._cancelled.add(key)
                    self.send(cancel_frame(*key))

    # --- Waiting (checking thread) ---

    def mark(self) -> int:
        with self._cond:
            return len(self.received)

    def frames(self, start: int = 0) -> list[Received]:
        with self._cond:
            return self.received[start:]

    def wait(self, predicate: Callable[[Frame], bool], timeout: float, start: int = 0) -> Received | None:
        """The first frame from index `start` on that matches, or None at the deadline or the session's end."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for received in self.received[start:]:
                    if predicate(received.frame):
                        return received
                start = len(self.received)
                remaining = deadline - time.monotonic()
                if self.closed is not None or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def expect(self, predicate: Callable[[Frame], bool], what: str, timeout: float, start: int = 0) -> Received:
        received = self.wait(predicate, timeout, start)
        if received is None:
            if self.closed is not None:
                raise SessionClosed(f"the session ended before {what} came ({self.closed})")
            also = f"; the crawler also sent: {'; '.join(self.problems)}" if self.problems else ""
            raise Fail(f"no {what} within {timeout:g} s{also}")
        return received

    def heartbeats_after(self, after: float, *, count: int, timeout: float, start: int = 0) -> list[Received]:
        """The first `count` heartbeats arriving after monotonic time `after` (fewer at the deadline or the end)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                beats = [r for r in self.received[start:] if r.frame["type"] == "heartbeat" and r.at > after]
                remaining = deadline - time.monotonic()
                if len(beats) >= count or self.closed is not None or remaining <= 0:
                    return beats[:count]
                self._cond.wait(remaining)

    def wait_closed(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.closed is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def stay_open(self, seconds: float) -> None:
        """Watch the session for `seconds`; Fail if the crawler ends it meanwhile."""
        if self.wait_closed(seconds):
            raise SessionClosed(f"the session ended ({self.closed})")

    def errors(self, start: int = 0) -> list[Frame]:
        return [r.frame for r in self.frames(start) if r.frame["type"] == "error"]


def is_outcome(key: JobKey) -> Callable[[Frame], bool]:
    return lambda f: f["type"] in ("done", "failed") and (f.get("job_id"), f.get("attempt")) == key


def is_type(kind: str) -> Callable[[Frame], bool]:
    return lambda f: f["type"] == kind


def mentions(frame: Frame, job_ids: set[Any]) -> bool:
    """Whether a frame of the crawler's reports on one of these job ids (as sent, strings included)."""
    if frame["type"] in ("started", "progress", "done", "failed"):
        return frame.get("job_id") in job_ids
    if frame["type"] == "heartbeat" and isinstance(frame.get("running"), list):
        return any(
            isinstance(pair, list) and pair and isinstance(pair[0], (int, str)) and pair[0] in job_ids
            for pair in frame["running"]
        )
    return False


def listed(frame: Frame) -> set[JobKey]:
    """The pairs a heartbeat lists as running (none when the list is malformed: the cadence rule says so)."""
    try:
        return set(running_of(frame))
    except FieldError:
        return set()


def outcome_problem(frame: Frame) -> str | None:
    if frame["type"] == "done" and not isinstance(frame.get("result"), dict):
        return "done.result must be a JSON object"
    if frame["type"] == "failed":
        if not isinstance(frame.get("error", ""), str):
            return "failed.error must be a string"
        if not isinstance(frame.get("retryable", False), bool):
            return "failed.retryable must be true or false"
    return None


def describe(frame: Frame) -> str:
    if frame["type"] == "failed":
        return f"failed ({frame.get('error')!s:.200})"
    return str(frame["type"])


# --- The checker ---------------------------------------------------------------------


Scenario = Callable[["Checker"], None]
SCENARIOS: list[tuple[tuple[str, ...], Scenario]] = []


def scenario(*rules: str) -> Callable[[Scenario], Scenario]:
    """Register a method that checks these rules (it reports each with checker.report)."""

    def register(function: Scenario) -> Scenario:
        SCENARIOS.append((rules, function))
        return function

    return register


@dataclass
class Checker:
    """Runs every scenario against one crawler endpoint and collects one Result per rule."""

    endpoint: Endpoint
    token: str | None = None
    timeout: float = 10.0
    max_frame: int = DEFAULT_MAX_FRAME
    only: list[str] = field(default_factory=list)
    emit: Callable[[str], None] = print
    results: list[Result] = field(default_factory=list)
    assigned: set[JobKey] = field(default_factory=set)  # every (job_id, attempt) this run assigned
    ack_policy: dict[JobKey, str | None] = field(default_factory=dict)  # None: withhold the ack

    def __post_init__(self) -> None:
        # Job ids of one run are far from any other run's: a leftover outcome is acked stale, not mistaken.
        self._ids = itertools.count(random.randrange(10**12, 10**15))
        self._sessions: list[BusSession] = []
        self._rules: list[str] = []
        self._usable = False  # the handshake worked: the other scenarios can open sessions
        self.pages = PageServer(hold_max=max(60.0, 6 * self.timeout))
        # How long "nothing happens" is watched: longer for a slow crawler given a longer --timeout.
        self.quiet = max(1.5 * HEARTBEAT, 0.15 * self.timeout)

    # --- Running ---

    def run(self) -> list[Result]:
        self.emit(
            f"crawlercheck: playing the bus against {self.endpoint} "
            f"({'with' if self.token else 'without'} a token); test pages on {self.pages.base}: {LOOPBACK_NOTE}"
        )
        try:
            for rules, function in SCENARIOS:
                wanted = [rule for rule in rules if self._wanted(rule)]
                if not wanted:
                    continue
                self._rules = list(rules)
                if function is not Checker.check_handshake and not self._usable:
                    for rule in wanted:
                        self.report(rule, "SKIP", "not checked: no session could be opened")
                    continue
                self._run_scenario(function, wanted)
        finally:
            self.pages.close()
            for session in self._sessions:
                session.close()
        counts = {status: sum(r.status == status for r in self.results) for status in ("PASS", "FAIL", "SKIP")}
        self.emit(
            f"crawlercheck: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} skipped "
            f"of {len(self.results)} rules"
        )
        return self.results

    def _wanted(self, rule: str) -> bool:
        if rule in ("handshake.welcome", "handshake.ready"):
            return True  # every other rule needs them
        return not self.only or any(rule == name or rule.startswith(name + ".") for name in self.only)

    def _run_scenario(self, function: Scenario, wanted: list[str]) -> None:
        reported_before = {r.rule for r in self.results}
        try:
            function(self)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001 - one line per rule, whatever went wrong
            status = "SKIP" if isinstance(exc, Skip) else "FAIL"
            if isinstance(exc, (Fail, Skip)):
                reason = str(exc)
            elif isinstance(exc, OSError):
                reason = f"lost the crawler: {exc}"
            else:
                reason = f"checker error (a bug in crawlercheck, please report): {type(exc).__name__}: {exc}"
            # The scenario stopped at the first rule it could not finish; that rule and the
            # ones after it share the reason.
            for rule in self._rules:
                if rule in wanted and rule not in {r.rule for r in self.results}:
                    self.report(rule, status, reason)
        finally:
            self.pages.release_all()
            for session in self._sessions:
                session.close()
            self._sessions.clear()
        for rule in wanted:
            if rule not in reported_before and rule not in {r.rule for r in self.results}:
                self.report(rule, "FAIL", "checker error: the rule was not judged")

    def report(self, rule: str, status: str, reason: str) -> None:
        if not self._wanted(rule):
            return
        result = Result(status, rule, reason)
        self.results.append(result)
        self.emit(result.line())

    def ack_status(self, key: JobKey) -> str | None:
        return self.ack_policy.get(key, "recorded" if key in self.assigned else "stale")

    # --- Sessions and jobs ---

    def connect(self) -> BusSession:
        sock = self.endpoint.connect(timeout=self.timeout)
        session = BusSession(self, sock)
        self._sessions.append(session)
        return session

    def hello(self, session: BusSession, *, heartbeat: float = HEARTBEAT, auth: Any = "proof") -> Frame:
        """Read the welcome and answer hello; `auth` "proof" sends the right proof (when there is a token)."""
        welcome = session.expect(lambda f: True, "a welcome", HANDSHAKE_TIMEOUT).frame
        if welcome["type"] != "welcome":
            raise Fail(f"the first frame is {welcome['type']!r}, not welcome")
        session.welcome = welcome
        if auth == "proof":
            nonce = welcome.get("nonce")
            auth = hello_proof(self.token, nonce, session.session_id) if self.token and isinstance(nonce, str) else None
        session.heartbeat = heartbeat
        session.send(
            hello_frame(
                node="crawlercheck",
                session=session.session_id,
                heartbeat=heartbeat,
                nonce=session.hello_nonce,
                auth=auth,
            )
        )
        return welcome

    def open_session(self, *, heartbeat: float = HEARTBEAT) -> BusSession:
        """Connect and complete the handshake; Fail if the crawler does not get to ready."""
        session = self.connect()
        self.hello(session, heartbeat=heartbeat)
        answer = session.expect(
            lambda f: f["type"] in ("ready", "error"), "a ready in answer to hello", HANDSHAKE_TIMEOUT
        )
        if answer.frame["type"] == "error":
            raise Fail(
                f"the crawler answered hello with error {answer.frame.get('code')!r}: {answer.frame.get('message')}"
            )
        ready = session.ready = answer.frame
        session.ready_index = session.received.index(answer)
        try:
            session.slots = session.slots_in_ready = slots_of(ready)
            session.ready_running = running_of(ready)
        except FieldError as exc:
            raise Fail(f"ready: {exc}") from None
        session.start_heartbeats()
        for key in session.ready_running:
            if key not in self.assigned:  # a leftover from another run: the bus cancels what it does not hold
                session.send(cancel_frame(*key))
        return session

    def new_job(self, kind: str = "page", *, attempt: int = 1) -> tuple[JobKey, str, str]:
        """A fresh (job_id, attempt), its page name and URL; `kind` "slow" holds the fetch until released."""
        job_id = next(self._ids)
        name = f"{job_id}-{attempt}"
        self.assigned.add((job_id, attempt))
        return (job_id, attempt), name, self.pages.url(kind, name)

    def assign(self, session: BusSession, key: JobKey, url: str) -> None:
        session.send(assign_frame(key[0], key[1], url=url, payload={"crawlercheck": self._rules[0]}))

    def run_job(self, session: BusSession) -> Frame:
        """Assign a page job and wait for its outcome: the session serves, and the crawler read what came before."""
        key, _, url = self.new_job()
        mark = session.mark()
        self.assign(session, key, url)
        return session.expect(is_outcome(key), f"the outcome of job {key[0]}", self.timeout, mark).frame

    def sync(self, session: BusSession, *, busy: int = 0) -> None:
        """Make sure the crawler has processed everything sent so far on this session.

        Frames on one session are handled in order, so the outcome of a job
        assigned now comes after the crawler read the earlier frames. With no
        slot free for it, two heartbeats from the crawler have to do.
        """
        if session.slots > busy:
            self.run_job(session)
            return
        mark = session.mark()
        first = session.expect(is_type("heartbeat"), "a heartbeat", self.timeout, mark)
        session.expect(is_type("heartbeat"), "a heartbeat", self.timeout, session.received.index(first) + 1)

    def wait_running(self, session: BusSession, key: JobKey, name: str) -> None:
        """Wait until the crawler fetches the held page of this job: it is running."""
        deadline = time.monotonic() + self.timeout
        while not self.pages.seen(name):
            outcome = session.wait(is_outcome(key), 0.05)
            if outcome is not None:
                raise Fail(
                    f"job {key[0]} ended with {describe(outcome.frame)} instead of fetching {self.pages.base}; "
                    + LOOPBACK_NOTE
                )
            if session.closed:
                raise SessionClosed(f"the session ended before job {key[0]} ran ({session.closed})")
            if time.monotonic() >= deadline:
                raise Fail(f"job {key[0]} never fetched its page within {self.timeout:g} s")

    def needs_slots(self, session: BusSession, wanted: int = 1) -> None:
        if session.slots < wanted:
            raise Skip(f"the crawler offers {session.slots} slot(s) in ready; this rule needs {wanted}")

    # --- Scenarios, in the order they run ---

    @scenario("handshake.welcome", "handshake.ready", "auth.ready_proof")
    def check_handshake(self) -> None:
        try:
            session = self.connect()
        except OSError as exc:
            raise UsageError(f"cannot connect to the crawler at {self.endpoint}: {exc}") from None
        welcome = self.hello(session)
        problems = welcome_problems(welcome)
        if not problems:
            other = self.connect()  # a second connection must get a nonce of its own
            second = other.expect(lambda f: True, "a welcome on a second connection", HANDSHAKE_TIMEOUT).frame
            if second.get("nonce") == welcome["nonce"]:
                problems.append("the nonce is the same on two connections: it must be fresh for each")
            other.close()
        if problems:
            raise Fail("; ".join(problems))
        self.report(
            "handshake.welcome",
            "PASS",
            f"protocol 1, crawler {welcome['crawler']!r}, a fresh nonce of {len(welcome['nonce'])} hex digits",
        )
        answer = session.expect(
            lambda f: f["type"] in ("ready", "error"), "a ready in answer to hello", HANDSHAKE_TIMEOUT
        ).frame
        if answer["type"] == "error":
            if answer.get("code") == UNAUTHORIZED:
                hint = "pass the crawler's token with --token" if not self.token else "is --token the crawler's?"
                raise UsageError(f"the crawler refused our hello as unauthorized ({answer.get('message')}): {hint}")
            raise Fail(f"the crawler answered hello with error {answer.get('code')!r}: {answer.get('message')}")
        try:
            slots, running = slots_of(answer), running_of(answer)
        except FieldError as exc:
            raise Fail(f"ready: {exc}") from None
        self._usable = True
        self.report("handshake.ready", "PASS", f"slots {slots}, running {running}")
        if not self.token:
            self.report("auth.ready_proof", "SKIP", "applies with a token (--token)")
        elif proof_matches(ready_proof(self.token, session.hello_nonce, session.session_id), answer.get("auth")):
            self.report("auth.ready_proof", "PASS", "ready.auth verifies")
        else:
            state = "missing" if answer.get("auth") is None else "wrong"
            self.report("auth.ready_proof", "FAIL", f"ready.auth is {state}: the bus answers unauthorized and closes")

    @scenario("auth.hello_checked")
    def check_hello_proof(self) -> None:
        if not self.token:
            raise Skip("applies with a token (--token)")
        for what, auth in (("a wrong proof", hello_proof(self.token, new_nonce(), str(uuid.uuid4()))), ("none", None)):
            session = self.connect()
            self.hello(session, auth=auth)
            self._expect_refusal(session, f"a hello whose proof is {what}", UNAUTHORIZED, required=True)
            session.close()
        self.report("auth.hello_checked", "PASS", "a hello with a wrong or no proof gets unauthorized and is closed")

    @scenario("auth.no_token")
    def check_no_token(self) -> None:
        if self.token:
            raise Skip("applies without a token")
        session = self.connect()
        self.hello(session, auth=new_nonce())
        if self._expect_refusal(session, "a hello carrying auth", UNAUTHORIZED, required=False):
            self.report("auth.no_token", "PASS", "a hello carrying auth is refused: a token mismatch shows at once")
        else:
            self.report(
                "auth.no_token",
                "SKIP",
                "optional (PROTOCOL.md does not require it): the crawler accepted a hello carrying auth; "
                "refusing it shows a bus configured with a token at once",
            )

    def _expect_refusal(self, session: BusSession, what: str, code: str, *, required: bool) -> bool:
        """True if the crawler answered `code` and closed; False if it sent ready (Fail when required)."""
        answer = session.wait(lambda f: f["type"] in ("ready", "error"), HANDSHAKE_TIMEOUT)
        if answer is None and not session.closed:
            raise Fail(f"no answer to {what} within {HANDSHAKE_TIMEOUT:g} s")
        if answer is not None and answer.frame["type"] == "ready":
            if required:
                raise Fail(f"the crawler accepted {what}")
            return False
        if answer is None:
            raise Fail(f"the crawler closed on {what} without the {code} error")
        if answer.frame.get("code") != code:
            raise Fail(f"the crawler answered {what} with error {answer.frame.get('code')!r}, not {code!r}")
        if not session.wait_closed(self.timeout):
            raise Fail(f"the crawler answered {what} with {code} but did not close the session")
        return True

    @scenario("heartbeat.cadence")
    def check_cadence(self) -> None:
        session = self.open_session(heartbeat=CADENCE_HEARTBEAT)
        start = session.received[session.ready_index].at
        session.stay_open(CADENCE_WINDOW)
        frames = session.frames(session.ready_index + 1)
        times = [start, *(r.at for r in frames), time.monotonic()]
        gap = max(b - a for a, b in zip(times, times[1:]))
        heartbeats = [r for r in frames if r.frame["type"] == "heartbeat"]
        for received in heartbeats:
            if "running" not in received.frame or received.running is None:
                raise Fail(f"a heartbeat without a well-formed running list: {received.frame!r:.200}")
            try:
                if number_of(received.frame, "ts") is None:
                    raise FieldError("ts is missing")
            except FieldError as exc:
                raise Fail(f"a heartbeat with a bad ts ({exc}): {received.frame!r:.200}") from None
        limit = CADENCE_SLACK * CADENCE_HEARTBEAT + SCHEDULING_SLACK
        if gap > limit:
            raise Fail(
                f"with hello.heartbeat {CADENCE_HEARTBEAT:g} s the crawler was silent for {gap:.2f} s "
                f"(allowed {limit:g} s); {len(frames)} frames in {CADENCE_WINDOW:g} s"
            )
        self.report(
            "heartbeat.cadence",
            "PASS",
            f"{len(heartbeats)} heartbeats in {CADENCE_WINDOW:g} s at interval {CADENCE_HEARTBEAT:g} s, "
            f"longest silence {gap:.2f} s, each with ts and running",
        )

    @scenario("jobs.run")
    def check_job_runs(self) -> None:
        session = self.open_session()
        self.needs_slots(session)
        key, name, url = self.new_job(attempt=3)
        self.assign(session, key, url)
        outcome = session.wait(is_outcome(key), self.timeout)
        if outcome is None:
            others = [describe(r.frame) for r in session.frames() if r.frame.get("job_id") == key[0]]
            raise Fail(
                f"no done/failed for job {key[0]} attempt {key[1]} within {self.timeout:g} s"
                + (f" (frames about the job: {', '.join(others)})" if others else "")
                + (f"; the session ended ({session.closed})" if session.closed else "")
            )
        frame = outcome.frame
        problem = outcome_problem(frame)
        if problem:
            raise Fail(problem)
        if frame["type"] == "failed":
            raise Fail(f"the job failed: {frame.get('error')!s:.300}; {LOOPBACK_NOTE}")
        if not self.pages.seen(name):
            raise Fail("done without fetching the job's URL")
        fields = ", ".join(sorted(frame["result"]))
        self.report("jobs.run", "PASS", f"job {key[0]} attempt 3 fetched and done, result fields: {fields}")

    @scenario("heartbeat.running", "slots")
    def check_slots(self) -> None:
        session = self.open_session()
        self.needs_slots(session)
        count = min(session.slots, MAX_SLOT_JOBS)
        jobs = [self.new_job("slow") for _ in range(count)]
        mark = session.mark()
        assigned_at = time.monotonic()
        for key, _, url in jobs:
            self.assign(session, key, url)
        self.report("heartbeat.running", *self._judge_running(session, jobs, assigned_at, mark))
        for _, name, _ in jobs:
            self.pages.release(name)
        for key, _, _ in jobs:
            session.expect(is_outcome(key), f"the outcome of held job {key[0]} once released", self.timeout, mark)
        problem = self._slots_problem(session)
        if problem:
            raise Fail(problem)
        self.report(
            "slots",
            "PASS",
            f"ready.slots {session.slots_in_ready}: {count} jobs assigned at once, "
            "running never above slots, all finished",
        )

    def _judge_running(
        self, session: BusSession, jobs: list[tuple[JobKey, str, str]], assigned_at: float, mark: int
    ) -> tuple[str, str]:
        """(status, reason) of heartbeat.running, its held jobs assigned at `assigned_at`.

        The bus's rule: a job assigned more than one interval ago that two
        heartbeats in a row leave out is requeued as lost. So three heartbeats
        past that point are watched while the pages are held. The wait is
        bounded by the cadence rule's allowance, not --timeout: a fetcher's
        own read timeout (10 s for the reference) must not end the jobs first.
        """
        keys = {key for key, _, _ in jobs}
        due = assigned_at + session.heartbeat
        wait = 3 * CADENCE_SLACK * session.heartbeat + SCHEDULING_SLACK + session.heartbeat
        beats = session.heartbeats_after(due, count=3, timeout=wait, start=mark)
        ended = [describe(r.frame) for r in session.frames(mark) if r.frame["type"] in ("done", "failed")]
        if ended:
            fetched = all(self.pages.seen(name) for _, name, _ in jobs)
            return "FAIL", (
                f"held jobs ended before their pages were released: {', '.join(ended)}"
                + ("" if fetched else f"; {LOOPBACK_NOTE}")
            )
        if len(beats) < 3:
            closed = f"; the session ended ({session.closed})" if session.closed else ""
            return "FAIL", f"only {len(beats)} heartbeat(s) more than one interval after the assigns{closed}"
        for before, after in zip(beats, beats[1:]):
            lost = keys - set(before.running or []) - set(after.running or [])
            if lost:
                return "FAIL", f"two heartbeats in a row left out running jobs {sorted(lost)}: requeued as lost"
        once = "" if all(keys <= set(r.running or []) for r in beats) else " (one heartbeat left a job out)"
        fetched_count = sum(self.pages.seen(name) for _, name, _ in jobs)
        return "PASS", f"heartbeats listed the {len(keys)} unfinished jobs{once}; {fetched_count} fetching"

    def _slots_problem(self, session: BusSession) -> str | None:
        """Replay the session: every capacity frame well-formed, no heartbeat listing more jobs than slots."""
        slots = session.slots_in_ready
        for received in session.frames(session.ready_index + 1):
            frame = received.frame
            if frame["type"] == "capacity":
                try:
                    slots = slots_of(frame)
                except FieldError as exc:
                    return f"a malformed capacity frame ({exc}): {frame!r:.200}"
            elif received.running is not None and len(received.running) > slots:
                return f"a heartbeat lists {len(received.running)} running jobs with slots {slots}"
        return None

    @scenario("outcomes.resent", "outcomes.acked_once")
    def check_resend(self) -> None:
        first_session = self.open_session()
        self.needs_slots(first_session)
        key, _, url = self.new_job()
        self.ack_policy[key] = None  # withheld: the crawler must keep the outcome
        self.assign(first_session, key, url)
        first = first_session.expect(is_outcome(key), f"the outcome of job {key[0]}", self.timeout).frame
        first_session.close()
        self.ack_policy[key] = "recorded"  # the next session acks the resend
        second_session = self.open_session()
        resent = second_session.wait(is_outcome(key), self.timeout, second_session.ready_index + 1)
        if resent is None:
            raise Fail(
                f"job {key[0]}'s {first['type']}, never acked, was not resent within {self.timeout:g} s "
                "after the next ready: the crawler must keep each outcome until acked"
            )
        essential = ("type", "job_id", "attempt", "result", "error", "retryable")
        if any(resent.frame.get(name) != first.get(name) for name in essential):
            raise Fail(f"the resent outcome differs: {resent.frame!r:.200} vs {first!r:.200}")
        self.report("outcomes.resent", "PASS", f"job {key[0]}'s {first['type']} came again after the new ready")
        self.sync(second_session)  # the crawler has read the ack
        second_session.close()
        third_session = self.open_session()
        again = third_session.wait(is_outcome(key), self.quiet, third_session.ready_index + 1)
        if again is not None:
            raise Fail(f"job {key[0]}'s outcome was sent again after it was acked recorded")
        self.report("outcomes.acked_once", "PASS", f"not sent again within {self.quiet:g} s of the next ready")

    @scenario("late.cancelled")
    def check_cancel(self) -> None:
        session = self.open_session()
        self.needs_slots(session)
        key, name, url = self.new_job("slow")
        self.assign(session, key, url)
        self.wait_running(session, key, name)
        session.send(cancel_frame(*key))
        self.sync(session)
        after_sync = session.mark()
        self.pages.release(name)  # a crawler that ignored the cancel now finishes the fetch
        session.stay_open(max(self.quiet, 2 * session.heartbeat))
        outcome = session.wait(is_outcome(key), 0)
        if outcome is not None:
            raise Fail(f"the cancelled attempt sent {describe(outcome.frame)}: its outcome no longer matters")
        for received in session.frames(after_sync):
            if received.running is not None and key in received.running:
                raise Fail("heartbeats still list the cancelled job: it was not stopped")
        self.report("late.cancelled", "PASS", "no outcome for the cancelled attempt, and it left running")

    @scenario("late.stale")
    def check_stale(self) -> None:
        session = self.open_session()
        self.needs_slots(session)
        key, _, url = self.new_job()
        self.ack_policy[key] = "stale"
        self.assign(session, key, url)
        session.expect(is_outcome(key), f"the outcome of job {key[0]}", self.timeout)
        self.sync(session)
        session.close()
        self.ack_policy[key] = "recorded"
        next_session = self.open_session()
        again = next_session.wait(is_outcome(key), self.quiet, next_session.ready_index + 1)
        if again is not None:
            raise Fail("an outcome acked stale was resent on the next session: a stale ack means forget it")
        self.report("late.stale", "PASS", f"not resent within {self.quiet:g} s of the next ready")

    @scenario("session_end.stops_jobs")
    def check_session_end(self) -> None:
        outcome = self._end_session_mid_job(bye=False)
        self.report("session_end.stops_jobs", "PASS", outcome)

    @scenario("session_end.resume_within")
    def check_resume_within(self) -> None:
        outcome = self._end_session_mid_job(bye=True)
        if outcome.startswith("stopped"):
            raise Skip(
                "optional extension (docs/protocol.md section 13) not supported: after a bye with "
                f"resume_within the job was {outcome}"
            )
        self.report("session_end.resume_within", "PASS", outcome)

    def _end_session_mid_job(self, *, bye: bool) -> str:
        """End a session while its job runs; the next session's ready lists it (resumed) or it is stopped."""
        session = self.open_session()
        self.needs_slots(session)
        key, name, url = self.new_job("slow")
        self.assign(session, key, url)
        self.wait_running(session, key, name)
        if bye:
            session.send(bye_frame("crawlercheck: hand-over", resume_within=RESUME_WITHIN))
            session.wait_closed(min(self.timeout, 3.0))  # the crawler reads the bye before it sees EOF
        session.close()
        next_session = self.open_session()
        self.pages.release(name)
        if key in next_session.ready_running:
            next_session.expect(
                is_outcome(key), f"the outcome of resumed job {key[0]}", self.timeout, next_session.ready_index + 1
            )
            return "resumed: listed in the next ready.running and finished on the new session"
        watch_from = next_session.ready_index + 1
        next_session.stay_open(max(self.quiet, 2 * next_session.heartbeat))
        for received in next_session.frames(watch_from):
            if (received.running is not None and key in received.running) or is_outcome(key)(received.frame):
                raise Fail(
                    f"job {key[0]} of the ended session was neither stopped nor listed in the next "
                    f"ready.running, yet the crawler sent {describe(received.frame)} about it: the bus "
                    "requeued it, so it may run twice"
                )
        return "stopped when its session ended (no resume: allowed)"

    @scenario("frames.too_long")
    def check_too_long(self) -> None:
        # A heartbeat padded to one byte over the limit, newline included: a crawler with a
        # larger limit takes it as a heartbeat, and the rule says which limit to give.
        line = encode_frame(heartbeat_frame(padding=""))
        cut = line.index(b'padding":"') + len(b'padding":"')
        data = line[:cut] + b"x" * (self.max_frame + 1 - len(line)) + line[cut:]
        self._framing_error(
            "frames.too_long",
            data,
            f"a line of {len(data)} bytes (limit {self.max_frame})",
            hint=" (if the crawler's BUS_MAX_FRAME is larger, pass it with --max-frame)",
        )

    @scenario("frames.not_utf8")
    def check_not_utf8(self) -> None:
        self._framing_error("frames.not_utf8", b'{"type":"heartbeat","ts":1,"x":"\xff\xfe"}\n', "bytes not UTF-8")

    @scenario("frames.not_json")
    def check_not_json(self) -> None:
        self._framing_error("frames.not_json", b"this is not json\n", "a line that is not JSON")

    @scenario("frames.not_object")
    def check_not_object(self) -> None:
        self._framing_error("frames.not_object", b'[{"type":"heartbeat"}]\n', "a JSON array")

    @scenario("frames.no_type")
    def check_no_type(self) -> None:
        self._framing_error("frames.no_type", b'{"job_id":1,"attempt":1}\n', "an object without type")

    def _framing_error(self, rule: str, data: bytes, what: str, hint: str = "") -> None:
        session = self.open_session()
        mark = session.mark()
        session.send_raw(data)
        if not session.wait_closed(self.timeout):
            if session.wait(is_type("error"), 0, mark) is None:
                raise Fail(f"{what} was accepted: no error, and the session stays open{hint}")
            raise Fail(f"the crawler answered {what} but kept the session open: a framing error ends it")
        codes = [frame.get("code") for frame in session.errors(mark)]
        if codes and BAD_FRAME not in codes:
            raise Fail(f"the crawler answered {what} with error {codes[0]!r}, not {BAD_FRAME!r}")
        try:
            self.open_session()
        except (Fail, OSError) as exc:
            raise Fail(f"after {what} the crawler took no new session ({exc}): did it crash?") from None
        answered = (
            f"answered {BAD_FRAME} and closed" if codes else f"closed (without {BAD_FRAME}: allowed, 'if it can')"
        )
        self.report(rule, "PASS", f"{what}: {answered}; the next session works")

    @scenario("frames.unknown_type")
    def check_unknown_type(self) -> None:
        session = self.open_session()
        mark = session.mark()
        session.send({"type": "x-crawlercheck-unknown", "ts": time.time()})  # no builder: no such frame
        error = session.wait(is_type("error"), self.timeout, mark)
        if error is None:
            raise Fail(
                f"no {UNKNOWN_TYPE} error within {self.timeout:g} s"
                + (f"; the session ended ({session.closed}): it must stay" if session.closed else "")
            )
        if error.frame.get("code") != UNKNOWN_TYPE:
            raise Fail(f"answered error {error.frame.get('code')!r}, not {UNKNOWN_TYPE!r}")
        self._still_serving(session)
        self.report("frames.unknown_type", "PASS", f"{UNKNOWN_TYPE} error, and the session still serves")

    @scenario("frames.bad_assign")
    def check_bad_assign(self) -> None:
        session = self.open_session()
        self.needs_slots(session)
        (string_id, _), string_name, string_url = self.new_job()
        string_assign = assign_frame(string_id, 1, url=string_url, payload={})
        string_assign["job_id"] = str(string_id)
        zero_key, zero_name, zero_url = self.new_job(attempt=0)
        mark = session.mark()
        session.send(string_assign)
        session.send(assign_frame(zero_key[0], 0, url=zero_url, payload={}))
        first = session.wait(is_type("error"), self.timeout, mark)
        second = first and session.wait(is_type("error"), self.timeout, session.received.index(first) + 1)
        self._still_serving(session)
        ids: set[Any] = {string_id, str(string_id), zero_key[0]}
        session.stay_open(self.quiet)  # time for a job that wrongly started to show itself
        ran = [describe(r.frame) for r in session.frames(mark) if mentions(r.frame, ids)]
        fetched = [name for name in (string_name, zero_name) if self.pages.seen(name)]
        if ran or fetched:
            raise Fail(f"a bad assign ran: frames {ran}, pages fetched {fetched}")
        if second is None:
            raise Fail(f"{'one error' if first else 'no error'} for two bad assigns (job_id a string, attempt 0)")
        codes = sorted({str(e.get("code")) for e in session.errors(mark)})
        self.report("frames.bad_assign", "PASS", f"errors ({', '.join(codes)}), nothing ran, the session serves")

    def _still_serving(self, session: BusSession) -> None:
        """The session must stay: a job assigned now still runs (or, without a slot, it stays open)."""
        try:
            if session.slots >= 1:
                self.run_job(session)
            else:
                session.stay_open(2 * session.heartbeat)
        except SessionClosed:
            raise Fail(f"the crawler ended the session ({session.closed}): it must stay open") from None


def welcome_problems(welcome: Frame) -> list[str]:
    problems = []
    protocol = welcome.get("protocol")
    if isinstance(protocol, bool) or protocol != PROTOCOL_VERSION:
        problems.append(f"protocol is {protocol!r}, not {PROTOCOL_VERSION}")
    if not isinstance(welcome.get("crawler"), str) or not welcome["crawler"]:
        problems.append("crawler must be a non-empty string (the crawler's name)")
    if not nonce_ok(welcome.get("nonce")):
        problems.append(f"nonce {welcome.get('nonce')!r:.80} is not 32 to 1024 hex digits")
    return problems


# --- Command line ------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser, *, token_default: str = "", max_frame_default: int = 0) -> None:
    parser.add_argument(
        "endpoint", metavar="ENDPOINT", help="the crawler's address: /path.sock, unix:/path.sock or tcp://host:port"
    )
    parser.add_argument(
        "--token",
        default=None,
        help="the crawler's shared token (default: BUS_TOKEN); required for tcp://, and enables the auth rules",
    )
    parser.add_argument(
        "--timeout",
        type=seconds(allow_zero=False),
        default=10.0,
        help="how long to wait for each expected frame or job (default %(default)s s); raise it for slow crawlers",
    )
    parser.add_argument(
        "--max-frame",
        type=whole_number(minimum=1024),
        default=max_frame_default or None,
        help="the crawler's frame limit, BUS_MAX_FRAME (default 1 MiB); frames.too_long sends one byte more",
    )
    parser.add_argument(
        "--only",
        default="",
        metavar="RULES",
        help="comma-separated rule names or prefixes to check (e.g. frames,late.stale); the handshake always runs",
    )
    parser.set_defaults(token_default=token_default)


EPILOG = (
    "The checker serves the jobs' pages from 127.0.0.1: "
    + LOOPBACK_NOTE
    + ". Exit status: 0 when no rule fails, 1 when one does, 2 for a usage error. Rules: "
    + "; ".join(RULES)
)


def check(options: dict[str, Any], emit: Callable[[str], None] = print) -> int:
    """Run the checker with parsed options; return the exit status (0 or 1), raise UsageError otherwise."""
    try:
        endpoint = parse_endpoint(options["endpoint"])
    except EndpointError as exc:
        raise UsageError(f"ENDPOINT: {exc}") from None
    token = options["token"] if options["token"] is not None else options.get("token_default", "")
    if endpoint.is_tcp and not token:
        raise UsageError(f"{endpoint}: a tcp:// crawler requires a token (--token or BUS_TOKEN)")
    only = [name.strip() for name in options["only"].split(",") if name.strip()]
    unknown = [name for name in only if not any(r == name or r.startswith(name + ".") for r in RULES)]
    if unknown:
        raise UsageError(f"--only: no rule is called {', '.join(unknown)}; rules: {', '.join(RULES)}")
    checker = Checker(
        endpoint=endpoint,
        token=token or None,
        timeout=options["timeout"],
        max_frame=options["max_frame"] or DEFAULT_MAX_FRAME,
        only=only,
        emit=emit,
    )
    results = checker.run()
    return 1 if any(result.status == "FAIL" for result in results) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobsite_crawler.conformance",
        description="Check a crawler against the jobsite bus protocol: play the bus on its socket and print "
        "PASS, FAIL or SKIP with a reason for each rule.",
        epilog=EPILOG,
    )
    max_frame = os.environ.get("BUS_MAX_FRAME", "")
    add_arguments(
        parser,
        token_default=os.environ.get("BUS_TOKEN", ""),
        max_frame_default=int(max_frame) if max_frame.isdigit() else 0,
    )
    options = vars(parser.parse_args(argv))
    try:
        return check(options, lambda line: print(line, flush=True))
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
