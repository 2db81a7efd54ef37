"""Settings: a bad environment value stops start-up with a message naming the variable.

Each case runs `manage.py check` in a real subprocess with a minimal
environment, the way an operator would start jobsite.
"""

from __future__ import annotations

import os
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
        cwd=ROOT, env=base, capture_output=True, text=True, timeout=60,
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
