"""The admin as an operator uses it: the job list, the actions through the services, permissions."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.contrib.messages import get_messages
from django.contrib.messages.storage.cookie import CookieStorage
from django.urls import reverse
from django.utils import timezone

from bus.models import BusSession
from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status

pytestmark = pytest.mark.django_db

CHANGELIST = reverse("admin:jobs_job_changelist")


NO_INLINE_FORMS = {"events-TOTAL_FORMS": "0", "events-INITIAL_FORMS": "0"}


def change_url(job_id: int) -> str:
    return reverse("admin:jobs_job_change", args=[job_id])


@pytest.fixture
def queued_jobs():
    return services.enqueue_many(urls=[f"https://example.com/page/{i}" for i in range(4)], actor="test")


@pytest.fixture
def session():
    return uuid.uuid4()


@pytest.fixture
def running_jobs(queued_jobs, session):
    claimed = services.claim_jobs(session=session, limit=2, lease_seconds=60)
    return [Job.objects.get(pk=c.id) for c in claimed]


@pytest.fixture
def failed_job():
    job = services.enqueue(url="https://example.com/poison", priority=100, actor="test")  # claimed first
    Job.objects.filter(pk=job.pk).update(max_interruptions=1)
    services.claim_jobs(session=uuid.uuid4(), limit=1, lease_seconds=60)
    services.reset_running_jobs(job_ids=[job.pk], reason="crawler died", actor="test")
    job.refresh_from_db()
    assert job.status == Status.FAILED
    return job


@pytest.fixture
def staff_viewer(django_user_model):
    """A staff user who may look at jobs but not change them."""
    user = django_user_model.objects.create_user("viewer", password="pw", is_staff=True)
    user.user_permissions.add(
        Permission.objects.get(codename="view_job"),
        Permission.objects.get(codename="view_jobevent"),
    )
    return user


def run_action(client, action: str, jobs, **extra):
    return client.post(
        CHANGELIST,
        {"action": action, "_selected_action": [job.pk for job in jobs], **extra},
        follow=True,
    )


def messages_of(response) -> list[str]:
    return [str(message) for message in get_messages(response.wsgi_request)]


def statuses(jobs) -> list[str]:
    return list(Job.objects.filter(pk__in=[job.pk for job in jobs]).order_by("pk").values_list("status", flat=True))


# --- The list ----------------------------------------------------------------------


def test_changelist_shows_operator_columns_and_running_time(admin_client, running_jobs, session):
    Job.objects.filter(pk=running_jobs[0].pk).update(started_at=timezone.now() - timedelta(minutes=3, seconds=5))
    response = admin_client.get(CHANGELIST)
    assert response.status_code == 200
    page = response.content.decode()
    for header in ("URL", "Status", "Priority", "Attempt", "Interruptions", "Session", "Running for", "Updated at"):
        assert header in page
    assert "https://example.com/page/0" in page
    assert str(session)[:8] in page
    assert reverse("admin:jobs_bussession_change", args=[session]) in page
    assert "3m 05s" in page


def test_changelist_truncates_long_urls_but_keeps_them_in_the_title(admin_client):
    long_url = "https://example.com/" + "a" * 200
    services.enqueue(url=long_url, actor="test")
    page = admin_client.get(CHANGELIST).content.decode()
    assert f'title="{long_url}"' in page
    assert f">{long_url}<" not in page


def test_changelist_filters_by_status(admin_client, running_jobs, queued_jobs):
    response = admin_client.get(CHANGELIST, {"status__exact": "running"})
    shown = {job.pk for job in response.context["cl"].result_list}
    assert shown == {job.pk for job in running_jobs}


def test_changelist_searches_by_id_and_by_url(admin_client, queued_jobs):
    target = queued_jobs[2]
    by_id = admin_client.get(CHANGELIST, {"q": str(target.pk)}).context["cl"].result_list
    assert target in list(by_id)
    by_url = admin_client.get(CHANGELIST, {"q": "page/3"}).context["cl"].result_list
    assert list(by_url) == [queued_jobs[3]]
    assert list(admin_client.get(CHANGELIST, {"q": "9" * 30}).context["cl"].result_list) == []


def test_changelist_filters_by_lease_session_from_the_bus_session_link(admin_client, running_jobs, session):
    services.claim_jobs(session=uuid.uuid4(), limit=1, lease_seconds=60)
    response = admin_client.get(CHANGELIST, {"lease_session": str(session)})
    assert {job.pk for job in response.context["cl"].result_list} == {job.pk for job in running_jobs}


def test_changelist_query_count_does_not_grow_with_the_number_of_jobs(
    admin_client, django_assert_max_num_queries, session
):
    services.enqueue_many(urls=[f"https://example.com/{i}" for i in range(3)], actor="test")
    services.claim_jobs(session=session, limit=2, lease_seconds=60)
    with django_assert_max_num_queries(100) as few:
        admin_client.get(CHANGELIST)
    services.enqueue_many(urls=[f"https://example.com/more/{i}" for i in range(40)], actor="test")
    services.claim_jobs(session=session, limit=20, lease_seconds=60)
    with django_assert_max_num_queries(len(few.captured_queries)):
        response = admin_client.get(CHANGELIST)
    assert len(response.context["cl"].result_list) == 43


def test_changelist_does_not_load_payload_or_result(admin_client, queued_jobs):
    response = admin_client.get(CHANGELIST)
    job = response.context["cl"].result_list[0]
    assert {"payload", "result", "progress"} <= job.get_deferred_fields()


# --- Actions -----------------------------------------------------------------------


def test_requeue_action_moves_running_jobs_and_reports_counts(admin_client, running_jobs, queued_jobs):
    selected = queued_jobs  # two running (claimed) and two queued
    response = run_action(admin_client, "requeue_running", selected)
    assert response.status_code == 200
    assert "Requeued 2, failed 0 (interrupted too many times), skipped 2 not running." in messages_of(response)
    assert statuses(selected) == [Status.QUEUED] * 4
    events = JobEvent.objects.filter(kind=EventKind.INTERRUPT)
    assert events.count() == 2
    assert set(events.values_list("actor", "reason")) == {("admin:admin", "requeued by admin in the admin")}
    assert all(job.interruptions == 1 for job in Job.objects.filter(pk__in=[j.pk for j in running_jobs]))


def test_requeue_action_reports_jobs_that_fail_at_their_last_interruption(admin_client, running_jobs):
    # Alone in its session: the verdict is certain (a job in company is run alone first).
    Job.objects.filter(pk=running_jobs[0].pk).update(interruptions=2, max_interruptions=3, lease_session=uuid.uuid4())
    response = run_action(admin_client, "requeue_running", running_jobs)
    assert "Requeued 1, failed 1 (interrupted too many times), skipped 0 not running." in messages_of(response)
    assert statuses(running_jobs) == [Status.FAILED, Status.QUEUED]


def test_requeue_action_reports_jobs_suspected_in_company(admin_client, running_jobs):
    Job.objects.filter(pk=running_jobs[0].pk).update(interruptions=2, max_interruptions=3)
    response = run_action(admin_client, "requeue_running", running_jobs)
    assert (
        "Requeued 2 (1 of them interrupted too many times with other jobs in their session: each runs alone "
        "next), failed 0 (interrupted too many times), skipped 0 not running."
    ) in messages_of(response)
    assert statuses(running_jobs) == [Status.QUEUED, Status.QUEUED]


def test_retry_action_requeues_failed_jobs_and_skips_others(admin_client, failed_job, queued_jobs):
    response = run_action(admin_client, "retry", [failed_job, queued_jobs[0]])
    assert "Retried 1, skipped 1 not failed or cancelled." in messages_of(response)
    failed_job.refresh_from_db()
    assert (failed_job.status, failed_job.interruptions) == (Status.QUEUED, 0)
    assert JobEvent.objects.get(job=failed_job, kind=EventKind.RETRY).actor == "admin:admin"


def test_cancel_action_cancels_queued_and_running_jobs(admin_client, running_jobs, queued_jobs, failed_job):
    selected = [*queued_jobs, failed_job]
    response = run_action(admin_client, "cancel", selected)
    expected = "Cancelled 4 (2 of them running; their crawlers are told to stop), skipped 1 already finished."
    assert expected in messages_of(response)
    assert statuses(selected) == [Status.CANCELLED] * 4 + [Status.FAILED]
    assert not Job.objects.filter(status=Status.CANCELLED, lease_session__isnull=False).exists()
    assert JobEvent.objects.filter(kind=EventKind.CANCEL, actor="admin:admin").count() == 4


def test_non_staff_user_is_sent_to_login_and_cannot_run_an_action(client, django_user_model, running_jobs):
    user = django_user_model.objects.create_user("crawler-owner", password="pw")
    client.force_login(user)
    response = client.get(CHANGELIST)
    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))
    response = client.post(CHANGELIST, {"action": "requeue_running", "_selected_action": [j.pk for j in running_jobs]})
    assert response.status_code == 302
    assert response.url.startswith(reverse("admin:login"))
    assert statuses(running_jobs) == [Status.RUNNING] * 2


def test_anonymous_user_cannot_run_an_action(client, running_jobs):
    response = client.post(CHANGELIST, {"action": "cancel", "_selected_action": [j.pk for j in running_jobs]})
    assert response.status_code == 302
    assert statuses(running_jobs) == [Status.RUNNING] * 2


def test_staff_without_change_permission_sees_jobs_but_cannot_run_actions(client, staff_viewer, running_jobs):
    client.force_login(staff_viewer)
    response = client.get(CHANGELIST)
    assert response.status_code == 200
    assert response.context["action_form"] is None  # no action is offered
    for action in ("requeue_running", "cancel"):
        response = run_action(client, action, running_jobs)
        assert response.status_code == 200
        assert statuses(running_jobs) == [Status.RUNNING] * 2
    assert not JobEvent.objects.filter(kind__in=[EventKind.INTERRUPT, EventKind.CANCEL]).exists()


def test_staff_with_change_permission_can_run_actions(client, django_user_model, running_jobs):
    operator = django_user_model.objects.create_user("operator", password="pw", is_staff=True)
    operator.user_permissions.add(Permission.objects.get(codename="change_job"))
    client.force_login(operator)
    response = run_action(client, "requeue_running", running_jobs)
    assert "Requeued 2, failed 0 (interrupted too many times), skipped 0 not running." in messages_of(response)
    assert statuses(running_jobs) == [Status.QUEUED] * 2
    assert set(JobEvent.objects.filter(kind=EventKind.INTERRUPT).values_list("actor", flat=True)) == {"admin:operator"}


# --- The change form -----------------------------------------------------------------


def test_events_inline_is_read_only(admin_client, running_jobs):
    job = running_jobs[0]
    response = admin_client.get(change_url(job.pk))
    assert response.status_code == 200
    (inline,) = response.context["inline_admin_formsets"]
    assert inline.formset.model is JobEvent
    assert not inline.has_add_permission
    assert not inline.has_change_permission
    assert not inline.has_delete_permission
    assert inline.has_view_permission
    page = response.content.decode()
    assert "Assigned" in page and "Enqueued" in page  # the history is shown
    assert 'name="events-0-reason"' not in page  # but not as form fields


def test_events_inline_posts_change_nothing(admin_client, queued_jobs):
    job = queued_jobs[0]
    event = JobEvent.objects.get(job=job)
    admin_client.post(
        change_url(job.pk),
        {
            "url": job.url,
            "payload": "{}",
            "priority": "0",
            "max_attempts": "5",
            "max_interruptions": "3",
            "events-TOTAL_FORMS": "2",
            "events-INITIAL_FORMS": "1",
            "events-0-id": event.pk,
            "events-0-job": job.pk,
            "events-0-reason": "rewritten",
            "events-0-actor": "x",
            "events-1-job": job.pk,
            "events-1-kind": "cancel",
            "events-1-actor": "forged",
            "events-1-at": "2020-01-01",
        },
    )
    assert list(JobEvent.objects.filter(job=job).values_list("actor", "reason")) == [("test", "")]


def test_queued_job_definition_is_editable_but_not_its_state(admin_client, queued_jobs):
    job = queued_jobs[0]
    response = admin_client.get(change_url(job.pk))
    form_fields = set(response.context["adminform"].form.fields)
    assert form_fields == {"url", "payload", "priority", "kind", "max_attempts", "max_interruptions"}
    response = admin_client.post(
        change_url(job.pk),
        {
            "url": "https://example.com/edited",
            "payload": '{"depth": 2}',
            "priority": "7",
            "max_attempts": "5",
            "max_interruptions": "3",
            "status": "succeeded",
            "attempt": "9",
            "lease_session": str(uuid.uuid4()),
            **NO_INLINE_FORMS,
        },
    )
    assert response.status_code == 302
    job.refresh_from_db()
    assert (job.url, job.payload, job.priority) == ("https://example.com/edited", {"depth": 2}, 7)
    assert (job.status, job.attempt, job.lease_session) == (Status.QUEUED, 0, None)


def test_edited_job_is_held_to_the_enqueue_rules(admin_client, queued_jobs):
    job = queued_jobs[0]
    response = admin_client.post(
        change_url(job.pk),
        {
            "url": "ftp://example.com/file",
            "payload": "[1, 2]",
            "priority": "0",
            "max_attempts": "5",
            "max_interruptions": "3",
            **NO_INLINE_FORMS,
        },
    )
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert "not a valid http:// or https:// URL" in errors["url"][0]
    job.refresh_from_db()
    assert job.url == "https://example.com/page/0"
    response = admin_client.post(
        change_url(job.pk),
        {
            "url": "https://example.com/x",
            "payload": "[1, 2]",
            "priority": "0",
            "max_attempts": "5",
            "max_interruptions": "3",
            **NO_INLINE_FORMS,
        },
    )
    assert response.context["adminform"].form.errors["payload"] == ["payload must be a JSON object"]


def test_running_job_is_entirely_read_only(admin_client, running_jobs):
    job = running_jobs[0]
    response = admin_client.get(change_url(job.pk))
    assert set(response.context["adminform"].form.fields) == set()
    admin_client.post(change_url(job.pk), {"url": "https://example.com/edited", "priority": "9", "status": "queued"})
    job.refresh_from_db()
    assert (job.url, job.priority, job.status) == ("https://example.com/page/0", 0, Status.RUNNING)


def test_edit_of_a_job_claimed_after_the_form_loaded_is_not_saved(rf, admin_user, queued_jobs, session):
    job = queued_jobs[0]
    form_class = job_admin().get_form(rf.get("/"), job)
    form = form_class(
        {"url": job.url, "payload": "{}", "priority": "9", "max_attempts": "5", "max_interruptions": "3"},
        instance=Job.objects.get(pk=job.pk),
    )
    assert form.is_valid(), form.errors
    services.claim_jobs(session=session, limit=4, lease_seconds=60)  # the bus wins the race
    request = rf.post(change_url(job.pk))
    request.user = admin_user
    request._messages = CookieStorage(request)
    edited = form.save(commit=False)
    job_admin().save_model(request, edited, form, change=True)
    job.refresh_from_db()
    assert (job.status, job.priority, job.lease_session) == (Status.RUNNING, 0, session)
    assert [str(m) for m in request._messages] == [f"Job {job.pk} is no longer queued, so it was not changed."]


def job_admin():
    from django.contrib import admin

    return admin.site.get_model_admin(Job)


def test_jobs_cannot_be_added_or_deleted_in_the_admin(admin_client, queued_jobs):
    assert admin_client.get(reverse("admin:jobs_job_add")).status_code == 403
    assert admin_client.get(reverse("admin:jobs_job_delete", args=[queued_jobs[0].pk])).status_code == 403
    assert Job.objects.count() == 4


# --- Bus sessions ----------------------------------------------------------------------


@pytest.fixture
def bus_session():
    return BusSession.objects.create(
        session=uuid.uuid4(),
        node="host:1",
        endpoint="unix:/tmp/crawler.sock",
        crawler="ref",
        slots=4,
        connected_at=timezone.now(),
    )


def test_bus_session_list_shows_health_columns_and_filters_by_state(admin_client, bus_session):
    BusSession.objects.create(
        session=uuid.uuid4(),
        node="host:2",
        endpoint="tcp:10.0.0.2:9000",
        state="lost",
        slots=1,
        connected_at=timezone.now(),
        closed_at=timezone.now(),
        close_reason="heartbeat timeout",
    )
    url = reverse("admin:jobs_bussession_changelist")
    response = admin_client.get(url)
    assert response.status_code == 200
    page = response.content.decode()
    for header in (
        "Node",
        "Endpoint",
        "Crawler",
        "State",
        "Slots",
        "Connected at",
        "Last heartbeat at",
        "Closed at",
        "Close reason",
    ):
        assert header in page
    assert "heartbeat timeout" in page
    lost = admin_client.get(url, {"state__exact": "lost"}).context["cl"].result_list
    assert [s.node for s in lost] == ["host:2"]
    found = admin_client.get(url, {"q": str(bus_session.session)}).context["cl"].result_list
    assert list(found) == [bus_session]


def test_bus_session_admin_cannot_add_change_or_delete(admin_client, bus_session):
    assert admin_client.get(reverse("admin:jobs_bussession_add")).status_code == 403
    assert admin_client.get(reverse("admin:jobs_bussession_delete", args=[bus_session.pk])).status_code == 403
    response = admin_client.get(reverse("admin:jobs_bussession_change", args=[bus_session.pk]))
    assert response.status_code == 200  # viewing is allowed
    assert set(response.context["adminform"].form.fields) == set()
    admin_client.post(reverse("admin:jobs_bussession_change", args=[bus_session.pk]), {"node": "forged"})
    bus_session.refresh_from_db()
    assert bus_session.node == "host:1"
