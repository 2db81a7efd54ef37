"""The Bus: one session per crawler endpoint, reconnecting for as long as it runs.

The same object runs in the foreground (`manage.py runbus`) and in a daemon
thread of server processes (BusConfig.ready -> start_background_bus). Besides
the sessions it runs supervised helper threads: the PostgreSQL LISTEN for new
jobs, the lease sweeper, and, when SUPERVISED, the parent-process watcher.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable

from jobsite.logging import kv

from .endpoints import Endpoint, parse_endpoint
from .session import SessionConfig, SessionIO, SessionWorker
from .store import Store

log = logging.getLogger("bus.runtime")

EXIT_SUPERVISOR_LOST = 3


class BusConfigError(ValueError):
    pass


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 60))))


def default_node() -> str:
    """host:pid — unique per live bus; start-up recovery and the sweeper use it to tell dead buses' sessions."""
    return f"{socket.gethostname()}:{os.getpid()}"


class Bus:
    def __init__(
        self,
        *,
        endpoints: list[str],
        heartbeat_timeout: float,
        store: Store,
        token: str | None = None,
        max_frame: int = 1024 * 1024,
        backoff_base: float = 0.1,
        backoff_cap: float = 30.0,
        poll_interval: float = 2.0,
        sweep_interval: float = 2.0,
        stall_timeout: float = 0.0,
        max_slots: int = 1000,
        max_result: int = 64 * 1024,
        node: str | None = None,
        supervised: bool = False,
    ):
        self.endpoints: list[Endpoint] = [parse_endpoint(text) for text in endpoints]
        for endpoint in self.endpoints:
            if endpoint.is_tcp and not token:
                raise BusConfigError(
                    f"refusing to connect to {endpoint} without a token: TCP sessions need BUS_TOKEN "
                    "(the shared secret of the HMAC handshake)"
                )
        self.store = store
        self.explicit_node = bool(node)
        self.node = node or default_node()
        self.config = SessionConfig(
            heartbeat_timeout=heartbeat_timeout,
            token=token,
            max_frame=max_frame,
            node=self.node,
            poll_interval=poll_interval,
            stall_timeout=stall_timeout,
            max_slots=max_slots,
            max_result=max_result,
        )
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.sweep_interval = sweep_interval
        self.supervised = supervised
        self.parent_pid = os.getppid()
        self.stop_event = threading.Event()
        self.supervisor_lost = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionIO] = {}
        self._workers: list[SessionWorker] = []

    @classmethod
    def from_settings(cls, *, endpoints: list[str] | None = None, supervised: bool | None = None) -> Bus:
        from django.conf import settings

        from .store import DjangoStore

        store = DjangoStore(heartbeat_timeout=settings.HEARTBEAT_TIMEOUT)
        bus = cls(
            endpoints=list(endpoints if endpoints is not None else settings.BUS_ENDPOINTS),
            heartbeat_timeout=settings.HEARTBEAT_TIMEOUT,
            store=store,
            token=settings.BUS_TOKEN,
            max_frame=settings.BUS_MAX_FRAME,
            backoff_base=settings.BUS_BACKOFF_BASE,
            backoff_cap=settings.BUS_BACKOFF_CAP,
            poll_interval=settings.BUS_POLL_INTERVAL,
            sweep_interval=settings.BUS_SWEEP_INTERVAL,
            stall_timeout=settings.BUS_STALL_TIMEOUT,
            max_slots=settings.BUS_MAX_SLOTS,
            max_result=settings.BUS_MAX_RESULT,
            node=settings.BUS_NODE,
            supervised=settings.SUPERVISED if supervised is None else supervised,
        )
        store.sender = bus
        return bus

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> None:
        """Start every thread and return; sessions come up in the background.

        Start-up recovery runs first, before any session competes for the CPU
        and the database: a restarted bus gives back its dead incarnation's
        jobs at once (if the database is unreachable, the sweeper retries).
        """
        try:
            self.store.recover_dead_sessions(
                node=self.node, explicit_node=self.explicit_node, heartbeat_timeout=self.config.heartbeat_timeout
            )
        except Exception as exc:
            log.warning(kv("bus.recovery_failed", error=exc.__class__.__name__, detail=str(exc).strip()[:200]))
        finally:
            self.store.close_connection()
        for endpoint in self.endpoints:
            self._spawn(f"bus-endpoint-{endpoint}", functools.partial(self._endpoint_loop, endpoint))
        self.store.connect_job_signal(self.wake_workers)
        self._spawn("bus-listen", lambda: self.store.listen_for_jobs(self.wake_workers, self.stop_event))
        self._spawn("bus-sweeper", self._sweep_loop)
        if self.supervised:
            self._spawn("bus-supervisor", self._watch_parent)
        log.info(
            kv(
                "bus.started",
                node=self.node,
                endpoints=",".join(map(str, self.endpoints)) or "none",
                heartbeat_timeout=self.config.heartbeat_timeout,
                supervised=self.supervised,
            )
        )

    def run(self) -> int:
        """Run until stop() (or the supervisor goes away); return the exit status."""
        self.start()
        self.stop_event.wait()
        self.shutdown()
        return EXIT_SUPERVISOR_LOST if self.supervisor_lost else 0

    def stop(self) -> None:
        self.stop_event.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for io in sessions:
            io.wake()

    def shutdown(self, timeout: float = 4.0) -> None:
        """Stop, say bye on every session, and wait for their jobs to be requeued."""
        self.stop()
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)  # only started ones: see _spawn
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.finished.wait(max(0.0, deadline - time.monotonic()))
        self.store.disconnect_job_signal()
        log.info(kv("bus.stopped", node=self.node, supervisor_lost=self.supervisor_lost))

    def wake_workers(self) -> None:
        with self._lock:
            workers = [worker for worker in self._workers if not worker.finished.is_set()]
        for worker in workers:
            worker.wake()

    @property
    def connected_sessions(self) -> list[str]:
        with self._lock:
            return [str(io.session) for io in self._sessions.values() if io.worker is not None]

    # --- threads ------------------------------------------------------------------------
    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        if self.stop_event.is_set():
            return  # stopped while starting (SIGTERM right after start-up)
        thread = threading.Thread(target=self._supervise, args=(name, target), name=name, daemon=True)
        try:
            thread.start()
        except RuntimeError:  # "can't create new thread at interpreter shutdown"
            return
        with self._lock:
            self._threads.append(thread)

    def _supervise(self, name: str, target: Callable[[], None]) -> None:
        """Run a helper; if it dies of an unexpected error, log it and start it again."""
        delay = 0.5
        while not self.stop_event.is_set():
            try:
                target()
                return
            except Exception:
                log.exception(kv("bus.thread_crashed", thread=name, restart_in=delay))
                self.stop_event.wait(delay)
                delay = min(delay * 2, 30.0)

    def _endpoint_loop(self, endpoint: Endpoint) -> None:
        failures = 0
        while not self.stop_event.is_set():
            try:
                sock = endpoint.connect(timeout=5.0)
            except OSError as exc:
                delay = backoff_delay(failures, base=self.backoff_base, cap=self.backoff_cap)
                log.warning(
                    kv(
                        "bus.connect_failed",
                        endpoint=endpoint,
                        attempt=failures + 1,
                        error=exc.__class__.__name__,
                        detail=str(exc)[:200],
                        retry_in=round(delay, 3),
                    )
                )
                failures += 1
                self.stop_event.wait(delay)
                continue
            io = SessionIO(
                sock=sock,
                endpoint=str(endpoint),
                config=self.config,
                store=self.store,
                stop=self.stop_event,
                on_worker=self._track_worker,
            )
            log.info(kv("bus.connected", endpoint=endpoint, session=io.session))
            with self._lock:
                self._sessions[str(endpoint)] = io
            try:
                end = io.run()
            finally:
                with self._lock:
                    self._sessions.pop(str(endpoint), None)
            if end.ready:
                log.info(kv("bus.disconnected", endpoint=endpoint, session=io.session, reason=end.reason))
                failures = 0
            else:
                log.warning(kv("bus.handshake_failed", endpoint=endpoint, session=io.session, reason=end.reason))
                failures += 1
            if self.stop_event.is_set():
                break
            delay = backoff_delay(failures, base=self.backoff_base, cap=self.backoff_cap)
            self.stop_event.wait(delay)

    def _track_worker(self, worker: SessionWorker) -> None:
        with self._lock:
            self._workers = [w for w in self._workers if not w.finished.is_set()] + [worker]

    def _sweep_loop(self) -> None:
        """Start-up recovery at once, then every sweep_interval: expired leases and dead buses' sessions.

        After the database was unreachable, nobody could renew a lease, so
        live buses' leases may look expired: the sweeper then waits one lease
        period, in which every live session renews its leases, before it
        judges anyone dead again.
        """
        wait = 0.0
        outage = False
        while not self.stop_event.wait(wait):
            try:
                if outage:
                    self.store.check_database()
                    log.info(
                        kv(
                            "bus.sweep_paused",
                            seconds=2 * self.config.heartbeat_timeout,
                            why="database back after an outage: live buses renew their leases first",
                        )
                    )
                    outage = False
                    if self.stop_event.wait(2 * self.config.heartbeat_timeout):
                        return
                self.store.recover_dead_sessions(
                    node=self.node, explicit_node=self.explicit_node, heartbeat_timeout=self.config.heartbeat_timeout
                )
                self.store.sweep_expired_leases()
                wait = self.sweep_interval
            except Exception as exc:
                log.warning(kv("bus.sweep_failed", error=exc.__class__.__name__, detail=str(exc).strip()[:200]))
                self.store.close_connection()
                outage = True
                wait = min(self.sweep_interval, 1.0)

    def _watch_parent(self) -> None:
        """SUPERVISED: the parent is the crawler supervisor; when it goes away, give the jobs back and stop."""
        while not self.stop_event.wait(0.1):
            if os.getppid() != self.parent_pid:
                log.error(kv("bus.supervisor_lost", parent_pid=self.parent_pid, node=self.node))
                self.supervisor_lost = True
                with self._lock:
                    sessions = list(self._sessions.values())
                for io in sessions:
                    io.end("supervisor")
                for io in sessions:
                    if io.worker is not None:
                        io.worker.finished.wait(5.0)
                self.stop()
                return


# --- the background bus of server processes --------------------------------------------

_background: Bus | None = None
_background_pid = 0
_background_lock = threading.Lock()


def start_background_bus() -> Bus | None:
    """Start the bus in a daemon thread, once per process (BusConfig.ready calls this).

    The pid check makes a forked child (gunicorn --preload) start its own bus
    instead of trusting the parent's, whose threads did not survive the fork.
    """
    global _background, _background_pid
    with _background_lock:
        if _background is not None and _background_pid == os.getpid():
            return _background
        try:
            bus = Bus.from_settings()
        except BusConfigError as exc:
            log.error(kv("bus.not_started", reason=str(exc)))
            return None
        _background, _background_pid = bus, os.getpid()
        threading.Thread(target=bus.run, name="bus", daemon=True).start()
        atexit.register(bus.shutdown, 3.0)
        return bus


def background_bus() -> Bus | None:
    return _background if _background_pid == os.getpid() else None
