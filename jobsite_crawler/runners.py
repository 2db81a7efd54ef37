"""Runners: what runs a job once the Crawler has it, and how its outcome comes back.

A runner's `start(job, finish)` must return at once (it is called on a
session's thread) and later call `finish(frame)` exactly once, from any
thread: with the done/failed frame, or None when the job ended without an
outcome (it was cancelled). `stop(timeout)` waits for running handlers.

- ThreadRunner: a sync handler, `handler(job) -> dict`, in a thread pool.
- AsyncRunner: an asyncio handler, `async handler(job) -> dict`, as tasks on
  one event loop; a cancel cancels the task.
- The Scrapy add-on has its own (jobsite_crawler/scrapy.py).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from .job import Job, JobCancelled, JobFailed
from .logfmt import kv
from .wire import Frame, done_frame, failed_frame

log = logging.getLogger("jobsite_crawler")

Handler = Callable[[Job], dict[str, Any] | None]
AsyncHandler = Callable[[Job], Awaitable[dict[str, Any] | None]]
Finish = Callable[[Frame | None], None]
IDLE_THREAD_TIMEOUT = 30.0  # a pool thread with nothing to do for this long exits


class Runner(Protocol):
    def start(self, job: Job, finish: Finish) -> None: ...

    def stop(self, timeout: float) -> None: ...


def outcome_of(job: Job, result: Any = None, error: BaseException | None = None) -> Frame | None:
    """The outcome frame for what a handler returned or raised; None when there is none to report."""
    if job.cancelled or isinstance(error, (JobCancelled, asyncio.CancelledError)):
        return None
    if isinstance(error, JobFailed):
        return failed_frame(
            job.id,
            job.attempt,
            str(error)[:2000] or type(error).__name__,
            retryable=error.retryable,
            cause=error.cause,
            status=error.status,
            retry_after=error.retry_after,
        )
    if error is not None:
        log.error(kv("crawler.job.crashed", job_id=job.id, attempt=job.attempt, error=repr(error)[:500]))
        # Not retryable: the same bug would fail every attempt.
        return failed_frame(
            job.id, job.attempt, f"crawler error: {type(error).__name__}: {error}"[:2000], retryable=False
        )
    if result is None:
        result = {}
    if not isinstance(result, dict):
        return failed_frame(
            job.id,
            job.attempt,
            f"crawler error: the handler returned a {type(result).__name__}, not a dict",
            retryable=False,
        )
    return done_frame(job.id, job.attempt, result)


class ThreadRunner:
    """Runs `handler(job)` in a pool of threads that grows on demand and shrinks when idle.

    The pool has no fixed size on purpose: a cancelled handler that is stuck
    (in a connect, say) keeps its thread, while the bus already reuses the
    slot; a fixed pool would make the next job wait behind it. Idle threads
    are reused, and exit after IDLE_THREAD_TIMEOUT seconds without work.
    """

    def __init__(self, handler: Handler, *, name: str = "crawler-job"):
        self.handler = handler
        self.name = name
        self._tasks: queue.SimpleQueue[tuple[Job, Finish] | None] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # one token per thread waiting for work
        self._lock = threading.Lock()
        self._threads: set[threading.Thread] = set()
        self._busy = 0
        self._count = 0

    def start(self, job: Job, finish: Finish) -> None:
        self._tasks.put((job, finish))
        if self._idle.acquire(blocking=False):
            return  # an idle thread takes it
        with self._lock:
            self._count += 1
            thread = threading.Thread(target=self._work, name=f"{self.name}-{self._count}", daemon=True)
            self._threads.add(thread)
        thread.start()

    def _work(self) -> None:
        try:
            while True:
                try:
                    task = self._tasks.get(timeout=IDLE_THREAD_TIMEOUT)
                except queue.Empty:
                    if self._idle.acquire(blocking=False):
                        return  # took back its own idle token: nobody counts on this thread
                    continue  # a start() took the token and is putting a task: wait for it
                if task is None:
                    return
                job, finish = task
                with self._lock:
                    self._busy += 1
                try:
                    finish(self._run(job))
                except Exception:  # noqa: BLE001 - a bug in finish must not kill the pool thread
                    log.exception(kv("crawler.job.finish_failed", job_id=job.id, attempt=job.attempt))
                finally:
                    with self._lock:
                        self._busy -= 1
                self._idle.release()
        finally:
            with self._lock:
                self._threads.discard(threading.current_thread())

    def _run(self, job: Job) -> Frame | None:
        try:
            result = self.handler(job)
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's outcome
            return outcome_of(job, error=exc)
        return outcome_of(job, result)

    @property
    def busy(self) -> int:
        with self._lock:
            return self._busy

    def stop(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._tasks.put(None)
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class AsyncRunner:
    """Runs `await handler(job)` as a task on `loop`; cancelling the job cancels the task."""

    def __init__(self, handler: AsyncHandler, loop: asyncio.AbstractEventLoop | None):
        self.handler = handler
        self.loop = loop  # AsyncCrawler.serve() sets it to the running loop
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, job: Job, finish: Finish) -> None:
        if self.loop is None:
            raise RuntimeError("AsyncRunner has no event loop: serve it with AsyncCrawler.serve()")
        try:
            self.loop.call_soon_threadsafe(self._create, job, finish)
        except RuntimeError:  # the loop is closed: the crawler is stopping, the bus requeues the job
            finish(None)

    def _create(self, job: Job, finish: Finish) -> None:
        assert self.loop is not None
        task = self.loop.create_task(self._run(job, finish), name=f"crawler-job-{job.id}-{job.attempt}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

        loop = self.loop

        def cancel() -> None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop is closed: the task is gone with it

        job.cancellation.on_cancel(cancel)

    async def _run(self, job: Job, finish: Finish) -> None:
        outcome: Frame | None
        try:
            result = await self.handler(job)
        except asyncio.CancelledError:
            outcome = None
        except Exception as exc:  # noqa: BLE001 - every failure becomes the job's outcome
            outcome = outcome_of(job, error=exc)
        else:
            outcome = outcome_of(job, result)
        finish(outcome)  # thread-safe: it takes the crawler's lock and queues bytes

    def stop(self, timeout: float) -> None:
        """Cancel the tasks still running (the crawler stopped their jobs already)."""

        def cancel_all() -> None:
            for task in list(self._tasks):
                task.cancel()

        if self.loop is None:
            return
        try:
            self.loop.call_soon_threadsafe(cancel_all)
        except RuntimeError:
            pass
