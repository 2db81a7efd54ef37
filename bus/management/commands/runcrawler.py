"""`manage.py runcrawler`: the reference crawler in the foreground, a thin wrapper.

The crawler and its options live in jobsite_crawler (jobsite_crawler/cli.py),
which `python -m jobsite_crawler` runs without Django; this command only takes
its defaults (BUS_TOKEN, BUS_MAX_FRAME, CRAWLER_USER_AGENT) from the settings.
"""

from __future__ import annotations

import argparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from jobsite_crawler import cli


class Command(BaseCommand):
    help = "Run the reference crawler: listen for bus sessions and fetch the URLs they assign."
    # The crawler does not use the bus settings the checks are about (a
    # tcp:// BUS_ENDPOINTS without token must not stop a crawler on a unix socket).
    requires_system_checks: list[str] = []

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        cli.add_arguments(parser)

    def handle(self, *args, **options) -> None:
        defaults = cli.Defaults(
            token=settings.BUS_TOKEN or "", max_frame=settings.BUS_MAX_FRAME, user_agent=settings.CRAWLER_USER_AGENT
        )
        try:
            cli.run(options, defaults)
        except cli.UsageError as exc:
            raise CommandError(str(exc)) from None
