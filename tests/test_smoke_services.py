import uuid

import pytest

from jobs import services
from jobs.models import Job, JobEvent, Status


@pytest.mark.django_db
def test_claim_reset_outcome_round_trip():
    jobs = services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(5)], actor="test")
    session = uuid.uuid4()
    claimed = services.claim_jobs(session=session, limit=3, lease_seconds=60)
    assert [c.id for c in claimed] == [j.id for j in jobs[:3]]
    assert all(c.attempt == 1 for c in claimed)
    counts = services.reset_running_jobs(session=session, reason="session lost", actor="test")
    assert counts == services.ResetCounts(requeued=3, failed=0)
    assert Job.objects.filter(status=Status.QUEUED).count() == 5
    ack = services.record_outcome(session=session, outcome=services.Outcome(job_id=jobs[0].id, attempt=1, succeeded=True, result={"a": 1}))
    assert ack == "recorded"
    assert Job.objects.get(id=jobs[0].id).status == Status.SUCCEEDED
    assert JobEvent.objects.filter(job_id=jobs[1].id).count() == 3
