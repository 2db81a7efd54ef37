"""Politeness with real processes: several buses and crawlers, a crawler SIGKILLed midway, a real 429.

The invariants are checked from the database's own event timestamps (a
claim event is a start; the outcome or interrupt event of the same attempt
is its end): per host, no two starts closer than the delay, and never more
jobs in flight than the concurrency.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
from collections import defaultdict

import pytest

from jobs import services
from jobs.models import EventKind, Host, Job, JobEvent, Status
from tests.conftest import wait_until
from tests.test_fleet import runbus, start_crawler

pytestmark = pytest.mark.django_db(transaction=True)


def starts_and_spans(job_ids):
    """Per host: the claim times, and the (start, end) span of every attempt."""
    hosts = dict(Job.objects.filter(id__in=job_ids).values_list("id", "host__key"))
    starts: dict[str, list] = defaultdict(list)
    begun: dict[tuple[int, int], object] = {}
    spans: dict[str, list] = defaultdict(list)
    ends = (EventKind.OUTCOME, EventKind.INTERRUPT)
    for event in JobEvent.objects.filter(job_id__in=job_ids).order_by("at", "id"):
        key = (event.job_id, event.attempt)
        if event.kind == EventKind.CLAIM:
            starts[hosts[event.job_id]].append(event.at)
            begun[key] = event.at
        elif event.kind in ends and key in begun:
            spans[hosts[event.job_id]].append((begun.pop(key), event.at))
    for (job_id, _), at in begun.items():  # still running: open to the end
        spans[hosts[job_id]].append((at, None))
    return starts, spans


def most_in_flight(spans) -> int:
    points = []
    for start, end in spans:
        points.append((start, 1))
        if end is not None:
            points.append((end, -1))
    points.sort(key=lambda point: (point[0], point[1]))  # an end at the same instant comes first
    level = most = 0
    for _, step in points:
        level += step
        most = max(most, level)
    return most


def test_delay_and_concurrency_hold_across_two_buses_and_three_crawlers_with_one_killed(processes, short_socket_path):
    delay, concurrency = 0.2, 2
    folder = os.path.dirname(short_socket_path)
    paths = [os.path.join(folder, f"c{i}.sock") for i in range(3)]
    logs = [start_crawler(processes, path, "--slots", "6", "--noop", "--noop-delay-ms", "500") for path in paths]
    urls = [f"https://site{h}.example/{i}" for h in range(4) for i in range(7)]
    ids = [job.id for job in services.enqueue_many(urls=urls, actor="test")]
    settings = dict(HOST_DELAY=str(delay), HOST_CONCURRENCY=str(concurrency), BUS_ENDPOINTS=",".join(paths))
    for _ in range(2):
        runbus(processes, **settings)
    crawler_procs = processes.started[:3]
    wait_until(lambda: sum(len(log.assigns()) for log in logs) >= 6, timeout=60, message="jobs started")

    def busy_crawler():
        for index, path in enumerate(paths):
            if Job.objects.running().filter(id__in=ids, crawler=f"unix:{path}").exists():
                return index
        return None

    wait_until(lambda: busy_crawler() is not None, timeout=30, message="a crawler with jobs running")
    crawler_procs[busy_crawler()].send_signal(signal.SIGKILL)
    wait_until(
        lambda: Job.objects.filter(id__in=ids, status=Status.SUCCEEDED).count() == len(ids),
        timeout=120,
        message="every job done",
    )
    starts, spans = starts_and_spans(ids)
    assert set(starts) == {f"site{h}.example" for h in range(4)}
    for key, times in starts.items():
        gaps = [(later - earlier).total_seconds() for earlier, later in zip(times, times[1:])]
        assert min(gaps) >= delay, f"{key}: two starts {min(gaps):.4f} s apart"
        assert most_in_flight(spans[key]) <= concurrency, key
    # The kill was felt: some attempt was interrupted and its job ran again.
    assert JobEvent.objects.filter(job_id__in=ids, kind=EventKind.INTERRUPT).exists()
    assert services.repair_hosts().total == 0


class TooManyRequests(http.server.ThreadingHTTPServer):
    """/slow answers 429 with Retry-After the first time; every request is logged with its time."""

    def __init__(self, retry_after: str):
        self.requests: list[tuple[float, str]] = []
        self.retry_after = retry_after
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with server.lock:
                    first = not any(path == self.path for _, path in server.requests)
                    server.requests.append((time.time(), self.path))
                if self.path == "/slow" and first:
                    self.send_response(429)
                    self.send_header("Retry-After", server.retry_after)
                else:
                    self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


def test_a_429_with_retry_after_stops_the_whole_host_for_that_long(processes, short_socket_path):
    server = TooManyRequests(retry_after="2")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        slow = services.enqueue(url=f"{base}/slow", actor="test")
        start_crawler(processes, short_socket_path, "--slots", "4", "--allow-private")
        runbus(processes, short_socket_path, HOST_DELAY="0")
        wait_until(lambda: server.requests, timeout=60, message="the first request")
        others = services.enqueue_many(urls=[f"{base}/other{i}" for i in range(3)], actor="test")
        ids = [slow.id, *(job.id for job in others)]
        wait_until(
            lambda: Job.objects.filter(id__in=ids, status=Status.SUCCEEDED).count() == len(ids),
            timeout=60,
            message="every job done",
        )
        first_at = server.requests[0][0]
        later = [at for at, _ in server.requests[1:]]
        assert later and min(later) - first_at >= 2.0, [(at - first_at, path) for at, path in server.requests]
        job = Job.objects.get(id=slow.id)
        assert (job.failures, job.backoffs, job.attempt) == (0, 1, 2)
        host = Host.objects.get(id=job.host_id)
        assert "HTTP 429" in host.backoff_reason and "Retry-After 2" in host.backoff_reason
        assert JobEvent.objects.filter(job_id=slow.id, reason__contains="backing off").exists()
    finally:
        server.shutdown()
        server.server_close()
