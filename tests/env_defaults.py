"""Loaded with `-p tests.env_defaults` before Django is set up: test-run defaults."""

import os

os.environ.setdefault("DEBUG", "true")
os.environ.setdefault("SECRET_KEY", "jobsite-tests-only")
os.environ.setdefault("BUS_ENDPOINTS", "")
