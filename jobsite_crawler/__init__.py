"""jobsite_crawler: the crawler side of jobsite's bus protocol, without Django.

    from jobsite_crawler import Crawler, Job

    def handle(job: Job) -> dict:
        ...                      # fetch job.url, look at job.payload
        return {"status": 200}   # the result of `done`; raise JobFailed for `failed`

    Crawler(endpoints=["unix:/run/crawler.sock"], slots=8, handler=handle).serve_forever()

`AsyncCrawler` takes an `async def` handler instead; `jobsite_crawler.scrapy.Addon`
serves jobs from a Scrapy project; `python -m jobsite_crawler` runs the reference
fetcher. docs/write-a-crawler.md walks through all of them.
"""

from .aio import AsyncCrawler
from .crawler import ConnectionLog, Crawler
from .job import Cancellation, Job, JobCancelled, JobFailed

__all__ = ["AsyncCrawler", "Cancellation", "ConnectionLog", "Crawler", "Job", "JobCancelled", "JobFailed"]
__version__ = "1.0.0"
