"""A stock Scrapy project with the jobsite add-on: two settings, the rest as `scrapy startproject` leaves it.

JOBSITE_LISTEN comes from the command line (`-s JOBSITE_LISTEN=unix:/...`),
or the environment variable of the same name, so that each test process
listens on its own socket; without it the add-on stays off and the spider
is plain Scrapy (the benchmark's baseline).
"""

import os

BOT_NAME = "sitecrawl"
SPIDER_MODULES = ["sitecrawl.spiders"]
NEWSPIDER_MODULE = "sitecrawl.spiders"

ADDONS = {"jobsite_crawler.scrapy.Addon": 100}
JOBSITE_LISTEN = os.environ.get("JOBSITE_LISTEN", "")

ROBOTSTXT_OBEY = False  # jobsite obeys robots.txt for the fleet (ROBOTS_TXT on the bus)
LOG_LEVEL = "INFO"
