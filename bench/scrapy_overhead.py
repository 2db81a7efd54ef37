"""Scrapy add-on overhead (issue 12): pages/s through the add-on against plain `scrapy crawl`, same run.

    python bench/scrapy_overhead.py [--db sqlite|postgres|both] [--pages 2000] [--runs 3]

One local site (tests/scrapy_site.py, in this process, HTTP/1.1 keep-alive)
serves `--pages` pages /b/<i> of 2 KB without links. Each run measures, on
fresh tables and processes:

- add-on: `manage.py runbus` and one `scrapy crawl site` of
  tests/scrapy_project with the add-on (JOBSITE_LISTEN on a Unix socket), one
  job per URL (queued before the bus starts, not timed). Pages/s = pages /
  (from the site's first request for a /b/ page to the moment the
  benchmark's poll, every 50 ms, sees every job `succeeded`): the outcome's
  way back to the database counts against the add-on.
- plain: the same spider and project, stock Scrapy (`-s ADDONS={}`; the two
  control ports off as the add-on turns them off), the same URLs as
  start_urls (`-a start_file`). Pages/s = pages / (the site's first /b/
  request to its last).

Both with CONCURRENT_REQUESTS=16 and CONCURRENT_REQUESTS_PER_DOMAIN=16 (one
site): the add-on then takes 16 jobs at a time, as many pages as plain
Scrapy downloads at once. The order of the two alternates per run. Checked:
every page fetched exactly once per run; every job succeeded at attempt 1
with one item. Median of `--runs`; target: overhead <= 10 %.

Also printed, to tell the add-on's own cost from the control plane's: the
Scrapy process's CPU time per page (utime + stime from /proc, sampled when
the site sees the first page request and when the run's clock stops), and
for the add-on the CPU of runbus over the same window. On this 2-core
machine the bus and its database compete with Scrapy and the site for the
cores; in production they run elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import ROOT, throwaway_database  # noqa: E402
from bench._procs import (  # noqa: E402
    CheckFailed,
    Poller,
    Procs,
    backend_label,
    check,
    empty_tables,
    load_line,
    median,
    parser_for,
    per_backend,
    proc_cpu_seconds,
    verdict,
)
from tests.scrapy_site import SiteServer  # noqa: E402

PROJECT = ROOT / "tests" / "scrapy_project"
TARGET_OVERHEAD = 0.10
POLL_INTERVAL = 0.05
SCRAPY_SETTINGS = ("CONCURRENT_REQUESTS=16", "CONCURRENT_REQUESTS_PER_DOMAIN=16", "LOG_LEVEL=INFO")


def scrapy_argv(*extra: str) -> list[str]:
    argv = [sys.executable, "-m", "scrapy", "crawl", "site"]
    for setting in SCRAPY_SETTINGS:
        argv += ["-s", setting]
    return argv + list(extra)


def start_scrapy(procs: Procs, argv: list[str], name: str) -> subprocess.Popen:
    log = open(procs.folder / f"{name}-{len(procs.started)}.log", "wb")
    env = procs.env(PYTHONPATH=str(ROOT))
    env.pop("JOBSITE_LISTEN", None)
    proc = subprocess.Popen(argv, cwd=PROJECT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    procs.started.append(proc)
    return proc


def page_span(site: SiteServer, prefix: str, pages: int) -> float:
    """Seconds from the site's first request under `prefix` to its last; each page fetched once."""
    with site.lock:
        times = [at for at, path in site.times if path.startswith(prefix)]
        counts = [count for path, count in site.hits.items() if path.startswith(prefix)]
    check(len(times) == pages and set(counts) == {1}, f"{len(times)} requests for {pages} pages under {prefix}")
    return max(times) - min(times)


def requests_seen(site: SiteServer, prefix: str) -> int:
    with site.lock:
        return sum(1 for _, path in site.times if path.startswith(prefix))


class CpuWindow:
    """CPU seconds processes spend between start() and stop(), from /proc (sampled while they run)."""

    def __init__(self, *procs: subprocess.Popen):
        self.procs = procs
        self.begin: list[float] | None = None
        self.spent: list[float] | None = None

    def start(self) -> None:
        if self.begin is None:
            self.begin = [proc_cpu_seconds(proc.pid) for proc in self.procs]

    def stop(self) -> None:
        if self.begin is not None and self.spent is None:
            self.spent = [proc_cpu_seconds(proc.pid) - b for proc, b in zip(self.procs, self.begin)]


def plain_run(site: SiteServer, url: str, args, number: int) -> tuple[float, CpuWindow]:
    prefix = f"/b/p{number}/"
    procs = Procs(url, keep_logs=args.keep_logs)
    try:
        start_file = procs.folder / "urls.txt"
        start_file.write_text("".join(site.url(f"{prefix}{i}") + "\n" for i in range(args.pages)))
        stock = ("-s", "ADDONS={}", "-s", "TELNETCONSOLE_ENABLED=False", "-s", "REMOTE_CONTROL_ENABLED=False")
        proc = start_scrapy(procs, scrapy_argv(*stock, "-a", f"start_file={start_file}"), "plain")
        cpu = CpuWindow(proc)
        deadline = time.monotonic() + args.timeout
        while proc.poll() is None:
            seen = requests_seen(site, prefix)
            if seen:
                cpu.start()
            if seen >= args.pages:
                cpu.stop()  # the last page is requested: what is left is its answer and the shutdown
            check(time.monotonic() < deadline, f"plain scrapy crawl did not finish within {args.timeout} s")
            time.sleep(0.01)
        status = proc.wait()
        check(status == 0, f"plain scrapy crawl exited with {status}:\n{procs.log_text(proc)[-2000:]}")
        check(cpu.spent is not None, "the plain crawl ended before its CPU could be sampled")
        return args.pages / page_span(site, prefix, args.pages), cpu
    finally:
        procs.stop_all()


def addon_run(site: SiteServer, url: str, args, number: int) -> tuple[float, CpuWindow]:
    from jobs import services

    prefix = f"/b/a{number}/"
    empty_tables()
    for start in range(0, args.pages, 5000):
        urls = [site.url(f"{prefix}{i}") for i in range(start, min(args.pages, start + 5000))]
        services.enqueue_many(urls=urls, actor="bench")
    procs = Procs(url, keep_logs=args.keep_logs)
    poller = Poller(url)
    try:
        sock = procs.socket_path()
        crawler = start_scrapy(procs, scrapy_argv("-s", f"JOBSITE_LISTEN=unix:{sock}"), "addon")
        deadline = time.monotonic() + 60
        while not os.path.exists(sock):
            check(crawler.poll() is None, f"scrapy exited:\n{procs.log_text(crawler)[-2000:]}")
            check(time.monotonic() < deadline, "scrapy did not listen within 60 s")
            time.sleep(POLL_INTERVAL)
        runbus = procs.manage("runbus", "--endpoint", sock)
        cpu = CpuWindow(crawler, runbus)
        deadline = time.monotonic() + args.timeout
        done_at = None
        while time.monotonic() < deadline:
            if requests_seen(site, prefix):
                cpu.start()
            if poller.count("succeeded") >= args.pages:
                done_at = time.monotonic()
                cpu.stop()
                break
            check(runbus.poll() is None, f"runbus exited:\n{procs.log_text(runbus)[-2000:]}")
            check(crawler.poll() is None, f"scrapy exited:\n{procs.log_text(crawler)[-2000:]}")
            time.sleep(POLL_INTERVAL)
        check(done_at is not None, f"not all {args.pages} jobs succeeded within {args.timeout} s")
        check(int(poller.scalar("SELECT count(*) FROM jobs_job WHERE attempt <> 1")) == 0, "a job ran twice")
        poller.cursor.execute("SELECT result FROM jobs_job")
        results = [json.loads(r) if isinstance(r, str) else r for (r,) in poller.cursor.fetchall()]
        one_item = sum(1 for result in results if result and result.get("items") == 1)
        check(one_item == args.pages, f"{one_item} of {args.pages} results with one item")
        page_span(site, prefix, args.pages)  # each page fetched once
        with site.lock:
            first = min(at for at, path in site.times if path.startswith(prefix))
        return args.pages / (done_at - first), cpu
    finally:
        poller.close()
        procs.stop_all()


def run_backend(args) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres) as url, SiteServer() as site:
        from django.db import connection

        label = backend_label(connection.vendor)
        print(
            f"# scrapy_overhead on {label}: {args.pages} pages, scrapy crawl with the add-on (bus, one session) "
            f"vs plain start_urls; {' '.join(SCRAPY_SETTINGS)}; {load_line()}",
            flush=True,
        )
        addon: list[float] = []
        plain: list[float] = []
        cpu_addon: list[float] = []  # Scrapy ms per page
        cpu_bus: list[float] = []
        cpu_plain: list[float] = []
        try:
            for number in range(1, args.runs + 1):
                order = ("addon", "plain") if number % 2 else ("plain", "addon")
                for mode in order:
                    if mode == "addon":
                        rate, cpu = addon_run(site, url, args, number)
                        addon.append(rate)
                        assert cpu.spent is not None
                        cpu_addon.append(cpu.spent[0] * 1000 / args.pages)
                        cpu_bus.append(cpu.spent[1] * 1000 / args.pages)
                    else:
                        rate, cpu = plain_run(site, url, args, number)
                        plain.append(rate)
                        assert cpu.spent is not None
                        cpu_plain.append(cpu.spent[0] * 1000 / args.pages)
                print(
                    f"#   run {number}: add-on {addon[-1]:,.0f} pages/s, plain {plain[-1]:,.0f} pages/s; "
                    f"Scrapy CPU {cpu_addon[-1]:.2f} vs {cpu_plain[-1]:.2f} ms/page, runbus {cpu_bus[-1]:.2f} ms/page; "
                    f"{load_line()}",
                    flush=True,
                )
        except CheckFailed as exc:
            print(f"CHECK FAILED ({label}): {exc}", flush=True)
            return 1
        through, alone = median(addon), median(plain)
        overhead = 1 - through / alone
        print(
            f"Scrapy add-on ({label}): {through:,.0f} pages/s through the add-on, {alone:,.0f} pages/s plain; "
            f"overhead {overhead:.1%}  target overhead <= {TARGET_OVERHEAD:.0%}  {verdict(overhead <= TARGET_OVERHEAD)}"
            f"  (add-on runs: {_figures(addon)}; plain runs: {_figures(plain)})",
            flush=True,
        )
        print(
            f"# CPU per page ({label}): Scrapy with the add-on {median(cpu_addon):.2f} ms, plain "
            f"{median(cpu_plain):.2f} ms (x{median(cpu_addon) / median(cpu_plain):.2f}); runbus "
            f"{median(cpu_bus):.2f} ms",
            flush=True,
        )
    return 0


def _figures(rates: list[float]) -> str:
    return ", ".join(f"{rate:,.0f}" for rate in rates)


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--pages", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds a run may take at most")
    args = parser.parse_args(argv)
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
