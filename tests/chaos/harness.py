"""Helpers of the chaos suite: a throwaway database, real processes, a cuttable socket, the invariant.

Everything here talks to the database with plain DB-API (sqlite3 / psycopg2):
the suite's own Django connection points at the pytest-django test database,
not at the one the chaos processes use.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent.parent
MANAGE = str(ROOT / "manage.py")
TERMINAL = ("succeeded", "failed", "cancelled")


def log(message: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- databases ------------------------------------------------------------------------------


class ChaosDatabase:
    """A database for the chaos processes, read by the test with raw SQL."""

    url: str
    kind: str
    _conn = None

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:
                pass
            self._conn = None

    def query(self, sql: str) -> list[tuple]:
        """Run a read-only query; reconnects (until a deadline) when the database was restarted."""
        deadline = time.monotonic() + 30
        while True:
            try:
                conn = self._connection()
                cursor = conn.cursor()
                cursor.execute(sql)
                rows = cursor.fetchall()
                cursor.close()
                return rows
            except Exception:
                self._drop()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def status_counts(self) -> dict[str, int]:
        return dict(self.query("SELECT status, count(*) FROM jobs_job GROUP BY status"))

    def unfinished(self) -> int:
        return self.query("SELECT count(*) FROM jobs_job WHERE status IN ('queued', 'running')")[0][0]

    def running(self) -> int:
        return self.query("SELECT count(*) FROM jobs_job WHERE status = 'running'")[0][0]

    def running_for_session(self, session: str) -> int:
        """Running jobs leased to a bus session (its UUID as text)."""
        value = uuid.UUID(session)
        stored = value.hex if self.kind == "sqlite" else str(value)  # Django's UUIDField: char(32) / uuid
        return self.query(f"SELECT count(*) FROM jobs_job WHERE status = 'running' AND lease_session = '{stored}'")[0][
            0
        ]

    def interrupt_reasons(self) -> dict[str, int]:
        """Interrupt events by the start of their reason (up to the first ':' or '(')."""
        counts: Counter = Counter()
        for reason, n in self.query(
            "SELECT reason, count(*) FROM jobs_jobevent WHERE kind = 'interrupt' GROUP BY reason"
        ):
            counts[re.sub(r"\d+", "N", reason.split(":")[0].split("(")[0].strip()[:60])] += n
        return dict(counts)

    def restart(self, down_for: float = 0.0) -> float:
        raise NotImplementedError

    def _connection(self):
        raise NotImplementedError

    def close(self) -> None:
        self._drop()


class SqliteChaosDatabase(ChaosDatabase):
    kind = "sqlite"

    def __init__(self, folder: Path):
        self.path = str(folder / "chaos.sqlite3")
        self.url = f"sqlite:///{self.path}"
        self._conn = None

    def _connection(self):
        if self._conn is None:
            # Autocommit: each SELECT is its own short read, never holding a lock.
            self._conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        return self._conn


class PostgresChaosDatabase(ChaosDatabase):
    kind = "postgresql"

    def __init__(self, server, name: str = "jobsite_chaos"):
        self.server = server  # tests.pg_instance.PrivatePostgres, started
        self.name = name
        server.create_database(name)
        self.url = server.database_url(name)
        self._conn = None

    def _connection(self):
        import psycopg2

        if self._conn is None:
            self._conn = psycopg2.connect(
                host="127.0.0.1", port=self.server.port, user="postgres", dbname=self.name, connect_timeout=5
            )
            self._conn.autocommit = True
        return self._conn

    def restart(self, down_for: float = 0.0) -> float:
        """Stop the private server (fast: every connection is cut), keep it down `down_for` s, start it.

        Returns the seconds it was unavailable.
        """
        self._drop()
        started = time.monotonic()
        self.server.stop("fast")
        time.sleep(down_for)
        self.server.start()
        return time.monotonic() - started


# --- a Unix socket proxy whose connections can be cut from outside ---------------------------


class UnixProxy:
    """Listens on `listen_path` and relays each connection to `upstream_path`.

    `cut()` closes both sides of every relayed connection: a real connection
    loss for both peers, while both processes stay alive.
    """

    def __init__(self, listen_path: str, upstream_path: str):
        self.listen_path, self.upstream_path = listen_path, upstream_path
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._stop = threading.Event()
        self._server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._server.bind(listen_path)
        self._server.listen(16)
        self._server.settimeout(0.2)
        self.connections = 0
        self._thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                upstream.settimeout(2.0)
                upstream.connect(self.upstream_path)
                upstream.settimeout(None)
            except OSError:  # the crawler is down: the bus sees the connection close and retries
                _close(client, upstream)
                continue
            with self._lock:
                self._pairs.append((client, upstream))
                self.connections += 1
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(
                    target=self._pump, args=(source, sink, client, upstream), daemon=True, name="chaos-proxy-pump"
                ).start()

    def _pump(self, source, sink, client, upstream) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        self._forget(client, upstream)

    def _forget(self, client, upstream) -> None:
        with self._lock:
            if (client, upstream) in self._pairs:
                self._pairs.remove((client, upstream))
        _close(client, upstream)

    def live(self) -> int:
        with self._lock:
            return len(self._pairs)

    def cut(self) -> int:
        """Close both sides of every relayed connection; return how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for client, upstream in pairs:
            _close(client, upstream)
        return len(pairs)

    def stop(self) -> None:
        self._stop.set()
        try:
            self._server.close()
        except OSError:
            pass
        self.cut()
        self._thread.join(2)
        try:
            os.unlink(self.listen_path)
        except OSError:
            pass


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            sock.close()
        except OSError:
            pass


# --- processes -----------------------------------------------------------------------------------


class Processes:
    """Every process of one chaos run: started here, logged to files, ended here by pid."""

    def __init__(self, folder: Path, database_url: str, extra_env: dict[str, str]):
        self.folder = folder
        self.started: list[subprocess.Popen] = []
        env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
        for name in ("BUS_ENDPOINTS", "SUPERVISOR_SOCKET_PATH", "SOCKET_PATH", "BUS_NODE", "BUS_TOKEN"):
            env.pop(name, None)
        env.update(
            DEBUG="true",
            SECRET_KEY="jobsite-chaos-tests-only",
            DATABASE_URL=database_url,
            BUS_AUTOSTART="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra_env)
        self.env = env

    def manage(self, *args: str, name: str) -> subprocess.Popen:
        return self.script(MANAGE, *args, name=name)

    def script(self, path: str, *args: str, name: str) -> subprocess.Popen:
        """Start a Python script (manage.py or another) with the suite's environment, its output in a log file."""
        log_path = self.folder / f"{name}-{len(self.started):03d}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, path, *args],
                cwd=ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        proc.log_path = str(log_path)  # type: ignore[attr-defined]
        proc.name = name  # type: ignore[attr-defined]
        self.started.append(proc)
        return proc

    def run(self, *args: str, name: str, timeout: float) -> str:
        """Run a manage.py command to completion; raise with its output if it fails."""
        proc = self.manage(*args, name=name)
        try:
            code = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
            raise AssertionError(f"manage.py {' '.join(args)} took over {timeout} s:\n{tail(proc.log_path)}") from None
        if code != 0:
            raise AssertionError(f"manage.py {' '.join(args)} exited {code}:\n{tail(proc.log_path)}")
        return Path(proc.log_path).read_text(errors="replace")

    @staticmethod
    def kill(proc: subprocess.Popen, timeout: float = 10.0) -> None:
        if proc.poll() is None:
            try:
                proc.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout)

    @staticmethod
    def terminate(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
        """SIGCONT + SIGTERM, wait; SIGKILL after the deadline.

        Returns the exit status (None if it had to be killed).
        """
        if proc.poll() is not None:
            return proc.returncode
        try:
            proc.send_signal(signal.SIGCONT)
            proc.send_signal(signal.SIGTERM)
            return proc.wait(timeout)
        except ProcessLookupError:
            return proc.poll()
        except subprocess.TimeoutExpired:
            Processes.kill(proc)
            return None

    def stop_all(self) -> None:
        for proc in self.started:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)
                    proc.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.started:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


def tail(path: str, lines: int = 40, skip: tuple[str, ...] = ()) -> str:
    """The last `lines` lines of a log, leaving out lines that contain any of `skip`."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    kept = [line for line in text.splitlines() if not any(word in line for word in skip)]
    return "\n".join(kept[-lines:])


_SESSION_RE = re.compile(r"event=crawler\.session\.(ready|closed) .*?\bsession=([0-9a-f-]{36})")


def live_session(proc: subprocess.Popen) -> str | None:
    """The bus session this crawler process says is open (its log: ready without closed), if any."""
    try:
        text = Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]
    except OSError:
        return None
    open_sessions: list[str] = []
    for event, session in _SESSION_RE.findall(text):
        if event == "ready":
            open_sessions.append(session)
        elif session in open_sessions:
            open_sessions.remove(session)
    return open_sessions[-1] if open_sessions else None


def wait_for_log(proc: subprocess.Popen, needle: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if needle in Path(proc.log_path).read_text(errors="replace"):  # type: ignore[attr-defined]
                return True
        except OSError:
            pass
        if proc.poll() is not None:
            return False
        time.sleep(0.05)
    return False


def short_folder() -> Path:
    """A temp folder with a short path: AF_UNIX socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix="jchaos-", dir="/tmp"))


def remove_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# --- the invariant ----------------------------------------------------------------------------------


@dataclass
class Verdict:
    jobs: int = 0
    by_status: dict[str, int] = field(default_factory=dict)
    events: Counter = field(default_factory=Counter)
    interruptions: int = 0
    poison: int = 0
    problems: list[str] = field(default_factory=list)
    offenders: dict[int, list[str]] = field(default_factory=dict)  # job id -> its trail, for the report

    @property
    def ok(self) -> bool:
        return not self.problems


# Allowed transitions by event kind: kind -> {from_status: {to_status, ...}}
TRANSITIONS = {
    "enqueue": {"": {"queued"}},
    "claim": {"queued": {"running"}},
    # A re-lease moves a job the crawler still runs to its new session: from the queue after a
    # reconnect, or straight from the earlier session's lease when a bus takes the crawler over.
    "re_lease": {"queued": {"running"}, "running": {"running"}},
    "outcome": {"running": {"succeeded", "failed", "queued"}, "queued": {"succeeded", "failed", "queued"}},
    "interrupt": {"running": {"queued", "failed"}},
    "cancel": {"queued": {"cancelled"}, "running": {"cancelled"}},
    "retry": {"failed": {"queued"}, "cancelled": {"queued"}},
}


def check_invariant(db: ChaosDatabase, max_problems: int = 50) -> Verdict:
    """Every job terminal exactly once, its trail a valid walk of the state machine, no lease left."""
    transitions = TRANSITIONS
    verdict = Verdict()
    jobs = db.query(
        "SELECT id, status, attempt, interruptions, outcome_attempt, lease_session, lease_expires_at "
        "FROM jobs_job ORDER BY id"
    )
    events = db.query(
        "SELECT job_id, id, kind, from_status, to_status, attempt, actor, reason FROM jobs_jobevent ORDER BY job_id, id"
    )
    trails: dict[int, list[tuple]] = defaultdict(list)
    for row in events:
        trails[row[0]].append(row)
        verdict.events[row[2]] += 1
    verdict.jobs = len(jobs)
    verdict.by_status = dict(Counter(row[1] for row in jobs))

    def problem(job_id: int, text: str) -> None:
        if len(verdict.problems) < max_problems:
            verdict.problems.append(f"job {job_id}: {text}")
        if len(verdict.offenders) < 5 and job_id not in verdict.offenders:
            verdict.offenders[job_id] = [
                f"  #{ev[1]} {ev[2]} {ev[3] or '-'}->{ev[4] or '-'} attempt={ev[5]} actor={ev[6]} {ev[7][:120]}"
                for ev in trails.get(job_id, [])
            ]

    known = {row[0] for row in jobs}
    for job_id in set(trails) - known:
        problem(job_id, "events for a job that does not exist")

    for job_id, status, attempt, interruptions, outcome_attempt, lease_session, lease_expires in jobs:
        verdict.interruptions += interruptions
        trail = trails.get(job_id, [])
        state, current, outcomes, interrupts, last = "", 0, [], 0, None
        for _, event_id, kind, from_status, to_status, ev_attempt, _actor, _reason in trail:
            if kind == "stale":  # an audit entry: no transition
                if from_status or to_status:
                    problem(job_id, f"stale event #{event_id} claims a transition {from_status}->{to_status}")
                continue
            allowed = transitions.get(kind)
            if allowed is None:
                problem(job_id, f"event #{event_id} of unknown kind {kind!r}")
                continue
            if from_status != state:
                problem(
                    job_id,
                    f"event #{event_id} {kind} starts from {from_status or '(new)'!r} "
                    f"but the job was {state or '(new)'!r}",
                )
            if to_status not in allowed.get(from_status, ()):
                problem(job_id, f"event #{event_id} {kind} {from_status or '(new)'}->{to_status} is not a legal move")
            if kind == "claim":
                if ev_attempt <= current:
                    problem(job_id, f"claim #{event_id} at attempt {ev_attempt} does not increase {current}")
                current = ev_attempt
            elif kind in ("re_lease", "outcome", "interrupt") and ev_attempt != current:
                problem(job_id, f"{kind} #{event_id} at attempt {ev_attempt}, but the latest claim is {current}")
            if kind == "outcome":
                outcomes.append(ev_attempt)
            if kind == "interrupt":
                interrupts += 1
            state, last = to_status, (kind, to_status)

        if status not in TERMINAL:
            problem(job_id, f"not terminal: {status}")
        if status != state:
            problem(job_id, f"status {status} but its last event leads to {state or '(nothing)'}")
        if attempt != current:
            problem(job_id, f"attempt {attempt} but its last claim was attempt {current}")
        if lease_session is not None or lease_expires is not None:
            problem(job_id, f"{status} job still has a lease ({lease_session}, {lease_expires})")
        if interruptions != interrupts:
            problem(job_id, f"interruptions={interruptions} but {interrupts} interrupt events")
        if len(outcomes) != len(set(outcomes)):
            problem(job_id, f"an attempt's outcome recorded twice: {outcomes}")
        if status == "succeeded":
            if len(outcomes) != 1:
                problem(job_id, f"succeeded with {len(outcomes)} recorded outcomes")
            elif last != ("outcome", "succeeded"):
                problem(job_id, f"succeeded but its last event is {last}")
            elif outcome_attempt != outcomes[0]:
                problem(job_id, f"outcome_attempt={outcome_attempt} but the outcome event is for {outcomes[0]}")
        elif status == "failed":
            if last == ("interrupt", "failed") and not outcomes:
                verdict.poison += 1
            elif last == ("outcome", "failed") and len(outcomes) == 1:
                pass
            else:
                problem(job_id, f"failed with last event {last} and {len(outcomes)} outcomes")
        elif status == "cancelled":
            problem(job_id, "cancelled, but nobody cancels jobs in this scenario")
    return verdict


def format_verdict(verdict: Verdict) -> str:
    lines = [f"jobs={verdict.jobs} by_status={verdict.by_status} events={dict(verdict.events)}"]
    if verdict.problems:
        lines.append(f"{len(verdict.problems)} problem(s) (first {min(len(verdict.problems), 50)}):")
        lines.extend(f"  {text}" for text in verdict.problems)
        for job_id, trail in verdict.offenders.items():
            lines.append(f"trail of job {job_id}:")
            lines.extend(trail)
    return "\n".join(lines)


def count_in_logs(paths: list[str], needles: list[str]) -> dict[str, int]:
    counts = dict.fromkeys(needles, 0)
    for path in paths:
        try:
            text = Path(path).read_text(errors="replace")
        except OSError:
            continue
        for needle in needles:
            counts[needle] += text.count(needle)
    return counts


def describe(proc: subprocess.Popen) -> dict[str, Any]:
    return {
        "pid": proc.pid,
        "name": getattr(proc, "name", "?"),
        "returncode": proc.poll(),
        "log": getattr(proc, "log_path", None),
    }


# --- the hostile crawler: what it says it did, and what the database says it could not do ------------

STALE_AUDIT_PER_SESSION = 100  # bus/session.py: the stale outcomes of one session audited one by one


def hostile_stats(path: Path) -> tuple[dict[str, int], list[dict]]:
    """The hostile crawler's per-session JSON lines, summed; and the lines that show a finding."""
    totals: Counter = Counter()
    findings = []
    try:
        lines = path.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        stats = json.loads(line)
        totals["sessions"] += 1
        totals[f"mode_{stats.get('mode')}"] += 1
        for key, value in stats.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "pid":
                totals[key] += value
        if "crashed_holding" in stats:
            totals["crashes"] += 1
            totals[f"crashes_{stats.get('crash')}"] += 1
        if any(key in stats for key in ("stolen", "flood_not_closed", "trickle_survived")):
            findings.append(stats)
    return dict(totals), findings


@dataclass
class HostileVerdict:
    sessions: int = 0
    too_many_stale: int = 0  # hostile sessions closed with that error
    summarised: int = 0  # hostile sessions whose close reason sums up unaudited stale outcomes
    stale_events: int = 0  # audit events written for the hostile sessions
    max_stale_per_session: int = 0
    hostile_outcomes: int = 0  # outcomes recorded from hostile sessions (of jobs it was assigned)
    hostile_claims: int = 0
    suspects: int = 0  # jobs that reached max_interruptions in company (run alone next)
    suspects_by_hostile: int = 0  # ... of which at the end of a hostile session
    interruptions: dict[int, int] = field(default_factory=dict)  # interruptions -> jobs
    problems: list[str] = field(default_factory=list)


def _uuid_key(value: Any) -> str | None:
    return None if value is None else uuid.UUID(str(value)).hex


def check_hostile(db: ChaosDatabase, endpoint_suffix: str) -> HostileVerdict:
    """From the database alone: the hostile crawler's sessions recorded nothing that was not theirs.

    - an outcome event's session and the session that claimed (or re-leased) that attempt are
      sessions of the same crawler endpoint (outcome authority); for the hostile crawler: an
      outcome from a hostile session is one of an attempt assigned to a hostile session;
    - a re-lease to a session is of an attempt first claimed by a session of the same endpoint
      (ready.running cannot take another crawler's job);
    - at most STALE_AUDIT_PER_SESSION stale events per hostile session;
    - no job ends failed (the honest crawlers finish every job; a crash holding many fails none).
    """
    verdict = HostileVerdict()
    endpoint_of: dict[str, str] = {}
    hostile: set[str] = set()
    connected_at: dict[str, Any] = {}
    for session, endpoint, close_reason, connected in db.query(
        "SELECT session, endpoint, close_reason, connected_at FROM bus_bussession"
    ):
        key = _uuid_key(session)
        endpoint_of[key] = endpoint
        connected_at[key] = connected
        if endpoint.endswith(endpoint_suffix):
            hostile.add(key)
            verdict.too_many_stale += "too_many_stale" in (close_reason or "")
            verdict.summarised += "not audited one by one" in (close_reason or "")
    verdict.sessions = len(hostile)
    if not hostile:
        verdict.problems.append(f"no bus session with an endpoint ending in {endpoint_suffix}")

    def problem(text: str) -> None:
        if len(verdict.problems) < 30:
            verdict.problems.append(text)

    claimed: dict[tuple[int, int], str | None] = {}
    stale_per_session: Counter = Counter()
    rows = db.query(
        "SELECT job_id, id, kind, to_status, attempt, session, reason FROM jobs_jobevent "
        "WHERE kind IN ('claim', 're_lease', 'outcome', 'stale', 'interrupt') ORDER BY job_id, id"
    )
    for job_id, event_id, kind, to_status, attempt, session, reason in rows:
        key = _uuid_key(session)
        if kind == "claim":
            claimed[(job_id, attempt)] = key
            verdict.hostile_claims += key in hostile
        elif kind == "stale":
            if key in hostile:
                stale_per_session[key] += 1
        elif kind == "interrupt":
            if "shared its session" in (reason or ""):
                verdict.suspects += 1
                verdict.suspects_by_hostile += key in hostile
        else:  # outcome, re_lease: only from a session of the crawler the attempt was claimed by
            owner = claimed.get((job_id, attempt))
            if kind == "outcome" and key in hostile:
                verdict.hostile_outcomes += 1
            if key is None or owner is None:
                problem(
                    f"job {job_id}: {kind} #{event_id} attempt {attempt} session={key} but the attempt "
                    f"was claimed by session {owner}"
                )
                continue
            if endpoint_of.get(key) != endpoint_of.get(owner):
                who = "the HOSTILE crawler" if key in hostile else "a crawler"
                problem(
                    f"job {job_id}: {kind} #{event_id} -> {to_status} for attempt {attempt} from {who} "
                    f"(session {key}, {endpoint_of.get(key)}), but that attempt was claimed by session "
                    f"{owner} ({endpoint_of.get(owner)}): "
                    + (
                        "an outcome recorded from a crawler that was never assigned it"
                        if kind == "outcome"
                        else "another crawler's job taken through ready.running"
                    )
                )
            elif (
                kind == "outcome"
                and key != owner
                and connected_at.get(key) is not None
                and connected_at.get(owner) is not None
                and connected_at[key] < connected_at[owner]
            ):
                # PROTOCOL.md rule 1: "leased to this session or to an EARLIER session with the same
                # crawler endpoint (a resend after a reconnect)". An outcome from a session older than
                # the one the attempt was claimed by was sent before that attempt existed: it cannot be
                # about that attempt (a guess of the next attempt number), yet it was recorded.
                who = "the HOSTILE crawler's" if key in hostile else "a crawler's"
                problem(
                    f"job {job_id}: outcome #{event_id} -> {to_status} for attempt {attempt} recorded from "
                    f"{who} session {key} (connected {connected_at.get(key)}), which is OLDER than session "
                    f"{owner} (connected {connected_at.get(owner)}) that attempt {attempt} was claimed by: an "
                    "outcome sent before its attempt existed was recorded against it (the session-order "
                    "check of jobs/services.py _stale_reason, see tests/chaos/test_outcome_before_attempt.py)"
                )
    verdict.stale_events = sum(stale_per_session.values())
    verdict.max_stale_per_session = max(stale_per_session.values(), default=0)
    for key, count in stale_per_session.items():
        if count > STALE_AUDIT_PER_SESSION:
            problem(f"hostile session {key} has {count} stale audit events (the bound is {STALE_AUDIT_PER_SESSION})")
    verdict.interruptions = dict(db.query("SELECT interruptions, count(*) FROM jobs_job GROUP BY interruptions"))
    for job_id, error in db.query("SELECT id, error FROM jobs_job WHERE status = 'failed' ORDER BY id"):
        problem(f"job {job_id} ended failed: {str(error)[:200]}")
    return verdict


# --- the crawlers' own connection logs (runcrawler --connection-log) -------------------------------


def read_connection_log(path: str | Path) -> list[dict]:
    """The JSON lines of one crawler's --connection-log (a line cut short by a kill is left out)."""
    try:
        lines = Path(path).read_text(errors="replace").split("\n")[:-1]  # whole lines only
    except OSError:
        return []
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:  # a line a kill cut short, with the next run's first line appended to it
            continue
    return events


def session_overlaps(events: list[dict], killed: dict[str, float] | None = None) -> tuple[list[str], list[float]]:
    """Each moment a session to this crawler became ready while another one to it was still open.

    A session is open from its `ready` (handshake done) to its `close`, as the crawler itself saw
    them: the rule of the fleet (issue 10) is that no two are open at once. One case is told
    apart: `killed` maps a bus node name (hello's `node`, host:pid by default) to the time it was
    SIGKILLed; a session of a bus killed before the new session was ready is dead already, the
    crawler just has not read its connection's end yet. Those are not problems; what is returned
    for them is how long after the new session's `ready` the crawler noticed (seconds).

    Returns (problems, lags).
    """
    killed = killed or {}
    found: list[str] = []
    lags: list[float] = []
    open_now: dict[str, Any] = {}
    late: dict[str, float] = {}  # an excused dead session -> the ready it overlapped
    for event in events:
        if event.get("event") == "ready":
            alive = {
                session: peer
                for session, peer in open_now.items()
                if not (peer in killed and killed[peer] <= event["t"])
            }
            for session in set(open_now) - set(alive):
                late.setdefault(session, event["t"])
            if alive:
                others = ", ".join(f"{session} (bus {peer})" for session, peer in alive.items())
                found.append(
                    f"t={event['t']:.3f}: session {event['session']} (bus {event.get('peer')}) ready while "
                    f"{others} still open"
                )
            open_now[event["session"]] = event.get("peer")
        elif event.get("event") == "close":
            session = event.get("session")
            open_now.pop(session, None)
            if session in late:
                lags.append(event["t"] - late.pop(session))
    return found, lags


def suite_database() -> str:
    """ "postgresql" or "sqlite": the database of this pytest run (each chaos variant runs in its own)."""
    from django.conf import settings

    engine = settings.DATABASES["default"]["ENGINE"]
    return "postgresql" if "postgresql" in engine else "sqlite"
