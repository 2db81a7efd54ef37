"""A stock spider: one item per page, follows every link of the page.

With the add-on, `response.meta["jobsite_job"]` is the job the page belongs
to; without it (start_urls from `-a start=...`), the same spider crawls
plainly. Each item says which job yielded it, so a test can compare the
counts in the job results with what the spider yielded.
"""

from __future__ import annotations

import scrapy


class SiteSpider(scrapy.Spider):
    name = "site"

    def __init__(self, start: str = "", start_file: str = "", *args, **kwargs):
        super().__init__(*args, **kwargs)
        urls = start.split(",")
        if start_file:  # one URL a line (bench/scrapy_overhead.py: thousands)
            with open(start_file) as lines:
                urls += lines.read().split()
        self.start_urls = [url for url in urls if url]

    def parse(self, response):
        job = response.meta.get("jobsite_job")
        yield {
            "url": response.url,
            "title": response.css("title::text").get(),
            "job": job.id if job is not None else None,
            "payload": job.payload if job is not None else None,
        }
        for href in response.css("a::attr(href)").getall():
            yield response.follow(href, callback=self.parse)
