"""Per-host politeness in the claim (jobs.dispatch): delay, concurrency, pause, back-off; both databases."""

from __future__ import annotations

import uuid
from datetime import timedelta
from email.utils import format_datetime

import pytest
from django.core.exceptions import ValidationError
from django.test import override_settings
from django.utils import timezone

from jobs import dispatch, services
from jobs.hosts import HostKeyError, backoff_for, host_key, parse_retry_after
from jobs.models import EventKind, Host, Job, JobEvent, Status
from jobs.outcomes import Outcome

pytestmark = pytest.mark.django_db

polite = override_settings(HOST_DELAY=10.0, HOST_CONCURRENCY=5, HOST_BACKOFF=10.0, HOST_BACKOFF_MAX=100.0)


def enqueue(urls, *, priority=0):
    return services.enqueue_many(urls=list(urls), priority=priority, actor="test")


def claim(at, limit=100, session=None):
    return services.claim_jobs(session=session or uuid.uuid4(), limit=limit, lease_seconds=600, crawler="c", at=at)


def host(key):
    return Host.objects.get(key=key)


# --- host keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, key",
    [
        ("https://Example.COM/a", "example.com"),
        ("https://example.com:443/a", "example.com"),
        ("http://example.com:80/", "example.com"),
        ("http://example.com:443/", "example.com:443"),
        ("https://example.com:8443/x?y", "example.com:8443"),
        ("https://example.com./", "example.com"),
        ("https://bücher.example/", "xn--bcher-kva.example"),
        ("http://[::1]:8000/", "[::1]:8000"),
        ("http://127.0.0.1/", "127.0.0.1"),
    ],
)
def test_host_key(url, key):
    assert host_key(url) == key


def test_host_key_refuses_urls_without_a_host():
    with pytest.raises(HostKeyError):
        host_key("https:///path")


def test_enqueue_gives_every_job_its_host_and_one_row_per_host():
    jobs = enqueue(["https://a.example/1", "https://A.example/2", "https://b.example:8080/"])
    assert [job.host.key for job in jobs] == ["a.example", "a.example", "b.example:8080"]
    assert Host.objects.count() == 2
    assert all(Host.objects.values_list("active", flat=True))


# --- delay and concurrency -------------------------------------------------------------------


@polite
def test_no_two_starts_of_a_host_closer_than_its_delay():
    enqueue([f"https://a.example/{i}" for i in range(3)])
    at = timezone.now()
    assert len(claim(at)) == 1
    assert claim(at + timedelta(seconds=9.9)) == []
    assert len(claim(at + timedelta(seconds=10))) == 1
    assert host("a.example").next_start_at == at + timedelta(seconds=20)


@override_settings(HOST_DELAY=0.0, HOST_CONCURRENCY=2)
def test_no_more_than_the_concurrency_run_at_once_and_an_end_frees_a_place():
    enqueue([f"https://a.example/{i}" for i in range(5)])
    at = timezone.now()
    session = uuid.uuid4()
    first = claim(at, session=session)
    assert len(first) == 2
    assert claim(at) == []
    services.record_outcomes(
        session=session,
        crawler="c",
        outcomes=[Outcome(job_id=first[0].id, attempt=first[0].attempt, succeeded=True, result={})],
    )
    assert len(claim(at)) == 1


@polite
def test_a_waiting_host_is_skipped_and_priority_orders_the_ready_ones():
    enqueue([f"https://slow.example/{i}" for i in range(3)], priority=9)
    enqueue(["https://low.example/1"], priority=1)
    enqueue(["https://high.example/1"], priority=5)
    at = timezone.now()
    first = claim(at, limit=2)
    assert [job.url for job in first] == ["https://slow.example/0", "https://high.example/1"]
    second = claim(at, limit=5)  # slow.example must wait: the others are claimed meanwhile
    assert [job.url for job in second] == ["https://low.example/1"]


@override_settings(HOST_DELAY=0.0, HOST_CONCURRENCY=1)
def test_a_host_with_many_queued_jobs_does_not_hold_back_the_others():
    enqueue([f"https://big.example/{i}" for i in range(2000)], priority=5)
    enqueue([f"https://small{i}.example/" for i in range(3)])
    at = timezone.now()
    urls = [job.url for job in claim(at, limit=10)]
    assert urls[0] == "https://big.example/0"
    assert sorted(urls[1:]) == [f"https://small{i}.example/" for i in range(3)]


@polite
def test_per_host_settings_override_the_defaults_and_pause_stops_a_host():
    enqueue([f"https://a.example/{i}" for i in range(4)])
    services.update_host(key="a.example", delay=0.0, concurrency=3, actor="test")
    at = timezone.now()
    assert len(claim(at)) == 3
    services.update_host(key="a.example", paused=True, actor="test")
    services.reset_running_jobs(reason="test", actor="test")
    assert claim(at) == []
    services.update_host(key="a.example", paused=False, actor="test")
    assert len(claim(at)) == 3


def test_update_host_refuses_bad_values_and_changes_nothing():
    enqueue(["https://a.example/"])
    for change in ({"delay": -1}, {"concurrency": 0}, {"paused": "yes"}, {"delay": "1"}):
        with pytest.raises(ValidationError):
            services.update_host(key="a.example", actor="test", **change)
    saved = host("a.example")
    assert (saved.delay, saved.concurrency, saved.paused) == (None, None, False)


@polite
def test_requeued_jobs_obey_the_same_rules():
    enqueue(["https://a.example/1", "https://a.example/2"])
    at = timezone.now()
    session = uuid.uuid4()
    assert len(claim(at, session=session)) == 1
    services.reset_running_jobs(session=session, reason="session lost", actor="test", at=at)
    assert claim(at + timedelta(seconds=1)) == []  # requeued, but the host's delay still runs
    assert len(claim(at + timedelta(seconds=10))) == 1


@polite
def test_next_ready_in_says_when_the_next_waiting_host_is_ready():
    enqueue(["https://a.example/1", "https://a.example/2"])
    at = timezone.now()
    claim(at)
    assert dispatch.next_ready_in(at=at + timedelta(seconds=4)) == pytest.approx(6.0)
    services.update_host(key="a.example", paused=True, actor="test")
    assert dispatch.next_ready_in(at=at) is None


@override_settings(HOST_DELAY=0.0, HOST_CONCURRENCY=10, JOB_RETRY_BACKOFF_BASE=60.0)
def test_jobs_waiting_for_a_retry_do_not_block_a_host_or_the_claim():
    blocked = enqueue(["https://a.example/1"], priority=9)[0]
    enqueue(["https://b.example/1"])
    at = timezone.now()
    session = uuid.uuid4()
    (job,) = claim(at, limit=1, session=session)
    assert job.id == blocked.id
    services.record_outcomes(
        session=session,
        crawler="c",
        at=at,
        outcomes=[Outcome(job_id=job.id, attempt=job.attempt, succeeded=False, error="boom", retryable=True)],
    )
    assert [j.url for j in claim(at, limit=1)] == ["https://b.example/1"]
    assert host("a.example").ready_at == Job.objects.get(id=blocked.id).run_after


# --- back-off --------------------------------------------------------------------------------


def report(job, at, **fields):
    session = Job.objects.get(id=job.id).lease_session
    return services.record_outcomes(
        session=session, crawler="c", at=at, outcomes=[Outcome(job_id=job.id, attempt=job.attempt, **fields)]
    )


@polite
def test_a_429_with_retry_after_backs_the_host_off_without_spending_an_attempt():
    enqueue(["https://a.example/1", "https://a.example/2"])
    services.update_host(key="a.example", delay=0.0, actor="test")
    at = timezone.now()
    first, second = claim(at)
    assert report(first, at, succeeded=True, result={"status": 429, "retry_after": "30"}) == ["recorded"]
    job = Job.objects.get(id=first.id)
    assert (job.status, job.failures, job.backoffs, job.outcome_attempt) == (Status.QUEUED, 0, 1, 1)
    saved = host("a.example")
    assert saved.backoff_until == at + timedelta(seconds=30)
    assert "HTTP 429" in saved.backoff_reason
    assert claim(at + timedelta(seconds=29)) == []
    assert [j.id for j in claim(at + timedelta(seconds=30))] == [first.id]
    event = JobEvent.objects.filter(job_id=first.id, kind=EventKind.OUTCOME).get()
    assert (event.to_status, "backing off" in event.reason) == (Status.QUEUED, True)
    # A resend of the same report is rule 2: nothing changes a second time.
    assert report(first, at, succeeded=True, result={"status": 429, "retry_after": "30"}) == ["recorded"]
    assert Job.objects.get(id=first.id).backoffs == 1


@polite
def test_retry_after_as_an_http_date_and_a_503_from_failed():
    enqueue(["https://a.example/1"])
    at = timezone.now().replace(microsecond=0)
    (job,) = claim(at)
    date = format_datetime(at + timedelta(seconds=45), usegmt=True)
    report(job, at, succeeded=False, error="HTTP 503", retryable=True, http_status=503, retry_after=date)
    assert host("a.example").backoff_until == at + timedelta(seconds=45)
    assert Job.objects.get(id=job.id).failures == 0


@polite
def test_connection_errors_back_off_exponentially_with_a_cap_and_a_success_resets():
    enqueue([f"https://a.example/{i}" for i in range(6)])
    services.update_host(key="a.example", delay=0.0, concurrency=1, actor="test")
    at = timezone.now()
    waits = []
    for _ in range(5):
        (job,) = claim(at)
        report(job, at, succeeded=False, error="cannot connect", retryable=True, network=True)
        until = host("a.example").backoff_until
        waits.append((until - at).total_seconds())
        at = until
    assert waits == [10, 20, 40, 80, 100]
    (job,) = claim(at)
    report(job, at, succeeded=True, result={"status": 200})
    assert host("a.example").errors == 0


@override_settings(HOST_DELAY=0.0, HOST_BACKOFF_JOB_LIMIT=2)
def test_a_job_is_sent_back_a_bounded_number_of_times():
    enqueue(["https://a.example/1"])
    at = timezone.now()
    for expected in (Status.QUEUED, Status.QUEUED, Status.SUCCEEDED):
        (job,) = claim(at)
        report(job, at, succeeded=True, result={"status": 429})
        assert Job.objects.get(id=job.id).status == expected
        at = host("a.example").ready_at


def test_a_stale_429_does_not_back_the_host_off():
    enqueue(["https://a.example/1"])
    (job,) = claim(timezone.now())
    acks = services.record_outcomes(
        session=uuid.uuid4(),
        crawler="someone else",
        outcomes=[Outcome(job_id=job.id, attempt=job.attempt, succeeded=True, result={"status": 429})],
    )
    assert acks == ["stale"]
    assert host("a.example").backoff_until is None


def test_retry_after_parsing():
    at = timezone.now().replace(microsecond=0)
    assert parse_retry_after("120", at=at) == 120
    assert parse_retry_after(" 7 ", at=at) == 7
    assert parse_retry_after(format_datetime(at + timedelta(seconds=90), usegmt=True), at=at) == 90
    assert parse_retry_after(format_datetime(at - timedelta(seconds=90), usegmt=True), at=at) == 0
    for bad in ("soon", "", "-5", "1e9999", None, True, ["1"]):
        assert parse_retry_after(bad, at=at) is None
    assert backoff_for(status=200, retry_after=None, network=False, errors=1, at=at, base=1, cap=2) is None
    capped = backoff_for(status=429, retry_after="99999", network=False, errors=1, at=at, base=1, cap=60)
    assert capped is not None and capped.seconds == 60


# --- the claim's view stays right ---------------------------------------------------------------


@override_settings(HOST_DELAY=0.0, HOST_CONCURRENCY=3)
def test_every_host_with_queued_jobs_stays_visible_to_the_claim():
    enqueue([f"https://h{i % 7}.example/{i}" for i in range(40)])
    at = timezone.now()
    sessions = [uuid.uuid4() for _ in range(3)]
    for round_ in range(6):
        for session in sessions:
            jobs = claim(at, limit=4, session=session)
            outcomes = [
                Outcome(job_id=job.id, attempt=job.attempt, succeeded=(job.id + round_) % 3 != 0, retryable=True)
                for job in jobs[:2]
            ]
            services.record_outcomes(session=session, crawler="c", at=at, outcomes=outcomes)
        services.reset_running_jobs(session=sessions[round_ % 3], reason="lost", actor="test", at=at)
        cancelled = Job.objects.filter(status=Status.QUEUED).values_list("id", flat=True)[:1]
        services.cancel_jobs(job_ids=list(cancelled), actor="test")
        services.retry_jobs(job_ids=list(cancelled), actor="test")
        at += timedelta(seconds=1)
    assert services.repair_hosts().total == 0
    queued_hosts = set(Job.objects.filter(status=Status.QUEUED).values_list("host_id", flat=True))
    assert queued_hosts <= set(Host.objects.filter(active=True).values_list("id", flat=True))


@override_settings(HOST_DELAY=0.0, HOST_CONCURRENCY=10, JOB_RETRY_BACKOFF_BASE=60.0)
def test_a_new_job_on_a_host_waiting_for_a_retry_starts_at_once():
    enqueue(["https://a.example/1"])
    at = timezone.now()
    session = uuid.uuid4()
    (job,) = claim(at, session=session)
    services.record_outcomes(
        session=session,
        crawler="c",
        at=at,
        outcomes=[Outcome(job_id=job.id, attempt=job.attempt, succeeded=False, error="boom", retryable=True)],
    )
    assert claim(at) == []  # the host now waits for the retry
    fresh = enqueue(["https://a.example/2"])[0]
    assert [j.id for j in claim(at)] == [fresh.id]
