"""A hostile crawler for the chaos suite (issue 9): it holds a valid token and abuses it.

Run as a real process (`python tests/chaos/hostile_crawler.py --listen PATH ...`); it
listens on its own Unix socket, which runbus connects to like any crawler endpoint,
and speaks the protocol with the Django-free `jobsite_crawler/wire.py` only. Each session
the bus opens gets one of these behaviours, in a fixed cycle (the numbers in them are seeded random):

- forge:   lists other crawlers' jobs in `ready.running` (random ids, attempts 1..3),
           sends `done`/`failed` for job ids it was never assigned, then finishes the
           jobs it was really assigned (with a result of its own) and says `bye`;
- flood:   sends made-up outcomes until the bus closes it with `too_many_stale`, a
           quarter of them ahead of time (attempt 1 of the jobs it is likely to get next);
- trickle: takes jobs, then sends bytes one at a time without ever completing a
           frame, and times how long the bus takes to give up on it;
- crash:   takes 20 slots, lists the jobs of its previous crash in `ready.running`,
           waits for assigns and, holding them, exits without `bye` (os._exit) or resets
           the connection and is back at once (to take its dropped jobs again).

It never ends a session holding exactly one job: a job alone in a session that dies
is failed at max_interruptions (that is the poison verdict working as documented,
not something the hostile crawler should be able to pin on an innocent job, so the
suite keeps that case out of its "no innocent job failed" check). A lone job is
finished first. On SIGTERM it finishes what it holds and exits 0.

Every session's counts go, as one JSON line, to the `--stats` file (flushed before
a crash), and every (job, attempt) it was assigned to the `--assigned` file, so that
a restarted process never "forges" an outcome it is entitled to.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from jobsite_crawler import wire as protocol  # noqa: E402  (Django-free)

CRASH_EXIT = 17  # the exit status of a deliberate crash (the harness restarts the process)
# The behaviour of the n-th session (counted over restarts, from the stats file): every one comes up
# early in a run, crashes and forgeries most often.
CYCLE = ("forge", "crash", "flood", "crash", "trickle", "forge", "crash")
CRASH_SLOTS = 20
FLOOD_CAP = 20_000  # a flood the bus has not closed by then is a finding ("flood_not_closed")
FLOOD_UNCLOSED = 3000  # stale acks without too_many_stale (the limit is 1000 + 2 x slots, slots 0): a finding
TRICKLE_GIVE_UP = 15.0  # seconds of trickling after which the bus has failed to notice ("trickle_survived")


class Closed(Exception):
    pass


class Terminating(Exception):
    """SIGTERM arrived: end the session cleanly (finish what it holds, bye) and exit 0."""


PROBE_JOB = 10**12  # an id no job has: its outcome is acked `stale` without an audit event


class Session:
    """One connection from the bus: handshake, then a pump that answers heartbeats and tracks jobs."""

    def __init__(self, sock: socket.socket, hostile: Hostile):
        self.sock, self.hostile = sock, hostile
        self.reader = protocol.FrameReader()
        self.selector = selectors.DefaultSelector()
        self.selector.register(sock, selectors.EVENT_READ)
        self.held: dict[int, int] = {}  # job id -> attempt
        self.heartbeat = 0.5
        self.next_beat = 0.0
        self.beating = True
        self.acks: dict[tuple[int, int], str] = {}
        self.cancels: set[tuple[int, int]] = set()
        self.errors: list[str] = []
        self.session = ""
        self.fresh: set[int] = set()  # job ids assigned (not re-leased) in this session
        self.ending = False
        self.partial = False  # a frame's bytes are half sent (trickle): nothing else may go out
        self.probes = 0
        self.stats: dict = {"mode": "", "pid": os.getpid()}

    # --- wire ---
    def send(self, *frames: dict) -> None:
        data = b"".join(protocol.encode_frame(frame) for frame in frames)
        try:
            self.sock.sendall(data)
        except OSError:
            raise Closed("send failed") from None

    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError:
            raise Closed("send failed") from None

    def pump(self, seconds: float, until=None) -> None:
        """Read and handle frames for `seconds` (or until `until()`), sending heartbeats while `beating`."""
        deadline = time.monotonic() + seconds
        while True:
            if self.hostile.terminating and not self.ending:
                raise Terminating()
            if until is not None and until():
                return
            now = time.monotonic()
            if now >= deadline:
                return
            if self.beating and now >= self.next_beat:
                self.send(protocol.heartbeat_frame(running=[[j, a] for j, a in self.held.items()]))
                self.next_beat = now + self.heartbeat * 0.5
            wait = min(deadline - now, 0.05)
            if self.selector.select(wait):
                try:
                    data = self.sock.recv(256 * 1024)
                except OSError:
                    raise Closed("recv failed") from None
                if not data:
                    raise Closed("eof")
                for frame in self.reader.feed(data):
                    self.handle(frame)

    def handle(self, frame: dict) -> None:
        kind = frame["type"]
        if kind == "assign":
            pair = (frame["job_id"], frame["attempt"])
            self.held[pair[0]] = pair[1]
            self.fresh.add(pair[0])
            self.hostile.remember(pair)
            self.stats["assigned"] = self.stats.get("assigned", 0) + 1
        elif kind == "cancel":
            pair = (frame["job_id"], frame["attempt"])
            self.cancels.add(pair)
            if self.held.get(pair[0]) == pair[1]:
                del self.held[pair[0]]
        elif kind == "ack":
            pair = (frame["job_id"], frame["attempt"])
            self.acks[pair] = frame["status"]
            key = "acks_stale" if frame["status"] == "stale" else "acks_recorded"
            self.stats[key] = self.stats.get(key, 0) + 1
            if frame["status"] == "recorded" and pair[0] != PROBE_JOB and pair not in self.hostile.assigned:
                # An attempt it was never assigned, acked `recorded`: PROTOCOL.md rule 2 (that attempt's
                # outcome is already recorded, by its owner; a resend changes nothing). Whether anything
                # changed is for the database to say (the suite's outcome-authority check).
                self.stats["foreign_acked_recorded"] = self.stats.get("foreign_acked_recorded", 0) + 1
        elif kind == "error":
            self.errors.append(str(frame.get("code")))
        elif kind == "bye":
            raise Closed("bye from the bus")

    def drain(self) -> None:
        """After a failed send: read what the bus had sent before it closed (its error frame, say)."""
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline and self.selector.select(0.2):
            try:
                data = self.sock.recv(256 * 1024)
            except OSError:
                return
            if not data:
                return
            try:
                for frame in self.reader.feed(data):
                    self.handle(frame)
            except (Closed, protocol.FrameError):
                return

    def handshake(self, slots: int, running: list[tuple[int, int]]) -> None:
        self.send({"type": "welcome", "protocol": 1, "crawler": "chaos-hostile", "nonce": protocol.new_nonce()})
        hello = None
        deadline = time.monotonic() + 10
        while hello is None:
            if time.monotonic() > deadline:
                raise Closed("no hello")
            if self.selector.select(0.2):
                data = self.sock.recv(65536)
                if not data:
                    raise Closed("eof before hello")
                for frame in self.reader.feed(data):
                    if frame["type"] == "hello":
                        hello = frame
        self.session = hello["session"]
        self.heartbeat = float(hello["heartbeat"])
        ready = {"type": "ready", "slots": slots, "running": [list(pair) for pair in running]}
        if self.hostile.token:
            ready["auth"] = protocol.ready_proof(self.hostile.token, hello["nonce"], self.session)
        self.send(ready)
        self.stats["session"] = self.session

    # --- behaviour helpers ---
    def finish(self, job_ids) -> None:
        """Report `done` for jobs it holds (its own jobs: any result it likes) and wait for the acks."""
        frames = []
        for job_id in list(job_ids):
            attempt = self.held.pop(job_id, None)
            if attempt is not None:
                frames.append(
                    {
                        "type": "done",
                        "job_id": job_id,
                        "attempt": attempt,
                        "result": {"by": "hostile", "truth": "whatever it likes"},
                    }
                )
        if not frames:
            return
        self.send(*frames)
        pairs = [(f["job_id"], f["attempt"]) for f in frames]
        self.pump(5, until=lambda: all(pair in self.acks for pair in pairs))
        self.stats["finished_own"] = self.stats.get("finished_own", 0) + len(frames)
        self.stats["finished_own_stale"] = self.stats.get("finished_own_stale", 0) + sum(
            self.acks.get(pair) == "stale" for pair in pairs
        )

    def freeze(self, slots: int) -> None:
        """Stop new assignments: `capacity`, then wait for the ack of a probe outcome sent after it.

        The bus handles a session's frames in order and sends an assign before
        the ack of any outcome it handles later, so once the probe is acked
        every assign of a claim made before the new capacity is here.
        """
        self.probes += 1
        probe = (PROBE_JOB, self.probes)
        self.send(
            {"type": "capacity", "slots": slots},
            {"type": "done", "job_id": probe[0], "attempt": probe[1], "result": {}},
        )
        self.pump(10, until=lambda: probe in self.acks)

    def end_cleanly(self, reason: str) -> None:
        """Say bye holding nothing (a lone job left behind could be failed as poison)."""
        self.ending = True
        self.freeze(0)
        self.finish(list(self.held))
        self.send({"type": "bye", "reason": reason})

    def settle_lone(self) -> None:
        """Never leave a session holding exactly one job: finish it (it may be a suspect run alone)."""
        while len(self.held) == 1:
            self.finish(list(self.held))
            self.pump(0.15)  # a session that held nothing may now get the next suspect, alone
            self.stats["lone_finished"] = self.stats.get("lone_finished", 0) + 1

    def forged_pairs(self, count: int) -> list[tuple[int, int]]:
        """(job, attempt) pairs this crawler was never assigned, in the range of the suite's jobs."""
        rng, pairs = self.hostile.rng, []
        while len(pairs) < count:
            pair = (rng.randint(1, self.hostile.max_id), rng.randint(1, 3))
            if pair not in self.hostile.assigned and pair[0] not in self.held:
                pairs.append(pair)
        return pairs

    def ahead_pairs(self, count: int) -> list[tuple[int, int]]:
        """Outcomes ahead of time: attempt 1 of jobs just above the highest id it was ever assigned.

        Not yet claimed when sent (so never assigned to it): they must be stale. They are the
        jobs its next session is likely to be assigned, so they probe whether an outcome sent
        before an attempt existed can be recorded against it later.
        """
        top = max((job_id for job_id, _ in self.hostile.assigned), default=0)
        rng, pairs = self.hostile.rng, []
        while len(pairs) < count:
            pair = (min(self.hostile.max_id, top + rng.randint(1, 150)), 1)
            if pair not in self.hostile.assigned and pair[0] not in self.held:
                pairs.append(pair)
        return pairs

    def forge(self, pairs: list[tuple[int, int]]) -> list[str]:
        """Send made-up outcomes for `pairs`, wait for their acks; return the statuses."""
        frames = []
        for job_id, attempt in pairs:
            if self.hostile.rng.random() < 0.5:
                frames.append({"type": "done", "job_id": job_id, "attempt": attempt, "result": {"forged": True}})
            else:
                frames.append(
                    {
                        "type": "failed",
                        "job_id": job_id,
                        "attempt": attempt,
                        "error": "forged",
                        "retryable": self.hostile.rng.random() < 0.5,
                    }
                )
        for pair in pairs:
            self.acks.pop(pair, None)
        self.send(*frames)
        self.pump(10, until=lambda: all(pair in self.acks for pair in pairs))
        return [self.acks.get(pair, "none") for pair in pairs]

    def count_forged(self, pairs, statuses) -> None:
        self.stats["forged"] = self.stats.get("forged", 0) + len(pairs)
        self.stats["forged_stale"] = self.stats.get("forged_stale", 0) + statuses.count("stale")
        self.stats["forged_unacked"] = self.stats.get("forged_unacked", 0) + statuses.count("none")
        # An assign crossing a forged guess of the same pair makes it its own (recorded by rule 1): not a forgery.
        recorded = [
            pair for pair, status in zip(pairs, statuses) if status == "recorded" and pair not in self.hostile.assigned
        ]
        self.stats["forged_acked_recorded"] = self.stats.get("forged_acked_recorded", 0) + len(recorded)

    def steal(self, pairs: list[tuple[int, int]]) -> None:
        """Listed in ready.running: each must come back as a cancel (no re-lease of another crawler's job)."""
        if not pairs:
            return
        self.pump(15, until=lambda: all(pair in self.cancels for pair in pairs))
        taken = [pair for pair in pairs if pair not in self.cancels and pair not in self.hostile.assigned]
        self.stats["listed_foreign"] = len(pairs)
        self.stats["listed_cancelled"] = len(pairs) - len(taken)
        if taken:
            self.stats["stolen"] = len(taken)
            self.stats["stolen_pairs"] = taken[:20]

    # --- the behaviours ---
    def run_forge(self) -> None:
        rng = self.hostile.rng
        foreign = self.forged_pairs(rng.randint(10, 30))
        self.handshake(slots=rng.randint(0, 5), running=foreign)
        self.steal(foreign)
        for _ in range(rng.randint(1, 3)):
            pairs = self.forged_pairs(rng.randint(20, 60))
            self.count_forged(pairs, self.forge(pairs))
            self.pump(rng.uniform(0.05, 0.3))
        self.end_cleanly("hostile: done forging")

    def run_flood(self) -> None:
        self.handshake(slots=0, running=[])
        sent = 0
        try:
            # One burst past the limit, then outcomes ahead of time for the next thousand ids: the bus
            # reads both before it closes the session, and still records the second part afterwards.
            top = max((job_id for job_id, _ in self.hostile.assigned), default=0)
            ahead = [(job_id, 1) for job_id in range(top + 1, min(self.hostile.max_id, top + 1000) + 1)]
            pairs = self.forged_pairs(1100) + [pair for pair in ahead if pair not in self.hostile.assigned]
            self.send(
                *({"type": "failed", "job_id": j, "attempt": a, "error": "flood", "retryable": False} for j, a in pairs)
            )
            sent += len(pairs)
            while (
                sent < FLOOD_CAP
                and "too_many_stale" not in self.errors
                and self.stats.get("acks_stale", 0) <= FLOOD_UNCLOSED
            ):
                pairs = self.forged_pairs(150) + self.ahead_pairs(50)
                frames = [
                    {"type": "failed", "job_id": j, "attempt": a, "error": "flood", "retryable": False}
                    for j, a in pairs
                ]
                self.send(*frames)
                sent += len(frames)
                self.pump(0.02)
            self.pump(5, until=lambda: "too_many_stale" in self.errors)
        except Closed:
            self.drain()  # a send can fail before the bus's last frames (acks, the error) are read
        self.stats["flood_sent"] = sent
        if "too_many_stale" in self.errors:
            self.stats["too_many_stale"] = 1
        elif self.stats.get("acks_stale", 0) > FLOOD_UNCLOSED or sent >= FLOOD_CAP:
            self.stats["flood_not_closed"] = 1
        else:  # the connection went away first (a runbus SIGKILL, say): no verdict from this one
            self.stats["flood_cut"] = 1
        raise Closed("flood over")

    def run_trickle(self) -> None:
        rng = self.hostile.rng
        self.handshake(slots=rng.randint(2, 10), running=[])
        self.pump(rng.uniform(0.3, 1.0))
        self.freeze(len(self.held))  # nothing more arrives while it trickles (a lone suspect could)
        self.settle_lone()
        if not self.held:
            self.freeze(0)
        self.stats["trickle_held"] = len(self.held)
        self.beating = False
        started = time.monotonic()
        line = protocol.encode_frame(
            protocol.heartbeat_frame(running=[[j, a] for j, a in self.held.items()], padding="x" * 400)
        )[:-1]  # never the newline
        self.partial = True
        try:
            for byte in line:
                if time.monotonic() - started > TRICKLE_GIVE_UP:
                    break
                self.send_raw(bytes([byte]))
                self.pump(0.2)  # reads what the bus says (cancel, its heartbeats), sends nothing
        except Closed:
            self.stats["trickle_closed_after"] = round(time.monotonic() - started, 2)
            raise
        self.stats["trickle_survived"] = round(time.monotonic() - started, 2)
        raise Closed("trickle over")

    def run_crash(self) -> None:
        rng = self.hostile.rng
        previous, self.hostile.last_crash = list(self.hostile.last_crash), []
        self.handshake(slots=CRASH_SLOTS, running=previous)
        # Its own jobs of the last crash come back (re-lease) if nobody took them; a cancel says otherwise.
        for job_id, attempt in previous:
            self.held[job_id] = attempt
        self.stats["relisted_own"] = len(previous)
        # Wait for work (between two waves the queue is empty), then take what comes in a moment and go.
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and len([j for j in self.held if j in self.fresh]) < 2:
            self.pump(0.05)
            if len(self.held) == 1 and self.fresh:
                self.settle_lone()  # a lone assign: maybe a suspect, run alone; finish it, do not crash on it
        self.pump(rng.uniform(0.05, 0.3), until=lambda: len(self.held) >= CRASH_SLOTS)
        fresh = [job_id for job_id in self.held if job_id in self.fresh]
        if len(fresh) >= 2:  # in company for sure (a re-leased one may yet turn out cancelled)
            self.stats["crashed_holding"] = len(self.held)
            self.stats["relisted_kept"] = len(self.held) - len(fresh)
            self.hostile.save_last_crash(list(self.held.items()))
            if rng.random() < 0.5:  # the process dies: no bye, the kernel closes the socket
                self.stats["crash"] = "exit"
                self.hostile.write_stats(self.stats)
                os._exit(CRASH_EXIT)
            # Or the connection is reset (no bye) and the same process is back at once, listing the
            # jobs it just dropped in ready.running: the fastest way to take them again.
            self.stats["crash"] = "reset"
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            raise Closed("dropped the connection holding its jobs")
        self.stats["crash_skipped"] = len(self.held)  # too little to crash with
        self.end_cleanly("hostile: nothing to crash with")


class Hostile:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.max_id = args.max_id
        self.token = os.environ.get("BUS_TOKEN") or None
        self.stats_path = Path(args.stats)
        self.assigned_path = Path(args.assigned)
        self.assigned: set[tuple[int, int]] = set()
        if self.assigned_path.exists():
            for line in self.assigned_path.read_text().splitlines():
                job_id, attempt = line.split()
                self.assigned.add((int(job_id), int(attempt)))
        self._assigned_file = open(self.assigned_path, "a")
        crash_path = self.assigned_path.with_suffix(".crash")
        self.last_crash = [tuple(p) for p in json.loads(crash_path.read_text())] if crash_path.exists() else []
        if crash_path.exists():
            crash_path.unlink()
        self.terminating = False
        self.sessions = len(self.stats_path.read_text().splitlines()) if self.stats_path.exists() else 0
        self.current: Session | None = None

    def remember(self, pair: tuple[int, int]) -> None:
        if pair not in self.assigned:
            self.assigned.add(pair)
            self._assigned_file.write(f"{pair[0]} {pair[1]}\n")
            self._assigned_file.flush()
            os.fsync(self._assigned_file.fileno())  # before any forge could pick it (and before a crash)

    def save_last_crash(self, pairs) -> None:
        self.last_crash = [tuple(pair) for pair in pairs]  # for the next session of this process
        self.assigned_path.with_suffix(".crash").write_text(json.dumps(pairs))  # or of the next process

    def write_stats(self, stats: dict) -> None:
        with open(self.stats_path, "a") as out:
            out.write(json.dumps(stats) + "\n")
            out.flush()
            os.fsync(out.fileno())

    def on_term(self, *_):
        self.terminating = True
        if self.current is None:  # waiting in accept(): nothing held
            os._exit(0)

    def serve(self) -> None:
        path = self.args.listen
        try:
            os.unlink(path)  # a leftover of the previous (crashed) incarnation
        except FileNotFoundError:
            pass
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(path)
        server.listen(4)
        print(f"hostile.listening path={path} pid={os.getpid()}", flush=True)
        signal.signal(signal.SIGTERM, self.on_term)
        while not self.terminating:
            conn, _ = server.accept()
            mode = CYCLE[self.sessions % len(CYCLE)]
            self.sessions += 1
            session = Session(conn, self)
            session.stats["mode"] = mode
            self.current = session
            try:
                getattr(session, f"run_{mode}")()
            except Terminating:
                if session.partial:  # mid-frame: just go (it holds 0 or at least 2 jobs, see run_trickle)
                    session.stats["closed"] = "terminated mid-trickle"
                else:
                    try:
                        session.end_cleanly("hostile: terminated")
                        session.stats["closed"] = "terminated"
                    except (Closed, OSError) as exc:
                        session.stats["closed"] = f"terminated: {exc}"
            except Closed as exc:
                session.stats["closed"] = str(exc)
            except (OSError, protocol.FrameError) as exc:
                session.stats["closed"] = f"{exc.__class__.__name__}: {exc}"
            session.stats["errors"] = session.errors
            print(f"hostile.session {json.dumps(session.stats)}", flush=True)
            self.write_stats(session.stats)
            self.current = None
            try:
                conn.close()
            except OSError:
                pass
            if self.terminating:
                os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--max-id", type=int, required=True)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--stats", required=True)
    parser.add_argument("--assigned", required=True)
    Hostile(parser.parse_args()).serve()


if __name__ == "__main__":
    main()
