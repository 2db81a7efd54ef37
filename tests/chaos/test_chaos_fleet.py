"""The chaos suite, fleet mode (issue 10): 3 bus processes share 10 crawlers while a bus is
SIGKILLed every few seconds and restarted.

Every bus is a `manage.py runbus` with the crawlers in BUS_ENDPOINTS (each registers them
in the registry; the fleet spreads them over the live buses). The crawlers are
`runcrawler --noop --noop-delay-ms 20-150 --resume-grace S --connection-log FILE`, so a
killed bus leaves jobs running on its crawlers that the next owner must re-lease (or
requeue), and late results that must be recorded once. Jobs arrive in waves (one
`manage.py enqueue --file` each) so that every kill meets work in flight; when a bus is
killed, the survivors take its crawlers over at once (same machine: the dead pid), and
when it is back, the fleet hands crawlers over to it again.

The verdict, from the database and from each crawler's own connection log:
- 0 lost: every job succeeded;
- 0 recorded twice: one outcome event per job (check_invariant replays every trail);
- 0 stuck: no job running, no lease left;
- never two bus sessions open to one crawler at once (its connection log: a session is
  open from its `ready` to its `close`).

Each variant runs on its own throwaway database (a temp SQLite file; a private PostgreSQL),
only on the suite run of the same database, so `./bin/test` runs each exactly once.
CHAOS_SEED=N reuses the random choices; CHAOS_KEEP=1 keeps the folder (logs) when it
fails, CHAOS_KEEP=always even when it passes.
"""

from __future__ import annotations

import os
import random
import socket
import time

import pytest

from tests import pg_instance
from tests.chaos.harness import (
    PostgresChaosDatabase,
    Processes,
    SqliteChaosDatabase,
    check_invariant,
    count_in_logs,
    format_verdict,
    log,
    read_connection_log,
    remove_folder,
    session_overlaps,
    short_folder,
    suite_database,
    tail,
    wait_for_log,
)

BUSES = 3
CRAWLERS = 10
SLOTS = 10
NOOP_DELAY_MS = "20-150"
RESUME_GRACE = 3.0  # a killed bus's jobs keep running this long for the next owner's ready.running
WAVES = 6
WAVE = 500
JOBS = WAVES * WAVE
WAVE_EVERY = 2.5  # seconds between waves (later when an enqueue takes longer)
FAULT_PHASE = 18.0  # bus kills go on at least this long, and until every wave is queued
FAULT_WINDOW = 45.0  # the most the fault phase may last
KILL_EVERY = (2.0, 4.0)  # seconds between bus kills
MIN_KILLS = 4
HEARTBEAT_TIMEOUT = 2.0
DRAIN_TIMEOUT = 45.0
HARD_DEADLINE = 170.0  # seconds for the whole scenario, set-up to verdict


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_fleet_sqlite():
    if suite_database() != "sqlite":
        pytest.skip("the SQLite fleet chaos run belongs to the SQLite suite run")
    FleetChaosRun("sqlite").run()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_fleet_postgresql():
    if suite_database() != "postgresql":
        pytest.skip("the PostgreSQL fleet chaos run belongs to the PostgreSQL suite run")
    if not pg_instance.available():
        pytest.skip("PostgreSQL server binaries (initdb) are not installed")
    FleetChaosRun("postgresql").run()


class FleetChaosRun:
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
        self.sockets = [str(self.folder / f"c{number}.sock") for number in range(CRAWLERS)]
        self.conn_logs = [str(self.folder / f"connections-{number}.jsonl") for number in range(CRAWLERS)]
        self.crawlers: list = []
        self.buses: list = [None] * BUSES
        self.bus_kills = 0
        self.killed: dict[str, float] = {}  # bus node name (hello's node: host:pid) -> time.time() of its SIGKILL
        self.timeline: list[str] = []

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        line = f"t={self.elapsed():6.1f}s {text}"
        self.timeline.append(line)
        log(line)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    # --- processes ------------------------------------------------------------------------------
    def start_crawler(self, number: int):
        return self.procs.manage(
            "runcrawler",
            "--listen",
            self.sockets[number],
            "--slots",
            str(SLOTS),
            "--noop",
            "--noop-delay-ms",
            NOOP_DELAY_MS,
            "--resume-grace",
            str(RESUME_GRACE),
            "--connection-log",
            self.conn_logs[number],
            "--name",
            f"fleet-{number}",
            name=f"crawler-{number}",
        )

    def start_bus(self, slot: int):
        self.buses[slot] = self.procs.manage("runbus", name=f"runbus-{slot}")
        return self.buses[slot]

    def enqueue_wave(self, number: int):
        urls = self.folder / f"urls-{number}.txt"
        first = number * WAVE
        urls.write_text("".join(f"https://example.com/fleet/{i}\n" for i in range(first, first + WAVE)))
        return self.procs.manage("enqueue", "--file", str(urls), name=f"enqueue-{number}")

    # --- the scenario ---------------------------------------------------------------------------
    def run(self) -> None:
        log(f"fleet {self.kind}: seed {self.seed} (CHAOS_SEED={self.seed} reuses it), folder {self.folder}")
        ok = False
        try:
            self.set_up()
            fault_seconds = self.inject_faults()
            drained, drain_seconds = self.drain()
            self.stop_everything()
            verdict = check_invariant(self.db)
            overlaps, lags = {}, []
            for number, path in enumerate(self.conn_logs):
                found, noticed = session_overlaps(read_connection_log(path), killed=self.killed)
                lags += noticed
                if found:
                    overlaps[number] = found
            sessions = sum(
                1 for path in self.conn_logs for event in read_connection_log(path) if event["event"] == "ready"
            )
            self.report(verdict, fault_seconds, drain_seconds, sessions, overlaps, lags)
            where = f"\n{self.diagnostics(verdict)}"
            assert drained, f"jobs unfinished {DRAIN_TIMEOUT:.0f} s after the faults stopped{where}"
            assert verdict.ok, f"the invariant is broken (lost, twice or stuck):{where}"
            assert verdict.jobs == JOBS, f"expected {JOBS} jobs, found {verdict.jobs}{where}"
            assert verdict.by_status == {"succeeded": JOBS}, f"not every job succeeded: {verdict.by_status}{where}"
            assert self.db.running() == 0, f"a job is still running{where}"
            assert not overlaps, (
                "two bus sessions were open at once to one crawler (its own connection log):\n"
                + "\n".join(f"  crawler c{number}: {line}" for number, found in overlaps.items() for line in found[:5])
                + where
            )
            assert self.bus_kills >= MIN_KILLS, f"only {self.bus_kills} bus kills{where}"
            ok = True
        finally:
            keep = os.environ.get("CHAOS_KEEP", "")
            self.tear_down(keep=keep == "always" or (keep == "1" and not ok))

    def set_up(self) -> None:
        if self.kind == "postgresql":
            self.server = pg_instance.PrivatePostgres()
            self.server.start()
            self.db = PostgresChaosDatabase(self.server, name="jobsite_chaos_fleet")
        else:
            self.db = SqliteChaosDatabase(self.folder)
        env = {
            "HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT),
            "BUS_ENDPOINTS": ",".join(self.sockets),
            "BUS_BACKOFF_CAP": "0.5",
            "BUS_SWEEP_INTERVAL": "1",
            "BUS_POLL_INTERVAL": "0.5",  # SQLite has no NOTIFY: waves are seen at the next poll
            "LOG_LEVEL": "INFO",
        }
        self.procs = Processes(self.folder, self.db.url, env)
        self.procs.run("migrate", "--noinput", name="migrate", timeout=120)
        wave = self.enqueue_wave(0)
        self.crawlers = [self.start_crawler(number) for number in range(CRAWLERS)]
        assert wave.wait(60) == 0, f"enqueue exited {wave.returncode}:\n{tail(wave.log_path)}"
        for number, proc in enumerate(self.crawlers):
            assert wait_for_log(proc, "crawler.listening", timeout=60), (
                f"crawler c{number} did not start listening:\n{tail(proc.log_path)}"
            )
        for slot in range(BUSES):
            self.start_bus(slot)
        deadline = time.monotonic() + 60
        while not all(any(event["event"] == "ready" for event in read_connection_log(path)) for path in self.conn_logs):
            assert time.monotonic() < deadline, "not every crawler got a bus session within 60 s:\n" + "\n".join(
                tail(bus.log_path, 10) for bus in self.buses
            )
            time.sleep(0.1)
        self.note(f"set-up done: {self.db.url}, {CRAWLERS} crawlers, {BUSES} buses, wave 0 ({WAVE} jobs) queued")

    def inject_faults(self) -> float:
        """A random bus SIGKILLed every KILL_EVERY s and restarted at once; a wave every WAVE_EVERY s."""
        t0 = time.monotonic()
        waves = [(number, number * WAVE_EVERY) for number in range(1, WAVES)]
        enqueuing = None
        next_kill = self.rng.uniform(*KILL_EVERY)
        while True:
            t = time.monotonic() - t0
            if t >= FAULT_WINDOW or self.remaining() < DRAIN_TIMEOUT + 30:
                break
            if t >= FAULT_PHASE and not waves and enqueuing is None:
                break
            if waves and enqueuing is None and t >= waves[0][1]:
                number, _ = waves.pop(0)
                enqueuing = (number, self.enqueue_wave(number))
            if enqueuing is not None and enqueuing[1].poll() is not None:
                number, proc = enqueuing
                assert proc.returncode == 0, (
                    f"enqueue of wave {number} exited {proc.returncode}:\n{tail(proc.log_path)}"
                )
                enqueuing = None
                self.note(f"wave {number}: {WAVE} more jobs queued [{self.db.unfinished()} unfinished]")
            if t >= next_kill:
                slot = self.rng.randrange(BUSES)
                old = self.buses[slot]
                running = self.db.running()
                self.killed[f"{socket.gethostname()}:{old.pid}"] = time.time()
                Processes.kill(old)  # SIGKILL, then reaped: a zombie would still look alive
                self.bus_kills += 1
                new = self.start_bus(slot)
                self.note(f"SIGKILL runbus-{slot} (pid {old.pid}) [{running} running]; restarted as pid {new.pid}")
                next_kill = t + self.rng.uniform(*KILL_EVERY)
            for slot, bus in enumerate(self.buses):
                if bus.poll() is not None:  # exited by itself: a finding, shown in the timeline
                    self.note(f"runbus-{slot} exited by itself ({bus.returncode}):\n{tail(bus.log_path, 20)}")
                    self.start_bus(slot)
            time.sleep(0.05)
        missing = [f"wave {number}" for number, _ in waves]
        if enqueuing is not None:
            missing.append(f"wave {enqueuing[0]} (still enqueuing)")
        assert not missing, f"not done within the fault window: {missing}; timeline:\n" + "\n".join(self.timeline)
        took = time.monotonic() - t0
        self.note(f"faults stopped after {took:.1f} s: {self.bus_kills} bus kills")
        return took

    def drain(self) -> tuple[bool, float]:
        started = time.monotonic()
        deadline = started + min(DRAIN_TIMEOUT, self.remaining() - 20)
        last_note = started
        while True:
            if self.db.unfinished() == 0:
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
            time.sleep(0.2)

    def stop_everything(self) -> None:
        bus_codes = [Processes.terminate(bus, timeout=15) for bus in self.buses]
        crawler_codes = [Processes.terminate(proc, timeout=10) for proc in self.crawlers]
        self.note(f"stopped: runbus exits {bus_codes}, crawler exits {crawler_codes}")

    def report(
        self, verdict, fault_seconds: float, drain_seconds: float, sessions: int, overlaps: dict, lags: list
    ) -> None:
        bus_logs = [p.log_path for p in self.procs.started if p.name.startswith("runbus")]
        found = count_in_logs(
            bus_logs,
            [
                "event=bus.owns",
                "event=bus.hand_over",
                "event=bus.released",
                "event=bus.fenced",
                "event=bus.ownership_lost",
                "event=bus.re_leased",
                "level=error",
            ],
        )
        lines = [
            f"CHAOS FLEET {self.kind}: seed={self.seed} duration={self.elapsed():.1f}s "
            f"(faults {fault_seconds:.1f}s, drain {drain_seconds:.1f}s) bus_kills={self.bus_kills}",
            f"  jobs={verdict.jobs} by_status={verdict.by_status} interruptions={verdict.interruptions} "
            f"claims={verdict.events.get('claim', 0)} re_leases={verdict.events.get('re_lease', 0)} "
            f"outcomes={verdict.events.get('outcome', 0)} stale={verdict.events.get('stale', 0)}",
            f"  interrupt reasons: {self.db.interrupt_reasons()}",
            f"  crawler sessions={sessions}, crawlers with two sessions open at once={len(overlaps)}; "
            f"a killed bus's session noticed after its successor was ready: {len(lags)} times"
            + (f" (at most {max(lags) * 1000:.0f} ms later)" if lags else ""),
            f"  bus logs: {found}",
            f"  verdict: {'OK' if verdict.ok and not overlaps else 'BROKEN'}",
        ]
        print("\n".join(lines), flush=True)

    def diagnostics(self, verdict) -> str:
        parts = [format_verdict(verdict), "timeline:", *self.timeline]
        for proc in [p for p in self.procs.started if p.name.startswith("runbus")][-4:]:
            parts.append(f"--- tail of {proc.log_path} (pid {proc.pid}, exit {proc.returncode}) ---")
            parts.append(tail(proc.log_path, 15, skip=("event=outcome.stale",)))
        return "\n".join(parts)

    def tear_down(self, keep: bool) -> None:
        errors = []
        for step in (
            lambda: self.procs and self.procs.stop_all(),
            lambda: self.db and self.db.close(),
            lambda: self.server and self.server.destroy(),
        ):
            try:
                step()
            except Exception as exc:
                errors.append(repr(exc))
        if keep:
            log(f"kept {self.folder} (CHAOS_KEEP)")
        else:
            remove_folder(self.folder)
        if errors:
            log(f"tear-down problems: {errors}")
