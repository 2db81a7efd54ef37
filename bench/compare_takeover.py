"""Take-over comparison (issue "fleets"): a job held by a dead worker process, jobsite vs procrastinate.

    python bench/compare_takeover.py [--repeats 5] [--cap 180] [--cron "* * * * *"]
                                     [--venv /tmp/procrastinate-venv] [--sequential]
                                     [--only jobsite|procrastinate]

The figure: seconds from the moment the process holding a running job dies (or
freezes) until the job is available to run again, polled every 10 ms from the
database. Both sides run in the same invocation, each on throwaway databases
of the same PostgreSQL server.

jobsite: 2 `runbus` (no --endpoint, the fleet registry) and 1 `runcrawler
--slots 1 --noop --noop-delay-ms 60000 --resume-grace 0` registered with
jobs.fleet.add_crawler; 1 job queued and left to run; then the bus that owns
the crawler (Crawler.owner, "host:pid~suffix") is
- SIGKILLed and reaped at once, as a supervisor would ("kill": a dead process
  on this machine, seen from its pid), or
- SIGSTOPped ("stop": a frozen process or another machine; the survivor waits
  for the node lease, BUS_OWNER_LEASE = 1.5 s on PostgreSQL), then SIGKILLed
  once measured;
until the job is back in `queued` or re-leased (running under another
lease_session). Everything is started afresh for each repeat.

procrastinate (3.10.0, in its own venv, run by that interpreter in a child
process): its documented setup for stalled jobs, docs/howto/production/
retry_stalled_jobs.md ("Retry stalled jobs"): workers with their default
heartbeat (update_heartbeat_interval=10 s, stalled_worker_timeout=30 s) and the
documented periodic task

    @app.periodic(cron=CRON)
    @app.task(queueing_lock="retry_stalled_jobs", pass_context=True)
    async def retry_stalled_jobs(context, timestamp):
        stalled_jobs = await app.job_manager.get_stalled_jobs()   # seconds_since_heartbeat=30
        for job in stalled_jobs:
            await app.job_manager.retry_job(job)

The documentation's example runs it every 10 minutes (cron "*/10 * * * *");
here every minute by default (--cron), cron's finest step. 2 `procrastinate
worker` (defaults: concurrency 1, LISTEN/NOTIFY), 1 task that sleeps 60 s;
the worker running it (its pid written by the task) is SIGKILLed; measured
until the job leaves `doing` or is `doing` under another worker (the survivor
picks a retried job up at once). A repeat that does not get there within
--cap seconds counts as "> cap". Each repeat has a fresh database.

By default the two sides run at the same time (the procrastinate side is idle
but for its heartbeats, and waits on the clock); --sequential runs them one
after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import DEFAULT_POSTGRES_URL  # noqa: E402
from bench._procs import CheckFailed, Procs, check, load_line, median, wait_for  # noqa: E402

PROCRASTINATE_VERSION = "3.10.0"
DEFAULT_VENV = "/tmp/procrastinate-venv"
POLL = 0.01  # seconds between two polls of the job's row
NOOP_DELAY_MS = "60000"  # the job takes a minute: it is still running when its holder dies
SETTLE_TIMEOUT = 60.0

# The procrastinate app, written to the child's temp folder (imported by its workers by name).
PROCRASTINATE_APP = """\
import os
import time

from procrastinate import App, PsycopgConnector

app = App(connector=PsycopgConnector(conninfo=os.environ["TAKEOVER_DSN"]))


@app.task(name="sleeper")
def sleeper(pid_file):
    with open(pid_file, "w") as out:
        out.write(str(os.getpid()))
    time.sleep(60)


# docs/howto/production/retry_stalled_jobs.md, as written there but for the cron.
@app.periodic(cron=os.environ["TAKEOVER_CRON"])
@app.task(queueing_lock="retry_stalled_jobs", pass_context=True)
async def retry_stalled_jobs(context, timestamp):
    stalled_jobs = await app.job_manager.get_stalled_jobs()
    for job in stalled_jobs:
        await app.job_manager.retry_job(job)
"""


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def figures(samples: list[float | None], cap: float) -> tuple[str, str, float | None]:
    """'median', 'max' as text (a repeat past the cap counts as > cap) and the median in seconds (None: > cap)."""
    values = [cap if value is None else value for value in samples]
    middle, worst = median(values), max(values)
    over = any(value is None for value in samples)
    med_text = f"> {cap:g} s" if over and middle >= cap else f"{middle:.3f} s"
    max_text = f"> {cap:g} s" if over else f"{worst:.3f} s"
    return med_text, max_text, (None if over and middle >= cap else middle)


def kill_now(proc: subprocess.Popen) -> None:
    """SIGKILL one of our processes (and reap it); the teardown between repeats need not be graceful."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


# --- procrastinate, in the child process (the venv's interpreter) -------------------------------


def procrastinate_child(args) -> int:
    import psycopg

    procs = Procs(args.postgres, keep_logs=args.keep_logs)
    (procs.folder / "takeover_app.py").write_text(PROCRASTINATE_APP)
    cli = str(Path(sys.executable).parent / "procrastinate")
    server = psycopg.connect(args.postgres, autocommit=True)
    samples: list[float | None] = []
    try:
        for number in range(1, args.repeats + 1):
            name = f"takeover_procrastinate_{os.getpid()}_{number}"
            server.execute(f'DROP DATABASE IF EXISTS "{name}"')
            server.execute(f'CREATE DATABASE "{name}"')
            dsn = with_database(args.postgres, name)
            env = dict(os.environ, TAKEOVER_DSN=dsn, TAKEOVER_CRON=args.cron, PYTHONPATH=str(procs.folder))
            env.pop("PROCRASTINATE_APP", None)
            workers: list[subprocess.Popen] = []
            try:
                app = ["--app=takeover_app.app"]
                subprocess.run([cli, *app, "schema", "--apply"], env=env, check=True, capture_output=True)
                workers = [procs.start([cli, *app, "worker"], env=env, name="worker") for _ in range(2)]
                db = psycopg.connect(dsn, autocommit=True)
                try:

                    def scalar(sql: str, params=()):
                        return db.execute(sql, params).fetchone()

                    def all_alive() -> bool:
                        for worker in workers:
                            check(worker.poll() is None, f"a worker exited:\n{procs.log_text(worker)[-2000:]}")
                        return True

                    wait_for(
                        lambda: all_alive() and scalar("SELECT count(*) FROM procrastinate_workers")[0] >= 2,
                        timeout=SETTLE_TIMEOUT,
                        what="2 procrastinate workers registered",
                    )
                    pid_file = procs.folder / f"sleeper-{number}.pid"
                    subprocess.run(
                        [cli, *app, "defer", "sleeper", json.dumps({"pid_file": str(pid_file)})],
                        env=env,
                        check=True,
                        capture_output=True,
                    )
                    job_id = scalar("SELECT id FROM procrastinate_jobs WHERE task_name = 'sleeper'")[0]
                    wait_for(
                        lambda: (
                            scalar("SELECT status FROM procrastinate_jobs WHERE id = %s", (job_id,))[0] == "doing"
                            and pid_file.exists()
                            and pid_file.read_text().strip() != ""
                        ),
                        timeout=SETTLE_TIMEOUT,
                        interval=POLL,
                        what="the sleeper job running",
                    )
                    worker_id = scalar("SELECT worker_id FROM procrastinate_jobs WHERE id = %s", (job_id,))[0]
                    pid = int(pid_file.read_text())
                    victim = next((w for w in workers if w.pid == pid), None)
                    check(victim is not None, f"the job runs in pid {pid}, not one of our workers")
                    killed = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    victim.wait(10)
                    deadline = killed + args.cap
                    sample = None
                    while time.monotonic() < deadline:
                        status, now_worker = scalar(
                            "SELECT status, worker_id FROM procrastinate_jobs WHERE id = %s", (job_id,)
                        )
                        if status != "doing" or (now_worker is not None and now_worker != worker_id):
                            sample = time.monotonic() - killed
                            break
                        time.sleep(POLL)
                    events = [
                        row[0]
                        for row in db.execute(
                            "SELECT type::text FROM procrastinate_events WHERE job_id = %s ORDER BY id", (job_id,)
                        ).fetchall()
                    ]
                    if sample is not None:
                        check("deferred_for_retry" in events, f"job {job_id} left doing without a retry: {events}")
                    samples.append(sample)
                    shown = f"> {args.cap:g} s" if sample is None else f"{sample:.3f} s"
                    print(
                        f"#   procrastinate repeat {number}: worker SIGKILLed -> job retried: {shown} "
                        f"(events {', '.join(events)}); {load_line()}",
                        flush=True,
                    )
                finally:
                    db.close()
            finally:
                for worker in workers:
                    kill_now(worker)
                server.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    except CheckFailed as exc:
        print(f"CHECK FAILED (procrastinate): {exc}", flush=True)
        procs.keep_logs = True
        print(f"# logs kept in {procs.folder}", flush=True)
        return 1
    finally:
        server.close()
        procs.stop_all()
    print("RESULT " + json.dumps({"samples": samples}), flush=True)
    return 0


def ensure_venv(venv: Path) -> Path:
    """The procrastinate venv (never the project's): created and filled once, reused after."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m, psycopg; print(m.version('procrastinate'))"]
    if python.exists():
        found = subprocess.run(probe, capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == PROCRASTINATE_VERSION:
            return python
    print(f"# installing procrastinate=={PROCRASTINATE_VERSION} into {venv}", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", f"procrastinate=={PROCRASTINATE_VERSION}", "psycopg[binary]"],
        check=True,
    )
    return python


def start_procrastinate(args, python: Path, log: Path) -> subprocess.Popen:
    argv = [
        str(python),
        str(Path(__file__).resolve()),
        "--procrastinate-child",
        "--postgres",
        args.postgres,
        "--repeats",
        str(args.repeats),
        "--cap",
        str(args.cap),
        "--cron",
        args.cron,
    ]
    if args.keep_logs:
        argv.append("--keep-logs")
    out = open(log, "wb")
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    finally:
        out.close()


def finish_procrastinate(proc: subprocess.Popen, log: Path) -> list[float | None] | None:
    proc.wait()
    text = log.read_text(errors="replace")
    samples = None
    for line in text.splitlines():
        if line.startswith("RESULT "):
            samples = json.loads(line[len("RESULT ") :])["samples"]
        else:
            print(line, flush=True)
    return samples


# --- jobsite, in this process --------------------------------------------------------------------


class JobsiteSide:
    def __init__(self, url: str, args):
        from bench._procs import Poller

        self.args = args
        self.procs = Procs(url, keep_logs=args.keep_logs)
        self.poller = Poller(url)
        self.bus_env = self.procs.env(LOG_LEVEL=args.log_level)
        self.bus_env.pop("BUS_NODE", None)  # node = host:pid

    def row(self, sql: str, params=()) -> tuple:
        self.poller.cursor.execute(sql, params)
        return self.poller.cursor.fetchone()

    def one(self, mode: str, number: int) -> float:
        from bench._procs import empty_tables, enqueue_jobs
        from jobs import fleet

        empty_tables()
        self.poller.cursor.execute("DELETE FROM jobs_crawler")
        self.poller.cursor.execute("DELETE FROM jobs_busnode")
        sock = self.procs.socket_path()
        crawler = self.procs.manage(
            "runcrawler",
            "--listen",
            sock,
            "--slots",
            "1",
            "--noop",
            "--noop-delay-ms",
            NOOP_DELAY_MS,
            "--resume-grace",
            "0",
            env=self.procs.env(LOG_LEVEL="WARNING"),
        )
        buses: list[subprocess.Popen] = []
        try:
            wait_for(
                lambda: os.path.exists(sock) or check(crawler.poll() is None, "runcrawler exited"),
                timeout=SETTLE_TIMEOUT,
                what="the crawler listening",
            )
            fleet.add_crawler(endpoint=sock, label=f"takeover-{number}")
            buses = [self.procs.manage("runbus", env=self.bus_env) for _ in range(2)]

            def owner_pid() -> int | None:
                found = self.row("SELECT owner, session FROM jobs_crawler")
                if not found or not found[0] or found[1] is None:
                    return None
                pid = int(found[0].rsplit(":", 1)[1].split("~", 1)[0])
                return pid if pid in {bus.pid for bus in buses} else None

            def buses_alive() -> bool:
                for bus in buses:
                    check(bus.poll() is None, f"runbus exited:\n{self.procs.log_text(bus)[-2000:]}")
                return True

            wait_for(
                lambda: buses_alive() and owner_pid() is not None,
                timeout=SETTLE_TIMEOUT,
                what="the crawler owned and connected",
            )
            (job_id,) = enqueue_jobs(1)
            wait_for(
                lambda: self.row("SELECT status FROM jobs_job WHERE id = %s", (job_id,))[0] == "running",
                timeout=SETTLE_TIMEOUT,
                interval=POLL,
                what="the job running",
            )
            session = self.row("SELECT lease_session FROM jobs_job WHERE id = %s", (job_id,))[0]
            pid = owner_pid()
            check(pid is not None, "the crawler has no live owner while its job runs")
            victim = next(bus for bus in buses if bus.pid == pid)
            started = time.monotonic()
            if mode == "kill":
                os.kill(pid, signal.SIGKILL)
                victim.wait(10)  # reaped at once: a zombie still answers kill(pid, 0)
            else:
                os.kill(pid, signal.SIGSTOP)
            deadline = started + self.args.cap
            sample = None
            try:
                while time.monotonic() < deadline:
                    status, lease = self.row("SELECT status, lease_session FROM jobs_job WHERE id = %s", (job_id,))
                    if status == "queued" or (status == "running" and lease != session):
                        sample = time.monotonic() - started
                        break
                    check(status == "running", f"job {job_id} went {status}")
                    time.sleep(POLL)
            finally:
                if mode == "stop":
                    os.kill(pid, signal.SIGKILL)  # a stopped process dies of SIGKILL without running again
                    victim.wait(10)
            check(sample is not None, f"job {job_id} not available again within {self.args.cap:g} s")
            status, lease = self.row("SELECT status, lease_session FROM jobs_job WHERE id = %s", (job_id,))
            print(
                f"#   jobsite {mode} {number}: bus {'SIGKILLed' if mode == 'kill' else 'SIGSTOPped'} -> job "
                f"{'queued' if status == 'queued' else 're-leased' if status == 'running' else status}: "
                f"{sample:.3f} s; {load_line()}",
                flush=True,
            )
            return sample
        finally:
            for bus in buses:
                kill_now(bus)
            kill_now(crawler)

    def close(self) -> None:
        self.poller.close()
        self.procs.stop_all()


def run_jobsite(args) -> dict[str, list[float]] | None:
    from bench._django import throwaway_database

    with throwaway_database("postgres", postgres_url=args.postgres) as url:
        side = JobsiteSide(url, args)
        results: dict[str, list[float]] = {"kill": [], "stop": []}
        try:
            for number in range(1, args.repeats + 1):
                for mode in ("kill", "stop"):
                    results[mode].append(side.one(mode, number))
        except CheckFailed as exc:
            print(f"CHECK FAILED (jobsite): {exc}", flush=True)
            side.procs.keep_logs = True
            print(f"# logs kept in {side.procs.folder}", flush=True)
            return None
        finally:
            side.close()
    return results


def others_running() -> str:
    """Other benchmarks on this machine (not ours), for the record: the figures are noisy then."""
    mine = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == mine:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "bench/" in cmd and "compare_takeover" not in cmd:
            found.append(cmd.strip()[:80])
    return "; ".join(sorted(set(found))) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default=DEFAULT_POSTGRES_URL, metavar="URL")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of each measurement (default 5)")
    parser.add_argument("--cap", type=float, default=180.0, help="seconds one repeat may wait at most (default 180)")
    parser.add_argument(
        "--cron",
        default="* * * * *",
        help='procrastinate\'s retry_stalled_jobs schedule (default every minute; its docs: "*/10 * * * *")',
    )
    parser.add_argument("--venv", default=DEFAULT_VENV, help=f"procrastinate's venv (default {DEFAULT_VENV})")
    parser.add_argument("--sequential", action="store_true", help="run the two sides one after the other")
    parser.add_argument("--only", choices=("jobsite", "procrastinate"), default=None)
    parser.add_argument("--log-level", default="WARNING", help="LOG_LEVEL of runbus (default WARNING)")
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs (their folder is printed)")
    parser.add_argument("--procrastinate-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.procrastinate_child:
        return procrastinate_child(args)

    started = time.monotonic()
    print(
        f"# take-over of a job whose holder died: jobsite vs procrastinate {PROCRASTINATE_VERSION}; "
        f"{args.repeats} repeats each, poll {POLL * 1000:.0f} ms, cap {args.cap:g} s; procrastinate "
        f"retry_stalled_jobs cron {args.cron!r}; {'sequential' if args.sequential else 'both sides at once'}; "
        f"{load_line()}; other benchmarks running: {others_running()}",
        flush=True,
    )
    child, child_log, psamples = None, None, None
    if args.only != "jobsite":
        python = ensure_venv(Path(args.venv))
        child_log = Path(f"/tmp/compare-takeover-procrastinate-{os.getpid()}.log")
        child = start_procrastinate(args, python, child_log)
        if args.sequential or args.only == "procrastinate":
            psamples = finish_procrastinate(child, child_log)
            child = None
    jresults = None
    try:
        if args.only != "procrastinate":
            jresults = run_jobsite(args)
    finally:
        if child is not None:
            if jresults is None and args.only != "procrastinate":
                child.terminate()
            psamples = finish_procrastinate(child, child_log)
        if child_log is not None:
            child_log.unlink(missing_ok=True)

    status = 0
    jkill = None
    if jresults:
        for mode, label in (("kill", "bus SIGKILLed (dead pid seen)"), ("stop", "bus SIGSTOPped (node lease)")):
            med, worst, value = figures(jresults[mode], args.cap)
            runs = ", ".join(f"{v:.3f}" for v in jresults[mode])
            print(f"jobsite, {label} -> job available again: median {med}, max {worst}  (runs: {runs})", flush=True)
            if mode == "kill":
                jkill = value
        jstop = median(jresults["stop"])
    else:
        status = 1 if args.only != "procrastinate" else status
    if psamples:
        med, worst, pvalue = figures(psamples, args.cap)
        runs = ", ".join(f"> {args.cap:g}" if v is None else f"{v:.3f}" for v in psamples)
        print(
            f"procrastinate, worker SIGKILLed -> job retried (cron {args.cron!r}, get_stalled_jobs defaults): "
            f"median {med}, max {worst}  (runs: {runs})",
            flush=True,
        )
        if jresults:
            for label, base in (("SIGKILL", jkill), ("SIGSTOP", jstop)):
                if pvalue is None:
                    print(f"ratio procrastinate / jobsite ({label}), medians: > {args.cap / base:,.0f}", flush=True)
                else:
                    print(f"ratio procrastinate / jobsite ({label}), medians: {pvalue / base:,.0f}", flush=True)
    elif args.only != "jobsite":
        status = 1
    print(f"# done in {time.monotonic() - started:.0f} s; {load_line()}; other benchmarks: {others_running()}")
    return status


if __name__ == "__main__":
    sys.exit(main())
