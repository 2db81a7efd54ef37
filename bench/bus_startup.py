"""Bus benchmark 4 (issue 3): process start to `hello` at the crawler, for `runbus` and `runserver`.

    python bench/bus_startup.py [--db sqlite|postgres|both] [--runs 5]

An in-process crawler (CrawlerPeer of tests/crawler_peer.py) listens on a
fresh Unix socket; the clock starts just before Popen of the command and stops
when the peer has read the bus's `hello` (the peer accepts, sends `welcome`,
reads `hello`). Commands, each with `--runs` runs after one untimed warm-up
run (bytecode and page cache warm, as on a server that restarts):

- `manage.py runbus --endpoint SOCK`
- `manage.py runserver 127.0.0.1:PORT` with BUS_ENDPOINTS=SOCK, as a user runs
  it: with the autoreloader, so the bus starts in the serving child process
  that the watcher spawns (Python and Django start twice)
- `manage.py runserver --noreload` (for comparison: one process)

Every process is ended after its run (runserver's process group, so the
autoreloader's child too). Median of the runs; target <= 1.5 s.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._django import throwaway_database  # noqa: E402
from bench._procs import (  # noqa: E402
    CheckFailed,
    Procs,
    backend_label,
    load_line,
    parser_for,
    per_backend,
    verdict,
)

TARGET_S = 1.5


def free_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_start(procs: Procs, kind: str) -> float:
    from tests.crawler_peer import CrawlerPeer

    sock = procs.socket_path()
    peer = CrawlerPeer(sock, name="bench-startup")
    try:
        if kind == "runbus":
            argv, env, group = ["runbus", "--endpoint", sock], procs.env(), False
        else:
            argv = ["runserver", f"127.0.0.1:{free_port()}"] + (["--noreload"] if kind.endswith("--noreload") else [])
            env, group = procs.env(BUS_ENDPOINTS=sock, BUS_AUTOSTART="true"), True
        started = time.monotonic()
        proc = procs.manage(*argv, env=env, new_session=group)
        try:
            peer.handshake(slots=1, timeout=30)
        except (AssertionError, OSError) as exc:
            raise CheckFailed(f"{kind}: no hello within 30 s ({exc}):\n{procs.log_text(proc)[-2000:]}") from None
        elapsed = time.monotonic() - started
        procs.started.remove(proc)
        procs.stop(proc)
        return elapsed
    finally:
        peer.shutdown()


def run_backend(args) -> int:
    with throwaway_database(args.db, postgres_url=args.postgres) as url:
        from django.db import connection

        label = backend_label(connection.vendor)
        print(f"# bus_startup on {label}: {args.runs} runs each after a warm-up; {load_line()}", flush=True)
        procs = Procs(url, keep_logs=args.keep_logs)
        try:
            for kind in ("runbus", "runserver", "runserver --noreload"):
                one_start(procs, kind)  # warm-up, not counted
                times = [one_start(procs, kind) for _ in range(args.runs)]
                figure = statistics.median(times)
                runs = ", ".join(f"{t:.2f}" for t in times)
                print(
                    f"process start to hello, {kind} ({label}): {figure:.2f} s  target <= {TARGET_S} s  "
                    f"{verdict(figure <= TARGET_S)}  (runs: {runs} s; {load_line()})",
                    flush=True,
                )
        except CheckFailed as exc:
            print(f"CHECK FAILED ({label}): {exc}", flush=True)
            return 1
        finally:
            procs.stop_all()
        print(f"# {label} done; {load_line()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    return per_backend(args, __file__, argv, run_backend)


if __name__ == "__main__":
    sys.exit(main())
