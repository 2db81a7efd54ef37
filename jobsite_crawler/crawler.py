"""The crawler side of PROTOCOL.md as a library, serving several bus sessions at once.

No Django here. A Crawler listens, does the handshake and proofs, heartbeats,
keeps outcomes until acked and resends them, resumes running jobs on a new
session and honours cancel; what a job *does* is a runner's business
(jobsite_crawler/runners.py): a sync handler in a thread pool, an asyncio
handler, the reference fetcher, or the Scrapy add-on. `python -m
jobsite_crawler` and `manage.py runcrawler` run the reference fetcher.

A ConnectionLog records, from the crawler's own view, when each bus session
opened and ended and which jobs it carried (one JSON line per event).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import random
import select
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from .endpoints import Endpoint, parse_endpoint
from .job import Job
from .logfmt import kv
from .runners import Handler, Runner, ThreadRunner
from .wire import (
    BAD_FRAME,
    DEFAULT_MAX_FRAME,
    HANDSHAKE_TIMEOUT,
    INVALID,
    MAX_KIND_LENGTH,
    MAX_KINDS,
    PROTOCOL_VERSION,
    UNAUTHORIZED,
    UNKNOWN_TYPE,
    UNSUPPORTED_PROTOCOL,
    FieldError,
    Frame,
    FrameError,
    FrameReader,
    attempt_of,
    bye_frame,
    capacity_frame,
    done_frame,
    encode_frame,
    error_frame,
    failed_frame,
    heartbeat_frame,
    hello_proof,
    job_id_of,
    new_nonce,
    nonce_ok,
    number_of,
    progress_frame,
    proof_matches,
    ready_frame,
    ready_proof,
    robots_answer_frame,
    started_frame,
    welcome_frame,
)

log = logging.getLogger("jobsite_crawler.crawler")

JobKey = tuple[int, int]  # (job_id, attempt)
Fetch = Callable[..., dict[str, Any]]  # fetch(url, *, cancel=Cancellation) -> result
RobotsFetch = Callable[[str], tuple[int, str]]  # robots(url) -> (HTTP status, text); raise when the site is unreachable

RECV_SIZE = 256 * 1024
CLOSE_FLUSH_TIMEOUT = 2.0  # how long a closing session may spend sending its last frames
MIN_HEARTBEAT = 0.01
IDLE_TICK = 1.0  # the longest a loop sleeps without looking at its clocks
PROGRESS_INTERVAL = 1.0  # a job's progress reports go out at most this often


@dataclass(eq=False)
class _Job:
    job: Job
    session: _Session | None  # None: orphaned, its session ended (see resume_grace, bye.resume_within)
    orphan_until: float | None = None  # monotonic time after which an orphaned job is stopped

    @property
    def key(self) -> JobKey:
        return self.job.key

    @property
    def cancellation(self) -> Any:
        return self.job.cancellation


@dataclass(eq=False)
class _Outcome:
    data: bytes  # the encoded done/failed frame, resent as is
    owner: _Session | None  # the session it was last sent on; None: send after the next ready


class ConnectionLog:
    """Appends one JSON line per session or job event to a file, flushed at once; any thread may write.

    Session events: `open` (connection accepted), `ready` (handshake done),
    `close` (the crawler noticed the session end: EOF, a socket error, a bye,
    a timeout; with `reason`). Job events: `assign`, and `finish` with
    `status` done, failed or stopped. Fleet and chaos tests read it to check,
    from the crawler's side, that two bus sessions never overlap. The time
    is taken under the lock, so lines are in the order of their `t`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the crawler's life
        self._lock = threading.Lock()
        self._failed = False

    def write(self, event: str, **fields: Any) -> None:
        with self._lock:
            if self._file.closed:
                return
            line = json.dumps({"t": time.time(), "event": event, **fields}, ensure_ascii=False, default=str)
            try:
                self._file.write(line + "\n")
                self._file.flush()
            except (OSError, ValueError) as exc:  # a full disk must not end a session
                if not self._failed:
                    self._failed = True
                    log.error(kv("crawler.connection_log_failed", path=self.path, error=exc))

    def close(self) -> None:
        with self._lock:
            self._file.close()


class Crawler:
    """Listens on endpoints; each accepted connection is one bus session with its own thread.

    What runs a job, exactly one of: `handler` (a function of a Job returning
    the result dict, run in a thread pool), `fetcher` (the reference Fetcher:
    a handler that fetches job.url, and robots.txt too), `runner` (a Runner:
    the asyncio API and the Scrapy add-on), or `noop` (answer done at once).
    `robots` fetches a robots.txt file for the bus (docs/protocol.md section
    15); `kinds` are the job kinds this crawler takes (None: every kind).

    Concurrency: one thread per session owns its socket (non-blocking, a
    selector with a wake-up socketpair), and every other thread only appends
    encoded frames to the session's outbox. The session thread writes the
    whole outbox in one send, so a burst of outcomes costs one syscall, and a
    slow bus never blocks a fetch thread or another session. Fetch jobs get a
    thread each (a cancelled fetch stuck in connect must not hold a slot the
    bus already reuses); --noop answers inline in the session thread, and a
    noop delay uses one timer thread, never a thread per job.

    Job state (running jobs and unacked outcomes) belongs to the crawler, not
    to a session, so outcomes outlive the session they were produced on.
    All sessions are assumed to come from one jobsite (one database).

    When a session ends, its jobs are stopped, unless they are orphaned: kept
    running for the next session to resume (listed in its ready.running) for
    `resume_grace` seconds, or for the bye's `resume_within` when the bus
    announced a hand-over and that is longer.
    """

    def __init__(
        self,
        *,
        endpoints: Sequence[Endpoint | str],
        slots: int,
        name: str | None = None,
        token: str | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        fetcher: Fetch | None = None,
        handler: Handler | None = None,
        runner: Runner | None = None,
        robots: RobotsFetch | None = None,
        kinds: Sequence[str] | None = None,
        noop: bool = False,
        noop_delay: tuple[float, float] | None = None,
        resume_grace: float = 0.0,
        handshake_timeout: float = HANDSHAKE_TIMEOUT,
        connection_log: ConnectionLog | None = None,
    ):
        self.endpoints = [parse_endpoint(e) if isinstance(e, str) else e for e in endpoints]
        if not self.endpoints:
            raise ValueError("at least one endpoint to listen on is required")
        self.token = token or None
        for endpoint in self.endpoints:
            if endpoint.is_tcp and not self.token:
                raise ValueError(
                    f"{endpoint}: a tcp:// endpoint requires a token (BUS_TOKEN or --token); "
                    "without one anybody who reaches the port could drive this crawler"
                )
        if slots < 0:
            raise ValueError("slots must be >= 0")
        if sum(given is not None for given in (fetcher, handler, runner)) + bool(noop) != 1:
            raise ValueError("give exactly one of handler, runner, fetcher or noop")
        if kinds is not None:
            kinds = list(kinds)
            if len(kinds) > MAX_KINDS or not all(isinstance(k, str) and 0 < len(k) <= MAX_KIND_LENGTH for k in kinds):
                raise ValueError(f"kinds must be at most {MAX_KINDS} non-empty names of {MAX_KIND_LENGTH} characters")
        self.slots = slots
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.max_frame = max_frame
        self.fetcher = fetcher
        if fetcher is not None:
            handler = _fetch_handler(fetcher)
            fetch_text = getattr(fetcher, "fetch_text", None)
            if robots is None and fetch_text is not None:
                robots = _robots_of(fetch_text)
        self.runner: Runner | None = runner if runner is not None else ThreadRunner(handler) if handler else None
        self.robots = robots
        self.kinds = kinds
        self.noop = noop
        self.noop_delay = noop_delay if noop_delay and noop_delay[1] > 0 else None
        self.resume_grace = resume_grace
        self.handshake_timeout = handshake_timeout
        self.connection_log = connection_log  # the caller opens and closes it

        self.listening = threading.Event()  # set once every endpoint is bound
        self._stopping = threading.Event()
        self._drain_by: float | None = None  # draining: stop once every outcome is acked, or at this time
        self._capacity_due = False  # drain() asked for capacity frames: serve_forever sends them
        self._lock = threading.Lock()  # guards the four collections below and _Session.live
        self._running: dict[JobKey, _Job] = {}
        self._unacked: dict[JobKey, _Outcome] = {}
        self._sessions: set[_Session] = set()
        self._session_numbers = itertools.count(1)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._timers: list[tuple[float, int, _Job]] = []  # noop delays: (due, seq, job)
        self._timer_seq = itertools.count()
        self._timer_cond = threading.Condition()

    # --- Running ------------------------------------------------------------------

    def serve_forever(self) -> None:
        """Accept bus sessions until stop(); then say bye on each and stop every job."""
        listeners: list[tuple[Endpoint, socket.socket]] = []
        timer_thread = None
        try:
            for endpoint in self.endpoints:
                sock = endpoint.listen()
                sock.setblocking(False)
                listeners.append((endpoint, sock))
                log.info(
                    kv(
                        "crawler.listening",
                        endpoint=endpoint,
                        crawler=self.name,
                        slots=self.slots,
                        noop=self.noop or None,
                    )
                )
            if self.noop_delay:
                timer_thread = threading.Thread(target=self._run_timers, name="crawler-noop-timers", daemon=True)
                timer_thread.start()
            self.listening.set()
            with selectors.DefaultSelector() as selector:
                selector.register(self._wake_r, selectors.EVENT_READ)
                for endpoint, sock in listeners:
                    selector.register(sock, selectors.EVENT_READ, endpoint)
                while not self._stopping.is_set():
                    for key, _ in selector.select(self._reap_timeout()):
                        if key.fileobj is self._wake_r:
                            _drain(self._wake_r)
                        else:
                            self._accept(cast(socket.socket, key.fileobj), key.data)
                    self._reap_orphans()
                    self._check_drained()
        finally:
            self._stopping.set()
            for endpoint, sock in listeners:
                sock.close()
                if endpoint.kind == "unix":
                    try:
                        os.unlink(endpoint.path)
                    except OSError:
                        pass
            self._shutdown(timer_thread)

    def stop(self) -> None:
        """Ask serve_forever to end; safe from any thread and from a signal handler."""
        # No lock here: a signal handler may run while this thread holds one.
        # serve_forever wakes the sessions once its selector returns.
        self._stopping.set()
        _wake(self._wake_w)

    def drain(self, timeout: float = 60.0) -> None:
        """Take no new job (capacity 0), finish the running ones, stop once every outcome is acked.

        After `timeout` seconds it stops anyway: the bus requeues what is
        still running. Safe from any thread and from a signal handler.
        """
        # No lock taken here (a signal handler may interrupt a thread holding one):
        # serve_forever sends the capacity frames once woken.
        self._drain_by = time.monotonic() + timeout
        self.slots = 0
        self._capacity_due = True
        _wake(self._wake_w)

    def set_slots(self, slots: int) -> None:
        """Change how many jobs each session accepts; live sessions are told with a `capacity` frame."""
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 0:
            raise ValueError("slots must be an integer >= 0")
        self.slots = slots
        with self._lock:
            sessions = [session for session in self._sessions if session.live]
        for session in sessions:
            session.queue(encode_frame(capacity_frame(slots)))

    def _check_drained(self) -> None:
        if self._drain_by is None:
            return
        if self._capacity_due:
            self._capacity_due = False
            self.set_slots(self.slots)
        with self._lock:
            busy = bool(self._running or self._unacked)
        if not busy or time.monotonic() >= self._drain_by:
            log.info(kv("crawler.drained", crawler=self.name, complete=not busy))
            self._stopping.set()

    def _accept(self, listener: socket.socket, endpoint: Endpoint) -> None:
        while True:
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: log, keep serving
                log.warning(kv("crawler.accept_failed", endpoint=endpoint, error=exc))
                return
            sock.setblocking(False)
            if endpoint.is_tcp:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _Session(self, sock, f"{endpoint}#{next(self._session_numbers)}")
            with self._lock:
                self._sessions.add(session)
            log.info(kv("crawler.session.accepted", conn=session.label, peer=peer or None))
            self._record("open", conn=session.label, session=None, peer=None)
            session.thread.start()

    def _shutdown(self, timer_thread: threading.Thread | None) -> None:
        with self._lock:
            sessions = list(self._sessions)
        for session in sessions:
            session.wake()
        deadline = time.monotonic() + CLOSE_FLUSH_TIMEOUT + 3.0
        for session in sessions:
            session.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            jobs = list(self._running.values())
            self._running.clear()
            for job in jobs:
                self._record_stopped(job, "crawler stopping")
        for job in jobs:
            job.cancellation.cancel()
        with self._timer_cond:
            self._timer_cond.notify_all()
        if self.runner is not None:
            self.runner.stop(max(0.1, deadline - time.monotonic()))
        if timer_thread is not None:
            timer_thread.join(max(0.1, deadline - time.monotonic()))
        self._wake_r.close()
        self._wake_w.close()
        log.info(kv("crawler.stopped", crawler=self.name, unacked=len(self._unacked)))

    # --- Connection log -------------------------------------------------------------
    # Job events are written under self._lock, at the moment the job's state
    # changes; the log's own lock is taken inside it and never the other way.

    def _record(self, event: str, **fields: Any) -> None:
        if self.connection_log is not None:
            self.connection_log.write(event, **fields)

    def _record_stopped(self, job: _Job, reason: str, *, session: str | None = None) -> None:
        if session is None and job.session is not None:
            session = job.session.bus_session
        self._record("finish", job_id=job.key[0], attempt=job.key[1], status="stopped", session=session, reason=reason)

    # --- Jobs -----------------------------------------------------------------------

    def _start_job(self, session: _Session, job: Job) -> None:
        key = job.key
        self._record("assign", job_id=key[0], attempt=key[1], session=session.bus_session)
        if self.noop and not self.noop_delay:
            data = encode_frame(done_frame(key[0], key[1], {"noop": True}))
            self._record("finish", job_id=key[0], attempt=key[1], status="done", session=session.bus_session)
            with self._lock:
                self._unacked[key] = _Outcome(data, session)
                session.queue(data)  # sent by this (the session) thread after this frame's batch
            return
        with self._lock:
            existing = self._running.get(key)
            if existing is not None:
                # A repeated assign for a job already running here: keep the
                # one run, now reported on this session.
                existing.session, existing.orphan_until = session, None
                return
            running = self._running[key] = _Job(job, session)
        if self.noop:
            low, high = self.noop_delay  # type: ignore[misc]
            with self._timer_cond:
                heapq.heappush(
                    self._timers, (time.monotonic() + random.uniform(low, high), next(self._timer_seq), running)
                )
                self._timer_cond.notify()
            return
        session.queue(encode_frame(started_frame(key[0], key[1])))
        assert self.runner is not None  # set unless noop
        self.runner.start(job, lambda outcome: self._finished(running, outcome))

    def _fetch_robots(self, session: _Session, host: str, url: str) -> None:
        """Answer the bus's robots request from a thread of its own (a --noop crawler's sites have none: 404)."""

        def answer() -> None:
            status, body, error = 404, "", ""
            if self.robots is not None:
                try:
                    status, body = self.robots(url)
                except Exception as exc:  # noqa: BLE001 - the site did not answer, whatever the reason
                    status, body, error = 0, "", str(exc)[:500] or type(exc).__name__
            data = encode_frame(robots_answer_frame(host, status, body, error))
            while len(data) > ROBOTS_MAX_FRAME and body:  # escapes can grow the text: cut it to fit
                body = body[: len(body) // 2]
                data = encode_frame(robots_answer_frame(host, status, body, error))
            self._record("robots", host=host, status=status, session=session.bus_session)
            session.queue(data)

        if self.robots is None:
            answer()
        else:
            threading.Thread(target=answer, name=f"crawler-robots-{host[:40]}", daemon=True).start()

    def _finished(self, running: _Job, outcome: Frame | None) -> None:
        """A runner's report: the outcome frame, or None when the job ended without one (cancelled)."""
        if outcome is None:
            return
        job_id, attempt = running.key
        if self._finish(running, outcome):
            log.info(
                kv(
                    "crawler.job.finished",
                    job_id=job_id,
                    attempt=attempt,
                    outcome=outcome["type"],
                    status=(outcome.get("result") or {}).get("status"),
                    error=outcome.get("error"),
                )
            )

    def _encode_outcome(self, outcome: Frame) -> tuple[bytes, str]:
        """The outcome's bytes and type; a result that is not JSON, or too big for one frame, fails the job instead.

        Sending it as is would end the session with bad_frame, and the
        outcome would be resent, and end the next session too, forever.
        """
        job_id, attempt = outcome["job_id"], outcome["attempt"]
        try:
            data = encode_frame(outcome)
        except (TypeError, ValueError) as exc:
            problem = f"crawler error: the result is not JSON: {exc}"
        else:
            if len(data) <= self.max_frame:
                return data, outcome["type"]
            problem = f"crawler error: the outcome frame of {len(data)} bytes exceeds the limit of {self.max_frame}"
        log.error(kv("crawler.job.bad_outcome", job_id=job_id, attempt=attempt, error=problem))
        return encode_frame(failed_frame(job_id, attempt, problem[:2000], retryable=False)), "failed"

    def _finish(self, job: _Job, outcome: Frame) -> bool:
        """Keep the outcome until acked and send it now if the job's session is live."""
        data, kind = self._encode_outcome(outcome)
        with self._lock:
            if self._running.get(job.key) is not job or job.cancellation.is_set():
                return False  # cancelled or stopped: its outcome no longer matters
            del self._running[job.key]
            # Recorded before the outcome can reach the bus, so the log never shows an ack's effect first.
            self._record(
                "finish",
                job_id=job.key[0],
                attempt=job.key[1],
                status=kind,
                session=job.session.bus_session if job.session is not None else None,
            )
            owner = job.session if job.session is not None and job.session.live else self._live_session()
            self._unacked[job.key] = _Outcome(data, owner)
            if owner is not None:
                # Queued under the lock so that a session ending right now
                # either sees this outcome as its own (and releases it) or not at all.
                owner.queue(data)
        return True

    def _cancel(self, key: JobKey, *, reason: str) -> bool:
        with self._lock:
            job = self._running.pop(key, None)
            dropped = self._unacked.pop(key, None)
            if job is not None:
                self._record_stopped(job, reason)
        if job is not None:
            job.cancellation.cancel()
            log.info(kv("crawler.job.cancelled", job_id=key[0], attempt=key[1], reason=reason))
        return job is not None or dropped is not None

    def _acked(self, key: JobKey) -> None:
        with self._lock:
            self._unacked.pop(key, None)

    def _run_timers(self) -> None:
        while not self._stopping.is_set():
            with self._timer_cond:
                now = time.monotonic()
                due = []
                while self._timers and self._timers[0][0] <= now:
                    due.append(heapq.heappop(self._timers)[2])
                if not due:
                    timeout = self._timers[0][0] - now if self._timers else IDLE_TICK
                    self._timer_cond.wait(min(timeout, IDLE_TICK))
                    continue
            for job in due:
                self._finish(job, done_frame(job.key[0], job.key[1], {"noop": True}))

    def _reap_timeout(self) -> float:
        """How long serve_forever may sleep: until the first orphan is due, IDLE_TICK at most."""
        with self._lock:
            orphans = [job.orphan_until for job in self._running.values() if job.orphan_until is not None]
        due = min(orphans, default=None)
        return IDLE_TICK if due is None else min(IDLE_TICK, max(0.0, due - time.monotonic()))

    def _reap_orphans(self) -> None:
        """Stop orphaned jobs that no new session took over in time."""
        now = time.monotonic()
        with self._lock:
            expired = [
                job
                for job in self._running.values()
                if job.session is None and job.orphan_until is not None and now >= job.orphan_until
            ]
            for job in expired:
                del self._running[job.key]
                self._record_stopped(job, "no session resumed it")
        for job in expired:
            job.cancellation.cancel()
            log.info(kv("crawler.job.cancelled", job_id=job.key[0], attempt=job.key[1], reason="no session resumed it"))

    # --- Session hooks (called by the session threads) ---------------------------------

    def _session_ready(self, session: _Session, hello_nonce: str) -> tuple[list[JobKey], int]:
        """Send ready (resuming orphaned jobs), then every outcome no live session owns."""
        self._reap_gone_sessions(session)
        with self._lock:
            resumed = [job for job in self._running.values() if job.session is None]
            for job in resumed:
                job.session, job.orphan_until = session, None
            assert session.bus_session is not None  # set from hello before ready is sent
            ready = ready_frame(
                slots=self.slots,
                auth=ready_proof(self.token, hello_nonce, session.bus_session) if self.token else None,
                running=[job.key for job in resumed],
                # Extensions: this crawler fetches robots.txt when asked (section 15), takes these kinds (16).
                robots=self.noop or self.robots is not None,
                kinds=self.kinds,
            )
            session.live = True
            session.queue(encode_frame(ready))
            resent = 0
            for outcome in self._unacked.values():
                if outcome.owner is None:
                    outcome.owner = session
                    session.queue(outcome.data)
                    resent += 1
        return [job.key for job in resumed], resent

    def _reap_gone_sessions(self, new: _Session) -> None:
        """Before a new session is ready, end the sessions whose bus has already closed its socket.

        Their own threads notice the EOF a moment later (later still on a busy
        machine); noticing it here keeps the order true to what happened (the
        bus that died, or handed this crawler over, was gone before its
        successor's session began) and lets the new ready list their jobs
        for the successor to re-lease.
        """
        with self._lock:
            others = [session for session in self._sessions if session is not new and session.live]
        for old in others:
            if old.peer_closed():
                old._end("connection closed by the bus (EOF)")
                old.wake()
                self._session_ended(old)

    def _session_ended(self, session: _Session) -> None:
        """Stop the session's jobs (or orphan them for the next session); free its unacked outcomes.

        Orphaned for max(resume_grace, the bye's resume_within): a bus handing
        this crawler over to another bus process says how soon that one
        connects. A session that connected meanwhile does not take them (its
        ready is sent already); their outcomes still go to it when they finish.
        """
        now = time.monotonic()
        hold = 0.0 if self._stopping.is_set() else max(self.resume_grace, session.resume_within or 0.0)
        orphaned = 0
        with self._lock:
            session.live = False
            self._sessions.discard(session)
            stopped = []
            for job in self._running.values():
                if job.session is session:
                    job.session = None
                    if hold > 0:
                        job.orphan_until = now + hold
                        orphaned += 1
                    else:
                        stopped.append(job)
            for job in stopped:
                del self._running[job.key]
                self._record_stopped(job, "session ended", session=session.bus_session)
            # Another live session takes the outcomes over at once: waiting for
            # the next ready could wait forever when the bus already reconnected
            # before this (half-dead) session was noticed as gone.
            heir = self._live_session()
            for outcome in self._unacked.values():
                if outcome.owner is session:
                    outcome.owner = heir
                    if heir is not None:
                        heir.queue(outcome.data)
        for job in stopped:
            job.cancellation.cancel()
        if stopped:
            log.info(kv("crawler.session.jobs_stopped", session=session.bus_session, jobs=len(stopped)))
        if orphaned:
            log.info(kv("crawler.session.jobs_orphaned", session=session.bus_session, jobs=orphaned, hold_s=hold))
            _wake(self._wake_w)  # serve_forever sleeps until the new deadline, not a whole IDLE_TICK

    def _live_session(self) -> _Session | None:
        """Any session past its handshake (caller holds the lock); all serve the same jobsite."""
        return next((session for session in self._sessions if session.live), None)

    def _running_of(self, session: _Session) -> list[JobKey]:
        with self._lock:
            return [key for key, job in self._running.items() if job.session is session]

    def _progress_of(self, session: _Session) -> list[Frame]:
        """Progress frames for the session's jobs that reported since the last call."""
        with self._lock:
            jobs = [job.job for job in self._running.values() if job.session is session]
        frames = []
        for job in jobs:
            report = job.take_progress()
            if report is not None:
                frames.append(progress_frame(job.id, job.attempt, **report))
        return frames

    # --- Introspection (tests, logs) ------------------------------------------------

    def running_jobs(self) -> list[JobKey]:
        with self._lock:
            return list(self._running)

    def unacked_outcomes(self) -> list[JobKey]:
        with self._lock:
            return list(self._unacked)

    def session_count(self) -> int:
        with self._lock:
            return len(self._sessions)


HANDSHAKE, READY = "handshake", "ready"


class _Session:
    """One bus connection: the handshake, then frames in and out, heartbeats and liveness."""

    def __init__(self, crawler: Crawler, sock: socket.socket, label: str):
        self.crawler = crawler
        self.sock = sock
        self.label = label
        self.bus_session: str | None = None
        self.node: str | None = None  # the bus's node id, from hello
        self.resume_within: float | None = None  # from the bus's bye: it hands this crawler over
        self.live = False  # handshake done and not ended; guarded by crawler._lock
        self.thread = threading.Thread(target=self._run, name=f"crawler-session-{label}", daemon=True)
        self._reader = FrameReader(crawler.max_frame)
        self._state = HANDSHAKE
        self._welcome_nonce = new_nonce()
        self._heartbeat = 0.0
        self._out_lock = threading.Lock()
        self._outbox: list[bytes] = []
        self._wake_pending = False
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._pending = bytearray()  # encoded bytes the socket has not taken yet
        self._closing: str | None = None  # why the session ends; set once
        self._close_by = 0.0
        self._dead = False
        now = time.monotonic()
        self._handshake_by = now + crawler.handshake_timeout
        self._last_sent = now
        self._last_received = now
        self._progress_at = now

    # --- Any thread -------------------------------------------------------------------

    def queue(self, data: bytes) -> None:
        """Append one encoded frame to the outbox; the session thread sends it."""
        with self._out_lock:
            self._outbox.append(data)
            if self._wake_pending or threading.current_thread() is self.thread:
                return  # the session thread flushes before it sleeps again
            self._wake_pending = True
        _wake(self._wake_w)

    def wake(self) -> None:
        _wake(self._wake_w)

    def peer_closed(self) -> bool:
        """Whether the bus has closed (or reset) this connection, even with frames still unread before the end.

        Those frames cannot matter any more: an ack is answered again when the
        outcome is resent, an assign was never started.
        """
        rdhup: int = vars(select).get("POLLRDHUP", 0)  # Linux only
        if rdhup and hasattr(select, "poll"):
            hangup = rdhup | select.POLLHUP | select.POLLERR
            poller = select.poll()
            try:
                poller.register(self.sock, hangup)
                return any(events & hangup for _, events in poller.poll(0))
            except (OSError, ValueError):
                return True  # closed here already
        try:  # without POLLRDHUP: only an end with nothing unread before it is seen
            return self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    # --- The session thread ---------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._serve()
        except Exception:  # noqa: BLE001 - a bug must end this session, not the crawler
            log.exception(kv("crawler.session.crashed", conn=self.label, session=self.bus_session))
            self._set_closing("crawler error")
        finally:
            self._set_closing("session ended")  # not noticed before: still recorded, once
            self.crawler._session_ended(self)
            for sock in (self.sock, self._wake_r, self._wake_w):
                sock.close()
            log.info(kv("crawler.session.closed", conn=self.label, session=self.bus_session, reason=self._closing))

    def _serve(self) -> None:
        self.queue(encode_frame(welcome_frame(self.crawler.name, self._welcome_nonce)))
        with selectors.DefaultSelector() as selector:
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            mask = selectors.EVENT_READ
            while True:
                self._flush()
                if self._dead or (self._closing and not self._pending):
                    return
                want = selectors.EVENT_READ | (selectors.EVENT_WRITE if self._pending else 0)
                if want != mask:
                    selector.modify(self.sock, want)
                    mask = want
                for key, events in selector.select(max(0.0, self._next_deadline() - time.monotonic())):
                    if key.fileobj is self._wake_r:
                        _drain(self._wake_r)
                        with self._out_lock:
                            self._wake_pending = False
                    elif events & selectors.EVENT_READ:
                        self._receive()
                self._tick(time.monotonic())

    def _next_deadline(self) -> float:
        deadlines = [time.monotonic() + IDLE_TICK]
        if self._closing:
            deadlines.append(self._close_by)
        elif self._state == HANDSHAKE:
            deadlines.append(self._handshake_by)
        else:
            deadlines.append(self._last_sent + self._heartbeat)
            deadlines.append(self._last_received + 2 * self._heartbeat)
            deadlines.append(self._progress_at)
        return min(deadlines)

    def _tick(self, now: float) -> None:
        if self._closing:
            if now >= self._close_by:
                self._end("could not send the last frames in time")
            return
        if self.crawler._stopping.is_set():
            self._close("crawler stopping", bye_frame("crawler stopping"))
        elif self._state == HANDSHAKE:
            if now >= self._handshake_by:
                self._close(
                    "no hello in time",
                    bye_frame(f"no hello within {self.crawler.handshake_timeout:g} s"),
                )
        elif now - self._last_received >= 2 * self._heartbeat:
            log.warning(
                kv("crawler.session.bus_silent", session=self.bus_session, silent_s=round(now - self._last_received, 3))
            )
            self._close("bus silent", bye_frame("heartbeat timeout: nothing from the bus"))
        else:
            if now >= self._progress_at:
                self._progress_at = now + min(PROGRESS_INTERVAL, self._heartbeat)
                for frame in self.crawler._progress_of(self):
                    self.queue(encode_frame(frame))
            if now - self._last_sent >= self._heartbeat:
                self.queue(encode_frame(heartbeat_frame(running=self.crawler._running_of(self))))

    def _flush(self) -> None:
        with self._out_lock:
            if self._outbox:
                self._pending += b"".join(self._outbox)
                self._outbox.clear()
        if not self._pending or self._dead:
            return
        try:
            sent = self.sock.send(self._pending)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(f"send failed: {exc}")
            return
        del self._pending[:sent]
        self._last_sent = time.monotonic()

    def _receive(self) -> None:
        try:
            data = self.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._end(f"receive failed: {exc}")
            return
        if not data:
            self._end(self._closing or "connection closed by the bus")
            return
        if self._closing:
            return  # ending: what the bus says now changes nothing
        bad: FrameError | None = None
        try:
            frames = self._reader.feed(data)
        except FrameError as exc:
            frames, bad = exc.frames, exc  # the whole frames before the bad one still count
        if frames:
            self._last_received = time.monotonic()  # liveness by whole frames, not bytes
        for frame in frames:
            if self._state == HANDSHAKE:
                self._on_handshake_frame(frame)
            else:
                self._on_frame(frame)
            if self._closing:
                return
        if bad is not None:
            log.warning(kv("crawler.session.bad_frame", session=self.bus_session, conn=self.label, error=bad))
            self._close(f"bad frame: {bad}", error_frame(BAD_FRAME, str(bad)))

    def _close(self, reason: str, last_frame: dict[str, Any] | None = None) -> None:
        """End the session after sending last_frame (an error or a bye), if the socket takes it in time."""
        if self._closing:
            return
        self._set_closing(reason)
        self._close_by = time.monotonic() + CLOSE_FLUSH_TIMEOUT
        if last_frame is not None:
            self.queue(encode_frame(last_frame))

    def _end(self, reason: str) -> None:
        """End the session now: the socket is broken or the bus has gone."""
        self._set_closing(reason)
        self._dead = True

    def _set_closing(self, reason: str) -> None:
        """Remember the first reason the session ends, and record it at once in the connection log."""
        with self._out_lock:  # the session's thread and a successor's (_reap_gone_sessions) may race
            if self._closing:
                return
            self._closing = reason
        fields: dict[str, Any] = {"resume_within": self.resume_within} if self.resume_within else {}
        self.crawler._record(
            "close", conn=self.label, session=self.bus_session, peer=self.node, reason=reason, **fields
        )

    # --- Frames -------------------------------------------------------------------------

    def _on_handshake_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        if kind == "hello":
            self._on_hello(frame)
        elif kind == "bye":
            self._close(f"bye from the bus: {frame.get('reason')}")
        elif kind == "error":
            log.warning(
                kv("crawler.session.bus_error", conn=self.label, code=frame.get("code"), message=frame.get("message"))
            )
        elif kind == "heartbeat":
            pass
        elif kind in BUS_FRAME_TYPES:
            self._close("frame before hello", error_frame(INVALID, f"expected hello, got {kind!r}"))
        else:
            self.queue(encode_frame(error_frame(UNKNOWN_TYPE, f"unknown frame type {kind!r}")))

    def _on_hello(self, frame: dict[str, Any]) -> None:
        protocol = frame.get("protocol")
        if protocol != PROTOCOL_VERSION or isinstance(protocol, bool):
            self._close(
                f"unsupported protocol {protocol!r}",
                error_frame(UNSUPPORTED_PROTOCOL, f"this crawler speaks protocol {PROTOCOL_VERSION}, not {protocol!r}"),
            )
            return
        session = frame.get("session")
        try:
            if not isinstance(session, str) or not 0 < len(session) <= 200:
                raise FieldError("session must be a non-empty string")
            heartbeat = number_of(frame, "heartbeat")
            if heartbeat is None or heartbeat <= 0:
                raise FieldError("heartbeat must be a positive number of seconds")
        except FieldError as exc:
            self._close(f"invalid hello: {exc}", error_frame(INVALID, f"invalid hello: {exc}"))
            return
        token = self.crawler.token
        hello_nonce = frame.get("nonce")
        if token:
            expected = hello_proof(token, self._welcome_nonce, session)
            if not proof_matches(expected, frame.get("auth")) or not nonce_ok(hello_nonce):
                log.error(
                    kv(
                        "crawler.session.unauthorized",
                        conn=self.label,
                        session=session,
                        auth="missing" if frame.get("auth") is None else "wrong",
                    )
                )
                self._close("unauthorized", error_frame(UNAUTHORIZED, "hello auth is missing or wrong"))
                return
        elif frame.get("auth") is not None:
            log.error(kv("crawler.session.unauthorized", conn=self.label, session=session, auth="unexpected"))
            self._close(
                "unauthorized",
                error_frame(
                    UNAUTHORIZED,
                    "the bus sent auth but this crawler has no token: configure the same BUS_TOKEN on both",
                ),
            )
            return
        self.bus_session = session
        node = frame.get("node")
        self.node = node[:200] if isinstance(node, str) else None
        self._heartbeat = max(float(heartbeat), MIN_HEARTBEAT)
        self._state = READY
        resumed, resent = self.crawler._session_ready(self, hello_nonce if isinstance(hello_nonce, str) else "")
        log.info(
            kv(
                "crawler.session.ready",
                conn=self.label,
                session=session,
                node=frame.get("node"),
                heartbeat=self._heartbeat,
                slots=self.crawler.slots,
                resumed=len(resumed),
                resent=resent,
            )
        )
        self.crawler._record(
            "ready",
            conn=self.label,
            session=session,
            peer=self.node,
            resumed=[list(key) for key in resumed],
        )

    def _on_frame(self, frame: dict[str, Any]) -> None:
        kind = frame["type"]
        try:
            if kind == "assign":
                job_id, attempt = job_id_of(frame), attempt_of(frame)
                url = frame.get("url")
                if not isinstance(url, str) or not url:
                    raise FieldError("url must be a non-empty string")
                kind = frame.get("kind", "")
                if not isinstance(kind, str):
                    raise FieldError("kind must be a string")
                self.crawler._start_job(self, Job(job_id, attempt, url, frame.get("payload"), kind))
            elif kind == "robots":
                host, url = frame.get("host"), frame.get("url")
                if not isinstance(host, str) or not host or len(host) > 300:
                    raise FieldError("host must be the host key")
                if not isinstance(url, str) or not url.startswith(("http://", "https://")) or len(url) > 2048:
                    raise FieldError("url must be an http(s) URL")
                self.crawler._fetch_robots(self, host, url)
            elif kind == "ack":
                self.crawler._acked((job_id_of(frame), attempt_of(frame)))
            elif kind == "cancel":
                self.crawler._cancel((job_id_of(frame), attempt_of(frame)), reason="cancel from the bus")
            elif kind == "heartbeat":
                pass  # receiving it renewed _last_received
            elif kind == "bye":
                self.resume_within = self._resume_within_of(frame)
                self._close(f"bye from the bus: {frame.get('reason')}")
            elif kind == "error":
                log.warning(
                    kv(
                        "crawler.session.bus_error",
                        session=self.bus_session,
                        code=frame.get("code"),
                        message=frame.get("message"),
                        job_id=frame.get("job_id"),
                    )
                )
            elif kind == "hello":
                raise FieldError("the handshake is already done")
            else:
                self.queue(encode_frame(error_frame(UNKNOWN_TYPE, f"this crawler does not accept {kind!r} frames")))
        except FieldError as exc:
            ids = {name: frame[name] for name in ("job_id", "attempt") if isinstance(frame.get(name), int)}
            self.queue(encode_frame(error_frame(INVALID, f"{kind}: {exc}", **ids)))

    def _resume_within_of(self, bye: dict[str, Any]) -> float | None:
        """The bye's optional `resume_within` (seconds), or None when absent or not a positive finite number."""
        if "resume_within" not in bye:
            return None
        try:
            value = number_of(bye, "resume_within")
            if value is None or value <= 0:
                raise FieldError("resume_within must be a positive number of seconds")
        except FieldError as exc:
            # A bye ends the session whatever it carries: ignore the field, stop the jobs as without it.
            log.warning(
                kv(
                    "crawler.session.bad_resume_within",
                    session=self.bus_session,
                    value=repr(bye["resume_within"])[:80],
                    error=exc,
                )
            )
            return None
        return float(value)


# Frames a bus sends; anything else a bus sends gets unknown_type.
BUS_FRAME_TYPES = frozenset({"hello", "assign", "cancel", "ack", "heartbeat", "error", "bye", "robots"})
# robots.txt: the first 500 KiB count (RFC 9309 §2.5); the answer must fit in one frame.
ROBOTS_MAX_BYTES = 500 * 1024
ROBOTS_MAX_FRAME = 1024 * 1024


def _fetch_handler(fetcher: Fetch) -> Handler:
    def handle(job: Job) -> dict[str, Any]:
        return fetcher(job.url, cancel=job.cancellation)

    return handle


def _robots_of(fetch_text: Callable[..., tuple[int, str]]) -> RobotsFetch:
    def fetch_robots(url: str) -> tuple[int, str]:
        return fetch_text(url, max_bytes=ROBOTS_MAX_BYTES)

    return fetch_robots


def _wake(sock: socket.socket) -> None:
    try:
        sock.send(b"\0")
    except OSError:  # full (a wake-up is already pending) or closed
        pass


def _drain(sock: socket.socket) -> None:
    try:
        while sock.recv(4096):
            pass
    except OSError:
        pass
