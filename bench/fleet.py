"""Fleet benchmark (issue 10): 3 `runbus` processes sharing 30 crawlers, one of them SIGKILLed or SIGSTOPped.

    python bench/fleet.py [--db postgres|sqlite|both] [--jobs 20000] [--crawlers 30] [--slots 100]
                          [--buses 3] [--runs 3] [--kills 3] [--stops 3] [--kill-at 0.3]

The 30 `runcrawler --noop --slots S --connection-log FILE` crawlers are
started once and registered in the crawler registry (jobs.fleet.add_crawler);
every `runbus` is started without --endpoint and takes its share from the
registry. Each run: fresh job tables, `--jobs` jobs queued and held
(run_after far ahead, not timed), the buses started and left to settle (every
crawler owned by a live bus and connected, nothing changed for 1 s), then the
jobs released at once (run_after cleared, NOTIFY) and timed from the first
claim event to the moment the benchmark's poll (every 50 ms) sees them all
succeeded, as in bus_throughput.py.

Figures:
- throughput with `--buses` buses, and with one bus on the same crawlers in the
  same session (single and fleet runs alternate); target >= 5,000 jobs/s on
  PostgreSQL, and the fleet at most 20 % below the single bus (ratio >= 0.80);
- take-over, same machine: in each of `--kills` more fleet runs one bus is
  SIGKILLed (and reaped at once, as a supervisor would) once `--kill-at` of
  the jobs succeeded; the survivors see its pid gone. For every crawler it
  owned (Crawler.owner just before the kill), the seconds from the kill to
  that crawler's first `ready` event after it in its own connection log;
  p50 / p99 / max over all kills; target p99 <= 2 s;
- take-over, machine gone: in each of `--stops` more fleet runs one bus is
  SIGSTOPped instead. Its pid stays alive, so the survivors can only wait for
  its node lease (BUS_OWNER_LEASE, 1.5 s on PostgreSQL) to expire, as for a
  bus on another machine that is gone. For every crawler it owned, the
  seconds from the stop to that crawler's first `ready` of a session from
  another bus (read from the log lines written after the stop); once every
  one has it (or after 30 s) the stopped bus is SIGKILLed. Same target;
- endpoints per bus, max - min, from Crawler.owner once settled (before every
  fleet run, and after each kill with the survivors); target <= 1.

Checked (a failure exits 1): every job succeeded, with exactly one `outcome`
event; no job left running or leased; and, from each crawler's connection log
over the whole benchmark, never two sessions open to it at once. Not counted
as open: a session of a bus SIGKILLed before the next one was ready (dead, the
crawler has not read its end yet), and a session of a bus SIGSTOPped before
it: a frozen process cannot close its socket, so the crawler sees that silent
session open until the SIGKILL (a documented limit, docs/guarantees.md "A
frozen bus process"); the script prints how many and for how long.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import throwaway_database  # noqa: E402
from bench._procs import (  # noqa: E402
    CheckFailed,
    Poller,
    Procs,
    backend_label,
    check,
    empty_tables,
    enqueue_jobs,
    load_line,
    median,
    parser_for,
    per_backend,
    percentile,
    verdict,
)

TARGET_JOBS_S = {"postgresql": 5000.0}
TARGET_RATIO = 0.80  # fleet throughput / single-bus throughput
TARGET_TAKEOVER_P99 = 2.0  # seconds, kill -> the crawler's next session ready
TARGET_SPREAD = 1  # endpoints per bus, max - min
POLL_INTERVAL = 0.05
SETTLE_STABLE = 1.0  # seconds without any change of owner or session
HOLD = "2999-01-01 00:00:00+00:00"


def _timestamp(value) -> float:
    if isinstance(value, datetime):
        return value.timestamp()
    return datetime.fromisoformat(str(value)).timestamp()


# --- the crawlers' connection logs (the logic of tests/test_fleet.py's ConnectionLog) -------------


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().split("\n")[:-1] if line.strip()]  # whole lines only


def overlaps(
    events: list[dict], killed: dict[str, float], stopped: dict[str, float] | None = None
) -> tuple[list[str], list[float], list[float]]:
    """Each moment a second session to this crawler became ready while another one was still open.

    A session of a bus that was SIGKILLed before the new session was ready (`killed`: its hello
    `node`, host:pid, -> kill time) is dead already; the crawler has not read its end yet. Those
    are not counted as two open sessions: returned instead is how much later the crawler noticed.

    A session of a bus that was SIGSTOPped before the new session was ready (`stopped`: node ->
    stop time) is frozen: the bus cannot close its socket, so the crawler sees it open until the
    bus is SIGKILLed (docs/guarantees.md, "A frozen bus process"). Those are not counted either:
    returned instead is how long each stayed open after its successor was ready.
    """
    stopped = stopped or {}
    found, lags, frozen, open_now, late, held = [], [], [], {}, {}, {}
    for event in events:
        if event["event"] == "ready":
            alive = {}
            for session, peer in open_now.items():
                if peer in killed and killed[peer] <= event["t"]:
                    late.setdefault(session, event["t"])
                elif peer in stopped and stopped[peer] <= event["t"]:
                    held.setdefault(session, event["t"])
                else:
                    alive[session] = peer
            if alive:
                found.append(f"t={event['t']:.3f} session {event['session']} ready while {sorted(alive)} open")
            open_now[event["session"]] = event.get("peer")
        elif event["event"] == "close":
            session = event.get("session")
            open_now.pop(session, None)
            if session in late:
                lags.append(event["t"] - late.pop(session))
            if session in held:
                frozen.append(event["t"] - held.pop(session))
    return found, lags, frozen


class LogTail:
    """The lines a connection log gained since it was opened here (complete lines only)."""

    def __init__(self, path: Path):
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.rest = b""

    def new_events(self) -> list[dict]:
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read()
        self.offset += len(data)
        complete, _, self.rest = (self.rest + data).rpartition(b"\n")  # no newline: all of it in rest
        return [json.loads(line) for line in complete.decode().splitlines() if line.strip()]


def first_ready_after(events: list[dict], t: float) -> float | None:
    for event in events:
        if event["event"] == "ready" and event["t"] > t:
            return event["t"]
    return None


# --- one benchmark session on one database ------------------------------------------------------


class Fleet:
    def __init__(self, url: str, args):
        self.url, self.args = url, args
        self.procs = Procs(url, keep_logs=args.keep_logs)
        self.poller = Poller(url)
        self.logs: dict[str, Path] = {}  # endpoint -> its crawler's connection log
        self.buses: list = []
        self.kills = 0
        self.killed: dict[str, float] = {}  # the killed buses' node names (host:pid) -> kill time
        self.stopped: dict[str, float] = {}  # the SIGSTOPped buses' node names -> stop time
        env = {"LOG_LEVEL": args.log_level}
        if self.poller.vendor == "sqlite":
            env["BUS_POLL_INTERVAL"] = "0.2"  # no NOTIFY on SQLite: the release is seen at the next poll
        self.bus_env = self.procs.env(**env)
        self.bus_env.pop("BUS_NODE", None)  # node = host:pid, as the crawlers' logs name their peer

    def start_crawlers(self) -> None:
        from jobs import fleet

        started = []
        for number in range(self.args.crawlers):
            sock = self.procs.socket_path()
            log_path = self.procs.folder / f"connections-{number}.jsonl"
            self.procs.manage(
                "runcrawler",
                "--listen",
                sock,
                "--slots",
                str(self.args.slots),
                "--noop",
                "--connection-log",
                str(log_path),
                env=self.procs.env(LOG_LEVEL="WARNING"),
            )
            crawler, _ = fleet.add_crawler(endpoint=sock, label=f"bench-{number}")
            self.logs[crawler.endpoint] = log_path
            started.append(sock)
        deadline = time.monotonic() + 120
        while not all(os.path.exists(sock) for sock in started):
            check(time.monotonic() < deadline, "the crawlers did not all listen within 120 s")
            for proc in self.procs.started:
                check(proc.poll() is None, f"a crawler exited:\n{self.procs.log_text(proc)[-2000:]}")
            time.sleep(0.1)

    def start_buses(self, count: int) -> None:
        self.buses = [self.procs.manage("runbus", env=self.bus_env) for _ in range(count)]

    def stop_buses(self) -> None:
        for bus in self.buses:
            if bus.poll() is None and f"{socket.gethostname()}:{bus.pid}" in self.stopped:
                bus.kill()  # still SIGSTOPped (a run that failed): SIGTERM would wait for a SIGCONT
            Procs.stop(bus, timeout=15)  # stays in procs.started: its log file keeps a name of its own
        self.buses = []

    def owners(self) -> dict[str, int | None]:
        """endpoint -> pid of the live bus that owns it and holds a session to it (None: not yet)."""
        nodes = dict(self.query("SELECT node, pid FROM jobs_busnode"))
        live = {bus.pid for bus in self.buses if bus.poll() is None}
        result = {}
        for endpoint, owner, session in self.query("SELECT endpoint, owner, session FROM jobs_crawler"):
            pid = nodes.get(owner)
            result[endpoint] = pid if pid in live and session is not None else None
        return result

    def settle(self, timeout: float = 60.0) -> dict[int, int]:
        """Wait until every crawler is owned and connected and nothing changed for SETTLE_STABLE s.

        Returns endpoints per live bus pid (0 for a bus that owns none).
        """
        deadline = time.monotonic() + timeout
        last, since = None, time.monotonic()
        while True:
            for bus in self.buses:
                if bus.poll() is not None and bus.returncode != -signal.SIGKILL:
                    raise CheckFailed(f"runbus exited with {bus.returncode}:\n{self.procs.log_text(bus)[-2000:]}")
            owners = self.owners()
            snapshot = (tuple(sorted(owners.items())), self.query("SELECT endpoint, session FROM jobs_crawler"))
            now = time.monotonic()
            if snapshot != last:
                last, since = snapshot, now
            elif all(owners.values()) and now - since >= SETTLE_STABLE:
                counts = Counter(owners.values())
                return {bus.pid: counts.get(bus.pid, 0) for bus in self.buses if bus.poll() is None}
            check(now < deadline, f"the fleet did not settle within {timeout:g} s: {Counter(owners.values())}")
            time.sleep(0.1)

    def query(self, sql: str) -> list[tuple]:
        self.poller.cursor.execute(sql)
        return sorted(self.poller.cursor.fetchall(), key=repr)

    def prepare_jobs(self) -> None:
        from django.db import connection

        from jobs.models import Job

        empty_tables()
        enqueue_jobs(self.args.jobs)
        Job.objects.update(run_after=datetime.fromisoformat(HOLD))
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("VACUUM ANALYZE jobs_job")
                cursor.execute("VACUUM ANALYZE jobs_jobevent")

    def release_jobs(self) -> None:
        from django.db import connection, transaction

        from jobs.hosts import LONG_AGO
        from jobs.models import Host, Job
        from jobs.services import NOTIFY_CHANNEL

        with transaction.atomic():
            Job.objects.update(run_after=None)
            # The raw update skips the services: end the hosts' wait for the held jobs' run_after too.
            Host.objects.update(ready_at=LONG_AGO)
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("SELECT pg_notify(%s, '')", [NOTIFY_CHANNEL])

    def wait_done(self, *, kill_at: float | None = None, freeze: bool = False):
        """Poll until every job succeeded; with kill_at, take one bus out once that share succeeded.

        Without `freeze` the bus is SIGKILLed (and reaped at once, as a supervisor would): the
        survivors on this machine see its pid gone. With `freeze` it is SIGSTOPped: its pid stays
        alive, so the survivors must wait for its lease to expire, as for a machine that is gone;
        once each crawler it owned has logged a new session ready (or after 30 s), it is SIGKILLed.

        Returns (done_at, out) with out = (t_out, endpoints the victim owned, victim pid, jobs
        succeeded then, {endpoint: its first ready after t_out}, seconds from t_out to the SIGKILL
        of a frozen bus) or None.
        """
        deadline = time.monotonic() + self.args.timeout
        out, victim, tails, readies, done_at = None, None, {}, {}, None
        while time.monotonic() < deadline:
            done = self.poller.count("succeeded")
            if done >= self.args.jobs and done_at is None:
                done_at = time.time()
            if done_at is not None and (out is None or victim.poll() is not None):
                return done_at, out
            if kill_at is not None and out is None and done >= kill_at * self.args.jobs:
                victim = self.buses[self.kills % len(self.buses)]
                node = f"{socket.gethostname()}:{victim.pid}"
                owned = [endpoint for endpoint, pid in self.owners().items() if pid == victim.pid]
                if freeze:
                    tails = {endpoint: LogTail(self.logs[endpoint]) for endpoint in owned}  # before the stop
                    t_out = time.time()
                    self.stopped[node] = t_out
                    os.kill(victim.pid, signal.SIGSTOP)
                else:
                    t_out = time.time()
                    self.killed[node] = t_out
                    os.kill(victim.pid, signal.SIGKILL)
                    victim.wait(10)  # reaped at once: a zombie still answers kill(pid, 0)
                self.kills += 1
                out = [t_out, owned, victim.pid, done, readies, None]
            if freeze and out is not None and victim.poll() is None:
                for endpoint in [e for e in tails if e not in readies]:
                    for event in tails[endpoint].new_events():
                        if event["event"] == "ready" and event["t"] > out[0] and event.get("peer") != node:
                            readies[endpoint] = event["t"]
                            break
                if len(readies) == len(tails) or time.time() - out[0] > 30:
                    out[5] = time.time() - out[0]
                    victim.kill()  # SIGKILL works on a stopped process
                    victim.wait(10)
                    self.killed[node] = time.time()
            for bus in self.buses:
                if bus.poll() is not None and (out is None or bus.pid != out[2]):
                    raise CheckFailed(f"runbus exited with {bus.returncode}:\n{self.procs.log_text(bus)[-2000:]}")
            time.sleep(POLL_INTERVAL)
        raise CheckFailed(
            f"not all {self.args.jobs} jobs succeeded within {self.args.timeout:g} s "
            f"(succeeded: {self.poller.count('succeeded')}, running: {self.poller.count('running')})"
        )

    def check_jobs(self) -> None:
        jobs = self.args.jobs
        check(self.poller.count("succeeded") == jobs, f"succeeded {self.poller.count('succeeded')} of {jobs}")
        twice = int(
            self.poller.scalar(
                "SELECT count(*) FROM (SELECT job_id FROM jobs_jobevent WHERE kind = 'outcome' "
                "GROUP BY job_id HAVING count(*) <> 1) AS x"
            )
        )
        check(twice == 0, f"{twice} jobs have more than one outcome event")
        with_outcome = int(
            self.poller.scalar("SELECT count(DISTINCT job_id) FROM jobs_jobevent WHERE kind = 'outcome'")
        )
        check(with_outcome == jobs, f"{jobs - with_outcome} succeeded jobs have no outcome event")
        leased = int(
            self.poller.scalar(
                "SELECT count(*) FROM jobs_job WHERE lease_session IS NOT NULL OR lease_expires_at IS NOT NULL"
            )
        )
        check(leased == 0, f"{leased} jobs still hold a lease")

    def one_run(self, buses: int, *, kill_at: float | None = None, freeze: bool = False) -> dict:
        self.prepare_jobs()
        self.start_buses(buses)
        try:
            spread = self.settle()
            self.release_jobs()
            done_at, kill = self.wait_done(kill_at=kill_at, freeze=freeze)
            first_claim = self.poller.scalar("SELECT min(at) FROM jobs_jobevent WHERE kind = 'claim'")
            last_finish = self.poller.scalar("SELECT max(finished_at) FROM jobs_job")
            self.check_jobs()
            start = _timestamp(first_claim)
            result = {
                "rate": self.args.jobs / (done_at - start),
                "stamped": self.args.jobs / (_timestamp(last_finish) - start),
                "spread": spread,
                "reclaims": int(self.poller.scalar("SELECT count(*) FROM jobs_jobevent WHERE kind = 'claim'"))
                - self.args.jobs,
                "re_leases": int(self.poller.scalar("SELECT count(*) FROM jobs_jobevent WHERE kind = 're_lease'")),
            }
            if kill is not None:
                t_kill, owned, pid, done, readies, frozen_for = kill
                samples, missing = [], []
                for endpoint in owned:
                    if freeze:  # read while the bus was stopped, from the log lines after the stop
                        ready = readies.get(endpoint)
                    else:
                        ready = first_ready_after(read_log(self.logs[endpoint]), t_kill)
                    if ready is None:
                        missing.append(endpoint)
                    else:
                        samples.append(ready - t_kill)
                check(
                    not missing,
                    f"no new session became ready after the {'stop' if freeze else 'kill'} for {len(missing)} "
                    f"crawlers: {missing[:3]}",
                )
                check(bool(owned), f"the killed bus (pid {pid}) owned no crawler")
                result.update(takeover=samples, killed_at=done, frozen_for=frozen_for, after_kill=self.settle())
            return result
        finally:
            self.stop_buses()

    def check_logs(self) -> tuple[int, int, list[float], list[float]]:
        """Never two sessions open at once to one crawler, over the whole benchmark.

        Returns (sessions, events, lags: how late the crawlers noticed a killed bus's session end
        after the next session was ready, when they did; frozen: how long a SIGSTOPped bus's
        session stayed open after the next session was ready, excluded from the check).
        """
        problems, sessions, events, lags, frozen = [], 0, 0, [], []
        for endpoint, path in sorted(self.logs.items()):
            log_events = read_log(path)
            events += len(log_events)
            sessions += sum(1 for event in log_events if event["event"] == "ready")
            found, noticed, held = overlaps(log_events, self.killed, self.stopped)
            problems += [f"{endpoint}: {text}" for text in found]
            lags += noticed
            frozen += held
        check(not problems, "two sessions open at once to one crawler:\n" + "\n".join(problems[:10]))
        return sessions, events, lags, frozen

    def close(self) -> None:
        self.poller.close()
        self.procs.stop_all()


def spread_of(counts: dict[int, int]) -> int:
    return max(counts.values()) - min(counts.values())


def run_backend(args) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres) as url:
        from django.db import connection

        vendor = connection.vendor
        label = backend_label(vendor)
        print(
            f"# fleet on {label}: {args.jobs} jobs, {args.crawlers} x runcrawler --noop --slots {args.slots}, "
            f"{args.buses} runbus vs 1; {load_line()}",
            flush=True,
        )
        fleet = Fleet(url, args)
        singles, fleets, takeovers, lease_takeovers, spreads = [], [], [], [], []
        log_failure = ""
        try:
            started = time.monotonic()
            fleet.start_crawlers()
            print(f"#   {args.crawlers} crawlers listening after {time.monotonic() - started:.1f} s", flush=True)
            for number in range(1, args.runs + 1):
                one = fleet.one_run(1)
                singles.append(one["rate"])
                print(
                    f"#   run {number}, 1 bus: {one['rate']:,.0f} jobs/s (bus timestamps: {one['stamped']:,.0f}); "
                    f"{load_line()}",
                    flush=True,
                )
                many = fleet.one_run(args.buses)
                fleets.append(many["rate"])
                spreads.append(spread_of(many["spread"]))
                print(
                    f"#   run {number}, {args.buses} buses: {many['rate']:,.0f} jobs/s (bus timestamps: "
                    f"{many['stamped']:,.0f}); endpoints per bus {sorted(many['spread'].values())}; {load_line()}",
                    flush=True,
                )
            for number in range(1, args.kills + 1):
                run = fleet.one_run(args.buses, kill_at=args.kill_at)
                takeovers += run["takeover"]
                spreads += [spread_of(run["spread"]), spread_of(run["after_kill"])]
                times = ", ".join(f"{value:.2f}" for value in sorted(run["takeover"]))
                print(
                    f"#   kill {number}: SIGKILL at {run['killed_at']:,} succeeded; {len(run['takeover'])} crawlers "
                    f"taken over, kill -> ready (s): {times}; endpoints per bus before "
                    f"{sorted(run['spread'].values())}, after {sorted(run['after_kill'].values())}; "
                    f"re-claims {run['reclaims']}, re-leases {run['re_leases']}; run {run['rate']:,.0f} jobs/s; "
                    f"{load_line()}",
                    flush=True,
                )
            for number in range(1, args.stops + 1):
                run = fleet.one_run(args.buses, kill_at=args.kill_at, freeze=True)
                lease_takeovers += run["takeover"]
                spreads += [spread_of(run["spread"]), spread_of(run["after_kill"])]
                times = ", ".join(f"{value:.2f}" for value in sorted(run["takeover"]))
                print(
                    f"#   stop {number}: SIGSTOP at {run['killed_at']:,} succeeded; {len(run['takeover'])} crawlers "
                    f"taken over, stop -> ready (s): {times}; SIGKILLed {run['frozen_for']:.2f} s after the stop; "
                    f"endpoints per bus before {sorted(run['spread'].values())}, after "
                    f"{sorted(run['after_kill'].values())}; re-claims {run['reclaims']}, re-leases {run['re_leases']}; "
                    f"run {run['rate']:,.0f} jobs/s; {load_line()}",
                    flush=True,
                )
            try:
                sessions, events, lags, frozen = fleet.check_logs()
            except CheckFailed as exc:  # the figures are still printed, then the failure
                log_failure, sessions, events, lags, frozen = str(exc), 0, 0, [], []
            else:
                log_failure = ""
        except CheckFailed as exc:
            print(f"CHECK FAILED ({label}): {exc}", flush=True)
            fleet.procs.keep_logs = True
            print(f"# logs kept in {fleet.procs.folder}", flush=True)
            return 1
        finally:
            if log_failure:
                fleet.procs.keep_logs = True
            fleet.close()

        figure, single = median(fleets), median(singles)
        target = TARGET_JOBS_S.get(vendor)
        runs = ", ".join(f"{r:,.0f}" for r in fleets)
        if target:
            print(
                f"fleet throughput, {args.buses} buses ({label}): {figure:,.0f} jobs/s  "
                f"target >= {target:,.0f} jobs/s  "
                f"{verdict(figure >= target)}  (runs: {runs})",
                flush=True,
            )
        else:
            print(f"fleet throughput, {args.buses} buses ({label}): {figure:,.0f} jobs/s  (no target)  (runs: {runs})")
        ratio = figure / single
        print(
            f"single bus, same crawlers ({label}): {single:,.0f} jobs/s (runs: "
            f"{', '.join(f'{r:,.0f}' for r in singles)}); fleet / single: {ratio:.2f}  target >= {TARGET_RATIO:.2f}  "
            f"{verdict(ratio >= TARGET_RATIO)}",
            flush=True,
        )
        if takeovers:
            p50, p99, worst = percentile(takeovers, 50), percentile(takeovers, 99), max(takeovers)
            print(
                f"take-over, bus SIGKILLed -> each of its crawlers' next session ready ({label}): p50 {p50:.2f} s, "
                f"p99 {p99:.2f} s, max {worst:.2f} s over {len(takeovers)} crawlers in {args.kills} kills  "
                f"target p99 <= {TARGET_TAKEOVER_P99:g} s  {verdict(p99 <= TARGET_TAKEOVER_P99)}",
                flush=True,
            )
        if lease_takeovers:
            p50, p99, worst = percentile(lease_takeovers, 50), percentile(lease_takeovers, 99), max(lease_takeovers)
            print(
                f"take-over, bus SIGSTOPped (pid alive: lease expiry, as for a machine gone) -> each of its "
                f"crawlers' next session ready ({label}): p50 {p50:.2f} s, p99 {p99:.2f} s, max {worst:.2f} s over "
                f"{len(lease_takeovers)} crawlers in {args.stops} stops  target p99 <= {TARGET_TAKEOVER_P99:g} s  "
                f"{verdict(p99 <= TARGET_TAKEOVER_P99)}",
                flush=True,
            )
        worst_spread = max(spreads)
        print(
            f"endpoints per bus, max - min, settled ({label}): {worst_spread} at worst over {len(spreads)} "
            f"settlements  target <= {TARGET_SPREAD}  {verdict(worst_spread <= TARGET_SPREAD)}",
            flush=True,
        )
        if log_failure:
            print(f"CHECK FAILED ({label}): {log_failure}", flush=True)
            print(f"# logs kept in {fleet.procs.folder}", flush=True)
            return 1
        print(
            f"checks ({label}): every job succeeded with one outcome event, none leased; never two sessions "
            f"open to one crawler ({sessions} sessions, {events:,} connection-log events; a SIGSTOPped bus's "
            f"sessions excluded, see below): OK",
            flush=True,
        )
        if frozen:
            print(
                f"# excluded from that check: {len(frozen)} sessions of a SIGSTOPped bus, still open as the crawler "
                f"sees them (a frozen process cannot close its socket; docs/guarantees.md) after their successor was "
                f"ready, until the bus was SIGKILLed: {min(frozen):.2f}-{max(frozen):.2f} s",
                flush=True,
            )
        if lags:
            print(
                f"# a killed bus's session was noticed by its crawler after the next session was ready: "
                f"{len(lags)} times, at most {max(lags) * 1000:.0f} ms later",
                flush=True,
            )
        print(f"# {label} done; {load_line()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__)
    parser.set_defaults(db="postgres")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--crawlers", type=int, default=30)
    parser.add_argument("--slots", type=int, default=100, help="runcrawler --slots (default 100)")
    parser.add_argument("--buses", type=int, default=3)
    parser.add_argument("--runs", type=int, default=3, help="pairs of single-bus and fleet runs (default 3)")
    parser.add_argument("--kills", type=int, default=3, help="fleet runs with a bus SIGKILLed (default 3)")
    parser.add_argument(
        "--stops", type=int, default=3, help="fleet runs with a bus SIGSTOPped, then SIGKILLed (default 3)"
    )
    parser.add_argument("--kill-at", type=float, default=0.3, help="share of jobs succeeded at the kill or stop")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds a run may take at most")
    parser.add_argument("--log-level", default="INFO", help="LOG_LEVEL of runbus (default INFO)")
    args = parser.parse_args(argv)
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
