"""The JSON API for scripts: sign-in, filters, keyset pages, one job and its history (queueing: test_api_enqueue)."""

from __future__ import annotations

import uuid

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from jobs import services
from jobs.models import Job, Status

pytestmark = pytest.mark.django_db

LIST = reverse("jobs:api_list")


@pytest.fixture
def api(client, django_user_model):
    """A signed-in user who is not staff: reading needs only the view permission."""
    user = django_user_model.objects.create_user("script", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(user)
    return client


def enqueue(*urls: str, priority: int = 0) -> list[Job]:
    return services.enqueue_many(urls=list(urls), priority=priority, actor="test")


def ids(response) -> list[int]:
    return [job["id"] for job in response.json()["jobs"]]


def test_anonymous_callers_get_json_401(client):
    job = enqueue("https://example.com/a")[0]
    for url in (LIST, reverse("jobs:api_detail", args=[job.pk])):
        response = client.get(url)
        assert response.status_code == 401, url
        assert response["Content-Type"] == "application/json"
        assert "error" in response.json()


def test_list_is_newest_first_with_the_summary_fields(api):
    first, second = enqueue("https://example.com/1", "https://example.com/2")
    response = api.get(LIST)
    assert response.status_code == 200
    body = response.json()
    assert body["next"] is None
    assert [job["id"] for job in body["jobs"]] == [second.pk, first.pk]
    job = body["jobs"][0]
    assert job["url"] == "https://example.com/2" and job["status"] == "queued" and job["attempt"] == 0
    assert job["href"] == f"/api/jobs/{second.pk}/" and job["session"] is None
    assert "payload" not in job and "result" not in job


def test_list_filters_by_status_and_url(api):
    jobs = enqueue("https://alpha.example.com/1", "https://beta.example.com/2", "https://ALPHA.example.com/3")
    session = uuid.uuid4()
    claimed = services.claim_jobs(session=session, limit=1, lease_seconds=60)
    assert ids(api.get(LIST, {"status": "running"})) == [claimed[0].id]
    assert ids(api.get(LIST, {"url": "alpha"})) == [jobs[2].pk, jobs[0].pk]
    assert ids(api.get(LIST, {"url": "alpha", "status": "queued"})) == [
        job.pk for job in (jobs[2], jobs[0]) if job.pk != claimed[0].id
    ]
    running = api.get(LIST, {"status": "running"}).json()["jobs"][0]
    assert running["session"] == str(session)


def test_list_pages_with_before_until_the_end(api):
    created = [job.pk for job in enqueue(*[f"https://example.com/{n}" for n in range(25)])][::-1]
    seen = []
    url = f"{LIST}?limit=10"
    pages = 0
    while url:
        body = api.get(url).json()
        seen += [job["id"] for job in body["jobs"]]
        url = body["next"]
        pages += 1
    assert pages == 3 and seen == created
    assert ids(api.get(LIST, {"before": created[4], "limit": 3})) == created[5:8]
    assert "limit=10" in api.get(f"{LIST}?limit=10").json()["next"]


def test_list_keeps_filters_in_the_next_link(api):
    enqueue(*[f"https://example.com/keep/{n}" for n in range(5)])
    enqueue("https://other.test/")
    body = api.get(LIST, {"url": "keep", "status": "queued", "limit": 2}).json()
    assert "url=keep" in body["next"] and "status=queued" in body["next"]
    second = api.get(body["next"]).json()
    assert all("keep" in job["url"] for job in second["jobs"]) and len(second["jobs"]) == 2


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 201}, {"limit": "x"}, {"before": "x"}, {"status": "sleeping"}, {"before": str(2**64)}],
)
def test_list_refuses_bad_parameters_with_json_400(api, params):
    response = api.get(LIST, params)
    assert response.status_code == 400 and "error" in response.json()


def test_list_accepts_the_largest_limit(api):
    enqueue(*[f"https://example.com/{n}" for n in range(3)])
    assert len(ids(api.get(LIST, {"limit": 200}))) == 3


def test_list_query_count_is_bounded(api, django_assert_max_num_queries):
    enqueue(*[f"https://example.com/{n}" for n in range(150)])
    with django_assert_max_num_queries(5):  # session, user, the user's and the groups' permissions, one page
        response = api.get(LIST, {"limit": 100})
    assert len(ids(response)) == 100


def test_detail_has_the_job_and_its_events(api):
    job = enqueue("https://example.com/a")[0]
    session = uuid.uuid4()
    services.claim_jobs(session=session, limit=1, lease_seconds=60)
    services.record_outcomes(
        session=session,
        outcomes=[
            services.Outcome(
                job_id=job.pk,
                attempt=1,
                succeeded=True,
                result={"status": 200, "title": "<b>hi</b>"},
            )
        ],
    )
    response = api.get(reverse("jobs:api_detail", args=[job.pk]))
    assert response.status_code == 200
    body = response.json()
    assert body["id"] == job.pk and body["status"] == Status.SUCCEEDED
    assert body["result"] == {"status": 200, "title": "<b>hi</b>"}  # JSON carries data as it is
    assert [event["kind"] for event in body["events"]] == ["enqueue", "claim", "outcome"]
    assert body["events"][1]["session"] == str(session)
    assert body["events_truncated"] is False and body["page"] == f"/jobs/{job.pk}/"


def test_detail_of_a_missing_job_is_json_404(api):
    response = api.get(reverse("jobs:api_detail", args=[424242]))
    assert response.status_code == 404 and response.json() == {"error": "no job 424242"}


def test_readers_cannot_change_anything(api):
    job = enqueue("https://example.com/a")[0]
    assert api.post(LIST, {}).status_code == 403  # queueing needs the change permission (tests/test_api_enqueue.py)
    assert api.delete(reverse("jobs:api_detail", args=[job.pk])).status_code == 405
    assert api.post(reverse("jobs:api_detail", args=[job.pk]), {}).status_code == 405
    assert Job.objects.filter(pk=job.pk, status=Status.QUEUED).exists()
