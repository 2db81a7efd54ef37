"""manage.py runbus: the bus in the foreground, as a long-running worker."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from types import FrameType
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from bus.runtime import Bus, BusConfigError
from jobsite_crawler.endpoints import EndpointError, parse_endpoint
from jobsite_crawler.logfmt import kv

log = logging.getLogger("bus.runbus")


def endpoint_argument(text: str) -> str:
    try:
        return str(parse_endpoint(text))
    except EndpointError as exc:
        raise ValueError(str(exc)) from None


class Command(BaseCommand):
    help = (
        "Run the bus in the foreground: connect to the crawler endpoints, dispatch jobs, record outcomes, "
        "and requeue a session's jobs the moment it ends. SIGTERM/SIGINT end it cleanly."
    )
    requires_system_checks = []  # runbus validates its own endpoints and token

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument(
            "--endpoint",
            action="append",
            type=endpoint_argument,
            metavar="ENDPOINT",
            help="crawler endpoint (/path.sock, unix:/path.sock or tcp://host:port) to register at start-up; "
            "repeatable; used instead of BUS_ENDPOINTS / SUPERVISOR_SOCKET_PATH / SOCKET_PATH. The bus serves "
            "its fair share of every registered crawler, these included",
        )

    def handle(self, *args: Any, endpoint: list[str] | None = None, **options: Any) -> None:
        endpoints = endpoint or settings.BUS_ENDPOINTS
        if not endpoints:
            log.info(
                kv(
                    "bus.waiting_for_crawlers",
                    detail="no endpoint in --endpoint, BUS_ENDPOINTS, SUPERVISOR_SOCKET_PATH or SOCKET_PATH: "
                    "serving the crawlers registered in the database (manage.py crawlers add, the admin, "
                    "the crawlers page, or runcrawler --announce)",
                )
            )
        try:
            bus = Bus.from_settings(endpoints=endpoints)
        except BusConfigError as exc:
            raise CommandError(str(exc)) from None

        interrupts = 0

        def request_stop(signum: int, frame: FrameType | None) -> None:
            nonlocal interrupts
            interrupts += signum == signal.SIGINT
            if interrupts > 1:
                log.error(kv("bus.forced_exit", signal=signal.Signals(signum).name))
                os._exit(130)
            log.info(kv("bus.stopping", signal=signal.Signals(signum).name))
            bus.stop()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        status = bus.run()
        if status:
            sys.exit(status)
