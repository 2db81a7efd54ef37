"""One bus session: the socket side (SessionIO) and the database side (SessionWorker).

Concurrency model, chosen so that a slow query never delays liveness: each
session has two threads. SessionIO owns the socket — handshake, framing,
heartbeats out, silence detection — and never touches the database; it waits
on a selector with a timeout of at most one second, so loss is detected at
most a second late even while a query is stuck. SessionWorker owns the
database work (claims, outcomes, lease renewals, the final requeue) through
the narrow Store interface, and hands frames back to SessionIO's outbox.
Frames received in one read are passed to the worker as one batch, so under
load a whole batch of outcomes is committed and acked in one transaction.
"""

from __future__ import annotations

import logging
import queue
import selectors
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from jobs import dispatch
from jobs.outcomes import Outcome, http_status_of, retry_after_of
from jobsite_crawler import wire as protocol
from jobsite_crawler.logfmt import kv
from jobsite_crawler.wire import FieldError, FrameError

STALE_ACK = "stale"  # the ack status of an outcome that changed nothing (jobs.services.STALE)

log = logging.getLogger("bus.session")

MAX_OUTBOX_BYTES = 64 * 1024 * 1024
MAX_INBOX_MESSAGES = 20_000  # past this the IO thread stops reading until the worker catches up
# A host's turn comes at its ready time: claim a moment after, not a moment before.
READY_MARGIN = 0.001
# robots.txt requests (docs/protocol.md section 15): at most this many unanswered per
# session; an unanswered one is given up after ROBOTS_ANSWER_WAIT (the database lease
# then lets another session fetch it); due fetches are looked for at most this often.
ROBOTS_PER_SESSION = 4
ROBOTS_ANSWER_WAIT = 60.0
ROBOTS_CHECK_INTERVAL = 0.5
PROGRESS_WRITE_INTERVAL = 1.0
MAX_PROGRESS_MESSAGE = 1000
MAX_ERROR_TEXT = 10_000
# Stale outcomes: the first ones of a session are audited one by one, the rest
# are counted and summed up when the session ends; a session that sends more
# than STALE_FLOOD_BASE + 2 x its slots is closed (an honest crawler's resends
# after a reconnect are bounded by its slots).
STALE_AUDIT_PER_SESSION = 100
STALE_FLOOD_BASE = 1000
TOO_MANY_STALE = "too_many_stale"  # our error code, then close
# After a take-over, the crawler's other jobs of earlier sessions are requeued
# this long after ready: its resent outcomes arrive first and are recorded,
# instead of their jobs being requeued, claimed again and run a second time.
ORPHAN_GRACE = 0.5


@dataclass(frozen=True)
class SessionConfig:
    heartbeat_timeout: float
    token: str | None = None
    max_frame: int = protocol.DEFAULT_MAX_FRAME
    node: str = "bus"
    poll_interval: float = 2.0
    handshake_timeout: float = protocol.HANDSHAKE_TIMEOUT
    stall_timeout: float = 0.0  # BUS_STALL_TIMEOUT: 0 = off
    max_slots: int = 1000  # BUS_MAX_SLOTS: the most slots one session may use, whatever the crawler asks
    max_result: int = 64 * 1024  # BUS_MAX_RESULT: bytes of one stored result; bigger ones become a marker
    handover_resume: float = 10.0  # BUS_HANDOVER_RESUME: bye.resume_within on a hand-over
    max_items: int = 1000  # JOB_ITEMS_MAX: items stored per job from done.items; 0 = none stored

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_timeout / 2

    @property
    def silence_limit(self) -> float:
        return 2 * self.heartbeat_timeout


class SessionControl:
    """What the Bus tells one endpoint's sessions from outside (bus.runtime sets it).

    `epoch` is the ownership's fencing token (jobs.fleet); `draining` stops
    new assignments, and the session ends once the crawler holds nothing.
    """

    def __init__(self, epoch: int = 0):
        self.epoch = epoch
        self.draining = False


# Why the bus ends a session itself (io.end(cause)) -> the reason in its bye.
BYE_REASONS = {
    "closed": "bus shutdown",
    "supervisor": "supervisor process gone",
    "handover": "this bus hands the crawler over to another bus process",
    "drained": "crawler drained: no more jobs for it",
    "removed": "crawler removed from the registry",
    "fenced": "this bus lost its database lease: another bus process takes over",
    "disowned": "this bus no longer owns the crawler in the registry",
}


@dataclass
class SessionEnd:
    reason: str
    cause: str  # "lost", "timeout", or a key of BYE_REASONS
    ready: bool = False  # the handshake completed
    unauthorized: bool = False


class _Ended(Exception):
    def __init__(self, reason: str, cause: str = "lost", unauthorized: bool = False):
        super().__init__(reason)
        self.reason, self.cause, self.unauthorized = reason, cause, unauthorized


class SessionIO:
    """Runs one connected socket through the handshake and the steady state."""

    def __init__(
        self,
        *,
        sock: socket.socket,
        endpoint: str,
        config: SessionConfig,
        store: Any,
        stop: threading.Event,
        on_worker=None,
        control: SessionControl | None = None,
    ):
        self.sock = sock
        self.control = control or SessionControl()
        self.endpoint = endpoint
        self.config = config
        self.store = store
        self.stop = stop
        self.on_worker = on_worker  # called with the worker once it runs (the Bus tracks them)
        self.session = uuid.uuid4()
        self.reader = protocol.FrameReader(config.max_frame)
        self._pending: list[dict] = []
        self._outbox = bytearray()
        self._out_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.end_cause: str | None = None  # set from another thread to end the session (supervisor)
        self.failure: tuple[str, str] | None = None  # set by the worker: send this error, then close
        self.last_rx = self.last_tx = time.monotonic()
        self.worker: SessionWorker | None = None

    # --- called from other threads ------------------------------------------------
    def send(self, *frames: dict) -> None:
        data = b"".join(protocol.encode_frame(frame) for frame in frames)
        with self._out_lock:
            self._outbox += data
        self.wake()

    def wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # already awake, or closing

    def _clear_wake(self) -> None:
        """Read away the wake-up bytes (the IO thread, after its selector said so)."""
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close_wake(self) -> None:
        try:
            self._wake_w.close()
        except OSError:
            pass

    def end(self, cause: str) -> None:
        self.end_cause = cause
        self.wake()

    def fail(self, code: str, message: str) -> None:
        """End the session with an error frame (from the worker: a misbehaving crawler)."""
        self.failure = (code, message)
        self.wake()

    # --- the session -------------------------------------------------------------------
    def run(self) -> SessionEnd:
        ready = False
        try:
            self.sock.setblocking(False)
            welcome = self._handshake()
            ready = True
            self.worker = SessionWorker(io=self, welcome=welcome)
            if self.on_worker:
                self.on_worker(self.worker)
            self.worker.start()
            self._steady_state()
        except _Ended as ended:
            return self._finish(SessionEnd(ended.reason, ended.cause, ready, ended.unauthorized))
        except OSError as exc:
            return self._finish(SessionEnd(f"socket error: {exc.__class__.__name__}: {exc}", "lost", ready))
        except Exception as exc:  # a bug here must still end the session, or its jobs stay leased for ever
            log.exception(kv("bus.session_crashed", session=self.session, endpoint=self.endpoint))
            return self._finish(SessionEnd(f"session error: {exc.__class__.__name__}", "lost", ready))
        raise AssertionError("unreachable")  # pragma: no cover

    def _finish(self, end: SessionEnd) -> SessionEnd:
        try:
            self.sock.close()
        except OSError:
            pass
        self._wake_r.close()
        if self.worker is not None:
            self.worker.post(("ended", end.reason, end.cause))
        else:
            self._wake_w.close()
        return end

    def _fail(self, code: str, message: str, cause: str = "lost", unauthorized: bool = False):
        """Send an error, flush briefly, and end the session."""
        self.send(protocol.error_frame(code, message))
        self._flush_for(0.5)
        raise _Ended(f"{code}: {message}", cause, unauthorized)

    def _flush_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self._outbox and time.monotonic() < deadline:
            try:
                self._flush()
            except OSError:
                return
            if self._outbox:
                time.sleep(0.01)

    def _flush(self) -> None:
        with self._out_lock:
            if not self._outbox:
                return
            try:
                sent = self.sock.send(self._outbox)
            except BlockingIOError:
                return
            del self._outbox[:sent]
            self.last_tx = time.monotonic()

    def _read_some(self) -> bool:
        """Read what the socket has; False at EOF."""
        try:
            data = self.sock.recv(256 * 1024)
        except (BlockingIOError, InterruptedError):
            return True
        if not data:
            return False
        try:
            frames = self.reader.feed(data)
        except FrameError as exc:
            # The frames before the bad one are well-formed: process them (an
            # outcome among them is recorded) before the session ends.
            self._pending.extend(exc.frames)
            if self.worker is not None and self._pending:
                pending, self._pending = self._pending, []
                self._dispatch(pending)
            self._fail(protocol.BAD_FRAME, str(exc))
        if frames:
            # Liveness by whole frames: a trickle of bytes is not a sign of life.
            self.last_rx = time.monotonic()
            self._pending.extend(frames)
        return True

    def _next_handshake_frame(self, expected: str, deadline: float) -> dict:
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "sock")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")  # end() during the handshake: at once
        try:
            while not self._pending:
                if self.stop.is_set() or self.end_cause:
                    cause = self.end_cause or "closed"
                    raise _Ended(f"{BYE_REASONS.get(cause, 'bus shutdown')} (during the handshake)", cause)
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._fail(protocol.TIMEOUT, f"no {expected} within {self.config.handshake_timeout:g} s")
                for key, _ in selector.select(min(remaining, 0.5)):
                    if key.data == "wake":
                        self._clear_wake()
                    elif not self._read_some():
                        raise _Ended(f"connection closed during handshake (waiting for {expected})")
        finally:
            selector.close()
        frame = self._pending.pop(0)
        if frame["type"] == "error":
            raise _Ended(
                f"crawler sent error during handshake: {frame.get('code')}: {str(frame.get('message'))[:200]}",
                unauthorized=frame.get("code") == protocol.UNAUTHORIZED,
            )
        if frame["type"] != expected:
            self._fail(protocol.BAD_FRAME, f"expected {expected}, got {frame['type'][:50]!r}")
        return frame

    def _handshake(self) -> dict:
        config = self.config
        welcome = self._next_handshake_frame("welcome", time.monotonic() + config.handshake_timeout)
        version = welcome.get("protocol")
        if isinstance(version, bool) or version != protocol.PROTOCOL_VERSION:  # true == 1 in Python, not on the wire
            self._fail(
                protocol.UNSUPPORTED_PROTOCOL,
                f"this bus speaks protocol {protocol.PROTOCOL_VERSION}, not {str(welcome.get('protocol'))[:20]}",
            )
        if not protocol.nonce_ok(welcome.get("nonce")):
            self._fail(protocol.BAD_FRAME, "welcome.nonce must be a hex string of at least 32 characters")
        session = str(self.session)
        hello_nonce = protocol.new_nonce()
        self.send(
            protocol.hello_frame(
                node=config.node,
                session=session,
                heartbeat=config.heartbeat_interval,
                nonce=hello_nonce,
                auth=protocol.hello_proof(config.token, welcome["nonce"], session) if config.token else None,
            )
        )
        self._flush_for(config.handshake_timeout)
        ready = self._next_handshake_frame("ready", time.monotonic() + config.handshake_timeout)
        if config.token and not protocol.proof_matches(
            protocol.ready_proof(config.token, hello_nonce, session), ready.get("auth")
        ):
            log.error(
                kv(
                    "bus.unauthorized",
                    session=session,
                    endpoint=self.endpoint,
                    detail="the crawler's ready proof is missing or wrong (check BUS_TOKEN on both sides)",
                )
            )
            self._fail(protocol.UNAUTHORIZED, "missing or wrong ready.auth", unauthorized=True)
        try:
            slots = protocol.slots_of(ready)
            running = protocol.running_of(ready)
            kinds = protocol.kinds_of(ready)  # job kinds (section 16): None takes every kind
        except FieldError as exc:
            self._fail(protocol.BAD_FRAME, f"ready: {exc}")
        name = welcome.get("crawler")
        crawler = (
            name.replace("\x00", "") if isinstance(name, str) else ""
        )  # PostgreSQL text cannot hold NUL: the row would never be written
        log.info(
            kv(
                "bus.session_ready",
                session=session,
                endpoint=self.endpoint,
                crawler=crawler[:100],
                slots=slots,
                resumed=len(running),
                kinds=",".join(kinds)[:200] if kinds is not None else None,
            )
        )
        # Politeness extension (docs/protocol.md section 15): the crawler fetches robots.txt when asked.
        return {
            "crawler": crawler,
            "slots": slots,
            "running": running,
            "robots": ready.get("robots") is True,
            "kinds": kinds,
        }

    def _steady_state(self) -> None:
        config = self.config
        selector = selectors.DefaultSelector()
        selector.register(self.sock, selectors.EVENT_READ, "sock")
        selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        registered = selectors.EVENT_READ
        try:
            while True:
                if self._pending:
                    self._dispatch(self._pending)
                    self._pending = []
                if self.failure:
                    self._fail(*self.failure)
                if self.stop.is_set() or self.end_cause:
                    cause = self.end_cause or "closed"
                    reason = BYE_REASONS.get(cause, "bus shutdown")
                    # A hand-over (extension): keep running this session's jobs and list them in
                    # the next ready.running; the next owner connects within resume_within seconds.
                    resume = self.config.handover_resume if cause == "handover" else None
                    self.send(protocol.bye_frame(reason, resume_within=resume))
                    self._flush_for(1.0)
                    raise _Ended(reason, cause)
                now = time.monotonic()
                silence = now - self.last_rx
                if silence >= config.silence_limit:
                    log.warning(
                        kv(
                            "bus.heartbeat_timeout",
                            session=self.session,
                            endpoint=self.endpoint,
                            silence=round(silence, 3),
                        )
                    )
                    raise _Ended(f"heartbeat timeout: nothing heard for {silence:.1f} s", "timeout")
                if now - self.last_tx >= config.heartbeat_interval:
                    self.send(protocol.heartbeat_frame())
                self._flush()
                if len(self._outbox) > MAX_OUTBOX_BYTES:
                    raise _Ended("the crawler does not read its frames (outbox over 64 MiB)")
                timeout = min(1.0, config.heartbeat_interval - (now - self.last_tx), config.silence_limit - silence)
                # Backpressure: a crawler that floods frames faster than the
                # database takes them is not read until the worker catches up
                # (and is not timed out for the silence that causes).
                paused = self.worker is not None and self.worker.inbox.qsize() > MAX_INBOX_MESSAGES
                if paused:
                    self.last_rx = now
                wanted = (0 if paused else selectors.EVENT_READ) | (selectors.EVENT_WRITE if self._outbox else 0)
                if wanted != registered:
                    if registered and wanted:
                        selector.modify(self.sock, wanted, "sock")
                    elif wanted:
                        selector.register(self.sock, wanted, "sock")
                    else:
                        selector.unregister(self.sock)
                    registered = wanted
                if paused:
                    timeout = min(timeout, 0.05)
                for key, events in selector.select(max(0.0, timeout)):
                    if key.data == "wake":
                        self._clear_wake()
                    elif events & selectors.EVENT_READ and not self._read_some():
                        raise _Ended("connection closed by the crawler (EOF)")
        finally:
            selector.close()

    def _dispatch(self, frames: list[dict]) -> None:
        """Check each steady-state frame; pass the good ones to the worker as one batch."""
        worker = self.worker
        assert worker is not None  # steady state: the worker runs
        batch: list[tuple[Any, ...]] = []
        for frame in frames:
            kind = frame["type"]
            try:
                if kind == "heartbeat":
                    running = protocol.running_of(frame) if "running" in frame else None
                    batch.append(("heartbeat", running))
                elif kind in ("done", "failed"):
                    batch.append(("outcome", self._outcome(frame)))
                elif kind == "started":
                    batch.append(("started", protocol.job_id_of(frame), protocol.attempt_of(frame)))
                elif kind == "progress":
                    batch.append(
                        ("progress", protocol.job_id_of(frame), protocol.attempt_of(frame), self._progress(frame))
                    )
                elif kind == "capacity":
                    batch.append(("capacity", protocol.slots_of(frame)))
                elif kind == "robots":
                    batch.append(("robots", *protocol.robots_answer_of(frame, max_body=self.config.max_frame)))
                elif kind == "error":
                    log.warning(
                        kv(
                            "bus.crawler_error",
                            session=self.session,
                            code=str(frame.get("code"))[:50],
                            message=str(frame.get("message"))[:300],
                            job=frame.get("job_id"),
                        )
                    )
                elif kind == "bye":
                    if batch:
                        worker.post(*batch)
                    reason = str(frame.get("reason"))[:200].replace("\x00", "")  # it goes to the database
                    raise _Ended(f"crawler said bye: {reason}", "closed")
                elif kind in ("welcome", "ready", "hello", "assign", "ack", "cancel"):
                    self.send(protocol.error_frame(protocol.INVALID, f"unexpected {kind} frame after the handshake"))
                else:
                    self.send(protocol.error_frame(protocol.UNKNOWN_TYPE, f"unknown frame type {kind[:50]!r}"))
            except FieldError as exc:
                ids = {
                    key: frame[key]
                    for key in ("job_id", "attempt")
                    if key in frame and isinstance(frame[key], int) and not isinstance(frame[key], bool)
                }
                self.send(protocol.error_frame(protocol.INVALID, f"{kind}: {exc}", **ids))
        if batch:
            worker.post(*batch)

    def _outcome(self, frame: dict):
        job_id, attempt = protocol.job_id_of(frame), protocol.attempt_of(frame)
        if frame["type"] == "done":
            result = frame.get("result")
            if not isinstance(result, dict):
                raise FieldError("done.result must be a JSON object")
            size = len(protocol.encode_frame(result)) - 1
            if size > self.config.max_result:
                # Recorded all the same (the job did finish), with a marker instead of the result.
                log.warning(
                    kv(
                        "bus.result_too_large",
                        session=self.session,
                        job=job_id,
                        attempt=attempt,
                        bytes=size,
                        limit=self.config.max_result,
                    )
                )
                result = {"result_too_large": {"bytes": size, "limit": self.config.max_result}}
            # Checked even when storing is off: a bad `items` is a bad frame whatever the setting.
            items = protocol.items_of(frame, limit=self.config.max_items)
            if items is None or not self.config.max_items:
                return Outcome(job_id=job_id, attempt=attempt, succeeded=True, result=_without_nul(result))
            return Outcome(
                job_id=job_id,
                attempt=attempt,
                succeeded=True,
                result=_without_nul(result),
                items=items[0],
                # Cut here by the cap, or already by the crawler (its own limits; docs/protocol.md section 17).
                items_truncated=items[1] or result.get("items_truncated") is True,
            )
        error = frame.get("error", "")
        retryable = frame.get("retryable", False)
        if not isinstance(error, str):
            raise FieldError("failed.error must be a string")
        if not isinstance(retryable, bool):
            raise FieldError("failed.retryable must be true or false")
        return Outcome(
            job_id=job_id,
            attempt=attempt,
            succeeded=False,
            error=error[:MAX_ERROR_TEXT].replace("\x00", ""),
            retryable=retryable,
            http_status=http_status_of(frame.get("status")),
            retry_after=retry_after_of(frame.get("retry_after")),
            network=frame.get("cause") == "network",
        )

    @staticmethod
    def _progress(frame: dict) -> dict[str, Any]:
        progress: dict[str, Any] = {}
        for name in ("done", "total"):
            value = protocol.number_of(frame, name)
            if value is not None:
                progress[name] = value
        message = frame.get("message")
        if message is not None:
            if not isinstance(message, str):
                raise FieldError("progress.message must be a string")
            progress["message"] = message[:MAX_PROGRESS_MESSAGE].replace("\x00", "")
        return progress


def _without_nul(value: Any) -> Any:
    """`value` with NUL removed from every string and key.

    PostgreSQL's jsonb refuses \\u0000, and an outcome the database refuses
    would be retried forever, stalling every later frame of the session.
    """
    if isinstance(value, str):
        return value.replace("\x00", "")
    if isinstance(value, dict):
        return {_without_nul(key): _without_nul(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_nul(item) for item in value]
    return value


@dataclass
class _Assignment:
    attempt: int
    assigned_at: float
    misses: int = 0
    active_at: float = 0.0  # last started/progress report (assignment time until then)

    def __post_init__(self):
        self.active_at = self.active_at or self.assigned_at


@dataclass
class _WorkerState:
    slots: int
    outstanding: dict[int, _Assignment] = field(default_factory=dict)
    outcomes: list = field(default_factory=list)
    reported_running: list | None = None
    lost: list[int] = field(default_factory=list)
    stalled: list[tuple[int, int]] = field(default_factory=list)
    started: list[tuple[int, int]] = field(default_factory=list)
    progress: dict[int, tuple[int, dict]] = field(default_factory=dict)
    progress_written: dict[int, float] = field(default_factory=dict)
    want_dispatch: bool = True
    seen_due: bool = True
    seen_at: float = 0.0
    poll_at: float = 0.0
    suspects: set[int] = field(default_factory=set)  # run_alone jobs: nothing else is claimed while one runs
    stale: int = 0  # stale outcomes from this session so far
    stale_limit: int = STALE_FLOOD_BASE
    orphans_at: float = 0.0  # when to requeue the jobs earlier sessions left (0: done)
    ready_at: float = 0.0  # when a host that was waiting becomes ready: claim again then (0: none waits)
    robots_asked: dict[str, float] = field(default_factory=dict)  # host key: when its robots.txt was asked for
    robots_answers: list = field(default_factory=list)
    robots_check_at: float = 0.0  # next look for due robots.txt fetches
    robots_wanted: bool = True  # look (new hosts may have appeared)


class SessionWorker(threading.Thread):
    """The database side of one session; see the module docstring."""

    def __init__(self, *, io: SessionIO, welcome: dict):
        super().__init__(name=f"bus-worker-{str(io.session)[:8]}", daemon=True)
        self.io = io
        self.store = io.store
        self.session = io.session
        self.config = io.config
        self.welcome = welcome
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.state = _WorkerState(slots=min(welcome["slots"], self.config.max_slots))
        self.state.stale_limit = STALE_FLOOD_BASE + 2 * self.state.slots
        self.ended: tuple[str, str] | None = None
        self.finished = threading.Event()

    def post(self, *messages) -> None:
        for message in messages:
            self.inbox.put(message)

    def wake(self) -> None:
        self.inbox.put(("wake",))

    def run(self) -> None:
        try:
            self._start_session()
            delay = 0.05
            while True:
                try:
                    self._work()
                    delay = 0.05
                except Exception as exc:  # database trouble: keep everything pending and retry
                    log.warning(
                        kv(
                            "bus.db_error",
                            session=self.session,
                            error=exc.__class__.__name__,
                            detail=str(exc).strip()[:300],
                        )
                    )
                    self._reset_connection()
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)  # short: leases must be renewed soon after an outage
                    self._drain()
                    continue
                if self.ended:
                    break
                self._receive()
            self._end_session()
        except Exception:
            log.exception(kv("bus.worker_crashed", session=self.session))
            self.io.end("lost")
            if self.ended is None:
                self.ended = ("session worker crashed", "lost")
            self._end_session()
        finally:
            self._reset_connection()
            self.io.close_wake()
            self.finished.set()

    def _reset_connection(self) -> None:
        try:
            self.store.close_connection()
        except Exception:
            pass

    def _retrying(self, what: str, call):
        """Run a database call until it succeeds (the database may be restarting)."""
        delay = 0.05
        while True:
            try:
                return call()
            except Exception as exc:
                log.warning(
                    kv(
                        "bus.db_error",
                        session=self.session,
                        during=what,
                        error=exc.__class__.__name__,
                        detail=str(exc).strip()[:300],
                    )
                )
                self._reset_connection()
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _start_session(self) -> None:
        io, welcome = self.io, self.welcome
        self._retrying(
            "open_session",
            lambda: self.store.open_session(
                session=self.session,
                node=self.config.node,
                endpoint=io.endpoint,
                crawler=welcome["crawler"],
                slots=welcome["slots"],
                kinds=welcome.get("kinds"),
            ),
        )
        taken, refused = self._retrying(
            "session_ready",
            lambda: self.store.session_ready(
                session=self.session,
                endpoint=io.endpoint,
                epoch=io.control.epoch,
                slots=welcome["slots"],
                running=welcome["running"],
            ),
        )
        now = time.monotonic()
        self.state.orphans_at = now + ORPHAN_GRACE
        for job_id, attempt in taken:
            self.state.outstanding[job_id] = _Assignment(attempt, now)
        if refused:
            io.send(*(protocol.cancel_frame(job_id, attempt) for job_id, attempt in refused))
        if welcome["running"]:
            log.info(kv("bus.re_leased", session=self.session, taken=len(taken), cancelled=len(refused)))

    def _receive(self) -> None:
        """Wait for messages (at most until the next poll or progress write) and apply them to the state."""
        state = self.state
        now = time.monotonic()
        if now >= state.poll_at:
            # Fallback poll on a fixed schedule (frames must not keep pushing it
            # back): jobs enqueued by other processes on SQLite, retries now due.
            state.want_dispatch = state.robots_wanted = True
            state.poll_at = now + self.config.poll_interval
        timeout = min(state.poll_at - now, max(0.0, state.seen_at + self.config.heartbeat_interval - now))
        if state.robots_wanted and self.welcome.get("robots"):
            timeout = min(timeout, max(0.0, state.robots_check_at - now))
        if state.ready_at:
            if now >= state.ready_at:
                state.want_dispatch, state.ready_at = True, 0.0
                return
            timeout = min(timeout, state.ready_at - now)
        if state.progress:
            timeout = min(timeout, PROGRESS_WRITE_INTERVAL)
        if state.orphans_at:
            timeout = min(timeout, max(0.0, state.orphans_at - now))
        if self.config.stall_timeout and state.outstanding:
            timeout = min(timeout, 1.0)  # stalls are checked on every pass, whatever the crawler sends
        if state.outcomes or state.lost or state.stalled or state.started or state.reported_running is not None:
            timeout = 0
        try:
            message = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return
        self._apply(message)
        self._drain()

    def _drain(self) -> None:
        """Apply every message already waiting, without blocking."""
        while True:
            try:
                message = self.inbox.get_nowait()
            except queue.Empty:
                return
            self._apply(message)

    def _apply(self, message: tuple) -> None:
        state = self.state
        kind = message[0]
        if kind != "wake" and time.monotonic() - state.seen_at >= self.config.heartbeat_interval / 2:
            state.seen_due = True  # any frame shows the session alive, not only heartbeats
        if kind == "outcome":
            outcome = message[1]
            assignment = state.outstanding.get(outcome.job_id)
            if assignment and assignment.attempt == outcome.attempt:
                del state.outstanding[outcome.job_id]
                state.want_dispatch = True
            state.progress.pop(outcome.job_id, None)
            state.outcomes.append(outcome)
        elif kind == "heartbeat":
            if message[1] is not None:
                state.reported_running = message[1]
                self._reconcile(message[1])
        elif kind == "started":
            if self._holds(message[1], message[2]):
                state.started.append((message[1], message[2]))
        elif kind == "progress":
            if self._holds(message[1], message[2]):
                state.progress[message[1]] = (message[2], message[3])
        elif kind == "capacity":
            slots = min(message[1], self.config.max_slots)
            state.want_dispatch = slots > state.slots
            state.slots = slots
            state.stale_limit = max(state.stale_limit, STALE_FLOOD_BASE + 2 * slots)
            state.seen_due = True
        elif kind == "robots":
            if state.robots_asked.pop(message[1], None) is not None:
                state.robots_answers.append(message[1:])
            else:
                self.io.send(protocol.error_frame(protocol.STALE, "no robots.txt of that host was asked for"))
        elif kind == "wake":
            state.want_dispatch = state.robots_wanted = True
        elif kind == "ended":
            self.ended = (message[1], message[2])

    def _holds(self, job_id: int, attempt: int) -> bool:
        assignment = self.state.outstanding.get(job_id)
        if assignment and assignment.attempt == attempt:
            assignment.active_at = time.monotonic()
            return True
        self.io.send(
            protocol.error_frame(
                protocol.STALE, "job is not leased to this session with that attempt", job_id=job_id, attempt=attempt
            )
        )
        return False

    def _reconcile(self, running: list[tuple[int, int]]) -> None:
        """Count heartbeats that leave out an assigned job; two in a row make it a lost assignment."""
        listed = set(running)
        older_than = time.monotonic() - self.config.heartbeat_interval
        for job_id, assignment in list(self.state.outstanding.items()):
            if (job_id, assignment.attempt) in listed:
                assignment.misses = 0
            elif assignment.assigned_at < older_than:
                assignment.misses += 1
                if assignment.misses >= 2:
                    del self.state.outstanding[job_id]
                    self.state.lost.append(job_id)
                    self.state.want_dispatch = True

    def _check_stalls(self) -> None:
        """BUS_STALL_TIMEOUT: a job with no started/progress report for that long is requeued.

        Liveness of the crawler is not liveness of the job: heartbeats, listed
        or not, do not count, so this holds whatever the crawler's heartbeats say.
        """
        stall = self.config.stall_timeout
        if not stall:
            return
        now = time.monotonic()
        for job_id, assignment in list(self.state.outstanding.items()):
            if now - assignment.active_at > stall:
                del self.state.outstanding[job_id]
                self.state.stalled.append((job_id, assignment.attempt))
                self.state.want_dispatch = True

    def _count_stale(self, stale: int) -> None:
        """Close a session that keeps sending outcomes it may not record (a flood of made-up attempts)."""
        state = self.state
        state.stale += stale
        if state.stale > state.stale_limit and self.io.failure is None:
            log.warning(
                kv(
                    "bus.stale_flood",
                    session=self.session,
                    endpoint=self.io.endpoint,
                    stale=state.stale,
                    limit=state.stale_limit,
                )
            )
            self.io.fail(
                TOO_MANY_STALE,
                f"{state.stale} stale outcomes in this session (the limit is {state.stale_limit}): closing it",
            )

    def _work(self) -> None:
        """One pass over the pending database work; raises on database errors, keeping it pending."""
        state, store, session = self.state, self.store, self.session
        self._check_stalls()
        # The crawler's running list first: it was sent before any outcome of
        # this batch, so a job it lists and then finished is still ours here.
        if state.reported_running is not None and not self.ended:
            reported = state.reported_running
            renewed = store.renew(session=session, running=reported)
            # A job reported and then finished in this same batch is not "not ours".
            finishing = {(o.job_id, o.attempt) for o in state.outcomes}
            cancel = [pair for pair in reported if pair not in renewed and pair not in finishing]
            for job_id, attempt in cancel:
                assignment = state.outstanding.get(job_id)
                if assignment and assignment.attempt == attempt:
                    del state.outstanding[job_id]  # no longer ours (cancelled or requeued elsewhere)
                    state.want_dispatch = True
            if cancel:
                self.io.send(*(protocol.cancel_frame(job_id, attempt) for job_id, attempt in cancel))
            state.reported_running = None
        if state.outcomes:
            acks = store.record_outcomes(
                session=session,
                endpoint=self.io.endpoint,
                outcomes=state.outcomes,
                audit_stale=max(0, STALE_AUDIT_PER_SESSION - state.stale),
            )
            if not self.ended:  # the socket is gone otherwise; the crawler resends and gets "recorded"
                self.io.send(*(protocol.ack_frame(o.job_id, o.attempt, ack) for o, ack in zip(state.outcomes, acks)))
            self._count_stale(acks.count(STALE_ACK))  # after the acks: they go out before the error
            state.outcomes = []
        if self.ended:
            return
        if state.orphans_at and time.monotonic() >= state.orphans_at:
            self._settle_orphans()
        if state.lost:
            counts = store.requeue_lost_assignments(session=session, job_ids=state.lost)
            log.info(kv("bus.lost_assignments", session=session, jobs=len(state.lost), counts=counts))
            state.lost = []
        if state.stalled:
            reason = f"stalled: no progress reported for {self.config.stall_timeout:g} s"
            counts = store.requeue_stalled(
                session=session, job_ids=[job_id for job_id, _ in state.stalled], reason=reason
            )
            self.io.send(*(protocol.cancel_frame(job_id, attempt) for job_id, attempt in state.stalled))
            log.info(kv("bus.stalled_jobs", session=session, jobs=len(state.stalled), counts=counts))
            state.stalled = []
        if state.seen_due or time.monotonic() - state.seen_at >= self.config.heartbeat_interval:
            store.session_seen(session=session, slots=state.slots)
            state.seen_due, state.seen_at = False, time.monotonic()
        for job_id, attempt in state.started:
            store.started(session=session, job_id=job_id, attempt=attempt)
        state.started = []
        now = time.monotonic()
        for job_id, (attempt, progress) in list(state.progress.items()):
            if now - state.progress_written.get(job_id, 0.0) >= PROGRESS_WRITE_INTERVAL:
                store.progress(session=session, job_id=job_id, attempt=attempt, progress=progress)
                state.progress_written[job_id] = now
                del state.progress[job_id]
        if len(state.progress_written) > 10_000:
            state.progress_written = {k: v for k, v in state.progress_written.items() if now - v < 2}
        if state.robots_answers:
            answers, state.robots_answers = state.robots_answers, []
            for host, status, body, error in answers:
                answer = store.record_robots(session=session, host=host, status=status, body=body, error=error)
                if not answer.recorded:
                    log.info(kv("bus.robots_refused", session=session, host=host[:100], why=answer.reason))
            state.want_dispatch = True
        if self.welcome.get("robots") and state.robots_wanted:
            self._ask_for_robots()
        if self.io.control.draining and not state.outstanding and self.io.end_cause is None:
            self.io.end("drained")  # the crawler finished what it had: the drain is complete
        while (
            state.want_dispatch
            and not self.ended
            and self.io.failure is None
            and self.io.end_cause is None  # ending (a hand-over, a drain): nothing new to this session
            and not self.io.control.draining
        ):
            state.suspects = {job_id for job_id in state.suspects if job_id in state.outstanding}
            wanted = dispatch.ask(
                slots=state.slots, outstanding=len(state.outstanding), running_suspect=bool(state.suspects)
            )
            if wanted.limit <= 0:
                state.want_dispatch = False  # full, or running a suspect alone
                break
            limit = wanted.limit
            claim = store.claim(
                session=session,
                endpoint=self.io.endpoint,
                limit=limit,
                alone=wanted.alone,
                kinds=self.welcome.get("kinds"),
            )
            claimed = claim.jobs
            at = time.monotonic()
            for job in claimed:
                state.outstanding[job.id] = _Assignment(job.attempt, at)
                if job.run_alone:
                    state.suspects.add(job.id)
            if claimed:
                self.io.send(
                    *(
                        protocol.assign_frame(job.id, job.attempt, url=job.url, payload=job.payload, kind=job.kind)
                        for job in claimed
                    )
                )
            state.want_dispatch = len(claimed) == limit and not claimed[0].run_alone
            if not state.want_dispatch and len(claimed) < limit:
                # Hosts that must wait were skipped: ask again when the next one is ready.
                state.ready_at = 0.0 if claim.wait is None else time.monotonic() + claim.wait + READY_MARGIN
            if not self.inbox.empty():
                break  # outcomes waiting: record and ack them before claiming more

    def _ask_for_robots(self) -> None:
        """Ask this crawler to fetch due robots.txt files (at most ROBOTS_PER_SESSION at a time)."""
        state = self.state
        now = time.monotonic()
        if now < state.robots_check_at:
            return
        if self.io.end_cause is not None or self.io.control.draining:
            state.robots_wanted = False  # nothing new for an ending session (and no busy loop waiting for it)
            return
        state.robots_asked = {host: at for host, at in state.robots_asked.items() if now - at < ROBOTS_ANSWER_WAIT}
        room = ROBOTS_PER_SESSION - len(state.robots_asked)
        requests = self.store.claim_robots(session=self.session, limit=room) if room > 0 else []
        for request in requests:
            state.robots_asked[request.host] = now
        if requests:
            self.io.send(*(protocol.robots_request_frame(r.host, r.url) for r in requests))
        state.robots_check_at = now + ROBOTS_CHECK_INTERVAL
        state.robots_wanted = bool(requests) and len(state.robots_asked) < ROBOTS_PER_SESSION

    def _settle_orphans(self) -> None:
        counts = self.store.settle_orphans(session=self.session, endpoint=self.io.endpoint, epoch=self.io.control.epoch)
        self.state.orphans_at = 0.0
        if counts is not None and counts.total:
            log.info(kv("bus.orphans_requeued", session=self.session, requeued=counts.requeued, failed=counts.failed))

    def _end_session(self) -> None:
        if self.state.orphans_at:  # ended within the grace: the next owner would wait for them otherwise
            self._retrying("settle_orphans", self._settle_orphans)
        reason, cause = self.ended or ("session ended", "lost")
        unaudited = self.state.stale - STALE_AUDIT_PER_SESSION
        if unaudited > 0:
            # The summary of what was not audited one by one (PROTOCOL.md: bounded audit).
            reason = f"{reason}; {unaudited} more stale outcomes from session {self.session} not audited one by one"
        started = time.monotonic()
        counts = self._retrying(
            "end_session", lambda: self.store.end_session(session=self.session, reason=reason, cause=cause)
        )
        log.info(
            kv(
                "bus.session_ended",
                session=self.session,
                endpoint=self.io.endpoint,
                reason=reason,
                cause=cause,
                requeued=getattr(counts, "requeued", None),
                failed=getattr(counts, "failed", None),
                ms=round((time.monotonic() - started) * 1000, 1),
            )
        )
