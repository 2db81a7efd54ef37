"""The Bus: sessions to the crawlers this process owns, reconnecting for as long as it runs.

The same object runs in the foreground (`manage.py runbus`) and in a daemon
thread of server processes (BusConfig.ready -> start_background_bus). Every
bus process of a deployment is a node of one fleet: the crawler registry
(jobs.models.Crawler) lists the endpoints, and each endpoint is owned by at
most one node at a time (jobs.fleet). The coordinator thread renews this
node's lease, takes its fair share of endpoints, hands extra ones over, and
follows registry changes; the fence thread ends every session the moment the
lease can no longer be trusted (the database is unreachable), before any other
node may take over. Besides these and one thread per owned endpoint it runs
supervised helpers: the PostgreSQL LISTEN for new jobs, the lease sweeper,
and, when SUPERVISED, the parent-process watcher.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from jobsite_crawler.endpoints import Endpoint, EndpointError, parse_endpoint
from jobsite_crawler.logfmt import kv

from .session import SessionConfig, SessionControl, SessionIO, SessionWorker
from .store import Store, pid_alive

log = logging.getLogger("bus.runtime")

EXIT_SUPERVISOR_LOST = 3
# How long a node that hands a crawler over waits for another node to take it
# (a coordination pass is a quarter second) before it requeues the jobs itself.
HANDOVER_WAIT = 1.0
# How often the sweeper checks that every host with queued jobs is visible to the claim.
HOST_REPAIR_INTERVAL = 60.0


class BusConfigError(ValueError):
    pass


def backoff_delay(attempt: int, *, base: float, cap: float) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    return random.uniform(0, min(cap, base * (2 ** min(attempt, 60))))


def default_node() -> str:
    """host:pid — unique per live bus; start-up recovery and the sweeper use it to tell dead buses' sessions."""
    return f"{socket.gethostname()}:{os.getpid()}"


def machine_key() -> str:
    """Names the process namespace of this machine: two nodes with the same key see each other's pids.

    The host name alone is not enough: containers may share one and still
    have pid namespaces of their own, where another node's pid means nothing.
    """
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot:
            boot_id = boot.read().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return socket.gethostname()  # no /proc: the pid check is then never trusted across nodes
    return f"{socket.gethostname()} {boot_id} {namespace}"[:200]


def preference(node: str, endpoint: str) -> str:
    """Rendezvous order: each node tries the free endpoints in its own order, so they rarely collide."""
    return hashlib.sha1(f"{node} {endpoint}".encode()).hexdigest()


@dataclass(eq=False)
class _Owned:
    """An endpoint this node owns, and the thread that keeps a session to it."""

    endpoint: Endpoint
    control: SessionControl
    release: threading.Event = field(default_factory=threading.Event)
    mode: str = ""  # why the ownership ends: a key of session.BYE_REASONS
    io: SessionIO | None = None
    settled: bool = False  # the jobs earlier sessions left behind are re-leased or requeued


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
        max_items: int = 1000,
        owner_lease: float = 1.2,
        announce_ttl: float = 300.0,
        handover_resume: float = 10.0,
        node: str | None = None,
        supervised: bool = False,
    ):
        self.endpoints: list[Endpoint] = [parse_endpoint(text) for text in endpoints]
        self.token = token
        for endpoint in self.endpoints:
            if endpoint.is_tcp and not token:
                raise BusConfigError(
                    f"refusing to connect to {endpoint} without a token: TCP sessions need BUS_TOKEN "
                    "(the shared secret of the HMAC handshake)"
                )
        self.store = store
        self.explicit_node = bool(node)
        self.node = node or default_node()
        # The fleet's name for this process: unique even when BUS_NODE is shared or reused by a restart.
        self.owner_id = f"{self.node}~{uuid.uuid4().hex[:8]}"
        self.machine = machine_key()
        self.config = SessionConfig(
            heartbeat_timeout=heartbeat_timeout,
            token=token,
            max_frame=max_frame,
            node=self.node,
            poll_interval=poll_interval,
            stall_timeout=stall_timeout,
            max_slots=max_slots,
            max_result=max_result,
            max_items=max_items,
            handover_resume=handover_resume,
        )
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.sweep_interval = sweep_interval
        self.owner_lease = owner_lease
        # Renew (and read the registry) four times a second, and at least six times a lease;
        # stop trusting the lease a sixth of it before it ends.
        self.coordinate_interval = min(0.25, owner_lease / 6)
        self.fence_margin = owner_lease / 6
        self.announce_ttl = announce_ttl
        self.supervised = supervised
        self.parent_pid = os.getppid()
        self.stop_event = threading.Event()  # everything stops: sessions say bye, threads return
        self.stop_requested = threading.Event()  # stop() asks run() to shut down
        self.supervisor_lost = False
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._sessions: dict[str, SessionIO] = {}
        self._workers: list[SessionWorker] = []
        self._owned: dict[str, _Owned] = {}
        self._valid_until = 0.0  # monotonic time until which this node's lease is trusted
        self._stopping = False
        self._others_alive = False  # another node that can take our crawlers over, as of the last view
        self._nudge = threading.Event()  # run the coordinator now
        self._shutdown_lock = threading.Lock()
        self._shut_down = False
        self._renew_failures = 0
        self._seen_at = 0.0

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
            max_items=settings.JOB_ITEMS_MAX,
            owner_lease=settings.BUS_OWNER_LEASE,
            announce_ttl=settings.BUS_ANNOUNCE_TTL,
            handover_resume=settings.BUS_HANDOVER_RESUME,
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
        The endpoints named in settings are registered by the coordinator's
        first pass (retried until the database answers).
        """
        try:
            self.store.recover_dead_sessions(
                node=self.node, explicit_node=self.explicit_node, heartbeat_timeout=self.config.heartbeat_timeout
            )
        except Exception as exc:
            log.warning(kv("bus.recovery_failed", error=exc.__class__.__name__, detail=str(exc).strip()[:200]))
        finally:
            self.store.close_connection()
        self._spawn("bus-coordinator", self._coordinate_loop)
        self._spawn("bus-fence", self._fence_loop)
        self.store.connect_job_signal(self.wake_workers)
        self._spawn("bus-listen", lambda: self.store.listen_for_jobs(self.wake_workers, self.stop_event))
        self._spawn("bus-sweeper", self._sweep_loop)
        if self.supervised:
            self._spawn("bus-supervisor", self._watch_parent)
        log.info(
            kv(
                "bus.started",
                node=self.node,
                owner=self.owner_id,
                endpoints=",".join(map(str, self.endpoints)) or "registry",
                heartbeat_timeout=self.config.heartbeat_timeout,
                owner_lease=self.owner_lease,
                supervised=self.supervised,
            )
        )

    def run(self) -> int:
        """Run until stop() (or the supervisor goes away); return the exit status."""
        self.start()
        self.stop_requested.wait()
        self.shutdown()
        return EXIT_SUPERVISOR_LOST if self.supervisor_lost else 0

    def stop(self) -> None:
        """Ask run() to shut down (signal handlers call this)."""
        self.stop_requested.set()

    def shutdown(self, timeout: float = 4.0) -> None:
        """Hand every crawler over to another live node (else end its session and requeue), then stop.

        A hand-over keeps the jobs leased: the next owner re-leases what the
        crawler still runs (ready.running) and requeues the rest. With no
        other node alive, each session says bye and its jobs are requeued,
        as the one rule says.
        """
        with self._shutdown_lock:
            if self._shut_down:
                return
            self._shut_down = True
        deadline = time.monotonic() + timeout
        self._stopping = True
        others = self._others_alive
        try:  # a fresh look: a node that joined since the last pass can take over too
            view = self.store.fleet_renew(
                node=self.owner_id, host=self.machine, pid=os.getpid(), lease_seconds=self.owner_lease, stopping=True
            )
            others = any(
                node.node != self.owner_id and not node.stopping and self._alive(node, view.now) for node in view.nodes
            )
        except Exception as exc:
            log.warning(kv("bus.lease_renewal_failed", during="shutdown", error=exc.__class__.__name__))
        finally:
            self.store.close_connection()
        with self._lock:
            mode = "handover" if others else "closed"
            for owned in list(self._owned.values()):
                self._end_owned(owned, mode)
        self.stop_event.set()
        self.stop_requested.set()
        self._nudge.set()
        with self._lock:
            sessions = list(self._sessions.values())
        for io in sessions:
            io.wake()
        with self._lock:
            threads = list(self._threads)  # only started ones: see _spawn
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            workers = list(self._workers)
        for worker in workers:
            worker.finished.wait(max(0.0, deadline - time.monotonic()))
        try:
            self.store.fleet_leave(node=self.owner_id)
        except Exception as exc:
            log.warning(kv("bus.leave_failed", error=exc.__class__.__name__, detail=str(exc).strip()[:200]))
        finally:
            self.store.close_connection()
        self.store.disconnect_job_signal()
        log.info(kv("bus.stopped", node=self.node, supervisor_lost=self.supervisor_lost, handed_over=mode))

    def wake_workers(self) -> None:
        with self._lock:
            workers = [worker for worker in self._workers if not worker.finished.is_set()]
        for worker in workers:
            worker.wake()

    @property
    def connected_sessions(self) -> list[str]:
        with self._lock:
            return [str(io.session) for io in self._sessions.values() if io.worker is not None]

    @property
    def owned_endpoints(self) -> list[str]:
        with self._lock:
            return sorted(key for key, owned in self._owned.items() if not owned.release.is_set())

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
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]

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

    # --- the fleet: ownership -------------------------------------------------------------
    def _coordinate_loop(self) -> None:
        registered = False
        passes = 0
        while not self.stop_event.is_set():
            started = time.monotonic()
            passes += 1
            try:
                if not registered:
                    self.store.register_endpoints([str(endpoint) for endpoint in self.endpoints])
                    registered = True
                view = self.store.fleet_renew(
                    node=self.owner_id,
                    host=self.machine,
                    pid=os.getpid(),
                    lease_seconds=self.owner_lease,
                    stopping=self._stopping,
                    forget=passes % 240 == 1,  # about once a minute: rows of nodes gone for good
                )
            except Exception as exc:
                self._renew_failures += 1
                if self._renew_failures in (1, 10) or self._renew_failures % 100 == 0:
                    log.warning(
                        kv(
                            "bus.lease_renewal_failed",
                            node=self.owner_id,
                            failures=self._renew_failures,
                            error=exc.__class__.__name__,
                            detail=str(exc).strip()[:200],
                        )
                    )
                self.store.close_connection()
            else:
                self._renew_failures = 0
                with self._lock:
                    self._valid_until = started + self.owner_lease - self.fence_margin
                try:
                    self._apply(view)
                except Exception as exc:
                    log.warning(kv("bus.coordinate_failed", error=exc.__class__.__name__, detail=str(exc)[:200]))
                    self.store.close_connection()
            self._nudge.wait(max(0.0, self.coordinate_interval - (time.monotonic() - started)))
            self._nudge.clear()

    def _alive(self, node, now) -> bool:
        if node.node == self.owner_id:
            return True
        if node.lease_expires_at <= now:
            return False
        # Same machine and pid namespace: a dead pid is a dead node at once (no need to wait for its lease).
        return not (node.host == self.machine and node.pid != os.getpid() and not pid_alive(node.pid))

    def _apply(self, view) -> None:
        """One coordination pass over a fresh view of the fleet: follow changes, then take or give endpoints."""
        me = self.owner_id
        live = {node.node for node in view.nodes if self._alive(node, view.now)}
        voters = sorted(node.node for node in view.nodes if node.node in live and not node.stopping)
        rows = {row.endpoint: row for row in view.crawlers}
        ownable = [row for row in view.crawlers if row.state in ("active", "draining")]
        with self._lock:
            self._others_alive = any(node != me for node in voters)
            for key, owned in list(self._owned.items()):
                if owned.release.is_set():
                    continue
                row = rows.get(key)
                if row is None:
                    log.info(kv("bus.crawler_removed", endpoint=key))
                    self._end_owned(owned, "removed")
                elif row.owner != me or row.owner_epoch != owned.control.epoch:
                    log.warning(kv("bus.ownership_lost", endpoint=key, owner=row.owner, epoch=row.owner_epoch))
                    self._end_owned(owned, "disowned")
                else:
                    draining = row.state != "active"
                    if draining != owned.control.draining:
                        owned.control.draining = draining
                        if owned.io is not None and owned.io.worker is not None:
                            owned.io.worker.wake()
            mine = [key for key, owned in self._owned.items() if not owned.release.is_set()]
            busy = set(self._owned)  # includes endpoints still closing: not taken again before that ends
        counts = Counter(row.owner for row in ownable if row.owner in live)
        quotas = _quotas(len(ownable), voters, counts)
        quota = quotas.get(me, 0)
        if len(mine) > quota:
            starved = any(counts.get(node, 0) < quotas[node] for node in voters if node != me)
            if starved or (quota == 0 and voters):
                # Give away the ones that matter least: not connected first, then in our preference order.
                def cost(key: str) -> tuple[bool, str]:
                    io = self._owned[key].io
                    return (io is not None and io.worker is not None, preference(me, key))

                with self._lock:
                    for key in sorted(mine, key=cost)[: len(mine) - quota]:
                        log.info(kv("bus.hand_over", endpoint=key, owned=len(mine), quota=quota))
                        self._end_owned(self._owned[key], "handover")
        elif len(mine) < quota and not self._stopping:
            free = [
                row
                for row in ownable
                if row.endpoint not in busy and (not row.owner or row.owner not in live or row.owner == me)
            ]
            free.sort(key=lambda row: preference(me, row.endpoint))
            chosen: dict[str, tuple[Endpoint, str]] = {}
            seen: dict[str, int] = {}
            for row in free:
                if len(chosen) >= quota - len(mine):
                    break
                try:
                    endpoint = parse_endpoint(row.endpoint)
                except EndpointError as exc:
                    log.error(kv("bus.bad_registered_endpoint", endpoint=row.endpoint[:200], detail=str(exc)))
                    continue
                if endpoint.is_tcp and not self.token:
                    log.error(kv("bus.not_owning", endpoint=endpoint, reason="TCP sessions need BUS_TOKEN"))
                    continue
                chosen[row.endpoint] = (endpoint, row.owner)
                seen[row.endpoint] = row.owner_epoch
            # One statement for all: the last of a dead node's crawlers is taken as soon as the first.
            won = self.store.fleet_acquire(node=me, seen=seen) if seen else {}
            for key, epoch in won.items():  # the rest went to another node meanwhile
                endpoint, previous = chosen[key]
                self._take(endpoint, epoch, previous=previous)
        now = time.monotonic()
        if now - self._seen_at >= 2.0:
            self._seen_at = now
            with self._lock:
                connected = [key for key, owned in self._owned.items() if owned.io is not None and owned.io.worker]
            self.store.fleet_seen(node=me, endpoints=connected)

    def _take(self, endpoint: Endpoint, epoch: int, previous: str) -> None:
        owned = _Owned(endpoint=endpoint, control=SessionControl(epoch))
        with self._lock:
            if time.monotonic() < self._valid_until and not self._stopping:
                self._owned[str(endpoint)] = owned
                started = True
            else:
                started = False
        if not started:  # the lease ran out meanwhile: give it back untouched
            self.store.fleet_release(endpoint=str(endpoint), node=self.owner_id, epoch=epoch)
            return
        log.info(kv("bus.owns", endpoint=endpoint, epoch=epoch, previous=previous or "none"))
        self._spawn(f"bus-endpoint-{endpoint}", lambda: self._endpoint_loop(owned))

    def _end_owned(self, owned: _Owned, mode: str) -> None:
        """End an ownership (caller holds the lock): the session says bye (with this mode) and is not reopened."""
        if owned.release.is_set():
            return
        owned.mode = mode
        owned.release.set()
        if owned.io is not None:
            owned.io.end(mode)

    def _fence_loop(self) -> None:
        """End every session once this node's lease can no longer be trusted (before any other node may take over)."""
        while not self.stop_event.wait(0.05):
            with self._lock:
                if time.monotonic() <= self._valid_until:
                    continue
                ending = [owned for owned in self._owned.values() if not owned.release.is_set()]
                for owned in ending:
                    self._end_owned(owned, "fenced")
            if ending:
                log.error(
                    kv(
                        "bus.fenced",
                        node=self.owner_id,
                        sessions=len(ending),
                        why="the lease could not be renewed in time (database unreachable?): "
                        "sessions end before another bus may take the crawlers over",
                    )
                )

    def _endpoint_loop(self, owned: _Owned) -> None:
        """Keep a session to an owned endpoint until the ownership ends; then give the endpoint back."""
        endpoint, key = owned.endpoint, str(owned.endpoint)
        failures = 0
        last_io: SessionIO | None = None
        try:
            while not (self.stop_event.is_set() or owned.release.is_set()):
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
                    if self._unreachable(owned, exc):
                        break
                    owned.release.wait(delay)
                    continue
                io = SessionIO(
                    sock=sock,
                    endpoint=key,
                    config=self.config,
                    store=self.store,
                    stop=self.stop_event,
                    on_worker=self._track_worker,
                    control=owned.control,
                )
                with self._lock:
                    owned.io = last_io = io
                    self._sessions[key] = io
                    if owned.release.is_set():
                        io.end(owned.mode)  # released between the connect and now
                log.info(kv("bus.connected", endpoint=endpoint, session=io.session))
                try:
                    end = io.run()
                finally:
                    with self._lock:
                        self._sessions.pop(key, None)
                        owned.io = None
                if end.ready:
                    log.info(kv("bus.disconnected", endpoint=endpoint, session=io.session, reason=end.reason))
                    failures, owned.settled = 0, True
                    if end.cause == "drained":
                        with self._lock:
                            self._end_owned(owned, "drained")
                        break
                else:
                    log.warning(kv("bus.handshake_failed", endpoint=endpoint, session=io.session, reason=end.reason))
                    failures += 1
                if self.stop_event.is_set() or owned.release.is_set():
                    break
                owned.release.wait(backoff_delay(failures, base=self.backoff_base, cap=self.backoff_cap))
                if io.worker is not None:
                    # The ended session's jobs are requeued before the next session opens, so its
                    # `ready` finds them queued: the trail reads interrupt, then re-lease, every time.
                    io.worker.finished.wait(5.0)
        finally:
            self._give_back(owned, last_io)

    def _unreachable(self, owned: _Owned, exc: OSError) -> bool:
        """The crawler cannot be reached: settle what earlier sessions left; True ends the ownership."""
        key, epoch = str(owned.endpoint), owned.control.epoch
        try:
            if not owned.settled:
                counts = self.store.fleet_orphans(endpoint=key, epoch=epoch)
                owned.settled = True
                if counts is not None and counts.total:
                    log.info(kv("bus.orphans_requeued", endpoint=key, requeued=counts.requeued, failed=counts.failed))
            if self.store.fleet_unreachable(
                endpoint=key, epoch=epoch, error=f"{exc.__class__.__name__}: {exc}", forget_after=self.announce_ttl
            ):
                log.warning(kv("bus.crawler_dropped", endpoint=key, unreachable_for=self.announce_ttl))
                with self._lock:
                    self._end_owned(owned, "removed")
                return True
            if owned.control.draining and self.store.fleet_idle(endpoint=key):
                with self._lock:
                    self._end_owned(owned, "drained")
                return True
        except Exception as exc:
            log.warning(kv("bus.db_error", during="unreachable", error=exc.__class__.__name__, detail=str(exc)[:200]))
            self.store.close_connection()
        return False

    def _give_back(self, owned: _Owned, io: SessionIO | None) -> None:
        """After the last session of an ownership: release the row so another node can take it at once."""
        key = str(owned.endpoint)
        if io is not None and io.worker is not None:
            io.worker.finished.wait(5.0)  # its final database work (the hand-over's session row) is done
        then = {"handover": "", "closed": "", "supervisor": "", "drained": "paused"}.get(owned.mode or "closed")
        if then is not None:
            for attempt in range(3):
                try:
                    self.store.fleet_release(endpoint=key, node=self.owner_id, epoch=owned.control.epoch, then=then)
                    break
                except Exception as exc:
                    log.warning(kv("bus.release_failed", endpoint=key, error=exc.__class__.__name__))
                    self.store.close_connection()
                    time.sleep(0.1 * (attempt + 1))
        if owned.mode == "handover" and io is not None and io.worker is not None:
            self._await_successor(key, io.session)
        self.store.close_connection()
        with self._lock:
            if self._owned.get(key) is owned:
                del self._owned[key]
        log.info(kv("bus.released", endpoint=key, mode=owned.mode or "closed"))
        self._nudge.set()

    def _await_successor(self, key: str, session: uuid.UUID) -> None:
        """A hand-over kept the session's jobs leased for the next owner: if none comes, requeue them.

        Another node usually takes the crawler within a coordination pass. When
        none does within HANDOVER_WAIT (every node is stopping: a whole
        deployment shut down at once), the jobs go back to the queue here, as
        when no other node was alive: nobody would settle them otherwise.
        """
        deadline = time.monotonic() + HANDOVER_WAIT
        try:
            while time.monotonic() < deadline:
                if self.store.fleet_owner(endpoint=key):
                    return
                time.sleep(0.05)
            counts = self.store.requeue_session(
                session=session, reason=f"handed over, but no other bus took the crawler within {HANDOVER_WAIT:g} s"
            )
            log.info(kv("bus.hand_over_unanswered", endpoint=key, requeued=counts.requeued, failed=counts.failed))
        except Exception as exc:  # the lease sweeper requeues them once their lease ends
            log.warning(kv("bus.db_error", during="hand_over", error=exc.__class__.__name__, detail=str(exc)[:200]))
            self.store.close_connection()

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
        repair_at = 0.0
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
                if time.monotonic() >= repair_at:
                    self.store.repair_hosts()
                    repair_at = time.monotonic() + HOST_REPAIR_INTERVAL
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
                    for owned in list(self._owned.values()):
                        self._end_owned(owned, "supervisor")
                for io in sessions:
                    if io.worker is not None:
                        io.worker.finished.wait(5.0)
                self.stop()
                return


def _quotas(endpoints: int, voters: list[str], owned: Counter) -> dict[str, int]:
    """How many endpoints each node should own: as even as can be (max - min <= 1).

    The remainder goes to the nodes that own the most already, so a node
    joining or leaving moves no more endpoints than evenness needs (one
    endpoint and many nodes: its owner keeps it). Every node computes the
    same quotas from the same view.
    """
    if not voters:
        return {}
    share, extra = divmod(endpoints, len(voters))
    ranked = sorted(voters, key=lambda node: (-owned.get(node, 0), node))
    return {node: share + (1 if rank < extra else 0) for rank, node in enumerate(ranked)}


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
