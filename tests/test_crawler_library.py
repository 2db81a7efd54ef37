"""The crawler library's own APIs over real sockets: sync handlers in a pool, asyncio handlers, the package.

A tiny bus client (tests/test_crawler.py's BusClient, jobsite_crawler/wire.py
only) plays the bus against a Crawler running in a thread.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from jobsite_crawler import AsyncCrawler, Job, JobFailed
from jobsite_crawler.wire import assign_frame, cancel_frame
from tests.conftest import ROOT, wait_until
from tests.test_crawler import BusClient, ack, address_of, clients, crawlers  # noqa: F401  (fixtures)


def test_a_handler_gets_the_job_with_payload_and_kind_and_its_dict_is_the_result(crawlers, clients):
    seen: list[Job] = []

    def handle(job: Job) -> dict:
        seen.append(job)
        return {"url": job.url, "pages": job.payload["pages"], "kind": job.kind}

    crawler = crawlers(handler=handle, kinds=["news"])
    client = clients(address_of(crawler))
    ready = client.handshake()
    assert ready["kinds"] == ["news"]
    client.send(assign_frame(5, 2, url="https://example.org/a", payload={"pages": 3}, kind="news"))
    client.expect("started", job_id=5, attempt=2)
    done = client.expect("done", job_id=5, attempt=2)
    assert done["result"] == {"url": "https://example.org/a", "pages": 3, "kind": "news"}
    assert seen[0].attempt == 2


def test_job_failed_carries_retryable_and_the_politeness_fields(crawlers, clients):
    def handle(job: Job) -> dict:
        raise JobFailed("slow down", retryable=True, status=429, retry_after=30.0)

    client = clients(address_of(crawlers(handler=handle)))
    client.handshake()
    client.send(assign_frame(6, 1, url="https://example.org/", payload={}))
    failed = client.expect("failed", job_id=6)
    assert failed["error"] == "slow down"
    assert failed["retryable"] is True
    assert failed["status"] == 429
    assert failed["retry_after"] == 30.0
    assert "cause" not in failed  # optional fields that are not set stay absent


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        (["not", "a", "dict"], "the handler returned a list, not a dict"),
        ({"when": object()}, "the result is not JSON"),
        ({"blob": "x" * 70_000}, "exceeds the limit of 65536"),
    ],
    ids=["not-a-dict", "not-json", "too-big-for-a-frame"],
)
def test_a_result_the_bus_could_not_take_fails_the_job_instead_of_breaking_the_session(
    crawlers, clients, returned, error
):
    crawler = crawlers(handler=lambda job: returned, max_frame=65536)
    client = clients(address_of(crawler))
    client.handshake()
    client.send(assign_frame(7, 1, url="https://example.org/", payload={}))
    failed = client.expect("failed", job_id=7)
    assert error in failed["error"]
    assert failed["retryable"] is False  # the same handler would fail every attempt
    ack(client, 7)
    client.send(assign_frame(8, 1, url="https://example.org/", payload={}))
    client.expect("failed", job_id=8)  # the session is still serving


def test_a_crashing_handler_fails_its_job_and_the_pool_keeps_serving(crawlers, clients):
    def handle(job: Job) -> dict:
        if job.id == 1:
            raise KeyError("boom")
        return {"ok": True}

    client = clients(address_of(crawlers(handler=handle)))
    client.handshake()
    client.send(assign_frame(1, 1, url="https://example.org/1", payload={}))
    client.send(assign_frame(2, 1, url="https://example.org/2", payload={}))
    assert "KeyError" in client.expect("failed", job_id=1)["error"]
    assert client.expect("done", job_id=2)["result"] == {"ok": True}


def test_progress_goes_out_with_the_heartbeat_ticks_and_only_when_it_changed(crawlers, clients):
    reported = threading.Event()
    release = threading.Event()

    def handle(job: Job) -> dict:
        job.progress(done=1, total=4, message="first page")
        job.progress(done=2, total=4)  # only the latest report is sent
        reported.set()
        release.wait(10)
        return {}

    client = clients(address_of(crawlers(handler=handle)))
    client.handshake(heartbeat=0.2)
    client.send(assign_frame(3, 1, url="https://example.org/", payload={}))
    assert reported.wait(10)
    progress = client.expect("progress", job_id=3, attempt=1)
    assert (progress["done"], progress["total"], "message" in progress) == (2, 4, False)
    client.expect("heartbeat", timeout=5)
    client.expect("heartbeat", timeout=5)  # two more ticks: the same report is not sent again
    assert client.take("progress") == []
    release.set()
    client.expect("done", job_id=3)


def test_a_cancelled_handler_sends_nothing_and_frees_its_thread(crawlers, clients):
    started = threading.Event()

    def handle(job: Job) -> dict:
        started.set()
        job.cancellation.wait(10)
        return {"finished": "late"}  # dropped: the job was cancelled

    crawler = crawlers(handler=handle)
    client = clients(address_of(crawler))
    client.handshake(heartbeat=0.2)
    client.send(assign_frame(4, 1, url="https://example.org/", payload={}))
    assert started.wait(10)
    client.send(cancel_frame(4, 1))
    wait_until(lambda: crawler.runner.busy == 0, message="the handler to return")
    client.expect("heartbeat", timeout=5)
    client.expect("heartbeat", timeout=5)
    assert client.take("done") == [] and client.take("failed") == []


def test_set_slots_sends_capacity_and_drain_finishes_the_running_jobs_then_stops(crawlers, clients):
    release = threading.Event()

    def handle(job: Job) -> dict:
        release.wait(10)
        return {"drained": True}

    crawler = crawlers(handler=handle, slots=3)
    client = clients(address_of(crawler))
    client.handshake(heartbeat=0.5)
    client.send(assign_frame(9, 1, url="https://example.org/", payload={}))
    client.expect("started", job_id=9)

    crawler.drain(timeout=20)
    assert client.expect("capacity")["slots"] == 0
    release.set()
    client.expect("done", job_id=9)
    assert crawler.session_count() == 1  # still serving: the outcome is not acked yet
    ack(client, 9)
    client.wait_closed()
    assert crawler.unacked_outcomes() == []


def test_the_asyncio_api_runs_handlers_as_tasks_and_a_cancel_cancels_the_task(short_socket_path):
    cancelled = threading.Event()

    async def handle(job: Job) -> dict:
        if job.payload.get("hang"):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
        await asyncio.sleep(0.01)
        return {"loop": type(asyncio.get_running_loop()).__name__, "id": job.id}

    crawler = AsyncCrawler(handler=handle, endpoints=[short_socket_path], slots=4, name="async")
    results: list[BaseException | None] = []

    def run() -> None:
        try:
            asyncio.run(crawler.serve())
            results.append(None)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results.append(exc)

    thread = threading.Thread(target=run, name="test-async-crawler")
    thread.start()
    try:
        assert crawler.listening.wait(10)
        client = BusClient(short_socket_path)
        client.handshake(heartbeat=0.5)
        client.send(assign_frame(1, 1, url="https://example.org/", payload={"hang": True}))
        client.send(assign_frame(2, 1, url="https://example.org/", payload={}))
        assert client.expect("done", job_id=2)["result"]["id"] == 2
        client.send(cancel_frame(1, 1))
        assert cancelled.wait(10), "the cancel did not cancel the handler's task"
        client.close()
    finally:
        crawler.stop()
        thread.join(15)
    assert not thread.is_alive()
    assert results == [None]


@pytest.mark.timeout(180)
def test_pip_installs_the_crawler_package_without_django_and_it_runs(tmp_path):
    """A crawler machine: a fresh venv, `pip install` from the checkout, no Django, `jobsite-crawler` serves."""
    source = tmp_path / "src"
    source.mkdir()
    shutil.copy(ROOT / "pyproject.toml", source)
    shutil.copytree(ROOT / "jobsite_crawler", source / "jobsite_crawler", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.util, sys, jobsite_crawler, jobsite_crawler.cli, jobsite_crawler.conformance\n"
            "print(importlib.util.find_spec('django') is None, sorted({m.split('.')[0] for m in sys.modules} & "
            "{'django', 'jobs', 'bus', 'jobsite'}))",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the checkout: the installed package is what is imported
        timeout=60,
    )
    assert probe.stdout.split() == ["True", "[]"], probe.stderr
    socket_path = Path(f"/tmp/jc-{os.getpid()}-{time.monotonic_ns() % 10**6}.sock")
    env = {key: value for key, value in os.environ.items() if key not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")}
    process = subprocess.Popen(
        [str(venv / "bin" / "jobsite-crawler"), "--listen", f"unix:{socket_path}", "--slots", "2", "--noop"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: socket_path.exists() or process.poll() is not None, message="the crawler to listen")
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        client = BusClient(str(socket_path))
        assert client.handshake()["slots"] == 2
        client.send(assign_frame(1, 1, url="https://example.org/", payload={}))
        assert client.expect("done", job_id=1)["result"] == {"noop": True}
        client.close()
    finally:
        process.terminate()
        assert process.wait(15) == 0
        if process.stderr:
            process.stderr.close()
