"""The bus's one narrow interface to the database.

The protocol code (bus/session.py, bus/runtime.py) imports no Django models;
it calls a Store. DjangoStore implements it with jobs.services and the bus
signals, so every job transition still happens in jobs/services.py.
"""

from __future__ import annotations

import logging
import select
import threading
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol
from uuid import UUID

from jobs.outcomes import Outcome
from jobsite_crawler.logfmt import kv

if TYPE_CHECKING:  # the services import models: not at import time (see DjangoStore)
    from jobs.dispatch import Claim
    from jobs.fleet import FleetView
    from jobs.robots import RobotsAnswer, RobotsRequest
    from jobs.services import ResetCounts

log = logging.getLogger("bus.store")

# Why a session ended -> which signal announces it.
SIGNAL_FOR_CAUSE = {
    "lost": "session_lost",
    "closed": "session_lost",
    "timeout": "heartbeat_timeout",
    "supervisor": "supervisor_lost",
}
# Session ends the bus chose: the session row says "closed", not "lost".
CLEAN_CAUSES = ("closed", "handover", "drained", "removed")


class Store(Protocol):
    """What a session (bus/session.py) and the Bus (bus/runtime.py) ask of the database.

    `endpoint` names the crawler: only the crawler an attempt was assigned to
    may record its outcome or take it back after a reconnect.
    """

    # --- one session (SessionWorker) ---
    def open_session(
        self, *, session: UUID, node: str, endpoint: str, crawler: str, slots: int, kinds: list[str] | None = None
    ) -> None: ...
    def session_ready(
        self, *, session: UUID, endpoint: str, epoch: int, slots: int, running: Sequence[tuple[int, int]]
    ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]: ...
    def claim(
        self, *, session: UUID, endpoint: str, limit: int, alone: bool, kinds: list[str] | None = None
    ) -> Claim: ...
    def claim_robots(self, *, session: UUID, limit: int) -> Sequence[RobotsRequest]: ...
    def record_robots(self, *, session: UUID, host: str, status: int, body: str, error: str) -> RobotsAnswer: ...
    def record_outcomes(
        self, *, session: UUID, endpoint: str, outcomes: Sequence[Outcome], audit_stale: int
    ) -> list[str]: ...
    def renew(self, *, session: UUID, running: Sequence[tuple[int, int]]) -> set[tuple[int, int]]: ...
    def started(self, *, session: UUID, job_id: int, attempt: int) -> bool: ...
    def progress(self, *, session: UUID, job_id: int, attempt: int, progress: dict[str, Any]) -> bool: ...
    def session_seen(self, *, session: UUID, slots: int) -> None: ...
    def requeue_lost_assignments(self, *, session: UUID, job_ids: Sequence[int]) -> ResetCounts: ...
    def requeue_stalled(self, *, session: UUID, job_ids: Sequence[int], reason: str) -> ResetCounts: ...
    def end_session(self, *, session: UUID, reason: str, cause: str) -> ResetCounts | None: ...
    def settle_orphans(self, *, session: UUID, endpoint: str, epoch: int) -> ResetCounts | None: ...
    def close_connection(self) -> None: ...

    # --- the Bus's helper threads ---
    def check_database(self) -> None: ...
    def recover_dead_sessions(self, *, node: str, explicit_node: bool, heartbeat_timeout: float) -> int: ...
    def sweep_expired_leases(self) -> ResetCounts: ...
    def repair_hosts(self) -> None: ...
    def connect_job_signal(self, callback: Callable[[], None]) -> None: ...
    def disconnect_job_signal(self) -> None: ...
    def listen_for_jobs(self, callback: Callable[[], None], stop: threading.Event) -> None: ...

    # --- the fleet: this node's lease and the crawlers it owns (jobs/fleet.py) ---
    def register_endpoints(self, endpoints: Sequence[str]) -> None: ...
    def fleet_renew(
        self, *, node: str, host: str, pid: int, lease_seconds: float, stopping: bool, forget: bool = False
    ) -> FleetView: ...
    def fleet_acquire(self, *, node: str, seen: dict[str, int]) -> dict[str, int]: ...
    def fleet_release(self, *, endpoint: str, node: str, epoch: int, then: str = "") -> bool: ...
    def fleet_seen(self, *, node: str, endpoints: Sequence[str]) -> None: ...
    def fleet_unreachable(self, *, endpoint: str, epoch: int, error: str, forget_after: float) -> bool: ...
    def fleet_orphans(self, *, endpoint: str, epoch: int) -> ResetCounts | None: ...
    def fleet_idle(self, *, endpoint: str) -> bool: ...
    def fleet_leave(self, *, node: str) -> None: ...
    def fleet_owner(self, *, endpoint: str) -> str | None: ...
    def requeue_session(self, *, session: UUID, reason: str) -> ResetCounts: ...


# A bus thread's PostgreSQL session: a cut-off bus must not hold row locks
# that keep its crawlers' next owner waiting (a partition hangs, it does not
# error). The server ends a transaction left idle for 10 s and notices a dead
# client within about 25 s, releasing its locks either way.
BUS_CONNECTION_SETTINGS = (
    "SET idle_in_transaction_session_timeout = '10s'; "
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3"
)


def _harden_bus_connection(sender, connection, **kwargs) -> None:
    import threading

    if connection.vendor == "postgresql" and threading.current_thread().name.startswith("bus"):
        with connection.cursor() as cursor:
            cursor.execute(BUS_CONNECTION_SETTINGS)


class DjangoStore:
    """Store backed by jobs.services, bus.models and bus.signals."""

    def __init__(self, *, heartbeat_timeout: float, sender: object = None):
        from django.db.backends.signals import connection_created

        self.lease_seconds = 2 * heartbeat_timeout
        self.sender = sender
        self.live_sessions: set[UUID] = set()  # sessions of this process, never "dead"
        connection_created.connect(_harden_bus_connection, dispatch_uid="bus-connection-settings")

    # Imports are local so that importing bus.store stays free of model imports
    # until Django is set up.
    def open_session(self, *, session, node, endpoint, crawler, slots, kinds=None):
        from django.utils import timezone

        from .models import BusSession

        at = timezone.now()
        self.live_sessions.add(session)
        BusSession.objects.update_or_create(
            session=session,
            defaults=dict(
                node=node,
                endpoint=endpoint,
                crawler=crawler[:200],
                slots=slots,
                kinds=kinds,  # the dashboard's "waiting for a crawler" reads it
                connected_at=at,
                last_heartbeat_at=at,
                state="connected",
            ),
        )

    def session_ready(self, *, session, endpoint, epoch, slots, running):
        """A new session is ready: it takes what its crawler still runs.

        Only while this node's ownership (epoch) stands: then every other
        session of this endpoint is gone or handed it over, so the jobs the
        crawler lists move to this session even if still leased to an old
        one. Its other running jobs are requeued a moment later
        (settle_orphans), once the outcomes the crawler resends after ready
        are recorded.
        """
        from jobs import fleet, services

        owner = fleet.owns(endpoint=endpoint, epoch=epoch)
        taken, refused = (
            services.re_lease_jobs(
                session=session,
                running=running,
                crawler=endpoint,
                lease_seconds=self.lease_seconds,
                take_over=owner,
            )
            if running
            else ([], [])
        )
        if owner:
            fleet.close_earlier_sessions(endpoint=endpoint, keep=session)
            fleet.connected(endpoint=endpoint, epoch=epoch, session=session, slots=slots)
        return taken, refused

    def claim(self, *, session, endpoint, limit, alone, kinds=None):
        from jobs import dispatch

        return dispatch.claim(
            session=session,
            limit=limit,
            crawler=endpoint,
            alone=alone,
            lease_seconds=self.lease_seconds,
            kinds=kinds,
        )

    def claim_robots(self, *, session, limit):
        from jobs import robots

        return robots.claim_fetches(session=session, limit=limit)

    def record_robots(self, *, session, host, status, body, error):
        from jobs import robots

        return robots.record_answer(session=session, host=host, status=status, body=body, error=error)

    def repair_hosts(self):
        from jobs import services

        services.repair_hosts()

    def record_outcomes(self, *, session, endpoint, outcomes, audit_stale):
        """Record a batch; an outcome the database refuses for good fails its job instead of stalling the session.

        Connection errors propagate (the worker retries them). A DataError or
        IntegrityError is not transient: retrying would stall the session
        forever, so the batch is recorded one by one and the refused outcome
        is recorded as a non-retryable failure saying why.
        """
        from django.db import DataError, IntegrityError

        from jobs import services

        try:
            return services.record_outcomes(
                session=session, outcomes=outcomes, crawler=endpoint, audit_stale=audit_stale
            )
        except (DataError, IntegrityError):
            pass
        acks = []
        for outcome in outcomes:
            try:
                acks.append(services.record_outcome(session=session, outcome=outcome, crawler=endpoint))
            except (DataError, IntegrityError) as exc:
                log.warning(
                    kv(
                        "bus.outcome_refused",
                        session=session,
                        job=outcome.job_id,
                        attempt=outcome.attempt,
                        error=exc.__class__.__name__,
                        detail=str(exc).strip()[:200],
                    )
                )
                refused = services.Outcome(
                    job_id=outcome.job_id,
                    attempt=outcome.attempt,
                    succeeded=False,
                    retryable=False,
                    error=f"the crawler's outcome could not be stored ({exc.__class__.__name__}: "
                    f"{str(exc).strip()[:300]})",
                )
                acks.append(services.record_outcome(session=session, outcome=refused, crawler=endpoint))
        return acks

    def renew(self, *, session, running):
        from jobs import services

        return services.renew_leases(session=session, running=running, lease_seconds=self.lease_seconds)

    def started(self, *, session, job_id, attempt):
        from jobs import services

        return services.mark_started(session=session, job_id=job_id, attempt=attempt)

    def progress(self, *, session, job_id, attempt, progress):
        from jobs import services

        return services.record_progress(session=session, job_id=job_id, attempt=attempt, progress=progress)

    def session_seen(self, *, session, slots):
        """The session is alive: record it and extend its leases."""
        from django.db import transaction
        from django.utils import timezone

        from jobs import services

        from .models import BusSession

        with transaction.atomic():
            BusSession.objects.filter(session=session).update(last_heartbeat_at=timezone.now(), slots=slots)
            services.extend_leases(session=session, lease_seconds=self.lease_seconds)

    def requeue_lost_assignments(self, *, session, job_ids):
        from jobs import services

        return services.reset_running_jobs(
            session=session,
            job_ids=job_ids,
            actor="bus",
            reason="lost assignment: the crawler left it out of two heartbeats",
        )

    def requeue_stalled(self, *, session, job_ids, reason):
        from jobs import services

        return services.reset_running_jobs(session=session, job_ids=job_ids, actor="bus", reason=reason)

    def end_session(self, *, session, reason, cause):
        """Send the signal for the session's end (its receiver requeues the jobs), then close the row.

        Raises on database errors: the caller keeps the reset pending and retries.
        """
        from django.db import transaction
        from django.utils import timezone

        from jobs import signals

        from .models import BusSession

        signal = getattr(signals, SIGNAL_FOR_CAUSE.get(cause, "session_lost"))
        self.live_sessions.discard(session)
        with transaction.atomic():
            # A hand-over keeps the jobs leased: the crawler's next owner
            # re-leases what it still runs and requeues the rest.
            responses = [] if cause == "handover" else signal.send(sender=self.sender, session=session, reason=reason)
            BusSession.objects.filter(session=session).update(
                state="closed" if cause in CLEAN_CAUSES else "lost",
                closed_at=timezone.now(),
                close_reason=reason[:1000],
            )
            from jobs import robots

            robots.release_fetches(session=session)  # unanswered robots requests go to another session
        counts = [response for _, response in responses if response is not None]
        return counts[0] if counts else None

    def check_database(self):
        """Raise unless the database answers."""
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")

    def close_connection(self):
        from django.db import connection

        connection.close()

    # --- Helpers for the Bus's maintenance threads ------------------------------

    def sweep_expired_leases(self):
        """Requeue expired leases, after renewing this process's own live sessions.

        A session of ours that is still connected is alive by definition; its
        leases may only look expired because its worker has not renewed them
        yet (e.g. right after a database outage), and must not be swept.
        """
        from django.db import transaction

        from jobs import services

        live = list(self.live_sessions)
        with transaction.atomic():
            for session in live:
                services.extend_leases(session=session, lease_seconds=self.lease_seconds)
            return services.expire_leases(actor="sweeper")

    def recover_dead_sessions(self, *, node: str, explicit_node: bool, heartbeat_timeout: float) -> int:
        """Requeue the jobs of sessions whose bus process is gone; return how many sessions.

        Start-up recovery and the sweeper both call this. A session is dead
        when its node is ours (BUS_NODE set: an earlier incarnation of this
        very bus), when it is a `host:pid` node of this host whose pid no
        longer runs, or when no heartbeat was recorded for 3 x the timeout.
        Each session is reset with reset_running_jobs, so a concurrent sweep
        by another bus cannot count an interruption twice.
        """
        import os
        import socket as socketlib

        from django.utils import timezone

        from jobs import services
        from jobs.models import Crawler

        from .models import BusSession

        # A registered crawler's dead sessions are its next owner's to settle
        # (session_ready, fleet_orphans): it re-leases what the crawler still runs.
        owned = set(Crawler.objects.ownable().values_list("endpoint", flat=True))
        own_pid = os.getpid()
        host_prefix = f"{socketlib.gethostname()}:"
        cutoff = timezone.now() - timedelta(seconds=3 * heartbeat_timeout)
        dead: dict[UUID, str] = {}
        for session, session_node, last_seen, endpoint in BusSession.objects.open().values_list(
            "session", "node", "last_heartbeat_at", "endpoint"
        ):
            if endpoint in owned:
                continue
            if explicit_node and session_node == node and session not in self.live_sessions:
                dead[session] = "bus restarted: recovering the jobs of its earlier session"
            elif session_node.startswith(host_prefix) and session_node[len(host_prefix) :].isdigit():
                pid = int(session_node[len(host_prefix) :])
                if pid != own_pid and not pid_alive(pid):
                    dead[session] = f"bus process {pid} on this host is gone"
            if (
                session not in dead
                and last_seen is not None
                and last_seen < cutoff
                and session not in self.live_sessions
            ):
                dead[session] = "no heartbeat recorded for 3 x HEARTBEAT_TIMEOUT: its bus is gone"
        for session, reason in dead.items():
            counts = services.reset_running_jobs(session=session, actor="sweeper", reason=reason)
            BusSession.objects.filter(session=session, state="connected").update(
                state="lost",
                closed_at=timezone.now(),
                close_reason=reason,
            )
            log.info(
                kv(
                    "bus.recovered_session",
                    session=session,
                    reason=reason,
                    requeued=counts.requeued,
                    failed=counts.failed,
                )
            )
        return len(dead)

    def connect_job_signal(self, callback: Callable[[], None]) -> None:
        from jobs.services import jobs_available

        jobs_available.connect(lambda **kwargs: callback(), weak=False, dispatch_uid=f"bus-wake-{id(self)}")

    def disconnect_job_signal(self) -> None:
        from jobs.services import jobs_available

        jobs_available.disconnect(dispatch_uid=f"bus-wake-{id(self)}")

    def listen_for_jobs(self, callback: Callable[[], None], stop: threading.Event) -> None:
        """On PostgreSQL, LISTEN for enqueue notifications until `stop`; reconnect on errors.

        Returns at once on other databases (they rely on the in-process signal
        and the fallback poll).
        """
        from django.db import connection, connections

        from jobs.services import NOTIFY_CHANNEL

        if connection.vendor != "postgresql":
            return
        delay = 0.1
        while not stop.is_set():
            wrapper = connections.create_connection("default")
            try:
                wrapper.ensure_connection()
                raw = wrapper.connection
                raw.autocommit = True
                with raw.cursor() as cursor:
                    cursor.execute(f"LISTEN {NOTIFY_CHANNEL}")
                delay = 0.1
                callback()  # anything enqueued while we were not listening
                while not stop.is_set():
                    readable, _, _ = select.select([raw], [], [], 1.0)
                    if readable:
                        raw.poll()
                        if raw.notifies:
                            raw.notifies.clear()
                            callback()
            except Exception as exc:  # the database went away: listen again later
                log.warning(kv("bus.listen_failed", error=exc.__class__.__name__, detail=str(exc).strip()[:200]))
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                try:
                    wrapper.close()
                except Exception:
                    pass

    # --- the fleet ------------------------------------------------------------------
    def register_endpoints(self, endpoints):
        from jobs import fleet

        fleet.register_endpoints(list(endpoints))

    def fleet_renew(self, *, node, host, pid, lease_seconds, stopping, forget=False):
        from jobs import fleet

        return fleet.renew_node(
            node=node, host=host, pid=pid, lease_seconds=lease_seconds, stopping=stopping, forget=forget
        )

    def fleet_acquire(self, *, node, seen):
        from jobs import fleet

        return fleet.acquire(node=node, seen=seen)

    def fleet_release(self, *, endpoint, node, epoch, then=""):
        from jobs import fleet

        return fleet.release(endpoint=endpoint, node=node, epoch=epoch, then=then)

    def fleet_seen(self, *, node, endpoints):
        from jobs import fleet

        fleet.seen(node=node, endpoints=list(endpoints))

    def fleet_unreachable(self, *, endpoint, epoch, error, forget_after):
        from jobs import fleet

        return fleet.unreachable(endpoint=endpoint, epoch=epoch, error=error, forget_after=forget_after)

    def settle_orphans(self, *, session, endpoint, epoch):
        """Requeue the crawler's jobs still running under earlier sessions (only while we own it)."""
        return self._requeue_orphans(
            endpoint=endpoint,
            epoch=epoch,
            keep_session=session,
            reason="its bus session is gone and the crawler did not list it as still running",
        )

    def fleet_orphans(self, *, endpoint, epoch):
        """The crawler cannot be reached: requeue its jobs left by earlier sessions (only while we own it)."""
        from jobs import fleet

        counts = self._requeue_orphans(
            endpoint=endpoint,
            epoch=epoch,
            keep_session=None,
            reason="its bus session is gone and the crawler cannot be reached",
        )
        if counts is not None:
            fleet.close_earlier_sessions(endpoint=endpoint, keep=None)
        return counts

    def _requeue_orphans(self, *, endpoint, epoch, keep_session, reason):
        from jobs import fleet, services

        if not fleet.owns(endpoint=endpoint, epoch=epoch):
            return None
        return services.requeue_orphans(crawler=endpoint, keep_session=keep_session, actor="bus", reason=reason)

    def fleet_idle(self, *, endpoint):
        from jobs import fleet

        return fleet.idle(endpoint=endpoint)

    def fleet_leave(self, *, node):
        from jobs import fleet

        fleet.leave(node=node)

    def fleet_owner(self, *, endpoint):
        """The endpoint's owning node ("" for none), or None when it is no longer registered."""
        from jobs.models import Crawler

        return Crawler.objects.filter(endpoint=endpoint).values_list("owner", flat=True).first()

    def requeue_session(self, *, session, reason):
        from jobs import services

        return services.reset_running_jobs(session=session, actor="bus", reason=reason)


def pid_alive(pid: int) -> bool:
    """Whether a process runs with this pid; a zombie (dead, not yet reaped) does not."""
    import os

    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
