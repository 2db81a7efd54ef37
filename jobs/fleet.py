"""The fleet: the crawler registry, the bus nodes, and which node owns which crawler.

Two kinds of callers:

- people (admin, pages, `manage.py crawlers`, a crawler announcing itself)
  add, drain, resume and remove crawlers;
- bus processes (through bus.store.DjangoStore) renew their node lease, read
  the fleet, and take or give back the ownership of crawler endpoints.

The rule these functions keep: at most one bus node owns a crawler endpoint
at a time, and only the owner holds a session to it. Ownership is a
compare-and-set on `Crawler.owner_epoch` (the fencing token); a node's
ownership lasts as long as its `BusNode` lease, measured in database time.
Job transitions stay in jobs/services.py; this module calls it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.utils import timezone

from jobsite_crawler.endpoints import EndpointError, parse_endpoint

from . import services
from .models import (
    OWNED_STATES,
    AnnounceNonce,
    BusNode,
    BusSession,
    Crawler,
    CrawlerSource,
    CrawlerState,
    Job,
    SessionState,
)

# A crawler announcing itself proves it knows BUS_TOKEN with this HMAC; its
# timestamp must be within ANNOUNCE_WINDOW of the server's clock, and each
# nonce is accepted once.
ANNOUNCE_PREFIX = "jobsite-announce/1"
ANNOUNCE_WINDOW = 60.0
ANNOUNCE_ACTIONS = ("register", "deregister")
MAX_ANNOUNCED = 1000  # self-registered crawlers at most: a token holder cannot grow the table without bound
NODE_ROWS_KEPT = timedelta(minutes=10)  # expired node rows are deleted after this


class RegistryError(ValueError):
    """A registry request that cannot be done; the message says why, and nothing changed."""


class AnnounceRefused(RegistryError):
    """A self-registration whose proof is refused: wrong HMAC, a stale timestamp, or a replay."""


# --- Endpoints ---------------------------------------------------------------------------


def normalize_endpoint(text: Any) -> str:
    """The canonical spelling of an endpoint (unix:/path or tcp://host:port), or RegistryError naming it."""
    if not isinstance(text, str):
        raise RegistryError("the endpoint must be a string")
    if any(ord(char) < 32 or ord(char) == 127 for char in text.strip()):
        raise RegistryError(f"{text.strip()[:200]!r} is not a crawler endpoint: it contains control characters")
    try:
        endpoint = parse_endpoint(text)
    except EndpointError as exc:
        raise RegistryError(f"{text.strip()[:200]!r} is not a crawler endpoint: {exc}") from None
    if len(str(endpoint)) > Crawler._meta.get_field("endpoint").max_length:  # type: ignore[operator]
        raise RegistryError(f"{str(endpoint)[:80]!r}...: endpoint longer than 500 characters")
    if endpoint.is_tcp and not settings.BUS_TOKEN:
        raise RegistryError(
            f"refusing {endpoint}: TCP sessions need BUS_TOKEN (the shared secret of the HMAC handshake)"
        )
    return str(endpoint)


def _label(label: Any) -> str:
    if label is None:
        return ""
    if not isinstance(label, str):
        raise RegistryError("the label must be a string")
    label = label.strip().replace("\x00", "")
    if len(label) > 200:
        raise RegistryError("the label is longer than 200 characters")
    return label


# --- A person's (or a crawler's own) registry changes -------------------------------------


def add_crawler(*, endpoint: Any, label: Any = "", source: str = CrawlerSource.PERSON) -> tuple[Crawler, bool]:
    """Register an endpoint; adding one that exists changes its label (if given) and nothing else.

    Returns (crawler, created). Raises RegistryError for an unparseable
    endpoint or a TCP endpoint without BUS_TOKEN; nothing is registered then.
    """
    key, label = normalize_endpoint(endpoint), _label(label)
    with transaction.atomic():
        crawler, created = Crawler.objects.get_or_create(endpoint=key, defaults=dict(label=label, source=source))
        if not created and label and crawler.label != label:
            crawler.label = label
            crawler.save(update_fields=["label", "updated_at"])
    return crawler, created


def register_endpoints(endpoints: list[str]) -> int:
    """Register the endpoints named in settings (or runbus --endpoint); existing rows are left as they are."""
    keys = [normalize_endpoint(text) for text in endpoints]
    before = Crawler.objects.filter(endpoint__in=keys).count()
    Crawler.objects.bulk_create(
        [Crawler(endpoint=key, source=CrawlerSource.SETTINGS) for key in keys], ignore_conflicts=True
    )
    return len(keys) - before


def _get(endpoint: Any, *, lock: bool = False) -> Crawler:
    key = normalize_endpoint(endpoint)
    rows = Crawler.objects.select_for_update() if lock else Crawler.objects.all()
    try:
        return rows.get(endpoint=key)
    except Crawler.DoesNotExist:
        raise RegistryError(f"no crawler {key} is registered") from None


def drain_crawler(*, endpoint: Any) -> Crawler:
    """No new assignments; the running jobs finish, then the session ends and the crawler is paused."""
    with transaction.atomic():
        crawler = _get(endpoint, lock=True)
        if crawler.state == CrawlerState.ACTIVE:
            crawler.state = CrawlerState.DRAINING
            crawler.save(update_fields=["state", "updated_at"])
    return crawler


def resume_crawler(*, endpoint: Any) -> Crawler:
    """Back to active (from draining or paused); a pending removal is called off."""
    with transaction.atomic():
        crawler = _get(endpoint, lock=True)
        crawler.state, crawler.remove_when_drained = CrawlerState.ACTIVE, False
        crawler.save(update_fields=["state", "remove_when_drained", "updated_at"])
    return crawler


@dataclass(frozen=True)
class Removal:
    endpoint: str
    removed: bool  # False: draining first, removed once its jobs finish
    requeued: int = 0


def remove_crawler(*, endpoint: Any, now: bool = False, actor: str) -> Removal:
    """Remove a crawler: drain it first, or with now=True requeue its running jobs and remove it at once.

    A crawler that runs nothing and has no open session is removed at once
    either way. Its owning bus notices the row is gone (or draining) within
    a coordination interval and ends the session.
    """
    with transaction.atomic():
        crawler = _get(endpoint, lock=True)
        if now:
            counts = services.requeue_orphans(
                crawler=crawler.endpoint,
                keep_session=None,
                actor=actor,
                reason=f"crawler {crawler.endpoint} removed at once",
            )
            crawler.delete()
            return Removal(crawler.endpoint, True, counts.requeued)
        if idle(endpoint=crawler.endpoint) and crawler.session is None:
            crawler.delete()
            return Removal(crawler.endpoint, True)
        crawler.state, crawler.remove_when_drained = CrawlerState.DRAINING, True
        crawler.save(update_fields=["state", "remove_when_drained", "updated_at"])
        return Removal(crawler.endpoint, False)


# --- Self-registration -----------------------------------------------------------------


def announce_proof(token: str, *, action: str, endpoint: str, ts: str, nonce: str) -> str:
    """hex HMAC-SHA256(token, "jobsite-announce/1 <action> <endpoint> <ts> <nonce>")."""
    message = f"{ANNOUNCE_PREFIX} {action} {endpoint} {ts} {nonce}"
    return hmac.new(token.encode(), message.encode(), hashlib.sha256).hexdigest()


_NONCE = re.compile(r"[0-9a-f]{32,128}")


def announce(*, fields: dict[str, Any], at: datetime | None = None) -> tuple[str, Crawler | None]:
    """A crawler registers (or deregisters) itself; raise RegistryError unless the proof is good and fresh.

    `fields` is the request's JSON object: action, endpoint, label (optional),
    ts (Unix seconds, as the string that was signed or a number), nonce (hex,
    32-128 characters) and auth. A replayed request (same nonce) or one
    whose timestamp is more than ANNOUNCE_WINDOW seconds off is refused.
    Returns (what happened, the crawler row or None).
    """
    token = settings.BUS_TOKEN
    if not token:
        raise RegistryError("self-registration is off: it needs BUS_TOKEN")
    action, endpoint, nonce, auth = (fields.get(name) for name in ("action", "endpoint", "nonce", "auth"))
    if action not in ANNOUNCE_ACTIONS:
        raise RegistryError("action must be 'register' or 'deregister'")
    if not isinstance(endpoint, str) or not endpoint.strip():
        raise RegistryError("endpoint is required")
    if not isinstance(nonce, str) or not _NONCE.fullmatch(nonce):
        raise RegistryError("nonce must be 32 to 128 lowercase hex characters")
    ts = fields.get("ts")
    if isinstance(ts, bool) or not isinstance(ts, (int, float, str)):
        raise RegistryError("ts must be Unix seconds")
    ts_text = ts if isinstance(ts, str) else repr(ts)
    try:
        ts_value = float(ts_text)
    except ValueError:
        raise RegistryError("ts must be Unix seconds") from None
    expected = announce_proof(token, action=action, endpoint=endpoint, ts=ts_text, nonce=nonce)
    if not isinstance(auth, str) or not hmac.compare_digest(expected.encode(), auth.encode(errors="replace")):
        raise AnnounceRefused("wrong or missing auth: the proof is HMAC-SHA256 with BUS_TOKEN")
    at = at or timezone.now()
    if not abs(at.timestamp() - ts_value) <= ANNOUNCE_WINDOW:  # also refuses nan and inf
        raise AnnounceRefused(f"ts is more than {ANNOUNCE_WINDOW:g} s away from the server's clock")
    key = normalize_endpoint(endpoint)
    label = _label(fields.get("label"))
    with transaction.atomic():
        AnnounceNonce.objects.filter(at__lt=at - timedelta(seconds=2 * ANNOUNCE_WINDOW)).delete()
        try:
            with transaction.atomic():
                AnnounceNonce.objects.create(nonce=nonce, at=at)
        except IntegrityError:
            raise AnnounceRefused("this announcement was already used (replay refused)") from None
        if action == "deregister":
            crawler = Crawler.objects.filter(endpoint=key).first()
            if crawler is None:
                return "unknown", None
            if crawler.source != CrawlerSource.ANNOUNCED:
                return "kept", crawler  # a person or the settings registered it: theirs to remove
            removal = remove_crawler(endpoint=key, actor="announce")
            return ("removed" if removal.removed else "draining"), crawler
        existing = Crawler.objects.filter(endpoint=key).first()
        if existing is None and Crawler.objects.filter(source=CrawlerSource.ANNOUNCED).count() >= MAX_ANNOUNCED:
            raise RegistryError(f"{MAX_ANNOUNCED} self-registered crawlers already: remove some first")
        crawler, created = add_crawler(endpoint=key, label=label, source=CrawlerSource.ANNOUNCED)
        if not created and crawler.source == CrawlerSource.ANNOUNCED and crawler.remove_when_drained:
            crawler = resume_crawler(endpoint=key)  # it came back before its removal finished
        return ("registered" if created else "known"), crawler


# --- Bus nodes and ownership (called by bus.store.DjangoStore) ---------------------------


def db_now() -> datetime:
    """The database's clock: every node compares leases against the same one.

    SQLite serves the processes of one machine, whose clock they share.
    """
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement_timestamp()")
            return cursor.fetchone()[0]
    return timezone.now()


@dataclass(frozen=True)
class NodeRow:
    node: str
    host: str
    pid: int
    stopping: bool
    lease_expires_at: datetime


@dataclass(frozen=True)
class CrawlerRow:
    endpoint: str
    state: str
    owner: str
    owner_epoch: int
    remove_when_drained: bool


@dataclass(frozen=True)
class FleetView:
    now: datetime  # database time of the renewal
    nodes: list[NodeRow]
    crawlers: list[CrawlerRow]


def renew_node(
    *, node: str, host: str, pid: int, lease_seconds: float, stopping: bool, forget: bool = False
) -> FleetView:
    """Extend this node's lease (creating its row the first time) and read the fleet, in one transaction.

    With forget, rows of nodes whose lease ended more than NODE_ROWS_KEPT ago are deleted first.
    """
    with transaction.atomic():
        at = db_now()
        if forget:
            BusNode.objects.filter(lease_expires_at__lt=at - NODE_ROWS_KEPT).delete()
        expires = at + timedelta(seconds=lease_seconds)
        if not BusNode.objects.filter(node=node).update(lease_expires_at=expires, stopping=stopping):
            BusNode.objects.create(
                node=node, host=host[:200], pid=pid, started_at=at, lease_expires_at=expires, stopping=stopping
            )
        # Crawlers first, nodes second: each statement has its own snapshot (READ
        # COMMITTED), and a node's row is committed before it owns anything, so
        # every owner in the crawler rows is among the nodes read after them.
        crawlers = [
            CrawlerRow(*row)
            for row in Crawler.objects.order_by("endpoint").values_list(
                "endpoint", "state", "owner", "owner_epoch", "remove_when_drained"
            )
        ]
        nodes = [
            NodeRow(*row)
            for row in BusNode.objects.filter(lease_expires_at__gte=at - NODE_ROWS_KEPT).values_list(
                "node", "host", "pid", "stopping", "lease_expires_at"
            )
        ]
    return FleetView(at, nodes, crawlers)


def leave(*, node: str) -> None:
    """A node that stops deletes its row: it owns nothing any more."""
    BusNode.objects.filter(node=node).delete()


def acquire(*, node: str, seen: dict[str, int]) -> dict[str, int]:
    """Take the ownership of every endpoint in `seen` whose row nobody changed since (its epoch is as seen).

    One statement for all, so a node taking over a dead node's crawlers
    connects to the last as soon as to the first. Returns {endpoint: new
    epoch} for those won; the others were taken by another node meanwhile.
    """
    if not seen:
        return {}
    cas = Q()
    for endpoint, epoch in seen.items():
        cas |= Q(endpoint=endpoint, owner_epoch=epoch)
    with transaction.atomic():
        Crawler.objects.filter(cas, state__in=OWNED_STATES).update(
            owner=node, owner_epoch=F("owner_epoch") + 1, owned_at=timezone.now(), session=None
        )
        # Our own writes, read in the same transaction (the rows stay locked until it ends).
        rows = Crawler.objects.filter(endpoint__in=list(seen), owner=node).values_list("endpoint", "owner_epoch")
        return {endpoint: epoch for endpoint, epoch in rows if epoch == seen[endpoint] + 1}


def owns(*, endpoint: str, epoch: int) -> bool:
    """Whether `epoch` is still the endpoint's fencing token (nobody took it over since)."""
    return Crawler.objects.filter(endpoint=endpoint, owner_epoch=epoch).exists()


def release(*, endpoint: str, node: str, epoch: int, then: str = "") -> bool:
    """Give ownership back. then="paused" ends a drain (or removes the crawler if that was asked)."""
    rows = Crawler.objects.filter(endpoint=endpoint, owner=node, owner_epoch=epoch)
    if then == "paused":
        with transaction.atomic():
            if rows.filter(remove_when_drained=True).delete()[0]:
                return True
            return bool(rows.update(owner="", session=None, state=CrawlerState.PAUSED, updated_at=timezone.now()))
    return bool(rows.update(owner="", session=None))


def close_earlier_sessions(*, endpoint: str, keep: Any) -> int:
    """The owner settled the endpoint: session rows of earlier owners still marked open are closed as lost."""
    return (
        BusSession.objects.open()
        .filter(endpoint=endpoint)
        .exclude(session=keep)
        .update(
            state=SessionState.LOST,
            closed_at=timezone.now(),
            close_reason="its bus node is gone or cut off: the crawler was taken over by another node",
        )
    )


def connected(*, endpoint: str, epoch: int, session: Any, slots: int) -> None:
    Crawler.objects.filter(endpoint=endpoint, owner_epoch=epoch).update(
        session=session, slots=slots, last_seen_at=timezone.now(), last_error=""
    )


def seen(*, node: str, endpoints: list[str]) -> None:
    """The crawlers with an open session of this node are alive (a periodic write, not one per frame)."""
    if endpoints:
        Crawler.objects.filter(owner=node, endpoint__in=endpoints).update(last_seen_at=timezone.now())


def unreachable(*, endpoint: str, epoch: int, error: str, forget_after: float) -> bool:
    """Note a failed connection; drop a self-registered crawler unseen for `forget_after` seconds.

    Returns True when the crawler was dropped (its row deleted).
    """
    at = timezone.now()
    rows = Crawler.objects.filter(endpoint=endpoint, owner_epoch=epoch)
    cutoff = at - timedelta(seconds=forget_after)
    silent = Q(last_seen_at__lt=cutoff) | Q(last_seen_at__isnull=True, created_at__lt=cutoff)
    with transaction.atomic():
        if forget_after > 0 and rows.filter(silent, source=CrawlerSource.ANNOUNCED).exists():
            services.requeue_orphans(
                crawler=endpoint,
                keep_session=None,
                actor="bus",
                reason=f"self-registered crawler {endpoint} unreachable for {forget_after:g} s: dropped",
            )
            rows.delete()
            return True
        rows.update(session=None, last_error=error[:500])
    return False


def idle(*, endpoint: str) -> bool:
    """No job of this crawler is running (a draining crawler that is unreachable may then be paused)."""
    return not Job.objects.running().filter(crawler=endpoint).exists()
