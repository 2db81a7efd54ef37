"""System checks for bus configuration mistakes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.apps import AppConfig
from django.conf import settings
from django.core.checks import CheckMessage, Error, Warning, register

from jobsite_crawler.endpoints import parse_endpoint


@register()
def check_bus_settings(app_configs: Sequence[AppConfig] | None, **kwargs: Any) -> list[CheckMessage]:
    problems: list[CheckMessage] = []
    for text in settings.BUS_ENDPOINTS:
        if parse_endpoint(text).is_tcp and not settings.BUS_TOKEN:
            problems.append(
                Error(
                    f"TCP endpoint {text} is configured without BUS_TOKEN.",
                    hint="Set BUS_TOKEN to a shared secret: TCP sessions require the HMAC handshake.",
                    id="bus.E001",
                )
            )
    if settings.BUS_TOKEN and len(settings.BUS_TOKEN) < 16:
        problems.append(Warning("BUS_TOKEN is shorter than 16 characters.", id="bus.W001"))
    return problems
