"""What one crawler with a valid token can no longer do (issue 9): each case over a real `runbus`.

- trickle bytes, or heartbeats that never list `running`, to keep its jobs `running` for ever;
- lose the well-formed frames it sent just before a malformed one;
- claim more slots than the server allows, or store a result of any size;
- get innocent jobs failed as poison by crashing while it holds many of them.

The forged outcome and the stale floods are in tests/test_hostile_frames.py.
"""

from __future__ import annotations

import json
import time

import pytest

from bus.models import BusSession
from jobs.models import EventKind, Job, JobEvent, Status
from tests.conftest import wait_until
from tests.crawler_peer import CrawlerPeer
from tests.test_bus_protocol import all_queued, bus_and_peer, enqueue, probe, start_bus

pytestmark = pytest.mark.django_db(transaction=True)


# --- liveness by whole frames -------------------------------------------------------------


def test_a_trickle_of_bytes_is_not_a_sign_of_life(processes, short_socket_path):
    """One byte every 0.3 s, never a whole frame: the session is lost after 2 x HEARTBEAT_TIMEOUT."""
    job_ids = enqueue(2)
    with bus_and_peer(processes, short_socket_path, HEARTBEAT_TIMEOUT="2") as (peer, bus):
        hello = peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        started = time.monotonic()
        trickle = b'{"type":"heartbeat","ts":1,"padding":"' + b"x" * 200
        lost = False
        for byte in trickle:
            try:
                peer.send_raw(bytes([byte]))
            except OSError:
                break  # the bus closed the session
            if all_queued(job_ids):
                lost = True
                break
            time.sleep(0.3)
        lost = lost or wait_until(lambda: all_queued(job_ids), timeout=10, message="requeue of a trickling session")
        elapsed = time.monotonic() - started
        assert lost and elapsed < 30, elapsed  # 4 s of silence, checked every second, on a loaded machine
        row = BusSession.objects.get(session=hello["session"])
        assert row.state == "lost" and "heartbeat timeout" in row.close_reason


def test_stall_timeout_holds_when_heartbeats_never_list_running(processes, short_socket_path):
    """BUS_STALL_TIMEOUT: a job with no started/progress for that long is requeued and cancelled,
    even though the crawler's heartbeats carry no `running` list at all."""
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path, BUS_STALL_TIMEOUT="2") as (peer, bus):
        peer.handshake(slots=1)
        assert peer.recv("assign")["job_id"] == job_id
        deadline = time.monotonic() + 30
        cancel = None
        while cancel is None and time.monotonic() < deadline:
            peer.send({"type": "heartbeat", "ts": time.time()})  # alive, but says nothing of its jobs
            try:
                cancel = peer.recv("cancel", timeout=0.5)
            except AssertionError:
                pass
        assert cancel is not None and (cancel["job_id"], cancel["attempt"]) == (job_id, 1)
        wait_until(
            lambda: Job.objects.get(id=job_id).attempt == 2 or all_queued([job_id]),
            timeout=10,
            message="the stalled job requeued",
        )
        event = JobEvent.objects.filter(job_id=job_id, kind=EventKind.INTERRUPT).first()
        assert event is not None and "stalled" in event.reason


def test_frames_before_a_malformed_one_in_the_same_read_are_processed(processes, short_socket_path):
    first, second = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        done = json.dumps({"type": "done", "job_id": first, "attempt": 1, "result": {"n": 1}}).encode()
        peer.send_raw(done + b"\n" + b"this is not json\n")
        assert peer.recv("error")["code"] == "bad_frame"
        assert peer.wait_closed(10)
        wait_until(lambda: Job.objects.get(id=second).status == Status.QUEUED, timeout=10, message="requeue")
        job = Job.objects.get(id=first)
        assert (job.status, job.result) == (Status.SUCCEEDED, {"n": 1})


# --- server-side caps ---------------------------------------------------------------------


def test_bus_max_slots_caps_what_one_session_may_claim(processes, short_socket_path):
    enqueue(10)
    with bus_and_peer(processes, short_socket_path, BUS_MAX_SLOTS="3") as (peer, bus):
        peer.handshake(slots=1000)
        peer.recv_many("assign", 3)
        peer.send({"type": "capacity", "slots": 500})
        probe(peer)
        assert not [f for f in peer.frames if f["type"] == "assign"]
        assert Job.objects.filter(status=Status.RUNNING).count() == 3


def test_an_oversized_result_is_recorded_as_a_marker_with_its_size_and_the_cap(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path, BUS_MAX_RESULT="2048") as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        result = {"body": "é" * 5000}
        peer.send({"type": "done", "job_id": job_id, "attempt": 1, "result": result})
        assert peer.recv("ack")["status"] == "recorded"
        job = Job.objects.get(id=job_id)
        size = len(json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode())
        assert job.status == Status.SUCCEEDED
        assert job.result == {"result_too_large": {"bytes": size, "limit": 2048}}


# --- the fair poison verdict ------------------------------------------------------------------


def crash_holding(peer: CrawlerPeer, count: int, job_ids: list[int]) -> None:
    """Take `count` jobs, then die (the socket closes without bye); wait until they are back."""
    peer.handshake(slots=count, timeout=15)
    assigned = [a["job_id"] for a in peer.recv_many("assign", count, timeout=15)]
    peer.close()
    wait_until(lambda: all_queued(assigned), timeout=15, message="requeue after the crash")


def test_a_crawler_crashing_with_many_jobs_fails_none_and_reruns_the_suspects_alone(processes, short_socket_path):
    job_ids = enqueue(20)
    peer = CrawlerPeer(short_socket_path, name="crashy")
    bus = start_bus(processes, short_socket_path, BUS_BACKOFF_BASE="0.05", BUS_BACKOFF_CAP="0.2")
    try:
        for _ in range(3):  # max_interruptions is 3
            crash_holding(peer, 20, job_ids)
        rows = list(Job.objects.filter(id__in=job_ids).values_list("status", "interruptions", "run_alone"))
        assert set(rows) == {(Status.QUEUED, 3, True)}, rows  # none failed: all suspects now

        # An honest session with 20 slots gets the suspects one at a time, each alone.
        peer.handshake(slots=20, timeout=15)
        for _ in range(20):
            [assign] = [peer.recv("assign", timeout=15)]
            probe(peer)
            assert not [f for f in peer.frames if f["type"] == "assign"], "a suspect ran in company"
            peer.send({"type": "done", "job_id": assign["job_id"], "attempt": assign["attempt"], "result": {}})
            assert peer.recv("ack")["status"] == "recorded"
        assert set(Job.objects.filter(id__in=job_ids).values_list("status", "run_alone")) == {(Status.SUCCEEDED, False)}
    finally:
        peer.shutdown()
        print(processes.output(bus))


def test_a_job_that_kills_its_crawler_alone_fails_at_max_interruptions(processes, short_socket_path):
    [job_id] = enqueue(1)
    peer = CrawlerPeer(short_socket_path, name="victim")
    bus = start_bus(processes, short_socket_path, BUS_BACKOFF_BASE="0.05", BUS_BACKOFF_CAP="0.2")
    try:
        for crash in range(3):
            peer.handshake(slots=5, timeout=15)
            assert peer.recv("assign", timeout=15)["job_id"] == job_id
            peer.close()
            if crash < 2:
                wait_until(lambda: all_queued([job_id]), timeout=15, message="requeue")
        job = wait_until(
            lambda: Job.objects.filter(id=job_id, status=Status.FAILED).first(),
            timeout=15,
            message="the poison verdict",
        )
        assert job.interruptions == 3 and "alone in its session" in job.error
        # ...and never assigned again.
        peer.handshake(slots=5, timeout=15)
        probe(peer)
        assert not [f for f in peer.frames if f["type"] == "assign"]
    finally:
        peer.shutdown()
        print(processes.output(bus))
