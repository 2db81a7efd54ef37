"""The reference crawler's side of the fleet: hand-over resume, self-announcement, the connection log.

Real sockets and processes: a tiny bus client written here plays the bus
(tests/test_crawler.py's BusClient), a ThreadingHTTPServer plays jobsite's
announce endpoint and checks each request's HMAC with its own copy of the
recipe, and `manage.py runcrawler` runs as a real process.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command

from jobsite_crawler.announce import AnnounceError, Announcer
from jobsite_crawler.crawler import ConnectionLog
from jobsite_crawler.fetch import Fetcher
from tests.conftest import free_port, wait_until
from tests.test_crawler import (  # noqa: F401  (fixtures are used by name)
    TOKEN,
    BusClient,
    ack,
    address_of,
    assign,
    clients,
    connected,
    crawlers,
)
from tests.test_fetch import site  # noqa: F401  (the local HTTP server fixture)


def log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Only whole lines: the crawler may be writing the last one while this reads.
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n")[:-1]]


def events(path: Path, event: str, **fields: Any) -> list[dict[str, Any]]:
    return [
        line
        for line in log_lines(path)
        if line["event"] == event and all(line.get(key) == value for key, value in fields.items())
    ]


# --- Hand-over: bye.resume_within ----------------------------------------------------------------


def start_slow_job(client: BusClient, site, job_id: int, attempt: int) -> None:
    assign(client, job_id, site.url("/slow"), attempt=attempt)
    client.expect("started", job_id=job_id)
    wait_until(lambda: site.slow_requests == 1, message="the slow request to reach the server")


def test_bye_with_resume_within_keeps_the_job_running_for_the_next_session(crawlers, clients, site, tmp_path):
    journal = ConnectionLog(tmp_path / "connections.jsonl")
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30), connection_log=journal)
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    start_slow_job(first, site, 13, 4)

    first.send({"type": "bye", "reason": "hand-over to another bus", "resume_within": 5})

    first.wait_closed()
    wait_until(lambda: crawler.session_count() == 0, message="the first session to end")
    assert crawler.running_jobs() == [(13, 4)]
    second = clients(address)
    assert second.handshake(heartbeat=0.2)["running"] == [[13, 4]]
    second.expect("heartbeat", running=[[13, 4]])
    site.release.set()
    assert second.expect("done", job_id=13)["attempt"] == 4
    ack(second, 13, 4)
    wait_until(lambda: crawler.unacked_outcomes() == [], message="the ack on the second session")

    assert site.slow_requests == 1  # the same fetch went on: never stopped, never restarted
    path = Path(journal.path)
    assert events(path, "finish", job_id=13, status="stopped") == []
    assert [line["session"] for line in events(path, "finish", job_id=13)] == [second.session]
    [close] = events(path, "close", session=first.session)
    assert close["resume_within"] == 5 and close["reason"] == "bye from the bus: hand-over to another bus"
    assert events(path, "ready", session=second.session)[0]["resumed"] == [[13, 4]]


@pytest.mark.parametrize(
    "extra",
    [{}, {"resume_within": -1}, {"resume_within": 0}, {"resume_within": "5"}, {"resume_within": True}]
    + [{"resume_within": None}, {"resume_within": [5]}, {"resume_within": 10**400}],
    ids=["absent", "negative", "zero", "string", "bool", "null", "list", "huge-int"],
)
def test_bye_without_a_valid_resume_within_stops_the_jobs_as_before(crawlers, clients, site, tmp_path, extra):
    journal = ConnectionLog(tmp_path / "connections.jsonl")
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30), connection_log=journal)
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    start_slow_job(first, site, 14, 1)

    first.send({"type": "bye", "reason": "bus stopping", **extra})

    first.wait_closed()
    wait_until(lambda: crawler.running_jobs() == [], message="the session end to stop its job")
    wait_until(
        lambda: crawler.runner.busy == 0,
        message="the fetch to be cancelled although the server still holds the request",
    )
    second = clients(address)
    assert second.handshake()["running"] == []
    assert crawler.unacked_outcomes() == []
    path = Path(journal.path)
    [close] = events(path, "close", session=first.session)
    assert "resume_within" not in close
    [stopped] = events(path, "finish", job_id=14)
    assert stopped["status"] == "stopped" and stopped["session"] == first.session
    assert close["t"] <= stopped["t"]


def test_a_hand_over_nobody_takes_stops_the_job_when_resume_within_runs_out(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30))
    first = clients(address_of(crawler))
    first.handshake()
    start_slow_job(first, site, 15, 2)

    first.send({"type": "bye", "reason": "hand-over", "resume_within": 0.3})
    first.wait_closed()
    said_bye = time.monotonic()

    wait_until(lambda: crawler.running_jobs() == [], timeout=5, message="the orphaned job to be stopped")
    assert time.monotonic() - said_bye >= 0.25
    assert crawler.unacked_outcomes() == []


def test_resume_grace_longer_than_resume_within_wins(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30), resume_grace=30)
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    start_slow_job(first, site, 16, 1)
    first.send({"type": "bye", "reason": "hand-over", "resume_within": 0.1})
    first.wait_closed()
    wait_until(lambda: crawler.session_count() == 0, message="the first session to end")

    time.sleep(0.5)  # well past resume_within: only resume_grace keeps the job now

    assert crawler.running_jobs() == [(16, 1)]
    second = clients(address)
    assert second.handshake()["running"] == [[16, 1]]


def test_resume_within_longer_than_resume_grace_wins(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30), resume_grace=0.1)
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    start_slow_job(first, site, 17, 1)
    first.send({"type": "bye", "reason": "hand-over", "resume_within": 30})
    first.wait_closed()
    wait_until(lambda: crawler.session_count() == 0, message="the first session to end")

    time.sleep(0.5)  # well past resume_grace

    second = clients(address)
    assert second.handshake()["running"] == [[17, 1]]


# --- The connection log ------------------------------------------------------------------------------


def test_connection_log_records_each_session_and_job_in_order(crawlers, clients, tmp_path):
    path = tmp_path / "connections.jsonl"
    crawler = crawlers(connection_log=ConnectionLog(path))
    client = clients(address_of(crawler))
    wait_until(lambda: events(path, "open"), message="the open event")
    client.handshake()
    assign(client, 1, attempt=3)
    client.expect("done", job_id=1)

    client.close()

    wait_until(lambda: events(path, "close"), message="the close event once the bus hung up")
    lines = log_lines(path)
    assert [line["event"] for line in lines] == ["open", "ready", "assign", "finish", "close"]
    assert all(isinstance(line["t"], float) for line in lines)
    assert [line["t"] for line in lines] == sorted(line["t"] for line in lines)
    opened, ready, assigned, finished, closed = lines
    assert opened["session"] is None and opened["peer"] is None
    assert ready["session"] == client.session and ready["peer"] == "test-bus" and ready["resumed"] == []
    assert (assigned["job_id"], assigned["attempt"], assigned["session"]) == (1, 3, client.session)
    assert (finished["job_id"], finished["attempt"], finished["status"]) == (1, 3, "done")
    assert closed["session"] == client.session and closed["peer"] == "test-bus"
    assert closed["reason"] == "connection closed by the bus"
    assert opened["conn"] == ready["conn"] == closed["conn"]


def test_connection_log_records_failed_jobs_and_cancels(crawlers, clients, site, tmp_path):
    path = tmp_path / "connections.jsonl"
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30), connection_log=ConnectionLog(path))
    client = clients(address_of(crawler))
    client.handshake()
    assign(client, 2, f"http://127.0.0.1:{free_port()}/")
    client.expect("failed", job_id=2)
    start_slow_job(client, site, 3, 1)

    client.send({"type": "cancel", "job_id": 3, "attempt": 1})

    wait_until(lambda: events(path, "finish", job_id=3), message="the cancelled job's finish event")
    assert events(path, "finish", job_id=2)[0]["status"] == "failed"
    assert events(path, "finish", job_id=3)[0]["status"] == "stopped"
    assert events(path, "finish", job_id=3)[0]["reason"] == "cancel from the bus"


def test_close_is_recorded_when_the_crawler_notices_a_silent_bus(crawlers, clients, tmp_path):
    path = tmp_path / "connections.jsonl"
    crawler = crawlers(connection_log=ConnectionLog(path))
    client = clients(address_of(crawler))
    client.auto_heartbeat = False
    client.handshake(heartbeat=0.2)

    client.expect("bye")

    [closed] = events(path, "close")  # written before the bye went out
    assert closed["reason"] == "bus silent" and closed["session"] == client.session


def test_connection_log_appends_and_keeps_lines_whole_under_concurrent_sessions(crawlers, clients, tmp_path):
    path = tmp_path / "connections.jsonl"
    path.write_text('{"t": 0.0, "event": "earlier run"}\n', encoding="utf-8")
    crawler = crawlers(slots=1000, connection_log=ConnectionLog(path))
    address = address_of(crawler)
    buses = [clients(address) for _ in range(4)]
    for bus in buses:
        bus.handshake()

    def flood(bus: BusClient, base: int) -> None:
        bus.sock.sendall(
            b"".join(
                json.dumps({"type": "assign", "job_id": base + n, "attempt": 1, "url": "http://x/"}).encode() + b"\n"
                for n in range(1, 301)
            )
        )

    threads = [threading.Thread(target=flood, args=(bus, 1000 * index)) for index, bus in enumerate(buses)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: len(events(path, "finish")) == 1200, message="1200 finish events")

    lines = log_lines(path)  # every line parses: none was torn by a concurrent write
    assert lines[0] == {"t": 0.0, "event": "earlier run"}
    assert len(events(path, "assign")) == 1200
    for index, bus in enumerate(buses):
        mine = {line["job_id"] for line in events(path, "finish", session=bus.session)}
        assert mine == {1000 * index + n for n in range(1, 301)}


# --- Announcing: the request, against a local jobsite stand-in ------------------------------------


class AnnounceSite:
    """Plays jobsite's announce endpoint; records each request and checks its HMAC by its own recipe."""

    def __init__(self, token: str):
        self.token = token
        self.requests: list[dict[str, Any]] = []
        self.statuses: list[int] = []  # answers to give, in order; then 200
        site = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fields = json.loads(body)
                message = " ".join(
                    ["jobsite-announce/1", fields["action"], fields["endpoint"], fields["ts"], fields["nonce"]]
                )
                expected = hmac.new(site.token.encode(), message.encode(), hashlib.sha256).hexdigest()
                site.requests.append(
                    {
                        "path": self.path,
                        "content_type": self.headers.get("Content-Type"),
                        "fields": fields,
                        "verified": hmac.compare_digest(expected, fields.get("auth", "")),
                        "at": time.time(),
                    }
                )
                status = site.statuses.pop(0) if site.statuses else 200
                answer = json.dumps({"result": "ok" if status < 300 else "refused"}).encode()
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/crawlers/announce"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def actions(self) -> list[str]:
        return [request["fields"]["action"] for request in self.requests]


@pytest.fixture
def jobsite_announce():
    site = AnnounceSite(TOKEN)
    site.thread.start()
    yield site
    site.server.shutdown()
    site.server.server_close()


def test_a_register_request_carries_a_verifiable_signed_announcement(jobsite_announce):
    announcer = Announcer(jobsite_announce.url, token=TOKEN, endpoint="unix:/run/crawler.sock", label="crawler 7")

    assert announcer.send("register") == 200
    assert announcer.send("register") == 200

    first, second = jobsite_announce.requests
    assert first["path"] == "/crawlers/announce"
    assert first["content_type"] == "application/json"
    assert first["verified"] and second["verified"]
    fields = first["fields"]
    assert set(fields) == {"action", "endpoint", "label", "ts", "nonce", "auth"}
    assert fields["action"] == "register"
    assert fields["endpoint"] == "unix:/run/crawler.sock" and fields["label"] == "crawler 7"
    assert re.fullmatch(r"\d+\.\d{3}", fields["ts"]) and abs(float(fields["ts"]) - first["at"]) < 5
    assert re.fullmatch(r"[0-9a-f]{32}", fields["nonce"])
    assert re.fullmatch(r"[0-9a-f]{64}", fields["auth"])
    assert fields["nonce"] != second["fields"]["nonce"]  # a fresh nonce each time: no replay to refuse


def test_a_request_signed_with_another_token_does_not_verify(jobsite_announce):
    Announcer(jobsite_announce.url, token="another-token", endpoint="unix:/x.sock").send("register")

    assert jobsite_announce.requests[0]["verified"] is False


def test_register_retries_with_backoff_until_jobsite_answers_2xx(jobsite_announce):
    jobsite_announce.statuses = [503, 500, 429]
    announcer = Announcer(jobsite_announce.url, token=TOKEN, endpoint="unix:/x.sock", backoff_base=0.01)

    assert announcer.register() is True

    assert jobsite_announce.actions() == ["register"] * 4
    assert announcer.registered.is_set()
    assert len({request["fields"]["nonce"] for request in jobsite_announce.requests}) == 4


def test_register_gives_up_after_retry_for_when_nobody_listens():
    announcer = Announcer(
        f"http://127.0.0.1:{free_port()}/crawlers/announce",
        token=TOKEN,
        endpoint="unix:/x.sock",
        retry_for=0.5,
        backoff_base=0.05,
        backoff_cap=0.1,
    )
    started = time.monotonic()

    assert announcer.register() is False

    assert time.monotonic() - started < 3
    assert not announcer.registered.is_set()


def test_register_in_the_background_waits_for_listening(jobsite_announce):
    listening = threading.Event()
    announcer = Announcer(jobsite_announce.url, token=TOKEN, endpoint="unix:/x.sock")
    announcer.start(after=listening)
    time.sleep(0.3)
    assert jobsite_announce.requests == []

    listening.set()

    assert announcer.registered.wait(5)
    announcer.stop()


@pytest.mark.parametrize("status", [302, 307, 403, 500])
def test_an_answer_other_than_2xx_is_a_failure(jobsite_announce, status):
    jobsite_announce.statuses = [status]

    with pytest.raises(AnnounceError, match=f"HTTP {status}"):
        Announcer(jobsite_announce.url, token=TOKEN, endpoint="unix:/x.sock").send("deregister")
    assert len(jobsite_announce.requests) == 1  # a redirect is not followed


def test_a_failed_deregister_is_reported_not_raised():
    announcer = Announcer(f"http://127.0.0.1:{free_port()}/", token=TOKEN, endpoint="unix:/x.sock")

    assert announcer.deregister() is False


@pytest.mark.parametrize(
    ("url", "token", "message"),
    [
        ("ftp://jobs.example.org/", TOKEN, "must be http:// or https://"),
        ("jobs.example.org/crawlers/announce", TOKEN, "must be http:// or https://"),
        ("https://jobs.example.org/crawlers/announce", "", "needs BUS_TOKEN"),
    ],
)
def test_announcer_refuses_a_bad_url_or_no_token(url, token, message):
    with pytest.raises(ValueError, match=message):
        Announcer(url, token=token, endpoint="unix:/x.sock")


# --- manage.py runcrawler --announce / --connection-log ------------------------------------------------


def start_runcrawler(processes, socket_path: str, *args: str, token: str = TOKEN):
    proc = processes.manage(
        "runcrawler", "--listen", socket_path, "--slots", "4", "--noop", *args, env=processes.env(BUS_TOKEN=token)
    )
    client = wait_until(
        lambda: connected(socket_path) or proc.poll() is not None,
        timeout=30,
        message="the crawler to accept connections",
    )
    assert proc.poll() is None, processes.output(proc)
    return proc, client


def test_runcrawler_registers_at_start_and_deregisters_on_sigterm(processes, short_socket_path, jobsite_announce):
    proc, client = start_runcrawler(
        processes, short_socket_path, "--announce", jobsite_announce.url, "--label", "rack 4"
    )
    try:
        wait_until(lambda: jobsite_announce.requests, timeout=15, message="the register request")
        client.handshake(token=TOKEN)
        assign(client, 1)
        client.expect("done", job_id=1)

        proc.send_signal(signal.SIGTERM)

        assert client.expect("bye")["reason"] == "crawler stopping"
    finally:
        client.close()
    assert proc.wait(timeout=20) == 0, processes.output(proc)
    assert jobsite_announce.actions() == ["register", "deregister"]
    for request in jobsite_announce.requests:
        assert request["verified"], request
        assert request["fields"]["endpoint"] == f"unix:{short_socket_path}"
        assert request["fields"]["label"] == "rack 4"


def test_runcrawler_serves_sessions_while_jobsite_refuses_the_register(processes, short_socket_path, jobsite_announce):
    jobsite_announce.statuses = [503] * 1000
    proc, client = start_runcrawler(
        processes, short_socket_path, "--announce", jobsite_announce.url, "--advertise", "tcp://crawler-7.lan:7000"
    )
    try:
        wait_until(lambda: len(jobsite_announce.requests) >= 2, timeout=15, message="register retries")
        client.handshake(token=TOKEN)  # the failing register blocks no session
        assign(client, 2)
        client.expect("done", job_id=2)

        proc.send_signal(signal.SIGTERM)
        client.wait_closed()
    finally:
        client.close()
    assert proc.wait(timeout=20) == 0, processes.output(proc)
    assert set(jobsite_announce.actions()) == {"register", "deregister"}
    assert jobsite_announce.actions()[-1] == "deregister"
    assert {request["fields"]["endpoint"] for request in jobsite_announce.requests} == {"tcp://crawler-7.lan:7000"}
    output = processes.output(proc)
    assert "event=crawler.announce.failed action=register" in output
    assert "event=crawler.announce.failed action=deregister" in output  # logged; the exit is still 0


def test_runcrawler_refuses_to_announce_without_bus_token(processes, short_socket_path):
    proc = processes.manage(
        "runcrawler",
        "--listen",
        short_socket_path,
        "--slots",
        "1",
        "--noop",
        "--announce",
        "http://127.0.0.1:9/crawlers/announce",
        env=processes.env(BUS_TOKEN=""),
    )
    assert proc.wait(timeout=30) != 0
    assert "--announce needs BUS_TOKEN" in processes.output(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--listen", "/tmp/a.sock", "--advertise", "unix:/tmp/a.sock"], "--advertise only goes with --announce"),
        (["--listen", "/tmp/a.sock", "--listen", "/tmp/b.sock", "--announce", "http://j/"], "name the endpoint"),
        ([f"--listen=tcp://0.0.0.0:{free_port()}", "--announce", "http://j/"], "--advertise tcp://HOST:PORT"),
        (["--listen", "/tmp/a.sock", "--announce", "http://j/", "--advertise", "relative.sock"], "--advertise:"),
        (["--listen", "/tmp/a.sock", "--announce", "ftp://j/"], "must be http:// or https://"),
    ],
    ids=["advertise-alone", "several-listen", "wildcard", "bad-advertise", "bad-url"],
)
def test_runcrawler_refuses_announce_options_that_cannot_work(args, message):
    with pytest.raises(CommandError, match=re.escape(message)):
        call_command("runcrawler", *args, "--slots", "1", "--noop", "--token", TOKEN)


def test_runcrawler_writes_the_connection_log(processes, short_socket_path, tmp_path):
    path = tmp_path / "crawler-connections.jsonl"
    proc, client = start_runcrawler(processes, short_socket_path, "--connection-log", str(path))
    try:
        client.handshake(token=TOKEN)
        assign(client, 5, attempt=2)
        client.expect("done", job_id=5)

        proc.send_signal(signal.SIGTERM)

        client.expect("bye")
        client.wait_closed()
    finally:
        client.close()
    assert proc.wait(timeout=20) == 0, processes.output(proc)
    lines = log_lines(path)
    assert [line["event"] for line in lines] == ["open", "ready", "assign", "finish", "close"]
    assert lines[1]["session"] == client.session and lines[1]["peer"] == "test-bus"
    assert lines[3] | {"t": 0} == {
        "t": 0,
        "event": "finish",
        "job_id": 5,
        "attempt": 2,
        "status": "done",
        "session": client.session,
    }
    assert lines[4]["reason"] == "crawler stopping"
