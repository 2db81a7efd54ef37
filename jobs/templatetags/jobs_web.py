"""Template filters of the web pages. None marks anything safe: crawler data stays escaped."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from django import template
from django.template.defaultfilters import filesizeformat

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
    """Indented JSON text, still escaped by autoescape where it is shown.

    Never raises: indenting recurses in Python, so a deep value falls back to
    compact JSON (the C encoder goes deeper), then to a note. Not repr(): it
    fails on the same values, and on an int past 4,300 digits.
    """
    for indent in (2, None):
        try:
            return json.dumps(value, indent=indent, sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError, OverflowError):
            continue
    return "(this value cannot be shown as JSON)"


@register.filter
def byte_size(value) -> str:
    """filesizeformat for a whole number of bytes; anything else (a huge or odd value) as it is."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return filesizeformat(value)
    return display(value)


@register.filter
def display(value) -> str:
    """A result field as text: strings as they are, other values as compact JSON."""
    if isinstance(value, str):
        return value
    return pretty_json_compact(value)


def pretty_json_compact(value) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, sort_keys=True)
    except (TypeError, ValueError, RecursionError, OverflowError):
        return "(this value cannot be shown)"


@register.filter
def get(mapping, key):
    if isinstance(mapping, dict):
        return mapping.get(key)
    return None


@register.filter
def short_uuid(value) -> str:
    return str(value)[:8] if value else ""
