"""DjangoStore: the bus's narrow interface to the database."""

import uuid

import pytest

from bus.store import DjangoStore
from jobs import services
from jobs.models import Job, JobEvent, Status


@pytest.mark.postgres
@pytest.mark.django_db(transaction=True)
def test_an_outcome_the_database_refuses_fails_its_job_instead_of_stalling_the_session():
    store = DjangoStore(heartbeat_timeout=30)
    session = uuid.uuid4()
    good, bad = services.enqueue_many(urls=["https://example.com/a", "https://example.com/b"], actor="test")
    services.claim_jobs(session=session, limit=2, lease_seconds=60, crawler="unix:/x")

    acks = store.record_outcomes(
        session=session,
        endpoint="unix:/x",
        audit_stale=100,
        outcomes=[
            services.Outcome(job_id=good.id, attempt=1, succeeded=True, result={"title": "fine"}),
            # PostgreSQL's jsonb refuses \u0000: a DataError every time it is retried.
            services.Outcome(job_id=bad.id, attempt=1, succeeded=True, result={"title": "nul \u0000 here"}),
        ],
    )

    assert acks == ["recorded", "recorded"]
    assert Job.objects.get(id=good.id).status == Status.SUCCEEDED
    refused = Job.objects.get(id=bad.id)
    assert refused.status == Status.FAILED
    assert "could not be stored" in refused.error
    assert JobEvent.objects.filter(job_id=bad.id, kind="outcome").count() == 1


@pytest.mark.django_db
def test_recover_dead_sessions_requeues_jobs_of_a_dead_local_bus_and_spares_live_ones():
    import socket

    from django.utils import timezone

    from bus.models import BusSession

    store = DjangoStore(heartbeat_timeout=30)
    host = socket.gethostname()
    dead_session, live_session = uuid.uuid4(), uuid.uuid4()
    # pid 2**22 + 1 is above Linux's pid_max default range: no such process.
    for session, node in ((dead_session, f"{host}:{2**22 + 1}"), (live_session, f"{host}:1")):
        BusSession.objects.create(
            session=session,
            node=node,
            endpoint="unix:/x",
            connected_at=timezone.now(),
            last_heartbeat_at=timezone.now(),
        )
    first, second = services.enqueue_many(urls=["https://example.com/1", "https://example.com/2"], actor="test")
    services.claim_jobs(session=dead_session, limit=1, lease_seconds=60)
    services.claim_jobs(session=live_session, limit=1, lease_seconds=60)

    assert store.recover_dead_sessions(node=f"{host}:999", explicit_node=False, heartbeat_timeout=30) == 1

    assert Job.objects.get(id=first.id).status == Status.QUEUED
    assert Job.objects.get(id=second.id).status == Status.RUNNING
    assert BusSession.objects.get(session=dead_session).state == "lost"
    assert BusSession.objects.get(session=live_session).state == "connected"
    event = JobEvent.objects.get(job_id=first.id, kind="interrupt")
    assert event.actor == "sweeper" and "is gone" in event.reason
