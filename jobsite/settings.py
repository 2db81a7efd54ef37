"""Settings for jobsite, read from the environment in this one place.

Every variable is parsed strictly: a bad value stops start-up with a message
that names the variable (see jobsite/env.py).
"""

from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

from jobsite import env
from jobsite_crawler.endpoints import EndpointError, parse_endpoints

BASE_DIR = Path(__file__).resolve().parent.parent

DEBUG = env.boolean("DEBUG", False)
SECRET_KEY = env.string("SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set unless DEBUG=true")
    SECRET_KEY = "jobsite-insecure-development-key-only-for-debug"
elif not DEBUG and len(SECRET_KEY) < 50:
    # Django's own deployment check asks for 50; a short key is guessable offline from any signed cookie.
    raise ImproperlyConfigured(
        f"SECRET_KEY is {len(SECRET_KEY)} characters long; with DEBUG=false it must have at least 50 "
        "(python -c 'import secrets; print(secrets.token_urlsafe(50))')"
    )
ALLOWED_HOSTS = env.string_list("ALLOWED_HOSTS") or (["localhost", "127.0.0.1", "[::1]"] if DEBUG else [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "axes",
    "jobs.apps.JobsConfig",
    "bus.apps.BusConfig",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    # Serves /static/ from gunicorn/uvicorn too, so pages keep their CSS and
    # live updates with DEBUG=false (no separate web server needed).
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Last, as django-axes asks: it turns a locked-out sign-in into its 429 answer.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "jobsite.urls"
WSGI_APPLICATION = "jobsite.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

# --- Database -------------------------------------------------------------
# SQLite is the embedded default for one machine; PostgreSQL for production.
DATABASES = {"default": env.database("DATABASE_URL", f"sqlite:///{BASE_DIR / 'db.sqlite3'}")}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    DATABASES["default"]["OPTIONS"] = {
        # WAL lets page requests read while the bus thread writes; IMMEDIATE
        # takes the write lock at BEGIN so two writers queue on the busy
        # timeout instead of failing with "database is locked" on upgrade.
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        "transaction_mode": "IMMEDIATE",
        "timeout": 20,
    }
    # A file, not :memory:, so that processes a test starts share its data.
    DATABASES["default"]["TEST"] = {
        "NAME": env.string("TEST_SQLITE_PATH")
        or str(Path(tempfile.gettempdir()) / f"jobsite-test-{os.getpid()}.sqlite3"),
    }
else:
    DATABASES["default"].setdefault("CONN_HEALTH_CHECKS", True)
    # Per process, so that test runs side by side do not drop each other's database.
    DATABASES["default"]["TEST"] = {
        "NAME": env.string("TEST_DATABASE_NAME") or f"test_{DATABASES['default']['NAME']}_{os.getpid()}",
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = BASE_DIR / "staticfiles"
# Serve straight from the apps' static folders: no collectstatic step to forget.
WHITENOISE_USE_FINDERS = True
# ...so a missing STATIC_ROOT (collectstatic never run) is expected, not a problem.
warnings.filterwarnings("ignore", message="No directory at", module="whitenoise.base")
LOGIN_URL = "login"

# --- HTTPS behind a TLS-terminating proxy ---------------------------------------
# The proxy sets this header to "https" (and must strip it from what clients
# send); Django then sees the request as secure, so the CSRF origin check
# compares the browser's https:// Origin with https://<host> and passes.
SECURE_PROXY_SSL_HEADER = env.proxy_ssl_header("SECURE_PROXY_SSL_HEADER")
# Other origins whose forms may post here (e.g. the site under a second name).
CSRF_TRUSTED_ORIGINS = env.origin_list("CSRF_TRUSTED_ORIGINS")
SECURE_SSL_REDIRECT = env.boolean("SECURE_SSL_REDIRECT", False)
# Load balancers probe /health over plain http.
SECURE_REDIRECT_EXEMPT = [r"^health$"]
SECURE_HSTS_SECONDS = env.positive_int("SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env.boolean("SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env.boolean("SECURE_HSTS_PRELOAD", False)
# Secure cookies unless DEBUG: ./bin/run serves plain http on 127.0.0.1 with DEBUG=true.
SESSION_COOKIE_SECURE = env.boolean("SESSION_COOKIE_SECURE", not DEBUG)
CSRF_COOKIE_SECURE = env.boolean("CSRF_COOKIE_SECURE", not DEBUG)

# --- Sign-in: throttled failures, password reset only with mail ---------------------
AUTHENTICATION_BACKENDS = [
    # django-axes first: it refuses a locked-out username and address before the password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_FAILURE_LIMIT = env.positive_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = env.positive_float("AXES_COOLOFF_MINUTES", 15.0) / 60  # hours, as axes reads a number
# Per username and client address together: an attacker cannot lock the real operator out from elsewhere.
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
# The client's address: REMOTE_ADDR, or behind the proxy the address it appended to X-Forwarded-For.
AXES_CLIENT_IP_CALLABLE = "jobs.views.client_ip"
TRUSTED_PROXIES = env.positive_int("TRUSTED_PROXIES", 1 if SECURE_PROXY_SSL_HEADER else 0, minimum=0)

# Password reset sends mail: its pages exist only when EMAIL_URL is set.
# The EMAIL_* settings are set only then: Django 6.1 deprecates them (for
# MAILERS), and setting Django's own defaults again would only warn.
_email = env.email("EMAIL_URL") or {}
if _email:
    EMAIL_BACKEND = _email.get("EMAIL_BACKEND", "django.core.mail.backends.smtp.EmailBackend")
    EMAIL_HOST = _email.get("EMAIL_HOST", "localhost")
    EMAIL_PORT = _email.get("EMAIL_PORT", 25)
    EMAIL_HOST_USER = _email.get("EMAIL_HOST_USER", "")
    EMAIL_HOST_PASSWORD = _email.get("EMAIL_HOST_PASSWORD", "")
    EMAIL_USE_TLS = _email.get("EMAIL_USE_TLS", False)
    EMAIL_USE_SSL = _email.get("EMAIL_USE_SSL", False)
DEFAULT_FROM_EMAIL = env.string("DEFAULT_FROM_EMAIL", "jobsite@localhost")
PASSWORD_RESET_ENABLED = bool(_email)

# --- Bus and crawler --------------------------------------------------------
HEARTBEAT_TIMEOUT = env.positive_float("HEARTBEAT_TIMEOUT", 60.0)
SUPERVISED = env.boolean("SUPERVISED", False)
SUPERVISOR_SOCKET_PATH = env.string("SUPERVISOR_SOCKET_PATH")
SOCKET_PATH = env.string("SOCKET_PATH")
BUS_AUTOSTART = env.boolean("BUS_AUTOSTART", True)
BUS_TOKEN = env.string("BUS_TOKEN")
BUS_MAX_FRAME = env.positive_int("BUS_MAX_FRAME", 1024 * 1024, minimum=1024)
BUS_BACKOFF_BASE = env.positive_float("BUS_BACKOFF_BASE", 0.1)
BUS_BACKOFF_CAP = env.positive_float("BUS_BACKOFF_CAP", 30.0)
BUS_POLL_INTERVAL = env.positive_float("BUS_POLL_INTERVAL", 2.0)
BUS_NODE = env.string("BUS_NODE")
BUS_SWEEP_INTERVAL = env.positive_float("BUS_SWEEP_INTERVAL", 2.0)
BUS_STALL_TIMEOUT = env.positive_float("BUS_STALL_TIMEOUT", 0.0, allow_zero=True)
# Server-side caps on what one crawler may ask for: slots claimed by one
# session, and the stored size of one result (bigger ones become a marker).
BUS_MAX_SLOTS = env.positive_int("BUS_MAX_SLOTS", 1000)
BUS_MAX_RESULT = env.positive_int("BUS_MAX_RESULT", 64 * 1024, minimum=1024)
# Stored items (docs/protocol.md section 17): at most this many of a `done`'s
# items are kept per job (more are cut, the row says truncated); 0: none kept.
JOB_ITEMS_MAX = env.positive_int("JOB_ITEMS_MAX", 1000, minimum=0)
# The fleet (jobs/fleet.py, bus/runtime.py): a bus process owns crawlers for
# as long as its lease lasts; a dead process's crawlers are taken over after
# it. Self-registered crawlers unreachable for BUS_ANNOUNCE_TTL are dropped.
# On SQLite (one machine) a dead node is seen at once from its pid, and a long
# write by anyone delays every lease renewal: a longer lease costs nothing there.
BUS_OWNER_LEASE = env.positive_float(
    "BUS_OWNER_LEASE", 10.0 if DATABASES["default"]["ENGINE"].endswith("sqlite3") else 1.2
)
BUS_ANNOUNCE_TTL = env.positive_float("BUS_ANNOUNCE_TTL", 300.0)
BUS_HANDOVER_RESUME = env.positive_float("BUS_HANDOVER_RESUME", 10.0)
if BUS_OWNER_LEASE < 0.3:
    raise ImproperlyConfigured("BUS_OWNER_LEASE must be at least 0.3 seconds")
JOB_RETRY_BACKOFF_BASE = env.positive_float("JOB_RETRY_BACKOFF_BASE", 2.0, allow_zero=True)
JOB_RETRY_BACKOFF_CAP = env.positive_float("JOB_RETRY_BACKOFF_CAP", 600.0, allow_zero=True)
# Politeness (jobs.dispatch, docs/guarantees.md): per host, fleet-wide. A host's
# own delay or concurrency (admin, /hosts/) overrides these defaults.
HOST_DELAY = env.positive_float("HOST_DELAY", 1.0, allow_zero=True)
HOST_CONCURRENCY = env.positive_int("HOST_CONCURRENCY", 2)
# A 429, a 503 or a connection error backs the host off: Retry-After when
# given, else HOST_BACKOFF doubled per report in a row; both capped at
# HOST_BACKOFF_MAX. One job is sent back at most HOST_BACKOFF_JOB_LIMIT times.
HOST_BACKOFF = env.positive_float("HOST_BACKOFF", 10.0)
HOST_BACKOFF_MAX = env.positive_float("HOST_BACKOFF_MAX", 3600.0)
HOST_BACKOFF_JOB_LIMIT = env.positive_int("HOST_BACKOFF_JOB_LIMIT", 10, minimum=0)
# robots.txt (jobs.robots): "obey" (default) or "ignore". Obeyed, a host's jobs
# start only once a crawler that offers it has fetched the host's robots.txt
# (at most once per ROBOTS_TTL seconds, fleet-wide), and URLs it disallows for
# CRAWLER_USER_AGENT end as `disallowed`, never fetched.
ROBOTS_TXT = env.string("ROBOTS_TXT", "obey").strip().lower()
if ROBOTS_TXT not in ("obey", "ignore"):
    raise ImproperlyConfigured(f"ROBOTS_TXT={ROBOTS_TXT!r} must be obey or ignore")
ROBOTS_TTL = env.positive_float("ROBOTS_TTL", 86400.0)
CRAWLER_USER_AGENT = env.string("CRAWLER_USER_AGENT", "jobsite-crawler/1").strip()
if not CRAWLER_USER_AGENT or any(ord(char) < 0x20 or ord(char) == 0x7F for char in CRAWLER_USER_AGENT):
    raise ImproperlyConfigured("CRAWLER_USER_AGENT must be a non-empty string without control characters")
if HOST_BACKOFF_MAX < HOST_BACKOFF:
    raise ImproperlyConfigured("HOST_BACKOFF_MAX must be >= HOST_BACKOFF")
if BUS_BACKOFF_CAP < BUS_BACKOFF_BASE:
    raise ImproperlyConfigured("BUS_BACKOFF_CAP must be >= BUS_BACKOFF_BASE")

_endpoint_texts = env.string_list("BUS_ENDPOINTS") or [
    text for text in (SUPERVISOR_SOCKET_PATH or SOCKET_PATH,) if text
]
try:
    BUS_ENDPOINTS = [str(endpoint) for endpoint in parse_endpoints(_endpoint_texts)]
except EndpointError as exc:
    source = (
        "BUS_ENDPOINTS"
        if env.string_list("BUS_ENDPOINTS")
        else ("SUPERVISOR_SOCKET_PATH" if SUPERVISOR_SOCKET_PATH else "SOCKET_PATH")
    )
    raise ImproperlyConfigured(f"{source}: {exc}") from None

# --- Logging: one key=value line per event, on stderr -----------------------
LOG_LEVEL = env.string("LOG_LEVEL", "INFO").upper()
if LOG_LEVEL not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
    raise ImproperlyConfigured(f"LOG_LEVEL={LOG_LEVEL!r} must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"kv": {"()": "jobsite_crawler.logfmt.KeyValueFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "kv"}},
    "root": {"handlers": ["stderr"], "level": "WARNING"},
    "loggers": {
        "jobs": {"level": LOG_LEVEL},
        "bus": {"level": LOG_LEVEL},
        "jobsite_crawler": {"level": LOG_LEVEL},  # the crawler side (runcrawler, the library)
        "django": {"level": "INFO"},
    },
}
