"""Claiming jobs for a session, keeping and re-taking leases, and the invariants the database enforces."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.db import IntegrityError, transaction
from django.utils import timezone

from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status
from jobs.services import Outcome

pytestmark = pytest.mark.django_db


def enqueue(count: int, *, priority: int = 0, prefix: str = "p") -> list[Job]:
    return services.enqueue_many(
        urls=[f"https://example.com/{prefix}{i}" for i in range(count)], priority=priority, actor="test"
    )


# --- claim_jobs ------------------------------------------------------------------------


def test_claim_takes_jobs_by_priority_then_id(session_a):
    low = enqueue(2, priority=-5, prefix="low")
    mid = enqueue(2, priority=0, prefix="mid")
    high = enqueue(2, priority=10, prefix="high")

    claimed = services.claim_jobs(session=session_a, limit=5, lease_seconds=60)

    assert [c.id for c in claimed] == [high[0].id, high[1].id, mid[0].id, mid[1].id, low[0].id]
    assert Job.objects.queued().get().id == low[1].id


def test_claim_increments_the_attempt_and_sets_the_lease(session_a):
    job = services.enqueue(url="https://example.com/x", payload={"depth": 2}, actor="test")
    Job.objects.filter(id=job.id).update(attempt=3)
    at = timezone.now()

    [claimed] = services.claim_jobs(session=session_a, limit=1, lease_seconds=90, at=at)

    assert (claimed.id, claimed.attempt, claimed.url, claimed.payload) == (
        job.id,
        4,
        "https://example.com/x",
        {"depth": 2},
    )
    job.refresh_from_db()
    assert job.status == Status.RUNNING
    assert job.attempt == 4
    assert job.lease_session == session_a
    assert job.lease_expires_at == at + timedelta(seconds=90)
    assert job.started_at == at


def test_claim_writes_one_claim_event_per_job(session_a):
    jobs = enqueue(3)
    at = timezone.now()

    services.claim_jobs(session=session_a, limit=3, lease_seconds=60, at=at, actor="bus")

    claims = list(JobEvent.objects.filter(kind=EventKind.CLAIM).order_by("job_id"))
    assert [(e.job_id, e.from_status, e.to_status, e.attempt, e.session, e.actor, e.at) for e in claims] == [
        (job.id, Status.QUEUED, Status.RUNNING, 1, session_a, "bus", at) for job in jobs
    ]


def test_claim_respects_the_limit(session_a):
    enqueue(10)

    assert len(services.claim_jobs(session=session_a, limit=4, lease_seconds=60)) == 4
    assert Job.objects.running().count() == 4
    assert services.claim_jobs(session=session_a, limit=0, lease_seconds=60) == []
    assert len(services.claim_jobs(session=session_a, limit=100, lease_seconds=60)) == 6
    assert services.claim_jobs(session=session_a, limit=100, lease_seconds=60) == []


def test_job_with_run_after_in_the_future_is_not_claimable(session_a):
    later, due = enqueue(2)
    at = timezone.now()
    Job.objects.filter(id=later.id).update(run_after=at + timedelta(seconds=30), priority=100)
    Job.objects.filter(id=due.id).update(run_after=at - timedelta(seconds=1))

    claimed = services.claim_jobs(session=session_a, limit=10, lease_seconds=60, at=at)

    assert [c.id for c in claimed] == [due.id]
    assert Job.objects.get(id=due.id).run_after is None
    # Once its time has come, it is claimable.
    claimed = services.claim_jobs(session=session_a, limit=10, lease_seconds=60, at=at + timedelta(seconds=31))
    assert [c.id for c in claimed] == [later.id]


def test_claim_skips_jobs_that_are_not_queued(session_a, session_b):
    enqueue(2)
    services.claim_jobs(session=session_a, limit=1, lease_seconds=60)
    for status in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED):
        Job.objects.create(url="https://example.com/done", status=status)

    claimed = services.claim_jobs(session=session_b, limit=10, lease_seconds=60)

    assert len(claimed) == 1
    assert Job.objects.leased_to(session_a).count() == 1
    assert Job.objects.leased_to(session_b).count() == 1


def _claim_queries(count: int, assert_max_queries) -> int:
    enqueue(count)
    # SQLite: BEGIN, ready hosts, their best jobs, start them, their events,
    # move the hosts on, COMMIT (PostgreSQL does it all in one statement).
    with assert_max_queries(7) as queries:
        claimed = services.claim_jobs(session=uuid.uuid4(), limit=count, lease_seconds=60)
    assert len(claimed) == count
    return len(queries)


def test_claim_query_count_does_not_grow_with_the_batch(django_assert_max_num_queries):
    assert _claim_queries(5, django_assert_max_num_queries) == _claim_queries(500, django_assert_max_num_queries)


# --- renew_leases ------------------------------------------------------------------------


def test_renew_leases_extends_only_pairs_held_by_the_session(session_a, session_b):
    mine = enqueue(3, prefix="mine")
    at = timezone.now()
    services.claim_jobs(session=session_a, limit=3, lease_seconds=10, at=at)
    theirs = enqueue(1, prefix="theirs")[0]
    services.claim_jobs(session=session_b, limit=1, lease_seconds=10, at=at)
    later = at + timedelta(seconds=5)

    renewed = services.renew_leases(
        session=session_a,
        running=[(mine[0].id, 1), (mine[1].id, 2), (theirs.id, 1), (999_999_999, 1)],
        lease_seconds=60,
        at=later,
    )

    assert renewed == {(mine[0].id, 1)}
    expiry = dict(Job.objects.values_list("id", "lease_expires_at"))
    assert expiry[mine[0].id] == later + timedelta(seconds=60)
    assert expiry[mine[1].id] == at + timedelta(seconds=10)  # wrong attempt: not renewed
    assert expiry[mine[2].id] == at + timedelta(seconds=10)  # not listed: not renewed
    assert expiry[theirs.id] == at + timedelta(seconds=10)  # another session's job


def test_renew_leases_with_nothing_listed_renews_nothing(session_a):
    assert services.renew_leases(session=session_a, running=[], lease_seconds=60) == set()


def test_renewed_lease_is_not_expired_by_the_sweeper(session_a):
    job = enqueue(1)[0]
    at = timezone.now()
    services.claim_jobs(session=session_a, limit=1, lease_seconds=10, at=at)
    services.renew_leases(session=session_a, running=[(job.id, 1)], lease_seconds=60, at=at + timedelta(seconds=9))

    assert services.expire_leases(at=at + timedelta(seconds=30)).total == 0
    assert services.expire_leases(at=at + timedelta(seconds=70)).requeued == 1


# --- re_lease_jobs ------------------------------------------------------------------------


def test_re_lease_gives_a_requeued_job_back_to_the_crawler_still_running_it(session_a, session_b):
    job = enqueue(1)[0]
    services.claim_jobs(session=session_a, limit=1, lease_seconds=60)
    services.reset_running_jobs(session=session_a, reason="session lost", actor="bus")
    at = timezone.now()

    taken, refused = services.re_lease_jobs(session=session_b, running=[(job.id, 1)], lease_seconds=60, at=at)

    assert (taken, refused) == ([(job.id, 1)], [])
    job.refresh_from_db()
    assert (job.status, job.attempt, job.lease_session) == (Status.RUNNING, 1, session_b)
    assert job.lease_expires_at == at + timedelta(seconds=60)
    event = JobEvent.objects.get(job=job, kind=EventKind.RELEASE)
    assert (event.from_status, event.to_status, event.attempt, event.session) == (
        Status.QUEUED,
        Status.RUNNING,
        1,
        session_b,
    )
    # Its outcome is then recorded normally (rule 1).
    outcome = Outcome(job_id=job.id, attempt=1, succeeded=True)
    assert services.record_outcome(session=session_b, outcome=outcome) == "recorded"


def test_re_lease_refuses_jobs_taken_since_finished_or_unknown(session_a, session_b):
    reclaimed, recorded, cancelled, still_running = enqueue(4)
    services.claim_jobs(session=session_a, limit=4, lease_seconds=60)
    services.reset_running_jobs(job_ids=[reclaimed.id, recorded.id, cancelled.id], reason="lost", actor="bus")
    # reclaimed: someone else took it since (attempt 2 now).
    Job.objects.filter(id__in=[recorded.id, cancelled.id]).update(priority=-1)
    assert [c.id for c in services.claim_jobs(session=session_b, limit=1, lease_seconds=60)] == [reclaimed.id]
    # recorded: a retryable failure for attempt 1 was recorded, the job waits for its retry.
    services.record_outcome(
        session=session_a, outcome=Outcome(job_id=recorded.id, attempt=1, succeeded=False, error="x", retryable=True)
    )
    services.cancel_jobs(job_ids=[cancelled.id], actor="test")
    events_before = JobEvent.objects.count()

    listed = [(reclaimed.id, 1), (recorded.id, 1), (cancelled.id, 1), (still_running.id, 1), (999_999_999, 1)]
    taken, refused = services.re_lease_jobs(session=uuid.uuid4(), running=listed, lease_seconds=60)

    assert taken == []
    assert refused == listed
    assert JobEvent.objects.count() == events_before
    assert Job.objects.get(id=reclaimed.id).lease_session == session_b
    assert Job.objects.get(id=still_running.id).lease_session == session_a
    assert Job.objects.get(id=recorded.id).status == Status.QUEUED


# --- Database constraints -----------------------------------------------------------


def test_database_rejects_a_running_job_without_a_lease():
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.create(url="https://example.com/x", status=Status.RUNNING)


def test_database_rejects_a_running_job_with_half_a_lease():
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.create(url="https://example.com/x", status=Status.RUNNING, lease_session=uuid.uuid4())


def test_database_rejects_a_lease_on_a_job_that_is_not_running():
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.create(
            url="https://example.com/x",
            status=Status.QUEUED,
            lease_session=uuid.uuid4(),
            lease_expires_at=timezone.now(),
        )


def test_database_rejects_an_invalid_status():
    job = Job.objects.create(url="https://example.com/x")
    with pytest.raises(IntegrityError), transaction.atomic():
        Job.objects.filter(id=job.id).update(status="paused")
    assert Job.objects.get(id=job.id).status == Status.QUEUED


def test_database_rejects_zero_attempt_and_interruption_budgets():
    for field in ("max_attempts", "max_interruptions"):
        with pytest.raises(IntegrityError), transaction.atomic():
            Job.objects.create(url="https://example.com/x", **{field: 0})


def test_database_rejects_two_recorded_outcomes_for_one_attempt():
    job = Job.objects.create(url="https://example.com/x")
    fields = dict(job=job, at=timezone.now(), kind=EventKind.OUTCOME, attempt=1, actor="test")
    JobEvent.objects.create(**fields)
    with pytest.raises(IntegrityError), transaction.atomic():
        JobEvent.objects.create(**fields)


# --- started / progress from the crawler ------------------------------------------------


def test_started_and_progress_are_recorded_only_for_the_lease_holder_and_attempt(session_a, session_b):
    job = enqueue(1)[0]
    services.claim_jobs(session=session_a, limit=1, lease_seconds=60)
    at = timezone.now()

    assert services.mark_started(session=session_a, job_id=job.id, attempt=1, at=at) is True
    assert services.mark_started(session=session_b, job_id=job.id, attempt=1) is False
    assert services.mark_started(session=session_a, job_id=job.id, attempt=2) is False
    assert services.record_progress(session=session_a, job_id=job.id, attempt=1, progress={"done": 4}) is True
    assert services.record_progress(session=session_b, job_id=job.id, attempt=1, progress={"done": 9}) is False

    job.refresh_from_db()
    assert (job.started_at, job.progress) == (at, {"done": 4})
    services.reset_running_jobs(session=session_a, reason="lost", actor="bus")
    assert services.record_progress(session=session_a, job_id=job.id, attempt=1, progress={"done": 5}) is False
