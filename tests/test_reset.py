"""reset_running_jobs: the one requeue every signal, admin action and command shares."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.exceptions import ValidationError
from django.utils import timezone

from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status
from jobs.services import ResetCounts

pytestmark = pytest.mark.django_db

REASON = "session lost"


def make_jobs(count: int, **fields) -> list[Job]:
    """Insert jobs directly in a given state (the services are what is under test)."""
    defaults = dict(url="https://example.com/page", status=Status.QUEUED)
    defaults.update(fields)
    Job.objects.bulk_create([Job(**defaults) for _ in range(count)])
    services.repair_hosts()  # rows made outside the services get their host as the bus's sweeper gives it
    return list(Job.objects.order_by("-id")[:count])[::-1]


def make_running(count: int, *, session: uuid.UUID, expires_in: float = 60, attempt: int = 1, **fields) -> list[Job]:
    at = timezone.now()
    return make_jobs(
        count,
        status=Status.RUNNING,
        attempt=attempt,
        lease_session=session,
        lease_expires_at=at + timedelta(seconds=expires_in),
        started_at=at,
        **fields,
    )


def ids(jobs) -> set[int]:
    return {job.id for job in jobs}


def test_only_running_jobs_move(session_a):
    running = make_running(3, session=session_a)
    others = {
        status: make_jobs(1, status=status)[0]
        for status in (Status.QUEUED, Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)
    }
    before = {job.id: (job.status, job.updated_at, job.interruptions) for job in others.values()}

    counts = services.reset_running_jobs(reason=REASON, actor="test")

    assert counts == ResetCounts(requeued=3, failed=0)
    assert set(Job.objects.filter(id__in=ids(running)).values_list("status", flat=True)) == {Status.QUEUED}
    for job in Job.objects.filter(id__in=before):
        assert (job.status, job.updated_at, job.interruptions) == before[job.id]
    assert not JobEvent.objects.filter(job_id__in=before).exists()


def test_requeued_job_loses_its_lease_and_started_at_but_keeps_its_attempt(session_a):
    job = make_running(1, session=session_a, attempt=4)[0]

    services.reset_running_jobs(session=session_a, reason=REASON, actor="test")

    job.refresh_from_db()
    assert job.status == Status.QUEUED
    assert job.started_at is None
    assert job.lease_session is None
    assert job.lease_expires_at is None
    assert job.attempt == 4  # the fencing token never goes back
    assert job.interruptions == 1
    assert job.finished_at is None
    assert job.error == ""


def test_calling_reset_twice_counts_each_interruption_once(session_a):
    jobs = make_running(4, session=session_a)

    first = services.reset_running_jobs(session=session_a, reason=REASON, actor="test")
    second = services.reset_running_jobs(session=session_a, reason=REASON, actor="test")
    third = services.reset_running_jobs(reason=REASON, actor="test")

    assert first == ResetCounts(requeued=4, failed=0)
    assert second == ResetCounts() and third == ResetCounts()
    assert set(Job.objects.filter(id__in=ids(jobs)).values_list("interruptions", flat=True)) == {1}
    assert JobEvent.objects.filter(kind=EventKind.INTERRUPT).count() == 4


def test_job_reaching_max_interruptions_alone_in_its_session_fails_with_the_reason(session_a, session_b):
    poisoned = make_running(1, session=session_a, interruptions=2, max_interruptions=3)[0]
    healthy = make_running(1, session=session_b, interruptions=1, max_interruptions=3)[0]
    at = timezone.now()

    counts = services.reset_running_jobs(reason="heartbeat timeout", actor="bus", at=at)

    assert counts == ResetCounts(requeued=1, failed=1)
    poisoned.refresh_from_db()
    healthy.refresh_from_db()
    assert poisoned.status == Status.FAILED
    assert poisoned.interruptions == 3
    assert "heartbeat timeout" in poisoned.error
    assert "max_interruptions" in poisoned.error
    assert poisoned.finished_at == at
    assert poisoned.lease_session is None and poisoned.lease_expires_at is None and poisoned.started_at is None
    assert healthy.status == Status.QUEUED and healthy.interruptions == 2

    event = JobEvent.objects.get(job=poisoned, kind=EventKind.INTERRUPT)
    assert (event.from_status, event.to_status) == (Status.RUNNING, Status.FAILED)
    assert "heartbeat timeout" in event.reason
    assert event.session == session_a


def test_a_crawler_dying_with_many_jobs_fails_none_of_them_but_runs_the_suspects_alone(session_a):
    """The fair verdict: reaching max_interruptions in company makes a suspect, not a failure."""
    suspects = make_running(20, session=session_a, interruptions=2, max_interruptions=3)

    counts = services.reset_running_jobs(session=session_a, reason="session lost", actor="bus")

    assert counts == ResetCounts(requeued=20, failed=0, suspected=20)
    rows = list(Job.objects.filter(id__in=ids(suspects)).values_list("status", "run_alone", "interruptions"))
    assert set(rows) == {(Status.QUEUED, True, 3)}
    event = JobEvent.objects.filter(job=suspects[0], kind=EventKind.INTERRUPT).get()
    assert event.to_status == Status.QUEUED and "runs alone next" in event.reason


def test_a_suspect_that_kills_its_crawler_again_alone_fails(session_a, session_b):
    suspect = make_running(1, session=session_b, interruptions=3, max_interruptions=3, run_alone=True)[0]

    counts = services.reset_running_jobs(session=session_b, reason="session lost", actor="bus")

    assert counts == ResetCounts(requeued=0, failed=1)
    suspect.refresh_from_db()
    assert suspect.status == Status.FAILED and suspect.interruptions == 4


def test_max_interruptions_of_one_fails_at_the_first_interruption(session_a):
    job = make_running(1, session=session_a, max_interruptions=1)[0]

    assert services.reset_running_jobs(reason=REASON, actor="test") == ResetCounts(requeued=0, failed=1)
    job.refresh_from_db()
    assert job.status == Status.FAILED and job.interruptions == 1


def test_session_filter_moves_only_that_sessions_jobs(session_a, session_b):
    mine = make_running(3, session=session_a)
    theirs = make_running(2, session=session_b)

    counts = services.reset_running_jobs(session=session_a, reason=REASON, actor="test")

    assert counts == ResetCounts(requeued=3)
    assert set(Job.objects.filter(id__in=ids(mine)).values_list("status", flat=True)) == {Status.QUEUED}
    assert set(Job.objects.filter(id__in=ids(theirs)).values_list("status", "lease_session")) == {
        (Status.RUNNING, session_b)
    }


def test_job_ids_filter_moves_only_listed_running_jobs(session_a):
    running = make_running(4, session=session_a)
    queued = make_jobs(1)[0]
    listed = [running[0].id, running[2].id, queued.id, 999_999_999]

    counts = services.reset_running_jobs(job_ids=listed, reason=REASON, actor="test")

    assert counts == ResetCounts(requeued=2)
    assert set(Job.objects.queued().values_list("id", flat=True)) == {running[0].id, running[2].id, queued.id}
    assert Job.objects.get(id=queued.id).interruptions == 0


def test_empty_job_ids_moves_nothing(session_a):
    make_running(2, session=session_a)

    assert services.reset_running_jobs(job_ids=[], reason=REASON, actor="test") == ResetCounts()
    assert Job.objects.running().count() == 2


def test_lease_expired_before_moves_only_expired_leases(session_a):
    expired = make_running(2, session=session_a, expires_in=-30)
    alive = make_running(2, session=session_a, expires_in=30)

    counts = services.reset_running_jobs(lease_expired_before=timezone.now(), reason="lease expired", actor="sweeper")

    assert counts == ResetCounts(requeued=2)
    assert set(Job.objects.queued().values_list("id", flat=True)) == ids(expired)
    assert set(Job.objects.running().values_list("id", flat=True)) == ids(alive)


def test_expire_leases_requeues_jobs_whose_lease_ran_out(session_a):
    expired = make_running(1, session=session_a, expires_in=-1)[0]
    make_running(1, session=session_a, expires_in=60)

    assert services.expire_leases() == ResetCounts(requeued=1)
    event = JobEvent.objects.get(kind=EventKind.INTERRUPT)
    assert (event.job_id, event.actor, event.reason) == (expired.id, "sweeper", "lease expired")


def test_filters_combine(session_a, session_b):
    now = timezone.now()
    a_expired = make_running(3, session=session_a, expires_in=-30)
    a_alive = make_running(1, session=session_a, expires_in=30)
    b_expired = make_running(1, session=session_b, expires_in=-30)
    listed = [a_expired[0].id, a_expired[1].id, a_alive[0].id, b_expired[0].id]

    counts = services.reset_running_jobs(
        session=session_a, job_ids=listed, lease_expired_before=now, reason=REASON, actor="test"
    )

    # Only jobs that match every filter: session A, listed, lease expired.
    assert counts == ResetCounts(requeued=2)
    assert set(Job.objects.queued().values_list("id", flat=True)) == {a_expired[0].id, a_expired[1].id}
    assert Job.objects.running().count() == 3


def test_no_filter_moves_every_running_job(session_a, session_b):
    make_running(2, session=session_a)
    make_running(3, session=session_b)

    assert services.reset_running_jobs(reason=REASON, actor="admin:alice") == ResetCounts(requeued=5)
    assert Job.objects.running().count() == 0


def test_reset_writes_one_interrupt_event_per_moved_job(session_a):
    jobs = make_running(2, session=session_a, attempt=7)
    at = timezone.now()

    services.reset_running_jobs(session=session_a, reason="supervisor gone", actor="bus", at=at)

    events = list(JobEvent.objects.filter(kind=EventKind.INTERRUPT).order_by("job_id"))
    assert [event.job_id for event in events] == [job.id for job in jobs]
    for event in events:
        assert event.kind == EventKind.INTERRUPT
        assert event.from_status == Status.RUNNING
        assert event.to_status == Status.QUEUED
        assert event.attempt == 7
        assert event.session == session_a  # the session that lost the lease
        assert event.actor == "bus"
        assert event.reason == "supervisor gone"
        assert event.at == at


def test_reset_requires_a_reason(session_a):
    make_running(1, session=session_a)

    with pytest.raises(ValidationError):
        services.reset_running_jobs(reason="", actor="test")
    assert Job.objects.running().count() == 1


def test_requeued_jobs_can_be_claimed_again_with_a_new_attempt(session_a, session_b):
    job = make_jobs(1)[0]
    services.claim_jobs(session=session_a, limit=1, lease_seconds=60)
    services.reset_running_jobs(session=session_a, reason=REASON, actor="test")

    claimed = services.claim_jobs(session=session_b, limit=1, lease_seconds=60)

    assert [(c.id, c.attempt) for c in claimed] == [(job.id, 2)]


# SAVEPOINT, the statement(s), marking the requeued jobs' hosts, RELEASE, and on
# PostgreSQL the NOTIFY: never one per job.
RESET_MAX_QUERIES = 7


def _reset_queries(count: int, assert_max_queries) -> int:
    make_running(count, session=uuid.uuid4())
    for _ in range(count):  # the poison path too: each alone in its session
        make_running(1, session=uuid.uuid4(), interruptions=2, max_interruptions=3)
    with assert_max_queries(RESET_MAX_QUERIES) as queries:
        counts = services.reset_running_jobs(reason=REASON, actor="test")
    assert counts == ResetCounts(requeued=count, failed=count)
    Job.objects.all().delete()
    return len(queries)


def test_reset_is_set_based_same_query_count_for_5_and_500_jobs(django_assert_max_num_queries):
    assert _reset_queries(5, django_assert_max_num_queries) == _reset_queries(500, django_assert_max_num_queries)


@pytest.mark.django_db
def test_reset_cancel_and_retry_take_more_ids_than_sqlite_binds_at_once():
    jobs = services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(40_000)], actor="test")
    session = uuid.uuid4()
    services.claim_jobs(session=session, limit=40_000, lease_seconds=60)
    ids = [job.id for job in jobs] + list(range(10**9, 10**9 + 5_000))  # plus ids that do not exist

    counts = services.reset_running_jobs(job_ids=ids, reason="bulk", actor="test")
    assert counts.requeued == 40_000
    assert services.cancel_jobs(job_ids=ids, actor="test").changed == 40_000
    assert services.retry_jobs(job_ids=ids, actor="test").changed == 40_000
    assert Job.objects.queued().count() == 40_000
