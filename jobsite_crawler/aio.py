"""The asyncio API: `AsyncCrawler(handler=async_fn, ...)`, then `await crawler.serve()`.

The protocol engine is the same Crawler the sync API uses (its sessions run
on threads of their own, so a slow handler or a busy loop never delays a
heartbeat); each job's handler runs as a task on the loop that awaits
serve(). A cancel from the bus, or the end of the job's session, cancels
the task.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from .crawler import Crawler
from .runners import AsyncHandler, AsyncRunner


class AsyncCrawler:
    """A Crawler whose jobs run as asyncio tasks; the keyword options are Crawler's (endpoints, slots, token...)."""

    def __init__(self, *, handler: AsyncHandler, **options: Any):
        self.runner = AsyncRunner(handler, loop=None)
        self.crawler = Crawler(runner=self.runner, **options)

    @property
    def listening(self) -> threading.Event:
        return self.crawler.listening

    def stop(self) -> None:
        self.crawler.stop()

    def drain(self, timeout: float = 60.0) -> None:
        self.crawler.drain(timeout)

    async def serve(self) -> None:
        """Serve bus sessions until stop() or drain() ends them, or this task is cancelled."""
        loop = asyncio.get_running_loop()
        self.runner.loop = loop
        ended: asyncio.Future[None] = loop.create_future()

        def serve() -> None:
            try:
                self.crawler.serve_forever()
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(_settle, ended, exc)
            else:
                loop.call_soon_threadsafe(_settle, ended, None)

        thread = threading.Thread(target=serve, name="crawler-serve", daemon=True)
        thread.start()
        try:
            await asyncio.shield(ended)
        except asyncio.CancelledError:
            self.crawler.stop()
            await asyncio.shield(ended)  # the sessions say bye and the jobs stop first
            raise


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)
