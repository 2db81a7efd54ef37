"""Signing in: failed attempts throttled by django-axes (pages and admin), password reset only with mail.

Attempts are counted in the database (axes' AccessAttempt), which each test
rolls back: no test locks another out. Tests elsewhere sign in with
force_login, which axes does not count.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from axes.models import AccessAttempt
from django.test import Client
from django.urls import NoReverseMatch, reverse

from tests.conftest import ROOT

pytestmark = pytest.mark.django_db

PASSWORD = "the-right-password"


@pytest.fixture
def operator(django_user_model):
    return django_user_model.objects.create_superuser("operator", "op@example.org", PASSWORD)


def sign_in(client: Client, path: str, password: str, **extra) -> int:
    return client.post(path, {"username": "operator", "password": password}, **extra).status_code


@pytest.mark.parametrize("path", ["/accounts/login/", "/admin/login/"])
def test_failed_sign_ins_lock_out_that_username_from_that_address(operator, settings, path):
    attacker = Client(REMOTE_ADDR="203.0.113.7")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        assert sign_in(attacker, path, "wrong") == 200  # the form again, with its error
    assert sign_in(attacker, path, "wrong") == 429
    # Locked: even the right password is refused from there...
    assert sign_in(attacker, path, PASSWORD) == 429
    assert AccessAttempt.objects.filter(username="operator", ip_address="203.0.113.7").exists()
    # ...while the operator, elsewhere, still signs in.
    assert sign_in(Client(REMOTE_ADDR="198.51.100.1"), path, PASSWORD) == 302


def test_a_successful_sign_in_clears_the_failures(operator, settings):
    client = Client(REMOTE_ADDR="203.0.113.8")
    for _ in range(settings.AXES_FAILURE_LIMIT - 1):
        sign_in(client, "/accounts/login/", "wrong")
    assert sign_in(client, "/accounts/login/", PASSWORD) == 302
    client.logout()
    assert sign_in(client, "/accounts/login/", "wrong") == 200  # counting starts again


def test_behind_the_proxy_the_client_address_is_the_one_the_proxy_appended(operator, settings):
    settings.TRUSTED_PROXIES = 1
    for n in range(settings.AXES_FAILURE_LIMIT):
        # The client forges a different left-most address every time; the proxy appends the real one.
        proxied = Client(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR=f"1.2.3.{n}, 203.0.113.9")
        sign_in(proxied, "/accounts/login/", "wrong")
    assert set(AccessAttempt.objects.values_list("ip_address", flat=True)) == {"203.0.113.9"}
    assert (
        sign_in(Client(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="203.0.113.9"), "/accounts/login/", PASSWORD) == 429
    )
    # Another client behind the same proxy is not locked out with it.
    assert (
        sign_in(Client(REMOTE_ADDR="10.0.0.2", HTTP_X_FORWARDED_FOR="198.51.100.2"), "/accounts/login/", PASSWORD)
        == 302
    )


def test_without_a_proxy_the_forwarded_header_is_ignored(operator, settings):
    settings.TRUSTED_PROXIES = 0
    sign_in(Client(REMOTE_ADDR="203.0.113.10", HTTP_X_FORWARDED_FOR="1.1.1.1"), "/accounts/login/", "wrong")
    assert list(AccessAttempt.objects.values_list("ip_address", flat=True)) == ["203.0.113.10"]


# --- Password reset ---------------------------------------------------------------------------


def test_without_mail_there_is_no_password_reset(client, settings):
    assert not settings.PASSWORD_RESET_ENABLED  # the test environment sets no EMAIL_URL
    for name in ("password_reset", "password_reset_done", "password_reset_complete", "admin_password_reset"):
        with pytest.raises(NoReverseMatch):
            reverse(name)
    for path in ("/accounts/password_reset/", "/accounts/reset/done/", "/admin/password_reset/"):
        assert client.get(path).status_code in (302, 404), path  # the admin sends unknown pages to its login
    assert b"password_reset" not in client.get("/accounts/login/").content
    assert b"Forgotten your password" not in client.get("/admin/login/").content


def test_with_mail_configured_the_reset_pages_exist():
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "DEBUG": "true",
        "SECRET_KEY": "x",
        "EMAIL_URL": "smtp+tls://jobsite:secret@mail.example.org:587",
        "DEFAULT_FROM_EMAIL": "jobs@example.org",
    }
    script = (
        "from django.conf import settings; from django.urls import reverse; "
        "print(reverse('password_reset'), reverse('admin_password_reset'), settings.EMAIL_HOST, "
        "settings.EMAIL_PORT, settings.EMAIL_USE_TLS, settings.DEFAULT_FROM_EMAIL)"
    )
    proc = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == (
        "/accounts/password_reset/ /admin/password_reset/ mail.example.org 587 True jobs@example.org"
    )
