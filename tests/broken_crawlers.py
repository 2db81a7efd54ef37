"""Crawlers broken on purpose, one flaw each: the conformance checker must catch every one.

    python tests/broken_crawlers.py --listen unix:/tmp/x.sock --break no-resend [--token T]

Each is the library's Crawler fetching with the reference Fetcher (loopback
allowed), with one behaviour wrapped or patched in this process only;
jobsite_crawler/crawler.py itself is untouched. BREAKS maps each flaw to the
rule tests/test_crawlercheck.py expects `crawlercheck` to fail, or, for a
missing optional behaviour, to SKIP.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jobsite_crawler import crawler as engine  # noqa: E402
from jobsite_crawler.fetch import Fetcher  # noqa: E402
from jobsite_crawler.wire import FrameError, capacity_frame, encode_frame, failed_frame  # noqa: E402


class NoResend(engine.Crawler):
    """Forgets the outcomes no session has taken before each ready, instead of resending them."""

    def _session_ready(self, session, hello_nonce):
        with self._lock:
            for key in [key for key, outcome in self._unacked.items() if outcome.owner is None]:
                del self._unacked[key]
        return super()._session_ready(session, hello_nonce)


class OutcomeAfterCancel(engine.Crawler):
    """Stops a cancelled job, then reports it failed all the same."""

    def _cancel(self, key, *, reason):
        with self._lock:
            job = self._running.get(key)
        stopped = super()._cancel(key, reason=reason)
        if job is not None and job.session is not None:
            job.session.queue(encode_frame(failed_frame(key[0], key[1], "cancelled", retryable=False)))
        return stopped


class BadCapacity(engine.Crawler):
    """Follows each ready with a capacity frame whose slots is negative."""

    def _session_ready(self, session, hello_nonce):
        result = super()._session_ready(session, hello_nonce)
        session.queue(encode_frame(capacity_frame(-1)))
        return result


class EmptyRunning(engine.Crawler):
    """Heartbeats on time, but always with an empty running list."""

    def _running_of(self, session):
        return []


class _Ghost:
    """Stands in for a session that ended: not live, so a job's outcome goes to whichever session is."""

    live = False
    bus_session = None


class KeepsJobs(engine.Crawler):
    """Keeps running the jobs of an ended session without listing them in the next ready.running."""

    def _session_ended(self, session):
        with self._lock:
            for job in self._running.values():
                if job.session is session:
                    job.session = _Ghost()  # neither stopped nor orphaned for resuming: hidden
        super()._session_ended(session)


class SilentSession(engine._Session):
    """Sends every frame but heartbeats."""

    def queue(self, data):
        if not data.startswith(b'{"type":"heartbeat"'):
            super().queue(data)


class KeepsStale(engine._Session):
    """Ignores an ack whose status is stale: the outcome stays unacked and is resent."""

    def _on_frame(self, frame):
        if frame["type"] == "ack" and frame.get("status") == "stale":
            return
        super()._on_frame(frame)


class IgnoresResumeWithin(engine._Session):
    """Not broken: lacks the optional hand-over extension, so it stops a session's jobs after any bye."""

    def _resume_within_of(self, bye):
        return None


class CrashingReader(engine.FrameReader):
    """Dies on the first malformed frame instead of answering bad_frame."""

    def feed(self, data):
        try:
            return super().feed(data)
        except FrameError:
            os._exit(3)


def _attempt_of_any(frame):
    return frame.get("attempt")  # attempt 0, a string, anything: the job runs


@dataclass(frozen=True)
class Break:
    rule: str  # the rule crawlercheck must report
    status: str  # FAIL, or SKIP for an optional behaviour the crawler lacks
    crawler: type[engine.Crawler] = engine.Crawler
    patch: Callable[[], None] | None = None  # applied to the library's module in this process
    token: bool = False  # the flaw shows only with a token


def _patch(name: str, value: object) -> Callable[[], None]:
    return lambda: setattr(engine, name, value)


BREAKS = {
    "no-resend": Break("outcomes.resent", "FAIL", crawler=NoResend),
    "no-ready-proof": Break("auth.ready_proof", "FAIL", patch=_patch("ready_proof", lambda *args: None), token=True),
    "accepts-any-hello": Break(
        "auth.hello_checked", "FAIL", patch=_patch("proof_matches", lambda *args: True), token=True
    ),
    "no-heartbeat": Break("heartbeat.cadence", "FAIL", patch=_patch("_Session", SilentSession)),
    "empty-running": Break("heartbeat.running", "FAIL", crawler=EmptyRunning),
    "outcome-after-cancel": Break("late.cancelled", "FAIL", crawler=OutcomeAfterCancel),
    "resends-stale": Break("late.stale", "FAIL", patch=_patch("_Session", KeepsStale)),
    "bad-capacity": Break("slots", "FAIL", crawler=BadCapacity),
    "keeps-jobs": Break("session_end.stops_jobs", "FAIL", crawler=KeepsJobs),
    "crash-on-bad-frame": Break("frames.not_json", "FAIL", patch=_patch("FrameReader", CrashingReader)),
    "runs-bad-assign": Break("frames.bad_assign", "FAIL", patch=_patch("attempt_of", _attempt_of_any)),
    "no-resume": Break("session_end.resume_within", "SKIP", patch=_patch("_Session", IgnoresResumeWithin)),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True)
    parser.add_argument("--break", dest="flaw", required=True, choices=sorted(BREAKS))
    parser.add_argument("--token", default=None)
    parser.add_argument("--slots", type=int, default=4)
    options = parser.parse_args()
    flaw = BREAKS[options.flaw]
    if flaw.patch is not None:
        flaw.patch()
    crawler = flaw.crawler(
        endpoints=[options.listen],
        slots=options.slots,
        token=options.token,
        name=f"broken-{options.flaw}",
        fetcher=Fetcher(allow_private=True),
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: crawler.stop())
    crawler.serve_forever()


if __name__ == "__main__":
    main()
