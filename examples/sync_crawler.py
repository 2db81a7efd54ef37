"""A complete crawler on jobsite_crawler's sync API: a handler per job, run in a thread pool.

    pip install .            # from a jobsite checkout: jobsite_crawler, no Django
    python examples/sync_crawler.py --listen unix:/tmp/crawler.sock --slots 8

Then point a bus at it (BUS_ENDPOINTS=unix:/tmp/crawler.sock on the jobsite
side). It fetches each job's URL with the standard library and reports the
status and size; docs/write-a-crawler.md explains every line.
"""

from __future__ import annotations

import argparse
import email.utils
import os
import signal
import time
import urllib.error
import urllib.request

from jobsite_crawler import Crawler, Job, JobFailed

USER_AGENT = "example-crawler/1 (+https://example.org/bot)"


def retry_after(value: str | None) -> float | None:
    """Retry-After holds seconds or an HTTP date (RFC 9110 section 10.2.3)."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value)
    when = email.utils.parsedate_to_datetime(value)
    return max(0.0, when.timestamp() - time.time()) if when else None


def handle(job: Job) -> dict:
    """Fetch job.url; the dict returned is the job's result, JobFailed makes it `failed`."""
    request = urllib.request.Request(job.url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=job.payload.get("timeout", 10)) as response:
            body = response.read(5_000_000)
            status = response.status
    except urllib.error.HTTPError as exc:
        if exc.code in (429, 503):  # the site asks us to slow down: jobsite backs the whole host off
            raise JobFailed(
                f"HTTP {exc.code}", retryable=True, status=exc.code, retry_after=retry_after(exc.headers["Retry-After"])
            ) from None
        return {"status": exc.code}  # a 404 is an answer, not a crawler failure
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise JobFailed(f"unreachable: {exc}", retryable=True, cause="network") from None
    return {"status": status, "bytes": len(body)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", action="append", required=True, help="unix:/path or tcp://host:port")
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    crawler = Crawler(
        endpoints=args.listen,
        slots=args.slots,
        token=os.environ.get("BUS_TOKEN"),  # required for tcp:// endpoints
        handler=handle,
    )
    signal.signal(signal.SIGTERM, lambda signum, frame: crawler.drain(timeout=60))  # finish, then exit
    signal.signal(signal.SIGINT, lambda signum, frame: crawler.stop())  # the bus requeues what was running
    crawler.serve_forever()


if __name__ == "__main__":
    main()
