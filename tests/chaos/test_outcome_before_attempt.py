"""A finding of the chaos suite's hostile crawler, reduced to the services (issue 9, outcome authority).

Seen in a chaos run (SQLite): the hostile crawler's flood session E sent `failed` for
(job 2849, attempt 1) while that job was still queued at attempt 0, and was closed
(too_many_stale). Its worker went on recording E's backlog after the close; meanwhile the
bus opened the next session C to the same endpoint, which was assigned (2849, 1). E's
backlog outcome then met a job running at attempt 1 with `crawler` = E's endpoint, and
was recorded: the job ended `failed` with E's made-up error, from a session that never
held that attempt and sent its outcome before the attempt existed.

PROTOCOL.md rule 1 records an outcome from the session holding the job "or from an
earlier session with the same crawler endpoint (a resend after a reconnect)": the
reporting session must be the holder or a later one, never an older one. The services
checked only the endpoint then; since 3b8de6f they also order sessions (Job.attempt_session,
BusSession.connected_at). The first test (a real resend from the older session that held
the attempt) must keep passing; the second is the finding.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.utils import timezone

from jobs import services
from jobs.models import BusSession
from jobs.services import RECORDED, STALE, Outcome

pytestmark = pytest.mark.django_db

ENDPOINT = "unix:/run/hostile.sock"


def failed(job_id: int, attempt: int) -> Outcome:
    return Outcome(job_id=job_id, attempt=attempt, succeeded=False, error="made up", retryable=False)


def test_a_resend_from_the_older_session_that_held_the_attempt_is_recorded():
    """Session E held (job, 1) and was cut; C re-leased it after the reconnect; E's backlog reports it."""
    job = services.enqueue(url="https://example.com/a", actor="test")
    older, newer = uuid.uuid4(), uuid.uuid4()
    [claimed] = services.claim_jobs(session=older, limit=1, lease_seconds=60, crawler=ENDPOINT)
    services.reset_running_jobs(session=older, reason="connection closed by the crawler (EOF)", actor="bus")
    taken, refused = services.re_lease_jobs(
        session=newer, running=[(job.id, claimed.attempt)], lease_seconds=60, crawler=ENDPOINT
    )
    assert (taken, refused) == ([(job.id, claimed.attempt)], [])
    acks = services.record_outcomes(session=older, outcomes=[failed(job.id, claimed.attempt)], crawler=ENDPOINT)
    assert acks == [RECORDED]


def test_an_outcome_sent_before_its_attempt_existed_is_not_recorded():
    """Session E (ended) reports attempt 1 of a job that was only later claimed by session C."""
    job = services.enqueue(url="https://example.com/b", actor="test")
    older, newer = uuid.uuid4(), uuid.uuid4()
    # The bus writes each session's row before it handles any frame of it.
    connected = timezone.now()
    for session, at in ((older, connected - timedelta(seconds=5)), (newer, connected)):
        BusSession.objects.create(session=session, node="bus:1", endpoint=ENDPOINT, connected_at=at)
    # E never held the job. A first outcome from E, while the job is still queued at attempt 0, is stale:
    assert services.record_outcomes(session=older, outcomes=[failed(job.id, 1)], crawler=ENDPOINT) == [STALE]
    # The next session of the same endpoint is assigned attempt 1...
    [claimed] = services.claim_jobs(session=newer, limit=1, lease_seconds=60, crawler=ENDPOINT)
    assert claimed.attempt == 1
    # ...and E's backlog (the same made-up outcome, recorded after E's close) arrives now.
    acks = services.record_outcomes(session=older, outcomes=[failed(job.id, 1)], crawler=ENDPOINT)
    job.refresh_from_db()
    assert acks == [STALE], (
        f"an outcome from session {older}, which never held attempt 1 and is older than the session "
        f"{newer} it was claimed by, was recorded: the job is now {job.status} ({job.error!r})"
    )
