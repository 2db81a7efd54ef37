"""A catalogue of hostile frames sent to a real `runbus` by a scripted crawler peer.

Each entry gets the reply docs/protocol.md promises — `bad_frame` and a closed session,
`invalid` or `unknown_type` with the session kept, or an `ack` — and changes the database
only where the reply says so (jobs_job and jobs_jobevent are compared before and after).
tests/test_bus_protocol.py covers the plainer cases (bad UTF-8, NaN, arrays, missing type,
wrong field types, the frame limit); this file covers the rest: nesting, huge numbers,
out-of-range ids, NUL characters, duplicate keys, an outcome from another session, floods.

One runbus serves the whole module (two endpoints, two listening peers); each test opens
its own session and, when it ends, waits until the bus has closed that session, so the
next test starts from a quiet bus.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from bus.models import BusSession
from jobs import fleet, services
from jobs.models import Crawler, EventKind, Job, JobEvent, Status
from tests.conftest import Processes, wait_until
from tests.crawler_peer import CrawlerPeer

PROBE_JOB = 2**62
MAX_JOB_ID = 2**63 - 1
MAX_ATTEMPT = 2**31 - 1

pytestmark = pytest.mark.django_db(transaction=True)


# --- one bus for the module -------------------------------------------------------------


class Bus:
    def __init__(self, processes: Processes, folder: str):
        self.processes = processes
        self.peers = {
            name: CrawlerPeer(os.path.join(folder, f"{name}.sock"), name=f"hostile-{name}") for name in ("a", "b")
        }
        args = [arg for peer in self.peers.values() for arg in ("--endpoint", str(peer.endpoint))]
        self.proc = processes.manage(
            "runbus",
            *args,
            env=processes.env(
                HEARTBEAT_TIMEOUT="30", BUS_BACKOFF_BASE="0.05", BUS_BACKOFF_CAP="0.2", BUS_NODE="hostile-node"
            ),
        )

    def log(self) -> str:
        return self.processes.output(self.proc)


@pytest.fixture(scope="module")
def bus(django_db_setup, django_db_blocker, tmp_path_factory):
    folder = tempfile.mkdtemp(prefix="jsh-", dir="/tmp")
    processes = Processes(tmp_path_factory.mktemp("hostile"))
    bus = Bus(processes, folder)
    yield bus
    processes.stop_all()
    for peer in bus.peers.values():
        peer.shutdown()
    shutil.rmtree(folder, ignore_errors=True)


def handshake(peer: CrawlerPeer, **kwargs) -> dict:
    """The handshake on the next live connection. Connections the bus gave up on while they waited in
    the peer's backlog are skipped: each test's flush empties the crawler registry, the bus ends its
    sessions (a handshake in progress too) and reconnects, and a peer no test used for a while has a
    dead connection queued for every test since."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return peer.handshake(timeout=15, **kwargs)
        except (AssertionError, OSError):
            peer.close()
            if time.monotonic() > deadline:
                raise


@pytest.fixture
def connect(bus):
    """Open a session on peer `name` (retrying a connection the bus gave up on while it waited in
    the backlog); at the end close it and wait until the bus has ended it."""
    opened: list[tuple[CrawlerPeer, str]] = []

    def open_session(name: str = "a", slots: int = 0) -> CrawlerPeer:
        # Each test's flush empties the crawler registry the bus serves: register the peers again.
        endpoints = [str(peer.endpoint) for peer in bus.peers.values()]
        fleet.register_endpoints(endpoints)
        wait_until(
            lambda: Crawler.objects.filter(endpoint__in=endpoints).exclude(owner="").count() == len(endpoints),
            timeout=10,
            message="the bus owns the peers' endpoints",
        )
        peer = bus.peers[name]
        hello = handshake(peer, slots=slots)
        wait_until(
            lambda: BusSession.objects.filter(session=hello["session"]).exists(), timeout=10, message="the session row"
        )
        opened.append((peer, hello["session"]))
        peer.session = hello["session"]
        return peer

    yield open_session
    for peer, session in opened:
        peer.close()
        wait_until(
            lambda: not BusSession.objects.filter(session=session, state="connected").exists(),
            timeout=10,
            message="the bus ended the session",
        )
    assert bus.proc.poll() is None, bus.log()[-3000:]


# --- helpers ----------------------------------------------------------------------------


def enqueue(count: int) -> list[int]:
    return [
        job.id for job in services.enqueue_many(urls=[f"https://example.com/h{i}" for i in range(count)], actor="test")
    ]


def database() -> tuple[list, list]:
    """jobs_job and jobs_jobevent, without the lease times the live session keeps extending."""
    jobs = list(
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
            "updated_at",
        )
    )
    events = list(JobEvent.objects.order_by("id").values_list("id", "job_id", "kind", "attempt", "session", "reason"))
    return jobs, events


def probe(peer: CrawlerPeer, timeout: float = 10.0) -> None:
    """A round trip through the bus's IO thread and its worker, answered in order."""
    attempt = uuid.uuid4().int % 1_000_000 + 1
    peer.send({"type": "started", "job_id": PROBE_JOB, "attempt": attempt})
    peer.recv("error", timeout=timeout, where=lambda f: f.get("job_id") == PROBE_JOB and f.get("attempt") == attempt)


def holding(connect, count: int = 1, name: str = "a"):
    ids = enqueue(count)
    peer = connect(name, slots=count)
    assigns = peer.recv_many("assign", count)
    assert sorted(a["job_id"] for a in assigns) == ids
    return peer, ids


def frame(**fields) -> bytes:
    return json.dumps(fields).encode() + b"\n"


# --- framing errors: bad_frame, session closed, nothing written ------------------------------

DEEP = 100_000
BAD_FRAMES = {
    "nested-65-levels": b'{"type":"heartbeat","x":' + b"[" * 64 + b"]" * 64 + b"}\n",
    "nested-100000-levels": b'{"type":"heartbeat","x":' + b"[" * DEEP + b"]" * DEEP + b"}\n",
    "float-1e400": b'{"type":"heartbeat","ts":1e400}\n',
    "float-minus-1e400": b'{"type":"progress","job_id":1,"attempt":1,"done":-1e400}\n',
    "integer-10000-digits": b'{"type":"heartbeat","ts":' + b"9" * 10_000 + b"}\n",
    "integer-4301-digits": b'{"type":"heartbeat","x":-' + b"9" * 4301 + b"}\n",
    "infinity": b'{"type":"heartbeat","ts":Infinity}\n',
    "minus-infinity": b'{"type":"heartbeat","ts":-Infinity}\n',
    "empty-line": b"\n",
    "two-objects-on-one-line": b'{"type":"heartbeat"}{"type":"heartbeat"}\n',
    "raw-nul-byte-in-a-string": b'{"type":"heartbeat","x":"a\x00b"}\n',
    "duplicate-type-last-not-a-string": b'{"type":"heartbeat","type":5}\n',
    "null-type": b'{"type":null}\n',
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_framing_errors_get_bad_frame_and_close_without_touching_jobs(bus, connect, name):
    enqueue(2)  # queued jobs the idle session must leave alone
    peer = connect(slots=0)
    probe(peer)
    before = database()
    peer.send_raw(BAD_FRAMES[name])
    error = peer.recv("error", timeout=15)
    assert error["code"] == "bad_frame", error
    assert peer.wait_closed(10), "the session stayed open after a framing error"
    wait_until(
        lambda: BusSession.objects.filter(session=peer.session, state="lost").exists(),
        timeout=10,
        message="the session ended",
    )
    assert database() == before


# --- accepted as they are: no error, nothing written ----------------------------------------

ACCEPTED = {
    "nested-64-levels": b'{"type":"heartbeat","x":' + b"[" * 63 + b"]" * 63 + b"}\n",
    "integer-4300-digits": b'{"type":"heartbeat","x":-' + b"9" * 4300 + b"}\n",
    "float-1e308": b'{"type":"heartbeat","ts":1e308}\n',
    "surrounding-whitespace-and-cr": b'  {"type":"heartbeat","ts":1.5}\t\r\n',
    "duplicate-type-last-wins": b'{"type":"frobnicate","type":"heartbeat","running":[]}\n',
    "valid-surrogate-pair": b'{"type":"heartbeat","x":"\\ud83d\\ude00"}\n',
    "nul-escape-in-an-unknown-field": b'{"type":"heartbeat","x\\u0000":"a\\u0000b"}\n',
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_odd_but_valid_frames_are_accepted_silently(bus, connect, name):
    peer, ids = holding(connect)
    probe(peer)
    before = database()
    peer.send_raw(ACCEPTED[name])
    probe(peer)
    assert [f for f in peer.frames if f["type"] in ("error", "ack", "cancel")] == []
    assert database() == before


# --- known type, fields out of range: invalid, the session stays, nothing written ------------


def _invalid_frames(job_id: int) -> dict[str, bytes]:
    return {
        "negative-attempt": frame(type="done", job_id=job_id, attempt=-1, result={}),
        "zero-attempt-failed": frame(type="failed", job_id=job_id, attempt=0, error="x", retryable=True),
        "attempt-2^31": frame(type="done", job_id=job_id, attempt=MAX_ATTEMPT + 1, result={}),
        "zero-job-id": frame(type="done", job_id=0, attempt=1, result={}),
        "negative-job-id": frame(type="failed", job_id=-job_id, attempt=1, error="x"),
        "job-id-2^63": frame(type="done", job_id=2**63, attempt=1, result={}),
        "job-id-2^64": frame(type="done", job_id=2**64, attempt=1, result={}),
        "job-id-10^30-started": frame(type="started", job_id=10**30, attempt=1),
        "job-id-1e3-float": b'{"type":"done","job_id":1e3,"attempt":1,"result":{}}\n',
        "running-job-id-2^63": frame(type="heartbeat", ts=1.0, running=[[2**63, 1]]),
        "running-attempt-0": frame(type="heartbeat", ts=1.0, running=[[job_id, 0]]),
        "progress-done-400-digits": frame(type="progress", job_id=job_id, attempt=1, done=10**400, total=1),
        "progress-total-4300-digits": b'{"type":"progress","job_id":%d,"attempt":1,"total":%s}\n'
        % (job_id, b"9" * 4300),
        "capacity-over-a-million": frame(type="capacity", slots=1_000_001),
        "capacity-2^64": frame(type="capacity", slots=2**64),
        "nul-type-is-unknown": frame(type="heart\x00beat"),
    }


INVALID_NAMES = list(_invalid_frames(1))


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_out_of_range_fields_get_invalid_and_change_nothing(bus, connect, name):
    peer, (job_id,) = holding(connect)
    probe(peer)
    before = database()
    peer.send_raw(_invalid_frames(job_id)[name])
    error = peer.recv("error", timeout=10)
    expected = "unknown_type" if name == "nul-type-is-unknown" else "invalid"
    assert error["code"] == expected, error
    probe(peer)  # the session stays and keeps answering
    assert [f for f in peer.frames if f["type"] in ("ack", "cancel")] == []
    assert database() == before
    assert Job.objects.get(id=job_id).status == Status.RUNNING


# --- outcomes: acks, and exactly the database change they announce ----------------------------


def test_done_for_the_largest_job_id_is_acked_stale_and_writes_nothing(bus, connect):
    peer, _ = holding(connect)
    before = database()
    peer.send(dict(type="done", job_id=MAX_JOB_ID, attempt=MAX_ATTEMPT, result={}))
    ack = peer.recv("ack")
    assert (ack["job_id"], ack["attempt"], ack["status"]) == (MAX_JOB_ID, MAX_ATTEMPT, "stale")
    assert database() == before  # an unknown job leaves no event (there is no job to hang it on)


def test_done_for_the_largest_attempt_of_a_held_job_is_stale_and_audited(bus, connect):
    peer, (job_id,) = holding(connect)
    jobs, events = database()
    peer.send(dict(type="done", job_id=job_id, attempt=MAX_ATTEMPT, result={}))
    assert peer.recv("ack")["status"] == "stale"
    after_jobs, after_events = database()
    assert after_jobs == jobs
    [new] = after_events[len(events) :]
    assert new[1:5] == (job_id, EventKind.STALE, MAX_ATTEMPT, uuid.UUID(peer.session))


def test_nul_in_failed_error_and_progress_message_is_removed_not_refused(bus, connect):
    peer, (progress_id, failed_id) = holding(connect, 2)
    peer.send(dict(type="progress", job_id=progress_id, attempt=1, done=1, total=2, message="half\x00way"))
    wait_until(lambda: Job.objects.get(id=progress_id).progress, timeout=5, message="progress stored")
    assert Job.objects.get(id=progress_id).progress == {"done": 1, "total": 2, "message": "halfway"}
    peer.send(dict(type="failed", job_id=failed_id, attempt=1, error="bad\x00 gateway", retryable=False))
    assert peer.recv("ack")["status"] == "recorded"
    job = Job.objects.get(id=failed_id)
    assert (job.status, job.error) == (Status.FAILED, "bad gateway")


def test_duplicate_keys_the_last_one_wins(bus, connect):
    peer, (job_id,) = holding(connect)
    peer.send_raw(b'{"type":"done","job_id":%d,"attempt":99,"attempt":1,"result":[],"result":{"last":true}}\n' % job_id)
    ack = peer.recv("ack")
    assert (ack["attempt"], ack["status"]) == (1, "recorded")
    job = Job.objects.get(id=job_id)
    assert (job.status, job.result) == (Status.SUCCEEDED, {"last": True})


def test_done_for_a_job_of_another_crawler_is_stale_and_changes_nothing(bus, connect):
    """Outcome authority (PROTOCOL.md rule 4): only the crawler an attempt was assigned to may
    record it. A forged outcome from another crawler is acked stale, changes nothing but an audit
    event, and the holder's own result is then recorded."""
    holder, (job_id,) = holding(connect, name="a")
    other = connect("b", slots=0)
    other.send(dict(type="done", job_id=job_id, attempt=1, result={"from": "b"}))
    assert other.recv("ack")["status"] == "stale"
    other.send(dict(type="failed", job_id=job_id, attempt=1, error="forged", retryable=False))
    assert other.recv("ack")["status"] == "stale"
    job = Job.objects.get(id=job_id)
    assert (job.status, job.result, str(job.lease_session)) == (Status.RUNNING, None, holder.session)
    assert not JobEvent.objects.filter(job_id=job_id, kind=EventKind.OUTCOME).exists()
    assert JobEvent.objects.filter(job_id=job_id, kind=EventKind.STALE, session=other.session).count() == 2
    holder.send(dict(type="done", job_id=job_id, attempt=1, result={"from": "a"}))
    assert holder.recv("ack")["status"] == "recorded"
    job.refresh_from_db()
    assert (job.status, job.result) == (Status.SUCCEEDED, {"from": "a"})


def test_ready_running_cannot_take_another_crawlers_requeued_job(bus, connect):
    """A crawler that lists another crawler's job in ready.running gets cancel, not the job."""
    holder, (job_id,) = holding(connect, name="a")
    holder.close()
    wait_until(lambda: Job.objects.get(id=job_id).status == Status.QUEUED, timeout=10, message="requeue")
    Job.objects.filter(id=job_id).update(run_after=timezone.now() + timedelta(hours=1))  # nobody claims it
    thief = bus.peers["b"]
    hello = handshake(thief, slots=0, running=[(job_id, 1)])
    try:
        cancel = thief.recv("cancel")
        assert (cancel["job_id"], cancel["attempt"]) == (job_id, 1)
        job = Job.objects.get(id=job_id)
        assert (job.status, job.lease_session) == (Status.QUEUED, None)
        thief.send(dict(type="done", job_id=job_id, attempt=1, result={"stolen": True}))
        assert thief.recv("ack")["status"] == "stale"
        assert Job.objects.get(id=job_id).status == Status.QUEUED
    finally:
        thief.close()
        wait_until(
            lambda: not BusSession.objects.filter(session=hello["session"], state="connected").exists(),
            timeout=10,
            message="the bus ended the session",
        )


# --- floods ------------------------------------------------------------------------------------

FLOOD = 2000


def test_flood_of_unknown_types_is_answered_frame_by_frame(bus, connect):
    peer, _ = holding(connect)
    before = database()
    peer.send_raw(b"".join(frame(type=f"junk{i}") for i in range(FLOOD)))
    errors = peer.recv_many("error", FLOOD, timeout=30)
    assert {e["code"] for e in errors} == {"unknown_type"}
    probe(peer)
    assert database() == before


def test_flood_of_stale_outcomes_for_unknown_jobs_is_acked_then_the_session_is_closed(bus, connect):
    """A session that keeps sending outcomes it may not record is closed with a clear error
    (more than 1000 + 2 x slots); every one before that is acked stale, and none writes a row."""
    peer, (job_id,) = holding(connect)
    base = 2**61
    peer.send_raw(b"".join(frame(type="done", job_id=base + i, attempt=1, result={}) for i in range(FLOOD)))
    error = peer.recv("error", timeout=60)
    assert error["code"] == "too_many_stale" and "stale outcomes" in error["message"]
    acks = [f for f in peer.frames if f["type"] == "ack"]
    assert len(acks) >= 1000 and {a["status"] for a in acks} == {"stale"}
    assert peer.wait_closed(timeout=10)
    wait_until(
        lambda: Job.objects.get(id=job_id).status == Status.QUEUED,
        timeout=10,
        message="the closed session's job requeued",
    )
    assert not JobEvent.objects.filter(job_id__gte=base).exists()
    session = BusSession.objects.get(session=peer.session)
    assert "more stale outcomes" in session.close_reason


def test_flood_of_made_up_attempts_writes_a_bounded_audit_trail(bus, connect):
    """The probe's audit flood (failed frames with made-up attempts for a real job): at most 100
    stale events per session, the rest summed up in the session's close reason."""
    peer, (job_id,) = holding(connect)
    flood = b"".join(frame(type="failed", job_id=job_id, attempt=1000 + i, error="x" * 500) for i in range(FLOOD))
    try:
        peer.send_raw(flood)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the bus may end the session while the rest of the flood is still being written: that is the point
    assert peer.recv("error", timeout=60)["code"] == "too_many_stale"
    assert peer.wait_closed(timeout=10)
    wait_until(
        lambda: not BusSession.objects.filter(session=peer.session, state="connected").exists(),
        timeout=10,
        message="the bus ended the session",
    )
    assert JobEvent.objects.filter(job_id=job_id, kind=EventKind.STALE).count() == 100
    job = Job.objects.get(id=job_id)
    assert (job.status, job.failures) == (Status.QUEUED, 0)  # its own attempt 1 was never failed
    reason = BusSession.objects.get(session=peer.session).close_reason
    assert "too_many_stale" in reason and "more stale outcomes" in reason


def test_flood_of_resends_records_the_outcome_once(bus, connect):
    peer, (job_id,) = holding(connect)
    done = frame(type="done", job_id=job_id, attempt=1, result={"n": 1})
    peer.send_raw(done * FLOOD)
    acks = peer.recv_many("ack", FLOOD, timeout=60)
    assert {(a["job_id"], a["attempt"], a["status"]) for a in acks} == {(job_id, 1, "recorded")}
    assert JobEvent.objects.filter(job_id=job_id, kind=EventKind.OUTCOME).count() == 1
    assert Job.objects.get(id=job_id).status == Status.SUCCEEDED


def test_flood_of_invalid_frames_keeps_the_session_and_its_job(bus, connect):
    peer, (job_id,) = holding(connect)
    before = database()
    peer.send_raw(frame(type="done", job_id=job_id, attempt=0, result={}) * FLOOD)
    errors = peer.recv_many("error", FLOOD, timeout=60)
    assert {e["code"] for e in errors} == {"invalid"}
    assert {e.get("job_id") for e in errors} == {job_id}
    probe(peer)
    assert database() == before
