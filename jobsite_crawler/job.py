"""What a job handler sees: the Job, its cancellation, and the two ways a job ends badly.

A handler takes a `Job` and returns the result (a JSON object) for `done`, or
raises `JobFailed` for `failed`. When the bus cancels the job, or its session
ends, `job.cancelled` turns true; the handler should stop soon after, and
whatever it returns or raises then is dropped (its outcome no longer matters).
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any


class JobFailed(Exception):
    """Raise from a handler to report `failed`.

    `retryable`: another attempt could succeed (the bus requeues the job while
    it has attempts left). The politeness extension's fields (docs/protocol.md
    section 14) are optional: `cause="network"` when the host could not be
    reached, `status` (429, 503) with `retry_after` seconds when the site asked
    to slow down; the bus then backs the whole host off.
    """

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = True,
        cause: str | None = None,
        status: int | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message)
        self.retryable = retryable
        self.cause = cause
        self.status = status
        self.retry_after = retry_after


class JobCancelled(Exception):
    """Raise from a handler that noticed `job.cancelled`: there is no outcome to report."""


class Cancellation:
    """A cancel flag that can also wake whatever a job is blocked on.

    `watch(sock)` registers a socket to shut down on cancel (a blocked recv
    returns at once instead of after its timeout); `on_cancel(callback)` runs
    a callback once, in the cancelling thread (the asyncio API cancels the
    handler's task with it).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Sleep until cancelled or `timeout` seconds passed; True if cancelled."""
        return self._event.wait(timeout)

    def cancel(self) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self._event.set()
            sockets = list(self._sockets)
            callbacks, self._callbacks = self._callbacks, []
        for sock in sockets:
            _shutdown(sock)
        for callback in callbacks:
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)
                return
        callback()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)
            cancelled = self._event.is_set()
        if cancelled:
            _shutdown(sock)

    def unwatch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def check(self) -> None:
        """Raise JobCancelled if the job was cancelled."""
        if self._event.is_set():
            raise JobCancelled()


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class Job:
    """One assignment: `id`, `attempt` (the fencing token), `url`, `payload` and `kind` from the bus.

    `progress()` reports how far the job got; the crawler sends the latest
    report with its next heartbeat tick (at most one frame per job a second).
    """

    __slots__ = ("id", "attempt", "url", "payload", "kind", "cancellation", "_report", "_reported")

    def __init__(self, id: int, attempt: int, url: str, payload: Any = None, kind: str = ""):
        self.id = id
        self.attempt = attempt
        self.url = url
        self.payload = payload
        self.kind = kind
        self.cancellation = Cancellation()
        self._report: dict[str, Any] | None = None
        self._reported: dict[str, Any] | None = None

    @property
    def key(self) -> tuple[int, int]:
        return (self.id, self.attempt)

    @property
    def cancelled(self) -> bool:
        return self.cancellation.is_set()

    def progress(self, done: int | None = None, total: int | None = None, message: str | None = None) -> None:
        report = {"done": done, "total": total, "message": message[:500] if message is not None else None}
        self._report = report  # one reference swap: safe from any thread

    def take_progress(self) -> dict[str, Any] | None:
        """The report not sent yet, if any (the session thread calls this)."""
        report = self._report
        if report is None or report is self._reported:
            return None
        self._reported = report
        return report

    def __repr__(self) -> str:
        return f"Job(id={self.id}, attempt={self.attempt}, url={self.url!r})"
