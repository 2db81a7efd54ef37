"""POST /api/jobs/: scripts queue jobs (URLs, priority, kind, payload), all or none, with the page's rules."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse

from jobs.models import Job, JobEvent, Status

pytestmark = pytest.mark.django_db

LIST = reverse("jobs:api_list")


@pytest.fixture
def staff(django_user_model):
    user = django_user_model.objects.create_user("ops", password="pw", is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="change_job"))
    return user


@pytest.fixture
def api(client, staff):
    client.force_login(staff)
    return client


def post(client, body, **extra):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(LIST, data, content_type="application/json", **extra)


def test_a_staff_script_queues_urls_with_kind_priority_and_payload(api):
    response = post(
        api,
        {
            "urls": ["https://example.org/a", "https://example.org/b"],
            "kind": "news",
            "priority": 7,
            "payload": {"depth": 2},
        },
    )

    assert response.status_code == 201
    body = response.json()
    assert body["count"] == 2
    jobs = [Job.objects.get(pk=pk) for pk in body["ids"]]
    assert [job.url for job in jobs] == ["https://example.org/a", "https://example.org/b"]
    assert {(job.kind, job.priority, job.status) for job in jobs} == {("news", 7, Status.QUEUED)}
    assert all(job.payload == {"depth": 2} for job in jobs)
    assert JobEvent.objects.filter(job__in=jobs, kind="enqueue", actor="api:ops").count() == 2
    # What the list then shows, filtered by the kind.
    listed = api.get(LIST, {"kind": "news"}).json()["jobs"]
    assert sorted(job["id"] for job in listed) == sorted(body["ids"])


def test_one_url_may_be_given_as_url_and_the_kind_defaults_to_any_crawler(api):
    response = post(api, {"url": "https://example.org/one"})
    assert response.status_code == 201
    assert Job.objects.get(pk=response.json()["ids"][0]).kind == ""


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("not json", "the body must be a JSON object"),
        ([], "the body must be a JSON object"),
        ({"urls": ["https://example.org/a"], "colour": "red"}, "unknown fields: colour"),
        ({}, "give either url"),
        ({"url": "https://example.org/a", "urls": []}, "give either url"),
        ({"urls": []}, "urls must be a non-empty list of strings"),
        ({"urls": "https://example.org/a"}, "urls must be a non-empty list of strings"),
        ({"urls": [1]}, "urls must be a non-empty list of strings"),
        ({"urls": ["https://example.org/a"], "kind": 3}, "kind must be a string"),
        ({"urls": ["https://example.org/a"], "kind": "k" * 101}, "at most 100"),
        ({"urls": ["https://example.org/a"], "priority": "high"}, "priority must be a whole number"),
        ({"urls": ["https://example.org/a"], "payload": [1]}, "payload must be a JSON object"),
        ({"urls": ["https://example.org/a", "ftp://example.org/b"]}, "line 2"),
        ('{"url": "https://example.org/a", "payload": {"text": "nul \\u0000 inside"}}', "payload"),
        ('{"url": "https://example.org/a", "payload": {"text": "lone \\ud800 surrogate"}}', "payload"),
        ('{"url": "https://example.org/a", "kind": "lone \\udc00"}', "kind"),
    ],
)
def test_bad_input_is_a_json_400_and_queues_nothing(api, body, message):
    response = post(api, body)

    assert response.status_code == 400
    assert message in json.dumps(response.json())
    assert Job.objects.count() == 0


def test_at_most_as_many_urls_as_the_page_takes(api):
    response = post(api, {"urls": [f"https://example.org/{n}" for n in range(10_001)]})
    assert response.status_code == 400 and "at most 10000 URLs" in response.json()["error"]
    assert Job.objects.count() == 0


def test_reading_is_not_enough_to_queue_and_anonymous_callers_get_401(client, django_user_model):
    assert post(client, {"url": "https://example.org/a"}).status_code == 401
    reader = django_user_model.objects.create_user("reader", password="pw")
    reader.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(reader)
    response = post(client, {"url": "https://example.org/a"})
    assert response.status_code == 403 and "permission to change jobs" in response.json()["error"]
    assert Job.objects.count() == 0


def test_the_session_cookie_alone_is_not_enough_the_csrf_token_is_checked(staff):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(staff)
    assert post(browser, {"url": "https://example.org/a"}).status_code == 403
    assert Job.objects.count() == 0

    browser.get(reverse("jobs:new"))  # any page that renders a form sets the csrftoken cookie
    token = browser.cookies["csrftoken"].value
    response = post(browser, {"url": "https://example.org/a"}, HTTP_X_CSRFTOKEN=token)
    assert response.status_code == 201
    assert Job.objects.count() == 1
