"""robots.txt (jobs.robots): who is asked, what an answer means, and that a disallowed URL is never assigned."""

from __future__ import annotations

import http.server
import threading
import uuid
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from jobs import robots, services
from jobs.models import EventKind, Host, Job, JobEvent, RobotsState, Status
from tests.conftest import wait_until

obey = override_settings(ROBOTS_TXT="obey", ROBOTS_TTL=3600.0, HOST_DELAY=0.0, HOST_CONCURRENCY=100)

RULES = "User-agent: *\nDisallow: /private\nCrawl-delay: 3\n\nUser-agent: other-bot\nDisallow: /\n"


def enqueue(*paths, host="a.example"):
    return services.enqueue_many(urls=[f"https://{host}{path}" for path in paths], actor="test")


def claim(at=None, session=None, limit=100):
    return services.claim_jobs(session=session or uuid.uuid4(), limit=limit, lease_seconds=600, crawler="c", at=at)


def answer(status, body="", host="a.example", at=None):
    session = uuid.uuid4()
    asked = robots.claim_fetches(session=session, limit=10, at=at)
    assert host in [request.host for request in asked], asked
    return robots.record_answer(session=session, host=host, status=status, body=body, at=at)


@pytest.mark.django_db
@obey
def test_a_host_waits_for_its_robots_txt_then_its_rules_apply():
    allowed, private = enqueue("/page", "/private/x")
    assert claim() == []  # robots.txt not known yet
    result = answer(200, RULES)
    assert (result.recorded, result.disallowed) == (True, 1)
    host = Host.objects.get(key="a.example")
    assert (host.robots_state, host.crawl_delay, host.robots_status) == (RobotsState.ALLOWED, 3.0, 200)
    refused = Job.objects.get(id=private.id)
    assert (refused.status, "disallows" in refused.error) == (Status.DISALLOWED, True)
    assert JobEvent.objects.filter(job_id=private.id, kind=EventKind.ROBOTS, to_status=Status.DISALLOWED).exists()
    assert [job.id for job in claim()] == [allowed.id]
    assert host.crawl_delay == 3.0
    assert Host.objects.get(key="a.example").next_start_at is not None


@pytest.mark.django_db
@obey
def test_a_url_enqueued_after_the_rules_arrived_is_ended_by_the_claim_never_assigned():
    enqueue("/first")
    answer(200, "User-agent: *\nDisallow: /private\n")
    later = enqueue("/private/late")[0]
    claimed = claim()
    assert later.id not in [job.id for job in claimed]
    job = Job.objects.get(id=later.id)
    assert (job.status, job.lease_session) == (Status.DISALLOWED, None)
    assert services.repair_hosts().total == 0


@pytest.mark.django_db
@obey
def test_crawl_delay_raises_the_hosts_delay():
    enqueue("/1", "/2")
    answer(200, "User-agent: *\nCrawl-delay: 5\n")
    at = timezone.now()
    assert len(claim(at)) == 1
    assert claim(at + timedelta(seconds=4.9)) == []
    assert len(claim(at + timedelta(seconds=5))) == 1


@pytest.mark.django_db
@obey
@pytest.mark.parametrize("status, crawlable", [(404, True), (410, True), (503, False), (0, False)])
def test_unavailable_allows_all_unreachable_allows_nothing(status, crawlable):
    enqueue("/private/1")
    answer(status)
    assert bool(claim()) == crawlable


@pytest.mark.django_db
@obey
def test_an_unreachable_robots_txt_is_asked_again_later_and_less_often():
    enqueue("/1")
    at = timezone.now()
    answer(503, at=at)
    assert robots.claim_fetches(session=uuid.uuid4(), limit=10, at=at + timedelta(seconds=59)) == []
    answer(0, at=at + timedelta(seconds=60))
    host = Host.objects.get(key="a.example")
    assert host.robots_due_at == at + timedelta(seconds=180)  # 60 s, then 120 s
    answer(200, "User-agent: *\nAllow: /\n", at=at + timedelta(seconds=180))
    assert len(claim()) == 1


@pytest.mark.django_db
@obey
def test_one_fetch_per_host_per_ttl_across_sessions_and_only_the_asked_session_may_answer():
    enqueue("/1")
    first, second = uuid.uuid4(), uuid.uuid4()
    at = timezone.now()
    assert [r.url for r in robots.claim_fetches(session=first, limit=5, at=at)] == ["https://a.example/robots.txt"]
    assert robots.claim_fetches(session=second, limit=5, at=at) == []  # leased to the first
    forged = robots.record_answer(session=second, host="a.example", status=404, at=at)
    assert not forged.recorded
    assert Host.objects.get(key="a.example").robots_state == RobotsState.UNKNOWN
    assert robots.record_answer(session=first, host="a.example", status=404, at=at).recorded
    assert robots.claim_fetches(session=second, limit=5, at=at + timedelta(seconds=3599)) == []
    assert len(robots.claim_fetches(session=second, limit=5, at=at + timedelta(seconds=3600))) == 1


@pytest.mark.django_db
@obey
def test_a_session_that_ends_gives_its_unanswered_requests_back():
    enqueue("/1")
    session = uuid.uuid4()
    assert robots.claim_fetches(session=session, limit=5)
    assert robots.release_fetches(session=session) == 1
    assert robots.claim_fetches(session=uuid.uuid4(), limit=5)


@pytest.mark.django_db
@obey
def test_rules_are_matched_for_crawler_user_agent():
    enqueue("/page")
    with override_settings(CRAWLER_USER_AGENT="other-bot/2"):
        answer(200, RULES)
    assert Job.objects.get().status == Status.DISALLOWED


@pytest.mark.django_db
@obey
def test_a_disallowed_job_can_be_retried_by_a_person():
    job = enqueue("/private/1")[0]
    answer(200, RULES)
    assert services.retry_jobs(job_ids=[job.id], actor="test").changed == 1
    assert Job.objects.get(id=job.id).status == Status.QUEUED


@pytest.mark.django_db
@override_settings(ROBOTS_TXT="ignore", HOST_DELAY=0.0)
def test_ignored_robots_txt_asks_for_nothing_and_holds_nothing_back():
    enqueue("/private/1")
    assert robots.claim_fetches(session=uuid.uuid4(), limit=5) == []
    assert len(claim()) == 1


# --- with real processes ------------------------------------------------------------------------


class Site(http.server.ThreadingHTTPServer):
    """A site with a robots.txt; every request is logged."""

    def __init__(self, robots_txt: str):
        self.paths: list[str] = []
        self.lock = threading.Lock()
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                with site.lock:
                    site.paths.append(self.path)
                body = robots_txt.encode() if self.path == "/robots.txt" else b"<title>page</title>"
                self.send_response(200)
                self.send_header("Content-Type", "text/plain" if self.path == "/robots.txt" else "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()


@pytest.mark.django_db(transaction=True)
def test_three_crawlers_fetch_robots_txt_once_for_50_jobs_and_never_a_disallowed_url(processes, short_socket_path):
    import os

    from tests.test_fleet import runbus, start_crawler

    site = Site("User-agent: *\nDisallow: /private\n")
    try:
        base = f"http://127.0.0.1:{site.server_address[1]}"
        folder = os.path.dirname(short_socket_path)
        paths = [os.path.join(folder, f"r{i}.sock") for i in range(3)]
        for path in paths:
            start_crawler(processes, path, "--slots", "4", "--allow-private")
        urls = [f"{base}/private/{i}" if i % 5 == 0 else f"{base}/page/{i}" for i in range(50)]
        ids = [job.id for job in services.enqueue_many(urls=urls, actor="test")]
        settings = dict(ROBOTS_TXT="obey", HOST_DELAY="0", BUS_ENDPOINTS=",".join(paths))
        for _ in range(2):
            runbus(processes, **settings)
        wait_until(
            lambda: (
                Job.objects.filter(id__in=ids).exclude(status__in=[Status.SUCCEEDED, Status.DISALLOWED]).count() == 0
            ),
            timeout=90,
            message="every job succeeded or disallowed",
        )
        with site.lock:
            requested = list(site.paths)
        assert requested.count("/robots.txt") == 1, requested
        assert not [path for path in requested if path.startswith("/private")]
        counts = Job.objects.filter(id__in=ids).status_counts()
        assert (counts[Status.SUCCEEDED], counts[Status.DISALLOWED]) == (40, 10)
    finally:
        site.shutdown()
        site.server_close()


@pytest.mark.django_db(transaction=True)
def test_on_the_wire_only_a_crawler_that_offers_it_is_asked_and_only_for_what_it_was_asked(
    processes, short_socket_path
):
    """The extension of docs/protocol.md section 15, with a scripted crawler (tests/crawler_peer.py)."""
    from tests.crawler_peer import CrawlerPeer
    from tests.test_bus_protocol import probe, start_bus

    known = services.enqueue(url="https://known.example/page", actor="test")
    Host.objects.filter(key="known.example").update(
        robots_state=RobotsState.UNAVAILABLE, robots_due_at=timezone.now() + timedelta(days=1)
    )
    unknown = services.enqueue_many(urls=["https://new.example/page", "https://new.example/private/x"], actor="test")
    settings = dict(ROBOTS_TXT="obey", HOST_DELAY="0", BUS_POLL_INTERVAL="0.2")
    # A crawler that knows nothing of the extension: the known host's job, no robots frame.
    old = CrawlerPeer(short_socket_path)
    bus = start_bus(processes, short_socket_path, **settings)
    try:
        old.handshake(slots=4)
        assign = old.recv("assign", timeout=20)
        assert assign["job_id"] == known.id
        probe(old)  # everything the bus sent before the probe's answer has arrived: no robots frame, no other job
        assert [f for f in old.frames if f["type"] in ("robots", "assign")] == []
    finally:
        old.shutdown()
        bus.kill()
        bus.wait(timeout=10)
    assert Job.objects.filter(id__in=[job.id for job in unknown], status=Status.QUEUED).count() == 2
    # A crawler that offers it: asked for new.example's file, and only an answer for that host counts.
    new = CrawlerPeer(short_socket_path)
    bus = start_bus(processes, short_socket_path, **settings)
    try:
        new.handshake(slots=4, ready_extra={"robots": True})
        asked = new.recv("robots", timeout=20)
        assert (asked["host"], asked["url"]) == ("new.example", "https://new.example/robots.txt")
        new.send({"type": "robots", "host": "other.example", "status": 404})
        error = new.recv("error", timeout=10)
        assert error["code"] == "stale"
        new.send(
            {"type": "robots", "host": "new.example", "status": 200, "body": "User-agent: *\nDisallow: /private\n"}
        )
        assign = new.recv("assign", timeout=20)
        assert assign["url"] == "https://new.example/page"
        probe(new)
        assert [f for f in new.frames if f["type"] == "assign"] == []  # the disallowed URL is never assigned
    finally:
        new.shutdown()
        bus.kill()
        bus.wait(timeout=10)
    assert Job.objects.get(url="https://new.example/private/x").status == Status.DISALLOWED
    assert not Host.objects.filter(key="other.example").exists()  # the forged answer created nothing
