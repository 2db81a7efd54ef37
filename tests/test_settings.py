"""Settings: a bad environment value stops start-up with a message naming the variable.

Each case runs `manage.py check` in a real subprocess with a minimal
environment, the way an operator would start jobsite.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def manage_check(**env: str) -> subprocess.CompletedProcess:
    # A minimal environment: nothing leaks in from the test run.
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DEBUG": "true", "SECRET_KEY": "x"}
    base.update(env)
    base = {key: value for key, value in base.items() if value is not None}
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


def output(proc: subprocess.CompletedProcess) -> str:
    return proc.stdout + proc.stderr


def test_minimal_environment_passes_the_check():
    proc = manage_check()

    assert proc.returncode == 0, output(proc)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("HEARTBEAT_TIMEOUT", "abc"),
        ("HEARTBEAT_TIMEOUT", "-5"),
        ("HEARTBEAT_TIMEOUT", "0"),
        ("HEARTBEAT_TIMEOUT", "nan"),
        ("BUS_AUTOSTART", "maybe"),
        ("DEBUG", "sometimes"),
        ("DATABASE_URL", "mysql://x"),
        ("BUS_ENDPOINTS", "relative.sock"),
        ("BUS_ENDPOINTS", "tcp://host:99999"),
        ("BUS_ENDPOINTS", "tcp://host:port"),
        ("SOCKET_PATH", "relative.sock"),
        ("SUPERVISOR_SOCKET_PATH", "relative.sock"),
        ("SECURE_PROXY_SSL_HEADER", "X-Forwarded-Proto: https"),
        ("SECURE_PROXY_SSL_HEADER", "HTTP_X_FORWARDED_PROTO"),
        ("CSRF_TRUSTED_ORIGINS", "jobs.example.org"),
        ("CSRF_TRUSTED_ORIGINS", "https://jobs.example.org/login"),
        ("CSRF_TRUSTED_ORIGINS", "https://ok.example.org,ftp://jobs.example.org"),
        ("SECURE_SSL_REDIRECT", "always"),
        ("SECURE_HSTS_SECONDS", "a year"),
        ("SECURE_HSTS_SECONDS", "-1"),
        ("SESSION_COOKIE_SECURE", "maybe"),
        ("AXES_FAILURE_LIMIT", "0"),
        ("TRUSTED_PROXIES", "one"),
        ("EMAIL_URL", "carrier-pigeon://coop"),
    ],
)
def test_bad_value_stops_start_up_naming_the_variable(variable, value):
    proc = manage_check(**{variable: value})

    assert proc.returncode != 0, output(proc)
    assert variable in output(proc)


def test_tcp_endpoint_without_token_fails_the_system_check_bus_e001():
    proc = manage_check(BUS_ENDPOINTS="tcp://127.0.0.1:7000")

    assert proc.returncode != 0, output(proc)
    assert "bus.E001" in output(proc)
    assert "BUS_TOKEN" in output(proc)


def test_tcp_endpoint_with_token_passes_the_check():
    proc = manage_check(BUS_ENDPOINTS="tcp://127.0.0.1:7000", BUS_TOKEN="a-shared-secret-of-some-length")

    assert proc.returncode == 0, output(proc)
    assert "bus.E001" not in output(proc)


def test_missing_secret_key_without_debug_stops_start_up_naming_secret_key():
    proc = manage_check(DEBUG="false", SECRET_KEY=None)

    assert proc.returncode != 0, output(proc)
    assert "SECRET_KEY" in output(proc)


def test_missing_secret_key_with_debug_uses_the_development_key():
    proc = manage_check(SECRET_KEY=None)

    assert proc.returncode == 0, output(proc)


def test_short_secret_key_without_debug_stops_start_up_naming_secret_key():
    proc = manage_check(DEBUG="false", SECRET_KEY="s" * 49, ALLOWED_HOSTS="jobs.example.org")

    assert proc.returncode != 0, output(proc)
    assert "SECRET_KEY" in output(proc) and "50" in output(proc)
    assert manage_check(DEBUG="false", SECRET_KEY=SECRET, ALLOWED_HOSTS="jobs.example.org").returncode == 0


SECRET = "k3y-" + "x9Qz" * 15  # 64 characters, more than 5 distinct ones


def shown_settings(*names: str, **env: str) -> list[str]:
    base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "SECRET_KEY": SECRET, "ALLOWED_HOSTS": "jobs.example.org"}
    base.update(env)
    proc = subprocess.run(
        [
            sys.executable,
            "manage.py",
            "shell",
            "-c",
            f"from django.conf import settings; print(*(repr(getattr(settings, n)) for n in {names!r}), sep='|')",
        ],
        cwd=ROOT,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, output(proc)
    return proc.stdout.strip().splitlines()[-1].split("|")


def test_cookies_are_secure_unless_debug_and_the_proxy_header_becomes_a_meta_key():
    names = (
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_PROXY_SSL_HEADER",
        "CSRF_TRUSTED_ORIGINS",
        "TRUSTED_PROXIES",
    )
    assert shown_settings(*names, DEBUG="false") == ["True", "True", "None", "[]", "0"]
    assert shown_settings(*names, DEBUG="true") == ["False", "False", "None", "[]", "0"]
    assert shown_settings(
        *names,
        DEBUG="false",
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        CSRF_TRUSTED_ORIGINS="https://jobs.example.org, https://*.example.net:8443",
    ) == [
        "True",
        "True",
        "('HTTP_X_FORWARDED_PROTO', 'https')",
        "['https://jobs.example.org', 'https://*.example.net:8443']",
        "1",
    ]


def readme_production_environment() -> dict[str, str]:
    """The `export` lines of the README's "Running in production" example, placeholders filled in."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Running in production", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    environment = {}
    for line in section.splitlines():
        if line.startswith("export "):
            for word in shlex.split(line.removeprefix("export "), comments=True):
                name, _, value = word.partition("=")
                environment[name] = value
    assert {"SECRET_KEY", "ALLOWED_HOSTS", "SECURE_PROXY_SSL_HEADER", "DATABASE_URL"} <= environment.keys()
    assert environment["SECRET_KEY"] == "..."
    environment["SECRET_KEY"] = SECRET
    environment["DATABASE_URL"] = "postgres://jobsite:secret@db.example.org/jobsite"
    return environment


def test_the_readme_production_example_passes_check_deploy_without_warnings():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **readme_production_environment()}
    assert "DEBUG" not in env
    proc = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, output(proc)
    assert "no issues" in output(proc)
