"""Job kinds (docs/protocol.md section 16): which sessions a job may go to, and everywhere a kind is set and shown."""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from bus.models import BusSession
from jobs import dispatch, services
from jobs.models import Host, Job, Status

no_politeness = override_settings(ROBOTS_TXT="ignore", HOST_DELAY=0.0, HOST_CONCURRENCY=100)
one_second_apart = override_settings(ROBOTS_TXT="ignore", HOST_DELAY=1.0, HOST_CONCURRENCY=100)


def enqueue(*urls: str, kind: str = "", priority: int = 0) -> list[Job]:
    return services.enqueue_many(urls=list(urls), kind=kind, priority=priority, actor="test")


def claim(kinds=None, *, session=None, limit=100, at=None) -> dispatch.Claim:
    return dispatch.claim(
        session=session or uuid.uuid4(), limit=limit, lease_seconds=600, crawler="c", at=at, kinds=kinds
    )


def host_state(key: str) -> tuple:
    return Host.objects.filter(key=key).values_list("active", "top_priority", "ready_at", "next_start_at").get()


# --- The claim ---------------------------------------------------------------------------


@pytest.mark.django_db
@no_politeness
def test_a_session_with_kinds_gets_jobs_without_a_kind_and_of_its_kinds_never_others():
    anyone = enqueue("https://any.example/1", "https://mixed.example/1")
    a_jobs = enqueue("https://a.example/1", "https://mixed.example/2", kind="a")
    b_jobs = enqueue("https://b.example/1", "https://mixed.example/3", kind="b", priority=5)

    got = claim(["a"])

    assert sorted(job.id for job in got.jobs) == sorted(job.id for job in anyone + a_jobs)
    assert {job.kind for job in got.jobs} == {"", "a"}
    assert set(Job.objects.filter(status=Status.QUEUED).values_list("id", flat=True)) == {job.id for job in b_jobs}
    rest = claim(None)  # no kinds: every kind
    assert sorted(job.id for job in rest.jobs) == sorted(job.id for job in b_jobs)
    assert {job.kind for job in rest.jobs} == {"b"}


@pytest.mark.django_db
@one_second_apart
def test_a_host_with_only_other_kinds_is_left_ready_for_others_and_gives_no_wait():
    enqueue("https://b.example/1", "https://b.example/2", kind="b")
    before = host_state("b.example")
    at = timezone.now()

    for _ in range(3):
        got = claim(["a"], at=at)
        assert got.jobs == [] and got.wait is None  # nothing to come back for: the session does not spin
    assert host_state("b.example") == before  # not deactivated, its next start and ready time unmoved

    taken = claim(["b"], at=at)
    assert [job.kind for job in taken.jobs] == ["b"]  # one per claim: the host has a delay
    assert taken.wait is None or taken.wait <= 1.0


@pytest.mark.django_db
@one_second_apart
def test_two_sessions_with_different_kinds_on_one_host_both_progress():
    # The host's best jobs are b's: a session that takes only a must still get its turns.
    enqueue(*[f"https://one.example/b{n}" for n in range(3)], kind="b", priority=10)
    enqueue(*[f"https://one.example/a{n}" for n in range(3)], kind="a")
    session_a, session_b = uuid.uuid4(), uuid.uuid4()
    start = timezone.now()
    got: dict[str, list[str]] = {"a": [], "b": []}
    for step in range(6):
        at = start + timedelta(seconds=2 * step)  # past the host's delay each time
        kind, session = ("a", session_a) if step % 2 == 0 else ("b", session_b)
        jobs = claim([kind], session=session, at=at).jobs
        got[kind] += [job.kind for job in jobs]
    assert got == {"a": ["a", "a", "a"], "b": ["b", "b", "b"]}
    assert not Job.objects.filter(status=Status.QUEUED).exists()


@pytest.mark.django_db
@no_politeness
def test_a_suspect_of_another_kind_is_not_given_to_an_idle_session():
    (suspect,) = enqueue("https://s.example/1", kind="b")
    Job.objects.filter(pk=suspect.pk).update(run_alone=True)
    (plain,) = enqueue("https://s.example/2", kind="a")

    got = dispatch.claim(session=uuid.uuid4(), limit=10, lease_seconds=60, alone=True, kinds=["a"])

    assert [job.id for job in got.jobs] == [plain.id]
    assert Job.objects.get(pk=suspect.pk).status == Status.QUEUED


@pytest.mark.django_db
@no_politeness
def test_a_claim_without_kinds_runs_the_sql_it_always_ran():
    enqueue("https://x.example/1", kind="a")
    with CaptureQueriesContext(connection) as without:
        claim(None, limit=5)
    enqueue("https://x.example/2", kind="a")
    with CaptureQueriesContext(connection) as with_kinds:
        claim(["a"], limit=5)
    plain = " ".join(query["sql"] for query in without.captured_queries)
    filtered = " ".join(query["sql"] for query in with_kinds.captured_queries)
    # No kind condition, no per-host probe: only the claimed rows' kind is read back.
    assert "AS k WHERE k.host_id" not in plain and ".kind IN" not in plain and "kind = ANY" not in plain
    assert "AS k WHERE k.host_id" in filtered and (".kind IN" in filtered or "kind = ANY" in filtered)


# --- Setting and showing a kind ---------------------------------------------------------------


@pytest.mark.django_db
def test_enqueue_command_sets_the_kind_and_refuses_a_bad_one():
    out = StringIO()
    call_command("enqueue", "https://k.example/1", "https://k.example/2", "--kind", "news", stdout=out)
    assert list(Job.objects.values_list("kind", flat=True)) == ["news", "news"]
    with pytest.raises(CommandError, match="--kind: kind is 101 characters long"):
        call_command("enqueue", "https://k.example/3", "--kind", "x" * 101, stdout=StringIO())
    with pytest.raises(CommandError, match="--kind: kind holds a NUL character"):
        call_command("enqueue", "https://k.example/3", "--kind", "a\x00b", stdout=StringIO())
    assert Job.objects.count() == 2


@pytest.fixture
def operator_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("op", password="pw", is_staff=True, is_superuser=True))
    return client


@pytest.mark.django_db
def test_the_new_jobs_page_sets_the_kind(operator_client):
    response = operator_client.post(
        "/jobs/new", {"urls": "https://f.example/1\nhttps://f.example/2", "priority": "0", "kind": "news"}
    )
    assert response.status_code == 302
    assert list(Job.objects.values_list("kind", flat=True)) == ["news", "news"]
    form = operator_client.get("/jobs/new").content.decode()
    assert 'name="kind"' in form
    too_long = operator_client.post("/jobs/new", {"urls": "https://f.example/3", "priority": "0", "kind": "x" * 101})
    assert too_long.status_code == 200 and Job.objects.count() == 2


@pytest.mark.django_db
def test_the_job_list_page_and_api_show_and_filter_by_kind(operator_client):
    (news,) = enqueue("https://l.example/news", kind="news")
    (plain,) = enqueue("https://l.example/plain")

    listed = operator_client.get("/jobs/?kind=news").content.decode()
    assert f'data-job-id="{news.id}"' in listed and f'data-job-id="{plain.id}"' not in listed
    page = operator_client.get(f"/jobs/{news.id}/").content.decode()
    assert 'id="job-kind" data-kind="news"' in page

    api = operator_client.get("/api/jobs/?kind=news").json()
    assert [(job["id"], job["kind"]) for job in api["jobs"]] == [(news.id, "news")]
    assert operator_client.get(f"/api/jobs/{plain.id}/").json()["kind"] == ""
    for bad in ("x" * 101, "a\x00b"):
        response = operator_client.get("/api/jobs/", {"kind": bad})
        assert response.status_code == 400 and "kind" in response.json()["error"]


@pytest.mark.django_db
def test_the_admin_lists_filters_and_edits_the_kind_of_a_queued_job(operator_client):
    (news,) = enqueue("https://adm.example/news", kind="news")
    (plain,) = enqueue("https://adm.example/plain")
    listed = operator_client.get("/admin/jobs/job/?kind=news").content.decode()
    assert "field-kind" in listed and f"/admin/jobs/job/{news.id}/change/" in listed
    assert f"/admin/jobs/job/{plain.id}/change/" not in listed
    searched = operator_client.get("/admin/jobs/job/", {"q": "kind:news"}).content.decode()
    assert f"/admin/jobs/job/{news.id}/change/" in searched and f"/admin/jobs/job/{plain.id}/change/" not in searched
    change = operator_client.get(f"/admin/jobs/job/{plain.id}/change/").content.decode()
    assert 'name="kind"' in change


@pytest.mark.django_db
def test_the_dashboard_says_which_kinds_wait_for_a_crawler(operator_client):
    enqueue(*[f"https://d.example/{n}" for n in range(12)], kind="news")
    enqueue("https://d.example/shop", kind="shop")
    enqueue("https://d.example/plain")

    def session(kinds, state="connected"):
        now = timezone.now()
        return BusSession.objects.create(
            session=uuid.uuid4(),
            node="n",
            endpoint=f"/tmp/{uuid.uuid4().hex}.sock",
            crawler="c",
            state=state,
            slots=1,
            kinds=kinds,
            connected_at=now,
            last_heartbeat_at=now,
        )

    session(["shop"])
    session(None, state="lost")  # not connected: takes nothing
    page = operator_client.get("/").content.decode()
    assert "12 jobs</a> of kind <code>news</code> wait for a crawler that takes it" in page
    assert 'data-kind="shop"' not in page  # a connected crawler takes it
    session(["news", "other"])
    assert 'id="waiting-kinds"' not in operator_client.get("/").content.decode()
    BusSession.objects.all().delete()
    session(None)  # takes every kind
    assert 'id="waiting-kinds"' not in operator_client.get("/").content.decode()


# --- On the wire, against a real bus ------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[-1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
def test_on_the_wire_a_crawler_with_kinds_is_assigned_only_what_it_takes_and_stays_idle(processes, short_socket_path):
    from tests.crawler_peer import CrawlerPeer
    from tests.test_bus_protocol import probe, start_bus

    (anyone,) = enqueue("https://w-any.example/1")
    (a_job,) = enqueue("https://w-a.example/1", kind="a")
    b_jobs = enqueue("https://w-b.example/1", "https://w-b.example/2", kind="b")
    b_host = host_state("w-b.example")
    peer = CrawlerPeer(short_socket_path)
    bus = start_bus(processes, short_socket_path, ROBOTS_TXT="ignore", HOST_DELAY="0", BUS_POLL_INTERVAL="0.2")
    try:
        hello = peer.handshake(slots=10, ready_extra={"kinds": ["a", "a", "c"]})
        assigned = {frame["job_id"]: frame for frame in peer.recv_many("assign", 2, timeout=20)}
        assert set(assigned) == {anyone.id, a_job.id}
        assert assigned[a_job.id]["kind"] == "a" and "kind" not in assigned[anyone.id]
        probe(peer)
        assert [frame for frame in peer.frames if frame["type"] == "assign"] == []
        assert BusSession.objects.get(session=hello["session"]).kinds == ["a", "c"]
        # Idle with a host it can never take: no busy loop (a spinning worker burns a core).
        used = cpu_seconds(bus.pid)
        time.sleep(3)  # a measurement window, not a wait for a condition
        assert cpu_seconds(bus.pid) - used < 1.0
        assert [frame for frame in peer.frames if frame["type"] == "assign"] == []
        assert set(Job.objects.filter(status=Status.QUEUED).values_list("id", flat=True)) == {j.id for j in b_jobs}
        assert host_state("w-b.example") == b_host
        # A job of its kind enqueued now reaches it (the bus is woken or polls).
        (late,) = enqueue("https://w-b.example/3", kind="c")
        assert peer.recv("assign", timeout=20)["job_id"] == late.id
    finally:
        peer.shutdown()
        bus.kill()
        bus.wait(timeout=10)


BAD_KINDS = [
    ("news", "not a list"),
    ([1], "not a string"),
    ([""], "empty"),
    (["x" * 101], "too long"),
    ([f"k{n}" for n in range(101)], "too many"),
    (["a\x00b"], "NUL"),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
def test_a_bad_kinds_value_ends_the_handshake_with_bad_frame(processes, short_socket_path):
    from tests.crawler_peer import CrawlerPeer
    from tests.test_bus_protocol import start_bus

    (job,) = enqueue("https://bad.example/1", kind="a")
    peer = CrawlerPeer(short_socket_path)
    bus = start_bus(processes, short_socket_path, ROBOTS_TXT="ignore", HOST_DELAY="0")
    try:
        for value, why in BAD_KINDS:  # the bus reconnects after each refused handshake
            peer.handshake(slots=4, ready_extra={"kinds": value}, timeout=30)
            error = peer.recv("error", timeout=20)
            assert error["code"] == "bad_frame" and "kind" in error["message"], (why, error)
            assert peer.wait_closed(timeout=10), why
            peer.close()
        assert [frame for frame in peer.frames if frame["type"] == "assign"] == []
        assert Job.objects.get(pk=job.pk).status == Status.QUEUED
    finally:
        peer.shutdown()
        bus.kill()
        bus.wait(timeout=10)
