"""Strict parsing of environment variables for settings.

django-environ reads the raw values; these helpers turn a bad value into an
ImproperlyConfigured error that names the variable, so start-up stops with a
message a person can act on instead of a traceback deep inside the bus.
"""

from __future__ import annotations

import re
from typing import overload

import environ
from django.core.exceptions import ImproperlyConfigured

env = environ.Env()


def _raw(name: str) -> str | None:
    value = env.str(name, default=None)
    if value is None:
        return None
    value = value.strip()
    return value or None


def positive_float(name: str, default: float, *, allow_zero: bool = False) -> float:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number of seconds") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ImproperlyConfigured(f"{name}={raw!r} must be a finite number")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ImproperlyConfigured(f"{name}={raw!r} must be {bound}")
    return value


def positive_int(name: str, default: int, *, minimum: int = 1) -> int:
    raw = _raw(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number") from None
    if value < minimum:
        raise ImproperlyConfigured(f"{name}={raw!r} must be >= {minimum}")
    return value


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def boolean(name: str, default: bool) -> bool:
    raw = _raw(name)
    if raw is None:
        return default
    if raw.lower() in _TRUE:
        return True
    if raw.lower() in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} must be one of true/false/1/0/yes/no/on/off")


@overload
def string(name: str, default: str) -> str: ...
@overload
def string(name: str, default: None = None) -> str | None: ...
def string(name: str, default: str | None = None) -> str | None:
    raw = _raw(name)
    return default if raw is None else raw


def string_list(name: str) -> list[str]:
    raw = _raw(name)
    if raw is None:
        return []
    return [item.strip() for item in raw.split(",") if item.strip()]


def database(name: str, default: str) -> dict:
    raw = _raw(name) or default
    try:
        config = environ.Env.db_url_config(raw)
    except Exception as exc:  # django-environ raises several kinds
        raise ImproperlyConfigured(f"{name}={raw!r} is not a database URL: {exc}") from None
    engine = config.get("ENGINE", "")
    if engine not in ("django.db.backends.sqlite3", "django.db.backends.postgresql"):
        raise ImproperlyConfigured(f"{name}={raw!r}: jobsite supports sqlite:// and postgres:// URLs only")
    return config


_HEADER_NAME = re.compile(r"[A-Za-z0-9]+(-[A-Za-z0-9]+)*")
# scheme://host[:port], the host possibly starting with "*." as Django allows, nothing after it.
_ORIGIN = re.compile(r"https?://(\*\.)?[A-Za-z0-9.-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?")


def proxy_ssl_header(name: str) -> tuple[str, str] | None:
    """A header name such as X-Forwarded-Proto as Django's ("HTTP_X_FORWARDED_PROTO", "https")."""
    raw = _raw(name)
    if raw is None:
        return None
    if not _HEADER_NAME.fullmatch(raw):
        raise ImproperlyConfigured(
            f"{name}={raw!r} must be a header name such as X-Forwarded-Proto (letters, digits and dashes)"
        )
    return "HTTP_" + raw.upper().replace("-", "_"), "https"


def origin_list(name: str) -> list[str]:
    """Comma-separated origins, each scheme://host[:port] with an http or https scheme and no path."""
    origins = string_list(name)
    for origin in origins:
        if not _ORIGIN.fullmatch(origin):
            raise ImproperlyConfigured(
                f"{name}: {origin!r} is not an origin like https://jobs.example.org (scheme://host[:port], no path)"
            )
    return origins


def email(name: str) -> dict | None:
    """An email URL (smtp://user:password@host:587, smtp+tls://, smtp+ssl://, consolemail://) as Django settings."""
    raw = _raw(name)
    if raw is None:
        return None
    try:
        config = environ.Env.email_url_config(raw)
    except Exception as exc:  # django-environ raises several kinds
        raise ImproperlyConfigured(f"{name} is not an email URL: {exc}") from None
    # Unset parts stay at Django's defaults (EMAIL_HOST_USER must be a string, not None).
    return {key: value for key, value in config.items() if value not in (None, "")}
