"""Issue 4's failures, each injected for real: a SIGKILLed bus, a restarted database, a
dropped connection, a poison job, retryable failures, a wedged job, stale outcomes and a
crawler that floods the bus. Real processes, real signals, real sockets; every wait has a
deadline and every test ends what it started.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import threading
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status
from tests import pg_instance
from tests.conftest import local_site, wait_until
from tests.crawler_peer import CrawlerPeer

PROBE_JOB = 2**62  # never created: a `started` for it is always answered with error stale


# --- helpers ------------------------------------------------------------------------------


@pytest.fixture
def socket_dir():
    """A short folder for Unix sockets (AF_UNIX paths are limited to ~100 bytes)."""
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="jsf-", dir="/tmp")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def enqueue(count: int, **fields) -> list[int]:
    ids = [
        job.id for job in services.enqueue_many(urls=[f"https://example.com/f{i}" for i in range(count)], actor="test")
    ]
    if fields:
        Job.objects.filter(id__in=ids).update(**fields)
    return ids


def queued(ids) -> bool:
    return Job.objects.filter(id__in=list(ids), status=Status.QUEUED).count() == len(ids)


def runbus(processes, *endpoints: str, **settings: str):
    env = dict(HEARTBEAT_TIMEOUT="30", BUS_BACKOFF_CAP="0.5")
    env.update(settings)
    args = [arg for endpoint in endpoints for arg in ("--endpoint", endpoint)]
    return processes.manage("runbus", *args, env=processes.env(**env))


def probe(peer: CrawlerPeer, timeout: float = 10.0) -> dict:
    """A round trip through the bus's IO thread and database worker, answered in order."""
    attempt = int(time.monotonic() * 1000) % 1_000_000 + 1
    peer.send({"type": "started", "job_id": PROBE_JOB, "attempt": attempt})
    return peer.recv(
        "error", timeout=timeout, where=lambda f: f.get("job_id") == PROBE_JOB and f.get("attempt") == attempt
    )


@contextlib.contextmanager
def peer_at(path: str, **kwargs):
    peer = CrawlerPeer(path, **kwargs)
    try:
        yield peer
    finally:
        peer.shutdown()


def wait_log(processes, proc, text: str, timeout: float = 30.0) -> float:
    """Wait until `text` shows in the process's log; return the monotonic time it was seen."""
    wait_until(
        lambda: text in processes.output(proc),
        timeout=timeout,
        interval=0.005,
        message=f"{text!r} in the log of {proc.args[2:4]}",
    )
    return time.monotonic()


# --- 1. the bus process dies --------------------------------------------------------------


TAKEN_OVER = "its bus session is gone and the crawler did not list it as still running"


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("reaped", [True, False], ids=["dead-pid", "zombie"])
def test_another_bus_takes_over_the_crawler_of_a_sigkilled_bus_and_requeues_its_jobs(
    processes, socket_dir, held_crawlers, reaped
):
    """A second bus node takes the dead node's crawler over at once (its pid is gone, reaped or a
    zombie) and requeues the jobs the crawler no longer runs; while the owner lives, nothing moves."""
    path = os.path.join(socket_dir, "a.sock")
    ids = enqueue(20)
    # The crawler takes nothing in later sessions, so the requeued jobs stay queued for the check.
    crawler = held_crawlers(path, "--slots", "20", "--heartbeat", "--reconnect-slots", "0")
    fast = dict(HEARTBEAT_TIMEOUT="1", BUS_SWEEP_INTERVAL="0.5")
    victim = runbus(processes, path, **fast)
    wait_until(lambda: len(crawler.assigned()) == 20, timeout=30, message="20 jobs held")
    other = runbus(processes, path, **fast)
    wait_log(processes, other, "event=bus.started")
    time.sleep(1.5)  # the other bus has coordinated and swept several times: a live owner's jobs stay put
    assert Job.objects.filter(id__in=ids, status=Status.RUNNING).count() == 20, processes.output(other)
    assert "event=bus.owns" not in processes.output(other)

    killed = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    if reaped:
        victim.wait(5)
    wait_until(lambda: queued(ids), timeout=2.5, interval=0.01, message="the dead bus's jobs requeued by the new owner")
    elapsed = time.monotonic() - killed
    assert elapsed <= 2.0, elapsed
    events = list(JobEvent.objects.filter(job_id__in=ids, kind=EventKind.INTERRUPT).values_list("actor", "reason"))
    assert len(events) == 20
    assert set(events) == {("bus", TAKEN_OVER)}
    assert "event=bus.owns" in processes.output(other)
    assert other.poll() is None
    victim.wait(5)


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("node", ["fixed-node", None], ids=["explicit-node", "host-pid"])
def test_restarted_bus_requeues_its_dead_incarnations_jobs_within_a_second_of_start(
    processes, socket_dir, held_crawlers, node
):
    path = os.path.join(socket_dir, "a.sock")
    ids = enqueue(10)
    # The crawler takes nothing in later sessions, so the requeued jobs stay queued for the check.
    crawler = held_crawlers(path, "--slots", "10", "--heartbeat", "--reconnect-slots", "0")
    settings = dict(HEARTBEAT_TIMEOUT="30")  # leases of 60 s: only the take-over can move the jobs
    if node:
        settings["BUS_NODE"] = node
    first = runbus(processes, path, **settings)
    wait_until(lambda: len(crawler.assigned()) == 10, timeout=30, message="10 jobs held")
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    time.sleep(0.5)
    assert Job.objects.filter(id__in=ids, status=Status.RUNNING).count() == 10

    second = runbus(processes, path, **settings)
    started = wait_log(processes, second, "event=bus.started")
    wait_until(lambda: queued(ids), timeout=5, interval=0.005, message="the take-over at start-up")
    elapsed = time.monotonic() - started
    assert elapsed <= 1.0, f"requeued {elapsed:.2f} s after the restarted bus started"
    events = set(JobEvent.objects.filter(job_id__in=ids, kind=EventKind.INTERRUPT).values_list("actor", "reason"))
    assert events == {("bus", TAKEN_OVER)}
    assert Job.objects.filter(id__in=ids, interruptions=1, attempt=1).count() == 10


@pytest.mark.django_db(transaction=True)
def test_reset_jobs_expired_command_requeues_only_jobs_whose_lease_ran_out(processes):
    import uuid

    ids = enqueue(3)
    services.claim_jobs(session=uuid.uuid4(), limit=3, lease_seconds=600)
    expired, fresh = ids[:2], ids[2]
    Job.objects.filter(id__in=expired).update(lease_expires_at=timezone.now() - timedelta(seconds=5))
    proc = processes.manage("reset_jobs", "--expired")
    assert proc.wait(timeout=60) == 0, processes.output(proc)
    output = processes.output(proc)
    assert "Requeued 2, failed 0" in output, output
    assert queued(expired)
    assert Job.objects.get(id=fresh).status == Status.RUNNING
    events = JobEvent.objects.filter(kind=EventKind.INTERRUPT)
    assert sorted(events.values_list("job_id", flat=True)) == expired
    assert set(events.values_list("actor", flat=True)) == {"command"}


# --- 2. the database goes away ------------------------------------------------------------


ENQUEUER = """
import sys, time
from django.db import close_old_connections
from jobs import services
stop_file = sys.argv[1]
n = 0
import os
while not os.path.exists(stop_file):
    close_old_connections()
    try:
        jobs = services.enqueue_many(urls=[f"https://example.com/db{n}-{i}" for i in range(5)], actor="enqueuer")
        print("ENQUEUED", " ".join(str(job.id) for job in jobs), flush=True)
        n += 1
    except Exception as exc:
        print("ENQUEUE_FAILED", exc.__class__.__name__, flush=True)
        from django.db import connection
        connection.close()
    time.sleep(0.05)
print("ENQUEUER_DONE", flush=True)
"""


@pytest.mark.slow
def test_bus_survives_a_postgresql_restart_and_loses_no_outcome(processes, socket_dir):
    if not pg_instance.available():
        pytest.skip("PostgreSQL server binaries are not installed")
    import psycopg2

    pg = pg_instance.PrivatePostgres()
    try:
        pg.start()
        pg.create_database("faults")
        url = pg.database_url("faults")
        env = processes.env(DATABASE_URL=url, HEARTBEAT_TIMEOUT="10", BUS_POLL_INTERVAL="0.5", BUS_BACKOFF_CAP="0.5")
        migrate = processes.manage("migrate", "--noinput", env=env)
        assert migrate.wait(timeout=120) == 0, processes.output(migrate)
        path = os.path.join(socket_dir, "c.sock")
        crawler = processes.manage("runcrawler", "--listen", path, "--slots", "10", "--noop", env=env)
        wait_until(lambda: os.path.exists(path), timeout=30, message="crawler listening")
        bus = processes.manage("runbus", "--endpoint", path, env=env)
        stop_file = os.path.join(socket_dir, "stop-enqueuer")
        enqueuer = processes.manage(
            "shell", "-c", ENQUEUER.replace("sys.argv[1]", repr(stop_file)), env=env, name="enqueuer"
        )

        def query(sql: str):
            with contextlib.closing(psycopg2.connect(url.replace("postgres://", "postgresql://"))) as conn:
                with conn.cursor() as cursor:
                    cursor.execute(sql)
                    return cursor.fetchall()

        def succeeded() -> int:
            return query("SELECT count(*) FROM jobs_job WHERE status = 'succeeded'")[0][0]

        wait_until(lambda: succeeded() >= 20, timeout=60, message="jobs flowing before the restart")
        pg.stop("fast")
        time.sleep(2)
        pg.start()
        restarted_at = succeeded()
        wait_until(lambda: succeeded() >= restarted_at + 20, timeout=60, message="dispatch resumed by itself")
        with open(stop_file, "w"):
            pass
        assert enqueuer.wait(timeout=30) == 0, processes.output(enqueuer)
        reported = {
            int(word)
            for line in processes.output(enqueuer).splitlines()
            if line.startswith("ENQUEUED")
            for word in line.split()[1:]
        }

        def all_done() -> bool:
            return query("SELECT count(*) FROM jobs_job WHERE status <> 'succeeded'")[0][0] == 0

        wait_until(all_done, timeout=60, message="every job succeeded")
        assert bus.poll() is None, "runbus died with the database"
        assert crawler.poll() is None
        output = processes.output(bus)
        assert "event=bus.db_error" in output, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
        in_db = {row[0] for row in query("SELECT id FROM jobs_job")}
        assert reported <= in_db, "an enqueue reported as committed is missing"
        outcomes = dict(query("SELECT job_id, count(*) FROM jobs_jobevent WHERE kind = 'outcome' GROUP BY job_id"))
        assert set(outcomes) == in_db and set(outcomes.values()) == {1}, "a job without exactly one outcome"
        assert query("SELECT count(*) FROM jobs_job WHERE outcome_attempt <> attempt")[0][0] == 0
    finally:
        processes.stop_all()
        pg.destroy()


# --- 3. a connection blip with the crawler alive ----------------------------------------


class _Proxy:
    """A Unix-socket proxy between runbus and a crawler; `cut()` drops the live connections."""

    def __init__(self, listen_path: str, target_path: str):
        self.target = target_path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(listen_path)
        self.listener.listen(8)
        self.path = listen_path
        self.pairs: list[tuple[socket.socket, socket.socket]] = []
        self.lock = threading.Lock()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.connect(self.target)
            except OSError:
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    @staticmethod
    def _pump(a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                readable, _, _ = select.select([a, b], [], [], 0.5)
                for sock in readable:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if sock is a else a).sendall(data)
        except (OSError, ValueError):
            for sock in (a, b):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    def cut(self) -> int:
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    def close(self) -> None:
        self.closed = True
        self.cut()
        self.listener.close()


@pytest.mark.django_db(transaction=True)
def test_connection_blip_re_leases_the_running_job_and_records_its_outcome_once(processes, socket_dir):
    crawler_path, proxy_path = os.path.join(socket_dir, "c.sock"), os.path.join(socket_dir, "p.sock")
    with local_site("slow", held=True) as (site, release, requests):
        job = services.enqueue(url=f"{site}/slow", actor="test")
        crawler = processes.manage(
            "runcrawler",
            "--listen",
            crawler_path,
            "--slots",
            "1",
            "--allow-private",
            "--resume-grace",
            "5",
            "--timeout",
            "30",
        )
        wait_until(lambda: os.path.exists(crawler_path), timeout=30, message="crawler listening")
        proxy = _Proxy(proxy_path, crawler_path)
        try:
            bus = runbus(processes, proxy_path, BUS_BACKOFF_BASE="0.05", BUS_BACKOFF_CAP="0.2")
            wait_until(lambda: requests, timeout=30, message="the crawler fetching the slow page")
            first = Job.objects.get(id=job.id)
            assert (first.status, first.attempt) == (Status.RUNNING, 1)

            assert proxy.cut() == 1
            wait_until(
                lambda: JobEvent.objects.filter(job_id=job.id, kind=EventKind.RELEASE).exists(),
                timeout=10,
                message="the job re-leased to the bus's next session",
            )
            job.refresh_from_db()
            assert (job.status, job.attempt) == (Status.RUNNING, 1)
            assert job.lease_session != first.lease_session
            release.set()
            wait_until(
                lambda: Job.objects.get(id=job.id).status == Status.SUCCEEDED,
                timeout=20,
                message="the resumed job's outcome recorded",
            )
        finally:
            proxy.close()
        job.refresh_from_db()
        assert (job.attempt, job.outcome_attempt, job.interruptions) == (1, 1, 1)
        assert job.result["title"] == "slow"
        trail = list(JobEvent.objects.filter(job_id=job.id).values_list("kind", "attempt", "session"))
        assert [kind for kind, _, _ in trail] == [
            EventKind.ENQUEUE,
            EventKind.CLAIM,
            EventKind.INTERRUPT,
            EventKind.RELEASE,
            EventKind.OUTCOME,
        ], trail
        assert trail[3][2] == trail[4][2] != trail[1][2]  # recorded by the session that re-leased it
        assert len(requests) == 1, "the page was fetched twice: the job ran twice"
        assert crawler.poll() is None and bus.poll() is None


# --- 4. a poison job ---------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_poison_job_fails_after_max_interruptions_and_the_queue_keeps_flowing(processes, socket_dir, held_crawlers):
    path = os.path.join(socket_dir, "a.sock")
    [poison] = enqueue(1, priority=10)  # first in line every time
    others = enqueue(3)
    bus = runbus(processes, path, BUS_BACKOFF_BASE="0.05", BUS_BACKOFF_CAP="0.2")
    victims = 0
    while Job.objects.get(id=poison).status != Status.FAILED:
        assert victims < 3, "the poison job was handed out a fourth time"
        crawler = held_crawlers(path, "--slots", "1")
        assigned = wait_until(crawler.assigned, timeout=30, message="an assignment")
        assert assigned == [(poison, victims + 1)]
        crawler.proc.send_signal(signal.SIGKILL)  # it "crashes" the crawler
        crawler.proc.wait(5)
        victims += 1
        wait_until(
            lambda: Job.objects.get(id=poison).interruptions == victims,
            timeout=10,
            message=f"interruption {victims} counted",
        )
    assert victims == 3
    job = Job.objects.get(id=poison)
    assert job.status == Status.FAILED and "max_interruptions" in job.error, job.error
    assert job.lease_session is None and job.finished_at is not None
    last = JobEvent.objects.filter(job_id=poison, kind=EventKind.INTERRUPT).last()
    assert last.to_status == Status.FAILED and "max_interruptions" in last.reason

    # The rest of the queue flows to the next crawler.
    crawler = held_crawlers(path, "--slots", "3")
    wait_until(lambda: len(crawler.assigned()) == 3, timeout=30, message="the other jobs assigned")
    assert sorted(job_id for job_id, _ in crawler.assigned()) == others
    for job_id, attempt in crawler.assigned():
        crawler.command(f"done {job_id} {attempt}")
    wait_until(
        lambda: Job.objects.filter(id__in=others, status=Status.SUCCEEDED).count() == 3,
        timeout=20,
        message="the other jobs succeeded",
    )
    assert Job.objects.get(id=poison).status == Status.FAILED
    assert bus.poll() is None


# --- 5. retries -----------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_retryable_failure_waits_for_run_after_then_fails_after_max_attempts(processes, socket_dir):
    [job_id] = enqueue(1, max_attempts=3)
    path = os.path.join(socket_dir, "a.sock")
    with peer_at(path) as peer:
        runbus(processes, path, JOB_RETRY_BACKOFF_BASE="0.5", BUS_POLL_INTERVAL="0.1")
        peer.handshake(slots=1)
        assign = peer.recv("assign", timeout=30)
        for failure in (1, 2):
            attempt = assign["attempt"]
            assert attempt == failure
            peer.send({"type": "failed", "job_id": job_id, "attempt": attempt, "error": "503", "retryable": True})
            assert peer.recv("ack")["status"] == "recorded"
            job = Job.objects.get(id=job_id)
            assert (job.status, job.failures, job.lease_session) == (Status.QUEUED, failure, None)
            delay = 0.5 * 2 ** (failure - 1)
            assert job.run_after is not None
            assign = peer.recv("assign", timeout=delay + 10)
            assigned_at = timezone.now()
            assert assign["attempt"] == attempt + 1
            assert assigned_at >= job.run_after, "re-assigned before run_after"
            claim = JobEvent.objects.filter(job_id=job_id, kind=EventKind.CLAIM, attempt=attempt + 1).get()
            assert claim.at >= job.run_after
            assert (claim.at - job.run_after).total_seconds() < 3, "the due retry waited far past run_after"
        peer.send({"type": "failed", "job_id": job_id, "attempt": 3, "error": "503 again", "retryable": True})
        assert peer.recv("ack")["status"] == "recorded"
        job = Job.objects.get(id=job_id)
        assert (job.status, job.failures, job.error, job.run_after) == (Status.FAILED, 3, "503 again", None)
        time.sleep(0.5)  # a few polls: a failed job is never handed out again
        probe(peer)
        assert [f for f in peer.frames if f["type"] == "assign"] == []
    reasons = list(JobEvent.objects.filter(job_id=job_id, kind=EventKind.OUTCOME).values_list("to_status", flat=True))
    assert reasons == [Status.QUEUED, Status.QUEUED, Status.FAILED]


# --- 6. a wedged job ------------------------------------------------------------------------


def _beat(peer: CrawlerPeer, stop: threading.Event, running: list, interval: float, progress=None) -> None:
    next_progress = time.monotonic()
    while not stop.wait(interval):
        try:
            peer.send({"type": "heartbeat", "ts": time.time(), "running": [list(p) for p in running]})
            if progress and time.monotonic() >= next_progress:
                job_id, attempt = progress
                peer.send({"type": "progress", "job_id": job_id, "attempt": attempt, "message": "busy"})
                next_progress = time.monotonic() + 0.3
        except (OSError, AttributeError):
            return


@contextlib.contextmanager
def beating(peer: CrawlerPeer, running: list, interval: float = 0.2, progress=None):
    stop = threading.Event()
    thread = threading.Thread(target=_beat, args=(peer, stop, running, interval, progress), daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


@pytest.mark.django_db(transaction=True)
def test_job_listed_but_without_progress_past_stall_timeout_is_cancelled_and_requeued(processes, socket_dir):
    [job_id] = enqueue(1)
    path = os.path.join(socket_dir, "a.sock")
    with peer_at(path) as peer:
        runbus(processes, path, HEARTBEAT_TIMEOUT="2", BUS_STALL_TIMEOUT="1")
        peer.handshake(slots=1)
        assert peer.recv("assign", timeout=30)["attempt"] == 1
        assigned = time.monotonic()
        with beating(peer, [(job_id, 1)]):
            cancel = peer.recv("cancel", timeout=10)
        waited = time.monotonic() - assigned
        assert (cancel["job_id"], cancel["attempt"]) == (job_id, 1)
        assert waited >= 1.0, f"cancelled after {waited:.2f} s, before BUS_STALL_TIMEOUT"
        [event] = JobEvent.objects.filter(job_id=job_id, kind=EventKind.INTERRUPT)
        assert "stalled" in event.reason and event.to_status == Status.QUEUED and event.attempt == 1
        again = peer.recv("assign", timeout=10)  # requeued as an interruption: the freed slot takes it again
        assert (again["job_id"], again["attempt"]) == (job_id, 2)
        assert Job.objects.get(id=job_id).interruptions == 1


@pytest.mark.django_db(transaction=True)
def test_job_that_reports_progress_is_not_cancelled_for_stalling(processes, socket_dir):
    [job_id] = enqueue(1)
    path = os.path.join(socket_dir, "a.sock")
    with peer_at(path) as peer:
        runbus(processes, path, HEARTBEAT_TIMEOUT="2", BUS_STALL_TIMEOUT="1")
        peer.handshake(slots=1)
        assert peer.recv("assign", timeout=30)["attempt"] == 1
        with beating(peer, [(job_id, 1)], progress=(job_id, 1)):
            deadline = time.monotonic() + 3.5  # three and a half stall timeouts
            with pytest.raises(AssertionError):
                peer.recv("cancel", timeout=deadline - time.monotonic())
            probe(peer)
        assert [f for f in peer.frames if f["type"] == "cancel"] == []
        job = Job.objects.get(id=job_id)
        assert (job.status, job.attempt, job.interruptions) == (Status.RUNNING, 1, 0)
        assert job.progress == {"message": "busy"}


# --- 7. stale outcomes are audited ------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_late_done_after_re_assignment_is_acked_stale_and_audited(processes, socket_dir):
    [job_id] = enqueue(1)
    path = os.path.join(socket_dir, "a.sock")
    with peer_at(path) as peer:
        runbus(processes, path, BUS_BACKOFF_BASE="0.05", BUS_BACKOFF_CAP="0.2")
        first = peer.handshake(slots=1)
        assert peer.recv("assign", timeout=30)["attempt"] == 1
        peer.close()
        wait_until(lambda: queued([job_id]), timeout=5, message="requeued after the close")
        second = peer.handshake(slots=1)
        assert peer.recv("assign", timeout=10)["attempt"] == 2
        before = list(Job.objects.filter(id=job_id).values())
        peer.send({"type": "done", "job_id": job_id, "attempt": 1, "result": {"late": True}})
        ack = peer.recv("ack")
        assert (ack["job_id"], ack["attempt"], ack["status"]) == (job_id, 1, "stale")
        assert list(Job.objects.filter(id=job_id).values()) == before
        [stale] = JobEvent.objects.filter(job_id=job_id, kind=EventKind.STALE)
        assert stale.attempt == 1 and str(stale.session) == second["session"] != first["session"]
        assert "stale done for attempt 1" in stale.reason and "attempt 2" in stale.reason
        assert stale.from_status == stale.to_status == ""
        peer.send({"type": "failed", "job_id": job_id, "attempt": 1, "error": "late\x00boom", "retryable": True})
        assert peer.recv("ack")["status"] == "stale"
        stale_failed = JobEvent.objects.filter(job_id=job_id, kind=EventKind.STALE).last()
        assert "stale failed for attempt 1" in stale_failed.reason and "lateboom" in stale_failed.reason
        assert list(Job.objects.filter(id=job_id).values()) == before


# --- 8. overload --------------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_frame_flood_does_not_starve_heartbeats_acks_or_the_database(processes, socket_dir):
    flooded, other = enqueue(2)
    path = os.path.join(socket_dir, "a.sock")
    with peer_at(path) as peer:
        runbus(processes, path, HEARTBEAT_TIMEOUT="1", BUS_SWEEP_INTERVAL="0.5")
        peer.handshake(slots=2)
        held = {a["job_id"]: a["attempt"] for a in peer.recv_many("assign", 2, timeout=30)}
        stop, sent = threading.Event(), [0]
        running = [[flooded, held[flooded]], [other, held[other]]]

        lock = threading.Lock()  # a heartbeat never lists `other` after its done went out

        def flood():
            while not stop.is_set():
                with lock:
                    sent[0] += 1
                    try:
                        peer.send_raw(
                            b'{"type":"heartbeat","ts":%f,"running":%s}\n' % (time.time(), str(running).encode())
                            + b'{"type":"progress","job_id":%d,"attempt":%d,"done":%d,"total":1000000}\n'
                            % (flooded, held[flooded], sent[0])
                        )
                    except OSError:
                        return
                time.sleep(0.001)

        thread = threading.Thread(target=flood, daemon=True)
        updated = set()
        heartbeats = []
        thread.start()
        try:
            began = time.monotonic()
            outcome_sent = None
            while time.monotonic() - began < 3.0:
                if outcome_sent is None and time.monotonic() - began > 1.5:
                    with lock:
                        running.remove([other, held[other]])
                        outcome_sent = time.monotonic()
                        peer.send({"type": "done", "job_id": other, "attempt": held[other], "result": {}})
                try:
                    frame = peer.recv(None, timeout=0.05)
                except AssertionError as exc:
                    if "closed" in str(exc):
                        raise
                    frame = None
                if frame is not None:
                    if frame["type"] == "heartbeat":
                        heartbeats.append(time.monotonic())
                    elif frame["type"] == "ack":
                        heartbeats.append(time.monotonic())  # any frame counts as the bus's sign of life
                        assert frame["job_id"] == other and frame["status"] == "recorded"
                        acked_in = time.monotonic() - outcome_sent
                        assert acked_in < 1.0, f"ack took {acked_in:.2f} s during the flood"
                        outcome_sent = float("inf")
                    else:
                        raise AssertionError(f"unexpected frame during the flood: {frame}")
                updated.add(Job.objects.get(id=flooded).updated_at)
        finally:
            stop.set()
            thread.join(5)
        assert outcome_sent == float("inf"), "the outcome sent during the flood was never acked"
        assert sent[0] > 500, f"only {sent[0]} frame pairs sent: not a flood"
        arrivals = [began] + heartbeats + [time.monotonic()]
        gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
        assert len(heartbeats) >= 4 and max(gaps) < 1.2, gaps  # something at least every 0.5 s interval
        # Coalesced: at most about one progress write per second, not one per frame.
        assert len(updated) <= 6, sorted(updated)
        last = sent[0]
        wait_until(
            lambda: (Job.objects.get(id=flooded).progress or {}).get("done") == last,
            timeout=5,
            message="the latest progress stored after the flood",
        )
        probe(peer, timeout=5)
        job = Job.objects.get(id=flooded)
        assert (job.status, job.attempt, job.interruptions) == (Status.RUNNING, 1, 0)
        assert Job.objects.get(id=other).status == Status.SUCCEEDED
