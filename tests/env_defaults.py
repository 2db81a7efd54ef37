"""Loaded with `-p tests.env_defaults` before Django is set up: test-run defaults."""

import os

os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("SECRET_KEY", "jobsite-tests-only")
os.environ.setdefault("BUS_ENDPOINTS", "")
# Politeness off unless a test turns it on: most tests run many jobs on one
# local test server, and measure other things than per-host delays.
os.environ.setdefault("HOST_DELAY", "0")
os.environ.setdefault("HOST_CONCURRENCY", "100000")
# robots.txt likewise: the tests of robots.txt set ROBOTS_TXT=obey themselves.
os.environ.setdefault("ROBOTS_TXT", "ignore")
