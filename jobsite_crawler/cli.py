"""The reference crawler's command line: `python -m jobsite_crawler` and `manage.py runcrawler`.

Both take the same options; they differ in where the defaults come from:
the environment here (BUS_TOKEN, BUS_MAX_FRAME, CRAWLER_USER_AGENT), the
Django settings for runcrawler (which read the same variables).

SIGTERM or SIGINT says bye on every session and exits 0; a second SIGINT
exits at once. With --announce it registers itself with jobsite once it
listens and deregisters at that clean exit; --connection-log keeps a JSON
line per session and job event.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .announce import Announcer
from .argtypes import seconds, whole_number
from .crawler import ConnectionLog, Crawler
from .endpoints import Endpoint, EndpointError, parse_endpoint, parse_endpoints
from .fetch import DEFAULT_MAX_BYTES, DEFAULT_MAX_REDIRECTS, DEFAULT_TIMEOUT, USER_AGENT, Fetcher
from .logfmt import KeyValueFormatter, kv
from .wire import DEFAULT_MAX_FRAME

log = logging.getLogger("jobsite_crawler.cli")


class UsageError(Exception):
    """A bad option or combination of options: print it and exit 2."""


@dataclass(frozen=True)
class Defaults:
    token: str
    max_frame: int
    user_agent: str

    @classmethod
    def from_environment(cls, environ: Any = os.environ) -> Defaults:
        text = environ.get("BUS_MAX_FRAME", "")
        try:
            max_frame = int(text) if text else DEFAULT_MAX_FRAME
        except ValueError:
            raise UsageError(f"BUS_MAX_FRAME={text!r}: expected a whole number of bytes") from None
        if max_frame < 1024:
            raise UsageError(f"BUS_MAX_FRAME={text!r}: must be at least 1024 bytes")
        return cls(
            token=environ.get("BUS_TOKEN", ""),
            max_frame=max_frame,
            user_agent=environ.get("CRAWLER_USER_AGENT", "") or USER_AGENT,
        )


_count = whole_number(minimum=0)
_seconds = seconds(allow_zero=False)


def _delay_range_ms(text: str) -> tuple[float, float]:
    """`MIN-MAX` or `N` milliseconds, returned as seconds."""
    low_text, _, high_text = text.partition("-")
    try:
        low = float(low_text)
        high = float(high_text) if high_text else low
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN-MAX milliseconds, e.g. 5-50") from None
    if not 0 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 <= MIN <= MAX")
    return low / 1000, high / 1000


def _advertised(listening: list[Endpoint], advertise: str | None) -> str:
    """The endpoint to announce, spelled as the bus names it (unix:/path, tcp://host:port)."""
    if advertise is not None:
        try:
            return str(parse_endpoint(advertise))
        except EndpointError as exc:
            raise UsageError(f"--advertise: {exc}") from None
    if len(listening) > 1:
        raise UsageError("--announce with several --listen: name the endpoint to announce with --advertise")
    endpoint = listening[0]
    if endpoint.is_tcp and endpoint.host in ("0.0.0.0", "::", ""):
        raise UsageError(
            f"--announce: {endpoint} listens on every address and is no address a bus can connect to; "
            "name one with --advertise tcp://HOST:PORT"
        )
    return str(endpoint)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="ENDPOINT",
        help="unix path, unix:/path or tcp://host:port; repeat to listen on several",
    )
    parser.add_argument(
        "--slots", type=_count, default=4, help="jobs accepted at once per session (default %(default)s)"
    )
    parser.add_argument("--name", default=None, help="crawler name in welcome (default: host-pid)")
    parser.add_argument("--token", default=None, help="shared secret (default: BUS_TOKEN); required for tcp://")
    parser.add_argument("--noop", action="store_true", help="answer every job done at once, fetch nothing")
    parser.add_argument(
        "--kind",
        action="append",
        default=None,
        metavar="K",
        help="take only jobs of kind K (and jobs without a kind); repeat for several (default: every kind)",
    )
    parser.add_argument(
        "--noop-delay-ms",
        type=_delay_range_ms,
        default=None,
        metavar="MIN-MAX",
        help="with --noop, answer after a random delay in this range",
    )
    parser.add_argument(
        "--allow-private",
        action="store_true",
        help="allow loopback, private, link-local and other non-public addresses",
    )
    parser.add_argument("--heartbeat", type=_seconds, default=None, help="ignored: the bus sets the interval in hello")
    parser.add_argument(
        "--timeout",
        type=_seconds,
        default=DEFAULT_TIMEOUT,
        help="connect and read timeout in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--total-timeout",
        type=_seconds,
        default=None,
        help="whole-fetch deadline in seconds (default 3 x --timeout)",
    )
    parser.add_argument(
        "--max-bytes",
        type=_count,
        default=DEFAULT_MAX_BYTES,
        help="body bytes read at most; the rest is cut (default %(default)s)",
    )
    parser.add_argument(
        "--max-redirects",
        type=_count,
        default=DEFAULT_MAX_REDIRECTS,
        help="redirects followed at most (default %(default)s)",
    )
    parser.add_argument(
        "--resume-grace",
        type=seconds(allow_zero=True),
        default=0.0,
        metavar="SECONDS",
        help="keep a lost session's jobs running this long for the next session to "
        "resume (reported in ready.running); default 0 stops them at once. A bus "
        "handing the crawler over says how long in bye.resume_within; the longer wins",
    )
    parser.add_argument(
        "--announce",
        default=None,
        metavar="URL",
        help="jobsite's announce URL (e.g. https://jobs.example.org/crawlers/announce): POST a "
        "register once listening (retried with backoff for up to 60 s, sessions are served "
        "meanwhile) and a deregister on SIGTERM/SIGINT; signed with BUS_TOKEN, which it requires",
    )
    parser.add_argument(
        "--advertise",
        default=None,
        metavar="ENDPOINT",
        help="with --announce, the endpoint a bus connects to (default: the --listen endpoint; "
        "required with several --listen or a tcp:// wildcard address)",
    )
    parser.add_argument(
        "--label",
        default=None,
        help="with --announce, the name jobsite shows for this crawler (default: --name)",
    )
    parser.add_argument(
        "--connection-log",
        default=None,
        metavar="PATH",
        help="append a JSON line per event, flushed at once: open, ready, close (with reason) of "
        "each bus session, and assign and finish (done, failed, stopped) of each job",
    )


def run(options: dict[str, Any], defaults: Defaults) -> None:
    """Serve until SIGTERM or SIGINT; raise UsageError for bad options."""
    try:
        endpoints = parse_endpoints(options["listen"])
    except EndpointError as exc:
        raise UsageError(f"--listen: {exc}") from None
    token = options["token"] if options["token"] is not None else defaults.token
    if options["heartbeat"] is not None:
        log.info(kv("crawler.heartbeat_ignored", reason="the bus sets the interval in hello"))
    fetcher = (
        None
        if options["noop"]
        else Fetcher(
            allow_private=options["allow_private"],
            timeout=options["timeout"],
            total_timeout=options["total_timeout"],
            max_bytes=options["max_bytes"],
            max_redirects=options["max_redirects"],
            user_agent=defaults.user_agent,  # the name robots.txt rules are matched against
        )
    )
    for flag in ("advertise", "label"):
        if options[flag] is not None and not options["announce"]:
            raise UsageError(f"--{flag} only goes with --announce")
    if options["announce"] and not token:
        raise UsageError(
            "--announce needs BUS_TOKEN (or --token): the announcement is signed with it, "
            "and jobsite accepts none without it"
        )
    connection_log = None
    if options["connection_log"]:
        try:
            connection_log = ConnectionLog(options["connection_log"])
        except OSError as exc:
            raise UsageError(f"--connection-log: {exc}") from None
    try:
        crawler = Crawler(
            endpoints=endpoints,
            slots=options["slots"],
            name=options["name"],
            token=token,
            max_frame=defaults.max_frame,
            fetcher=fetcher,
            noop=options["noop"],
            noop_delay=options["noop_delay_ms"],
            kinds=options["kind"] or None,
            resume_grace=options["resume_grace"],
            connection_log=connection_log,
        )
        announcer = (
            Announcer(
                options["announce"],
                token=token or "",
                endpoint=_advertised(endpoints, options["advertise"]),
                label=options["label"] if options["label"] is not None else crawler.name,
            )
            if options["announce"]
            else None
        )
    except ValueError as exc:
        if connection_log is not None:
            connection_log.close()
        raise UsageError(str(exc)) from None
    except UsageError:
        if connection_log is not None:
            connection_log.close()
        raise

    interrupted: list[int] = []

    def on_signal(signum: int, frame) -> None:
        if signum == signal.SIGINT and interrupted:
            os._exit(130)  # a second Ctrl-C: do not wait for the sessions
        interrupted.append(signum)
        crawler.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if announcer is not None:
        announcer.start(after=crawler.listening)
    try:
        crawler.serve_forever()
    except EndpointError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # e.g. the address is in use
        raise UsageError(f"cannot listen: {exc}") from None
    else:
        if announcer is not None:
            announcer.deregister()  # a failure is logged; the exit stays clean
    finally:
        if announcer is not None:
            announcer.stop()
        if connection_log is not None:
            connection_log.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobsite_crawler",
        description="Run the reference crawler: listen for bus sessions and fetch the URLs they assign. "
        "BUS_TOKEN, BUS_MAX_FRAME and CRAWLER_USER_AGENT are read from the environment.",
    )
    add_arguments(parser)
    options = vars(parser.parse_args(argv))
    handler = logging.StreamHandler()
    handler.setFormatter(KeyValueFormatter())
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "INFO").upper(), handlers=[handler])
    try:
        run(options, Defaults.from_environment())
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    return 0
