"""Wire conformance of the bus side of PROTOCOL.md: a real `runbus` process, a scripted crawler peer.

Each test starts `manage.py runbus` against the test database and plays the
crawler over a real socket (tests/crawler_peer.py), then checks both the
frames the bus sends and what it wrote to the database. Waits are deadlines
(wait_until, peer.recv timeouts); where a test must show that something does
*not* happen, it first sends a probe the bus answers in order (a `started`
for a job nobody holds gets `error stale`), so the absence is checked after
the bus has read everything before the probe.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
import uuid

import pytest
from django.utils import timezone

from bus.models import BusSession
from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status
from jobsite_crawler import wire as protocol
from tests.conftest import free_port, wait_until
from tests.crawler_peer import CrawlerPeer

PROBE_JOB = 2**62  # a job id no test creates: a `started` for it is always answered with error stale
TOKEN = "s3cret-test-token"

pytestmark = pytest.mark.django_db(transaction=True)


# --- helpers ------------------------------------------------------------------------------


def start_bus(processes, *endpoints: str, **settings: str):
    """Start `runbus` for these endpoints. A long HEARTBEAT_TIMEOUT unless the test is about liveness,
    so that neither silence nor the lease sweeper moves jobs behind a test's back."""
    env = dict(HEARTBEAT_TIMEOUT="30", BUS_BACKOFF_CAP="1", BUS_NODE="conformance-node")
    env.update(settings)
    args = [arg for endpoint in endpoints for arg in ("--endpoint", endpoint)]
    return processes.manage("runbus", *args, env=processes.env(**env))


@contextlib.contextmanager
def bus_and_peer(processes, path: str, *, token: str | None = None, **settings: str):
    """A listening peer and a runbus connecting to it; the peer is shut down and the bus log printed at the end."""
    peer = CrawlerPeer(path, token=token)
    if token:
        settings["BUS_TOKEN"] = token
    bus = start_bus(processes, path, **settings)
    try:
        yield peer, bus
    finally:
        peer.shutdown()
        print(processes.output(bus))


def enqueue(count: int) -> list[int]:
    jobs = services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(count)], actor="test")
    return [job.id for job in jobs]


def probe(peer: CrawlerPeer, timeout: float = 10.0) -> dict:
    """Round trip through the bus's IO thread and its database worker; returns the stale error."""
    nonce = uuid.uuid4().int % 1_000_000 + 1
    peer.send({"type": "started", "job_id": PROBE_JOB, "attempt": nonce})
    return peer.recv(
        "error", timeout=timeout, where=lambda f: f.get("job_id") == PROBE_JOB and f.get("attempt") == nonce
    )


def pending(peer: CrawlerPeer, kind: str) -> list[dict]:
    return [frame for frame in peer.frames if frame["type"] == kind]


def job_state() -> list[tuple]:
    """Everything about the jobs a bus could change, except lease renewal times."""
    return list(
        Job.objects.order_by("id").values_list(
            "id",
            "status",
            "attempt",
            "lease_session",
            "result",
            "error",
            "failures",
            "interruptions",
            "outcome_attempt",
            "run_after",
            "finished_at",
            "progress",
        )
    )


def event_state() -> list[tuple]:
    return list(JobEvent.objects.order_by("id").values_list("id", "job_id", "kind", "attempt", "reason"))


def interrupt_reasons(job_ids) -> list[str]:
    return list(
        JobEvent.objects.filter(job_id__in=list(job_ids), kind=EventKind.INTERRUPT)
        .order_by("id")
        .values_list("reason", flat=True)
    )


def all_queued(job_ids) -> bool:
    return Job.objects.filter(id__in=list(job_ids), status=Status.QUEUED).count() == len(job_ids)


def send_heartbeat(peer: CrawlerPeer, running) -> None:
    peer.send({"type": "heartbeat", "ts": time.time(), "running": [list(pair) for pair in running]})


@contextlib.contextmanager
def heartbeating(peer: CrawlerPeer, interval: float, running: list):
    """Send crawler heartbeats listing `running` (a list the test may change) every `interval`."""
    stop = threading.Event()

    def beat():
        while not stop.wait(interval):
            try:
                send_heartbeat(peer, list(running))
            except (OSError, AttributeError):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


def flood(peer: CrawlerPeer, total: int, chunk: int = 64 * 1024) -> int:
    """Send `total` bytes of one line that never ends; stop when the bus closes. Returns bytes sent."""
    block = b'{"type":"heartbeat","pad":"' + b"x" * (chunk - 27)
    sent = 0
    peer.conn.settimeout(10)
    try:
        while sent < total:
            peer.conn.sendall(block)
            sent += len(block)
            block = b"x" * chunk
    except OSError:
        pass
    peer.conn.settimeout(None)
    return sent


# --- handshake ---------------------------------------------------------------------------


def test_hello_carries_protocol_node_session_heartbeat_and_nonce(processes, short_socket_path):
    with bus_and_peer(processes, short_socket_path, HEARTBEAT_TIMEOUT="7") as (peer, bus):
        hello = peer.handshake(slots=4)
        assert hello["type"] == "hello"
        assert hello["protocol"] == 1
        assert hello["node"] == "conformance-node"
        assert uuid.UUID(hello["session"]).version == 4
        assert str(uuid.UUID(hello["session"])) == hello["session"]
        assert hello["heartbeat"] == pytest.approx(3.5)
        assert re.fullmatch(r"[0-9a-fA-F]{32,}", hello["nonce"])
        assert "auth" not in hello  # no token configured: both sides omit auth
        row = wait_until(lambda: BusSession.objects.filter(session=hello["session"]).first(), message="session row")
        assert (row.state, row.node, row.crawler, row.slots) == ("connected", "conformance-node", "peer", 4)
        assert row.endpoint == f"unix:{short_socket_path}"


def test_token_hello_auth_is_the_hmac_proof_and_a_correct_ready_is_accepted(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path, token=TOKEN) as (peer, bus):
        hello = peer.handshake(slots=1)  # CrawlerPeer checks hello.auth against its own HMAC
        assert re.fullmatch(r"[0-9a-f]{64}", hello["auth"])
        assign = peer.recv("assign")
        assert (assign["job_id"], assign["attempt"]) == (job_id, 1)


@pytest.mark.parametrize("auth", ["0" * 64, None], ids=["wrong-auth", "missing-auth"])
def test_bad_ready_proof_is_refused_nothing_assigned_and_the_bus_retries(processes, short_socket_path, auth):
    [job_id] = enqueue(1)
    peer = CrawlerPeer(short_socket_path, token=None)  # without a token the peer sends no ready.auth
    bus = start_bus(processes, short_socket_path, BUS_TOKEN=TOKEN)
    try:
        peer.handshake(slots=5, auth=auth)
        error = peer.recv("error")
        assert error["code"] == "unauthorized"
        assert peer.wait_closed(5), "the bus kept an unauthorized session open"
        assert pending(peer, "assign") == []
        job = Job.objects.get(id=job_id)
        assert (job.status, job.attempt, job.lease_session) == (Status.QUEUED, 0, None)
        assert not BusSession.objects.exists()
        # The bus backs off and tries again; this time the crawler knows the token.
        peer.token = TOKEN
        peer.handshake(slots=5, timeout=10)
        assert peer.recv("assign")["job_id"] == job_id
        assert "bus.unauthorized" in processes.output(bus)
    finally:
        peer.shutdown()
        print(processes.output(bus))


BAD_WELCOMES = {
    "protocol-2": (
        b'{"type":"welcome","protocol":2,"crawler":"future","nonce":"' + b"ab" * 16 + b'"}\n',
        "unsupported_protocol",
    ),
    "protocol-true": (
        b'{"type":"welcome","protocol":true,"crawler":"c","nonce":"' + b"ab" * 16 + b'"}\n',
        "unsupported_protocol",
    ),
    "protocol-missing": (b'{"type":"welcome","crawler":"c","nonce":"' + b"ab" * 16 + b'"}\n', "unsupported_protocol"),
    "short-nonce": (b'{"type":"welcome","protocol":1,"crawler":"c","nonce":"abcdef"}\n', "bad_frame"),
    "not-json": (b"welcome please\n", "bad_frame"),
}


@pytest.mark.parametrize("name", list(BAD_WELCOMES))
def test_bad_welcome_is_refused_with_an_error_and_the_bus_retries(processes, short_socket_path, name):
    data, code = BAD_WELCOMES[name]
    enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.accept()
        peer.send_raw(data)
        error = peer.recv("error")
        assert error["code"] == code
        assert pending(peer, "hello") == []
        assert peer.wait_closed(5)
        assert Job.objects.get().status == Status.QUEUED
        peer.accept(timeout=10)  # a second connection: the bus keeps retrying


@pytest.mark.slow
def test_handshake_steps_time_out_after_ten_seconds(processes, short_socket_path):
    """One endpoint never gets a welcome, the other never a ready: the bus closes both after 10 s."""
    silent_path = short_socket_path.replace("crawler.sock", "silent.sock")
    no_ready, silent = CrawlerPeer(short_socket_path), CrawlerPeer(silent_path)
    bus = start_bus(processes, short_socket_path, silent_path)
    try:
        silent.accept()
        silent_since = time.monotonic()
        no_ready.handshake(send_ready=False)
        no_ready_since = time.monotonic()
        error = no_ready.recv("error", timeout=15)
        assert error["code"] == "timeout" and "no ready" in error["message"], error
        assert no_ready.wait_closed(15), "no ready for 15 s and the session is still open"
        assert time.monotonic() - no_ready_since > 9
        assert silent.wait_closed(15), "no welcome for 15 s and the session is still open"
        assert time.monotonic() - silent_since > 9
        assert not BusSession.objects.exists()
    finally:
        no_ready.shutdown()
        silent.shutdown()
        print(processes.output(bus))


def test_tcp_endpoint_without_token_refuses_to_start(processes):
    env = processes.env(HEARTBEAT_TIMEOUT="30")
    env.pop("BUS_TOKEN", None)
    bus = processes.manage("runbus", "--endpoint", f"tcp://127.0.0.1:{free_port()}", env=env)
    assert bus.wait(timeout=60) != 0
    assert "BUS_TOKEN" in processes.output(bus)


# --- malformed input after the handshake ----------------------------------------------


FRAMING_ERRORS = {
    "invalid-utf8": (b'{"type":"heartbeat","x":"\xff\xfe"}\n', "not UTF-8"),
    "invalid-json": (b'{"type": heartbeat}\n', "not JSON"),
    "json-array": (b'[{"type":"heartbeat"}]\n', "not an object"),
    "missing-type": (b'{"job_id":1,"attempt":1}\n', "no string field 'type'"),
    "non-string-type": (b'{"type":5}\n', "no string field 'type'"),
    "lone-surrogate": (b'{"type":"heartbeat","x":"\\ud800"}\n', "lone surrogate"),
    "nan": (b'{"type":"heartbeat","ts":NaN}\n', "not JSON"),
}


def _framing_error_ends_the_session(processes, path, send, reason_part, **settings):
    job_ids = enqueue(3)
    with bus_and_peer(processes, path, **settings) as (peer, bus):
        hello = peer.handshake(slots=10)
        assert sorted(a["job_id"] for a in peer.recv_many("assign", 3)) == job_ids
        others = event_state()
        send(peer)
        error = peer.recv("error", timeout=10)
        assert error["code"] == "bad_frame"
        assert peer.wait_closed(5), "the bus kept the session open after a framing error"
        wait_until(lambda: all_queued(job_ids), timeout=5, message="the session's jobs requeued")
        reasons = interrupt_reasons(job_ids)
        assert len(reasons) == 3
        assert all("bad_frame" in reason and reason_part in reason for reason in reasons), reasons
        assert all(row[2] == EventKind.INTERRUPT for row in event_state()[len(others) :])
        assert Job.objects.filter(id__in=job_ids, interruptions=1, attempt=1, lease_session=None).count() == 3
        row = BusSession.objects.get(session=hello["session"])
        assert row.state == "lost" and "bad_frame" in row.close_reason
        # The bus survives: it reconnects and hands the requeued jobs out again.
        peer.handshake(slots=10)
        assigns = peer.recv_many("assign", 3)
        assert sorted((a["job_id"], a["attempt"]) for a in assigns) == [(j, 2) for j in job_ids]


@pytest.mark.parametrize("name", list(FRAMING_ERRORS))
def test_framing_error_sends_bad_frame_closes_and_requeues(processes, short_socket_path, name):
    data, reason_part = FRAMING_ERRORS[name]
    _framing_error_ends_the_session(processes, short_socket_path, lambda peer: peer.send_raw(data), reason_part)


def test_frame_over_max_frame_is_a_framing_error_before_its_newline(processes, short_socket_path):
    total = 10 * 1024 * 1024
    sent = []
    _framing_error_ends_the_session(
        processes,
        short_socket_path,
        lambda peer: sent.append(flood(peer, total)),
        "exceeds the limit of 4096",
        BUS_MAX_FRAME="4096",
    )
    assert sent[0] < total, "the bus read the whole 10 MB line instead of failing at BUS_MAX_FRAME"


def test_a_frame_of_exactly_max_frame_bytes_is_read(processes, short_socket_path):
    with bus_and_peer(processes, short_socket_path, BUS_MAX_FRAME="4096") as (peer, bus):
        peer.handshake(slots=1)
        head = b'{"type":"frobnicate","pad":"'
        peer.send_raw(head + b"x" * (4096 - len(head) - 3) + b'"}\n')  # 4096 bytes, newline included
        assert peer.recv("error")["code"] == "unknown_type"  # parsed, not a framing error
        probe(peer)
        head = b'{"type":"frobnicate","pad":"'
        peer.send_raw(head + b"x" * (4097 - len(head) - 3) + b'"}\n')
        assert peer.recv("error")["code"] == "bad_frame"
        assert peer.wait_closed(5)


def test_unknown_type_gets_unknown_type_and_the_session_stays(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        jobs, events = job_state(), event_state()
        expires = Job.objects.get().lease_expires_at
        peer.send({"type": "frobnicate", "job_id": job_id, "attempt": 1})
        error = peer.recv("error")
        assert error["code"] == "unknown_type"
        peer.send({"type": "error", "code": "whatever", "message": "a crawler's error is logged, nothing more"})
        send_heartbeat(peer, [(job_id, 1)])  # still read and applied: the lease is renewed
        wait_until(lambda: Job.objects.get().lease_expires_at > expires, timeout=5, message="lease renewed")
        probe(peer)
        assert (job_state(), event_state()) == (jobs, events)


def test_wrong_field_types_get_invalid_and_change_nothing(processes, short_socket_path):
    [job_id] = enqueue(1)
    bad_frames = [
        {"type": "done", "job_id": str(job_id), "attempt": 1, "result": {}},
        {"type": "done", "job_id": job_id, "attempt": 0, "result": {}},
        {"type": "done", "job_id": job_id, "attempt": True, "result": {}},
        {"type": "done", "job_id": job_id, "attempt": 1, "result": ["not", "an", "object"]},
        {"type": "failed", "job_id": job_id, "attempt": 1, "error": "boom", "retryable": "yes"},
        {"type": "failed", "job_id": job_id, "attempt": 1, "error": ["boom"], "retryable": False},
        {"type": "started", "job_id": 1.5, "attempt": 1},
        {"type": "progress", "job_id": job_id, "attempt": 1, "done": "half"},
        {"type": "capacity", "slots": -1},
        {"type": "capacity", "slots": "many"},
        {"type": "heartbeat", "ts": 1.0, "running": [[job_id]]},
        {"type": "heartbeat", "ts": 1.0, "running": "all"},
    ]
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        jobs, events = job_state(), event_state()
        for frame in bad_frames:
            peer.send(frame)
            error = peer.recv("error")
            assert error["code"] == "invalid", (frame, error)
        probe(peer)  # the session is still open and answering
        assert pending(peer, "ack") == []
        assert (job_state(), event_state()) == (jobs, events)
        job = Job.objects.get()
        assert (job.status, job.attempt) == (Status.RUNNING, 1)


def test_outcomes_for_unknown_jobs_or_wrong_attempts_are_acked_stale(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        hello = peer.handshake(slots=1)
        peer.recv("assign")
        jobs, events = job_state(), event_state()
        peer.send({"type": "done", "job_id": job_id + 1000, "attempt": 1, "result": {}})
        ack = peer.recv("ack")
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id + 1000, 1, "stale")
        assert (job_state(), event_state()) == (jobs, events)
        peer.send({"type": "done", "job_id": job_id, "attempt": 2, "result": {"late": False}})
        ack = peer.recv("ack")
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id, 2, "stale")
        assert job_state() == jobs
        [stale] = JobEvent.objects.filter(job_id=job_id, kind=EventKind.STALE)
        assert stale.attempt == 2 and str(stale.session) == hello["session"]
        job = Job.objects.get()
        assert (job.status, job.attempt, str(job.lease_session)) == (Status.RUNNING, 1, hello["session"])


def test_started_or_progress_for_a_job_not_leased_gets_error_stale(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        jobs, events = job_state(), event_state()
        for frame in [
            {"type": "started", "job_id": job_id, "attempt": 2},
            {"type": "progress", "job_id": job_id, "attempt": 3, "done": 1, "total": 2},
            {"type": "started", "job_id": job_id + 1000, "attempt": 1},
            {"type": "progress", "job_id": job_id + 1000, "attempt": 1, "message": "?"},
        ]:
            peer.send(frame)
            error = peer.recv("error")
            assert error["code"] == "stale", (frame, error)
            assert (error["job_id"], error["attempt"]) == (frame["job_id"], frame["attempt"])
        assert (job_state(), event_state()) == (jobs, events)
        # The leased job's own progress is stored (and visible to pages).
        peer.send({"type": "progress", "job_id": job_id, "attempt": 1, "done": 4, "total": 10, "message": "p"})
        wait_until(lambda: Job.objects.get().progress, timeout=5, message="progress stored")
        assert Job.objects.get().progress == {"done": 4, "total": 10, "message": "p"}


# --- outcomes ------------------------------------------------------------------------------


def test_done_is_acked_only_after_commit_and_a_resend_is_recorded_once(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        done = {
            "type": "done",
            "job_id": job_id,
            "attempt": 1,
            "result": {"status": 200, "title": "t"},
            "unknown_field": [1, 2],
        }  # unknown fields are ignored
        peer.send(done)
        ack = peer.recv("ack")
        # Read at once, no waiting: the ack promises the outcome is committed.
        job = Job.objects.get()
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id, 1, "recorded")
        assert (job.status, job.result, job.lease_session, job.outcome_attempt) == (
            Status.SUCCEEDED,
            {"status": 200, "title": "t"},
            None,
            1,
        )
        jobs = job_state()
        peer.send(done)
        ack = peer.recv("ack")
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id, 1, "recorded")
        assert job_state() == jobs
        assert JobEvent.objects.filter(job_id=job_id, kind=EventKind.OUTCOME).count() == 1


def test_failed_outcomes_requeue_retryable_and_fail_the_rest(processes, short_socket_path):
    retry_id, fatal_id, spent_id = enqueue(3)
    Job.objects.filter(id=spent_id).update(max_attempts=1)
    with bus_and_peer(processes, short_socket_path, JOB_RETRY_BACKOFF_BASE="60") as (peer, bus):
        peer.handshake(slots=3)
        peer.recv_many("assign", 3)
        before = timezone.now()
        peer.send({"type": "failed", "job_id": retry_id, "attempt": 1, "error": "timeout", "retryable": True})
        peer.send({"type": "failed", "job_id": fatal_id, "attempt": 1, "error": "HTTP 404", "retryable": False})
        peer.send({"type": "failed", "job_id": spent_id, "attempt": 1, "error": "again", "retryable": True})
        acks = {ack["job_id"]: ack["status"] for ack in peer.recv_many("ack", 3)}
        assert acks == {retry_id: "recorded", fatal_id: "recorded", spent_id: "recorded"}
        retry, fatal, spent = (Job.objects.get(id=i) for i in (retry_id, fatal_id, spent_id))
        assert (retry.status, retry.error, retry.failures, retry.lease_session) == (Status.QUEUED, "timeout", 1, None)
        assert retry.run_after is not None and retry.run_after > before
        assert (fatal.status, fatal.error, fatal.lease_session) == (Status.FAILED, "HTTP 404", None)
        assert fatal.finished_at is not None
        assert (spent.status, spent.error) == (Status.FAILED, "again")
        probe(peer)
        assert pending(peer, "assign") == []  # the retry waits for its run_after


# --- slots -----------------------------------------------------------------------------------


def test_slots_bound_the_outstanding_assignments_and_capacity_changes_them(processes, short_socket_path):
    enqueue(20)
    # A fast fallback poll: many chances to over-assign while the test watches.
    with bus_and_peer(processes, short_socket_path, BUS_POLL_INTERVAL="0.2") as (peer, bus):
        hello = peer.handshake(slots=3)
        held = [(a["job_id"], a["attempt"]) for a in peer.recv_many("assign", 3)]
        with pytest.raises(AssertionError):
            peer.recv("assign", timeout=1.0)  # five polls later, still three
        assert Job.objects.filter(status=Status.RUNNING).count() == 3

        job_id, attempt = held.pop(0)
        peer.send({"type": "done", "job_id": job_id, "attempt": attempt, "result": {}})
        assert peer.recv("ack")["status"] == "recorded"
        held.append((peer.recv("assign")["job_id"], 1))
        with pytest.raises(AssertionError):
            peer.recv("assign", timeout=0.6)
        assert Job.objects.filter(status=Status.RUNNING).count() == 3

        peer.send({"type": "capacity", "slots": 5})
        held += [(a["job_id"], 1) for a in peer.recv_many("assign", 2)]
        with pytest.raises(AssertionError):
            peer.recv("assign", timeout=0.6)
        assert Job.objects.filter(status=Status.RUNNING, lease_session=hello["session"]).count() == 5
        wait_until(
            lambda: BusSession.objects.get(session=hello["session"]).slots == 5,
            timeout=5,
            message="session row shows the new slot count",
        )

        peer.send({"type": "capacity", "slots": 1})
        for job_id, attempt in held[:4]:  # 5 outstanding -> 1: still no room under a limit of 1
            peer.send({"type": "done", "job_id": job_id, "attempt": attempt, "result": {}})
        assert [ack["status"] for ack in peer.recv_many("ack", 4)] == ["recorded"] * 4
        with pytest.raises(AssertionError):
            peer.recv("assign", timeout=0.6)
        job_id, attempt = held[4]
        peer.send({"type": "done", "job_id": job_id, "attempt": attempt, "result": {}})
        assert peer.recv("ack")["status"] == "recorded"
        peer.recv("assign")  # 0 outstanding -> room for exactly one
        with pytest.raises(AssertionError):
            peer.recv("assign", timeout=0.6)
        assert Job.objects.filter(status=Status.RUNNING).count() == 1


# --- heartbeats and liveness --------------------------------------------------------------


def test_bus_heartbeats_at_the_interval_and_crawler_heartbeats_renew_leases(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path, HEARTBEAT_TIMEOUT="1") as (peer, bus):
        assert peer.handshake(slots=1)["heartbeat"] == pytest.approx(0.5)
        peer.recv("assign")
        first_expiry = Job.objects.get().lease_expires_at
        with heartbeating(peer, 0.25, [(job_id, 1)]):
            arrivals = []
            for _ in range(5):
                beat = peer.recv("heartbeat", timeout=3)
                arrivals.append(time.monotonic())
                assert isinstance(beat["ts"], float) and abs(beat["ts"] - time.time()) < 5
            gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
            assert max(gaps) < 1.2, gaps  # at the 0.5 s interval, with room for a slow machine
            assert sum(gaps) / len(gaps) > 0.3, gaps  # and not a flood
            wait_until(
                lambda: Job.objects.get().lease_expires_at > first_expiry,
                timeout=5,
                message="lease renewed by the crawler's heartbeat",
            )
        job = Job.objects.get()
        assert (job.status, job.attempt, job.interruptions) == (Status.RUNNING, 1, 0)


def test_job_left_out_of_two_heartbeats_in_a_row_is_a_lost_assignment(processes, short_socket_path):
    # HEARTBEAT_TIMEOUT=2 (interval 1 s) rather than 1: the "not within one interval of the assign"
    # half of the rule needs two heartbeats to reach the bus within one interval, which 0.5 s does
    # not leave room for on a loaded machine.
    kept_id, lost_id = enqueue(2)
    with bus_and_peer(processes, short_socket_path, HEARTBEAT_TIMEOUT="2") as (peer, bus):
        peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        assigned = time.monotonic()
        kept = [(kept_id, 1)]
        send_heartbeat(peer, kept)  # the crawler may not list a job it has only just been given
        send_heartbeat(peer, kept)
        probe(peer)
        assert time.monotonic() - assigned < 1.0, "too slow to check the first half of the rule"
        assert Job.objects.get(id=lost_id).status == Status.RUNNING
        wait_until(lambda: time.monotonic() - assigned > 1.1, message="one interval since the assign")
        send_heartbeat(peer, kept)  # miss 1
        send_heartbeat(peer, kept + [(lost_id, 1)])  # listed again: the count starts over
        send_heartbeat(peer, kept)  # miss 1
        probe(peer)
        assert Job.objects.get(id=lost_id).status == Status.RUNNING
        send_heartbeat(peer, kept)  # miss 2 in a row: lost
        again = peer.recv("assign", timeout=5)  # requeued, and the freed slot takes it again
        assert (again["job_id"], again["attempt"]) == (lost_id, 2)
        assert len(interrupt_reasons([lost_id])) == 1
        assert "lost assignment" in interrupt_reasons([lost_id])[0]
        kept_job = Job.objects.get(id=kept_id)
        assert (kept_job.status, kept_job.attempt, kept_job.interruptions) == (Status.RUNNING, 1, 0)


def test_silence_for_twice_heartbeat_timeout_closes_and_requeues(processes, short_socket_path):
    job_ids = enqueue(2)
    # The sweeper is slowed down so that only the heartbeat monitor can move the jobs.
    with bus_and_peer(processes, short_socket_path, HEARTBEAT_TIMEOUT="1", BUS_SWEEP_INTERVAL="60") as (peer, bus):
        hello = peer.handshake(slots=2)
        last_sent = time.monotonic()
        peer.recv_many("assign", 2)
        assert peer.wait_closed(6), "the bus kept a silent session open"
        silence = time.monotonic() - last_sent
        assert 1.8 < silence < 4.5, silence
        wait_until(lambda: all_queued(job_ids), timeout=3, message="requeue after heartbeat timeout")
        assert all("heartbeat timeout" in reason for reason in interrupt_reasons(job_ids))
        assert len(interrupt_reasons(job_ids)) == 2
        row = BusSession.objects.get(session=hello["session"])
        assert row.state == "lost" and "heartbeat timeout" in row.close_reason
        assert "bus.heartbeat_timeout" in processes.output(bus)


def test_cancelled_job_listed_in_a_heartbeat_gets_cancel(processes, short_socket_path):
    first_id, second_id = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        assert peer.recv("assign")["job_id"] == first_id
        services.cancel_jobs(job_ids=[first_id], actor="test")
        send_heartbeat(peer, [(first_id, 1)])
        cancel = peer.recv("cancel")
        assert (cancel["job_id"], cancel["attempt"]) == (first_id, 1)
        assert peer.recv("assign")["job_id"] == second_id  # the cancelled job no longer holds the slot
        peer.send({"type": "done", "job_id": first_id, "attempt": 1, "result": {}})
        assert peer.recv("ack")["status"] == "stale"
        assert Job.objects.get(id=first_id).status == Status.CANCELLED


# --- re-lease after a reconnect -------------------------------------------------------------


def _hand_back(peer: CrawlerPeer, job_ids) -> None:
    """End the session; wait until the bus requeued its jobs (the bus then connects again, and waits
    for our welcome, so nothing is claimed until the test's next handshake)."""
    peer.close()
    wait_until(lambda: all_queued(job_ids), timeout=5, message="jobs requeued after the close")


def test_ready_running_re_leases_a_job_still_queued_at_that_attempt(processes, short_socket_path):
    job_id, waiting_id = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        assign = peer.recv("assign")
        assert (assign["job_id"], assign["attempt"]) == (job_id, 1)
        _hand_back(peer, [job_id])
        hello = peer.handshake(slots=1, running=[(job_id, 1)])
        wait_until(lambda: Job.objects.get(id=job_id).status == Status.RUNNING, timeout=5, message="re-leased")
        probe(peer)
        # No new assign: neither for the re-leased job nor for the other, as the re-leased one fills the slot.
        assert pending(peer, "assign") == [] and pending(peer, "cancel") == []
        job = Job.objects.get(id=job_id)
        assert (job.attempt, str(job.lease_session)) == (1, hello["session"])
        assert JobEvent.objects.filter(job_id=job_id, kind=EventKind.RELEASE, attempt=1).count() == 1
        assert Job.objects.get(id=waiting_id).status == Status.QUEUED
        # It is this session's job now: its outcome is recorded, and its slot goes to the other job.
        peer.send({"type": "done", "job_id": job_id, "attempt": 1, "result": {"resumed": True}})
        assert peer.recv("ack")["status"] == "recorded"
        assert Job.objects.get(id=job_id).status == Status.SUCCEEDED
        assert peer.recv("assign")["job_id"] == waiting_id


def test_late_outcome_for_a_requeued_job_nobody_took_is_recorded(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        _hand_back(peer, [job_id])
        # The crawler resends its unacked outcome right after ready, here in the same write.
        hello = peer.handshake(send_ready=False)
        ready = {"type": "ready", "slots": 0, "running": [], "supervisor": "ignored"}  # slots 0: no new assign
        done = {"type": "done", "job_id": job_id, "attempt": 1, "result": {"late": True}}
        peer.send_raw(protocol.encode_frame(ready) + protocol.encode_frame(done))
        ack = peer.recv("ack")
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id, 1, "recorded")
        job = Job.objects.get()
        assert (job.status, job.result, job.attempt, job.outcome_attempt) == (Status.SUCCEEDED, {"late": True}, 1, 1)
        [event] = JobEvent.objects.filter(job_id=job_id, kind=EventKind.OUTCOME)
        assert (event.from_status, str(event.session)) == (Status.QUEUED, hello["session"])
        probe(peer)
        assert pending(peer, "assign") == []


def test_ready_running_for_a_job_taken_elsewhere_or_finished_gets_cancel(processes, short_socket_path):
    finished_id, taken_id = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        peer.send({"type": "done", "job_id": finished_id, "attempt": 1, "result": {}})
        assert peer.recv("ack")["status"] == "recorded"
        _hand_back(peer, [taken_id])
        other = uuid.uuid4()
        [claimed] = services.claim_jobs(session=other, limit=1, lease_seconds=60)
        assert (claimed.id, claimed.attempt) == (taken_id, 2)
        jobs, events = job_state(), event_state()
        unknown_id = taken_id + 1000
        peer.handshake(slots=2, running=[(finished_id, 1), (taken_id, 1), (unknown_id, 1)])
        cancels = sorted((c["job_id"], c["attempt"]) for c in peer.recv_many("cancel", 3))
        assert cancels == [(finished_id, 1), (taken_id, 1), (unknown_id, 1)]
        probe(peer)
        assert pending(peer, "assign") == []
        assert (job_state(), event_state()) == (jobs, events)
        assert Job.objects.get(id=taken_id).lease_session == other


# --- orderly end and isolation -----------------------------------------------------------


def test_bye_ends_the_session_requeues_and_records_the_reason(processes, short_socket_path):
    done_id, *job_ids = enqueue(3)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        hello = peer.handshake(slots=3)
        peer.recv_many("assign", 3)
        # An outcome sent just before bye, in the same write, is still recorded (its ack cannot follow).
        peer.send_raw(
            protocol.encode_frame({"type": "done", "job_id": done_id, "attempt": 1, "result": {}})
            + protocol.encode_frame({"type": "bye", "reason": "maintenance window"})
        )
        assert peer.wait_closed(5), "the bus kept the session open after bye"
        wait_until(lambda: all_queued(job_ids), timeout=5, message="requeue after bye")
        assert Job.objects.get(id=done_id).status == Status.SUCCEEDED
        row = wait_until(
            lambda: BusSession.objects.filter(session=hello["session"], state="closed").first(),
            timeout=5,
            message="session row closed",
        )
        assert "maintenance window" in row.close_reason and row.closed_at is not None
        assert all("maintenance window" in reason for reason in interrupt_reasons(job_ids))


def test_closing_one_session_requeues_only_its_jobs(processes, short_socket_path):
    other_path = short_socket_path.replace("crawler.sock", "other.sock")
    job_ids = enqueue(6)
    first, second = CrawlerPeer(short_socket_path, name="first"), CrawlerPeer(other_path, name="second")
    bus = start_bus(processes, short_socket_path, other_path)
    try:
        first_hello = first.handshake(slots=3)
        first_jobs = [a["job_id"] for a in first.recv_many("assign", 3)]
        second_hello = second.handshake(slots=3)
        second_jobs = [a["job_id"] for a in second.recv_many("assign", 3)]
        assert sorted(first_jobs + second_jobs) == job_ids
        untouched = list(
            Job.objects.filter(id__in=second_jobs)
            .order_by("id")
            .values_list("status", "attempt", "lease_session", "interruptions")
        )
        first.close(reset=True)
        wait_until(lambda: all_queued(first_jobs), timeout=5, message="the closed session's jobs requeued")
        probe(second)  # the other session is alive and its worker caught up
        assert (
            list(
                Job.objects.filter(id__in=second_jobs)
                .order_by("id")
                .values_list("status", "attempt", "lease_session", "interruptions")
            )
            == untouched
        )
        assert {str(s) for s in Job.objects.filter(id__in=second_jobs).values_list("lease_session", flat=True)} == {
            second_hello["session"]
        }
        assert interrupt_reasons(second_jobs) == []
        assert BusSession.objects.get(session=second_hello["session"]).state == "connected"
        assert BusSession.objects.get(session=first_hello["session"]).state == "lost"
    finally:
        first.shutdown()
        second.shutdown()
        print(processes.output(bus))


# --- text the database cannot store as is (PostgreSQL refuses NUL characters) -------------


def test_nul_in_the_crawler_name_does_not_stall_the_session(processes, short_socket_path):
    [job_id] = enqueue(1)
    peer = CrawlerPeer(short_socket_path, name="crawler\x00one")
    bus = start_bus(processes, short_socket_path)
    try:
        hello = peer.handshake(slots=1)
        assert peer.recv("assign", timeout=5)["job_id"] == job_id
        assert BusSession.objects.get(session=hello["session"]).crawler.startswith("crawler")
    finally:
        peer.shutdown()
        print(processes.output(bus))


def test_nul_in_a_result_is_answered_and_does_not_stall_later_outcomes(processes, short_socket_path):
    first_id, second_id = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        peer.send({"type": "done", "job_id": first_id, "attempt": 1, "result": {"title": "a\x00b", "k\x00": 1}})
        ack = peer.recv("ack", timeout=5, where=lambda f: f["job_id"] == first_id)
        assert ack["status"] == "recorded"  # recorded with the NULs taken out, not refused for ever
        job = Job.objects.get(id=first_id)
        assert (job.status, job.result) == (Status.SUCCEEDED, {"title": "ab", "k": 1})
        peer.send({"type": "done", "job_id": second_id, "attempt": 1, "result": {"ok": True}})
        ack = peer.recv("ack", timeout=5, where=lambda f: f["job_id"] == second_id)
        assert ack["status"] == "recorded"


def test_nul_in_the_bye_reason_still_requeues_at_once(processes, short_socket_path):
    job_ids = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        hello = peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        peer.send({"type": "bye", "reason": "going\x00away"})
        assert peer.wait_closed(5)
        wait_until(lambda: all_queued(job_ids), timeout=5, message="requeue after a bye with a NUL in its reason")
        row = wait_until(
            lambda: BusSession.objects.filter(session=hello["session"], state="closed").first(),
            timeout=5,
            message="session row closed",
        )
        assert "going" in row.close_reason


def test_outcome_forged_by_another_crawler_is_stale_and_the_holders_result_wins(processes, short_socket_path):
    """Outcome authority: only the crawler the attempt was assigned to may record it (PROTOCOL.md rule 4)."""
    other_path = short_socket_path.replace("crawler.sock", "other.sock")
    [job_id] = enqueue(1)
    holder, other = CrawlerPeer(short_socket_path, name="holder"), CrawlerPeer(other_path, name="other")
    bus = start_bus(processes, short_socket_path, other_path)
    try:
        holder.handshake(slots=1)
        assert holder.recv("assign")["job_id"] == job_id
        other_hello = other.handshake(slots=1)
        other.send({"type": "done", "job_id": job_id, "attempt": 1, "result": {"by": "forger"}})
        ack = other.recv("ack")
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id, 1, "stale")
        job = Job.objects.get()
        assert (job.status, job.result) == (Status.RUNNING, None)
        stale = JobEvent.objects.get(job_id=job_id, kind=EventKind.STALE)
        assert str(stale.session) == other_hello["session"] and "another crawler" in stale.reason

        holder.send({"type": "done", "job_id": job_id, "attempt": 1, "result": {"by": "holder"}})
        assert holder.recv("ack")["status"] == "recorded"
        job.refresh_from_db()
        assert (job.status, job.result, job.lease_session) == (Status.SUCCEEDED, {"by": "holder"}, None)
    finally:
        holder.shutdown()
        other.shutdown()
        print(processes.output(bus))
