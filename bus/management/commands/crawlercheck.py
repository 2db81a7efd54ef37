"""`manage.py crawlercheck ENDPOINT [--token T]`: check a crawler against the bus protocol, a thin wrapper.

The checker lives in jobsite_crawler/conformance.py, which crawler authors
run without Django (`python -m jobsite_crawler.conformance`); this command
only takes its defaults (BUS_TOKEN, BUS_MAX_FRAME) from the settings.
"""

from __future__ import annotations

import argparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from jobsite_crawler import conformance


class Command(BaseCommand):
    help = (
        "Play the bus against a crawler (any language) and print PASS, FAIL or SKIP with a reason per protocol "
        "rule. The checker serves the jobs' pages on 127.0.0.1: "
        + conformance.LOOPBACK_NOTE
        + ". Exit status 0 when no rule fails, 1 when one does, 2 for a usage error."
    )
    # It checks a crawler, not this deployment: a tcp:// BUS_ENDPOINTS without token must not stop it.
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        conformance.add_arguments(
            parser, token_default=settings.BUS_TOKEN or "", max_frame_default=settings.BUS_MAX_FRAME
        )

    def handle(self, *args, **options) -> None:
        try:
            status = conformance.check(options, lambda line: self.stdout.write(line))
        except conformance.UsageError as exc:
            raise CommandError(str(exc), returncode=2) from None
        if status:
            raise CommandError("the crawler failed at least one rule (see the FAIL lines)", returncode=status)
