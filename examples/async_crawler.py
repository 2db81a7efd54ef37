"""A crawler written with jobsite_crawler's asyncio API, in a few lines.

    python examples/async_crawler.py --listen unix:/run/crawler.sock [--token T] [--slots 4]

The library does the protocol (handshake, proofs, heartbeats, acks, resends,
cancel); this file only says what a job is: GET the job's URL and report
the HTTP status. `handle` is an `async def`; the blocking urllib call runs in
a thread through asyncio.to_thread, so the event loop stays free. A cancel
from the bus cancels the task, and its outcome is dropped.

It fetches any address, loopback included (so `manage.py crawlercheck` can
check it against its own test pages). A crawler facing the open web should
refuse private addresses, as the reference crawler does unless --allow-private.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from jobsite_crawler import AsyncCrawler, Job, JobFailed  # noqa: E402

MAX_BYTES = 1024 * 1024


def get(url: str) -> tuple[int, int]:
    """Blocking GET: (HTTP status, body bytes read, at most MAX_BYTES)."""
    request = urllib.request.Request(url, headers={"User-Agent": "jobsite-async-example/1"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, len(response.read(MAX_BYTES))
    except urllib.error.HTTPError as exc:  # an HTTP answer all the same: 404, 429, 503...
        return exc.code, 0


async def handle(job: Job) -> dict:
    try:
        status, size = await asyncio.to_thread(get, job.url)
    except (OSError, ValueError) as exc:  # DNS, refused, timeout, a URL urllib cannot fetch
        raise JobFailed(f"GET {job.url}: {exc}", retryable=True, cause="network") from exc
    return {"status": status, "bytes": size}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", required=True, help="unix:/path.sock or tcp://host:port")
    parser.add_argument("--token", default=os.environ.get("BUS_TOKEN") or None)
    parser.add_argument("--slots", type=int, default=4)
    options = parser.parse_args()
    crawler = AsyncCrawler(handler=handle, endpoints=[options.listen], slots=options.slots, token=options.token)
    await crawler.serve()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
