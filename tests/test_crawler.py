"""The reference crawler over real sockets: handshake, outcomes until acked, cancel, liveness, framing.

A tiny bus client written here (jobsite_crawler/wire.py only) plays the bus. The
crawler runs in a thread, or as a real `manage.py runcrawler` process.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

import pytest

from jobsite_crawler.crawler import Crawler
from jobsite_crawler.fetch import Fetcher
from jobsite_crawler.wire import (
    FrameReader,
    encode_frame,
    hello_proof,
    new_nonce,
    proof_matches,
    ready_proof,
)
from tests.conftest import free_port, wait_until
from tests.test_fetch import site  # noqa: F401  (the local HTTP server fixture)

TOKEN = "a-shared-secret-of-some-length"


class BusClient:
    """Plays the bus: connects to a crawler, does the handshake, sends and receives frames."""

    def __init__(self, address: str, *, max_frame: int = 1024 * 1024):
        if address.startswith("tcp://"):
            host, port = address[len("tcp://") :].rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)), timeout=5)
        else:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(5)
            self.sock.connect(address)
        self.reader = FrameReader(max_frame)
        self.inbox: list[dict[str, Any]] = []
        self.eof = False
        self.session = str(uuid.uuid4())
        self.hello_nonce = new_nonce()
        self.welcome: dict[str, Any] | None = None
        self.heartbeat: float | None = None
        self.auto_heartbeat = True
        self.last_sent = time.monotonic()

    def send(self, frame: dict[str, Any]) -> None:
        self.sock.sendall(encode_frame(frame))
        self.last_sent = time.monotonic()

    def _fill(self, deadline: float) -> bool:
        """Read once (until the deadline); False when nothing more will come.

        While it waits, it sends heartbeats like a live bus (unless
        auto_heartbeat is off), so short intervals do not end the session.
        """
        remaining = deadline - time.monotonic()
        if self.eof or remaining <= 0:
            return False
        if self.auto_heartbeat and self.heartbeat:
            if time.monotonic() - self.last_sent >= self.heartbeat / 3:
                self.send({"type": "heartbeat", "ts": time.time()})
            remaining = min(remaining, self.heartbeat / 3)
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return time.monotonic() < deadline
        except ConnectionResetError:
            data = b""
        if not data:
            self.eof = True
            return False
        self.inbox.extend(self.reader.feed(data))
        return True

    def expect(self, kind: str, *, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The first received frame of this type (and these field values); earlier others stay in the inbox."""
        deadline = time.monotonic() + timeout
        while True:
            for index, frame in enumerate(self.inbox):
                if frame["type"] == kind and all(frame.get(k) == v for k, v in fields.items()):
                    return self.inbox.pop(index)
            if not self._fill(deadline):
                raise AssertionError(
                    f"no {kind} frame {fields or ''} within {timeout}s (eof={self.eof}); received: {self.inbox!r}"
                )

    def take(self, kind: str) -> list[dict[str, Any]]:
        """Remove and return every frame of this type received so far."""
        taken = [frame for frame in self.inbox if frame["type"] == kind]
        self.inbox = [frame for frame in self.inbox if frame["type"] != kind]
        return taken

    def wait_closed(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.eof:
            if not self._fill(deadline) and not self.eof:
                raise AssertionError(f"the crawler did not close the connection within {timeout}s")

    def handshake(
        self, *, token: str | None = None, heartbeat: float = 30.0, auth: str | None = None, protocol: int = 1
    ) -> dict[str, Any] | None:
        self.welcome = self.expect("welcome")
        hello = {
            "type": "hello",
            "protocol": protocol,
            "node": "test-bus",
            "session": self.session,
            "heartbeat": heartbeat,
            "nonce": self.hello_nonce,
        }
        if token:
            hello["auth"] = hello_proof(token, self.welcome["nonce"], self.session)
        if auth is not None:
            hello["auth"] = auth
        self.send(hello)
        self.heartbeat = heartbeat
        if auth is not None or protocol != 1:
            return None
        return self.expect("ready")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def crawlers(short_socket_path):
    """Starts Crawler objects in threads; stops and joins every one of them."""
    started: list[tuple[Crawler, threading.Thread]] = []

    def start(**options: Any) -> Crawler:
        options.setdefault("endpoints", [short_socket_path if not started else f"{short_socket_path}.{len(started)}"])
        options.setdefault("slots", 4)
        options.setdefault("name", "test-crawler")
        options.setdefault("noop", not {"fetcher", "handler", "runner"} & options.keys())
        crawler = Crawler(**options)
        thread = threading.Thread(target=crawler.serve_forever, name="test-crawler")
        thread.start()
        started.append((crawler, thread))
        assert crawler.listening.wait(10), "the crawler did not start listening"
        return crawler

    yield start
    for crawler, _ in started:
        crawler.stop()
    for _, thread in started:
        thread.join(15)
        assert not thread.is_alive(), "the crawler did not stop"


@pytest.fixture
def clients():
    opened: list[BusClient] = []

    def connect(address: str, **options: Any) -> BusClient:
        client = BusClient(address, **options)
        opened.append(client)
        return client

    yield connect
    for client in opened:
        client.close()


def address_of(crawler: Crawler) -> str:
    return str(crawler.endpoints[0]).removeprefix("unix:")


def assign(client: BusClient, job_id: int, url: str = "http://example.com/", attempt: int = 1) -> None:
    client.send({"type": "assign", "job_id": job_id, "attempt": attempt, "url": url, "payload": {}})


def ack(client: BusClient, job_id: int, attempt: int = 1) -> None:
    client.send({"type": "ack", "job_id": job_id, "attempt": attempt, "status": "recorded"})


# --- Handshake ------------------------------------------------------------------------------


def test_handshake_without_token_sends_welcome_then_ready_without_auth(crawlers, clients):
    crawler = crawlers(slots=7)
    client = clients(address_of(crawler))

    ready = client.handshake()

    assert client.welcome["protocol"] == 1
    assert client.welcome["crawler"] == "test-crawler"
    assert len(client.welcome["nonce"]) >= 32
    assert ready["slots"] == 7
    assert ready["running"] == []
    assert "auth" not in ready


def test_handshake_with_token_proves_both_sides(crawlers, clients):
    crawler = crawlers(token=TOKEN)
    client = clients(address_of(crawler))

    ready = client.handshake(token=TOKEN)

    assert proof_matches(ready_proof(TOKEN, client.hello_nonce, client.session), ready["auth"])


@pytest.mark.parametrize("auth", ["0" * 64, ""])
def test_wrong_hello_proof_is_unauthorized_and_closed(crawlers, clients, auth):
    crawler = crawlers(token=TOKEN)
    client = clients(address_of(crawler))

    client.handshake(auth=auth)

    assert client.expect("error")["code"] == "unauthorized"
    client.wait_closed()
    assert client.take("ready") == []


def test_hello_without_auth_is_unauthorized_when_the_crawler_has_a_token(crawlers, clients):
    crawler = crawlers(token=TOKEN)
    client = clients(address_of(crawler))
    client.expect("welcome")
    client.send(
        {
            "type": "hello",
            "protocol": 1,
            "node": "n",
            "session": client.session,
            "heartbeat": 30,
            "nonce": client.hello_nonce,
        }
    )

    assert client.expect("error")["code"] == "unauthorized"
    client.wait_closed()


def test_hello_with_auth_is_refused_when_the_crawler_has_no_token(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))

    client.handshake(auth=hello_proof(TOKEN, "0" * 64, client.session))

    error = client.expect("error")
    assert error["code"] == "unauthorized"
    assert "no token" in error["message"]
    client.wait_closed()


def test_unsupported_protocol_gets_an_error_and_close(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))

    client.handshake(protocol=2)

    assert client.expect("error")["code"] == "unsupported_protocol"
    client.wait_closed()


def test_tcp_endpoint_without_token_is_refused_at_start():
    with pytest.raises(ValueError, match="requires a token"):
        Crawler(endpoints=[f"tcp://127.0.0.1:{free_port()}"], slots=1, noop=True)


def test_tcp_endpoint_with_token_serves_sessions(crawlers, clients):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    crawlers(endpoints=[endpoint], token=TOKEN)
    client = clients(endpoint)
    client.handshake(token=TOKEN)

    assign(client, 5)

    assert client.expect("done", job_id=5)["result"] == {"noop": True}


# --- Jobs and outcomes ---------------------------------------------------------------------------


def test_assign_fetches_the_page_and_reports_done(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=5))
    client = clients(address_of(crawler))
    client.handshake()

    assign(client, 17, site.url("/page"), attempt=3)

    assert client.expect("started", job_id=17)["attempt"] == 3
    done = client.expect("done", job_id=17)
    assert done["attempt"] == 3
    result = done["result"]
    assert result["status"] == 200
    assert result["title"] == "Caf\u00e9 & Friends <home>"
    assert result["links"] == 3
    assert result["final_url"] == site.url("/page")
    assert result["truncated"] is False
    assert result["bytes"] > 0 and result["elapsed_ms"] >= 0
    assert crawler.unacked_outcomes() == [(17, 3)]
    ack(client, 17, 3)
    wait_until(lambda: crawler.unacked_outcomes() == [], message="the ack to drop the outcome")


def test_http_error_status_is_done_with_the_status(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=5))
    client = clients(address_of(crawler))
    client.handshake()

    assign(client, 1, site.url("/nothing-here"))

    assert client.expect("done", job_id=1)["result"]["status"] == 404


def test_private_address_without_allow_private_fails_not_retryable(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(timeout=5))
    client = clients(address_of(crawler))
    client.handshake()

    assign(client, 2, site.url("/page"))

    failed = client.expect("failed", job_id=2)
    assert failed["retryable"] is False
    assert "refused address 127.0.0.1" in failed["error"]
    assert "--allow-private" in failed["error"]


def test_network_error_fails_retryable(crawlers, clients):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=5))
    client = clients(address_of(crawler))
    client.handshake()

    assign(client, 3, f"http://127.0.0.1:{free_port()}/")

    failed = client.expect("failed", job_id=3)
    assert failed["retryable"] is True
    assert "cannot connect" in failed["error"]


def test_unacked_outcomes_are_resent_after_reconnect_until_acked(crawlers, clients):
    crawler = crawlers()
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    for job_id in (1, 2, 3):
        assign(first, job_id)
    for job_id in (1, 2, 3):
        first.expect("done", job_id=job_id)
    first.close()  # no ack: the connection broke
    wait_until(lambda: crawler.session_count() == 0, message="the first session to end")

    second = clients(address)
    second.handshake(heartbeat=0.2)
    assert sorted(frame["job_id"] for frame in (second.expect("done") for _ in range(3))) == [1, 2, 3]
    ack(second, 1)
    ack(second, 2)
    wait_until(lambda: crawler.unacked_outcomes() == [(3, 1)], message="acks to drop outcomes 1 and 2")
    second.close()
    wait_until(lambda: crawler.session_count() == 0, message="the second session to end")

    third = clients(address)
    third.handshake(heartbeat=0.2)
    # Resends follow ready at once, so the first heartbeat comes after all of them.
    third.expect("heartbeat")
    assert [frame["job_id"] for frame in third.take("done")] == [3]
    ack(third, 3)
    wait_until(lambda: crawler.unacked_outcomes() == [], message="the ack of outcome 3")
    third.close()
    wait_until(lambda: crawler.session_count() == 0, message="the third session to end")

    fourth = clients(address)
    fourth.handshake(heartbeat=0.2)
    fourth.expect("heartbeat")
    assert fourth.take("done") == []


def test_outcomes_of_an_ended_session_move_to_a_live_session_at_once(crawlers, clients):
    # The bus may reconnect before the crawler notices the old connection is
    # gone; the outcomes must not wait for yet another ready.
    crawler = crawlers()
    address = address_of(crawler)
    old, new = clients(address), clients(address)
    old.handshake()
    new.handshake()
    assign(old, 51)
    old.expect("done", job_id=51)

    old.close()

    assert new.expect("done", job_id=51)["attempt"] == 1
    ack(new, 51)
    wait_until(lambda: crawler.unacked_outcomes() == [], message="the ack on the new session")


def test_stale_ack_drops_the_outcome_like_a_recorded_one(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.handshake()
    assign(client, 9, attempt=2)
    client.expect("done", job_id=9)
    client.send({"type": "ack", "job_id": 9, "attempt": 2, "status": "stale"})
    wait_until(lambda: crawler.unacked_outcomes() == [], message="the stale ack to drop the outcome")


def test_cancel_stops_a_running_fetch_and_sends_no_outcome(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30))
    client = clients(address_of(crawler))
    client.handshake(heartbeat=0.2)
    assign(client, 4, site.url("/slow"))
    client.expect("started", job_id=4)
    wait_until(lambda: site.slow_requests == 1, message="the slow request to reach the server")

    client.send({"type": "cancel", "job_id": 4, "attempt": 1})

    wait_until(lambda: crawler.running_jobs() == [], message="the cancel to stop the job")
    wait_until(
        lambda: crawler.runner.busy == 0,
        message="the fetch to end although the server still holds the request",
    )
    beat = client.expect("heartbeat", running=[])
    assert beat["running"] == []
    assert client.take("done") == [] and client.take("failed") == []
    assert crawler.unacked_outcomes() == []


def test_heartbeats_carry_the_running_list(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30))
    client = clients(address_of(crawler))
    client.handshake(heartbeat=0.2)
    assign(client, 11, site.url("/slow"), attempt=2)
    client.expect("started", job_id=11)

    beat = client.expect("heartbeat", running=[[11, 2]])
    assert isinstance(beat["ts"], float) and abs(beat["ts"] - time.time()) < 60

    site.release.set()
    client.expect("done", job_id=11)
    client.expect("heartbeat", running=[])
    assert crawler.running_jobs() == []


def test_session_end_stops_its_jobs_and_a_new_session_sees_none_running(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30))
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    assign(first, 12, site.url("/slow"))
    first.expect("started", job_id=12)
    wait_until(lambda: site.slow_requests == 1, message="the slow request to reach the server")

    first.close()

    wait_until(lambda: crawler.running_jobs() == [], message="the session end to stop its job")
    second = clients(address)
    assert second.handshake()["running"] == []
    assert crawler.unacked_outcomes() == []


def test_with_resume_grace_a_new_session_resumes_the_running_job(crawlers, clients, site):
    crawler = crawlers(fetcher=Fetcher(allow_private=True, timeout=30), resume_grace=30)
    address = address_of(crawler)
    first = clients(address)
    first.handshake()
    assign(first, 13, site.url("/slow"), attempt=4)
    first.expect("started", job_id=13)
    first.close()
    wait_until(lambda: crawler.session_count() == 0, message="the first session to end")

    second = clients(address)
    assert second.handshake(heartbeat=0.2)["running"] == [[13, 4]]
    second.expect("heartbeat", running=[[13, 4]])
    site.release.set()

    assert second.expect("done", job_id=13)["attempt"] == 4


def test_several_sessions_at_once_each_get_their_outcomes(crawlers, clients):
    crawler = crawlers(slots=2)
    address = address_of(crawler)
    one, two = clients(address), clients(address)
    assert one.handshake()["slots"] == 2
    assert two.handshake()["slots"] == 2
    wait_until(lambda: crawler.session_count() == 2, message="two live sessions")

    assign(one, 21)
    assign(two, 22)

    one.expect("done", job_id=21)
    two.expect("done", job_id=22)
    assert one.take("done") == [] and two.take("done") == []


def test_noop_delay_answers_after_the_delay_and_lists_the_job_meanwhile(crawlers, clients):
    crawler = crawlers(noop_delay=(0.5, 0.5))
    client = clients(address_of(crawler))
    client.handshake(heartbeat=0.1)
    started = time.monotonic()

    assign(client, 31)

    client.expect("heartbeat", running=[[31, 1]])
    client.expect("done", job_id=31)
    assert time.monotonic() - started >= 0.45


# --- Framing and liveness -----------------------------------------------------------------------


def test_frame_over_the_limit_gets_bad_frame_and_the_session_closes(crawlers, clients):
    crawler = crawlers(max_frame=1024)
    client = clients(address_of(crawler))
    client.handshake()

    client.sock.sendall(b'{"type":"heartbeat","pad":"' + b"x" * 4096)  # no newline: never buffered whole

    assert client.expect("error")["code"] == "bad_frame"
    client.wait_closed()
    wait_until(lambda: crawler.session_count() == 0, message="the session to end")


@pytest.mark.parametrize("line", [b"\xff\xfe\n", b"not json\n", b"[1,2]\n", b'{"no":"type"}\n'])
def test_malformed_frame_gets_bad_frame_and_the_session_closes(crawlers, clients, line):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.handshake()

    client.sock.sendall(line)

    assert client.expect("error")["code"] == "bad_frame"
    client.wait_closed()


def test_unknown_type_gets_unknown_type_and_the_session_stays(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.handshake()

    client.send({"type": "teleport", "where": "moon"})

    assert client.expect("error")["code"] == "unknown_type"
    assign(client, 41)
    client.expect("done", job_id=41)


def test_assign_with_wrong_fields_gets_invalid_and_the_session_stays(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.handshake()

    client.send({"type": "assign", "job_id": "seven", "attempt": 1, "url": "http://example.com/"})
    client.send({"type": "assign", "job_id": 8, "attempt": 0, "url": "http://example.com/"})

    assert client.expect("error")["code"] == "invalid"
    assert client.expect("error", job_id=8)["code"] == "invalid"
    assign(client, 42)
    client.expect("done", job_id=42)


def test_silent_bus_is_declared_gone_after_two_intervals(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.auto_heartbeat = False
    client.handshake(heartbeat=0.2)
    started = time.monotonic()

    bye = client.expect("bye", timeout=10)

    assert "heartbeat" in bye["reason"]
    assert time.monotonic() - started >= 0.35
    client.wait_closed()
    assert len(client.take("heartbeat")) >= 1  # the crawler kept sending its own meanwhile


def test_heartbeats_from_the_bus_keep_the_session(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.handshake(heartbeat=0.2)
    deadline = time.monotonic() + 1.2
    while time.monotonic() < deadline:
        client.send({"type": "heartbeat", "ts": time.time()})
        client.expect("heartbeat")
    assert client.take("bye") == [] and not client.eof
    assert crawler.session_count() == 1


def test_no_hello_in_time_closes_the_connection(crawlers, clients):
    crawler = crawlers(handshake_timeout=0.3)
    client = clients(address_of(crawler))
    client.expect("welcome")

    client.wait_closed()
    wait_until(lambda: crawler.session_count() == 0, message="the session to end")


def test_bye_from_the_bus_closes_the_session(crawlers, clients):
    crawler = crawlers()
    client = clients(address_of(crawler))
    client.handshake()

    client.send({"type": "bye", "reason": "bus stopping"})

    client.wait_closed()


def test_stop_says_bye_on_every_session(crawlers, clients):
    crawler = crawlers()
    one, two = clients(address_of(crawler)), clients(address_of(crawler))
    one.handshake()
    two.handshake()

    crawler.stop()

    for client in (one, two):
        assert client.expect("bye")["reason"] == "crawler stopping"
        client.wait_closed()


# --- manage.py runcrawler -------------------------------------------------------------------------


def connected(path: str) -> BusClient | None:
    """A client connected to the crawler, or None while it is not listening yet (bound is not enough)."""
    try:
        return BusClient(path)
    except (FileNotFoundError, ConnectionRefusedError):
        return None


def test_runcrawler_answers_assigns_and_exits_0_on_sigterm(processes, short_socket_path):
    proc = processes.manage(
        "runcrawler", "--listen", short_socket_path, "--slots", "4", "--noop", env=processes.env(BUS_TOKEN="")
    )
    client = wait_until(
        lambda: connected(short_socket_path) or proc.poll() is not None,
        timeout=30,
        message="the crawler to accept connections",
    )
    assert proc.poll() is None, processes.output(proc)
    try:
        assert client.handshake()["slots"] == 4
        client.sock.sendall(
            b"".join(
                encode_frame({"type": "assign", "job_id": job_id, "attempt": 1, "url": "http://example.com/"})
                for job_id in range(1, 501)
            )
        )
        seen = set()
        while len(seen) < 500:
            seen.add(client.expect("done")["job_id"])
        assert seen == set(range(1, 501))

        proc.send_signal(signal.SIGTERM)

        assert client.expect("bye")["reason"] == "crawler stopping"
        client.wait_closed()
    finally:
        client.close()
    assert proc.wait(timeout=15) == 0, processes.output(proc)
    assert not os.path.exists(short_socket_path)


def test_runcrawler_refuses_tcp_without_token(processes):
    proc = processes.manage(
        "runcrawler",
        "--listen",
        f"tcp://127.0.0.1:{free_port()}",
        "--slots",
        "1",
        "--noop",
        env=processes.env(BUS_TOKEN=""),
    )
    assert proc.wait(timeout=30) != 0
    assert "requires a token" in processes.output(proc)
