"""enqueue and enqueue_many: what a job may be, and all-or-nothing batches with "line N: reason" errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from django.core.exceptions import ValidationError

from jobs import services
from jobs.models import EventKind, Job, JobEvent, Status
from jobs.services import MAX_PAYLOAD_BYTES, MAX_URL_LENGTH
from tests.conftest import ROOT

pytestmark = pytest.mark.django_db


def url_of_length(length: int) -> str:
    prefix = "https://example.com/"
    return prefix + "a" * (length - len(prefix))


def field_errors(exc_info) -> dict[str, list[str]]:
    return exc_info.value.message_dict


# --- One job ---------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://example.com/", "https://example.com/a?b=c#d", "https://127.0.0.1:8080/x"])
def test_http_and_https_urls_are_accepted(url):
    job = services.enqueue(url=url, actor="test")

    job.refresh_from_db()
    assert (job.url, job.status, job.attempt, job.payload, job.priority) == (url, Status.QUEUED, 0, {}, 0)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/file",
        "file:///etc/passwd",
        "javascript:alert(1)",
        "example.com/no-scheme",
        "https://",
        "",
        "   ",
        None,
        42,
    ],
)
def test_other_urls_are_rejected_naming_the_url_field(url):
    with pytest.raises(ValidationError) as exc_info:
        services.enqueue(url=url, actor="test")

    assert list(field_errors(exc_info)) == ["url"]
    assert Job.objects.count() == 0


def test_url_of_2048_characters_is_accepted_and_2049_rejected():
    longest = url_of_length(MAX_URL_LENGTH)
    assert MAX_URL_LENGTH == 2048 and len(longest) == 2048

    assert services.enqueue(url=longest, actor="test").url == longest
    with pytest.raises(ValidationError) as exc_info:
        services.enqueue(url=url_of_length(MAX_URL_LENGTH + 1), actor="test")
    assert "2048" in field_errors(exc_info)["url"][0]
    assert Job.objects.count() == 1


def test_surrounding_whitespace_is_stripped_from_the_url():
    assert services.enqueue(url="  https://example.com/x \n", actor="test").url == "https://example.com/x"


def test_payload_object_is_stored():
    payload = {"depth": 2, "tags": ["a", "b"], "nested": {"x": None}}

    job = services.enqueue(url="https://example.com/", payload=payload, actor="test")

    job.refresh_from_db()
    assert job.payload == payload


@pytest.mark.parametrize("payload", [[1, 2], "text", 3, True, {"bad": {1, 2}}, {"nan": float("nan")}])
def test_payload_that_is_not_a_json_object_is_rejected_naming_the_payload_field(payload):
    with pytest.raises(ValidationError) as exc_info:
        services.enqueue(url="https://example.com/", payload=payload, actor="test")

    assert list(field_errors(exc_info)) == ["payload"]
    assert Job.objects.count() == 0


def test_payload_of_64_kib_is_accepted_and_one_byte_more_rejected():
    overhead = len('{"blob": ""}')
    fits = {"blob": "x" * (MAX_PAYLOAD_BYTES - overhead)}
    too_big = {"blob": "x" * (MAX_PAYLOAD_BYTES - overhead + 1)}
    assert MAX_PAYLOAD_BYTES == 64 * 1024

    assert services.enqueue(url="https://example.com/", payload=fits, actor="test").payload == fits
    with pytest.raises(ValidationError) as exc_info:
        services.enqueue(url="https://example.com/", payload=too_big, actor="test")
    assert str(MAX_PAYLOAD_BYTES) in field_errors(exc_info)["payload"][0]
    assert Job.objects.count() == 1


def test_payload_size_counts_utf8_bytes_not_characters():
    # "é" is one character but two bytes in UTF-8 (json.dumps escapes it to six).
    too_big = {"blob": "é" * (MAX_PAYLOAD_BYTES // 2)}

    with pytest.raises(ValidationError) as exc_info:
        services.enqueue(url="https://example.com/", payload=too_big, actor="test")
    assert "payload" in field_errors(exc_info)


@pytest.mark.parametrize("priority", ["1", 1.5, True, None, 2**31, -(2**31) - 1])
def test_priority_that_is_not_a_whole_number_in_range_is_rejected_naming_the_priority_field(priority):
    with pytest.raises(ValidationError) as exc_info:
        services.enqueue(url="https://example.com/", priority=priority, actor="test")

    assert list(field_errors(exc_info)) == ["priority"]
    assert Job.objects.count() == 0


@pytest.mark.parametrize("priority", [-(2**31), -1, 0, 7, 2**31 - 1])
def test_priority_whole_numbers_in_range_are_accepted(priority):
    assert services.enqueue(url="https://example.com/", priority=priority, actor="test").priority == priority


def test_enqueue_writes_an_enqueue_event():
    job = services.enqueue(url="https://example.com/", actor="command")

    event = JobEvent.objects.get(job=job)
    assert (event.kind, event.from_status, event.to_status, event.actor) == (
        EventKind.ENQUEUE,
        "",
        Status.QUEUED,
        "command",
    )


# --- Many jobs ---------------------------------------------------------------------------


def test_enqueue_many_queues_every_url_in_order_with_events():
    urls = [f"https://example.com/{i}" for i in range(7)]

    jobs = services.enqueue_many(urls=urls, payload={"k": 1}, priority=3, actor="test")

    assert [job.url for job in jobs] == urls
    assert all(job.pk for job in jobs)
    stored = list(Job.objects.order_by("id").values_list("url", "payload", "priority", "status"))
    assert stored == [(url, {"k": 1}, 3, Status.QUEUED) for url in urls]
    assert JobEvent.objects.filter(kind=EventKind.ENQUEUE).count() == 7


def test_enqueue_many_is_all_or_nothing_and_reports_every_bad_line():
    urls = [
        "https://example.com/ok",
        "ftp://example.com/x",
        "https://example.com/ok2",
        "not a url",
        url_of_length(MAX_URL_LENGTH + 1),
    ]

    with pytest.raises(ValidationError) as exc_info:
        services.enqueue_many(urls=urls, actor="test")

    messages = exc_info.value.messages
    assert [message.split(":")[0] for message in messages] == ["line 2", "line 4", "line 5"]
    assert "ftp://example.com/x" in messages[0]
    assert "url" in messages[1].lower()
    assert "2048" in messages[2]
    assert Job.objects.count() == 0
    assert JobEvent.objects.count() == 0


def test_enqueue_many_with_a_bad_payload_names_the_payload():
    with pytest.raises(ValidationError) as exc_info:
        services.enqueue_many(urls=["https://example.com/a"], payload=["not", "an", "object"], actor="test")

    # The payload is shared by every line: one error naming the field, not one per line.
    assert list(exc_info.value.message_dict) == ["payload"]
    assert Job.objects.count() == 0


def test_enqueue_many_with_no_urls_is_an_error():
    with pytest.raises(ValidationError):
        services.enqueue_many(urls=[], actor="test")
    assert Job.objects.count() == 0


def test_enqueued_jobs_are_claimable():
    import uuid

    jobs = services.enqueue_many(urls=["https://example.com/a", "https://example.com/b"], actor="test")

    claimed = services.claim_jobs(session=uuid.uuid4(), limit=10, lease_seconds=60)
    assert [c.id for c in claimed] == [job.id for job in jobs]


# --- Control characters in a URL, from every way in ---------------------------------------------

CONTROL_URLS = ["https://example.com/a\x00b", "https://example.com/a\x01b", "https://example.com/\x7f"]


@pytest.fixture
def operator_client(client, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("operator", "op@example.org", "pw"))
    return client


@pytest.mark.parametrize("url", CONTROL_URLS)
def test_the_enqueue_page_refuses_a_control_character_and_queues_nothing(operator_client, url):
    response = operator_client.post("/jobs/new", {"urls": f"https://example.com/ok\n{url}", "priority": "0"})

    assert response.status_code == 200
    html = response.content.decode()
    assert "Null characters are not allowed" in html if "\x00" in url else "control character U+00" in html
    assert Job.objects.count() == 0


@pytest.mark.parametrize("url", CONTROL_URLS)
def test_the_admin_refuses_a_control_character_in_a_queued_jobs_url(operator_client, url):
    job = services.enqueue(url="https://example.com/before", actor="test")
    response = operator_client.post(
        f"/admin/jobs/job/{job.pk}/change/",
        {
            "url": url,
            "payload": "{}",
            "priority": "0",
            "max_attempts": "3",
            "max_interruptions": "3",
            "events-TOTAL_FORMS": "0",
            "events-INITIAL_FORMS": "0",
        },
    )

    assert response.status_code == 200 and b"errornote" in response.content
    assert b"Null characters are not allowed" in response.content or b"control character U+00" in response.content
    job.refresh_from_db()
    assert job.url == "https://example.com/before"


def run_enqueue(processes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", "enqueue", *args],
        cwd=ROOT,
        env=processes.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.django_db(transaction=True)
def test_enqueue_command_refuses_a_control_character_in_an_argument(processes):
    # An argument cannot hold NUL (execve stops at it); U+0001 and DEL can.
    proc = run_enqueue(processes, "https://example.com/ok", "https://example.com/a\x01b", "https://example.com/\x7f")

    assert proc.returncode != 0
    assert "rejected argument 2: URL contains the control character U+0001" in proc.stdout
    assert "rejected argument 3: URL contains the control character U+007F" in proc.stdout
    assert Job.objects.count() == 0


@pytest.mark.django_db(transaction=True)
def test_enqueue_command_refuses_a_file_with_a_nul_byte(processes, tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_bytes(b"https://example.com/ok\nhttps://example.com/a\x00b\n")
    proc = run_enqueue(processes, "--file", str(urls))

    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert "line 2: URL contains the control character U+0000" in proc.stdout, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    assert Job.objects.count() == 0
