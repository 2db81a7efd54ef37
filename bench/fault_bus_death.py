"""Fault benchmark 1 (issue 4): a runbus holding 1,000 running jobs is SIGKILLed; how fast are they requeued?

    python bench/fault_bus_death.py [--db sqlite|postgres|both] [--jobs 1000] [--trials 5]

Bus A (`manage.py runbus` on endpoint 1, where `tests/crawler_peer.py --slots
1000 --heartbeat` takes every assignment and holds it, heartbeating so the
leases are renewed) holds `--jobs` running jobs and is SIGKILLed. Run with
HEARTBEAT_TIMEOUT=2 and BUS_SWEEP_INTERVAL=1 (so a lease lasts 4 s).

(a) Another bus requeues them. Bus B (runbus on endpoint 2, whose peer offers
    0 slots, so B is connected and sweeping but takes nothing and the
    requeued jobs stay `queued`) runs before the kill. Figure: kill to all N
    `queued`, a raw connection polling every `--interval` ms. Two variants:
      same-host  default node ids (host:pid): B sees the dead pid at its next
                 sweep; expected <= BUS_SWEEP_INTERVAL.
      explicit   BUS_NODE=bench-a / bench-b: only the lease expiry applies;
                 expected <= 2 x HEARTBEAT_TIMEOUT + BUS_SWEEP_INTERVAL.
    Target: <= lease expiry (2 x HEARTBEAT_TIMEOUT) + 2 s after the kill.
    A new bus A is started after each trial and takes the jobs again.
(b) A restarted bus requeues them. A runs with BUS_NODE=bench-a and no other
    bus; right after the kill a new runbus with the same BUS_NODE is started
    on endpoint 1 (start-up recovery). Figure: its Popen to all N jobs
    requeued. The restarted bus takes the jobs again the moment they are
    queued (its crawler has 1,000 free slots), so "requeued" is read from the
    `interrupt` events written in the same transaction as the move to
    `queued` (N new ones). Target: <= 1 s after its start.

Checked after each trial: exactly N new `interrupt` events, all with the
reason of the expected path (dead pid / lease expired / bus restarted), no
job left `running` by the dead bus, bus B still alive.
Reports median and max of `--trials` trials per variant, with the load average.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import ROOT, throwaway_database  # noqa: E402
from bench._procs import (  # noqa: E402
    CheckFailed,
    Poller,
    Procs,
    backend_label,
    check,
    enqueue_jobs,
    load_line,
    median,
    parser_for,
    per_backend,
    verdict,
    wait_for,
)

HEARTBEAT_TIMEOUT = 2.0
SWEEP_INTERVAL = 1.0
LEASE = 2 * HEARTBEAT_TIMEOUT
TARGET_OTHER_BUS = LEASE + 2.0  # seconds after the kill
TARGET_RESTART = 1.0  # seconds after the restarted bus's start

REASONS = {
    "same-host": "bus process",  # "bus process <pid> on this host is gone"
    "explicit": "lease expired",
    "restart": "bus restarted",
}


def held_peer(procs: Procs, path: str, slots: int) -> subprocess.Popen:
    """tests/crawler_peer.py holding its assignments, with heartbeats (so leases are renewed until the kill)."""
    return procs.start(
        [
            sys.executable,
            str(ROOT / "tests" / "crawler_peer.py"),
            "--listen",
            path,
            "--slots",
            str(slots),
            "--heartbeat",
        ],
        name="held",
        stdin=subprocess.PIPE,
    )


def last_event_id(poller: Poller) -> int:
    return int(poller.scalar("SELECT coalesce(max(id), 0) FROM jobs_jobevent"))


def interrupts_since(poller: Poller, mark: int) -> int:
    return int(poller.scalar("SELECT count(*) FROM jobs_jobevent WHERE kind = 'interrupt' AND id > %s", (mark,)))


def check_trial(poller: Poller, mark: int, jobs: int, variant: str, trial: int) -> None:
    poller.cursor.execute(
        "SELECT reason, count(*) FROM jobs_jobevent WHERE kind = 'interrupt' AND id > %s GROUP BY reason"
        if poller.vendor == "postgresql"
        else "SELECT reason, count(*) FROM jobs_jobevent WHERE kind = 'interrupt' AND id > ? GROUP BY reason",
        (mark,),
    )
    reasons = dict(poller.cursor.fetchall())
    total = sum(reasons.values())
    check(total == jobs, f"{variant} trial {trial}: {total} interrupt events, expected {jobs} ({reasons})")
    wrong = {reason: n for reason, n in reasons.items() if not reason.startswith(REASONS[variant])}
    check(not wrong, f"{variant} trial {trial}: requeued by an unexpected path: {wrong}")
    dup = int(
        poller.scalar(
            "SELECT count(*) FROM (SELECT job_id FROM jobs_jobevent WHERE kind = 'interrupt' AND id > %s "
            "GROUP BY job_id HAVING count(*) > 1) AS d",
            (mark,),
        )
    )
    check(dup == 0, f"{variant} trial {trial}: {dup} jobs interrupted twice")


def _log_times(log: str) -> dict[str, float]:
    """Wall-clock time of the first line of each event in a bus log (ts=...Z, millisecond precision)."""
    from datetime import datetime

    times: dict[str, float] = {}
    for line in log.splitlines():
        words = dict(word.split("=", 1) for word in line.split() if "=" in word and not word.startswith('"'))
        if "ts" in words and "event" in words and words["event"] not in times:
            try:
                at = datetime.strptime(words["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            except ValueError:
                continue
            times[words["event"]] = at.timestamp()
    return times


def startup_breakdown(log: str, started_wall: float) -> str:
    """Where the restarted bus's time went, from its own log: process start -> bus.connected / bus.started /
    bus.recovered_session (the start-up recovery's log line, written after its commit)."""
    times = _log_times(log)
    parts = [
        f"{event.split('.', 1)[1]} +{(times[event] - started_wall) * 1000:.0f} ms"
        for event in ("bus.connected", "bus.session_ready", "bus.started", "bus.recovered_session")
        if event in times
    ]
    return "log: " + ", ".join(parts)


def bus_env(procs: Procs, node: str | None) -> dict:
    extra = dict(HEARTBEAT_TIMEOUT=HEARTBEAT_TIMEOUT, BUS_SWEEP_INTERVAL=SWEEP_INTERVAL, BUS_BACKOFF_CAP="0.5")
    env = procs.env(**extra)
    env.pop("BUS_NODE", None)
    if node:
        env["BUS_NODE"] = node
    return env


def run_other_bus(procs: Procs, poller: Poller, args, variant: str) -> list[tuple[float, str]]:
    """(a): bus B requeues the jobs of the SIGKILLed bus A; samples of kill -> all N queued (s)."""
    node_a, node_b = ("bench-a", "bench-b") if variant == "explicit" else (None, None)
    sock1, sock2 = procs.socket_path(), procs.socket_path()
    peer1 = held_peer(procs, sock1, args.jobs)
    peer2 = held_peer(procs, sock2, 0)
    bus_b = procs.manage("runbus", "--endpoint", sock2, env=bus_env(procs, node_b))
    bus_a = procs.manage("runbus", "--endpoint", sock1, env=bus_env(procs, node_a))
    samples: list[tuple[float, str]] = []
    interval = args.interval / 1000
    try:
        wait_for(
            lambda: int(poller.scalar("SELECT count(*) FROM bus_bussession WHERE state = 'connected'")) >= 2,
            timeout=60,
            what="both buses connected",
        )
        for trial in range(1, args.trials + 1):
            wait_for(
                lambda: poller.count("running") == args.jobs,
                timeout=60,
                interval=0.02,
                what=f"{args.jobs} jobs running ({variant} trial {trial})",
            )
            time.sleep(args.settle)
            check(bus_b.poll() is None, "bus B exited")
            mark = last_event_id(poller)
            load = os.getloadavg()[0]
            killed_at = time.perf_counter()
            os.kill(bus_a.pid, signal.SIGKILL)
            # Reap it at once, as a supervisor would: an unreaped zombie still answers kill(pid, 0), and the
            # sweeper's dead-pid check would take it for a live bus (only the lease expiry would then apply).
            bus_a.wait(5)
            deadline = killed_at + 30
            while True:
                queued = poller.count("queued")
                now = time.perf_counter()
                if queued == args.jobs:
                    break
                check(
                    now < deadline, f"{variant} trial {trial}: only {queued} of {args.jobs} queued 30 s after the kill"
                )
                time.sleep(interval)
            samples.append((now - killed_at, f"{os.getloadavg()[0]:.1f}"))
            check_trial(poller, mark, args.jobs, variant, trial)
            check(poller.count("running") == 0, f"{variant} trial {trial}: jobs still running")
            check(bus_b.poll() is None, "bus B exited")
            if args.verbose:
                print(f"#   {variant} trial {trial}: {samples[-1][0]:.3f} s (load {load:.1f} at the kill)", flush=True)
            procs.started.remove(bus_a)
            if trial < args.trials:
                bus_a = procs.manage("runbus", "--endpoint", sock1, env=bus_env(procs, node_a))
    finally:
        for proc in (bus_a, bus_b, peer1, peer2):
            procs.stop(proc)
            if proc in procs.started:
                procs.started.remove(proc)
    return samples


def run_restart(procs: Procs, poller: Poller, args) -> list[tuple[float, float, str]]:
    """(b): a restarted bus of the same BUS_NODE; samples of (its start -> all N requeued, kill -> requeued)."""
    sock1 = procs.socket_path()
    peer1 = held_peer(procs, sock1, args.jobs)
    env = bus_env(procs, "bench-a")
    bus_a = procs.manage("runbus", "--endpoint", sock1, env=env)
    samples: list[tuple[float, float, str]] = []
    interval = args.interval / 1000
    try:
        for trial in range(1, args.trials + 1):
            wait_for(
                lambda: poller.count("running") == args.jobs,
                timeout=60,
                interval=0.02,
                what=f"{args.jobs} jobs running (restart trial {trial})",
            )
            time.sleep(args.settle)
            mark = last_event_id(poller)
            load = os.getloadavg()[0]
            killed_at = time.perf_counter()
            os.kill(bus_a.pid, signal.SIGKILL)
            bus_a.wait(5)
            procs.started.remove(bus_a)
            started_at, started_wall = time.perf_counter(), time.time()
            bus_a = procs.manage("runbus", "--endpoint", sock1, env=env)
            deadline = started_at + 30
            while True:
                done = interrupts_since(poller, mark)
                now = time.perf_counter()
                if done >= args.jobs:
                    break
                check(
                    now < deadline, f"restart trial {trial}: only {done} of {args.jobs} requeued 30 s after the restart"
                )
                time.sleep(interval)
            samples.append((now - started_at, now - killed_at, f"{os.getloadavg()[0]:.1f}"))
            check_trial(poller, mark, args.jobs, "restart", trial)
            check(bus_a.poll() is None, "the restarted bus exited")
            if args.verbose:
                # The recovery's log line is written just after its commit: give it a moment.
                for _ in range(20):
                    if "bus.recovered_session" in procs.log_text(bus_a):
                        break
                    time.sleep(0.05)
                print(
                    f"#   restart trial {trial}: {samples[-1][0]:.3f} s after its start "
                    f"({samples[-1][1]:.3f} s after the kill; load {load:.1f} at the kill); "
                    f"{startup_breakdown(procs.log_text(bus_a), started_wall)}",
                    flush=True,
                )
    finally:
        for proc in (bus_a, peer1):
            procs.stop(proc)
            if proc in procs.started:
                procs.started.remove(proc)
    return samples


def run_backend(args) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres) as url:
        from django.db import connection

        label = backend_label(connection.vendor)
        print(
            f"# fault_bus_death on {label}: {args.jobs} held jobs, {args.trials} trials per variant, poll every "
            f"{args.interval:g} ms; HEARTBEAT_TIMEOUT={HEARTBEAT_TIMEOUT:g} s (lease {LEASE:g} s), "
            f"BUS_SWEEP_INTERVAL={SWEEP_INTERVAL:g} s; {load_line()}",
            flush=True,
        )
        enqueue_jobs(args.jobs, max_interruptions=10 * args.trials + 10)
        procs = Procs(url, keep_logs=args.keep_logs)
        poller = Poller(url)
        status = 0
        try:
            results = {}
            for variant in args.variants:
                if variant == "restart":
                    results[variant] = run_restart(procs, poller, args)
                else:
                    results[variant] = run_other_bus(procs, poller, args, variant)
                # Leave all jobs queued for the next variant (SIGTERM of A requeued them).
                wait_for(lambda: poller.count("queued") == args.jobs, timeout=30, what="all jobs queued")
        except CheckFailed as exc:
            print(f"CHECK FAILED ({label}): {exc}", flush=True)
            if args.keep_logs:
                print(f"# logs in {procs.folder}", flush=True)
            return 1
        finally:
            poller.close()
            procs.stop_all()
        expected = {
            "same-host": f"expected <= BUS_SWEEP_INTERVAL ({SWEEP_INTERVAL:g} s)",
            "explicit": f"expected <= 2 x HEARTBEAT_TIMEOUT + BUS_SWEEP_INTERVAL ({LEASE + SWEEP_INTERVAL:g} s)",
        }
        for variant, samples in results.items():
            if variant == "restart":
                starts = [s[0] for s in samples]
                kills = [s[1] for s in samples]
                print(
                    f"# restart trials, start -> requeued (s): {', '.join(f'{s:.3f}' for s in starts)}; "
                    f"kill -> requeued: {', '.join(f'{s:.3f}' for s in kills)}; "
                    f"load after each: {', '.join(s[2] for s in samples)}",
                    flush=True,
                )
                worst = max(starts)
                print(
                    f"restarted bus ({label}, BUS_NODE kept, {args.jobs} jobs, {len(starts)} trials): its start to "
                    f"all requeued median {median(starts):.3f} s, max {worst:.3f} s  target <= "
                    f"{TARGET_RESTART:g} s after its start  {verdict(worst <= TARGET_RESTART)}",
                    flush=True,
                )
            else:
                values = [s[0] for s in samples]
                print(
                    f"# {variant} trials, kill -> all queued (s): {', '.join(f'{s:.3f}' for s in values)}; "
                    f"load after each: {', '.join(s[1] for s in samples)}",
                    flush=True,
                )
                worst = max(values)
                print(
                    f"other bus requeues, {variant} node ids ({label}, {args.jobs} jobs, {len(values)} trials): "
                    f"kill to all queued median {median(values):.3f} s, max {worst:.3f} s ({expected[variant]})  "
                    f"target <= lease expiry + 2 s = {TARGET_OTHER_BUS:g} s  {verdict(worst <= TARGET_OTHER_BUS)}",
                    flush=True,
                )
        print(f"# {label} done; {load_line()}", flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--jobs", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--interval", type=float, default=5.0, help="poll interval in ms (default 5)")
    parser.add_argument(
        "--settle",
        type=float,
        default=1.5,
        help="seconds between all jobs running and the kill (default 1.5: past one heartbeat)",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=("same-host", "explicit", "restart"),
        default=["same-host", "explicit", "restart"],
    )
    parser.add_argument("--verbose", action="store_true", help="print each trial")
    args = parser.parse_args(argv)
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
