"""Ownership in the database (jobs.fleet) and the take-over's job moves (jobs.services), in process."""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import timedelta

import pytest

from bus.runtime import _quotas
from jobs import fleet, services
from jobs.models import BusNode, Crawler, CrawlerState, EventKind, Job, JobEvent, Status

pytestmark = pytest.mark.django_db

ENDPOINT = "unix:/tmp/owned.sock"


def renew(node: str, **kwargs):
    return fleet.renew_node(node=node, host="h", pid=1, lease_seconds=kwargs.pop("lease", 1.5), stopping=False)


def test_only_one_of_two_nodes_that_saw_the_same_epoch_acquires_the_endpoint():
    fleet.add_crawler(endpoint=ENDPOINT)
    fleet.add_crawler(endpoint="/tmp/second.sock")
    seen = {ENDPOINT: 0, "unix:/tmp/second.sock": 0}
    first = fleet.acquire(node="a", seen=seen)
    second = fleet.acquire(node="b", seen=seen)
    assert (first, second) == ({ENDPOINT: 1, "unix:/tmp/second.sock": 1}, {})
    crawler = Crawler.objects.get(endpoint=ENDPOINT)
    assert (crawler.owner, crawler.owner_epoch) == ("a", 1)
    assert fleet.owns(endpoint=ENDPOINT, epoch=1) and not fleet.owns(endpoint=ENDPOINT, epoch=0)
    # A batch wins the rows whose epoch is as seen and only those.
    Crawler.objects.filter(endpoint=ENDPOINT).update(owner="", owner_epoch=5)
    assert fleet.acquire(node="b", seen={ENDPOINT: 4, "unix:/tmp/second.sock": 1}) == {"unix:/tmp/second.sock": 2}


def test_a_release_by_a_stale_epoch_changes_nothing_and_a_drained_release_pauses_or_removes():
    fleet.add_crawler(endpoint=ENDPOINT)
    epoch = fleet.acquire(node="a", seen={ENDPOINT: 0})[ENDPOINT]
    assert not fleet.release(endpoint=ENDPOINT, node="a", epoch=epoch - 1)
    assert not fleet.release(endpoint=ENDPOINT, node="b", epoch=epoch)
    fleet.drain_crawler(endpoint=ENDPOINT)
    assert fleet.release(endpoint=ENDPOINT, node="a", epoch=epoch, then="paused")
    crawler = Crawler.objects.get(endpoint=ENDPOINT)
    assert (crawler.owner, crawler.state) == ("", CrawlerState.PAUSED)
    assert fleet.acquire(node="a", seen={ENDPOINT: epoch}) == {}  # paused: nobody owns it

    fleet.resume_crawler(endpoint=ENDPOINT)
    epoch = fleet.acquire(node="a", seen={ENDPOINT: epoch})[ENDPOINT]
    Crawler.objects.filter(endpoint=ENDPOINT).update(session=uuid.uuid4())  # a session is open: drains first
    assert not fleet.remove_crawler(endpoint=ENDPOINT, actor="test").removed
    assert fleet.release(endpoint=ENDPOINT, node="a", epoch=epoch, then="paused")
    assert not Crawler.objects.filter(endpoint=ENDPOINT).exists()


def test_renewal_extends_the_lease_in_database_time_and_reads_the_fleet():
    fleet.add_crawler(endpoint=ENDPOINT)
    view = renew("a")
    node = BusNode.objects.get(node="a")
    assert node.lease_expires_at - view.now == timedelta(seconds=1.5)
    assert [row.endpoint for row in view.crawlers] == [ENDPOINT]
    BusNode.objects.filter(node="a").update(lease_expires_at=view.now - timedelta(minutes=11))
    fleet.renew_node(node="b", host="h", pid=2, lease_seconds=1.5, stopping=False, forget=True)
    assert list(BusNode.objects.values_list("node", flat=True)) == ["b"]


@pytest.mark.parametrize(
    "endpoints, owned, expected",
    [
        (30, {}, [10, 10, 10]),
        (31, {"b": 12}, [10, 11, 10]),
        (1, {"c": 1}, [0, 0, 1]),  # one endpoint, many nodes: its owner keeps it
        (2, {}, [1, 1, 0]),
    ],
)
def test_quotas_are_even_and_give_the_remainder_to_the_nodes_that_own_the_most(endpoints, owned, expected):
    quotas = _quotas(endpoints, ["a", "b", "c"], Counter(owned))
    assert [quotas[node] for node in "abc"] == expected
    assert sum(quotas.values()) == endpoints


def claim_two(endpoint: str):
    old = uuid.uuid4()
    jobs = services.enqueue_many(urls=["https://example.com/1", "https://example.com/2"], actor="test")
    services.claim_jobs(session=old, limit=2, lease_seconds=60, crawler=endpoint)
    return old, [job.id for job in jobs]


def test_a_take_over_re_leases_the_listed_running_jobs_and_leaves_the_rest_to_requeue():
    old, (listed, dropped) = claim_two(ENDPOINT)
    new = uuid.uuid4()
    taken, refused = services.re_lease_jobs(
        session=new, running=[(listed, 1)], lease_seconds=60, crawler=ENDPOINT, take_over=True
    )
    assert (taken, refused) == ([(listed, 1)], [])
    counts = services.requeue_orphans(crawler=ENDPOINT, keep_session=new, actor="bus", reason="gone")
    assert counts.requeued == 1
    job = Job.objects.get(id=listed)
    assert (job.status, job.lease_session, job.attempt, job.interruptions) == (Status.RUNNING, new, 1, 0)
    assert Job.objects.get(id=dropped).status == Status.QUEUED
    event = JobEvent.objects.get(job_id=listed, kind=EventKind.RELEASE)
    assert (event.from_status, event.session) == (Status.RUNNING, new)


def test_without_ownership_a_running_job_of_another_session_is_not_taken():
    old, (listed, _) = claim_two(ENDPOINT)
    taken, refused = services.re_lease_jobs(
        session=uuid.uuid4(), running=[(listed, 1)], lease_seconds=60, crawler=ENDPOINT, take_over=False
    )
    assert (taken, refused) == ([], [(listed, 1)])
    assert Job.objects.get(id=listed).lease_session == old


def test_a_take_over_never_moves_another_crawlers_job():
    _, (listed, _) = claim_two("unix:/tmp/other.sock")
    taken, refused = services.re_lease_jobs(
        session=uuid.uuid4(), running=[(listed, 1)], lease_seconds=60, crawler=ENDPOINT, take_over=True
    )
    assert (taken, refused) == ([], [(listed, 1)])
