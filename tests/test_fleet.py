"""The fleet with real processes: one owner per crawler, take-over, hand-over, the registry.

Every test here starts real bus processes (gunicorn workers, `runbus`) and a
real `runcrawler`, and checks the rule from the crawler's own connection log
(--connection-log): never two sessions open to one crawler at the same time,
never more jobs running on it than its slots.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs import fleet, services
from jobs.models import BusNode, BusSession, Crawler, CrawlerState, EventKind, Job, JobEvent, Status
from tests.conftest import ROOT, free_port, wait_until

pytestmark = pytest.mark.django_db(transaction=True)


def enqueue(count: int, prefix: str = "f") -> list[int]:
    return [
        job.id
        for job in services.enqueue_many(urls=[f"https://example.com/{prefix}{i}" for i in range(count)], actor="test")
    ]


class ConnectionLog:
    """The crawler's --connection-log: one JSON object per line."""

    def __init__(self, path: Path):
        self.path = path

    def events(self) -> list[dict]:
        if not self.path.exists():
            return []
        lines = self.path.read_text().split("\n")[:-1]  # whole lines: the crawler may be writing the last
        return [json.loads(line) for line in lines if line.strip()]

    def ready_sessions(self) -> list[dict]:
        return [event for event in self.events() if event["event"] == "ready"]

    def _open_counts(self) -> list[int]:
        """After each event: how many sessions are past their handshake and not yet closed."""
        open_now: set = set()
        counts = []
        for event in self.events():
            if event["event"] == "ready":
                open_now.add(event["session"])
            elif event["event"] == "close":
                open_now.discard(event.get("session"))
            counts.append(len(open_now))
        return counts

    def max_open_sessions(self) -> int:
        return max(self._open_counts(), default=0)

    def open_sessions(self) -> int:
        return (self._open_counts() or [0])[-1]

    def max_running(self) -> int:
        running, most = set(), 0
        for event in self.events():
            key = (event.get("job_id"), event.get("attempt"))
            if event["event"] == "assign":
                running.add(key)
            elif event["event"] == "finish":
                running.discard(key)
            most = max(most, len(running))
        return most

    def assigns(self) -> list[tuple[int, int]]:
        return [(event["job_id"], event["attempt"]) for event in self.events() if event["event"] == "assign"]


def start_crawler(processes, path: str, *args: str) -> ConnectionLog:
    log = ConnectionLog(processes.tmp_path / f"connections-{len(processes.started)}.jsonl")
    processes.manage("runcrawler", "--listen", path, "--connection-log", str(log.path), *args)
    wait_until(lambda: os.path.exists(path), timeout=30, message="crawler listening")
    return log


def runbus(processes, *endpoints: str, **settings: str):
    env = dict(HEARTBEAT_TIMEOUT="5", BUS_BACKOFF_CAP="0.5")
    env.update(settings)
    args = [arg for endpoint in endpoints for arg in ("--endpoint", endpoint)]
    return processes.manage("runbus", *args, env=processes.env(**env))


def start_gunicorn(processes, workers: int, **settings: str) -> subprocess.Popen:
    log = open(processes.tmp_path / "gunicorn.log", "wb")
    env = processes.env(HEARTBEAT_TIMEOUT="5", BUS_BACKOFF_CAP="0.5", **settings)
    master = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{free_port()}", "jobsite.wsgi"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    master.log_path = log.name  # type: ignore[attr-defined]
    processes.started.append(master)
    return master


def finished(ids: list[int]) -> bool:
    return Job.objects.filter(id__in=ids, status=Status.SUCCEEDED).count() == len(ids)


def test_three_gunicorn_workers_and_two_runbus_hold_one_session_and_never_more_than_the_slots(
    processes, short_socket_path
):
    """The issue's scenario: 3 web workers + 2 runbus, one crawler with --slots 2 and slow jobs."""
    path = short_socket_path
    log = start_crawler(processes, path, "--slots", "2", "--noop", "--noop-delay-ms", "150")
    ids = enqueue(24)
    master = start_gunicorn(processes, 3, BUS_ENDPOINTS=path)
    buses = [runbus(processes, path) for _ in range(2)]
    most_running = most_sessions = 0
    deadline = time.monotonic() + 120
    while not finished(ids):
        assert time.monotonic() < deadline, f"{Job.objects.filter(id__in=ids).status_counts()}"
        most_running = max(most_running, Job.objects.running().filter(crawler=f"unix:{path}").count())
        most_sessions = max(most_sessions, BusSession.objects.open().filter(endpoint=f"unix:{path}").count())
        time.sleep(0.02)
    assert BusNode.objects.count() == 5, list(BusNode.objects.values_list("node", flat=True))
    assert most_running <= 2 and most_sessions <= 1, (most_running, most_sessions)
    # The crawler's own account: never two sessions at once, never more than 2 jobs at once.
    assert log.max_open_sessions() == 1
    assert log.max_running() <= 2
    assert sorted(job_id for job_id, _ in log.assigns()) == sorted(ids)  # each job ran once
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.OUTCOME).count() == len(ids)
    for proc in [master, *buses]:
        proc.send_signal(signal.SIGTERM)
    for proc in [master, *buses]:
        assert proc.wait(timeout=30) == 0, processes.output(proc)
    assert log.max_open_sessions() == 1


def test_sigkill_of_the_owner_hands_the_crawler_to_another_bus_which_re_leases_its_running_jobs(
    processes, short_socket_path
):
    path = short_socket_path
    endpoint = f"unix:{path}"
    log = start_crawler(processes, path, "--slots", "4", "--noop", "--noop-delay-ms", "4000", "--resume-grace", "10")
    ids = enqueue(4)
    first = runbus(processes, path)
    wait_until(lambda: Job.objects.running().filter(id__in=ids).count() == 4, timeout=30, message="4 jobs running")
    second = runbus(processes, path)
    wait_until(lambda: BusNode.objects.count() == 2, timeout=30, message="the second node joined")
    owner = Crawler.objects.get(endpoint=endpoint).owner
    victim, survivor = (first, second) if owner.split("~")[0].endswith(f":{first.pid}") else (second, first)
    sessions_before = len(log.ready_sessions())
    killed_at = time.time()
    victim.send_signal(signal.SIGKILL)
    wait_until(lambda: len(log.ready_sessions()) > sessions_before, timeout=10, message="a new session")
    took = log.ready_sessions()[-1]["t"] - killed_at
    assert took <= 2.0, f"new session {took:.2f} s after the kill"
    wait_until(lambda: finished(ids), timeout=30, message="the jobs finish under the new owner")
    # No job ran twice: one assignment each, at attempt 1, and each re-leased to the new session.
    assert sorted(log.assigns()) == sorted((job_id, 1) for job_id in ids)
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.CLAIM).count() == 4
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.INTERRUPT).count() == 0
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.RELEASE).count() == 4
    assert log.max_open_sessions() == 1
    assert survivor.poll() is None


def test_add_drain_resume_and_remove_while_jobs_run(processes, short_socket_path):
    """A runbus with no endpoint waits for registrations; registry changes reach it within 2 s."""
    path = short_socket_path
    endpoint = f"unix:{path}"
    log = start_crawler(processes, path, "--slots", "2", "--noop", "--noop-delay-ms", "1500")
    bus = runbus(processes)
    wait_until(lambda: BusNode.objects.exists(), timeout=30, message="the bus node is up")
    assert bus.poll() is None  # no endpoint: it waits, it does not exit
    ids = enqueue(6)
    time.sleep(0.5)
    assert not log.ready_sessions()

    fleet.add_crawler(endpoint=path, label="one")
    wait_until(lambda: log.ready_sessions(), timeout=2.5, message="a session within 2 s of the registration")
    wait_until(lambda: Job.objects.running().filter(id__in=ids).count() == 2, timeout=10, message="2 running")

    fleet.drain_crawler(endpoint=path)
    drained_at = time.monotonic()
    wait_until(
        lambda: Crawler.objects.get(endpoint=endpoint).state == CrawlerState.PAUSED,
        timeout=10,
        message="drained: running jobs finished, then paused",
    )
    assert time.monotonic() - drained_at < 5
    assigned_when_drained = len(log.assigns())
    # The 2 running when the drain began, and at most 2 claimed as they finished while the change
    # travelled (the registry is read four times a second; a job takes 1.5 s).
    assert assigned_when_drained <= 4
    assert Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 6 - assigned_when_drained
    assert log.open_sessions() == 0
    time.sleep(0.5)
    assert len(log.assigns()) == assigned_when_drained  # nothing new while paused

    fleet.resume_crawler(endpoint=path)
    wait_until(lambda: finished(ids), timeout=30, message="resumed: the rest run")

    more = enqueue(4, prefix="g")
    wait_until(lambda: Job.objects.running().filter(id__in=more).exists(), timeout=10, message="running again")
    removal = fleet.remove_crawler(endpoint=path, actor="test")
    assert not removal.removed  # drains first
    wait_until(lambda: not Crawler.objects.filter(endpoint=endpoint).exists(), timeout=10, message="removed")
    assert not Job.objects.running().filter(id__in=more).exists()
    assert log.open_sessions() == 0
    assert log.max_open_sessions() == 1

    fleet.add_crawler(endpoint=path)
    wait_until(lambda: Job.objects.running().filter(id__in=more).exists(), timeout=10, message="running again")
    removal = fleet.remove_crawler(endpoint=path, now=True, actor="test")
    assert removal.removed
    wait_until(lambda: log.open_sessions() == 0, timeout=5, message="the session ended")
    assert not Job.objects.running().filter(id__in=more).exists()
    assert bus.poll() is None


def test_a_clean_stop_hands_the_crawler_over_without_requeueing_its_running_jobs(processes, short_socket_path):
    """SIGTERM of the owner (a rolling restart): bye with resume_within, the next owner re-leases the jobs."""
    path = short_socket_path
    log = start_crawler(processes, path, "--slots", "3", "--noop", "--noop-delay-ms", "3000")
    ids = enqueue(3)
    first = runbus(processes, path)
    wait_until(lambda: Job.objects.running().filter(id__in=ids).count() == 3, timeout=30, message="3 jobs running")
    second = runbus(processes, path)
    wait_until(lambda: BusNode.objects.count() == 2, timeout=30, message="the second node joined")
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=15) == 0, processes.output(first)
    wait_until(lambda: len(log.ready_sessions()) == 2, timeout=5, message="the second node's session")
    wait_until(lambda: finished(ids), timeout=30, message="the jobs finish under the new owner")
    assert sorted(log.assigns()) == sorted((job_id, 1) for job_id in ids)  # each ran once
    assert not JobEvent.objects.filter(job_id__in=ids, kind=EventKind.INTERRUPT).exists()
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.RELEASE).count() == 3
    assert log.max_open_sessions() == 1
    assert second.poll() is None


def spread() -> list[int]:
    owners = Crawler.objects.exclude(owner="").values_list("owner", flat=True)
    counts: dict[str, int] = {}
    for owner in owners:
        counts[owner] = counts.get(owner, 0) + 1
    return sorted(counts.values())


def test_thirty_crawlers_spread_ten_each_over_three_buses_and_follow_a_join_and_a_stop(processes, tmp_path):
    """Fair spread: every change settles to max - min <= 1 within 10 s (the crawlers need not be up)."""
    for i in range(30):
        fleet.add_crawler(endpoint=f"/tmp/jsfleet-{os.getpid()}-{i}.sock")
    buses = [runbus(processes, BUS_BACKOFF_BASE="0.5", BUS_BACKOFF_CAP="2") for _ in range(2)]
    wait_until(lambda: spread() == [15, 15], timeout=20, message="15 + 15 over two buses")
    buses.append(runbus(processes, BUS_BACKOFF_BASE="0.5", BUS_BACKOFF_CAP="2"))
    joined = time.monotonic()
    wait_until(lambda: spread() == [10, 10, 10], timeout=15, message="10 each once the third joined")
    assert time.monotonic() - joined <= 10 + 2  # + the third process's start-up
    buses[0].send_signal(signal.SIGTERM)
    stopped = time.monotonic()
    assert buses[0].wait(timeout=15) == 0
    wait_until(lambda: spread() == [15, 15], timeout=10, message="15 + 15 after one stopped")
    assert time.monotonic() - stopped <= 10
    buses[1].send_signal(signal.SIGKILL)
    wait_until(lambda: spread() == [30], timeout=10, message="all 30 on the last bus after a SIGKILL")


class FreezableProxy:
    """A TCP proxy to the database that can freeze: it stops forwarding but keeps every socket open.

    That is a network partition as the bus behind it sees it: queries hang,
    nothing errors, and the database sees nothing close either.
    """

    def __init__(self, host: str, port: int):
        import socket
        import threading

        self.target = (host, port)
        self.frozen = threading.Event()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        import socket
        import threading

        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source, sink) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            while self.frozen.is_set():
                time.sleep(0.01)  # hold the bytes: a partition, not a reset
            if not data:
                sink.close()
                return
            try:
                sink.sendall(data)
            except OSError:
                return

    def close(self) -> None:
        import socket

        self.frozen.clear()
        self.server.close()
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)  # wakes the pumps and sends the FIN now (close alone does not)
            except OSError:
                pass
            sock.close()


@pytest.mark.postgres
def test_a_bus_cut_off_from_the_database_ends_its_session_before_another_bus_takes_the_crawler_over(
    processes, short_socket_path
):
    from django.db import connection

    from tests.conftest import database_url

    path = short_socket_path
    log = start_crawler(processes, path, "--slots", "2", "--noop", "--noop-delay-ms", "4000", "--resume-grace", "15")
    config = connection.settings_dict
    proxy = FreezableProxy(config.get("HOST") or "127.0.0.1", int(config.get("PORT") or 5432))
    try:
        behind = database_url().replace(f":{config.get('PORT') or 5432}/", f":{proxy.port}/")
        ids = enqueue(2)
        cut = runbus(processes, path, DATABASE_URL=behind)
        wait_until(lambda: Job.objects.running().filter(id__in=ids).count() == 2, timeout=30, message="2 running")
        other = runbus(processes, path)
        wait_until(lambda: BusNode.objects.count() == 2, timeout=30, message="the second node joined")
        first_session = log.ready_sessions()[-1]["session"]
        frozen_at = time.time()
        proxy.frozen.set()
        wait_until(lambda: len(log.ready_sessions()) == 2, timeout=10, message="the other node's session")
        new_ready = log.ready_sessions()[-1]["t"]
        closes = [e for e in log.events() if e["event"] == "close" and e.get("session") == first_session]
        assert closes, "the cut-off bus's session was never closed"
        # The cut-off node closed its session before the new owner's session was ready.
        assert closes[0]["t"] <= new_ready, (closes[0]["t"] - frozen_at, new_ready - frozen_at)
        assert new_ready - frozen_at <= 5.0
        assert "event=bus.fenced" in processes.output(cut)
        wait_until(lambda: finished(ids), timeout=30, message="the jobs finish under the new owner")
        assert sorted(log.assigns()) == sorted((job_id, 1) for job_id in ids)  # re-leased, not run again
        assert log.max_open_sessions() == 1
        proxy.frozen.clear()  # the cut-off node comes back: it must not take the crawler back by force
        time.sleep(2)
        assert log.max_open_sessions() == 1
        assert other.poll() is None and cut.poll() is None
    finally:
        proxy.close()


def test_a_self_registered_crawler_unreachable_past_the_ttl_is_dropped_and_a_persons_is_kept(processes, tmp_path):
    from jobs.models import CrawlerSource

    gone = str(tmp_path / "gone.sock")
    kept = str(tmp_path / "kept.sock")
    fleet.add_crawler(endpoint=gone, source=CrawlerSource.ANNOUNCED)
    fleet.add_crawler(endpoint=kept)
    bus = runbus(processes, BUS_ANNOUNCE_TTL="1", BUS_BACKOFF_CAP="0.3")
    wait_until(
        lambda: not Crawler.objects.filter(endpoint=f"unix:{gone}").exists(),
        timeout=15,
        message="the unreachable self-registered crawler dropped",
    )
    assert "event=bus.crawler_dropped" in processes.output(bus)
    time.sleep(1.5)
    crawler = Crawler.objects.get(endpoint=f"unix:{kept}")
    assert crawler.last_error  # unreachable too, and says why, but a person registered it
    assert bus.poll() is None


@pytest.fixture
def short_folder():
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="jsr-", dir="/tmp")  # AF_UNIX paths must be short
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_a_bus_that_joins_takes_its_share_without_requeueing_or_rerunning_a_job(processes, short_folder):
    """Rebalance: one bus owns two busy crawlers; a second bus joins and one crawler is handed over to it."""
    folder = short_folder
    paths = [os.path.join(folder, f"{name}.sock") for name in ("a", "b")]
    logs = [start_crawler(processes, path, "--slots", "2", "--noop", "--noop-delay-ms", "3000") for path in paths]
    ids = enqueue(4)
    first = runbus(processes, *paths)
    wait_until(lambda: Job.objects.running().filter(id__in=ids).count() == 4, timeout=30, message="4 running")
    second = runbus(processes)
    wait_until(lambda: spread() == [1, 1], timeout=10, message="one crawler each")
    wait_until(lambda: finished(ids), timeout=30, message="all finish")
    assert not JobEvent.objects.filter(job_id__in=ids, kind=EventKind.INTERRUPT).exists()
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.RELEASE).count() == 2  # the handed-over pair
    for log in logs:
        assert len(log.assigns()) == 2 and log.max_open_sessions() == 1
    assert sum(len(log.ready_sessions()) for log in logs) == 3  # one crawler moved, once
    assert first.poll() is None and second.poll() is None


def test_every_bus_stopping_at_once_still_requeues_the_jobs(processes, short_socket_path):
    """A whole deployment stopped at once (every gunicorn worker gets SIGTERM together): each node
    hands its crawlers over, nobody takes them, and the jobs go back to the queue all the same."""
    path = short_socket_path
    start_crawler(processes, path, "--slots", "4", "--noop", "--noop-delay-ms", "60000")
    ids = enqueue(4)
    buses = [runbus(processes, path) for _ in range(2)]
    wait_until(lambda: Job.objects.running().filter(id__in=ids).count() == 4, timeout=30, message="4 running")
    wait_until(lambda: BusNode.objects.count() == 2, timeout=30, message="both nodes up")
    for bus in buses:
        bus.send_signal(signal.SIGTERM)
    for bus in buses:
        assert bus.wait(timeout=15) == 0, processes.output(bus)
    assert Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 4
    assert not BusNode.objects.exists()
