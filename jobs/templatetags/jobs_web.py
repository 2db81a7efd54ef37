"""Template filters of the web pages. None marks anything safe: crawler data stays escaped."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from django import template

from jobs.admin import format_duration

register = template.Library()


@register.filter
def duration(value) -> str:
    """Seconds (or a timedelta) as 45s, 3m 05s, 2h 03m, 4d 02h."""
    if value is None or value == "":
        return "–"
    if not isinstance(value, timedelta):
        value = timedelta(seconds=float(value))
    return format_duration(value)


@register.filter
def since(value: datetime | None, now: datetime) -> str:
    if value is None:
        return "–"
    return format_duration(now - value)


@register.filter
def http_url(value) -> str:
    """The value when it is an http(s) URL, else "": only those become links (no javascript: hrefs)."""
    if isinstance(value, str) and value.lower().startswith(("http://", "https://")):
        return value
    return ""


@register.filter
def pretty_json(value) -> str:
    """Indented JSON text, still escaped by autoescape where it is shown."""
    try:
        return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


@register.filter
def get(mapping, key):
    if isinstance(mapping, dict):
        return mapping.get(key)
    return None


@register.filter
def short_uuid(value) -> str:
    return str(value)[:8] if value else ""
