"""A scriptable crawler peer for bus tests: real sockets, frames under the test's control.

Used in-process (CrawlerPeer) to send exactly the frames a test wants, and as
a script (`python tests/crawler_peer.py --listen PATH --slots N`) that holds
its assignments without answering, so a test can SIGKILL or SIGSTOP a real
process that has jobs.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import struct
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobsite_crawler import wire as protocol  # noqa: E402
from jobsite_crawler.endpoints import parse_endpoint  # noqa: E402


class CrawlerPeer:
    def __init__(self, endpoint: str, *, token: str | None = None, name: str = "peer"):
        self.endpoint = parse_endpoint(endpoint)
        self.listener = self.endpoint.listen()
        self.token = token
        self.name = name
        self.conn: socket.socket | None = None
        self.reader = protocol.FrameReader(protocol.DEFAULT_MAX_FRAME)
        self.frames: list[dict] = []
        self.hello: dict | None = None
        self.lock = threading.Lock()

    def accept(self, timeout: float = 10.0) -> None:
        self.listener.settimeout(timeout)
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(None)
        self.reader = protocol.FrameReader(protocol.DEFAULT_MAX_FRAME)
        self.frames = []

    def handshake(
        self,
        *,
        slots: int = 10,
        running=(),
        timeout: float = 10.0,
        auth: str | None = None,
        send_ready: bool = True,
        ready_extra: dict | None = None,
    ) -> dict:
        self.accept(timeout)
        nonce = protocol.new_nonce()
        self.send({"type": "welcome", "protocol": 1, "crawler": self.name, "nonce": nonce})
        self.hello = self.recv("hello", timeout=timeout)
        if self.token:
            expected = protocol.hello_proof(self.token, nonce, self.hello["session"])
            assert protocol.proof_matches(expected, self.hello.get("auth")), "bad hello proof"
        if send_ready:
            ready = {
                "type": "ready",
                "slots": slots,
                "running": [list(pair) for pair in running],
                **(ready_extra or {}),
            }
            if auth is not None:
                ready["auth"] = auth
            elif self.token:
                ready["auth"] = protocol.ready_proof(self.token, self.hello["nonce"], self.hello["session"])
            self.send(ready)
        return self.hello

    def send(self, frame: dict) -> None:
        self.send_raw(protocol.encode_frame(frame))

    def send_raw(self, data: bytes) -> None:
        with self.lock:
            self.conn.sendall(data)

    def _fill(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.conn], [], [], timeout)
        if not ready:
            return True
        data = self.conn.recv(1 << 20)
        if not data:
            return False
        self.frames.extend(self.reader.feed(data))
        return True

    def recv(self, kind: str | None = None, timeout: float = 10.0, where=None) -> dict:
        """The next frame of `kind` (others are kept in self.seen); AssertionError at the deadline or EOF."""
        deadline = time.monotonic() + timeout
        while True:
            for index, frame in enumerate(self.frames):
                if (kind is None or frame["type"] == kind) and (where is None or where(frame)):
                    return self.frames.pop(index)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {kind} frame within {timeout}s; have {[f['type'] for f in self.frames]}")
            if not self._fill(min(remaining, 0.2)):
                raise AssertionError(f"connection closed while waiting for {kind}; have {self.frames}")

    def recv_many(self, kind: str, count: int, timeout: float = 10.0) -> list[dict]:
        return [self.recv(kind, timeout=timeout) for _ in range(count)]

    def wait_closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if not self._fill(0.1):
                    return True
            except (ConnectionResetError, OSError):
                return True
            except protocol.FrameError:
                continue
        return False

    def close(self, reset: bool = False) -> None:
        if self.conn is not None:
            if reset:  # SO_LINGER 0: the close sends RST, a socket error on the bus side
                self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.conn.close()
            self.conn = None

    def shutdown(self) -> None:
        self.close()
        self.listener.close()
        if self.endpoint.kind == "unix":
            try:
                os.unlink(self.endpoint.path)
            except FileNotFoundError:
                pass


def main() -> None:
    """Hold assignments without answering; report each assign and ack as a JSON line on stdout.

    Lines on stdin command it: `done JOB ATTEMPT` queues an outcome, sent now
    if connected, else right after the next handshake, and kept until acked.
    """
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--slots", type=int, default=10)
    parser.add_argument("--reconnect-slots", type=int, default=None, help="slots to offer in later sessions")
    parser.add_argument("--token")
    parser.add_argument("--heartbeat", action="store_true", help="send heartbeats listing held jobs")
    args = parser.parse_args()
    peer = CrawlerPeer(args.listen, token=args.token, name="held-peer")
    unacked: dict[tuple[int, int], dict] = {}
    commands = b""
    sessions = 0
    print(json.dumps({"listening": args.listen}), flush=True)
    while True:
        slots = args.slots if sessions == 0 or args.reconnect_slots is None else args.reconnect_slots
        try:
            peer.handshake(slots=slots, timeout=3600)
        except (AssertionError, OSError, protocol.FrameError):
            # The bus gave up on this connection (e.g. its handshake timed out
            # while we were stopped): wait for the next one.
            peer.close()
            continue
        sessions += 1
        print(json.dumps({"session": peer.hello["session"], "n": sessions}), flush=True)
        held: list[list[int]] = []
        interval = float(peer.hello["heartbeat"])
        next_beat = time.monotonic() + interval
        try:
            for frame in unacked.values():
                peer.send(frame)
            while True:
                if args.heartbeat and time.monotonic() >= next_beat:
                    peer.send({"type": "heartbeat", "ts": time.time(), "running": held})
                    next_beat = time.monotonic() + interval
                readable, _, _ = select.select([peer.conn, sys.stdin], [], [], 0.05)
                if sys.stdin in readable:
                    # os.read, not readline: select() cannot see lines already in Python's buffer.
                    commands += os.read(sys.stdin.fileno(), 65536)
                    fresh = []
                    while b"\n" in commands:
                        line, commands = commands.split(b"\n", 1)
                        words = line.decode().split()
                        if words and words[0] == "done":
                            job_id, attempt = int(words[1]), int(words[2])
                            frame = {"type": "done", "job_id": job_id, "attempt": attempt, "result": {"late": True}}
                            unacked[(job_id, attempt)] = frame
                            fresh.append(frame)
                    for frame in fresh:  # kept in unacked first: a dead socket here means a resend later
                        peer.send(frame)
                if peer.conn in readable and not peer._fill(0):
                    break
                for frame in list(peer.frames):
                    peer.frames.remove(frame)
                    if frame["type"] == "assign":
                        held.append([frame["job_id"], frame["attempt"]])
                        print(json.dumps({"assign": frame["job_id"], "attempt": frame["attempt"]}), flush=True)
                    elif frame["type"] == "ack":
                        unacked.pop((frame["job_id"], frame["attempt"]), None)
                        print(
                            json.dumps(
                                {"ack": frame["job_id"], "attempt": frame["attempt"], "status": frame["status"]}
                            ),
                            flush=True,
                        )
        except OSError:
            pass
        peer.close()


if __name__ == "__main__":
    main()
