"""The chaos suite (issue 4): 5,000 jobs through runbus and two reference crawlers while
everything that can fail does, then the invariant checked from the database alone.

Faults (random choices seeded: CHAOS_SEED=N reuses them; the timing is the machine's):
- a random crawler SIGKILLed every 1-3 s and restarted on the same socket;
- one crawler SIGSTOPped for longer than 2 x HEARTBEAT_TIMEOUT, then SIGCONTed;
- one connection cut from outside (crawler b sits behind an in-test Unix proxy);
- runbus SIGKILLed twice and restarted (start-up recovery + lease sweeper);
- PostgreSQL restarted once (PostgreSQL variant only: a private server);
- a hostile crawler (tests/chaos/hostile_crawler.py) on a third endpoint, holding the
  same valid token as the honest ones: it forges outcomes of jobs it was never assigned,
  lists other crawlers' jobs in ready.running, floods stale outcomes until it is closed
  (too_many_stale), trickles bytes without completing a frame, and crashes (process exit
  or connection reset, no bye) holding up to 20 jobs, again and again, relisting them.

The 5,000 jobs arrive in 10 waves of `manage.py enqueue --file` during the faults, so
that every fault meets work in flight. The crawlers run with --resume-grace, so lost
sessions also produce late results (fencing rule 3) and stale acks.

The invariant: every job terminal; each succeeded job has exactly one recorded
outcome; failed jobs are poison (a final interrupt) or have one failed outcome;
every trail replays through the state machine; no lease left. Since the hostile
crawler (issue 9), also: every job succeeded (no job failed, as poison or otherwise);
every recorded outcome and every re-lease came from a session of the endpoint that
was assigned that attempt (none from the hostile crawler's sessions for another
crawler's attempt); at most 100 stale audit events per hostile session; at least one
hostile session closed for too_many_stale; no trickle that kept a session alive.

Each variant runs on its own throwaway database (a temp SQLite file; a private
PostgreSQL in a temp folder), not on pytest-django's test database, and only on
the suite run of the same database, so `./bin/test` runs each exactly once.

CHAOS_KEEP=1 keeps the run's folder (process logs, the SQLite file) when it fails,
CHAOS_KEEP=always even when it passes (the private PostgreSQL is always destroyed).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests import pg_instance
from tests.chaos.harness import (
    STALE_AUDIT_PER_SESSION,
    PostgresChaosDatabase,
    Processes,
    SqliteChaosDatabase,
    UnixProxy,
    check_hostile,
    check_invariant,
    count_in_logs,
    format_verdict,
    hostile_stats,
    live_session,
    log,
    remove_folder,
    short_folder,
    suite_database,
    tail,
    wait_for_log,
)

# Jobs arrive in waves (one `manage.py enqueue --file` each, back to back) so that the faults
# keep finding work in flight: the bus finishes 1,000 jobs in a few seconds here.
WAVES = 10
WAVE = 500
WAVE_EVERY = 3.0  # seconds between waves (later when an enqueue takes longer)
IN_FLIGHT = 30  # a one-off fault waits (up to 3 s) for at least this many running jobs
# After which wave lands each one-off fault is injected (the PostgreSQL restart only on PostgreSQL).
ONE_OFFS = {1: "sigstop", 3: "cut", 5: "bus_kill", 7: "pg_restart", 9: "bus_kill"}
JOBS = WAVES * WAVE
SLOTS = 50
HEARTBEAT_TIMEOUT = 1.0
HARD_DEADLINE = 240.0  # seconds for the whole scenario, set-up to verdict
FAULT_PHASE = 30.0  # crawler kills go on at least this long, and until every wave and one-off fault is done
FAULT_WINDOW = 100.0  # the most the fault phase may last (waves are slow when the machine is busy)
DRAIN_TIMEOUT = 90.0
STOP_FOR = 2 * 2 * HEARTBEAT_TIMEOUT  # SIGSTOP: twice the silence that loses a session
# The crawlers keep a lost session's jobs this long for the next session (ready.running): a cut
# connection, a killed bus or a SIGCONTed crawler then exercises re-lease, late results (rule 3)
# and stale outcomes, not only requeue-and-run-again.
RESUME_GRACE = 2.0
PG_DOWN = 2.0  # seconds PostgreSQL stays down in its restart

HOSTILE_SCRIPT = str(Path(__file__).resolve().parent / "hostile_crawler.py")
HOSTILE_CRASH_EXIT = 17  # hostile_crawler.CRASH_EXIT

BUS_ENV = {
    "HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
    # Every crawler, the hostile one included, holds the valid token: the hostile crawler is an insider.
    "BUS_TOKEN": "chaos-shared-token-held-by-every-crawler",
    "BUS_BACKOFF_CAP": "0.5",
    "BUS_SWEEP_INTERVAL": "1",
    "LOG_LEVEL": "INFO",
}


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_sqlite():
    if suite_database() != "sqlite":
        pytest.skip("the SQLite chaos run belongs to the SQLite suite run")
    ChaosRun("sqlite").run()


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_chaos_postgresql():
    if suite_database() != "postgresql":
        pytest.skip("the PostgreSQL chaos run belongs to the PostgreSQL suite run")
    if not pg_instance.available():
        pytest.skip("PostgreSQL server binaries (initdb) are not installed")
    ChaosRun("postgresql").run()


class ChaosRun:
    def __init__(self, kind: str):
        self.kind = kind
        self.seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1, 10**6))
        self.rng = random.Random(self.seed)
        self.started = time.monotonic()
        self.deadline = self.started + HARD_DEADLINE
        self.folder = short_folder()
        self.server = None
        self.db = None
        self.procs: Processes | None = None
        self.proxy: UnixProxy | None = None
        self.crawlers: dict = {}
        self.bus = None
        self.sockets = {"a": str(self.folder / "a.sock"), "b": str(self.folder / "b-real.sock")}
        self.hostile_socket = str(self.folder / "h.sock")
        # b through the proxy; h is the hostile crawler's own endpoint
        self.endpoints = [self.sockets["a"], str(self.folder / "b.sock"), self.hostile_socket]
        self.hostile = None
        self.hostile_exits: list[int | None] = []
        self.counts = {
            "crawler_kills": 0,
            "bus_kills": 0,
            "sigstops": 0,
            "cuts": 0,
            "pg_restarts": 0,
            "idle_one_offs": 0,
            "hostile_crashes": 0,
            "hostile_restarts": 0,
        }
        self.timeline: list[str] = []

    # --- helpers --------------------------------------------------------------------------
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        line = f"t={self.elapsed():6.1f}s {text}"
        self.timeline.append(line)
        log(line)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def start_crawler(self, name: str):
        proc = self.procs.manage(
            "runcrawler",
            "--listen",
            self.sockets[name],
            "--slots",
            str(SLOTS),
            "--noop",
            "--noop-delay-ms",
            "0-50",
            "--resume-grace",
            str(RESUME_GRACE),
            "--name",
            f"chaos-{name}",
            name=f"crawler-{name}",
        )
        self.crawlers[name] = proc
        return proc

    def start_hostile(self):
        proc = self.procs.script(
            HOSTILE_SCRIPT,
            "--listen",
            self.hostile_socket,
            "--max-id",
            str(JOBS),
            "--seed",
            str(self.rng.randrange(1, 10**9)),
            "--stats",
            str(self.folder / "hostile-stats.jsonl"),
            "--assigned",
            str(self.folder / "hostile-assigned.txt"),
            name="hostile",
        )
        self.hostile = proc
        return proc

    def restart_hostile_if_gone(self) -> None:
        """The hostile crawler exits by itself when it crashes on purpose (holding jobs): start it again."""
        if self.hostile is None or self.hostile.poll() is None:
            return
        code = self.hostile.returncode
        self.hostile_exits.append(code)
        if code == HOSTILE_CRASH_EXIT:
            self.counts["hostile_crashes"] += 1
        else:  # anything else is a bug of the hostile crawler itself: shown in the report
            self.note(f"hostile crawler exited {code}:\n{tail(self.hostile.log_path, 20)}")
        self.counts["hostile_restarts"] += 1
        self.start_hostile()

    def start_bus(self):
        args = ["runbus"]
        for endpoint in self.endpoints:
            args += ["--endpoint", endpoint]
        self.bus = self.procs.manage(*args, name="runbus")
        return self.bus

    # --- the scenario ------------------------------------------------------------------------
    def run(self) -> None:
        log(f"{self.kind}: seed {self.seed} (CHAOS_SEED={self.seed} reuses the random choices), folder {self.folder}")
        ok = False
        try:
            self.set_up()
            fault_started = time.monotonic()
            self.inject_faults()
            fault_seconds = time.monotonic() - fault_started
            drained, drain_seconds = self.drain()
            self.stop_everything()
            verdict = check_invariant(self.db)
            self.reasons = self.db.interrupt_reasons()
            hostile = check_hostile(self.db, "/h.sock")
            said, findings = hostile_stats(self.folder / "hostile-stats.jsonl")
            self.report(verdict, fault_seconds, drain_seconds)
            self.report_hostile(hostile, said)
            assert drained, (
                f"jobs still unfinished {DRAIN_TIMEOUT:.0f} s after the faults stopped: "
                f"{verdict.by_status}\n{self.diagnostics(verdict)}"
            )
            assert verdict.ok, f"the invariant is broken:\n{self.diagnostics(verdict)}"
            assert verdict.jobs == JOBS, f"expected {JOBS} jobs, found {verdict.jobs}"
            # The SIGSTOP hit a crawler holding jobs: the bus must have lost that session to silence.
            assert self.reasons.get("heartbeat timeout"), (
                f"no job was requeued by a heartbeat timeout: {self.reasons}\n{self.diagnostics(verdict)}"
            )
            self.assert_hostile_contained(verdict, hostile, said, findings)
            ok = True
        finally:
            keep = os.environ.get("CHAOS_KEEP", "")
            self.tear_down(keep=keep == "always" or (keep == "1" and not ok))

    def set_up(self) -> None:
        if self.kind == "postgresql":
            self.server = pg_instance.PrivatePostgres()
            self.server.start()
            self.db = PostgresChaosDatabase(self.server)
        else:
            self.db = SqliteChaosDatabase(self.folder)
        self.procs = Processes(self.folder, self.db.url, BUS_ENV)
        self.procs.run("migrate", "--noinput", name="migrate", timeout=150)
        wave = self.enqueue_wave(0)
        assert wave.wait(120) == 0, f"enqueue exited {wave.returncode}:\n{tail(wave.log_path)}"
        counts = self.db.status_counts()
        assert counts == {"queued": WAVE}, f"after enqueue: {counts}"
        self.note(f"set-up done: database {self.db.url}, wave 0: {WAVE} jobs queued")

        for name in self.sockets:
            self.start_crawler(name)
        for name, proc in self.crawlers.items():
            assert wait_for_log(proc, "crawler.listening", timeout=60), (
                f"crawler {name} did not start listening:\n{tail(proc.log_path)}"
            )
        self.start_hostile()
        assert wait_for_log(self.hostile, "hostile.listening", timeout=30), (
            f"the hostile crawler did not start listening:\n{tail(self.hostile.log_path)}"
        )
        self.proxy = UnixProxy(self.endpoints[1], self.sockets["b"])
        self.start_bus()
        assert wait_for_log(self.bus, "bus.session_ready", timeout=60), (
            f"runbus made no session:\n{tail(self.bus.log_path)}"
        )
        self.note("crawlers a (direct) and b (behind the proxy), the hostile crawler h and runbus are up")

    def enqueue_wave(self, number: int):
        """`manage.py enqueue --file` of one wave, in the background; returns the process."""
        urls = self.folder / f"urls-{number}.txt"
        first = number * WAVE
        urls.write_text("".join(f"https://example.com/chaos/{i}\n" for i in range(first, first + WAVE)))
        return self.procs.manage("enqueue", "--file", str(urls), name=f"enqueue-{number}")

    def inject_faults(self) -> None:
        """Crawler kills every 1-3 s; a wave of jobs every WAVE_EVERY s; the one-offs after the waves of ONE_OFFS.

        The one-offs follow the waves so each hits a system with a wave's worth
        of work in flight, however fast this machine happens to be today.
        """
        rng = self.rng
        t0 = time.monotonic()
        one_offs = [what for _, what in sorted(ONE_OFFS.items()) if what != "pg_restart" or self.kind == "postgresql"]
        waves = [(number, number * WAVE_EVERY) for number in range(1, WAVES)]  # wave 0 was set-up's
        enqueuing = None  # (number, proc)
        landed = 1  # waves whose jobs are in the database
        one_off_due = None
        next_kill = rng.uniform(1, 3)
        stopped = None  # (name, proc, until)
        last_sample = -10.0
        unfinished = JOBS

        while True:
            t = time.monotonic() - t0
            if t >= FAULT_WINDOW or self.remaining() < DRAIN_TIMEOUT + 30:
                break
            if t >= FAULT_PHASE and not one_offs and stopped is None and not waves and enqueuing is None:
                break
            self.restart_hostile_if_gone()
            if t - last_sample >= 0.25:
                last_sample = t
                unfinished = self.db.unfinished()
            if waves and enqueuing is None and t >= waves[0][1]:
                number, _ = waves.pop(0)
                enqueuing = (number, self.enqueue_wave(number))
            if enqueuing is not None and enqueuing[1].poll() is not None:
                number, proc = enqueuing
                assert proc.returncode == 0, (
                    f"enqueue of wave {number} exited {proc.returncode}:\n{tail(proc.log_path)}"
                )
                enqueuing, landed = None, landed + 1
                if number in ONE_OFFS and (ONE_OFFS[number] != "pg_restart" or self.kind == "postgresql"):
                    one_off_due = t  # armed: goes off once the wave is being worked on
                self.note(f"wave {number}: {WAVE} more jobs queued [{unfinished} unfinished]")
            if stopped is not None and t >= stopped[2]:
                name, proc, _ = stopped
                proc.send_signal(signal.SIGCONT)
                stopped = None
                self.note(f"SIGCONT crawler {name} (pid {proc.pid})")
            if one_offs and stopped is None and one_off_due is not None and t >= one_off_due:
                # Wait (a little) until the bus holds leases, so the fault hits work in flight.
                running = self.db.running()
                if running < IN_FLIGHT and t < one_off_due + 3.0:
                    time.sleep(0.02)
                    continue
                what = one_offs[0]
                unfinished = self.db.unfinished()
                state = f"[{running} running, {unfinished} unfinished]"
                if what == "sigstop":
                    # A crawler process whose own session holds jobs: stopping one that is still
                    # starting, or whose session the bus already dropped, would test nothing.
                    candidates = []
                    for name in sorted(self.crawlers):
                        session = live_session(self.crawlers[name])
                        if session and self.db.running_for_session(session) >= 10:
                            candidates.append(name)
                    if not candidates:  # wait for one (the fault window bounds the wait)
                        time.sleep(0.05)
                        continue
                    name = rng.choice(candidates)
                    proc = self.crawlers[name]
                    proc.send_signal(signal.SIGSTOP)
                    stopped = (name, proc, t + STOP_FOR)
                    self.counts["sigstops"] += 1
                    self.note(f"SIGSTOP crawler {name} (pid {proc.pid}) for {STOP_FOR:.1f} s {state}")
                elif what == "cut":
                    cut = self.proxy.cut()
                    if not cut:  # crawler b is between incarnations: try again shortly
                        time.sleep(0.05)
                        continue
                    self.counts["cuts"] += cut
                    self.note(f"cut {cut} proxied connection(s) to crawler b from outside {state}")
                elif what == "bus_kill":
                    old = self.bus
                    Processes.kill(old)
                    self.counts["bus_kills"] += 1
                    self.start_bus()
                    self.note(f"SIGKILL runbus (pid {old.pid}); restarted as pid {self.bus.pid} {state}")
                elif what == "pg_restart":
                    took = self.db.restart(down_for=PG_DOWN)
                    self.counts["pg_restarts"] += 1
                    self.note(f"restarted PostgreSQL (unavailable for {took:.1f} s) {state}")
                if running == 0:
                    self.counts["idle_one_offs"] += 1
                one_offs.pop(0)
                one_off_due = None  # the next one waits for the next wave
                if not waves and enqueuing is None and one_offs:  # more one-offs than waves: space them out
                    one_off_due = time.monotonic() - t0 + 2.0
                continue
            if t >= next_kill:
                names = sorted(name for name in self.crawlers if stopped is None or name != stopped[0])
                name = rng.choice(names)
                old = self.crawlers[name]
                Processes.kill(old)
                self.counts["crawler_kills"] += 1
                new = self.start_crawler(name)
                self.note(
                    f"SIGKILL crawler {name} (pid {old.pid}); restarted as pid {new.pid} [{unfinished} unfinished]"
                )
                next_kill = t + rng.uniform(1, 3)
            time.sleep(0.05)
        if stopped is not None:  # never leave a process stopped
            stopped[1].send_signal(signal.SIGCONT)
        # The hostile crawler stops with the faults (SIGTERM: it finishes what it holds, says bye).
        self.restart_hostile_if_gone()
        code = Processes.terminate(self.hostile, timeout=10)
        self.hostile_exits.append(code)
        self.note(f"hostile crawler stopped (exit {code})")
        missing = one_offs + [f"wave {number}" for number, _ in waves]
        if enqueuing is not None:
            missing.append(f"wave {enqueuing[0]} (still enqueuing)")
        assert not missing, f"not done within the fault window: {missing}; timeline:\n" + "\n".join(self.timeline)
        self.note(f"faults stopped: {self.counts}")

    def drain(self) -> tuple[bool, float]:
        started = time.monotonic()
        deadline = started + min(DRAIN_TIMEOUT, self.remaining() - 20)
        last_note = started
        while True:
            unfinished = self.db.unfinished()
            if unfinished == 0:
                took = time.monotonic() - started
                self.note(f"drained in {took:.1f} s")
                return True, took
            now = time.monotonic()
            if now >= deadline:
                self.note(f"NOT drained after {now - started:.1f} s: {self.db.status_counts()}")
                return False, now - started
            if now - last_note >= 5:
                last_note = now
                self.note(f"draining: {self.db.status_counts()}")
            for name, proc in self.crawlers.items():  # a crawler that died by itself is a finding
                if proc.poll() is not None:
                    self.note(f"crawler {name} exited by itself ({proc.returncode}):\n{tail(proc.log_path, 20)}")
                    self.start_crawler(name)
            if self.bus.poll() is not None:
                self.note(f"runbus exited by itself ({self.bus.returncode}):\n{tail(self.bus.log_path, 20)}")
                self.start_bus()
            time.sleep(0.2)

    def stop_everything(self) -> None:
        code = Processes.terminate(self.bus, timeout=10)
        self.bus_exit = code
        crawler_codes = {name: Processes.terminate(proc, timeout=10) for name, proc in self.crawlers.items()}
        self.note(f"stopped: runbus exit {code}, crawlers {crawler_codes}")

    def report(self, verdict, fault_seconds: float, drain_seconds: float) -> None:
        bus_logs = [p.log_path for p in self.procs.started if p.name == "runbus"]
        found = count_in_logs(
            bus_logs,
            ["level=error", "exc=", "bus.db_error", "bus.heartbeat_timeout", "bus.recovered_session", "bus.re_leased"],
        )
        lines = [
            f"CHAOS {self.kind}: seed={self.seed} duration={self.elapsed():.1f}s "
            f"(faults {fault_seconds:.1f}s, drain {drain_seconds:.1f}s)",
            f"  jobs={verdict.jobs} succeeded={verdict.by_status.get('succeeded', 0)} "
            f"failed={verdict.by_status.get('failed', 0)} (poison={verdict.poison}) "
            f"other={ {k: v for k, v in verdict.by_status.items() if k not in ('succeeded', 'failed')} }",
            f"  interruptions={verdict.interruptions} stale_acks={verdict.events.get('stale', 0)} "
            f"re_leases={verdict.events.get('re_lease', 0)} claims={verdict.events.get('claim', 0)} "
            f"outcomes={verdict.events.get('outcome', 0)}",
            f"  crawler_kills={self.counts['crawler_kills']} bus_kills={self.counts['bus_kills']} "
            f"sigstops={self.counts['sigstops']} cuts={self.counts['cuts']} pg_restarts={self.counts['pg_restarts']} "
            f"idle_one_offs={self.counts['idle_one_offs']} runbus_exit={self.bus_exit}",
            f"  interrupt reasons: {self.reasons}",
            f"  bus logs: {found}",
            f"  verdict: {'OK' if verdict.ok else 'BROKEN'}",
        ]
        print("\n".join(lines), flush=True)

    def report_hostile(self, hostile, said: dict) -> None:
        modes = {k[5:]: v for k, v in said.items() if k.startswith("mode_")}
        lines = [
            f"  hostile crawler: sessions={said.get('sessions', 0)} {modes} crashes holding jobs="
            f"{said.get('crashes', 0)} (process exits {self.counts['hostile_crashes']}, connection resets "
            f"{said.get('crashes_reset', 0)}) exit codes={self.hostile_exits}",
            f"    forged={said.get('forged', 0)} (stale {said.get('forged_stale', 0)}, acked recorded as "
            f"already recorded {said.get('forged_acked_recorded', 0)}, unacked {said.get('forged_unacked', 0)}) "
            f"flood_sent={said.get('flood_sent', 0)} stale_acks={said.get('acks_stale', 0)} "
            f"foreign_acked_recorded={said.get('foreign_acked_recorded', 0)}",
            f"    listed_foreign={said.get('listed_foreign', 0)} cancelled={said.get('listed_cancelled', 0)} "
            f"stolen={said.get('stolen', 0)} relisted_own={said.get('relisted_own', 0)} "
            f"relisted_kept={said.get('relisted_kept', 0)} "
            f"crashed_holding={said.get('crashed_holding', 0)} finished_own={said.get('finished_own', 0)} "
            f"lone_finished={said.get('lone_finished', 0)}",
            f"    trickles closed after {said.get('trickle_closed_after', 0):.1f}s in total, "
            f"survived={said.get('trickle_survived', 0)}",
            f"  database: hostile sessions={hostile.sessions} closed too_many_stale={hostile.too_many_stale} "
            f"summarised={hostile.summarised} stale_events={hostile.stale_events} "
            f"(max {hostile.max_stale_per_session}/session) hostile_claims={hostile.hostile_claims} "
            f"hostile_outcomes={hostile.hostile_outcomes} suspects={hostile.suspects} "
            f"(after a hostile session {hostile.suspects_by_hostile}) jobs by interruptions={hostile.interruptions}",
            f"  hostile verdict: {'OK' if not hostile.problems else 'BROKEN'}",
        ]
        print("\n".join(lines), flush=True)

    def assert_hostile_contained(self, verdict, hostile, said: dict, findings: list[dict]) -> None:
        """What one crawler holding a valid token must not have achieved (issue 9), from the database
        (and, for what leaves no row, from what the hostile crawler saw on the wire)."""
        where = f"\n{self.diagnostics(verdict)}"
        assert not hostile.problems, "the hostile crawler got through:\n  " + "\n  ".join(hostile.problems) + where
        assert verdict.by_status == {"succeeded": JOBS} and verdict.poison == 0, (
            f"not every job succeeded exactly once: {verdict.by_status}, poison={verdict.poison}{where}"
        )
        assert not findings, f"the hostile crawler reports what it got away with: {findings}{where}"
        # It did what it came for (the sessions follow a fixed cycle: each behaviour comes up early).
        assert hostile.sessions >= 7 and said.get("sessions", 0) >= 7, (hostile.sessions, said)
        assert said.get("forged_stale", 0) > 0, said
        assert said.get("listed_foreign", 0) > 0 and said.get("stolen", 0) == 0, said
        assert hostile.too_many_stale >= 1 and said.get("too_many_stale", 0) >= 1, (hostile.too_many_stale, said)
        assert hostile.max_stale_per_session <= STALE_AUDIT_PER_SESSION, hostile.max_stale_per_session
        assert said.get("trickle_closed_after", 0) > 0 and not said.get("trickle_survived"), said
        assert said.get("crashes", 0) >= 1, f"the hostile crawler never crashed holding jobs: {said}"
        assert all(code in (HOSTILE_CRASH_EXIT, 0) for code in self.hostile_exits), self.hostile_exits

    def diagnostics(self, verdict) -> str:
        parts = [format_verdict(verdict), "timeline:", *self.timeline]
        bus_logs = [p for p in self.procs.started if p.name == "runbus"]
        for proc in bus_logs[-3:]:
            parts.append(
                f"--- tail of {proc.log_path} (pid {proc.pid}, exit {proc.returncode}), "
                "per-job stale lines left out ---"
            )
            parts.append(tail(proc.log_path, 30, skip=("event=outcome.stale",)))
        return "\n".join(parts)

    def tear_down(self, keep: bool) -> None:
        errors = []
        for step in (
            lambda: self.proxy and self.proxy.stop(),
            lambda: self.procs and self.procs.stop_all(),
            lambda: self.db and self.db.close(),
            lambda: self.server and self.server.destroy(),
        ):
            try:
                step()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(repr(exc))
        if keep:
            log(f"kept {self.folder} (CHAOS_KEEP)")
        else:
            remove_folder(self.folder)
        if errors:
            log(f"tear-down problems: {errors}")


# --- the checker itself (fast): a verdict that cannot fail would prove nothing ------------------


def _trail_db(tmp_path, jobs: dict[int, tuple], events: list[tuple]) -> SqliteChaosDatabase:
    import sqlite3

    db = SqliteChaosDatabase(tmp_path)
    conn = sqlite3.connect(db.path)
    conn.executescript(
        "CREATE TABLE jobs_job (id INTEGER PRIMARY KEY, status TEXT, attempt INT, interruptions INT,"
        " outcome_attempt INT, lease_session TEXT, lease_expires_at TEXT);"
        "CREATE TABLE jobs_jobevent (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INT, kind TEXT,"
        " from_status TEXT, to_status TEXT, attempt INT, actor TEXT, reason TEXT);"
    )
    conn.executemany(
        "INSERT INTO jobs_job VALUES (?, ?, ?, ?, ?, ?, ?)", [(job_id, *row) for job_id, row in jobs.items()]
    )
    conn.executemany(
        "INSERT INTO jobs_jobevent (job_id, kind, from_status, to_status, attempt, actor, reason)"
        " VALUES (?, ?, ?, ?, ?, 'test', '')",
        events,
    )
    conn.commit()
    conn.close()
    return db


GOOD_TRAILS = [
    # 1: claimed, interrupted, claimed again, done
    (1, "enqueue", "", "queued", 0),
    (1, "claim", "queued", "running", 1),
    (1, "interrupt", "running", "queued", 1),
    (1, "claim", "queued", "running", 2),
    (1, "stale", "", "", 1),
    (1, "outcome", "running", "succeeded", 2),
    # 2: interrupted, late result recorded while queued (rule 3)
    (2, "enqueue", "", "queued", 0),
    (2, "claim", "queued", "running", 1),
    (2, "interrupt", "running", "queued", 1),
    (2, "outcome", "queued", "succeeded", 1),
    # 3: poison
    (3, "enqueue", "", "queued", 0),
    (3, "claim", "queued", "running", 1),
    (3, "interrupt", "running", "queued", 1),
    (3, "re_lease", "queued", "running", 1),
    (3, "interrupt", "running", "failed", 1),
]
GOOD_JOBS = {
    1: ("succeeded", 2, 1, 2, None, None),
    2: ("succeeded", 1, 1, 1, None, None),
    3: ("failed", 1, 2, None, None, None),
}


def test_invariant_checker_accepts_good_trails(tmp_path):
    verdict = check_invariant(_trail_db(tmp_path, GOOD_JOBS, GOOD_TRAILS))
    assert verdict.ok, format_verdict(verdict)
    assert verdict.poison == 1 and verdict.interruptions == 4 and verdict.events["stale"] == 1


@pytest.mark.parametrize(
    "jobs, events, expected",
    [
        (
            {1: ("running", 1, 0, None, "s", "t")},
            [(1, "enqueue", "", "queued", 0), (1, "claim", "queued", "running", 1)],
            "not terminal",
        ),
        (
            {1: ("succeeded", 1, 0, 1, "s", "t")},
            [
                (1, "enqueue", "", "queued", 0),
                (1, "claim", "queued", "running", 1),
                (1, "outcome", "running", "succeeded", 1),
            ],
            "still has a lease",
        ),
        (
            {1: ("succeeded", 2, 1, 2, None, None)},
            [
                (1, "enqueue", "", "queued", 0),
                (1, "claim", "queued", "running", 1),
                (1, "outcome", "running", "succeeded", 1),
                (1, "claim", "succeeded", "running", 2),
                (1, "outcome", "running", "succeeded", 2),
            ],
            "not a legal move",
        ),
        (
            {1: ("succeeded", 1, 1, 1, None, None)},
            [
                (1, "enqueue", "", "queued", 0),
                (1, "claim", "queued", "running", 1),
                (1, "interrupt", "running", "queued", 1),
                (1, "claim", "queued", "running", 1),
                (1, "outcome", "running", "succeeded", 1),
            ],
            "does not increase",
        ),
        (
            {1: ("succeeded", 1, 0, 1, None, None)},
            [
                (1, "enqueue", "", "queued", 0),
                (1, "claim", "queued", "running", 1),
                (1, "outcome", "queued", "succeeded", 1),
            ],
            "starts from 'queued' but the job was 'running'",
        ),
        (
            {1: ("queued", 1, 1, None, None, None)},
            [(1, "enqueue", "", "queued", 0), (1, "claim", "queued", "running", 1)],
            "last event leads to running",
        ),
        (
            {1: ("failed", 1, 0, None, None, None)},
            [
                (1, "enqueue", "", "queued", 0),
                (1, "claim", "queued", "running", 1),
                (1, "interrupt", "running", "failed", 1),
            ],
            "interruptions=0 but 1 interrupt events",
        ),
        (
            {1: ("succeeded", 2, 1, 2, None, None)},
            [
                (1, "enqueue", "", "queued", 0),
                (1, "claim", "queued", "running", 1),
                (1, "interrupt", "running", "queued", 1),
                (1, "claim", "queued", "running", 2),
                (1, "outcome", "running", "queued", 2),
                (1, "outcome", "queued", "succeeded", 1),
            ],
            "latest claim is 2",
        ),
    ],
)
def test_invariant_checker_flags_broken_trails(tmp_path, jobs, events, expected):
    verdict = check_invariant(_trail_db(tmp_path, jobs, events))
    assert not verdict.ok
    assert any(expected in text for text in verdict.problems), format_verdict(verdict)


# --- the hostile crawler's checker (fast): it must catch what it is there to catch -----------------

HONEST, HOSTILE, HOSTILE_LATER = (
    "11111111-1111-4111-8111-111111111111",
    "22222222-2222-4222-8222-222222222222",
    "33333333-3333-4333-8333-333333333333",
)


def _hostile_db(tmp_path, events: list[tuple], failed: bool = False) -> SqliteChaosDatabase:
    import sqlite3
    import uuid

    db = SqliteChaosDatabase(tmp_path)
    conn = sqlite3.connect(db.path)
    conn.executescript(
        "CREATE TABLE bus_bussession (session TEXT PRIMARY KEY, endpoint TEXT, close_reason TEXT,"
        " connected_at TEXT);"
        "CREATE TABLE jobs_job (id INTEGER PRIMARY KEY, status TEXT, error TEXT, interruptions INT);"
        "CREATE TABLE jobs_jobevent (id INTEGER PRIMARY KEY AUTOINCREMENT, job_id INT, kind TEXT,"
        " to_status TEXT, attempt INT, session TEXT, reason TEXT);"
    )
    conn.executemany(
        "INSERT INTO bus_bussession VALUES (?, ?, ?, ?)",
        [
            (uuid.UUID(HONEST).hex, "unix:/tmp/x/a.sock", "", "2026-01-01 00:00:00.000000"),
            (uuid.UUID(HOSTILE).hex, "unix:/tmp/x/h.sock", "too_many_stale: 1200", "2026-01-01 00:00:01.000000"),
            (uuid.UUID(HOSTILE_LATER).hex, "unix:/tmp/x/h.sock", "", "2026-01-01 00:00:02.000000"),
        ],
    )
    conn.execute("INSERT INTO jobs_job VALUES (1, ?, '', 0)", ("failed" if failed else "succeeded",))
    conn.executemany(
        "INSERT INTO jobs_jobevent (job_id, kind, to_status, attempt, session, reason) VALUES (?, ?, ?, ?, ?, '')",
        [(job, kind, to, attempt, session and uuid.UUID(session).hex) for job, kind, to, attempt, session in events],
    )
    conn.commit()
    conn.close()
    return db


def test_hostile_checker_accepts_its_own_jobs_and_a_resend_after_reconnect(tmp_path):
    db = _hostile_db(
        tmp_path,
        [
            (1, "claim", "running", 1, HOSTILE),
            (1, "interrupt", "queued", 1, HOSTILE),
            (1, "outcome", "succeeded", 1, HOSTILE_LATER),  # rule 3: a later session of the same endpoint
        ]
        + [(1, "stale", "", 1, HOSTILE)] * 100,
    )
    verdict = check_hostile(db, "/h.sock")
    assert not verdict.problems, verdict.problems
    assert (verdict.sessions, verdict.too_many_stale, verdict.hostile_outcomes) == (2, 1, 1)


@pytest.mark.parametrize(
    "events, failed, expected",
    [
        (
            [(1, "claim", "running", 1, HONEST), (1, "outcome", "succeeded", 1, HOSTILE)],
            False,
            "an outcome recorded from a crawler that was never assigned it",
        ),
        (
            [
                (1, "claim", "running", 1, HONEST),
                (1, "interrupt", "queued", 1, HONEST),
                (1, "re_lease", "running", 1, HOSTILE),
                (1, "outcome", "succeeded", 1, HONEST),
            ],
            False,
            "another crawler's job taken through ready.running",
        ),
        (
            [(1, "claim", "running", 1, HONEST), (1, "outcome", "succeeded", 1, HONEST)]
            + [(1, "stale", "", 1, HOSTILE)] * 101,
            False,
            "101 stale audit events",
        ),
        ([(1, "claim", "running", 1, HOSTILE), (1, "interrupt", "failed", 1, HOSTILE)], True, "ended failed"),
        # An outcome sent by an older session of the same endpoint, before the attempt existed.
        ([(1, "claim", "running", 1, HOSTILE_LATER), (1, "outcome", "failed", 1, HOSTILE)], True, "OLDER than session"),
    ],
)
def test_hostile_checker_flags_what_got_through(tmp_path, events, failed, expected):
    verdict = check_hostile(_hostile_db(tmp_path, events, failed=failed), "/h.sock")
    assert any(expected in text for text in verdict.problems), verdict.problems
