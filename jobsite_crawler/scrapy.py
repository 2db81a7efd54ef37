"""Serve jobsite jobs from a Scrapy project: `ADDONS = {"jobsite_crawler.scrapy.Addon": 100}`.

    # settings.py of any Scrapy project (Scrapy >= 2.13)
    ADDONS = {"jobsite_crawler.scrapy.Addon": 100}
    JOBSITE_LISTEN = "unix:/run/crawler.sock"      # or "tcp://0.0.0.0:7000" (then a token), or a list

    $ BUS_TOKEN=... scrapy crawl myspider         # serves jobs until stopped (SIGTERM drains)

Each job the bus assigns becomes a request for `job.url` to the spider's
default callback (`parse`), with `dont_filter=True`; the Job (id, attempt,
url, payload, kind) is `response.meta["jobsite_job"]` in every callback of
the job's request tree. The job's outcome is sent once everything that request
led to has finished: `done` with `{"items", "requests", "errors", "status"}`
(and `retry_after` for a 429 or 503, so that the bus backs the host off), or
`failed` when the job's own URL could not be downloaded.

How a job's request tree is followed (Scrapy has no "request finished" hook,
scrapy#7978): every request of a job carries the Job and the number of its
*logical* request in `meta`; a redirect or retry copy keeps both, so it is the
same logical request. The spider middleware tags the requests a callback
yields; a logical request finishes when its callback's output has been
consumed, when its errback ran (a download error, an HttpError, an
IgnoreRequest), or when the scheduler dropped it. Items count as pending
until the item pipelines are done with them. When nothing is pending, the
job is finished.

Settings (the add-on's own rank below the project's: a project setting wins):

- JOBSITE_LISTEN: the endpoint(s) the bus connects to (required; empty: the
  add-on stays off and the spider runs as plain Scrapy).
- JOBSITE_TOKEN: the shared token; default the BUS_TOKEN environment variable.
- JOBSITE_STORE_ITEMS (False): send each job's items (as JSON objects, via
  itemadapter) with its done; at most JOBSITE_ITEMS_MAX (1000) items and
  ITEMS_MAX_BYTES of JSON, `result["items_truncated"]` when some were left out.
- JOBSITE_DRAIN_TIMEOUT (60): seconds the first SIGTERM waits for running jobs.
- JOBSITE_CONNECTION_LOG: a file for the library's connection log (optional).
- JOBSITE_SLOTS: the jobs taken at once (default CONCURRENT_REQUESTS). More
  hides each job's round trip through the bus behind a queued one (bench/
  scrapy_overhead.py: twice CONCURRENT_REQUESTS turned a 10 % overhead into
  none), but a job then waits in Scrapy's queue after jobsite started it, so
  two jobs of one host may be fetched closer together than the host's delay.

The add-on also turns off Scrapy's two control ports (TELNETCONSOLE_ENABLED,
REMOTE_CONTROL_ENABLED: both on by default in Scrapy 2.19), and deduplicates
requests per job (JobDupeFilter): a job's result must not depend on which
other jobs the same process ran before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import email.utils
import itertools
import json
import logging
import os
import signal
import socket
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from types import FrameType
from typing import Any
from urllib.parse import urljoin

from itemadapter import ItemAdapter
from scrapy import Request, signals
from scrapy.dupefilters import RFPDupeFilter
from scrapy.exceptions import DontCloseSpider, IgnoreRequest, NotConfigured
from scrapy.http import Response
from scrapy.settings import BaseSettings
from scrapy.utils.defer import maybe_deferred_to_future
from scrapy.utils.misc import arg_to_iter, load_object
from scrapy.utils.serialize import ScrapyJSONEncoder
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from .crawler import ROBOTS_MAX_BYTES, ConnectionLog, Crawler
from .job import Job
from .logfmt import kv
from .runners import Finish
from .wire import DEFAULT_MAX_FRAME, MAX_KIND_LENGTH, Frame, _depth_ok, done_frame, failed_frame

try:
    from scrapy.utils.asyncio import is_asyncio_available
except ImportError:  # Scrapy 2.13: the same question, asked of the installed reactor
    from scrapy.utils.reactor import is_asyncio_reactor_installed as is_asyncio_available

log = logging.getLogger("jobsite_crawler.scrapy")

JOB_META = "jobsite_job"  # public: the Job, in the meta of every request of its tree
REQUEST_META = "_jobsite_request"  # the number of the logical request (kept by redirect and retry copies)
# Component orders: the spider middleware is the outermost (it sees a callback's
# output last, after every other middleware added or removed requests), the
# downloader middleware the first to see a request (a cancelled job's request
# goes no further).
SPIDER_MIDDLEWARE_ORDER = 10
DOWNLOADER_MIDDLEWARE_ORDER = 10
EXTENSION_ORDER = 0
ITEMS_MAX_BYTES = DEFAULT_MAX_FRAME * 3 // 4  # stored items' JSON per job: the done frame stays well under 1 MiB
ROBOTS_WAIT = 60.0  # the bus leases a robots request for 60 s: an answer after that is stale
ROBOTS_REDIRECTS = 5  # RFC 9309 §2.3.1.2: follow at least five
SERVE_JOIN_TIMEOUT = 10.0
BACKOFF_STATUSES = (429, 503)

JobKey = tuple[int, int]


class Addon:
    """Enables the extension, the middlewares and the per-job dupefilter at add-on priority.

    Project settings rank above "addon": a project can reorder or disable a
    component, or set DUPEFILTER_CLASS or TELNETCONSOLE_ENABLED itself.
    """

    def update_settings(self, settings: BaseSettings) -> None:
        settings.setdefault_in_component_priority_dict("EXTENSIONS", JobsiteExtension, EXTENSION_ORDER)
        settings.setdefault_in_component_priority_dict(
            "SPIDER_MIDDLEWARES", JobSpiderMiddleware, SPIDER_MIDDLEWARE_ORDER
        )
        settings.setdefault_in_component_priority_dict(
            "DOWNLOADER_MIDDLEWARES", JobDownloaderMiddleware, DOWNLOADER_MIDDLEWARE_ORDER
        )
        settings.set("DUPEFILTER_CLASS", JobDupeFilter, "addon")
        # Control ports: the telnet console (a Python shell, on 127.0.0.1:6023)
        # and the remote-control HTTP server (runs posted Python code) must not
        # be open on a crawler machine.
        settings.set("TELNETCONSOLE_ENABLED", False, "addon")
        settings.set("REMOTE_CONTROL_ENABLED", False, "addon")


# --- The job runs: one tracker per Scrapy crawler, shared by the components ------------------


@dataclass(eq=False)
class _Run:
    """What one job's request tree has done so far; touched on the event-loop thread only."""

    job: Job
    finish: Finish
    root: int  # the logical request of job.url
    open: set[int] = field(default_factory=set)  # logical requests not finished
    in_chain: set[int] = field(default_factory=set)  # their response entered the spider middlewares
    made: int = 0
    finished: int = 0
    items: int = 0
    in_pipeline: int = 0
    dropped: int = 0
    item_errors: int = 0
    errors: int = 0
    status: int | None = None
    retry_after: float | None = None
    root_error: BaseException | None = None
    stored: list[dict[str, Any]] = field(default_factory=list)
    stored_bytes: int = 0
    truncated: bool = False

    @property
    def pending(self) -> int:
        return len(self.open) + self.in_pipeline


_DROP = object()  # an output of a job that has ended: not passed on


class _Tracker:
    """The job runs of one Scrapy crawler, and the Runner the library Crawler starts jobs with."""

    def __init__(self, crawler: Any):
        self.crawler = crawler
        settings = crawler.settings
        self.runs: dict[JobKey, _Run] = {}
        self.numbers = itertools.count(1)
        self.store_items = settings.getbool("JOBSITE_STORE_ITEMS", False)
        self.items_max = max(0, settings.getint("JOBSITE_ITEMS_MAX", 1000))
        self.dupefilter: JobDupeFilter | None = None
        self.call_soon: Callable[..., None] = _loop_caller(settings)
        self.network_errors = tuple(
            load_object(name) if isinstance(name, str) else name for name in settings.getlist("RETRY_EXCEPTIONS")
        )
        self._encoder = ScrapyJSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    # --- Runner (library side: called on a session thread) -----------------------------

    def start(self, job: Job, finish: Finish) -> None:
        try:
            self.call_soon(self._start, job, finish)
        except RuntimeError:  # the event loop is closed: the process is ending, the bus requeues the job
            finish(None)

    def stop(self, timeout: float) -> None:
        """Nothing to wait for: the library cancels the running jobs, and a cancel drops their requests."""

    def _cancelled(self, key: JobKey) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing of the job runs any more
            self.call_soon(self._end, key)

    # --- Starting and ending jobs (event-loop thread) ------------------------------------

    def _start(self, job: Job, finish: Finish) -> None:
        engine = self.crawler.engine
        if job.cancelled or job.key in self.runs:
            return
        if engine is None or self.crawler.spider is None or not engine.running:
            finish(None)  # shutting down: the session ends next and the bus requeues the job
            return
        try:
            request = Request(job.url, dont_filter=True, meta={JOB_META: job})
        except (ValueError, TypeError) as exc:
            finish(failed_frame(job.id, job.attempt, f"not a URL Scrapy can request: {exc}"[:2000], retryable=False))
            return
        run = _Run(job, finish, root=0)
        self.runs[job.key] = run
        run.root = self.tag(run, request)
        if self.dupefilter is not None:
            self.dupefilter.seen(request)  # a link back to the job's own URL is a duplicate like any other
        job.cancellation.on_cancel(lambda: self._cancelled(job.key))
        engine.crawl(request)

    def _end(self, key: JobKey) -> _Run | None:
        """Forget a job (cancelled, stopped or finished): its requests still queued are dropped."""
        run = self.runs.pop(key, None)
        if run is not None and self.dupefilter is not None:
            self.dupefilter.forget(key)
        return run

    def _check(self, run: _Run) -> None:
        """Report progress; send the outcome once nothing of the job is pending."""
        run.job.progress(done=run.finished, total=run.made)
        if run.pending or self.runs.get(run.job.key) is not run:
            return
        self._end(run.job.key)
        run.finish(self._outcome(run))

    def _outcome(self, run: _Run) -> Frame | None:
        job = run.job
        if job.cancelled:
            return None
        error = run.root_error
        if error is not None:
            message = f"{type(error).__name__}: {error}"[:2000]
            if isinstance(error, IgnoreRequest):  # the project's own middlewares refused the URL (robots, offsite)
                return failed_frame(job.id, job.attempt, f"ignored by the crawler: {message}"[:2000], retryable=False)
            if isinstance(error, self.network_errors):
                return failed_frame(job.id, job.attempt, message, retryable=True, cause="network")
            return failed_frame(job.id, job.attempt, message, retryable=True)
        result: dict[str, Any] = {"items": run.items, "requests": run.made, "errors": run.errors, "status": run.status}
        if run.retry_after is not None:
            result["retry_after"] = run.retry_after
        if run.dropped:
            result["items_dropped"] = run.dropped
        if run.item_errors:
            result["item_errors"] = run.item_errors
        if not self.store_items:
            return done_frame(job.id, job.attempt, result)
        if run.truncated:
            result["items_truncated"] = True
        return done_frame(job.id, job.attempt, result, items=run.stored)

    # --- Requests ------------------------------------------------------------------------

    def tag(self, run: _Run, request: Request) -> int:
        """Make `request` a new logical request of the job: its meta says which; its errback reports."""
        number = next(self.numbers)
        request.meta[JOB_META] = run.job
        request.meta[REQUEST_META] = number
        if not isinstance(request.errback, _Errback):
            request.errback = _Errback(self, request.errback)
        run.open.add(number)
        run.made += 1
        return number

    def finished(self, run: _Run, number: int) -> None:
        if number in run.open:
            run.open.discard(number)
            run.in_chain.discard(number)
            run.finished += 1
            self._check(run)

    def run_of(self, meta: dict[str, Any]) -> tuple[_Run | None, bool]:
        """(the job's live run or None, whether the request belongs to a job at all)."""
        job = meta.get(JOB_META)
        if not isinstance(job, Job):
            return None, False
        run = self.runs.get(job.key)
        if run is None or run.job is not job or job.cancelled:
            return None, True
        return run, True

    def take(self, run: _Run | None, output: Any) -> Any:
        """One output of a callback or errback of the job: tag a request, count an item."""
        if run is None or run.job.cancelled:
            return _DROP
        if isinstance(output, Request):
            self.tag(run, output)
        elif output is not None:
            run.items += 1
            run.in_pipeline += 1
        return output

    # --- Signals -------------------------------------------------------------------------

    def request_dropped(self, request: Request) -> None:
        run, _ = self.run_of(request.meta)
        number = request.meta.get(REQUEST_META)
        if run is not None and isinstance(number, int):
            self.finished(run, number)

    def spider_error(self, failure: Failure, response: Any) -> None:
        """A callback or errback raised: an error; the request is finished (the output wrapper may know it already)."""
        if getattr(failure.value, "_jobsite_counted", False):
            return
        run, _ = self.run_of(_meta_of(response))
        if run is None:
            return
        run.errors += 1
        number = _meta_of(response).get(REQUEST_META)
        if isinstance(number, int):
            self.finished(run, number)

    def item_done(self, item: Any, response: Any, outcome: str) -> None:
        run, _ = self.run_of(_meta_of(response))
        if run is None:
            return
        run.in_pipeline = max(0, run.in_pipeline - 1)
        if outcome == "dropped":
            run.dropped += 1
        elif outcome == "error":
            run.item_errors += 1
        elif self.store_items and not run.truncated:
            self._store(run, item)
        self._check(run)

    def _store(self, run: _Run, item: Any) -> None:
        """Keep the item as a JSON object for the done frame, unless a cap is reached (then truncated)."""
        try:
            data = ItemAdapter(item).asdict() if ItemAdapter.is_item(item) else None
            text = self._encoder.encode(data) if isinstance(data, dict) else None
            size = len(text.encode()) if text is not None else 0  # a lone surrogate raises: not UTF-8 text
            value = json.loads(text) if text is not None else None
        except (TypeError, ValueError) as exc:
            log.warning(kv("crawler.scrapy.item_not_json", job_id=run.job.id, error=str(exc)[:200]))
            value = None
        if value is None or not _depth_ok({"items": [value]}):
            run.truncated = True
            return
        if len(run.stored) >= self.items_max or run.stored_bytes + size + 1 > ITEMS_MAX_BYTES:
            run.truncated = True
            return
        run.stored.append(value)
        run.stored_bytes += size + 1


def _meta_of(obj: Any) -> dict[str, Any]:
    """The meta of the request behind a Response or a Failure (the scraper sets failure.request)."""
    request = getattr(obj, "request", None)
    return request.meta if isinstance(request, Request) else {}


_trackers: weakref.WeakKeyDictionary[Any, _Tracker] = weakref.WeakKeyDictionary()


def _tracker_of(crawler: Any) -> _Tracker:
    tracker = _trackers.get(crawler)
    if tracker is None:
        tracker = _trackers[crawler] = _Tracker(crawler)
    return tracker


def _loop_caller(settings: BaseSettings) -> Callable[..., None]:
    """A thread-safe `call(fn, *args)` on Scrapy's event loop: the Twisted reactor, or asyncio without one."""
    if settings.getbool("TWISTED_REACTOR_ENABLED", True):
        from twisted.internet import reactor

        return reactor.callFromThread
    loop = asyncio.get_event_loop()

    def call(function: Callable[..., Any], *args: Any) -> None:
        loop.call_soon_threadsafe(function, *args)

    return call


def _spawn(coro: Any) -> Any:
    """Run a coroutine on Scrapy's loop (called on it): an asyncio task, or a Deferred with a plain reactor."""
    if is_asyncio_available():
        return asyncio.ensure_future(coro)
    return Deferred.fromCoroutine(coro)


# --- Errbacks: a download failure finishes its logical request ------------------------------


class _Errback:
    """Wraps a request's errback (or its absence) so that a download failure finishes the logical request.

    Without an original errback it returns the failure, which Scrapy then
    handles exactly as for a request without errback. A failure raised in the
    spider middlewares (HttpError) is passed on untouched: its output goes
    through JobSpiderMiddleware like a callback's.
    """

    def __init__(self, tracker: _Tracker, original: Callable[..., Any] | None):
        self.tracker = tracker
        self.original = original

    def __call__(self, failure: Failure) -> Any:
        meta = _meta_of(failure)
        run, _ = self.tracker.run_of(meta)
        number = meta.get(REQUEST_META)
        if run is None or not isinstance(number, int) or number in run.in_chain or number not in run.open:
            return failure if self.original is None else self.original(failure)
        if not failure.check(IgnoreRequest):
            run.errors += 1
        if number == run.root:
            run.root_error = failure.value
        if self.original is None:
            self.tracker.finished(run, number)
            return failure
        try:
            output = self.original(failure)
        except Exception:
            self.tracker.finished(run, number)
            raise
        if output is None or isinstance(output, (Failure, Deferred)):
            self.tracker.finished(run, number)
            return output
        if isinstance(output, AsyncIterator):
            return _async_outputs(self.tracker, run, number, output)
        if asyncio.iscoroutine(output):
            return _coroutine_outputs(self.tracker, run, number, output)
        return _outputs(self.tracker, run, number, arg_to_iter(output))


def _outputs(tracker: _Tracker, run: _Run | None, number: int | None, result: Iterable[Any]) -> Iterable[Any]:
    try:
        for output in result:
            output = tracker.take(run, output)
            if output is _DROP:
                break  # the job has ended: stop running its callback
            yield output
    except Exception as exc:
        with contextlib.suppress(AttributeError):
            exc._jobsite_counted = True  # type: ignore[attr-defined]  # spider_error follows: count it once
        if run is not None:
            run.errors += 1
        raise
    finally:
        if run is not None and number is not None:
            tracker.finished(run, number)


async def _async_outputs(
    tracker: _Tracker, run: _Run | None, number: int | None, result: AsyncIterator[Any]
) -> AsyncIterator[Any]:
    try:
        async for output in result:
            output = tracker.take(run, output)
            if output is _DROP:
                break
            yield output
    except Exception as exc:
        with contextlib.suppress(AttributeError):
            exc._jobsite_counted = True  # type: ignore[attr-defined]
        if run is not None:
            run.errors += 1
        raise
    finally:
        if run is not None and number is not None:
            tracker.finished(run, number)


async def _coroutine_outputs(tracker: _Tracker, run: _Run, number: int, coro: Any) -> list[Any]:
    try:
        result = await coro
        return [output for output in _outputs(tracker, run, None, arg_to_iter(result)) if output is not _DROP]
    finally:
        tracker.finished(run, number)


# --- The components -----------------------------------------------------------------------------


class JobSpiderMiddleware:
    """Carries the job onto the requests a callback yields, counts items, finishes a consumed response.

    Outermost of the spider middlewares (order 10): it sees the output last,
    after the others added or filtered requests. Outputs of a cancelled or
    ended job are dropped, and its callback is not run further.
    """

    def __init__(self, tracker: _Tracker):
        self.tracker = tracker

    @classmethod
    def from_crawler(cls, crawler: Any) -> JobSpiderMiddleware:
        return cls(_tracker_of(crawler))

    def process_spider_input(self, response: Response) -> None:
        """The response reached the scraper: its request's final status; errbacks from here are HttpErrors."""
        run, _ = self.tracker.run_of(_meta_of(response))
        number = _meta_of(response).get(REQUEST_META)
        if run is None or not isinstance(number, int):
            return
        run.in_chain.add(number)
        if number == run.root:
            if self.tracker.dupefilter is not None and response.request is not None:
                self.tracker.dupefilter.seen(response.request)  # where the job's URL redirected to
            run.status = response.status
            if response.status in BACKOFF_STATUSES:
                run.retry_after = retry_after_seconds(response.headers.get("Retry-After"))

    def _scope(self, response: Response) -> tuple[_Run | None, int | None, bool]:
        meta = _meta_of(response)
        run, tagged = self.tracker.run_of(meta)
        number = meta.get(REQUEST_META)
        return run, number if isinstance(number, int) else None, tagged

    def process_spider_output(self, response: Response, result: Iterable[Any]) -> Iterable[Any]:
        run, number, tagged = self._scope(response)
        if not tagged:
            yield from result  # a request of no job (the spider's own start requests): plain Scrapy
            return
        yield from _outputs(self.tracker, run, number, result)

    async def process_spider_output_async(self, response: Response, result: AsyncIterator[Any]) -> AsyncIterator[Any]:
        run, number, tagged = self._scope(response)
        if not tagged:
            async for output in result:
                yield output
            return
        async for output in _async_outputs(self.tracker, run, number, result):
            yield output


class JobDownloaderMiddleware:
    """Drops the requests of a cancelled (or otherwise ended) job before they are downloaded."""

    def __init__(self, tracker: _Tracker):
        self.tracker = tracker

    @classmethod
    def from_crawler(cls, crawler: Any) -> JobDownloaderMiddleware:
        return cls(_tracker_of(crawler))

    def process_request(self, request: Request) -> None:
        run, tagged = self.tracker.run_of(request.meta)
        if tagged and run is None:
            raise IgnoreRequest(f"jobsite job {request.meta[JOB_META].id} was cancelled or has ended")


class JobDupeFilter(RFPDupeFilter):
    """Requests are duplicates within their job only; requests of no job share one set, as in Scrapy.

    With one process-wide set, a job would skip pages another job of the same
    process happened to visit: its result would depend on the crawler it ran
    on. A job's set is forgotten when the job ends.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.tracker: _Tracker | None = None
        self._per_job: dict[JobKey, set[bytes]] = {}

    @classmethod
    def from_crawler(cls, crawler: Any) -> JobDupeFilter:
        dupefilter = super().from_crawler(crawler)
        dupefilter.tracker = _tracker_of(crawler)
        dupefilter.tracker.dupefilter = dupefilter
        return dupefilter

    def request_seen(self, request: Request) -> bool:
        job = request.meta.get(JOB_META)
        if not isinstance(job, Job):
            return super().request_seen(request)
        if self.tracker is not None and job.key not in self.tracker.runs:
            return False  # the job has ended: the downloader middleware drops the request
        seen = self._per_job.setdefault(job.key, set())
        fingerprint = self.fingerprinter.fingerprint(request)
        if fingerprint in seen:
            return True
        seen.add(fingerprint)
        return False

    def seen(self, request: Request) -> None:
        """Count a request of a job as seen without asking (the job's own request, sent with dont_filter)."""
        job = request.meta[JOB_META]
        self._per_job.setdefault(job.key, set()).add(self.fingerprinter.fingerprint(request))

    def forget(self, key: JobKey) -> None:
        self._per_job.pop(key, None)


class JobsiteExtension:
    """Runs the library Crawler while the spider is open; SIGTERM drains, a second SIGTERM stops."""

    def __init__(self, crawler: Any):
        settings = crawler.settings
        listen = settings.get("JOBSITE_LISTEN")
        endpoints = [listen] if isinstance(listen, str) else list(listen or [])
        endpoints = [endpoint.strip() for endpoint in endpoints if endpoint and endpoint.strip()]
        if not endpoints:
            raise NotConfigured("JOBSITE_LISTEN is not set: the spider runs without jobsite")
        self.crawler = crawler
        self.tracker = _tracker_of(crawler)
        self.drain_timeout = settings.getfloat("JOBSITE_DRAIN_TIMEOUT", 60.0)
        slots = settings.getint("JOBSITE_SLOTS", 0) or settings.getint("CONCURRENT_REQUESTS")
        log_path = settings.get("JOBSITE_CONNECTION_LOG")
        self.connection_log = ConnectionLog(log_path) if log_path else None
        # Built now, so that a bad endpoint or a tcp:// endpoint without a token fails the crawl at once.
        self.jobsite = Crawler(
            endpoints=endpoints,
            slots=slots,
            name=f"{socket.gethostname()}-{os.getpid()}",
            token=settings.get("JOBSITE_TOKEN") or os.environ.get("BUS_TOKEN") or None,
            runner=self.tracker,
            robots=self.fetch_robots,
            connection_log=self.connection_log,
        )
        self.serving = False
        self.draining = False
        self.thread: threading.Thread | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._tasks: set[Any] = set()
        signals_of = crawler.signals
        signals_of.connect(self.spider_opened, signal=signals.spider_opened)
        signals_of.connect(self.spider_idle, signal=signals.spider_idle)
        signals_of.connect(self.spider_closed, signal=signals.spider_closed)
        signals_of.connect(self.tracker.request_dropped, signal=signals.request_dropped)
        signals_of.connect(self.tracker.spider_error, signal=signals.spider_error)
        signals_of.connect(self._item_scraped, signal=signals.item_scraped)
        signals_of.connect(self._item_dropped, signal=signals.item_dropped)
        signals_of.connect(self._item_error, signal=signals.item_error)

    @classmethod
    def from_crawler(cls, crawler: Any) -> JobsiteExtension:
        return cls(crawler)

    def _item_scraped(self, item: Any, response: Any) -> None:
        self.tracker.item_done(item, response, "scraped")

    def _item_dropped(self, item: Any, response: Any) -> None:
        self.tracker.item_done(item, response, "dropped")

    def _item_error(self, item: Any, response: Any) -> None:
        self.tracker.item_done(item, response, "error")

    # --- Lifecycle ---------------------------------------------------------------------

    def spider_opened(self, spider: Any) -> None:
        name = getattr(spider, "name", None)
        if isinstance(name, str) and 0 < len(name) <= MAX_KIND_LENGTH:
            self.jobsite.kinds = [name]  # jobs of kind "" (any crawler) or of the spider's name
        self.serving = True
        self.thread = threading.Thread(target=self._serve, name="jobsite-crawler", daemon=True)
        self.thread.start()
        self._install_signal_handlers_soon()

    def _serve(self) -> None:
        try:
            self.jobsite.serve_forever()
        except Exception:  # noqa: BLE001 - logged; the spider closes below
            log.exception(kv("crawler.scrapy.serve_failed", crawler=self.jobsite.name))
        finally:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the spider is gone already
                self.tracker.call_soon(self._served)

    def _served(self) -> None:
        """The library Crawler stopped (drained, or it failed): close the spider if it is still open."""
        if not self.serving:
            return
        self.serving = False
        engine = self.crawler.engine
        reason = "jobsite_drained" if self.draining else "jobsite_stopped"
        if engine is not None and engine.running:
            close = getattr(engine, "close_spider_async", None)
            if close is not None:
                self._keep(_spawn(close(reason=reason)))
            else:  # Scrapy < 2.14
                engine.close_spider(self.crawler.spider, reason)

    def _keep(self, task: Any) -> None:
        self._tasks.add(task)
        if isinstance(task, Deferred):
            task.addBoth(lambda result: self._tasks.discard(task))
        else:
            task.add_done_callback(self._tasks.discard)

    def spider_idle(self, spider: Any) -> None:
        if self.serving:
            raise DontCloseSpider  # waiting for jobs is not the end of the crawl

    def spider_closed(self, spider: Any, reason: str) -> None:
        """Stop the library Crawler: it says bye on each session; the bus requeues what still runs."""
        self.serving = False
        self.jobsite.stop()
        if self.thread is not None:
            self.thread.join(SERVE_JOIN_TIMEOUT)
        for signum, handler in self._previous_handlers.items():
            with contextlib.suppress(ValueError, TypeError):
                signal.signal(signum, handler)
        if self.connection_log is not None:
            self.connection_log.close()
        log.info(kv("crawler.scrapy.closed", reason=reason, unacked=len(self.jobsite.unacked_outcomes())))

    # --- Signals: the first SIGTERM (or SIGINT) drains, the second stops -------------------

    def _install_signal_handlers_soon(self) -> None:
        """After Scrapy installed its own (at reactor startup), put ours in front of them."""
        if self.crawler.settings.getbool("TWISTED_REACTOR_ENABLED", True):
            from twisted.internet import reactor

            reactor.callWhenRunning(reactor.callLater, 0, self._install_signal_handlers)
        else:
            asyncio.get_event_loop().call_soon(self._install_signal_handlers)

    def _install_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            log.warning(kv("crawler.scrapy.no_signal_handlers", reason="Scrapy's loop is not on the main thread"))
            return
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.getsignal(signum)
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Signal context: only the library's signal-safe calls here; Scrapy's handler for the second one."""
        if not self.draining:
            self.draining = True
            self.jobsite.drain(self.drain_timeout)  # capacity 0, finish, stop once acked: then _served closes
            with contextlib.suppress(RuntimeError):
                self.tracker.call_soon(self._log_draining, signum)  # logging is not safe in a signal handler
            return
        self.jobsite.stop()
        previous = self._previous_handlers.get(signum)
        if callable(previous):
            previous(signum, frame)  # Scrapy's own shutdown: a third signal kills

    def _log_draining(self, signum: int) -> None:
        log.info(
            kv(
                "crawler.scrapy.draining",
                signal=signal.Signals(signum).name,
                running=len(self.tracker.runs),
                timeout_s=self.drain_timeout,
            )
        )

    # --- robots.txt for the bus (docs/protocol.md section 15) ---------------------------

    def fetch_robots(self, url: str) -> tuple[int, str]:
        """Fetch a robots.txt with Scrapy's downloader (its middlewares, proxy, user agent); blocks its thread."""
        future: concurrent.futures.Future[tuple[int, str]] = concurrent.futures.Future()
        self.tracker.call_soon(self._start_robots, url, future)
        return future.result(timeout=ROBOTS_WAIT)

    def _start_robots(self, url: str, future: concurrent.futures.Future[tuple[int, str]]) -> None:
        async def fetch() -> None:
            try:
                future.set_result(await self._robots(url))
            except Exception as exc:  # noqa: BLE001 - no answer from the site, whatever the reason
                future.set_exception(exc)

        try:
            self._keep(_spawn(fetch()))
        except Exception as exc:  # noqa: BLE001 - e.g. the engine is closing
            future.set_exception(exc)

    async def _robots(self, url: str) -> tuple[int, str]:
        """Follow up to five redirects ourselves (then the last 3xx: "unavailable"); keep the first 500 KiB."""
        engine = self.crawler.engine
        if engine is None or not engine.running:
            raise RuntimeError("the Scrapy engine is not running")
        status = 0
        for _ in range(ROBOTS_REDIRECTS + 1):
            # Straight to the downloader (engine.download_async): no scheduler queue to wait in, no spider callback.
            request = Request(url, dont_filter=True, meta={"dont_obey_robotstxt": True, "dont_redirect": True})
            download = getattr(engine, "download_async", None)
            if download is not None:
                response = await download(request)
            else:  # Scrapy < 2.14
                response = await maybe_deferred_to_future(engine.download(request))
            status = response.status
            location = response.headers.get("Location")
            if status in (301, 302, 303, 307, 308) and location:
                url = urljoin(response.url, location.decode("latin-1"))
                continue
            return status, response.body[:ROBOTS_MAX_BYTES].decode("utf-8", "ignore")
        return status, ""


def retry_after_seconds(value: bytes | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: a number of seconds, or an HTTP date (RFC 9110 §10.2.3); None if neither."""
    if not value:
        return None
    text = value.decode("latin-1").strip()
    if text.isdigit():
        return float(int(text))
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, round(when.timestamp() - (time.time() if now is None else now), 3))
