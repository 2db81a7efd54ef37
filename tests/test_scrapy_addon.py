"""The Scrapy add-on with real processes: `scrapy crawl` of tests/scrapy_project, real buses, a real site.

Each crawler is a stock Scrapy project with the add-on in ADDONS and its
socket in JOBSITE_LISTEN; the site (tests/scrapy_site.py) runs on loopback
in this process, so its structure says how many items each job must yield.
"""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys

import pytest

from jobs import services
from jobs.models import BusSession, EventKind, Job, JobEvent, JobItems, Status
from tests.conftest import ROOT, wait_until
from tests.scrapy_site import TREE_PAGES, SiteServer
from tests.test_fleet import ConnectionLog, runbus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

PROJECT = ROOT / "tests" / "scrapy_project"
# A tree job yields TREE_PAGES items from these requests: its own, 2 from page 0,
# 2 from page 1 (one a duplicate of the job's URL), 2 from page 2, 1 from page 3
# and 1 from /shared (a duplicate of itself); duplicates are requests made too.
TREE_REQUESTS = 9


def start_scrapy(processes, path: str, *settings: str) -> tuple[subprocess.Popen, ConnectionLog]:
    """`scrapy crawl site` listening on unix:`path`; extra `NAME=value` settings go to -s."""
    log = ConnectionLog(processes.tmp_path / f"scrapy-connections-{len(processes.started)}.jsonl")
    argv = [sys.executable, "-m", "scrapy", "crawl", "site", "-s", f"JOBSITE_LISTEN=unix:{path}"]
    argv += ["-s", f"JOBSITE_CONNECTION_LOG={log.path}"]
    for setting in settings:
        argv += ["-s", setting]
    output = open(processes.tmp_path / f"scrapy-{len(processes.started)}.log", "wb")
    proc = subprocess.Popen(
        argv,
        cwd=PROJECT,
        env=processes.env(PYTHONPATH=str(ROOT)),
        stdout=output,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output.close()
    proc.log_path = output.name  # type: ignore[attr-defined]
    processes.started.append(proc)
    wait_until(lambda: os.path.exists(path) or proc.poll() is not None, timeout=60, message="scrapy listening")
    assert proc.poll() is None, processes.output(proc)
    return proc, log


def scrapy_stats(text: str) -> dict:
    """The stats Scrapy dumps when the spider closes (a Python dict literal)."""
    match = re.search(r"Dumping Scrapy stats:\n(\{.*?\})\n", text, re.S)
    assert match, text[-3000:]
    return ast.literal_eval(re.sub(r"datetime\.datetime\([^)]*\)", "None", match.group(1)))


def outcome_counts(ids: list[int]) -> dict[int, int]:
    counts = dict.fromkeys(ids, 0)
    for job_id in JobEvent.objects.filter(job_id__in=ids, kind=EventKind.OUTCOME).values_list("job_id", flat=True):
        counts[job_id] += 1
    return counts


def socket_paths(short_socket_path: str, count: int) -> list[str]:
    folder = os.path.dirname(short_socket_path)
    return [os.path.join(folder, f"s{i}.sock") for i in range(count)]


@pytest.mark.timeout(240)
def test_500_jobs_on_three_scrapy_crawlers_one_sigkilled_none_lost_none_twice_items_as_yielded(
    processes, short_socket_path
):
    paths = socket_paths(short_socket_path, 3)
    with SiteServer() as site:
        crawlers = [start_scrapy(processes, path, "JOBSITE_STORE_ITEMS=True") for path in paths]
        ids = [job.id for job in services.enqueue_many(urls=[site.url(f"/t/{n}/0") for n in range(500)], actor="test")]
        runbus(processes, *paths)
        victim, victim_log = crawlers[0]
        victim_endpoint = f"unix:{paths[0]}"
        wait_until(
            lambda: (
                Job.objects.filter(id__in=ids, status=Status.SUCCEEDED).count() >= 100
                and Job.objects.running().filter(crawler=victim_endpoint).exists()
            ),
            timeout=120,
            message="100 jobs done and the victim running some",
        )
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait(10)
        # Its jobs are requeued when its session ends (the socket closes), not at a lease's end.
        wait_until(
            lambda: not Job.objects.running().filter(crawler=victim_endpoint).exists(),
            timeout=5,
            message="the killed crawler's jobs requeued",
        )
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status=Status.SUCCEEDED).count() == len(ids),
            timeout=150,
            interval=0.2,
            message="every job done",
        )
    jobs = list(Job.objects.filter(id__in=ids))
    assert {job.status for job in jobs} == {Status.SUCCEEDED}
    assert any(job.attempt > 1 for job in jobs), "the kill interrupted no job: it proved nothing"
    assert set(outcome_counts(ids).values()) == {1}  # none lost, none recorded twice
    for job in jobs:
        assert job.result == {"items": TREE_PAGES, "requests": TREE_REQUESTS, "errors": 0, "status": 200}, job.result
    # What the spider yielded, item by item: each job's own pages, the job id it saw in meta.
    stored = {row.job_id: row for row in JobItems.objects.filter(job_id__in=ids)}
    assert set(stored) == set(ids)
    for job in jobs:
        row = stored[job.id]
        items = [json.loads(line) for line in row.lines.splitlines()]
        assert row.count == TREE_PAGES and not row.truncated and row.attempt == job.attempt
        n = job.url.rstrip("/").split("/")[-2]
        expected = {site.url(f"/t/{n}/{i}") for i in range(4)} | {site.url("/shared")}
        assert {item["url"] for item in items} == expected
        assert {item["job"] for item in items} == {job.id}
    # The survivors never held more jobs at once than their slots (CONCURRENT_REQUESTS, 16).
    for _, log in crawlers[1:]:
        assert log.max_running() <= 16
    assert victim_log.assigns()


@pytest.mark.timeout(120)
def test_cancel_drops_the_jobs_pending_requests_and_outputs_and_sends_no_outcome(processes, short_socket_path):
    [path] = socket_paths(short_socket_path, 1)
    with SiteServer() as site:
        proc, log = start_scrapy(processes, path)
        [job] = services.enqueue_many(urls=[site.url("/fan/c?k=60")], actor="test")
        runbus(processes, path)
        wait_until(lambda: len(site.paths("/held/")) >= 8, timeout=60, message="held pages in flight")
        services.cancel_jobs(job_ids=[job.id], actor="test")
        wait_until(
            lambda: any(e["event"] == "finish" and e.get("status") == "stopped" for e in log.events()),
            timeout=10,
            message="the crawler stopped the job",
        )
        site.release.set()
        [after] = services.enqueue_many(urls=[site.url("/t/after/0")], actor="test")
        wait_until(lambda: Job.objects.get(id=after.id).status == Status.SUCCEEDED, timeout=60, message="next job")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        fetched = len(site.paths("/held/"))
    job.refresh_from_db()
    assert job.status == Status.CANCELLED
    assert outcome_counts([job.id]) == {job.id: 0}
    stats = scrapy_stats(processes.output(proc))
    dropped = stats.get("downloader/exception_type_count/scrapy.exceptions.IgnoreRequest", 0)
    # At most what the downloader had taken in (CONCURRENT_REQUESTS) was fetched; the rest was dropped.
    assert fetched <= 16 and dropped >= 60 - 16, (fetched, dropped)
    assert fetched + dropped <= 60
    # The cancelled job's responses that came back after the cancel yielded nothing: 1 item of the
    # job's own page (before the cancel) and the next job's TREE_PAGES.
    assert stats["item_scraped_count"] == 1 + TREE_PAGES


@pytest.mark.timeout(120)
def test_sigterm_drains_running_jobs_takes_no_new_ones_and_exits_0(processes, short_socket_path):
    [path] = socket_paths(short_socket_path, 1)
    endpoint = f"unix:{path}"
    with SiteServer() as site:
        proc, log = start_scrapy(processes, path, "CONCURRENT_REQUESTS=3")
        running = services.enqueue_many(urls=[site.url(f"/drain/{n}") for n in range(3)], actor="test")
        runbus(processes, path)
        wait_until(lambda: len(site.paths("/held/")) >= 3, timeout=60, message="the 3 jobs wait on held pages")
        waiting = services.enqueue_many(urls=[site.url(f"/t/w{n}/0") for n in range(2)], actor="test")
        proc.send_signal(signal.SIGTERM)
        wait_until(
            lambda: BusSession.objects.open().filter(endpoint=endpoint, slots=0).exists(),
            timeout=10,
            message="capacity 0 reached the bus",
        )
        site.release.set()
        assert proc.wait(60) == 0
    output = processes.output(proc)
    assert "Spider closed (jobsite_drained)" in output
    for job in running:
        job.refresh_from_db()
        assert job.status == Status.SUCCEEDED, (job.status, job.error)
        assert job.result["items"] == 4 and job.result["requests"] == 4
    assert outcome_counts([job.id for job in running]) == {job.id: 1 for job in running}
    for job in waiting:
        job.refresh_from_db()
        assert job.status == Status.QUEUED
        assert not JobEvent.objects.filter(job_id=job.id, kind=EventKind.CLAIM).exists()
    assert len(log.assigns()) == 3


@pytest.mark.timeout(120)
def test_with_robots_txt_obeyed_a_fleet_of_scrapy_crawlers_fetches_it_and_stored_items_are_capped(
    processes, short_socket_path
):
    [path] = socket_paths(short_socket_path, 1)
    with SiteServer() as site:
        start_scrapy(processes, path, "JOBSITE_STORE_ITEMS=True", "JOBSITE_ITEMS_MAX=3")
        tree, private, redirected = services.enqueue_many(
            urls=[site.url("/t/r/0"), site.url("/private/p"), site.url("/redirect/q")], actor="test"
        )
        runbus(processes, path, ROBOTS_TXT="obey")
        ids = [tree.id, private.id, redirected.id]
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status__in=[Status.SUCCEEDED, Status.DISALLOWED]).count() == 3,
            timeout=60,
            message="the jobs end",
        )
        assert site.hits["/robots.txt"] == 1
        assert not site.paths("/private/")
    assert Job.objects.get(id=private.id).status == Status.DISALLOWED
    for job_id in (tree.id, redirected.id):
        job = Job.objects.get(id=job_id)
        assert job.status == Status.SUCCEEDED
        assert job.result["items"] == TREE_PAGES and job.result["status"] == 200
        assert job.result["items_truncated"] is True
        row = JobItems.objects.get(job_id=job_id)
        assert row.count == 3  # the crawler's cut; result["items_truncated"] says so
        assert all(json.loads(line)["job"] == job_id for line in row.lines.splitlines())


@pytest.mark.timeout(120)
def test_the_sites_answers_reach_the_bus_404_503_with_retry_after_and_network_failures(processes, short_socket_path):
    [path] = socket_paths(short_socket_path, 1)
    with SiteServer() as site:
        proc, _ = start_scrapy(processes, path, "RETRY_ENABLED=False")
        port = site.base.rsplit(":", 1)[1]
        # Three hosts: a back-off of one must not hold the others back.
        missing, unavailable, unreachable = services.enqueue_many(
            urls=[site.url("/status/404"), f"http://localhost:{port}/status/503", "http://127.0.0.1:1/x"],
            actor="test",
        )
        runbus(processes, path)

        def backed_off(job_id: int) -> str:
            job = Job.objects.get(id=job_id)
            return job.error if job.status == Status.QUEUED and job.backoffs >= 1 else ""

        wait_until(lambda: Job.objects.get(id=missing.id).status == Status.SUCCEEDED, timeout=60, message="404 done")
        assert "Retry-After 30" in wait_until(lambda: backed_off(unavailable.id), timeout=30, message="503 back-off")
        assert "connection" in wait_until(lambda: backed_off(unreachable.id), timeout=30, message="network back-off")
    missing.refresh_from_db()
    assert missing.result == {"items": 0, "requests": 1, "errors": 0, "status": 404}
    for job_id in (unavailable.id, unreachable.id):
        assert Job.objects.get(id=job_id).failures == 0  # sent back without spending an attempt
    assert proc.poll() is None


@pytest.mark.timeout(120)
def test_slots_follow_concurrent_requests_unless_jobsite_slots_says_otherwise(processes, short_socket_path):
    from tests.test_crawler import BusClient

    default, chosen = socket_paths(short_socket_path, 2)
    start_scrapy(processes, default, "CONCURRENT_REQUESTS=3")
    start_scrapy(processes, chosen, "CONCURRENT_REQUESTS=3", "JOBSITE_SLOTS=7")
    for path, slots in ((default, 3), (chosen, 7)):
        client = BusClient(path)
        try:
            ready = client.handshake()
            assert ready is not None and ready["slots"] == slots
            assert ready["kinds"] == ["site"]  # the spider's name
        finally:
            client.close()
