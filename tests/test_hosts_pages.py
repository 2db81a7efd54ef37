"""The hosts pages through real requests: /hosts/ (counts, filters, pages, query count), /hosts/<key>/
(state, latest jobs, the staff form through services.update_host and services.end_backoff), the host
line of a job's page, robots.txt on both pages, and HostAdmin. Jobs are made with services.enqueue_many
and services.claim_jobs; robots.txt answers with jobs.robots (claim_fetches, record_answer) or by
setting a host's fields directly.
"""

from __future__ import annotations

import re
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from jobs import robots, selectors_hosts, services
from jobs.models import Host, Job, RobotsState, Status
from jobs.outcomes import Outcome

pytestmark = pytest.mark.django_db

LIST = reverse("jobs:hosts")
WEIRD_KEYS = {
    "http://example.com:8080/a": "example.com:8080",
    "http://[::1]:8000/b": "[::1]:8000",
    "https://bücher.example/c": "xn--bcher-kva.example",
    "http://127.0.0.1:9/d": "127.0.0.1:9",
}


# --- Fixtures and helpers ------------------------------------------------------------------


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_user("operator", password="pw", is_staff=True, is_superuser=True)


@pytest.fixture
def operator_client(client, operator):
    client.force_login(operator)
    return client


@pytest.fixture
def viewer_client(django_user_model):
    """Signed in, not staff, may read jobs: sees the hosts, may not change them."""
    user = django_user_model.objects.create_user("viewer", password="pw")
    user.user_permissions.add(Permission.objects.get(codename="view_job"))
    client = Client()
    client.force_login(user)
    return client


@pytest.fixture
def staff_without_host_permission(django_user_model):
    """Staff who may read and change jobs and crawlers, but not hosts."""
    user = django_user_model.objects.create_user("staffer", password="pw", is_staff=True)
    user.user_permissions.add(
        *Permission.objects.filter(codename__in=["view_job", "change_job", "change_crawler", "view_host"])
    )
    client = Client()
    client.force_login(user)
    return client


def enqueue(*urls: str, priority: int = 0) -> list[Job]:
    return services.enqueue_many(urls=list(urls), priority=priority, actor="test")


def claim(session: uuid.UUID, limit: int = 1000) -> list[services.ClaimedJob]:
    return services.claim_jobs(session=session, limit=limit, lease_seconds=600, crawler="c")


def report(session: uuid.UUID, claimed, **fields) -> None:
    outcomes = [Outcome(job_id=job.id, attempt=job.attempt, **fields) for job in claimed]
    assert set(services.record_outcomes(session=session, crawler="c", outcomes=outcomes)) == {"recorded"}


def back_off(url: str, seconds: int = 600) -> Host:
    """A host answering 429 with Retry-After: backing off for `seconds` (its job goes back to the queue)."""
    (job,) = enqueue(url)
    session = uuid.uuid4()
    claimed = [c for c in claim(session) if c.id == job.pk]
    report(session, claimed, succeeded=True, result={"status": 429, "retry_after": str(seconds)})
    host = Host.objects.get(pk=job.host_id)
    assert host.backoff_until is not None and host.backoff_until > timezone.now()
    return host


def page_url(key: str) -> str:
    return reverse("jobs:host", args=[key])


def rows_of(response) -> list[str]:
    """The host keys of the page's table rows, in order, as the HTML shows them."""
    return re.findall(r'<tr data-host="([^"]*)"', response.content.decode())


def row_html(response, key: str) -> str:
    html = response.content.decode()
    match = re.search(rf'<tr data-host="{re.escape(key)}".*?</tr>', html, re.DOTALL)
    assert match, f"no row for {key}"
    return match.group(0)


def messages_of(response) -> list[str]:
    return [str(message) for message in response.context["messages"]]


def form_post(host: Host, **fields) -> dict[str, str]:
    """What the page's form posts: the typed values plus the values the page showed (hidden)."""
    data = {
        "action": "save",
        "initial-delay": "" if host.delay is None else str(host.delay),
        "initial-concurrency": "" if host.concurrency is None else str(host.concurrency),
        "initial-paused": str(host.paused),
        "delay": "" if host.delay is None else str(host.delay),
        "concurrency": "" if host.concurrency is None else str(host.concurrency),
    }
    if host.paused:
        data["paused"] = "on"
    for name, value in fields.items():
        if name == "paused":
            data.pop("paused", None)
            if value:
                data["paused"] = "on"
        else:
            data[name] = value
    return data


def robots_answer(key: str, status: int, body: str = "", error: str = "") -> robots.RobotsAnswer:
    """A crawler's answer to the bus's robots request for `key`, through the service path (ROBOTS_TXT=obey)."""
    session = uuid.uuid4()
    asked = robots.claim_fetches(session=session, limit=100)
    assert key in [request.host for request in asked], asked
    return robots.record_answer(session=session, host=key, status=status, body=body, error=error)


def set_robots(key: str, **fields) -> None:
    """A host's robots.txt fields as jobs.robots would have left them (written directly)."""
    assert Host.objects.filter(key=key).update(**fields) == 1


def detail_html(response) -> str:
    """The host page's robots.txt panel (in the live part)."""
    match = re.search(
        r'<section class="panel" aria-labelledby="robots-title".*?</section>', response.content.decode(), re.DOTALL
    )
    assert match, "no robots.txt panel"
    return match.group(0)


def settings_of(key: str) -> tuple:
    host = Host.objects.get(key=key)
    return host.delay, host.concurrency, host.paused, host.backoff_until


# --- The list --------------------------------------------------------------------------------


def test_the_list_counts_queued_running_and_finished_jobs_per_host(operator_client):
    enqueue(*[f"https://a.example/{i}" for i in range(5)])
    enqueue("https://b.example:8080/1", "https://b.example:8080/2")
    session = uuid.uuid4()
    claimed = claim(session)
    assert len(claimed) == 7
    a_jobs = [c for c in claimed if "a.example" in c.url]
    report(session, a_jobs[:2], succeeded=True, result={"status": 200})  # 2 succeeded
    report(session, a_jobs[2:3], succeeded=False, error="boom")  # 1 failed
    services.cancel_jobs(job_ids=[a_jobs[3].id], actor="test")  # 1 cancelled; a_jobs[4] still runs
    enqueue("https://a.example/later")  # and one queued

    response = operator_client.get(LIST)

    assert response.status_code == 200
    counts = {row.key: (row.counts.queued, row.counts.running, row.counts.finished) for row in response.context["rows"]}
    assert counts == {"a.example": (1, 1, 4), "b.example:8080": (0, 2, 0)}
    row = row_html(response, "a.example")
    assert 'data-queued="1" data-running="1" data-finished="4"' in row
    assert f'href="{page_url("a.example")}"' in row
    assert 'id="nav-hosts" aria-current="page"' in response.content.decode()


def test_the_list_shows_delays_concurrency_next_start_back_off_and_pause(operator_client, settings):
    settings.HOST_DELAY, settings.HOST_CONCURRENCY = 1.0, 2
    backing = back_off("https://slow.example/1", seconds=600)
    enqueue("https://own.example/1", "https://plain.example/1")
    services.update_host(key="own.example", delay=2.5, concurrency=7, paused=True, actor="test")

    response = operator_client.get(LIST)

    rows = {row.key: row for row in response.context["rows"]}
    assert (rows["plain.example"].delay, rows["plain.example"].delay_is_default) == (1.0, True)
    assert (rows["own.example"].delay, rows["own.example"].concurrency) == (2.5, 7)
    assert rows["plain.example"].concurrency_is_default and rows["plain.example"].concurrency == 2
    plain, own, slow = (row_html(response, key) for key in ("plain.example", "own.example", "slow.example"))
    assert '<span class="muted">default</span> 2' in plain and "now" in plain
    assert 'data-concurrency="7">7<' in own and 'data-delay="2.5">2.5 s<' in own
    assert 'data-paused="true"' in own and "data-paused-badge" in own
    assert 'data-backing-off="true"' in slow and "HTTP 429" in slow and "until " in slow
    assert 'data-ready="false"' in slow and "in 9m 5" in slow  # next start: the back-off's end, ~10 min
    assert 'data-backing-off="false"' in plain and 'data-paused="false"' in plain
    assert backing.key == "slow.example"


def test_a_robots_crawl_delay_longer_than_the_configured_delay_is_what_the_page_shows(operator_client, settings):
    settings.HOST_DELAY = 1.0
    enqueue("https://robots.example/1", "https://short.example/1")
    # No page writes crawl_delay (robots.txt will); the test stands in for it.
    Host.objects.filter(key="robots.example").update(crawl_delay=30.0)
    Host.objects.filter(key="short.example").update(crawl_delay=0.5)

    response = operator_client.get(LIST)

    rows = {row.key: row for row in response.context["rows"]}
    assert (rows["robots.example"].delay, rows["robots.example"].crawl_delay_applies) == (30.0, True)
    assert (rows["short.example"].delay, rows["short.example"].crawl_delay_applies) == (1.0, False)
    assert "robots Crawl-delay" in row_html(response, "robots.example")
    assert "robots Crawl-delay" not in row_html(response, "short.example")


def test_hosts_with_queued_jobs_come_first_then_by_key(operator_client):
    enqueue("https://a-cancelled.example/1", "https://m-done.example/1")
    session = uuid.uuid4()
    claimed = claim(session)
    report(session, [c for c in claimed if "m-done" in c.url], succeeded=True, result={"status": 200})
    enqueue("https://z-queued.example/1", "https://b-queued.example/1")
    cancelled = Job.objects.filter(url__contains="a-cancelled").values_list("id", flat=True)
    services.cancel_jobs(job_ids=list(cancelled), actor="test")
    enqueue("https://a-cancelled.example/2")
    services.cancel_jobs(
        job_ids=list(Job.objects.queued().filter(url__contains="a-cancelled").values_list("id", flat=True)),
        actor="test",
    )
    # a-cancelled.example may still carry the claim's "active" flag: the page must not trust it alone.
    assert Host.objects.get(key="a-cancelled.example").active

    response = operator_client.get(LIST)

    assert rows_of(response) == ["b-queued.example", "z-queued.example", "a-cancelled.example", "m-done.example"]


def test_search_by_part_of_the_key_and_filter_by_state(operator_client):
    back_off("https://backing.example/1")
    enqueue("https://idle.example/1")
    session = uuid.uuid4()
    report(session, [c for c in claim(session) if "idle" in c.url], succeeded=True, result={"status": 200})
    enqueue("https://paused.example/1", "https://queued.example:8443/1")
    services.update_host(key="paused.example", paused=True, actor="test")

    def keys(**query) -> list[str]:
        response = operator_client.get(LIST, query)
        assert response.status_code == 200
        return sorted(rows_of(response))

    assert keys() == ["backing.example", "idle.example", "paused.example", "queued.example:8443"]
    assert keys(q="QUEUED.example") == ["queued.example:8443"]
    assert keys(q=":8443") == ["queued.example:8443"]
    assert keys(q="nothing-like-it") == []
    assert keys(state="paused") == ["paused.example"]
    assert keys(state="backing-off") == ["backing.example"]
    # With queued jobs: the backing-off host's job went back to the queue; idle.example's is done.
    assert keys(state="active") == ["backing.example", "paused.example", "queued.example:8443"]
    assert keys(state="active", q="paused") == ["paused.example"]
    assert keys(state="no-such-state") == keys(state="all") == keys()
    empty = operator_client.get(LIST, {"q": "nothing-like-it"}).content.decode()
    assert 'id="no-hosts"' in empty and "No host matches these filters" in empty


def test_a_back_off_that_has_ended_is_not_listed_as_backing_off(operator_client):
    host = back_off("https://over.example/1", seconds=1)
    Host.objects.filter(pk=host.pk).update(backoff_until=timezone.now() - timedelta(seconds=5))

    response = operator_client.get(LIST, {"state": "backing-off"})

    assert rows_of(response) == []
    assert 'data-backing-off="false"' in row_html(operator_client.get(LIST), "over.example")


def test_fifty_hosts_a_page_with_links_to_the_others(operator_client):
    enqueue(*[f"https://h{i:03d}.example/" for i in range(120)])

    first = operator_client.get(LIST)
    assert rows_of(first) == [f"h{i:03d}.example" for i in range(50)]
    html = first.content.decode()
    assert 'href="?page=2" id="page-next"' in html and 'id="page-previous"' not in html
    assert "Page 1 of 3 · 120 hosts" in html

    third = operator_client.get(LIST, {"page": "3"})
    assert rows_of(third) == [f"h{i:03d}.example" for i in range(100, 120)]
    assert 'href="?page=2" id="page-previous"' in third.content.decode()
    assert 'id="page-next"' not in third.content.decode()

    # Filters stay in the links; a page past the end shows the last one, a word the first one.
    filtered = operator_client.get(LIST, {"q": "h0", "state": "active", "page": "2"}).content.decode()
    assert 'href="?q=h0&amp;state=active&amp;page=1" id="page-previous"' in filtered
    assert rows_of(operator_client.get(LIST, {"page": "999"})) == rows_of(third)
    assert rows_of(operator_client.get(LIST, {"page": "x" * 50})) == rows_of(first)
    assert rows_of(operator_client.get(LIST, {"page": "9" * 5000})) == rows_of(first)


def _list_queries(client) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(LIST).status_code == 200
    return len(queries)


def test_the_query_count_does_not_grow_with_the_hosts_shown(operator_client, django_assert_max_num_queries):
    enqueue("https://only.example/1")
    operator_client.get(LIST)  # the first request of a session may do more (last_login)
    with_one = _list_queries(operator_client)
    assert with_one <= 6  # session, user, count, page of hosts, one grouped count of their jobs

    enqueue(*[f"https://h{i:03d}.example/{n}" for i in range(80) for n in range(3)])
    session = uuid.uuid4()
    claimed = claim(session, limit=60)
    report(session, claimed[:30], succeeded=True, result={"status": 200})
    with django_assert_max_num_queries(with_one) as captured:
        response = operator_client.get(LIST)
    assert len(response.context["rows"]) == selectors_hosts.HOSTS_PER_PAGE
    grouped = [q["sql"] for q in captured.captured_queries if '"jobs_job"' in q["sql"] and "COUNT" in q["sql"]]
    assert len(grouped) == 1 and "GROUP BY" in grouped[0]


def test_the_live_fragment_is_the_table_alone(operator_client):
    enqueue("https://a.example/1")
    response = operator_client.get(LIST, {"fragment": "1", "q": "a.ex"})
    html = response.content.decode()
    assert response.status_code == 200 and response["Cache-Control"] == "no-store"
    assert "<html" not in html and 'data-host="a.example"' in html
    page = operator_client.get(LIST, {"q": "a.ex"}).content.decode()
    assert 'id="hosts-live"' in page and 'data-live-url="/hosts/?q=a.ex&amp;fragment=1"' in page


def test_whoever_may_see_the_crawlers_page_may_see_the_hosts_pages(viewer_client, client, django_user_model):
    enqueue("https://a.example/1")
    assert viewer_client.get(LIST).status_code == 200
    assert viewer_client.get(page_url("a.example")).status_code == 200
    assert viewer_client.get(reverse("jobs:crawlers")).status_code == 200
    # Not signed in: the login page; signed in without the view permission: refused, as on the crawlers page.
    for url in (LIST, page_url("a.example")):
        response = Client().get(url)
        assert response.status_code == 302 and response["Location"].startswith(reverse("login"))
    django_user_model.objects.create_user("nobody", password="pw")
    nobody = Client()
    nobody.force_login(django_user_model.objects.get(username="nobody"))
    assert nobody.get(reverse("jobs:crawlers")).status_code == 403
    assert nobody.get(LIST).status_code == 403
    assert nobody.get(page_url("a.example")).status_code == 403


# --- One host -------------------------------------------------------------------------------------


def test_the_host_page_shows_its_state_and_its_twenty_latest_jobs(operator_client, django_assert_max_num_queries):
    jobs = enqueue(*[f"https://a.example/{i}" for i in range(25)])
    enqueue("https://other.example/1")
    session = uuid.uuid4()
    claimed = [c for c in claim(session) if "a.example" in c.url]
    report(session, claimed[:3], succeeded=False, error="cannot connect", retryable=True, network=True)
    operator_client.get(LIST)

    with django_assert_max_num_queries(5):  # session, user, host, its job counts, its latest jobs
        response = operator_client.get(page_url("a.example"))

    assert response.status_code == 200
    html = response.content.decode()
    host = Host.objects.get(key="a.example")
    assert host.errors >= 1 and host.last_start_at is not None
    assert f'data-errors="{host.errors}"' in html
    assert host.last_start_at.strftime("%Y-%m-%d %H:%M:%S") in html
    listed = [int(job_id) for job_id in re.findall(r'<tr data-job-id="(\d+)"', html)]
    assert listed == sorted((job.pk for job in jobs), reverse=True)[:20]
    assert f'href="{jobs[-1].get_absolute_url()}"' in html
    assert "other.example" not in html
    assert 'data-backing-off="true"' in html and "connection error" in html
    assert 'id="host-form"' in html and 'id="host-lift-backoff"' in html
    fragment = operator_client.get(page_url("a.example"), {"fragment": "1"}).content.decode()
    assert "<html" not in fragment and 'id="host-errors"' in fragment


def test_an_unknown_host_is_a_404(operator_client):
    assert operator_client.get(page_url("nowhere.example")).status_code == 404
    assert operator_client.post(page_url("nowhere.example"), {"action": "save", "paused": "on"}).status_code == 404
    assert operator_client.post(page_url("nowhere.example"), {"action": "lift_backoff"}).status_code == 404


@pytest.mark.parametrize("url", sorted(WEIRD_KEYS))
def test_keys_with_ports_brackets_and_idna_have_working_pages(operator_client, url):
    key = WEIRD_KEYS[url]
    (job,) = enqueue(url)
    assert job.host.key == key

    listing = operator_client.get(LIST, {"q": key})
    assert rows_of(listing) == [key]
    href = re.search(r'<a href="([^"]+)" class="host-key">', row_html(listing, key)).group(1)
    assert href == page_url(key)

    page = operator_client.get(href)
    assert page.status_code == 200 and page.context["host"].key == key

    host = Host.objects.get(key=key)
    response = operator_client.post(href, form_post(host, paused=True))
    assert response.status_code == 302 and response["Location"] == href
    assert Host.objects.get(key=key).paused

    job_page = operator_client.get(job.get_absolute_url()).content.decode()
    assert f'id="job-host">Host: <a href="{href}" class="mono">{key}</a>' in job_page


# --- robots.txt ----------------------------------------------------------------------------------


def test_the_list_says_each_hosts_robots_txt_state_in_words(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    # The service path first, while served.example is the only host: a crawler asked for its file answers 404.
    enqueue("https://served.example/1")
    assert robots_answer("served.example", 404).recorded
    keys = ["unknown", "rules", "unavailable", "unreachable", "fetching", "kept", "served"]
    enqueue(*[f"https://{key}.example/1" for key in keys if key != "served"])
    at = timezone.now()
    set_robots("rules.example", robots_state=RobotsState.ALLOWED, robots_status=200, robots_fetched_at=at)
    set_robots("unavailable.example", robots_state=RobotsState.UNAVAILABLE, robots_status=404, robots_fetched_at=at)
    set_robots(
        "unreachable.example",
        robots_state=RobotsState.UNREACHABLE,
        robots_status=503,
        robots_failures=3,
        robots_due_at=at + timedelta(minutes=4),
    )
    set_robots("fetching.example", robots_session=uuid.uuid4(), robots_lease_until=at + timedelta(seconds=50))
    set_robots("kept.example", robots_state=RobotsState.ALLOWED, robots_fetched_at=at, robots_failures=2)

    response = operator_client.get(LIST)

    assert "<th>robots.txt</th>" in response.content.decode()
    words = {key: row_html(response, f"{key}.example") for key in keys}
    for key, state, text in [
        ("unknown", "unknown", "not fetched yet"),
        ("rules", "rules", "rules in force"),
        ("unavailable", "unavailable", "unavailable (4xx): all allowed"),
        ("served", "unavailable", "unavailable (4xx): all allowed"),
        ("unreachable", "unreachable", "unreachable: nothing allowed until the next try in 3m 5"),
        ("fetching", "unknown", "not fetched yet"),
        ("kept", "rules", "rules in force"),
    ]:
        assert f'data-robots="{state}"' in words[key], key
        assert re.search(r"data-robots-words[^>]*>" + re.escape(text), words[key]), (key, words[key])
    assert 'data-robots-fetching="true"' in words["fetching"] and "being fetched" in words["fetching"]
    for key in keys:
        if key != "fetching":
            assert 'data-robots-fetching="false"' in words[key] and "being fetched" not in words[key], key
    assert "last 2 fetches failed; kept meanwhile" in words["kept"]
    assert "waits for robots.txt" in words["unknown"] and "waits for robots.txt" in words["unreachable"]
    assert "waits for robots.txt" not in words["rules"] and "waits for robots.txt" not in words["served"]
    assert Host.objects.get(key="served.example").robots_lease_until is None  # answered: no longer fetching


def test_with_robots_txt_ignored_the_list_says_ignored(operator_client, settings):
    settings.ROBOTS_TXT = "ignore"
    enqueue("https://a.example/1")
    set_robots("a.example", robots_state=RobotsState.UNREACHABLE)

    response = operator_client.get(LIST)

    row = row_html(response, "a.example")
    assert 'data-robots="ignored"' in row and '<span class="muted">ignored</span>' in row
    assert "waits for robots.txt" not in row
    assert 'value="robots-waiting"' not in response.content.decode()  # no host waits for it: no such filter
    assert rows_of(operator_client.get(LIST, {"state": "robots-waiting"})) == []
    page = detail_html(operator_client.get(page_url("a.example")))
    assert 'data-robots="ignored"' in page and "ROBOTS_TXT=ignore" in page


def test_the_robots_waiting_filter_lists_hosts_with_queued_jobs_and_no_usable_robots_txt(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    enqueue(*[f"https://{key}.example/1" for key in ("unknown", "unreachable", "rules", "unavailable", "paused")])
    enqueue("https://done.example/1")
    services.cancel_jobs(
        job_ids=list(Job.objects.filter(url__contains="done.").values_list("id", flat=True)), actor="t"
    )
    set_robots("unreachable.example", robots_state=RobotsState.UNREACHABLE, robots_failures=1)
    set_robots("rules.example", robots_state=RobotsState.ALLOWED, robots_fetched_at=timezone.now())
    set_robots("unavailable.example", robots_state=RobotsState.UNAVAILABLE, robots_fetched_at=timezone.now())
    services.update_host(key="paused.example", paused=True, actor="test")

    response = operator_client.get(LIST, {"state": "robots-waiting"})

    assert response.status_code == 200
    assert rows_of(response) == ["paused.example", "unknown.example", "unreachable.example"]
    html = response.content.decode()
    assert '<option value="robots-waiting" selected>Waiting for robots.txt</option>' in html
    assert rows_of(operator_client.get(LIST, {"state": "robots-waiting", "q": "unre"})) == ["unreachable.example"]
    # Its robots.txt arrives: the host no longer waits.
    assert robots_answer("unknown.example", 200, "User-agent: *\nDisallow:\n").recorded
    assert rows_of(operator_client.get(LIST, {"state": "robots-waiting"})) == ["paused.example", "unreachable.example"]


def test_the_list_never_reads_the_robots_txt_files_and_filters_in_the_same_queries(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    enqueue(*[f"https://h{i:03d}.example/{n}" for i in range(60) for n in range(2)])
    Host.objects.update(robots_txt="User-agent: *\nDisallow: /x\n" * 20_000, robots_state=RobotsState.UNREACHABLE)
    operator_client.get(LIST)
    with_all = _list_queries(operator_client)

    for state in ("robots-waiting", "all"):
        with CaptureQueriesContext(connection) as captured:
            response = operator_client.get(LIST, {"state": state})
        assert len(response.context["rows"]) == selectors_hosts.HOSTS_PER_PAGE
        assert len(captured) <= with_all
        assert not [q["sql"] for q in captured.captured_queries if "robots_txt" in q["sql"]]


def test_the_host_page_shows_its_robots_txt_state_and_the_jobs_it_disallowed(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    settings.HOST_DELAY = 1.0
    allowed, private, other = enqueue("https://a.example/ok", "https://a.example/private/1", "https://b.example/1")

    result = robots_answer("a.example", 200, "User-agent: *\nDisallow: /private\nCrawl-delay: 4\n")

    assert (result.recorded, result.disallowed) == (True, 1)
    assert Job.objects.get(pk=private.pk).status == Status.DISALLOWED
    response = operator_client.get(page_url("a.example"))
    panel = detail_html(response)
    host = Host.objects.get(key="a.example")
    assert 'data-robots="rules"' in panel and "rules in force" in panel
    assert re.search(r'id="robots-status">200<', panel)
    assert host.robots_fetched_at.strftime("%Y-%m-%d %H:%M:%S") in panel
    assert host.robots_due_at.strftime("%Y-%m-%d %H:%M:%S") in panel  # next fetch: in ROBOTS_TTL
    assert 'data-failures="0"' in panel and re.search(r'id="robots-error"[^>]*><span class="muted">none', panel)
    assert "4 s <span" in panel and "it sets the delay" in panel  # the Crawl-delay it set, longer than 1 s
    assert 'data-disallowed="1"' in panel
    link = re.search(r'<a href="([^"]+)" id="robots-disallowed-link">', panel).group(1)
    assert link == reverse("jobs:list") + "?status=disallowed"
    listed = operator_client.get(link)
    assert [job.pk for job in listed.context["page"].jobs] == [private.pk]
    assert 'class="badge status-disallowed"' in listed.content.decode()
    # Its latest jobs show the status with its own badge.
    assert re.search(
        rf'data-job-id="{private.pk}" data-status="disallowed">.*?badge status-disallowed',
        response.content.decode(),
        re.DOTALL,
    )
    # The whole file, short, shown uncut.
    html = response.content.decode()
    assert '<pre class="json" id="robots-file">User-agent: *\nDisallow: /private\nCrawl-delay: 4\n</pre>' in html
    assert 'id="robots-file-cut"' not in html
    assert allowed.pk and other.pk


def test_an_unreachable_robots_txt_shows_the_failures_the_error_and_the_next_try(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    enqueue("https://a.example/1")
    assert robots_answer("a.example", 0, error="cannot connect <b>refused</b>").recorded

    panel = detail_html(operator_client.get(page_url("a.example")))

    host = Host.objects.get(key="a.example")
    assert (host.robots_state, host.robots_failures) == (RobotsState.UNREACHABLE, 1)
    assert 'data-robots="unreachable"' in panel and "unreachable: nothing allowed" in panel
    assert re.search(r'id="robots-status">0 <span class="muted small">\(no answer\)', panel)
    assert 'data-failures="1"' in panel
    assert "cannot connect &lt;b&gt;refused&lt;/b&gt;" in panel and "<b>refused" not in panel
    assert host.robots_due_at.strftime("%Y-%m-%d %H:%M:%S") in panel and "(in 5" in panel  # ~60 s
    assert re.search(r'id="robots-fetched-at"><span class="muted">never', panel)
    assert (
        'id="no-robots-file">None: the site gave no usable answer.'
        in operator_client.get(page_url("a.example")).content.decode()
    )


def test_a_long_robots_txt_is_cut_on_the_host_page_and_left_out_of_the_live_part(
    operator_client, settings, django_assert_max_num_queries
):
    settings.ROBOTS_TXT = "obey"
    enqueue("https://a.example/1")
    lines = [f"Disallow: /dir{i:05d}/\n" for i in range(2_000)]  # 18 characters each
    text = "User-agent: *\n" + "".join(lines) + "Disallow: /the-very-end\n"
    assert len(text) > 36_000
    set_robots("a.example", robots_state=RobotsState.ALLOWED, robots_txt=text, robots_fetched_at=timezone.now())
    operator_client.get(LIST)

    with django_assert_max_num_queries(5) as captured:  # as before: the cut is made in the host's own query
        response = operator_client.get(page_url("a.example"))

    html = response.content.decode()
    shown = response.context["robots_file"]
    assert (len(shown.text), shown.length, shown.cut) == (20_000, len(text), True)
    assert shown.text == text[:20_000]
    pre = re.search(r'<pre class="json" id="robots-file">(.*?)</pre>', html, re.DOTALL).group(1)
    assert pre == text[:20_000] and "/the-very-end" not in html
    assert f"Cut: the first 20,000 of {len(text):,} characters are shown." in html
    host_query = next(q["sql"] for q in captured.captured_queries if 'FROM "jobs_host"' in q["sql"])
    assert "SUBSTR" in host_query.upper()
    fragment = operator_client.get(page_url("a.example"), {"fragment": "1"}).content.decode()
    assert 'id="robots-file"' not in fragment and "/dir00001/" not in fragment and 'id="host-robots"' in fragment


def test_a_robots_txt_is_shown_escaped(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    enqueue("https://a.example/1")
    body = 'User-agent: *\nDisallow: /<script>alert("x")</script>\n# <img src=x onerror=alert(1)> & more\n'
    assert robots_answer("a.example", 200, body).recorded

    html = operator_client.get(page_url("a.example")).content.decode()

    assert "<script>alert" not in html and "<img src=x" not in html
    assert "/&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in html
    assert "# &lt;img src=x onerror=alert(1)&gt; &amp; more" in html
    admin_page = operator_client.get(reverse("admin:jobs_host_change", args=[Host.objects.get(key="a.example").pk]))
    assert "<script>alert" not in admin_page.content.decode()
    assert "/&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in admin_page.content.decode()


def test_disallowed_has_a_badge_colour_of_its_own_that_is_not_the_error_red():
    css = (Path(__file__).resolve().parent.parent / "jobs" / "static" / "jobs" / "site.css").read_text()

    def rule(selector: str) -> str:
        match = re.search(r"(?:^|[,}\s])" + re.escape(selector) + r"\s*(?:,[^{]*)?\{([^}]*)\}", css, re.MULTILINE)
        assert match, f"no rule for {selector}"
        return match.group(1).strip()

    badge, card = rule(".badge.status-disallowed"), rule(".status-card.status-disallowed")
    assert "background" in badge and "color" in badge and "border-top-color" in card
    assert badge != rule(".badge.status-failed") and "--bad" not in badge and "--bad" not in card
    assert card != rule(".status-card.status-cancelled") and card != rule(".status-card.status-failed")


# --- Changing a host -------------------------------------------------------------------------------


def test_staff_set_delay_concurrency_and_pause_and_see_what_changed(operator_client):
    enqueue("https://a.example/1")
    host = Host.objects.get(key="a.example")

    response = operator_client.post(page_url(host.key), form_post(host, delay="2.5", concurrency="3", paused=True))

    assert response.status_code == 302 and response["Location"] == page_url(host.key)
    assert settings_of(host.key)[:3] == (2.5, 3, True)
    shown = operator_client.get(response["Location"])
    assert messages_of(shown) == ["a.example: delay 2.5 s, concurrency 3, paused."]
    assert 'data-paused="true"' in shown.content.decode()

    # Empty fields: back to the settings.
    host.refresh_from_db()
    response = operator_client.post(
        page_url(host.key), form_post(host, delay="", concurrency="", paused=False), follow=True
    )
    assert settings_of(host.key)[:3] == (None, None, False)
    assert messages_of(response) == [
        "a.example: delay: the default (0 s), concurrency: the default (100000), not paused."
    ]


def test_only_the_fields_changed_on_the_page_are_written(operator_client):
    """Saving a new delay from a page loaded before someone paused the host must not unpause it."""
    enqueue("https://a.example/1")
    shown = Host.objects.get(key="a.example")  # the page as loaded: not paused
    services.update_host(key="a.example", paused=True, actor="someone else")

    response = operator_client.post(page_url("a.example"), form_post(shown, delay="4"), follow=True)

    assert settings_of("a.example")[:3] == (4.0, None, True)
    assert messages_of(response) == ["a.example: delay 4 s."]

    unchanged = operator_client.post(page_url("a.example"), form_post(Host.objects.get(key="a.example")), follow=True)
    assert messages_of(unchanged) == ["a.example: nothing was changed."]


def test_a_post_that_does_not_say_what_it_showed_sets_every_field(operator_client):
    enqueue("https://a.example/1")
    services.update_host(key="a.example", delay=9.0, paused=True, actor="test")

    response = operator_client.post(page_url("a.example"), {"delay": "", "concurrency": "4"})

    assert response.status_code == 302
    assert settings_of("a.example")[:3] == (None, 4, False)


@pytest.mark.parametrize(
    "fields, field, text",
    [
        ({"delay": "-1"}, "delay", "delay must be a number of seconds from 0 to 86400"),
        ({"delay": "86401"}, "delay", "delay must be a number of seconds from 0 to 86400"),
        ({"delay": "soon"}, "delay", "Enter a number."),
        ({"delay": "nan"}, "delay", "Enter a number."),
        ({"concurrency": "0"}, "concurrency", "concurrency must be a whole number from 1 to 100000"),
        ({"concurrency": "1.5"}, "concurrency", "Enter a whole number."),
        ({"concurrency": "9" * 40}, "concurrency", "concurrency must be a whole number from 1 to 100000"),
    ],
)
def test_bad_input_shows_the_form_again_with_a_400_and_changes_nothing(operator_client, fields, field, text):
    enqueue("https://a.example/1")
    services.update_host(key="a.example", delay=3.0, actor="test")
    host = Host.objects.get(key="a.example")
    before = settings_of("a.example")

    # A valid pause rides along: all or nothing.
    response = operator_client.post(page_url("a.example"), form_post(host, paused=True, **fields))

    assert response.status_code == 400
    assert settings_of("a.example") == before
    html = response.content.decode()
    assert 'id="host-form-errors"' in html and "Nothing was changed." in html
    (error,) = response.context["form"].errors[field]
    assert error.startswith(text)
    assert f'<p data-field="{field}">' in html
    assert 'id="host-live"' in html  # the whole page, still live


def test_people_who_may_not_change_hosts_are_refused(viewer_client, staff_without_host_permission):
    back_off("https://a.example/1")
    before = settings_of("a.example")
    host = Host.objects.get(key="a.example")

    for refused in (viewer_client, staff_without_host_permission):
        assert refused.post(page_url("a.example"), form_post(host, paused=True)).status_code == 403
        assert refused.post(page_url("a.example"), {"action": "lift_backoff"}).status_code == 403
        page = refused.get(page_url("a.example")).content.decode()
        assert 'id="host-form"' not in page and 'id="host-lift-backoff"' not in page
    anonymous = Client().post(page_url("a.example"), form_post(host, paused=True))
    assert anonymous.status_code == 302 and anonymous["Location"].startswith(reverse("login"))

    assert settings_of("a.example") == before


def test_a_post_without_the_csrf_token_is_refused(operator):
    enqueue("https://a.example/1")
    client = Client(enforce_csrf_checks=True)
    client.force_login(operator)

    response = client.post(page_url("a.example"), form_post(Host.objects.get(key="a.example"), paused=True))

    assert response.status_code == 403
    assert not Host.objects.get(key="a.example").paused
    page = client.get(page_url("a.example")).content.decode()
    assert 'name="csrfmiddlewaretoken"' in page


def test_staff_lift_a_back_off(operator_client):
    back_off("https://a.example/1")
    page = operator_client.get(page_url("a.example")).content.decode()
    assert 'id="host-lift-backoff"' in page

    response = operator_client.post(page_url("a.example"), {"action": "lift_backoff"}, follow=True)

    host = Host.objects.get(key="a.example")
    assert (host.backoff_until, host.errors) == (None, 0)
    assert host.backoff_reason == "back-off lifted by web:operator"
    assert host.ready_at <= timezone.now()
    assert messages_of(response) == ["a.example: back-off lifted; its jobs may start again."]
    assert 'data-backing-off="false"' in response.content.decode()
    again = operator_client.post(page_url("a.example"), {"action": "lift_backoff"}, follow=True)
    assert messages_of(again) == ["a.example is not backing off; nothing changed."]
    # The job it sent back is claimable again at once.
    assert [c.url for c in claim(uuid.uuid4())] == ["https://a.example/1"]


def test_a_job_page_links_to_its_host(operator_client):
    (job,) = enqueue("https://a.example/1")
    html = operator_client.get(job.get_absolute_url()).content.decode()
    assert f'id="job-host">Host: <a href="{page_url("a.example")}" class="mono">a.example</a>' in html


# --- The admin ------------------------------------------------------------------------------------


def test_the_admin_lists_hosts_and_neither_adds_nor_deletes_them(operator_client):
    enqueue("https://a.example/1", "https://b.example/1")
    services.update_host(key="b.example", paused=True, actor="test")
    host = Host.objects.get(key="a.example")

    listing = operator_client.get(reverse("admin:jobs_host_changelist"), {"paused__exact": "1"})
    assert listing.status_code == 200
    assert [h.key for h in listing.context["cl"].result_list] == ["b.example"]
    assert [
        h.key
        for h in operator_client.get(reverse("admin:jobs_host_changelist"), {"q": "a.ex"}).context["cl"].result_list
    ] == ["a.example"]
    assert operator_client.get(reverse("admin:jobs_host_add")).status_code == 403
    assert operator_client.get(reverse("admin:jobs_host_delete", args=[host.pk])).status_code == 403
    assert Host.objects.filter(pk=host.pk).exists()
    change = operator_client.get(reverse("admin:jobs_host_change", args=[host.pk])).content.decode()
    assert 'name="delay"' in change and 'name="ready_at"' not in change and 'name="backoff_until"' not in change


def test_an_admin_change_goes_through_update_host_and_keeps_the_dispatch_state(operator_client, monkeypatch):
    back_off("https://a.example/1")
    host = Host.objects.get(key="a.example")
    calls = []
    real = services.update_host

    def spy(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(services, "update_host", spy)
    # What the bus writes between loading the form and saving it must survive the save.
    later = timezone.now() + timedelta(hours=2)
    Host.objects.filter(pk=host.pk).update(backoff_until=later, ready_at=later, errors=7)

    response = operator_client.post(
        reverse("admin:jobs_host_change", args=[host.pk]), {"delay": "5", "concurrency": "", "paused": "on"}
    )

    assert response.status_code == 302
    assert calls == [{"key": "a.example", "actor": "admin:operator", "delay": 5.0, "paused": True}]
    saved = Host.objects.get(pk=host.pk)
    assert (saved.delay, saved.concurrency, saved.paused) == (5.0, None, True)
    assert (saved.backoff_until, saved.errors) == (later, 7)


def test_the_admin_refuses_what_the_service_refuses(operator_client):
    enqueue("https://a.example/1")
    host = Host.objects.get(key="a.example")
    for fields in ({"delay": "-1"}, {"delay": "90000"}, {"concurrency": "0"}):
        response = operator_client.post(reverse("admin:jobs_host_change", args=[host.pk]), {"paused": "on", **fields})
        assert response.status_code == 200 and response.context["adminform"].form.errors
        assert settings_of("a.example")[:3] == (None, None, False)


def test_admin_actions_pause_resume_and_lift_through_the_services(operator_client):
    back_off("https://a.example/1")
    enqueue("https://b.example/1")
    ids = [str(pk) for pk in Host.objects.values_list("pk", flat=True)]
    changelist = reverse("admin:jobs_host_changelist")

    operator_client.post(changelist, {"action": "pause", "_selected_action": ids})
    assert set(Host.objects.values_list("paused", flat=True)) == {True}
    operator_client.post(changelist, {"action": "resume", "_selected_action": ids})
    assert set(Host.objects.values_list("paused", flat=True)) == {False}
    operator_client.post(changelist, {"action": "lift_backoff", "_selected_action": ids})
    assert Host.objects.get(key="a.example").backoff_reason == "back-off lifted by admin:operator"
    assert not Host.objects.filter(backoff_until__isnull=False).exists()


def test_the_admin_shows_the_robots_txt_fields_read_only_and_filters_by_their_state(operator_client, settings):
    settings.ROBOTS_TXT = "obey"
    enqueue("https://a.example/1", "https://b.example/1")
    assert robots_answer("a.example", 200, "User-agent: *\nDisallow: /private\n").recorded
    host = Host.objects.get(key="a.example")
    change_url = reverse("admin:jobs_host_change", args=[host.pk])

    change = operator_client.get(change_url)

    html = change.content.decode()
    for name in (
        "robots_state",
        "robots_txt",
        "robots_status",
        "robots_error",
        "robots_fetched_at",
        "robots_due_at",
        "robots_failures",
        "robots_session",
        "robots_lease_until",
    ):
        assert f'name="{name}"' not in html, name
    fieldsets = {fieldset.name: fieldset for fieldset in change.context["adminform"]}
    assert "robots_state" in fieldsets["robots.txt"].fields and "robots_due_at" in fieldsets["robots.txt"].fields
    assert fieldsets["robots.txt file"].classes == "collapse" and fieldsets["robots.txt file"].fields == (
        "robots_file",
    )
    assert "<details><summary>" in html and "Disallow: /private" in html and "Rules in force" in html

    # A post that names them changes none of them.
    response = operator_client.post(
        change_url,
        {
            "delay": "2",
            "concurrency": "",
            "robots_state": "unreachable",
            "robots_txt": "User-agent: *\nDisallow: /\n",
            "robots_failures": "9",
        },
    )
    assert response.status_code == 302
    saved = Host.objects.get(pk=host.pk)
    assert (saved.delay, saved.robots_state, saved.robots_failures) == (2.0, RobotsState.ALLOWED, 0)
    assert saved.robots_txt == "User-agent: *\nDisallow: /private\n"

    changelist = reverse("admin:jobs_host_changelist")
    with CaptureQueriesContext(connection) as captured:
        listing = operator_client.get(changelist, {"robots_state__exact": "unknown"})
    assert [h.key for h in listing.context["cl"].result_list] == ["b.example"]
    assert not [q["sql"] for q in captured.captured_queries if "robots_txt" in q["sql"]]
    assert [
        h.key for h in operator_client.get(changelist, {"robots_state__exact": "rules"}).context["cl"].result_list
    ] == ["a.example"]
