"""Fencing of outcomes (PROTOCOL.md "What the bus does with outcomes"), and a person's cancel and retry.

Each rule is checked for both `done` and `failed`: what is acked, what the job
becomes, and which audit events exist.
"""

from __future__ import annotations

import uuid

import pytest
from django.utils import timezone

from jobs import services
from jobs.hosts import LONG_AGO
from jobs.models import EventKind, Host, Job, JobEvent, Status
from jobs.services import RECORDED, STALE, ChangeResult, Outcome

pytestmark = pytest.mark.django_db


@pytest.fixture
def job():
    return services.enqueue(url="https://example.com/a", actor="test")


def claim(session, job_id: int) -> int:
    """Claim the (only queued) job for `session`; return the attempt it got."""
    claimed = services.claim_jobs(session=session, limit=1, lease_seconds=60)
    assert [c.id for c in claimed] == [job_id]
    return claimed[0].attempt


def done(job_id: int, attempt: int, result: dict | None = None) -> Outcome:
    return Outcome(job_id=job_id, attempt=attempt, succeeded=True, result=result if result is not None else {"ok": 1})


def failed(job_id: int, attempt: int, *, retryable: bool = False, error: str = "boom") -> Outcome:
    return Outcome(job_id=job_id, attempt=attempt, succeeded=False, error=error, retryable=retryable)


def snapshot(job_id: int) -> dict:
    return Job.objects.filter(id=job_id).values().get()


def events(job_id: int, kind: str | None = None) -> list[JobEvent]:
    rows = JobEvent.objects.filter(job_id=job_id)
    return list(rows.filter(kind=kind) if kind else rows)


OUTCOMES = {
    "done": (lambda job_id, attempt: done(job_id, attempt), Status.SUCCEEDED),
    "failed": (lambda job_id, attempt: failed(job_id, attempt), Status.FAILED),
}


# --- Rule 1: running with that attempt (any session) -> record ------------------


@pytest.mark.parametrize("kind", OUTCOMES)
@pytest.mark.parametrize("reporting_session", ["holder", "other"])
def test_rule1_outcome_for_running_attempt_is_recorded_from_any_session(
    job, session_a, session_b, kind, reporting_session
):
    make, final = OUTCOMES[kind]
    attempt = claim(session_a, job.id)
    reporter = session_a if reporting_session == "holder" else session_b

    ack = services.record_outcome(session=reporter, outcome=make(job.id, attempt))

    assert ack == RECORDED
    row = snapshot(job.id)
    assert row["status"] == final
    assert row["outcome_attempt"] == attempt
    assert row["lease_session"] is None and row["lease_expires_at"] is None
    assert row["finished_at"] is not None
    if kind == "done":
        assert row["result"] == {"ok": 1} and row["error"] == ""
    else:
        assert row["error"] == "boom" and row["result"] is None
    [event] = events(job.id, EventKind.OUTCOME)
    assert (event.from_status, event.to_status, event.attempt, event.session) == (
        Status.RUNNING,
        final,
        attempt,
        reporter,
    )


# --- Rule 2: a resend of a recorded outcome -> "recorded", nothing changes ------


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule2_resend_of_recorded_outcome_acks_recorded_and_changes_nothing(job, session_a, kind):
    make, final = OUTCOMES[kind]
    attempt = claim(session_a, job.id)
    assert services.record_outcome(session=session_a, outcome=make(job.id, attempt)) == RECORDED
    before, events_before = snapshot(job.id), events(job.id)

    # The same outcome again, and a contradicting one for the same attempt.
    assert services.record_outcome(session=session_a, outcome=make(job.id, attempt)) == RECORDED
    assert services.record_outcome(session=session_a, outcome=done(job.id, attempt, {"other": 2})) == RECORDED
    assert services.record_outcome(session=session_a, outcome=failed(job.id, attempt, retryable=True)) == RECORDED

    assert snapshot(job.id) == before
    assert snapshot(job.id)["status"] == final
    assert events(job.id) == events_before


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule2_resend_for_an_older_attempt_recorded_before_a_retry_changes_nothing(job, session_a, session_b, kind):
    make, _ = OUTCOMES[kind]
    first = claim(session_a, job.id)
    assert services.record_outcome(session=session_a, outcome=failed(job.id, first, retryable=True)) == RECORDED
    Job.objects.filter(id=job.id).update(run_after=None)  # due now, without waiting for the backoff
    second = claim(session_b, job.id)
    assert second == first + 1
    before, events_before = snapshot(job.id), events(job.id)

    # The crawler of the first session resends its outcome for attempt 1.
    ack = services.record_outcome(session=session_a, outcome=make(job.id, first))

    assert ack == RECORDED
    assert snapshot(job.id) == before
    assert before["status"] == Status.RUNNING and before["lease_session"] == session_b
    assert events(job.id) == events_before


# --- Rule 3: queued, latest attempt is this one (late result) -> record -------------


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule3_late_outcome_for_job_requeued_after_its_session_ended_is_recorded(job, session_a, kind):
    make, final = OUTCOMES[kind]
    attempt = claim(session_a, job.id)
    services.reset_running_jobs(session=session_a, reason="session lost", actor="bus")
    assert snapshot(job.id)["status"] == Status.QUEUED

    ack = services.record_outcome(session=uuid.uuid4(), outcome=make(job.id, attempt))

    assert ack == RECORDED
    row = snapshot(job.id)
    assert row["status"] == final
    assert row["outcome_attempt"] == attempt
    assert row["attempt"] == attempt
    [event] = events(job.id, EventKind.OUTCOME)
    assert (event.from_status, event.to_status) == (Status.QUEUED, final)
    # It is no longer claimable: the result was not thrown away.
    assert services.claim_jobs(session=session_a, limit=5, lease_seconds=60) == []


def test_rule3_late_retryable_failure_requeues_with_backoff(job, session_a):
    attempt = claim(session_a, job.id)
    services.reset_running_jobs(session=session_a, reason="session lost", actor="bus")
    at = timezone.now()

    ack = services.record_outcomes(session=session_a, outcomes=[failed(job.id, attempt, retryable=True)], at=at)

    assert ack == [RECORDED]
    row = snapshot(job.id)
    assert row["status"] == Status.QUEUED and row["failures"] == 1 and row["run_after"] > at


# --- Rule 4: anything else -> "stale", nothing changes, a stale event ---------------


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule4_outcome_for_an_attempt_superseded_by_a_re_claim_is_stale(job, session_a, session_b, kind):
    make, _ = OUTCOMES[kind]
    first = claim(session_a, job.id)
    services.reset_running_jobs(session=session_a, reason="session lost", actor="bus")
    second = claim(session_b, job.id)
    before, events_before = snapshot(job.id), events(job.id)

    ack = services.record_outcome(session=session_a, outcome=make(job.id, first))

    assert ack == STALE
    assert snapshot(job.id) == before
    assert (before["status"], before["attempt"], before["lease_session"]) == (Status.RUNNING, second, session_b)
    new_events = events(job.id)[len(events_before) :]
    assert [(e.kind, e.attempt, e.session) for e in new_events] == [(EventKind.STALE, first, session_a)]
    assert new_events[0].from_status == "" and new_events[0].to_status == ""


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule4_outcome_for_a_cancelled_job_is_stale(job, session_a, kind):
    make, _ = OUTCOMES[kind]
    attempt = claim(session_a, job.id)
    services.cancel_jobs(job_ids=[job.id], actor="admin:alice")
    before = snapshot(job.id)

    ack = services.record_outcome(session=session_a, outcome=make(job.id, attempt))

    assert ack == STALE
    assert snapshot(job.id) == before and before["status"] == Status.CANCELLED
    assert [e.attempt for e in events(job.id, EventKind.STALE)] == [attempt]


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule4_outcome_for_an_unknown_job_is_stale_without_event(session_a, kind):
    make, _ = OUTCOMES[kind]

    ack = services.record_outcome(session=session_a, outcome=make(987_654_321, 1))

    assert ack == STALE
    assert JobEvent.objects.count() == 0


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule4_outcome_for_an_attempt_never_assigned_is_stale(job, session_a, kind):
    make, _ = OUTCOMES[kind]
    attempt = claim(session_a, job.id)

    future = services.record_outcome(session=session_a, outcome=make(job.id, attempt + 1))
    assert future == STALE
    assert snapshot(job.id)["status"] == Status.RUNNING


@pytest.mark.parametrize("kind", OUTCOMES)
def test_rule4_outcome_for_attempt_zero_of_a_never_claimed_job_is_stale(job, kind):
    make, _ = OUTCOMES[kind]
    before = snapshot(job.id)

    ack = services.record_outcome(session=uuid.uuid4(), outcome=make(job.id, 0))

    assert ack == STALE
    assert snapshot(job.id) == before and before["status"] == Status.QUEUED


def test_rule4_outcome_for_a_job_failed_as_poison_is_stale(session_a):
    job = services.enqueue(url="https://example.com/poison", actor="test")
    Job.objects.filter(id=job.id).update(max_interruptions=1)
    attempt = claim(session_a, job.id)
    services.reset_running_jobs(session=session_a, reason="crashed", actor="bus")
    before = snapshot(job.id)

    assert services.record_outcome(session=session_a, outcome=done(job.id, attempt)) == STALE
    assert snapshot(job.id) == before and before["status"] == Status.FAILED


# --- Retryable failures --------------------------------------------------------------


def test_retryable_failure_requeues_with_run_after_in_the_future_while_attempts_remain(job, session_a):
    Job.objects.filter(id=job.id).update(max_attempts=3)
    at = timezone.now()
    for expected_failures in (1, 2):
        attempt = claim(session_a, job.id)
        acks = services.record_outcomes(
            session=session_a, outcomes=[failed(job.id, attempt, retryable=True, error="503")], at=at
        )
        assert acks == [RECORDED]
        row = snapshot(job.id)
        assert row["status"] == Status.QUEUED
        assert row["failures"] == expected_failures
        assert row["run_after"] > at
        assert row["lease_session"] is None and row["finished_at"] is None
        # Not claimable before run_after.
        assert services.claim_jobs(session=session_a, limit=1, lease_seconds=60, at=at) == []
        # Skip the delay by hand, and the host's wait for it, which the empty claim just set.
        Job.objects.filter(id=job.id).update(run_after=None)
        Host.objects.filter(jobs=job.id).update(ready_at=LONG_AGO)

    attempt = claim(session_a, job.id)
    assert services.record_outcome(session=session_a, outcome=failed(job.id, attempt, retryable=True)) == RECORDED
    row = snapshot(job.id)
    assert row["status"] == Status.FAILED and row["failures"] == 3 and row["finished_at"] is not None
    assert [e.to_status for e in events(job.id, EventKind.OUTCOME)] == [Status.QUEUED, Status.QUEUED, Status.FAILED]


def test_retry_backoff_grows_with_failures(job, session_a):
    at = timezone.now()
    delays = []
    for _ in range(2):
        attempt = claim(session_a, job.id)
        services.record_outcomes(session=session_a, outcomes=[failed(job.id, attempt, retryable=True)], at=at)
        delays.append(snapshot(job.id)["run_after"] - at)
        Job.objects.filter(id=job.id).update(run_after=None)
    assert delays[0] < delays[1]


def test_non_retryable_failure_fails_at_once(job, session_a):
    attempt = claim(session_a, job.id)

    assert services.record_outcome(session=session_a, outcome=failed(job.id, attempt, error="404")) == RECORDED
    row = snapshot(job.id)
    assert (row["status"], row["error"], row["failures"]) == (Status.FAILED, "404", 0)


# --- Batches ---------------------------------------------------------------------------


def test_duplicate_outcomes_in_one_batch_are_recorded_once(job, session_a):
    attempt = claim(session_a, job.id)

    acks = services.record_outcomes(
        session=session_a,
        outcomes=[done(job.id, attempt, {"n": 1}), done(job.id, attempt, {"n": 2}), failed(job.id, attempt)],
    )

    assert acks == [RECORDED, RECORDED, RECORDED]
    row = snapshot(job.id)
    assert row["status"] == Status.SUCCEEDED and row["result"] == {"n": 1}
    assert len(events(job.id, EventKind.OUTCOME)) == 1


def test_duplicate_retryable_failures_in_one_batch_count_one_failure(job, session_a):
    attempt = claim(session_a, job.id)

    acks = services.record_outcomes(
        session=session_a,
        outcomes=[failed(job.id, attempt, retryable=True)] * 2,
    )

    assert acks == [RECORDED, RECORDED]
    assert snapshot(job.id)["failures"] == 1
    assert len(events(job.id, EventKind.OUTCOME)) == 1


def test_batch_acks_each_outcome_in_order(session_a, session_b):
    jobs = services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(3)], actor="test")
    claimed = services.claim_jobs(session=session_a, limit=3, lease_seconds=60)
    services.reset_running_jobs(job_ids=[jobs[2].id], reason="lost", actor="test")
    services.claim_jobs(session=session_b, limit=1, lease_seconds=60)  # jobs[2], attempt 2
    attempts = {c.id: c.attempt for c in claimed}

    acks = services.record_outcomes(
        session=session_a,
        outcomes=[
            done(jobs[0].id, attempts[jobs[0].id]),
            done(123_456_789, 1),
            done(jobs[2].id, attempts[jobs[2].id]),
            failed(jobs[1].id, attempts[jobs[1].id]),
        ],
    )

    assert acks == [RECORDED, STALE, STALE, RECORDED]
    assert Job.objects.get(id=jobs[0].id).status == Status.SUCCEEDED
    assert Job.objects.get(id=jobs[1].id).status == Status.FAILED
    assert Job.objects.get(id=jobs[2].id).status == Status.RUNNING


def test_empty_batch_records_nothing():
    assert services.record_outcomes(session=None, outcomes=[]) == []


# --- A person's cancel and retry -----------------------------------------------------


def test_cancel_moves_queued_and_running_jobs_and_skips_finished_ones(session_a):
    # Claim order is by priority: `running` first, then `finished`; `queued` stays queued.
    running = services.enqueue(url="https://example.com/r", priority=10, actor="test")
    finished = services.enqueue(url="https://example.com/f", priority=5, actor="test")
    queued = services.enqueue(url="https://example.com/q", priority=0, actor="test")
    claim(session_a, running.id)
    claim(session_a, finished.id)
    services.record_outcome(session=session_a, outcome=done(finished.id, 1))

    result = services.cancel_jobs(
        job_ids=[queued.id, running.id, finished.id, 999_999_999, running.id], actor="admin:alice", reason="not needed"
    )

    assert result == ChangeResult(changed=2, skipped=2, running=[(running.id, 1, session_a)])
    for job_id in (queued.id, running.id):
        row = snapshot(job_id)
        assert row["status"] == Status.CANCELLED
        assert row["lease_session"] is None and row["lease_expires_at"] is None
        assert row["finished_at"] is not None
    assert snapshot(finished.id)["status"] == Status.SUCCEEDED
    cancel_events = {e.job_id: e for e in JobEvent.objects.filter(kind=EventKind.CANCEL)}
    assert set(cancel_events) == {queued.id, running.id}
    assert (cancel_events[running.id].from_status, cancel_events[running.id].session) == (Status.RUNNING, session_a)
    assert cancel_events[queued.id].from_status == Status.QUEUED
    assert all(
        e.to_status == Status.CANCELLED and e.actor == "admin:alice" and e.reason == "not needed"
        for e in cancel_events.values()
    )


def test_cancelling_twice_skips_the_second_time(job):
    assert services.cancel_jobs(job_ids=[job.id], actor="test").changed == 1
    assert services.cancel_jobs(job_ids=[job.id], actor="test") == ChangeResult(changed=0, skipped=1)
    assert len(events(job.id, EventKind.CANCEL)) == 1


def test_retry_requeues_failed_and_cancelled_jobs_moving_abandoned_attempts_on(session_a, session_b):
    poisoned, cancelled, running, queued = services.enqueue_many(
        urls=[f"https://example.com/{i}" for i in range(4)], actor="test"
    )
    # Alone in its session, so that its interruption is a poison verdict.
    Job.objects.filter(id=poisoned.id).update(max_interruptions=1, failures=2, max_attempts=5, priority=1)
    services.claim_jobs(session=session_b, limit=1, lease_seconds=60)
    services.claim_jobs(session=session_a, limit=2, lease_seconds=60)
    services.reset_running_jobs(job_ids=[poisoned.id], reason="crashed", actor="bus")
    services.cancel_jobs(job_ids=[cancelled.id], actor="test")
    assert snapshot(poisoned.id)["status"] == Status.FAILED

    result = services.retry_jobs(job_ids=[poisoned.id, cancelled.id, running.id, queued.id], actor="admin:bob")

    assert result == ChangeResult(changed=2, skipped=2)
    for job_id in (poisoned.id, cancelled.id):
        row = snapshot(job_id)
        assert row["status"] == Status.QUEUED
        # Attempt 1 was abandoned without an outcome: the retry fences it off.
        assert row["attempt"] == 2
        assert row["failures"] == 0 and row["interruptions"] == 0
        assert row["error"] == "" and row["finished_at"] is None and row["run_after"] is None
    assert snapshot(running.id)["status"] == Status.RUNNING
    retry_events = list(JobEvent.objects.filter(kind=EventKind.RETRY).order_by("job_id"))
    assert [(e.job_id, e.from_status, e.to_status, e.attempt, e.actor) for e in retry_events] == [
        (poisoned.id, Status.FAILED, Status.QUEUED, 2, "admin:bob"),
        (cancelled.id, Status.CANCELLED, Status.QUEUED, 2, "admin:bob"),
    ]

    # The next claim continues the sequence: attempts only grow.
    reclaimed = services.claim_jobs(session=session_a, limit=5, lease_seconds=60)
    assert {(c.id, c.attempt) for c in reclaimed} == {(poisoned.id, 3), (cancelled.id, 3), (queued.id, 1)}


def test_late_outcome_of_a_cancelled_attempt_stays_stale_after_a_retry(job, session_a):
    attempt = claim(session_a, job.id)
    services.cancel_jobs(job_ids=[job.id], actor="test")
    services.retry_jobs(job_ids=[job.id], actor="test")

    assert services.record_outcome(session=session_a, outcome=done(job.id, attempt)) == STALE
    assert snapshot(job.id)["status"] == Status.QUEUED


def test_retry_of_a_job_with_a_recorded_failure_keeps_its_attempt(job, session_a):
    attempt = claim(session_a, job.id)
    services.record_outcome(session=session_a, outcome=failed(job.id, attempt, error="boom"))
    services.retry_jobs(job_ids=[job.id], actor="test")

    assert snapshot(job.id)["attempt"] == attempt
    assert services.record_outcome(session=session_a, outcome=failed(job.id, attempt, error="boom")) == RECORDED


def test_outcome_of_the_attempt_before_a_retry_is_stale_after_the_re_claim(job, session_a, session_b):
    first = claim(session_a, job.id)
    services.record_outcome(session=session_a, outcome=failed(job.id, first))
    services.retry_jobs(job_ids=[job.id], actor="test")
    second = claim(session_b, job.id)

    assert second == first + 1
    # A resend of attempt 1's recorded outcome is still "recorded" (rule 2), and changes nothing.
    assert services.record_outcome(session=session_a, outcome=failed(job.id, first)) == RECORDED
    # attempt 2's outcome is recorded normally.
    assert services.record_outcome(session=session_b, outcome=done(job.id, second)) == RECORDED
    assert snapshot(job.id)["status"] == Status.SUCCEEDED
