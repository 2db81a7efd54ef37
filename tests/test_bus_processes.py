"""The bus's guarantees with real processes: crawlers killed with SIGKILL, stopped
with SIGSTOP, a supervisor that dies, runbus stopped with SIGTERM, and the bus
thread that starts with the server (and only there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from bus.models import BusSession
from jobs import services
from jobs.models import BusNode, Job, JobEvent, Status
from tests.conftest import ROOT, free_port, wait_until
from tests.crawler_peer import CrawlerPeer

pytestmark = pytest.mark.django_db(transaction=True)


def enqueue(count: int) -> list[int]:
    return [
        job.id for job in services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(count)], actor="test")
    ]


def running_count(session=None) -> int:
    jobs = Job.objects.running()
    return (jobs.filter(lease_session=session) if session else jobs).count()


def test_sigkilled_crawler_holding_50_jobs_gets_them_all_requeued_within_a_second(
    processes, short_socket_path, held_crawlers
):
    ids = enqueue(50)
    crawler = held_crawlers(short_socket_path, "--slots", "50")
    processes.manage("runbus", "--endpoint", short_socket_path)
    wait_until(lambda: running_count() == 50, timeout=20, message="50 jobs running")

    crawler.proc.send_signal(signal.SIGKILL)
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 50,
        timeout=1.0,
        interval=0.005,
        message="all 50 jobs queued again within 1 s of SIGKILL",
    )

    reasons = set(JobEvent.objects.filter(job_id__in=ids, kind="interrupt").values_list("reason", flat=True))
    # A killed process closes its socket: EOF, or RST when our frames were still unread.
    assert len(reasons) == 1 and reasons <= {
        "connection closed by the crawler (EOF)",
        "socket error: ConnectionResetError: [Errno 104] Connection reset by peer",
    }
    assert Job.objects.filter(id__in=ids, interruptions=1, lease_session__isnull=True).count() == 50


def test_socket_reset_requeues_the_sessions_jobs_within_a_second(processes, short_socket_path):
    ids = enqueue(20)
    peer = CrawlerPeer(short_socket_path)
    try:
        processes.manage("runbus", "--endpoint", short_socket_path)
        peer.handshake(slots=20)
        peer.recv_many("assign", 20)
        wait_until(lambda: running_count() == 20, timeout=10, message="20 running")
        peer.close(reset=True)
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 20,
            timeout=1.0,
            interval=0.005,
            message="jobs queued again within 1 s of the RST",
        )
        reason = JobEvent.objects.filter(job_id__in=ids, kind="interrupt").values_list("reason", flat=True).first()
        assert "socket error" in reason or "EOF" in reason
    finally:
        peer.shutdown()


def test_sigstopped_crawler_loses_its_jobs_after_twice_the_heartbeat_timeout_and_its_late_results_are_fenced(
    processes, tmp_path, held_crawlers
):
    first_path, second_path = str(tmp_path / "a.sock"), str(tmp_path / "b.sock")
    if len(first_path) > 100:
        pytest.skip("temporary path too long for a Unix socket")
    ids = enqueue(3)
    first = held_crawlers(first_path, "--slots", "3", "--heartbeat", "--reconnect-slots", "0")
    processes.manage(
        "runbus",
        "--endpoint",
        first_path,
        "--endpoint",
        second_path,
        env=processes.env(HEARTBEAT_TIMEOUT="1", BUS_BACKOFF_CAP="0.5"),
    )
    wait_until(lambda: len(first.assigned()) == 3, timeout=20, message="3 jobs held by the first crawler")
    held = first.assigned()

    stopped_at = time.monotonic()
    first.proc.send_signal(signal.SIGSTOP)
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 3,
        timeout=6,
        message="jobs requeued after the heartbeat timeout",
    )
    elapsed = time.monotonic() - stopped_at
    assert elapsed >= 1.5, f"requeued after {elapsed:.2f} s: before 2 x HEARTBEAT_TIMEOUT of silence"
    reasons = set(JobEvent.objects.filter(job_id__in=ids, kind="interrupt").values_list("reason", flat=True))
    assert all(reason.startswith("heartbeat timeout") for reason in reasons), reasons

    # A second crawler takes two of the three; one stays queued at its old attempt.
    second = held_crawlers(second_path, "--slots", "2", "--heartbeat")
    wait_until(lambda: len(second.assigned()) == 2, timeout=20, message="second crawler got 2 jobs")
    taken = {job_id for job_id, _ in second.assigned()}

    first.proc.send_signal(signal.SIGCONT)
    for job_id, attempt in held:
        first.command(f"done {job_id} {attempt}")
    wait_until(lambda: len(first.acks()) == 3, timeout=20, message="acks for the late outcomes")
    acks = first.acks()
    for job_id, attempt in held:
        expected = "stale" if job_id in taken else "recorded"
        assert acks[(job_id, attempt)] == expected, (job_id, acks)
    for job_id in taken:
        job = Job.objects.get(id=job_id)
        assert job.status == Status.RUNNING and job.attempt == 2
        assert JobEvent.objects.filter(job_id=job_id, kind="stale").exists()
    (untaken,) = set(ids) - taken
    assert Job.objects.get(id=untaken).status == Status.SUCCEEDED


def test_two_crawlers_one_killed_only_its_jobs_move(processes, tmp_path, held_crawlers):
    paths = [str(tmp_path / "a.sock"), str(tmp_path / "b.sock")]
    enqueue(10)
    victim = held_crawlers(paths[0], "--slots", "5")
    survivor = held_crawlers(paths[1], "--slots", "5")
    processes.manage("runbus", "--endpoint", paths[0], "--endpoint", paths[1])
    wait_until(
        lambda: len(victim.assigned()) == 5 and len(survivor.assigned()) == 5,
        timeout=20,
        message="both crawlers hold 5 jobs",
    )
    survivor_jobs = {job_id for job_id, _ in survivor.assigned()}
    victim_jobs = {job_id for job_id, _ in victim.assigned()}
    survivor_lease = Job.objects.get(id=next(iter(survivor_jobs))).lease_session

    victim.proc.send_signal(signal.SIGKILL)
    wait_until(
        lambda: Job.objects.filter(id__in=victim_jobs, status=Status.QUEUED).count() == 5,
        timeout=2,
        message="the killed crawler's jobs requeued",
    )
    assert set(Job.objects.leased_to(survivor_lease).values_list("id", flat=True)) == survivor_jobs
    assert not JobEvent.objects.filter(job_id__in=survivor_jobs, kind="interrupt").exists()


def test_runbus_sigterm_says_bye_requeues_and_exits_zero_within_5_seconds(processes, short_socket_path):
    ids = enqueue(4)
    peer = CrawlerPeer(short_socket_path)
    try:
        bus = processes.manage("runbus", "--endpoint", short_socket_path)
        peer.handshake(slots=4)
        peer.recv_many("assign", 4)
        wait_until(lambda: running_count() == 4, timeout=10, message="4 running")
        bus.send_signal(signal.SIGTERM)
        bye = peer.recv("bye", timeout=5)
        assert bye["reason"] == "bus shutdown"
        assert bus.wait(timeout=5) == 0, processes.output(bus)
        assert Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 4
        assert BusSession.objects.get().state == "closed"
    finally:
        peer.shutdown()


def test_supervised_runbus_requeues_and_exits_when_its_parent_dies(processes, short_socket_path, tmp_path):
    ids = enqueue(6)
    peer = CrawlerPeer(short_socket_path)
    log_path = tmp_path / "runbus.log"
    launcher = (
        "import subprocess, sys, time\n"
        "log = open(sys.argv[1], 'wb')\n"
        "child = subprocess.Popen([sys.executable, sys.argv[2], 'runbus', '--endpoint', sys.argv[3]],"
        " stdout=log, stderr=subprocess.STDOUT)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(3600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", launcher, str(log_path), str(ROOT / "manage.py"), short_socket_path],
        env=processes.env(SUPERVISED="true"),
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    processes.started.append(parent)
    try:
        bus_pid = int(parent.stdout.readline())
        peer.handshake(slots=6)
        peer.recv_many("assign", 6)
        wait_until(lambda: running_count() == 6, timeout=10, message="6 running")

        parent.kill()
        parent.wait(5)
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 6,
            timeout=2,
            interval=0.01,
            message="jobs requeued within 2 s of the supervisor's death",
        )
        reason = JobEvent.objects.filter(job_id__in=ids, kind="interrupt").values_list("reason", flat=True).first()
        assert reason == "supervisor process gone"
        wait_until(lambda: not _alive(bus_pid), timeout=10, message="runbus exited")
        output = log_path.read_text()
        assert "event=bus.supervisor_lost" in output and "supervisor_lost=True" in output
    finally:
        peer.shutdown()
        if _alive(bus_pid if "bus_pid" in locals() else -1):
            os.kill(bus_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_runserver_connects_before_any_request_and_keeps_serving_without_a_crawler(processes, short_socket_path):
    port = free_port()
    peer = CrawlerPeer(short_socket_path)
    try:
        server = processes.manage(
            "runserver", f"127.0.0.1:{port}", env=processes.env(BUS_ENDPOINTS=short_socket_path, BUS_BACKOFF_CAP="1")
        )
        hello = peer.handshake(slots=1, timeout=30)  # no HTTP request has been made yet
        assert hello["type"] == "hello"
        # The autoreloader's watcher process must not run a second bus.
        peer.listener.settimeout(1.0)
        with pytest.raises(TimeoutError):
            peer.listener.accept()

        def page_ok() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/admin/login/", timeout=5) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(page_ok, timeout=20, message="the server serves pages")
        peer.close()
        assert page_ok(), "the server stopped serving when the crawler went away"
        peer.handshake(slots=1, timeout=10)  # reconnects within the backoff cap
        assert page_ok()
        assert server.poll() is None
    finally:
        peer.shutdown()


@pytest.mark.parametrize(
    "command",
    [
        ["migrate", "--noinput"],
        [
            "shell",
            "-c",
            "import threading, time; time.sleep(1); print('THREADS', sorted(t.name for t in threading.enumerate()))",
        ],
    ],
)
def test_management_commands_start_no_bus(processes, short_socket_path, command):
    peer = CrawlerPeer(short_socket_path)
    try:
        proc = processes.manage(*command, env=processes.env(BUS_ENDPOINTS=short_socket_path))
        assert proc.wait(timeout=60) == 0, processes.output(proc)
        output = processes.output(proc)
        assert "event=bus.started" not in output
        if command[0] == "shell":
            threads = output.split("THREADS", 1)[1]
            assert "bus" not in threads
        peer.listener.settimeout(0.2)
        with pytest.raises(TimeoutError):
            peer.listener.accept()
    finally:
        peer.shutdown()


def test_pytest_itself_starts_no_bus_thread():
    from bus.runtime import background_bus

    assert background_bus() is None
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("bus")]


def test_runserver_sigterm_says_bye_and_requeues_its_sessions_jobs(processes, short_socket_path):
    ids = enqueue(3)
    peer = CrawlerPeer(short_socket_path)
    try:
        server = processes.manage(
            "runserver", "--noreload", f"127.0.0.1:{free_port()}", env=processes.env(BUS_ENDPOINTS=short_socket_path)
        )
        peer.handshake(slots=3, timeout=30)
        peer.recv_many("assign", 3)
        wait_until(lambda: running_count() == 3, timeout=10, message="3 running")
        server.send_signal(signal.SIGTERM)
        assert peer.recv("bye", timeout=10)["reason"] == "bus shutdown"
        assert server.wait(timeout=10) == 0
        assert "Traceback" not in processes.output(server)
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status=Status.QUEUED).count() == 3,
            timeout=5,
            message="the server's jobs requeued",
        )
    finally:
        peer.shutdown()


@pytest.mark.parametrize("preload", [False, True], ids=["workers-load-app", "preload"])
def test_gunicorn_workers_each_run_a_bus_and_the_master_none(processes, short_socket_path, preload):
    """Each worker is a bus node of the fleet; the crawler is owned by one of them, with one session."""
    crawler = processes.manage("runcrawler", "--listen", short_socket_path, "--slots", "4", "--noop")
    wait_until(lambda: os.path.exists(short_socket_path), timeout=20, message="crawler listening")
    ids = enqueue(6)
    args = [sys.executable, "-m", "gunicorn", "-w", "2", "-b", f"127.0.0.1:{free_port()}", "jobsite.wsgi"]
    if preload:
        args.insert(3, "--preload")
    log = open(processes.tmp_path / "gunicorn.log", "wb")
    master = subprocess.Popen(
        args,
        cwd=ROOT,
        env=processes.env(BUS_ENDPOINTS=short_socket_path),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    processes.started.append(master)
    try:
        wait_until(lambda: BusNode.objects.count() == 2, timeout=30, message="one bus node per gunicorn worker")
        pids = set(BusNode.objects.values_list("pid", flat=True))
        assert master.pid not in pids and len(pids) == 2
        wait_until(lambda: BusSession.objects.open().count() == 1, timeout=10, message="the crawler's one session")
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status=Status.SUCCEEDED).count() == 6,
            timeout=20,
            message="the workers' buses run the jobs",
        )
    finally:
        master.send_signal(signal.SIGTERM)
        master.wait(timeout=20)
    assert crawler.poll() is None
    # Workers exit through atexit: each bus says bye and closes its session.
    wait_until(lambda: not BusSession.objects.open().exists(), timeout=10, message="sessions closed")
    assert set(BusSession.objects.values_list("state", flat=True)) == {"closed"}
