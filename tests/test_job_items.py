"""Stored items (docs/protocol.md section 17): a `done`'s `items`, kept with the recorded outcome and exported.

The wire cases run a real `runbus` against a scripted crawler peer
(tests/crawler_peer.py), as tests/test_bus_protocol.py does, and check the
frames the bus answers and the JobItems row it wrote. The export cases read
the rows through the pages and the API with a real test client.
"""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from jobs import services
from jobs.models import Job, JobItems, Status
from jobs.services import RECORDED, STALE, Outcome
from tests.test_bus_protocol import bus_and_peer, enqueue, pending, probe

pytestmark = pytest.mark.django_db(transaction=True)

ITEMS = [
    {"title": "Ünïcode ✓", "price": 12.5, "tags": ["a", "b"]},
    {"title": "with a NUL \u0000 and a newline \n inside", "nested": {"deep": [1, {"x": None}]}},
]


def done(job_id: int, attempt: int, items=None, result: dict | None = None) -> dict:
    frame = {"type": "done", "job_id": job_id, "attempt": attempt, "result": result or {"items": 2}}
    if items is not None:
        frame["items"] = items
    return frame


def ack_of(peer, job_id: int, attempt: int) -> str:
    return peer.recv("ack", where=lambda f: (f["job_id"], f["attempt"]) == (job_id, attempt))["status"]


def stored(job_id: int) -> JobItems | None:
    return JobItems.objects.filter(job_id=job_id).first()


def parsed(lines: str) -> list[dict]:
    assert lines == "" or lines.endswith("\n")
    return [json.loads(line) for line in lines.splitlines()]


def viewer_client(client, django_user_model):
    user = django_user_model.objects.create_user("items-viewer", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(user)
    return client


# --- On the wire ------------------------------------------------------------------------------


def test_items_are_stored_with_the_recorded_done_and_a_resend_changes_nothing(
    processes, short_socket_path, client, django_user_model
):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        peer.send(done(job_id, 1, ITEMS))
        assert ack_of(peer, job_id, 1) == RECORDED
        # The ack promises the commit: the row is there at once, with the job's result.
        row = stored(job_id)
        assert row is not None
        assert (row.attempt, row.count, row.truncated) == (1, 2, False)
        assert parsed(row.lines) == ITEMS
        assert Job.objects.get().result == {"items": 2}  # result.items is the crawler's own count, untouched
        before = (row.lines, row.recorded_at)

        # A resend (rule 2), even with other items, changes nothing and adds no row.
        peer.send(done(job_id, 1, [{"other": True}]))
        assert ack_of(peer, job_id, 1) == RECORDED
        assert JobItems.objects.count() == 1
        row = stored(job_id)
        assert row is not None and (row.lines, row.recorded_at) == before

    # What a person sees and downloads.
    viewer = viewer_client(client, django_user_model)
    page = viewer.get(reverse("jobs:detail", args=[job_id])).content.decode()
    assert "Items: 2" in page and "(truncated)" not in page
    assert f'href="/jobs/{job_id}/items.jsonl"' in page
    download = viewer.get(f"/jobs/{job_id}/items.jsonl")
    assert download.status_code == 200
    assert parsed(download.content.decode("utf-8")) == ITEMS


def test_a_stale_done_and_any_failed_store_no_items(processes, short_socket_path):
    stale_id, failed_id = enqueue(2)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=2)
        peer.recv_many("assign", 2)
        # Rule 4: attempt 2 was never assigned. An unknown job likewise.
        peer.send(done(stale_id, 2, ITEMS))
        assert ack_of(peer, stale_id, 2) == STALE
        peer.send(done(stale_id + 1000, 1, ITEMS))
        assert ack_of(peer, stale_id + 1000, 1) == STALE
        # A failed is recorded, and whatever `items` it carries is not stored.
        peer.send({"type": "failed", "job_id": failed_id, "attempt": 1, "error": "boom", "items": ITEMS})
        assert ack_of(peer, failed_id, 1) == RECORDED
        assert Job.objects.get(id=failed_id).status == Status.FAILED
        assert Job.objects.get(id=stale_id).status == Status.RUNNING
        assert JobItems.objects.count() == 0


def test_a_later_attempts_recorded_done_replaces_the_stored_items(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        assert peer.recv("assign")["attempt"] == 1
        # A 429 with Retry-After 0 sends the job back (section 14) with its done recorded: items stored.
        peer.send(done(job_id, 1, [{"page": 1}], result={"status": 429, "retry_after": 0}))
        assert ack_of(peer, job_id, 1) == RECORDED
        row = stored(job_id)
        assert row is not None and (row.attempt, parsed(row.lines)) == (1, [{"page": 1}])

        assert peer.recv("assign", where=lambda f: f["job_id"] == job_id)["attempt"] == 2
        peer.send(done(job_id, 2, [{"page": 2}, {"page": 3}], result={"status": 200}))
        assert ack_of(peer, job_id, 2) == RECORDED
        assert JobItems.objects.count() == 1
        row = stored(job_id)
        assert row is not None and (row.attempt, row.count, parsed(row.lines)) == (2, 2, [{"page": 2}, {"page": 3}])
        assert Job.objects.get().status == Status.SUCCEEDED

        # The late resend of attempt 1's done (rule 2) does not bring the old items back.
        peer.send(done(job_id, 1, [{"page": 1}], result={"status": 429, "retry_after": 0}))
        assert ack_of(peer, job_id, 1) == RECORDED
        assert parsed(stored(job_id).lines) == [{"page": 2}, {"page": 3}]  # type: ignore[union-attr]


@pytest.mark.parametrize("cap", [3, 0])
def test_job_items_max_cuts_the_items_and_zero_stores_none(processes, short_socket_path, cap):
    [job_id] = enqueue(1)
    items = [{"n": n} for n in range(5)]
    with bus_and_peer(processes, short_socket_path, JOB_ITEMS_MAX=str(cap)) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        peer.send(done(job_id, 1, items))
        assert ack_of(peer, job_id, 1) == RECORDED
        assert Job.objects.get().status == Status.SUCCEEDED
        row = stored(job_id)
        if cap == 0:
            assert row is None
        else:
            assert row is not None and (row.count, row.truncated) == (3, True)
            assert parsed(row.lines) == items[:3]


def test_items_the_crawler_cut_itself_are_marked_truncated_too(processes, short_socket_path):
    [job_id] = enqueue(1)
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        peer.send(done(job_id, 1, ITEMS, result={"items": 40, "items_truncated": True}))
        assert ack_of(peer, job_id, 1) == RECORDED
        row = stored(job_id)
        assert row is not None and (row.count, row.truncated) == (2, True)


def test_bad_items_are_invalid_and_the_outcome_is_not_recorded(processes, short_socket_path):
    [job_id] = enqueue(1)
    bad = ["not a list", {"a": 1}, 7, [1], [{"ok": 1}, "a string"], [[{"nested": "list"}]], [None]]
    with bus_and_peer(processes, short_socket_path) as (peer, bus):
        peer.handshake(slots=1)
        peer.recv("assign")
        for items in bad:
            peer.send(done(job_id, 1, items))
            error = peer.recv("error")
            assert error["code"] == "invalid", (items, error)
            assert (error["job_id"], error["attempt"]) == (job_id, 1)
            assert "items" in error["message"]
        probe(peer)  # every frame above was read and answered: the session stays
        assert pending(peer, "ack") == []
        job = Job.objects.get()
        assert (job.status, job.outcome_attempt, job.result) == (Status.RUNNING, None, None)
        assert JobItems.objects.count() == 0
        # The same outcome with good items is then recorded.
        peer.send(done(job_id, 1, []))
        assert ack_of(peer, job_id, 1) == RECORDED
        row = stored(job_id)
        assert row is not None and (row.count, row.lines, row.truncated) == (0, "", False)


# --- In the services: the outcome path's cost, text that PostgreSQL would refuse ----------------


def finished_with(items, *, session) -> int:
    """A job claimed by `session` and its done recorded (through services, as the bus's store calls it)."""
    [job_id] = enqueue(1)
    [claimed] = services.claim_jobs(session=session, limit=1, lease_seconds=60)
    outcome = Outcome(job_id=job_id, attempt=claimed.attempt, succeeded=True, result={}, items=items)
    assert services.record_outcome(session=session, outcome=outcome) == RECORDED
    return job_id


def test_a_batch_without_items_runs_no_query_on_stored_items(session_a):
    ids = enqueue(3)
    claimed = services.claim_jobs(session=session_a, limit=3, lease_seconds=60)
    plain = [Outcome(job_id=c.id, attempt=c.attempt, succeeded=True, result={}) for c in claimed[:2]]
    table = JobItems._meta.db_table
    with CaptureQueriesContext(connection) as queries:
        assert services.record_outcomes(session=session_a, outcomes=plain) == [RECORDED, RECORDED]
    assert not [q for q in queries.captured_queries if table in q["sql"]]
    last = claimed[2]
    with_items = Outcome(job_id=last.id, attempt=last.attempt, succeeded=True, result={}, items=[{"a": 1}])
    with CaptureQueriesContext(connection) as queries:
        assert services.record_outcomes(session=session_a, outcomes=[with_items]) == [RECORDED]
    assert len([q for q in queries.captured_queries if table in q["sql"]]) == 1  # one upsert
    assert sorted(JobItems.objects.values_list("job_id", flat=True)) == [ids[2]]


def test_an_item_with_a_lone_surrogate_is_stored_with_ascii_escapes(session_a):
    items = [{"text": "\ud800 alone", "ok": "é"}]
    job_id = finished_with(items, session=session_a)
    row = stored(job_id)
    assert row is not None and row.lines.isascii()
    assert parsed(row.lines) == items


# --- Export ---------------------------------------------------------------------------------


@pytest.fixture
def job_with_items(session_a) -> int:
    return finished_with(ITEMS, session=session_a)


@pytest.mark.parametrize("url", ["/jobs/{id}/items.jsonl", "/api/jobs/{id}/items.jsonl"])
def test_export_is_a_json_lines_download(client, django_user_model, job_with_items, url):
    response = viewer_client(client, django_user_model).get(url.format(id=job_with_items))
    assert response.status_code == 200
    assert response["Content-Type"] == "application/jsonl; charset=utf-8"
    assert response["Content-Disposition"] == f'attachment; filename="job-{job_with_items}-items.jsonl"'
    assert parsed(response.content.decode("utf-8")) == ITEMS


@pytest.mark.parametrize("url", ["/jobs/{id}/items.jsonl", "/api/jobs/{id}/items.jsonl"])
def test_export_is_404_without_stored_items(client, django_user_model, url):
    [job_id] = enqueue(1)
    viewer = viewer_client(client, django_user_model)
    assert viewer.get(url.format(id=job_id)).status_code == 404
    assert viewer.get(url.format(id=job_id + 1000)).status_code == 404


def test_export_needs_sign_in_and_the_view_permission(client, django_user_model, job_with_items):
    page, api = f"/jobs/{job_with_items}/items.jsonl", f"/api/jobs/{job_with_items}/items.jsonl"
    response = client.get(page)
    assert response.status_code == 302 and "/accounts/login/" in response["Location"]
    response = client.get(api)
    assert response.status_code == 401 and "error" in response.json()
    client.force_login(django_user_model.objects.create_user("no-permission", password="pw"))
    assert client.get(page).status_code == 403
    assert client.get(api).status_code == 403


def test_job_page_and_api_say_how_many_items_are_stored(client, django_user_model, session_a):
    cut = finished_with([{"n": 1}], session=session_a)
    JobItems.objects.filter(job_id=cut).update(truncated=True)  # as the cap leaves it
    [none] = enqueue(1)
    viewer = viewer_client(client, django_user_model)
    page = viewer.get(reverse("jobs:detail", args=[cut])).content.decode()
    assert "Items: 1 (truncated)" in page
    assert "Items:" not in viewer.get(reverse("jobs:detail", args=[none])).content.decode()
    body = viewer.get(reverse("jobs:api_detail", args=[cut])).json()
    assert (body["items_stored"], body["items_truncated"], body["items_href"]) == (
        1,
        True,
        f"/api/jobs/{cut}/items.jsonl",
    )
    body = viewer.get(reverse("jobs:api_detail", args=[none])).json()
    assert (body["items_stored"], body["items_truncated"], body["items_href"]) == (None, None, None)
