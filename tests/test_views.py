"""The web pages as operators use them: sign-in, what each page shows, live fragments, actions, escaping, queries."""

from __future__ import annotations

import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.db import OperationalError, connection
from django.template.loader import render_to_string
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from bus.models import BusSession
from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status

pytestmark = pytest.mark.django_db

HOSTILE_URL = "https://x.test/?q=<script>alert(1)</script>"
HOSTILE_TITLE = "<script>alert('title')</script><img src=x onerror=alert(2)>"
HOSTILE_ERROR = "boom </pre><script>alert('error')</script>"


# --- Fixtures ------------------------------------------------------------------------


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_user("operator", password="pw-operator", is_staff=True, is_superuser=True)


@pytest.fixture
def viewer(django_user_model):
    """Signed in, not staff, with the view permission: may look, may not act."""
    user = django_user_model.objects.create_user("viewer", password="pw-viewer")
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    return user


@pytest.fixture
def outsider_client(client, django_user_model):
    """Signed in without the view permission: may read no job."""
    client.force_login(django_user_model.objects.create_user("outsider", password="pw-outsider"))
    return client


@pytest.fixture
def staff_viewer(django_user_model):
    """Staff who may only view jobs in the admin: may not act here either."""
    user = django_user_model.objects.create_user("staffviewer", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    return user


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def viewer_client(client, viewer):
    client.force_login(viewer)
    return client


def make_session(
    *,
    state="connected",
    endpoint="/tmp/crawler.sock",
    crawler="ref-crawler",
    slots=4,
    heartbeat_age: float = 1.0,
    connected_ago: float = 600.0,
    closed_ago: float | None = None,
    reason: str = "",
) -> BusSession:
    now = timezone.now()
    return BusSession.objects.create(
        session=uuid.uuid4(),
        node="test-node",
        endpoint=endpoint,
        crawler=crawler,
        state=state,
        slots=slots,
        connected_at=now - timedelta(seconds=connected_ago),
        last_heartbeat_at=now - timedelta(seconds=heartbeat_age),
        closed_at=None if closed_ago is None else now - timedelta(seconds=closed_ago),
        close_reason=reason,
    )


def enqueue(*urls: str, priority: int = 0) -> list[Job]:
    return services.enqueue_many(urls=list(urls), priority=priority, actor="test")


def run(session: BusSession, limit: int) -> list[Job]:
    claimed = services.claim_jobs(session=session.session, limit=limit, lease_seconds=60)
    return [Job.objects.get(pk=c.id) for c in claimed]


def finish(session: BusSession, job: Job, *, result: dict | None = None, error: str = "") -> None:
    outcome = services.Outcome(job_id=job.pk, attempt=job.attempt, succeeded=not error, result=result, error=error)
    assert services.record_outcomes(session=session.session, outcomes=[outcome]) == ["recorded"]


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]] if response.context else []


# --- Sign-in and permissions ----------------------------------------------------------


def page_urls(job_id: int) -> list[str]:
    return [
        "/",
        "/?fragment=1",
        "/jobs/",
        "/jobs/?fragment=1&status=queued",
        "/jobs/new",
        f"/jobs/{job_id}/",
        f"/jobs/{job_id}/?fragment=1",
    ]


def test_every_page_sends_anonymous_visitors_to_sign_in(client):
    job = enqueue("https://example.com/a")[0]
    for url in page_urls(job.pk):
        response = client.get(url)
        assert response.status_code == 302, url
        assert response.url.startswith(reverse("login") + "?next="), url


def test_anonymous_post_of_an_action_changes_nothing(client):
    job = enqueue("https://example.com/a")[0]
    response = client.post(reverse("jobs:actions"), {"action": "cancel", "job": [job.pk]})
    assert response.status_code == 302 and response.url.startswith(reverse("login"))
    job.refresh_from_db()
    assert job.status == Status.QUEUED


def test_signing_in_with_the_form_lands_on_the_dashboard(client, operator):
    page = client.get(reverse("login"))
    assert page.status_code == 200 and b'id="login-form"' in page.content and b"csrfmiddlewaretoken" in page.content
    response = client.post(reverse("login"), {"username": "operator", "password": "pw-operator"})
    assert response.status_code == 302 and response.url == reverse("jobs:dashboard")
    assert client.get("/").status_code == 200
    signed_out = client.post(reverse("logout"))
    assert signed_out.status_code == 302 and signed_out.url == reverse("login")
    assert client.get("/").status_code == 302


def test_sign_in_returns_to_the_page_asked_for(client, operator):
    response = client.post(
        reverse("login") + "?next=/jobs/", {"username": "operator", "password": "pw-operator", "next": "/jobs/"}
    )
    assert response.url == "/jobs/"


def test_a_viewer_sees_every_page_without_the_actions(viewer_client):
    job = enqueue("https://example.com/a")[0]
    for url in page_urls(job.pk):
        if url == "/jobs/new":
            continue
        response = viewer_client.get(url)
        assert response.status_code == 200, url
        assert b'name="action"' not in response.content, url
        assert b"/admin/" not in response.content, url  # no admin links for someone who cannot use them


@pytest.mark.parametrize("action", ["requeue", "retry", "cancel"])
def test_a_viewer_cannot_act_on_jobs(viewer_client, action):
    session = make_session()
    enqueue("https://example.com/a", "https://example.com/b")
    running = run(session, 1)[0]
    before = JobEvent.objects.count()
    response = viewer_client.post(reverse("jobs:actions"), {"action": action, "job": [running.pk]})
    assert response.status_code == 403
    assert b'id="error-403"' in response.content
    running.refresh_from_db()
    assert running.status == Status.RUNNING
    assert JobEvent.objects.count() == before


def test_a_viewer_cannot_enqueue(viewer_client):
    assert viewer_client.get(reverse("jobs:new")).status_code == 403
    response = viewer_client.post(reverse("jobs:new"), {"urls": "https://example.com/", "priority": "0"})
    assert response.status_code == 403
    assert not Job.objects.exists()


def test_a_user_without_the_view_permission_reads_no_job(outsider_client):
    job = enqueue("https://example.com/secret?token=abc")[0]
    for url in page_urls(job.pk) + ["/api/jobs/", f"/api/jobs/{job.pk}/"]:
        response = outsider_client.get(url)
        assert response.status_code == 403, url
        assert b"secret" not in response.content, url
    assert b"view job" in outsider_client.get(f"/jobs/{job.pk}/").content


def test_staff_without_the_change_permission_cannot_act(client, staff_viewer):
    client.force_login(staff_viewer)
    job = enqueue("https://example.com/a")[0]
    assert client.get(f"/jobs/{job.pk}/").status_code == 200
    assert client.post(reverse("jobs:actions"), {"action": "cancel", "job": [job.pk]}).status_code == 403
    assert client.get(reverse("jobs:new")).status_code == 403
    job.refresh_from_db()
    assert job.status == Status.QUEUED


def test_forms_carry_a_csrf_token_and_posts_without_one_are_refused(operator):
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)
    job = enqueue("https://example.com/a")[0]
    for url in ("/jobs/", f"/jobs/{job.pk}/", "/jobs/new"):
        assert b"csrfmiddlewaretoken" in client.get(url).content, url
    assert client.post(reverse("jobs:actions"), {"action": "cancel", "job": [job.pk]}).status_code == 403
    assert client.post(reverse("jobs:new"), {"urls": "https://example.com/b", "priority": "0"}).status_code == 403
    job.refresh_from_db()
    assert job.status == Status.QUEUED and Job.objects.count() == 1


# --- Dashboard -------------------------------------------------------------------------


def test_dashboard_shows_counts_sessions_throughput_requeues_and_the_oldest_running_job(operator_client, settings):
    settings.HEARTBEAT_TIMEOUT = 10
    fresh = make_session(endpoint="/tmp/a.sock", heartbeat_age=2)
    late = make_session(endpoint="/tmp/b.sock", heartbeat_age=15, slots=8)
    overdue = make_session(endpoint="/tmp/c.sock", heartbeat_age=25)
    # d.sock: its newest session was lost and none is connected: the bus is reconnecting.
    old_lost = make_session(endpoint="/tmp/d.sock", state="lost", connected_ago=1800, closed_ago=1700)
    newest_lost = make_session(
        endpoint="/tmp/d.sock", state="lost", connected_ago=900, closed_ago=60, reason="heartbeat timeout"
    )
    # a.sock had an earlier closed session: it stays "closed", a connected one exists.
    closed = make_session(endpoint="/tmp/a.sock", state="closed", connected_ago=2400, closed_ago=1200)
    forgotten = make_session(endpoint="/tmp/e.sock", state="closed", connected_ago=9000, closed_ago=7200)

    jobs = enqueue(*[f"https://example.com/{i}" for i in range(6)])
    run(fresh, 2)
    second = run(late, 3)
    finish(late, second[0], result={"status": 200})
    finish(late, second[1], error="refused")
    services.reset_running_jobs(session=fresh.session, reason="session lost: connection reset", actor="bus")
    services.cancel_jobs(job_ids=[jobs[-1].pk], actor="test")

    response = operator_client.get("/")
    assert response.status_code == 200
    html = response.content.decode()
    counts = dict(re.findall(r'data-status="(\w+)" data-count="(\d+)"', html))
    assert counts == {
        "queued": "2",
        "running": "1",
        "succeeded": "1",
        "failed": "1",
        "cancelled": "1",
        "disallowed": "0",
    }

    rows = dict(re.findall(r'data-session="([0-9a-f-]+)" data-session-state="\w+" data-display-state="(\w+)"', html))
    assert rows == {
        str(fresh.session): "connected",
        str(late.session): "connected",
        str(overdue.session): "connected",
        str(newest_lost.session): "reconnecting",
        str(old_lost.session): "lost",
        str(closed.session): "closed",
    }
    assert str(forgotten.session) not in html
    levels = dict(re.findall(r'data-session="([0-9a-f-]+)"[^>]*data-heartbeat="(\w*)"', html))
    assert levels[str(fresh.session)] == "ok"
    assert levels[str(late.session)] == "late"
    assert levels[str(overdue.session)] == "overdue"
    assert 'data-slots-in-use="1" data-slots="8"' in html  # late holds one running job
    assert "heartbeat timeout" in html

    assert 'id="finished-last-minute" data-count="3"' in html  # succeeded, failed, cancelled
    assert 'id="finished-last-hour" data-count="3"' in html
    assert re.search(r'id="throughput" data-total="3" data-peak="3"', html)
    assert html.count('<rect class="bar-ok"') == 1  # one non-empty minute
    assert 'id="requeues"' in html and "session lost: connection reset" in html
    assert f'href="/jobs/{second[2].pk}/"' in html  # the oldest (only) running job
    assert re.search(r'id="oldest-running" data-age-seconds="[\d.]+"', html)
    assert f'href="/admin/jobs/bussession/{fresh.session}/change/"' in html


def test_dashboard_without_sessions_or_jobs_says_so(operator_client):
    html = operator_client.get("/").content.decode()
    assert 'id="no-sessions"' in html
    assert 'data-status="queued" data-count="0"' in html
    assert "nothing running" in html


def test_dashboard_fragment_is_the_live_part_only(operator_client):
    make_session()
    page = operator_client.get("/").content.decode()
    assert 'data-live-url="/?fragment=1"' in page and "live.js" in page
    fragment = operator_client.get("/?fragment=1")
    assert fragment.status_code == 200 and fragment["Cache-Control"] == "no-store"
    text = fragment.content.decode()
    assert "<html" not in text and 'id="status-counts"' in text and 'data-session-state="connected"' in text
    assert "data-rendered-at" in text


def test_dashboard_query_count_does_not_grow_with_sessions_jobs_or_requeues(
    operator_client, django_assert_max_num_queries
):
    for index in range(20):
        session = make_session(endpoint=f"/tmp/{index}.sock")
        enqueue(*[f"https://example.com/{index}/{n}" for n in range(3)])
        run(session, 2)
        services.reset_running_jobs(session=session.session, reason="lost", actor="bus")
        make_session(endpoint=f"/tmp/{index}.sock", state="lost", connected_ago=300, closed_ago=100)
    # session + user, status counts, sessions, slots in use, finished counts, throughput, requeues, oldest running,
    # the kinds connected sessions take and the queued jobs of the others (selectors.waiting_kinds)
    with django_assert_max_num_queries(11):
        operator_client.get("/")
    with django_assert_max_num_queries(11):
        operator_client.get("/?fragment=1")


# --- The job list ------------------------------------------------------------------------


def list_ids(response) -> list[int]:
    return [int(i) for i in re.findall(r'<tr data-job-id="(\d+)"', response.content.decode())]


def test_list_filters_by_status_and_url_and_sorts(operator_client):
    session = make_session()
    low = enqueue("https://a.example.com/1", "https://b.example.com/2", priority=1)
    high = enqueue("https://a.example.com/3", priority=5)
    run(session, 1)  # high becomes running
    assert list_ids(operator_client.get("/jobs/")) == [high[0].pk, low[1].pk, low[0].pk]
    assert list_ids(operator_client.get("/jobs/?status=running")) == [high[0].pk]
    assert list_ids(operator_client.get("/jobs/?status=queued")) == [low[1].pk, low[0].pk]
    assert list_ids(operator_client.get("/jobs/?q=A.EXAMPLE")) == [high[0].pk, low[0].pk]
    assert list_ids(operator_client.get(f"/jobs/?q=%23{low[1].pk}")) == [low[1].pk]
    later = enqueue("https://c.example.com/4", priority=3)
    assert list_ids(operator_client.get("/jobs/?status=queued&sort=priority")) == [later[0].pk, low[0].pk, low[1].pk]
    assert list_ids(operator_client.get("/jobs/?status=bogus")) == list_ids(operator_client.get("/jobs/"))
    assert b'id="no-jobs"' in operator_client.get("/jobs/?q=nothing-like-this").content


def test_list_pages_by_keyset_forwards_and_back(operator_client):
    ids = [job.pk for job in enqueue(*[f"https://example.com/{n}" for n in range(120)])][::-1]
    first = operator_client.get("/jobs/")
    assert list_ids(first) == ids[:50]
    html = first.content.decode()
    assert 'id="page-previous"' not in html
    next_link = re.search(r'href="([^"]+)" id="page-next"', html).group(1)
    assert next_link == f"?before={ids[49]}"
    second = operator_client.get("/jobs/" + next_link)
    assert list_ids(second) == ids[50:100]
    third_link = re.search(r'href="([^"]+)" id="page-next"', second.content.decode()).group(1)
    third = operator_client.get("/jobs/" + third_link)
    assert list_ids(third) == ids[100:]
    assert 'id="page-next"' not in third.content.decode()
    back_link = re.search(r'href="([^"]+)" id="page-previous"', third.content.decode()).group(1).replace("&amp;", "&")
    assert back_link == f"?after={ids[100]}"
    assert list_ids(operator_client.get("/jobs/" + back_link)) == ids[50:100]
    # Going back from the second page reaches the first page, which has no previous link.
    back_to_first = operator_client.get(f"/jobs/?after={ids[50]}")
    assert list_ids(back_to_first) == ids[:50]
    assert 'id="page-previous"' not in back_to_first.content.decode()


def test_list_keyset_pages_keep_the_filters_and_the_priority_order(operator_client):
    jobs = []
    for priority in (1, 3, 2):
        jobs += enqueue(*[f"https://example.com/p{priority}/{n}" for n in range(30)], priority=priority)
    expected = [job.pk for job in sorted(jobs, key=lambda job: (-job.priority, job.pk))]
    first = operator_client.get("/jobs/?status=queued&sort=priority")
    assert list_ids(first) == expected[:50]
    link = re.search(r'href="([^"]+)" id="page-next"', first.content.decode()).group(1).replace("&amp;", "&")
    assert "status=queued" in link and "sort=priority" in link
    second = operator_client.get("/jobs/" + link)
    assert list_ids(second) == expected[50:]


def test_list_query_count_is_bounded_and_never_counts_the_table(operator_client, django_assert_max_num_queries):
    sessions = [make_session(endpoint=f"/tmp/{n}.sock") for n in range(5)]
    enqueue(*[f"https://example.com/{n}" for n in range(80)])
    for session in sessions:
        run(session, 4)
    with django_assert_max_num_queries(3) as captured:  # session, user, one page of jobs
        response = operator_client.get("/jobs/")
    assert len(list_ids(response)) == 50
    sql = " ".join(query["sql"].upper() for query in captured.captured_queries)
    assert "COUNT(" not in sql
    assert '"PAYLOAD"' not in sql and '"RESULT"' not in sql  # the list leaves the big JSON columns alone
    with django_assert_max_num_queries(4):  # + the cursor row for a non-id order
        operator_client.get(f"/jobs/?sort=priority&before={response.context['page'].jobs[-1].pk}&fragment=1")


def test_list_fragment_renders_rows_and_pager(operator_client):
    enqueue("https://example.com/a")
    page = operator_client.get("/jobs/?status=queued").content.decode()
    assert 'data-live-url="/jobs/?status=queued&amp;fragment=1"' in page
    fragment = operator_client.get("/jobs/?status=queued&fragment=1").content.decode()
    assert "<html" not in fragment and 'data-status="queued"' in fragment and 'class="pager"' in fragment


# --- Bulk actions ---------------------------------------------------------------------------


def test_bulk_requeue_moves_running_jobs_through_the_service(operator_client):
    session = make_session()
    jobs = enqueue(*[f"https://example.com/{n}" for n in range(3)])
    running = run(session, 2)
    response = operator_client.post(
        reverse("jobs:actions"),
        {"action": "requeue", "job": [job.pk for job in jobs], "next": "/jobs/?status=running"},
        follow=True,
    )
    assert response.redirect_chain[-1][0] == "/jobs/?status=running"
    assert messages_of(response) == ["Requeued 2, failed 0 (interrupted too many times), skipped 1 not running."]
    for job in running:
        job.refresh_from_db()
        assert job.status == Status.QUEUED and job.interruptions == 1 and job.lease_session is None
    events = JobEvent.objects.filter(kind=EventKind.INTERRUPT)
    assert events.count() == 2
    assert {(e.actor, e.reason) for e in events} == {("web:operator", "requeued by operator from the jobs page")}


def test_bulk_retry_and_cancel_call_their_services(operator_client):
    session = make_session()
    jobs = enqueue(*[f"https://example.com/{n}" for n in range(3)])
    failed = run(session, 1)[0]
    finish(session, failed, error="gone")
    response = operator_client.post(
        reverse("jobs:actions"), {"action": "cancel", "job": [j.pk for j in jobs]}, follow=True
    )
    assert messages_of(response) == [
        "Cancelled 2 (0 of them running; their crawlers are told to stop), skipped 1 already finished."
    ]
    assert Job.objects.filter(status=Status.CANCELLED).count() == 2
    response = operator_client.post(
        reverse("jobs:actions"), {"action": "retry", "job": [j.pk for j in jobs]}, follow=True
    )
    assert messages_of(response) == ["Retried 3, skipped 0 not failed or cancelled."]
    assert set(Job.objects.values_list("status", flat=True)) == {Status.QUEUED}
    retried = JobEvent.objects.filter(kind=EventKind.RETRY)
    assert retried.count() == 3 and set(retried.values_list("actor", flat=True)) == {"web:operator"}
    assert set(JobEvent.objects.filter(kind=EventKind.CANCEL).values_list("actor", flat=True)) == {"web:operator"}


def test_bulk_action_without_jobs_or_with_an_unknown_action_changes_nothing(operator_client):
    job = enqueue("https://example.com/a")[0]
    response = operator_client.post(reverse("jobs:actions"), {"action": "cancel"}, follow=True)
    assert messages_of(response) == ["Select at least one job."]
    response = operator_client.post(reverse("jobs:actions"), {"action": "delete", "job": [job.pk]}, follow=True)
    assert response.status_code == 200
    job.refresh_from_db()
    assert job.status == Status.QUEUED


def test_bulk_action_never_redirects_off_site(operator_client):
    job = enqueue("https://example.com/a")[0]
    response = operator_client.post(
        reverse("jobs:actions"), {"action": "cancel", "job": [job.pk], "next": "https://evil.test/"}
    )
    assert response.status_code == 302 and response.url == reverse("jobs:list")


def test_detail_page_actions_follow_the_status(operator_client):
    session = make_session()
    job = enqueue("https://example.com/a")[0]
    html = operator_client.get(job.get_absolute_url()).content.decode()
    assert 'id="action-cancel"' in html and 'id="action-requeue"' not in html and 'id="action-retry"' not in html
    run(session, 1)
    html = operator_client.get(job.get_absolute_url()).content.decode()
    assert 'id="action-requeue"' in html and 'id="action-cancel"' in html
    response = operator_client.post(
        reverse("jobs:actions"), {"action": "requeue", "job": [job.pk], "next": job.get_absolute_url()}
    )
    assert response.url == job.get_absolute_url()
    job.refresh_from_db()
    assert job.status == Status.QUEUED


# --- Job detail ---------------------------------------------------------------------------


def test_detail_lays_out_the_result_and_the_timeline(operator_client):
    session = make_session(crawler="ref-crawler/2")
    job = enqueue("https://example.com/article")[0]
    job = run(session, 1)[0]
    html = operator_client.get(job.get_absolute_url()).content.decode()
    assert 'id="job-status" data-status="running"' in html and "ref-crawler/2" in html
    finish(
        session,
        job,
        result={
            "status": 200,
            "final_url": "https://example.com/article/",
            "bytes": 2048,
            "content_type": "text/html",
            "title": "An article",
            "links": 12,
            "elapsed_ms": 87,
        },
    )
    response = operator_client.get(job.get_absolute_url())
    html = response.content.decode()
    assert 'id="job-status" data-status="succeeded"' in html
    for field, shown in (
        ("status", "200"),
        ("content_type", "text/html"),
        ("title", "An article"),
        ("links", "12"),
        ("elapsed_ms", "87"),
        ("bytes", "2.0"),
    ):
        assert re.search(rf'data-field="{field}">[^<]*(<[^>]+>)?[^<]*{re.escape(shown)}', html), field
    assert '<a href="https://example.com/article/"' in html
    assert '<details id="job-result-raw">' in html and "&quot;elapsed_ms&quot;: 87" in html
    assert [kind for kind in re.findall(r'<li data-event="\d+" data-kind="(\w+)"', html)] == [
        "enqueue",
        "claim",
        "outcome",
    ]
    assert f'href="/admin/jobs/job/{job.pk}/change/"' in html


def test_detail_of_a_missing_job_is_a_friendly_404(operator_client, settings):
    settings.DEBUG = False
    response = operator_client.get("/jobs/987654/")
    assert response.status_code == 404
    assert b'id="error-404"' in response.content


def test_error_pages_render_without_a_request():
    assert 'id="error-500"' in render_to_string("500.html")
    assert 'id="error-404"' in render_to_string("404.html")


def test_detail_query_count_is_bounded_whatever_the_number_of_events(operator_client, django_assert_max_num_queries):
    session = make_session()
    job = enqueue("https://example.com/a")[0]
    for _ in range(2):
        run(session, 1)
        services.reset_running_jobs(job_ids=[job.pk], reason="lost", actor="bus")
    run(session, 1)
    # session, user, job, events, bus session
    with django_assert_max_num_queries(5):
        response = operator_client.get(job.get_absolute_url())
    assert len(response.context["events"]) == 6
    with django_assert_max_num_queries(5):
        operator_client.get(job.get_absolute_url() + "?fragment=1")


def test_detail_fragment_renders_state_and_timeline(operator_client):
    job = enqueue("https://example.com/a")[0]
    page = operator_client.get(job.get_absolute_url()).content.decode()
    assert f'data-live-url="/jobs/{job.pk}/?fragment=1"' in page
    fragment = operator_client.get(job.get_absolute_url() + "?fragment=1").content.decode()
    assert "<html" not in fragment and 'id="job-status" data-status="queued"' in fragment
    assert 'data-kind="enqueue"' in fragment


def test_admin_change_page_links_back_to_the_site(operator_client):
    job = enqueue("https://example.com/a")[0]
    assert job.get_absolute_url() == f"/jobs/{job.pk}/"
    html = operator_client.get(reverse("admin:jobs_job_change", args=[job.pk])).content.decode()
    assert "View on site" in html


# --- Escaping of crawler data -------------------------------------------------------------


def test_hostile_url_title_and_error_are_escaped_everywhere(operator_client):
    session = make_session(crawler="<script>alert('crawler')</script>")
    hostile, other = enqueue(HOSTILE_URL, "https://example.com/other")
    hostile = Job.objects.get(pk=hostile.pk)
    claimed = run(session, 2)
    by_id = {job.pk: job for job in claimed}
    finish(
        session, by_id[hostile.pk], result={"title": HOSTILE_TITLE, "final_url": "javascript:alert(3)", "status": 200}
    )
    finish(session, by_id[other.pk], error=HOSTILE_ERROR)
    services.retry_jobs(job_ids=[other.pk], actor="test", reason="<b>retry</b>")
    run(session, 1)
    services.reset_running_jobs(job_ids=[other.pk], reason="<script>alert('reason')</script>", actor="bus")

    pages = [
        "/",
        "/?fragment=1",
        "/jobs/",
        "/jobs/?fragment=1",
        f"/jobs/{hostile.pk}/",
        f"/jobs/{other.pk}/",
        f"/jobs/?q={HOSTILE_URL}",
    ]
    for url in pages:
        html = operator_client.get(url).content.decode()
        assert "<script>alert" not in html, url
        assert "<img src=x" not in html, url
        assert "<b>retry</b>" not in html, url
    html = operator_client.get(f"/jobs/{hostile.pk}/").content.decode()
    assert "https://x.test/?q=&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;script&gt;alert(&#x27;title&#x27;)&lt;/script&gt;" in html
    assert 'href="javascript:' not in html  # a non-http final URL is shown, never linked
    html = operator_client.get(f"/jobs/{other.pk}/").content.decode()
    assert "boom &lt;/pre&gt;&lt;script&gt;" in html
    # enqueue echoes bad input escaped
    response = operator_client.post(reverse("jobs:new"), {"urls": "<script>alert(9)</script>", "priority": "0"})
    assert b"<script>alert(9)" not in response.content and b"&lt;script&gt;alert(9)" in response.content


# --- Enqueue ----------------------------------------------------------------------------------


def test_enqueue_queues_every_line_and_links_the_new_jobs(operator_client):
    response = operator_client.post(
        reverse("jobs:new"),
        {"urls": "https://example.com/1\n\n  https://example.com/2  \r\nhttps://example.com/3\n", "priority": "7"},
        follow=True,
    )
    jobs = list(Job.objects.order_by("id"))
    assert [job.url for job in jobs] == ["https://example.com/1", "https://example.com/2", "https://example.com/3"]
    assert {job.priority for job in jobs} == {7}
    assert set(JobEvent.objects.values_list("kind", "actor")) == {(EventKind.ENQUEUE, "web:operator")}
    [message] = messages_of(response)
    assert message.startswith("Queued 3 jobs:")
    html = response.content.decode()
    for job in jobs:
        assert f'<a href="/jobs/{job.pk}/">#{job.pk}</a>' in html
    assert f'href="/jobs/?before={jobs[-1].pk + 1}" id="new-jobs-link"' in html


def test_enqueue_shows_invalid_lines_with_reasons_and_queues_nothing(operator_client):
    response = operator_client.post(
        reverse("jobs:new"),
        {
            "urls": "https://example.com/ok\n\nnot a url\nftp://example.com/file\nhttps://example.com/fine",
            "priority": "1",
        },
    )
    assert response.status_code == 200
    assert not Job.objects.exists() and not JobEvent.objects.exists()
    html = response.content.decode()
    assert "Nothing was queued: 2 line(s) need fixing." in html
    # Textarea line numbers, blank lines counted.
    assert re.findall(r'<li data-line="(\d+)"', html) == ["3", "4"]
    assert "is not a valid http:// or https:// URL" in html
    assert "https://example.com/fine" in html  # the textarea keeps what was typed


@pytest.mark.parametrize("priority", ["", "high", str(2**31)])
def test_enqueue_refuses_a_bad_priority(operator_client, priority):
    response = operator_client.post(reverse("jobs:new"), {"urls": "https://example.com/", "priority": priority})
    assert response.status_code == 200 and response.context["form"].errors["priority"]
    assert not Job.objects.exists()


def test_enqueue_page_renders_for_an_operator(operator_client):
    response = operator_client.get(reverse("jobs:new"))
    assert response.status_code == 200 and b'id="enqueue-form"' in response.content


# --- /health ------------------------------------------------------------------------------------


def test_health_is_503_without_a_connected_session(operator_client):
    client = operator_client
    response = client.get("/health")
    assert response.status_code == 503
    body = response.json()
    assert body["database"] == "ok" and body["sessions"] == [] and body["live_sessions"] == 0
    assert body["oldest_running_age"] is None
    make_session(state="lost", closed_ago=5)
    body = client.get("/health").json()
    assert client.get("/health").status_code == 503
    assert [s["state"] for s in body["sessions"]] == ["reconnecting"]


def test_health_is_200_with_a_connected_session_and_reports_it(operator_client):
    client = operator_client
    session = make_session(crawler="ref", heartbeat_age=3)
    enqueue("https://example.com/a")
    run(session, 1)
    response = client.get("/health")
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")
    body = response.json()
    assert body["database"] == "ok" and body["live_sessions"] == 1
    [reported] = body["sessions"]
    assert reported["session"] == str(session.session) and reported["state"] == "connected"
    assert reported["endpoint"] == "/tmp/crawler.sock" and reported["crawler"] == "ref"
    assert 2.5 < reported["last_heartbeat_age"] < 30
    assert 0 <= body["oldest_running_age"] < 30


def test_anonymous_health_gives_status_and_counts_but_no_sessions(client):
    session = make_session(crawler="ref", endpoint="/run/secret-crawler.sock")
    enqueue("https://example.com/a")
    run(session, 1)
    response = client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body == {
        "database": "ok",
        "status": "ok",
        "live_sessions": 1,
        "session_count": 1,
        "oldest_running_age": body["oldest_running_age"],
    }
    assert 0 <= body["oldest_running_age"] < 30
    assert b"secret-crawler" not in response.content and str(session.session).encode() not in response.content
    session.state = "lost"
    session.save()
    assert client.get("/health").json()["status"] == "unavailable"


def test_health_does_not_count_a_connected_row_whose_heartbeat_stopped(client, settings):
    settings.HEARTBEAT_TIMEOUT = 10
    make_session(heartbeat_age=25)  # its bus died without closing the row
    assert client.get("/health").status_code == 503
    make_session(heartbeat_age=1, endpoint="/tmp/other.sock")
    assert client.get("/health").status_code == 200


def test_health_reports_a_database_error_as_503_json(client):
    make_session()

    def unreachable(execute, sql, params, many, context):
        raise OperationalError("could not connect to server")

    with connection.execute_wrapper(unreachable):
        response = client.get("/health")
    assert response.status_code == 503
    assert response["Content-Type"] == "application/json"
    assert response.json()["database"] == "error"


def test_static_files_are_served_without_debug(client, settings):
    """gunicorn with DEBUG=false still serves the pages' CSS and live-update script (WhiteNoise)."""
    settings.DEBUG = False
    from django.templatetags.static import static

    response = client.get(static("jobs/live.js"))
    assert response.status_code == 200
    assert b"visibilitychange" in b"".join(response.streaming_content)
