"""The crawler registry as people use it: `manage.py crawlers`, the admin, the crawlers page, and
crawlers announcing themselves over HTTP (POST /crawlers/announce). No bus runs: the rows a bus
would write (owner, session, heartbeats) are written directly.
"""

from __future__ import annotations

import io
import json
import secrets
import time
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.models import Permission
from django.core.management import CommandError, call_command
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from jobs import fleet, services
from jobs.models import BusNode, BusSession, Crawler, CrawlerSource, CrawlerState, Job, Status
from tests.test_commands import manage

pytestmark = pytest.mark.django_db

TOKEN = "a-shared-secret-for-the-announce-tests"
PAGE = reverse("jobs:crawlers")
ACTION = reverse("jobs:crawler_action")
ADD = reverse("jobs:crawler_add")
ANNOUNCE = reverse("jobs:announce")
HOSTILE = "<script>alert('crawler')</script>"


# --- Fixtures ------------------------------------------------------------------------


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_user("operator", password="pw", is_staff=True, is_superuser=True)


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def viewer_client(client, django_user_model):
    """Signed in, not staff, may read jobs: sees the crawlers, may not act on them."""
    user = django_user_model.objects.create_user("viewer", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client.force_login(user)
    return client


@pytest.fixture
def token(settings):
    settings.BUS_TOKEN = TOKEN
    return TOKEN


def owned_crawler(
    endpoint: str = "unix:/tmp/fleet-a.sock",
    *,
    label: str = "crawler A",
    node: str = "node-1",
    slots: int = 4,
    heartbeat_age: float = 3.0,
) -> tuple[Crawler, uuid.UUID]:
    """A crawler as its owning bus leaves it: node lease, open session, a recent heartbeat."""
    now = timezone.now()
    session = uuid.uuid4()
    BusNode.objects.get_or_create(
        node=node, defaults=dict(host="host", pid=1, started_at=now, lease_expires_at=now + timedelta(seconds=30))
    )
    BusSession.objects.create(
        session=session,
        node=node,
        endpoint=endpoint,
        crawler=label,
        slots=slots,
        connected_at=now - timedelta(minutes=5),
        last_heartbeat_at=now - timedelta(seconds=heartbeat_age),
    )
    crawler = Crawler.objects.create(
        endpoint=endpoint,
        label=label,
        owner=node,
        owner_epoch=1,
        owned_at=now,
        session=session,
        slots=slots,
        last_seen_at=now,
    )
    return crawler, session


def run_jobs(crawler: Crawler, session: uuid.UUID, count: int) -> list[Job]:
    services.enqueue_many(urls=[f"https://example.com/{uuid.uuid4().hex}" for _ in range(count)], actor="test")
    claimed = services.claim_jobs(session=session, limit=count, lease_seconds=60, crawler=crawler.endpoint)
    return [Job.objects.get(pk=c.id) for c in claimed]


def finish(crawler: Crawler, session: uuid.UUID, job: Job) -> None:
    outcome = services.Outcome(job_id=job.pk, attempt=job.attempt, succeeded=True, result={"status": 200})
    assert services.record_outcomes(session=session, outcomes=[outcome], crawler=crawler.endpoint) == ["recorded"]


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


# --- manage.py crawlers ----------------------------------------------------------------


def crawlers(*args: str) -> str:
    out = io.StringIO()
    call_command("crawlers", *args, stdout=out, stderr=io.StringIO(), no_color=True)
    return out.getvalue()


def test_command_add_registers_once_and_says_whether_it_was_new():
    assert crawlers("add", "/tmp/fleet-a.sock", "--label", "A").strip() == "unix:/tmp/fleet-a.sock: registered"
    again = crawlers("add", "unix:/tmp/fleet-a.sock")
    assert "unix:/tmp/fleet-a.sock: already registered (active)" in again and "nothing added" in again
    crawler = Crawler.objects.get()
    assert (crawler.endpoint, crawler.label, crawler.source) == ("unix:/tmp/fleet-a.sock", "A", CrawlerSource.PERSON)


def test_command_list_shows_each_crawler_its_owner_and_session():
    crawler, session = owned_crawler()
    Crawler.objects.create(endpoint="unix:/tmp/fleet-b.sock")
    lines = crawlers("list").splitlines()
    assert lines[0].split() == ["endpoint", "label", "state", "source", "owner", "session", "last", "seen"]
    row_a = next(line for line in lines if "fleet-a" in line)
    assert "crawler A" in row_a and "active" in row_a and "node-1" in row_a and str(session) in row_a
    assert row_a.endswith("ago")
    row_b = next(line for line in lines if "fleet-b" in line)
    assert row_b.split()[1:] == ["-", "active", "person", "-", "-", "never"]


def test_command_list_json_and_an_empty_registry():
    assert crawlers("list").strip() == "No crawler is registered."
    assert json.loads(crawlers("list", "--json")) == []
    owned_crawler()
    [row] = json.loads(crawlers("list", "--json"))
    assert row["endpoint"] == "unix:/tmp/fleet-a.sock" and row["owner"] == "node-1" and row["owner_live"] is True
    assert row["slots"] == 4 and row["slots_in_use"] == 0 and row["heartbeat_age"] >= 3


def test_command_drain_resume_and_remove_go_through_the_registry():
    crawler, session = owned_crawler()
    running = run_jobs(crawler, session, 2)
    assert "draining: no new jobs" in crawlers("drain", "/tmp/fleet-a.sock")
    assert Crawler.objects.get().state == CrawlerState.DRAINING
    assert "active" in crawlers("resume", "/tmp/fleet-a.sock")
    assert Crawler.objects.get().state == CrawlerState.ACTIVE

    output = crawlers("remove", "/tmp/fleet-a.sock")
    assert output.strip() == "unix:/tmp/fleet-a.sock: draining: removed once its running jobs finish"
    crawler.refresh_from_db()
    assert crawler.state == CrawlerState.DRAINING and crawler.remove_when_drained
    assert set(Job.objects.filter(pk__in=[j.pk for j in running]).values_list("status", flat=True)) == {Status.RUNNING}

    output = crawlers("remove", "/tmp/fleet-a.sock", "--now")
    assert output.strip() == "unix:/tmp/fleet-a.sock: removed, 2 jobs requeued"
    assert not Crawler.objects.exists()
    assert set(Job.objects.values_list("status", flat=True)) == {Status.QUEUED}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("add", "not-a-path"), "'not-a-path' is not a crawler endpoint"),
        (("add", "tcp://crawler.example:7000"), "refusing tcp://crawler.example:7000: TCP sessions need BUS_TOKEN"),
        (("drain", "/tmp/nobody.sock"), "no crawler unix:/tmp/nobody.sock is registered"),
        (("resume", "/tmp/nobody.sock"), "no crawler unix:/tmp/nobody.sock is registered"),
        (("remove", "/tmp/nobody.sock", "--now"), "no crawler unix:/tmp/nobody.sock is registered"),
    ],
)
def test_command_registry_errors_name_the_endpoint_and_change_nothing(args, message):
    with pytest.raises(CommandError, match=message.replace("(", r"\(")):
        crawlers(*args)
    assert not Crawler.objects.exists()


@pytest.mark.django_db(transaction=True)
def test_command_process_exits_non_zero_with_the_endpoint_on_stderr():
    done = manage("crawlers", "drain", "/tmp/nobody.sock")
    assert done.returncode != 0
    assert "no crawler unix:/tmp/nobody.sock is registered" in done.stderr
    done = manage("crawlers", "add", "/tmp/fleet-a.sock", "--label", "A")
    assert done.returncode == 0 and "unix:/tmp/fleet-a.sock: registered" in done.stdout
    assert Crawler.objects.filter(endpoint="unix:/tmp/fleet-a.sock").exists()


# --- The admin -------------------------------------------------------------------------

CHANGELIST = reverse("admin:jobs_crawler_changelist")
ADMIN_ADD = reverse("admin:jobs_crawler_add")


def test_admin_lists_crawlers_with_owner_and_session(operator_client):
    crawler, session = owned_crawler()
    response = operator_client.get(CHANGELIST)
    assert response.status_code == 200
    body = response.content.decode()
    assert crawler.endpoint in body and "node-1" in body
    assert reverse("admin:jobs_bussession_change", args=[session]) in body


def test_admin_add_form_registers_the_normalized_endpoint(operator_client):
    response = operator_client.post(ADMIN_ADD, {"endpoint": " /tmp/fleet-a.sock ", "label": "A"})
    assert response.status_code == 302
    crawler = Crawler.objects.get()
    assert (crawler.endpoint, crawler.label, crawler.source) == ("unix:/tmp/fleet-a.sock", "A", CrawlerSource.PERSON)


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("not-a-path", "is not a crawler endpoint"),
        ("tcp://crawler.example:7000", "TCP sessions need BUS_TOKEN"),
        ("unix:/tmp/fleet-a.sock", "already exists"),  # "/tmp/fleet-a.sock" is registered: the same crawler
    ],
)
def test_admin_add_form_refuses_a_bad_or_known_endpoint(operator_client, endpoint, problem):
    fleet.add_crawler(endpoint="/tmp/fleet-a.sock")
    response = operator_client.post(ADMIN_ADD, {"endpoint": endpoint, "label": ""})
    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert problem in " ".join(errors["endpoint"])
    assert Crawler.objects.count() == 1


def test_admin_change_edits_the_label_only_and_keeps_what_the_bus_wrote(operator_client):
    crawler, _ = owned_crawler()
    url = reverse("admin:jobs_crawler_change", args=[crawler.pk])
    form = operator_client.get(url).context["adminform"].form
    assert set(form.fields) == {"label"}  # endpoint, state, owner, epoch, session: read-only
    Crawler.objects.filter(pk=crawler.pk).update(owner="node-2", owner_epoch=2)  # a takeover meanwhile
    response = operator_client.post(url, {"label": "renamed", "endpoint": "unix:/tmp/elsewhere.sock", "owner": ""})
    assert response.status_code == 302
    crawler.refresh_from_db()
    assert (crawler.label, crawler.endpoint, crawler.owner, crawler.owner_epoch) == (
        "renamed",
        "unix:/tmp/fleet-a.sock",
        "node-2",
        2,
    )


def admin_action(client, action: str, *crawlers: Crawler):
    data = {"action": action, "_selected_action": [c.pk for c in crawlers]}
    return client.post(CHANGELIST, data, follow=True)


def test_admin_actions_drain_resume_and_remove_through_the_registry(operator_client):
    crawler, session = owned_crawler()
    other = Crawler.objects.create(endpoint="unix:/tmp/fleet-b.sock")
    run_jobs(crawler, session, 1)

    response = admin_action(operator_client, "drain", crawler, other)
    assert set(Crawler.objects.values_list("state", flat=True)) == {CrawlerState.DRAINING}
    assert any("unix:/tmp/fleet-b.sock: draining" in text for text in messages_of(response))
    admin_action(operator_client, "resume", crawler, other)
    assert set(Crawler.objects.values_list("state", flat=True)) == {CrawlerState.ACTIVE}

    response = admin_action(operator_client, "remove", crawler, other)
    texts = messages_of(response)
    assert "unix:/tmp/fleet-a.sock: draining: removed once its running jobs finish" in texts
    assert "unix:/tmp/fleet-b.sock: removed, 0 jobs requeued" in texts  # nothing ran, no session: at once
    assert list(Crawler.objects.values_list("endpoint", "remove_when_drained")) == [(crawler.endpoint, True)]

    response = admin_action(operator_client, "remove_now", crawler)
    assert "unix:/tmp/fleet-a.sock: removed, 1 job requeued" in messages_of(response)
    assert not Crawler.objects.exists() and Job.objects.get().status == Status.QUEUED


def test_admin_cannot_delete_a_crawler_row(operator_client):
    crawler, _ = owned_crawler()
    assert operator_client.get(reverse("admin:jobs_crawler_delete", args=[crawler.pk])).status_code == 403
    assert "delete_selected" not in operator_client.get(CHANGELIST).context["action_form"].fields["action"].choices


def test_bus_node_admin_is_read_only(operator_client):
    owned_crawler()
    node = BusNode.objects.get()
    assert "node-1" in operator_client.get(reverse("admin:jobs_busnode_changelist")).content.decode()
    assert operator_client.get(reverse("admin:jobs_busnode_add")).status_code == 403
    change = operator_client.get(reverse("admin:jobs_busnode_change", args=[node.pk]))
    assert change.status_code == 200 and not change.context["adminform"].form.fields


# --- The crawlers page -----------------------------------------------------------------


def row_of(response, endpoint: str) -> str:
    body = response.content.decode()
    start = body.index(f'data-endpoint="{endpoint}"')
    return body[start : body.index("</tr>", start)]


def test_page_shows_every_crawler_with_its_owner_session_heartbeat_slots_and_work(viewer_client):
    crawler, session = owned_crawler(heartbeat_age=3)
    jobs = run_jobs(crawler, session, 3)
    finish(crawler, session, jobs[0])
    Job.objects.filter(pk=jobs[1].pk).update(crawler="unix:/tmp/someone-else.sock")  # another crawler's
    idle = Crawler.objects.create(endpoint="unix:/tmp/fleet-b.sock", state=CrawlerState.PAUSED, last_error="refused")

    response = viewer_client.get(PAGE)
    assert response.status_code == 200
    row = row_of(response, crawler.endpoint)
    assert 'data-state="active"' in row and "crawler A" in row and 'data-owner="node-1"' in row
    assert f'data-session="{session}"' in row and str(session)[:8] in row
    assert 'data-slots-in-use="1" data-slots="4"' in row  # one running job is still this crawler's
    assert 'data-finished-last-hour="1"' in row
    assert "heartbeat-ok" in row and "lease expired" not in row
    other = row_of(response, idle.endpoint)
    assert 'data-state="paused"' in other and "refused" in other and 'data-slots-in-use="0"' in other
    assert "never" in other
    # A viewer sees no buttons and no add form.
    assert (
        'data-action="drain"' not in response.content.decode() and "crawler-add-form" not in response.content.decode()
    )


def test_page_marks_a_late_heartbeat_and_an_expired_owner_lease(viewer_client, settings):
    settings.HEARTBEAT_TIMEOUT = 10
    crawler, _ = owned_crawler(heartbeat_age=25)
    BusNode.objects.update(lease_expires_at=timezone.now() - timedelta(seconds=5))
    row = row_of(viewer_client.get(PAGE), crawler.endpoint)
    assert "heartbeat-overdue" in row and "lease expired" in row


def test_page_reads_a_fixed_number_of_queries_whatever_the_number_of_crawlers(operator_client):
    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert operator_client.get(PAGE).status_code == 200
        return len(captured)

    crawler, session = owned_crawler()
    run_jobs(crawler, session, 2)
    one = queries()
    for n in range(8):
        other, other_session = owned_crawler(f"unix:/tmp/fleet-{n}.sock", node=f"node-{n}")
        finish(other, other_session, run_jobs(other, other_session, 1)[0])
    assert queries() == one
    assert one <= 9  # session, user, the five fleet queries, and the permission checks


def test_page_and_dashboard_link_each_other_and_the_fragment_is_the_table_alone(viewer_client):
    owned_crawler()
    assert f'href="{PAGE}"' in viewer_client.get(reverse("jobs:dashboard")).content.decode()
    page = viewer_client.get(PAGE).content.decode()
    assert 'id="nav-crawlers" aria-current="page"' in page and 'id="crawlers-live"' in page
    fragment = viewer_client.get(PAGE, {"fragment": "1"})
    assert fragment["Cache-Control"] == "no-store"
    body = fragment.content.decode()
    assert 'id="crawlers"' in body and "<html" not in body


def test_page_escapes_labels_and_errors(operator_client):
    Crawler.objects.create(endpoint="unix:/tmp/fleet-a.sock", label=HOSTILE, last_error=HOSTILE)
    body = operator_client.get(PAGE).content.decode()
    assert HOSTILE not in body and "&lt;script&gt;" in body


def test_page_permissions(client, viewer_client, django_user_model):
    fleet.add_crawler(endpoint="/tmp/fleet-a.sock")
    anonymous = Client()
    assert anonymous.get(PAGE).status_code == 302
    assert anonymous.post(ACTION, {"action": "drain", "endpoint": "/tmp/fleet-a.sock"}).status_code == 302
    outsider = Client()
    outsider.force_login(django_user_model.objects.create_user("outsider", password="pw"))
    assert outsider.get(PAGE).status_code == 403
    # A viewer reads the page but may not act or add.
    assert viewer_client.post(ACTION, {"action": "drain", "endpoint": "/tmp/fleet-a.sock"}).status_code == 403
    assert viewer_client.post(ADD, {"endpoint": "/tmp/fleet-b.sock"}).status_code == 403
    assert viewer_client.get(reverse("jobs:crawler_remove"), {"endpoint": "/tmp/fleet-a.sock"}).status_code == 403
    assert Crawler.objects.get().state == CrawlerState.ACTIVE and Crawler.objects.count() == 1


def test_page_posts_need_the_csrf_token(operator):
    fleet.add_crawler(endpoint="/tmp/fleet-a.sock")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(operator)
    page = strict.get(PAGE).content.decode()
    assert page.count("csrfmiddlewaretoken") >= 2  # the row's buttons and the add form
    assert strict.post(ACTION, {"action": "drain", "endpoint": "/tmp/fleet-a.sock"}).status_code == 403
    assert strict.post(ADD, {"endpoint": "/tmp/fleet-b.sock"}).status_code == 403
    assert Crawler.objects.get().state == CrawlerState.ACTIVE


def test_staff_drain_and_resume_from_the_page(operator_client):
    crawler, _ = owned_crawler()
    assert 'data-action="drain"' in row_of(operator_client.get(PAGE), crawler.endpoint)
    response = operator_client.post(ACTION, {"action": "drain", "endpoint": crawler.endpoint}, follow=True)
    assert response.redirect_chain == [(PAGE, 302)]
    assert messages_of(response) == [f"{crawler.endpoint}: draining: no new jobs; paused once its running jobs finish"]
    row = row_of(response, crawler.endpoint)
    assert 'data-state="draining"' in row and 'data-action="resume"' in row and 'data-action="drain"' not in row
    response = operator_client.post(ACTION, {"action": "resume", "endpoint": crawler.endpoint}, follow=True)
    assert Crawler.objects.get().state == CrawlerState.ACTIVE
    assert messages_of(response) == [f"{crawler.endpoint}: active: takes new jobs"]


def test_remove_asks_first_then_drains_or_removes_now(operator_client):
    crawler, session = owned_crawler()
    run_jobs(crawler, session, 2)
    confirm = operator_client.get(reverse("jobs:crawler_remove"), {"endpoint": crawler.endpoint})
    assert confirm.status_code == 200
    body = confirm.content.decode()
    assert (
        'id="running-count" data-count="2"' in body and 'value="remove_now"' in body and "csrfmiddlewaretoken" in body
    )
    assert Crawler.objects.exists()  # asking changes nothing

    response = operator_client.post(ACTION, {"action": "remove", "endpoint": crawler.endpoint}, follow=True)
    assert messages_of(response) == [f"{crawler.endpoint}: draining: removed once its running jobs finish"]
    assert 'data-remove-when-drained="true"' in row_of(response, crawler.endpoint)

    response = operator_client.post(ACTION, {"action": "remove_now", "endpoint": crawler.endpoint}, follow=True)
    assert messages_of(response) == [f"{crawler.endpoint}: removed, 2 jobs requeued"]
    assert not Crawler.objects.exists() and Job.objects.filter(status=Status.QUEUED).count() == 2
    assert operator_client.get(reverse("jobs:crawler_remove"), {"endpoint": crawler.endpoint}).status_code == 404


def test_actions_on_an_unknown_crawler_or_a_bad_action_say_so(operator_client):
    response = operator_client.post(ACTION, {"action": "drain", "endpoint": "/tmp/nobody.sock"}, follow=True)
    assert messages_of(response) == ["no crawler unix:/tmp/nobody.sock is registered"]
    response = operator_client.post(ACTION, {"action": "explode", "endpoint": "/tmp/nobody.sock"}, follow=True)
    assert messages_of(response) == ["Choose an action and a crawler."]


def test_staff_add_a_crawler_from_the_page(operator_client):
    response = operator_client.post(ADD, {"endpoint": "/tmp/fleet-a.sock", "label": "A"}, follow=True)
    assert messages_of(response) == ["unix:/tmp/fleet-a.sock: registered."]
    assert 'data-endpoint="unix:/tmp/fleet-a.sock"' in response.content.decode()
    response = operator_client.post(ADD, {"endpoint": "unix:/tmp/fleet-a.sock", "label": ""}, follow=True)
    assert messages_of(response) == ["unix:/tmp/fleet-a.sock: already registered; nothing added."]
    assert Crawler.objects.count() == 1


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("not-a-path", "is not a crawler endpoint"),
        ("tcp://crawler.example:7000", "TCP sessions need BUS_TOKEN"),
        ("", "This field is required."),
    ],
)
def test_adding_a_bad_endpoint_from_the_page_shows_why_and_adds_nothing(operator_client, endpoint, problem):
    response = operator_client.post(ADD, {"endpoint": endpoint, "label": "A"})
    assert response.status_code == 200
    body = response.content.decode()
    assert 'id="crawler-add-errors"' in body and problem in body.replace("&#x27;", "'")
    assert f'data-live-url="{PAGE}?fragment=1"' in body  # the page keeps polling itself, not crawlers/add
    assert not Crawler.objects.exists()


# --- POST /crawlers/announce -------------------------------------------------------------


def announcement(action: str = "register", endpoint: str = "/tmp/fleet-a.sock", **overrides) -> dict:
    fields = {
        "action": action,
        "endpoint": endpoint,
        "label": "self-registered",
        "ts": str(int(time.time())),
        "nonce": secrets.token_hex(16),
    }
    fields.update(overrides)
    fields.setdefault(
        "auth",
        fleet.announce_proof(TOKEN, action=action, endpoint=endpoint, ts=fields["ts"], nonce=fields["nonce"]),
    )
    return fields


def post(client, fields) -> tuple[int, dict]:
    body = fields if isinstance(fields, (str, bytes)) else json.dumps(fields)
    response = client.post(ANNOUNCE, data=body, content_type="application/json")
    return response.status_code, response.json()


def test_announce_registers_and_deregisters(client, token):
    assert post(client, announcement()) == (200, {"status": "registered", "endpoint": "unix:/tmp/fleet-a.sock"})
    crawler = Crawler.objects.get()
    assert (crawler.source, crawler.label, crawler.state) == (
        CrawlerSource.ANNOUNCED,
        "self-registered",
        CrawlerState.ACTIVE,
    )
    assert post(client, announcement("deregister")) == (200, {"status": "removed", "endpoint": crawler.endpoint})
    assert not Crawler.objects.exists()
    assert post(client, announcement("deregister")) == (200, {"status": "unknown", "endpoint": crawler.endpoint})


def test_announcing_a_registered_endpoint_again_adds_no_duplicate(client, token):
    fleet.add_crawler(endpoint="/tmp/fleet-a.sock", label="by a person")
    assert post(client, announcement(endpoint="unix:/tmp/fleet-a.sock")) == (
        200,
        {"status": "known", "endpoint": "unix:/tmp/fleet-a.sock"},
    )
    assert post(client, announcement()) == (200, {"status": "known", "endpoint": "unix:/tmp/fleet-a.sock"})
    assert Crawler.objects.count() == 1
    # A crawler cannot deregister what a person registered.
    assert post(client, announcement("deregister"))[1]["status"] == "kept"
    assert Crawler.objects.get().source == CrawlerSource.PERSON


def test_announce_refuses_a_forged_proof(client, token):
    forged = announcement(
        auth=fleet.announce_proof("not-the-token", action="register", endpoint="/tmp/x", ts="1", nonce="0" * 32)
    )
    status, body = post(client, forged)
    assert status == 403 and "auth" in body["error"]
    signed_for_another = announcement()
    signed_for_another["endpoint"] = "/tmp/fleet-b.sock"  # the proof names the endpoint as sent
    assert post(client, signed_for_another)[0] == 403
    del signed_for_another["auth"]
    assert post(client, signed_for_another)[0] == 403
    assert not Crawler.objects.exists()


def test_announce_refuses_a_non_ascii_proof_and_a_nul_in_the_endpoint_without_failing(client, token):
    status, body = post(client, announcement(auth="é" * 64))
    assert status == 403 and "auth" in body["error"]
    status, body = post(client, announcement(endpoint="/tmp/fleet\x00a.sock"))  # signed: only the NUL is wrong
    assert status == 400 and "control characters" in body["error"]
    assert not Crawler.objects.exists()


def test_announce_refuses_a_replay_of_the_same_body(client, token):
    body = json.dumps(announcement())
    assert post(client, body)[0] == 200
    Crawler.objects.all().delete()
    status, answer = post(client, body)
    assert status == 403 and "replay" in answer["error"]
    assert not Crawler.objects.exists()


@pytest.mark.parametrize("offset", [-120, 120])
def test_announce_refuses_a_timestamp_two_minutes_off(client, token, offset):
    status, body = post(client, announcement(ts=str(int(time.time()) + offset)))
    assert status == 403 and "ts" in body["error"]
    assert not Crawler.objects.exists()


def test_announce_refuses_an_unparseable_endpoint_and_registers_nothing(client, token):
    status, body = post(client, announcement(endpoint="not-a-path"))
    assert status == 400 and "'not-a-path' is not a crawler endpoint" in body["error"]
    assert not Crawler.objects.exists()


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (lambda: "{not json", "the body is not JSON"),
        (lambda: b"\xff\xfe\x00garbage", "the body is not JSON"),
        (lambda: "[" * 2000 + "]" * 2000, "the body is not JSON"),  # deeper than the decoder goes
        (lambda: '["register"]', "the body must be a JSON object"),
        (lambda: {"action": "explode"}, "action must be"),
        (lambda: announcement(nonce="XYZ"), "nonce must be"),
        (lambda: announcement(ts="yesterday"), "ts must be Unix seconds"),
        (lambda: announcement(label=7), "label must be a string"),  # signed and fresh: signed at test time
    ],
)
def test_announce_answers_400_for_a_malformed_request(client, token, body, problem):
    status, answer = post(client, body())
    assert status == 400 and problem in answer["error"]
    assert not Crawler.objects.exists()


def test_announce_is_off_without_bus_token(client, settings):
    settings.BUS_TOKEN = ""
    status, body = post(client, announcement())
    assert status == 404 and "self-registration is off" in body["error"]
    assert not Crawler.objects.exists()


def test_announce_takes_only_small_posts(client, token):
    response = client.get(ANNOUNCE)
    assert response.status_code == 405 and response["Allow"] == "POST"
    big = announcement(label="x" * 5000)
    status, body = post(client, big)
    assert status == 413 and "4096" in body["error"]
    assert not Crawler.objects.exists()


def test_announce_needs_no_csrf_token_or_session(token):
    strict = Client(enforce_csrf_checks=True)
    response = strict.post(ANNOUNCE, data=json.dumps(announcement()), content_type="application/json")
    assert response.status_code == 200 and Crawler.objects.count() == 1
