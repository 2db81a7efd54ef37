"""Every page and the API survive what a job can hold and what a visitor can type.

A job with thousands of events, a stored result with a 5,000-digit number or
deep nesting, non-ASCII digits in any parameter: 200 or 400, never a 500, and
the big timelines are capped with a link to the rest.
"""

from __future__ import annotations

import json
import uuid

import pytest
from django.db import connection
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jobs import selectors, services
from jobs.admin import INLINE_EVENTS
from jobs.models import EventKind, Job, JobEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_user("operator", password="pw-operator", is_staff=True, is_superuser=True)


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


def enqueue(*urls: str) -> list[Job]:
    return services.enqueue_many(urls=list(urls), priority=0, actor="test")


def every_page(job_id: int) -> list[str]:
    """Each page and API view that shows a job, whole and as its live part."""
    return [
        "/",
        "/?fragment=1",
        "/jobs/",
        "/jobs/?fragment=1",
        f"/jobs/{job_id}/",
        f"/jobs/{job_id}/?fragment=1",
        "/api/jobs/",
        f"/api/jobs/{job_id}/",
        reverse("admin:jobs_job_changelist"),
        reverse("admin:jobs_job_change", args=[job_id]),
        reverse("admin:jobs_jobevent_changelist") + f"?job={job_id}",
    ]


def add_stale_events(job: Job, count: int) -> None:
    at = timezone.now()
    session = uuid.uuid4()
    JobEvent.objects.bulk_create(
        [
            JobEvent(
                job=job,
                at=at,
                kind=EventKind.STALE,
                attempt=n + 2,
                session=session,
                actor="bus",
                reason=f"stale outcome {n}",
            )
            for n in range(count)
        ],
        batch_size=1000,
    )


# --- A job with thousands of events ------------------------------------------------------


def test_pages_of_a_job_with_5000_events_show_the_latest_and_link_to_the_rest(
    operator_client,
    django_assert_max_num_queries,
):
    job = enqueue("https://example.com/flooded")[0]
    add_stale_events(job, 5000)
    newest = JobEvent.objects.filter(job=job).order_by("-id").values_list("id", flat=True)[0]

    with django_assert_max_num_queries(5):  # session, user, job, events, bus session
        page = operator_client.get(job.get_absolute_url())
    html = page.content.decode()
    assert html.count("data-event=") == selectors.MAX_EVENTS
    assert f'data-event="{newest}"' in html  # the latest, not the first
    assert 'id="events-cut"' in html
    assert f'href="/admin/jobs/jobevent/?job={job.pk}" id="all-events-link"' in html

    with django_assert_max_num_queries(12):
        admin_page = operator_client.get(reverse("admin:jobs_job_change", args=[job.pk]))
    html = admin_page.content.decode()
    assert admin_page.status_code == 200
    assert html.count("stale outcome ") == INLINE_EVENTS
    assert "stale outcome 4999" in html and "stale outcome 4899" not in html
    assert f'href="/admin/jobs/jobevent/?job={job.pk}" id="all-events-link"' in html

    with django_assert_max_num_queries(8):
        listing = operator_client.get(f"/admin/jobs/jobevent/?job={job.pk}")
    html = listing.content.decode()
    assert listing.status_code == 200 and html.count("stale outcome ") == 100
    assert "stale outcome 4999" in html
    assert operator_client.get(f"/admin/jobs/jobevent/?job={job.pk}&p=50").status_code == 200


def test_a_job_with_few_events_shows_them_all_without_a_cut_note(operator_client):
    job = enqueue("https://example.com/calm")[0]
    add_stale_events(job, 3)
    html = operator_client.get(job.get_absolute_url()).content.decode()
    assert html.count("data-event=") == 4 and 'id="events-cut"' not in html
    html = operator_client.get(reverse("admin:jobs_job_change", args=[job.pk])).content.decode()
    assert html.count("stale outcome ") == 3 and 'id="events-cut"' not in html


# --- Whatever a stored result holds ---------------------------------------------------------


def store_raw(job: Job, column: str, text: str) -> None:
    """Write JSON text straight into the column, as another program (or an old bug) could have."""
    table = Job._meta.db_table
    cast = "::jsonb" if connection.vendor == "postgresql" else ""
    with connection.cursor() as cursor:
        cursor.execute(f"UPDATE {table} SET {column} = %s{cast} WHERE id = %s", [text, job.pk])


def assert_every_page_renders(client: Client, job: Job) -> dict:
    for url in every_page(job.pk):
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
    body = client.get(f"/api/jobs/{job.pk}/").content
    return json.loads(body)  # strict JSON: no NaN, no Infinity


def test_a_stored_number_of_5000_digits_is_shown_as_its_digits(operator_client):
    job = enqueue("https://example.com/huge")[0]
    digits = "9" * 5000
    store_raw(job, "result", f'{{"status": 200, "bytes": {digits}, "links": -{digits}, "nested": [{digits}]}}')
    store_raw(job, "progress", digits)
    api = assert_every_page_renders(operator_client, job)
    assert api["result"]["bytes"] == digits and api["result"]["links"] == "-" + digits
    assert api["progress"] == digits
    assert digits in operator_client.get(job.get_absolute_url()).content.decode()


def test_deep_nesting_renders(operator_client):
    job = enqueue("https://example.com/deep")[0]
    for depth in (20, 400, 990):  # SQLite's JSON_VALID allows at most 1,000 levels
        store_raw(job, "result", "[" * depth + "]" * depth)
        store_raw(job, "progress", '{"a":' * depth + "1" + "}" * depth)
        api = assert_every_page_renders(operator_client, job)
        assert api["result"] is not None


def test_a_big_float_and_an_int_just_under_the_digit_limit_render(operator_client):
    job = enqueue("https://example.com/big")[0]
    Job.objects.filter(pk=job.pk).update(
        result={
            "bytes": 10**4000,
            "elapsed_ms": 1.7976931348623157e308,
            "status": -(2**70),
            "title": ["not", {"a": "string"}],
        }
    )
    assert_every_page_renders(operator_client, job)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**300), max_value=10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(st.characters(exclude_categories=["Cs"]), max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
result_like = st.fixed_dictionaries(
    {},
    optional={
        key: json_values for key in ("status", "final_url", "content_type", "bytes", "title", "links", "elapsed_ms")
    },
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(result=st.one_of(json_values, result_like), progress=json_values)
def test_every_page_renders_any_stored_json_result(operator_client, result, progress):
    job = Job.objects.order_by("id").first() or enqueue("https://example.com/any")[0]
    if connection.vendor == "postgresql" and "\\u0000" in json.dumps([result, progress]):
        progress = result = "jsonb cannot hold NUL"  # PostgreSQL refuses \u0000 in jsonb text
    Job.objects.filter(pk=job.pk).update(result=result, progress=progress)
    api = assert_every_page_renders(operator_client, job)
    assert api["id"] == job.pk


# --- Non-ASCII digits and other odd input ------------------------------------------------------

ODD_VALUES = ["²", "٣", "１２", "1²", "-1", "9" * 5000, "0x10", " ", "\u00a0", "１e３", "\ufeff7", "%00"]


def session_admin_list() -> str:
    """The admin's bus session list, wherever the BusSession model lives."""
    from django.contrib import admin

    [model] = [model for model in admin.site._registry if model.__name__ == "BusSession"]
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_changelist")


@pytest.mark.parametrize("value", ODD_VALUES)
def test_odd_values_in_every_query_parameter_give_200_or_400(operator_client, value):
    job = enqueue("https://example.com/a")[0]
    pages = {
        "/": ["fragment"],
        "/jobs/": ["q", "status", "sort", "before", "after", "fragment"],
        f"/jobs/{job.pk}/": ["fragment"],
        "/api/jobs/": ["status", "url", "before", "limit"],
        f"/api/jobs/{job.pk}/": [],
        "/health": [],
        "/admin/jobs/job/": ["q", "p", "o", "status__exact", "lease_session", "id", "all"],
        "/admin/jobs/jobevent/": ["job", "p", "kind__exact", "o"],
        session_admin_list(): ["q", "p", "o", "state__exact"],
    }
    for path, names in pages.items():
        for name in names:
            response = operator_client.get(path, {name: value})
            assert response.status_code in (200, 302, 400, 503), (path, name, response.status_code)
            if response.status_code == 302:  # the admin's "?e=1" for a lookup it cannot use
                assert "e=1" in response.url, (path, name, response.url)


@pytest.mark.parametrize("value", ["²", "٣", "9" * 5000, "1²"])
def test_odd_values_in_forms_are_refused_without_a_500(operator_client, value):
    job = enqueue("https://example.com/a")[0]
    response = operator_client.post(reverse("jobs:actions"), {"action": "cancel", "job": [value]})
    assert response.status_code == 302
    job.refresh_from_db()
    assert job.status == "queued"
    # Django's IntegerField reads "٣" as 3 (a digit in Arabic-Indic script); the others are refused.
    response = operator_client.post(reverse("jobs:new"), {"urls": "https://example.com/b", "priority": value})
    assert response.status_code == (302 if value == "٣" else 200)
    if value != "٣":
        assert b"errorlist" in response.content
    response = operator_client.post(
        reverse("admin:jobs_job_change", args=[job.pk]),
        {
            "url": job.url,
            "payload": "{}",
            "priority": value,
            "max_attempts": value,
            "max_interruptions": "3",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )
    assert response.status_code in (200, 302)
    job.refresh_from_db()
    assert job.priority == (3 if value == "٣" else 0)


def test_search_by_a_non_ascii_digit_is_a_url_search_not_an_id():
    superscript, plain = enqueue("https://example.com/²", "https://example.com/2")
    assert [job.pk for job in selectors.job_page(url="²").jobs] == [superscript.pk]
    assert [job.pk for job in selectors.job_page(url=f"#{plain.pk}").jobs] == [plain.pk]
