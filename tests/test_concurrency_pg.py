"""Claimers and resetters racing over the same jobs on PostgreSQL.

Four threads claim (each batch for a fresh session) while two threads requeue
running jobs, all on the same 2,000 jobs for a few seconds. Afterwards the
audit trail must show that no job was ever held by two sessions at once, no
job vanished, and every interruption the resetters reported was counted
exactly once.
"""

from __future__ import annotations

import random
import threading
import time
import traceback
import uuid
from collections import defaultdict

import pytest
from django.db import connection
from django.db.models import Sum

from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status

JOBS = 2_000
RUN_SECONDS = 3.0
CLAIMERS = 4
RESETTERS = 2


class Race:
    """What the threads share: a start line, a deadline, and what they report."""

    def __init__(self, threads: int):
        self.start = threading.Barrier(threads)
        self.deadline = 0.0
        self.errors: list[str] = []
        self.reset_counts: list[services.ResetCounts] = []
        self.claimed = 0
        self.lock = threading.Lock()

    def run(self, name: str, work) -> threading.Thread:
        def body():
            try:
                self.start.wait(timeout=30)
                work()
            except BaseException:
                self.errors.append(f"{name}:\n{traceback.format_exc()}")
            finally:
                connection.close()  # each thread has its own connection; close it

        thread = threading.Thread(target=body, name=name, daemon=True)
        thread.start()
        return thread


def claimer(race: Race, seed: int):
    rng = random.Random(seed)

    def work():
        while time.monotonic() < race.deadline:
            claimed = services.claim_jobs(session=uuid.uuid4(), limit=rng.randint(10, 100), lease_seconds=60)
            with race.lock:
                race.claimed += len(claimed)

    return work


def resetter(race: Race, seed: int, job_ids: list[int]):
    rng = random.Random(seed)

    def work():
        while time.monotonic() < race.deadline:
            if rng.random() < 0.5:
                counts = services.reset_running_jobs(reason="race: all", actor=f"resetter-{seed}")
            else:
                listed = rng.sample(job_ids, 300)
                counts = services.reset_running_jobs(job_ids=listed, reason="race: some", actor=f"resetter-{seed}")
            race.reset_counts.append(counts)

    return work


@pytest.mark.postgres
@pytest.mark.slow
def test_concurrent_claims_and_resets_never_share_lose_or_double_count_a_job(transactional_db):
    jobs = services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(JOBS)], actor="test")
    job_ids = [job.id for job in jobs]
    # A quarter of the jobs keep the default budget of 3 interruptions, so the
    # poison path (running -> failed) races too; the rest keep cycling.
    Job.objects.filter(id__in=job_ids[JOBS // 4 :]).update(max_interruptions=1_000_000)

    race = Race(CLAIMERS + RESETTERS)
    race.deadline = time.monotonic() + RUN_SECONDS + 1.0  # the start barrier is inside that second
    threads = [race.run(f"claimer-{n}", claimer(race, n)) for n in range(CLAIMERS)]
    threads += [race.run(f"resetter-{n}", resetter(race, 100 + n, job_ids)) for n in range(RESETTERS)]
    for thread in threads:
        thread.join(timeout=RUN_SECONDS + 60)
    assert not any(thread.is_alive() for thread in threads), "a thread did not finish"
    assert not race.errors, "\n".join(race.errors)

    # The race did happen.
    reported = sum(counts.total for counts in race.reset_counts)
    assert race.claimed > JOBS
    assert reported > JOBS // 2

    # None vanished.
    assert sorted(Job.objects.values_list("id", flat=True)) == sorted(job_ids)

    # Every interruption reported was counted once, and audited once.
    interruptions = Job.objects.aggregate(total=Sum("interruptions"))["total"]
    assert interruptions == reported
    assert JobEvent.objects.filter(kind=EventKind.INTERRUPT).count() == reported
    assert Job.objects.filter(status=Status.FAILED).count() == sum(c.failed for c in race.reset_counts)

    # Per job, the trail is enqueue, then claim / interrupt strictly alternating:
    # a job is never claimed while another session holds it, each interrupt
    # ends the lease of the session that claimed it, and attempts only grow.
    trail = defaultdict(list)
    for event in JobEvent.objects.order_by("job_id", "id").values_list(
        "job_id", "kind", "to_status", "attempt", "session"
    ):
        trail[event[0]].append(event[1:])
    columns = ("id", "status", "attempt", "interruptions", "lease_session")
    jobs_now = {job["id"]: job for job in Job.objects.values(*columns)}
    for job_id in job_ids:
        events = trail[job_id]
        assert events[0][0] == EventKind.ENQUEUE, (job_id, events)
        holder = None  # (attempt, session) of the current lease
        last_attempt = 0
        claims = interrupts = 0
        finished = False
        for kind, to_status, attempt, session in events[1:]:
            assert not finished, f"job {job_id} changed after it failed: {events}"
            if kind == EventKind.CLAIM:
                assert holder is None, f"job {job_id} claimed while held by {holder}: {events}"
                assert attempt > last_attempt, f"job {job_id} attempt did not grow: {events}"
                holder, last_attempt = (attempt, session), attempt
                claims += 1
            elif kind == EventKind.INTERRUPT:
                assert holder == (attempt, session), f"job {job_id} interrupted without that lease: {events}"
                holder = None
                interrupts += 1
                finished = to_status == Status.FAILED
            else:
                pytest.fail(f"job {job_id} has an unexpected {kind} event: {events}")
        job = jobs_now[job_id]
        assert (job["attempt"], job["interruptions"]) == (claims, interrupts), (job, events)
        if holder is not None:
            assert (job["status"], job["attempt"], job["lease_session"]) == (Status.RUNNING, *holder), (job, events)
        else:
            assert job["status"] == (Status.FAILED if finished else Status.QUEUED), (job, events)
            assert job["lease_session"] is None
