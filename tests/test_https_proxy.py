"""Signing in behind a TLS-terminating proxy, end to end against a real runserver process.

The proxy is played by the test: real HTTP requests to the server carrying
what a proxy in front of it sends (`Host`, `X-Forwarded-Proto: https`,
`X-Forwarded-For`) and what a browser on https:// sends (`Origin`, cookies).
Before SECURE_PROXY_SSL_HEADER existed, the sign-in POST got 403 "Origin
checking failed".
"""

from __future__ import annotations

import http.client
import re
import urllib.parse
from http.cookies import SimpleCookie

import pytest

from tests.conftest import free_port, wait_until

pytestmark = pytest.mark.django_db(transaction=True)

HOST = "jobs.example.org"
PASSWORD = "proxy-test-password"
SECRET = "proxy-test-" + "k8Vx" * 14


class Browser:
    """Requests as they leave the proxy: to the server's port, for https://jobs.example.org."""

    def __init__(self, port: int):
        self.port = port
        self.cookies: dict[str, str] = {}
        self.set_cookie_headers: list[str] = []

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict | None = None,
        proto: str | None = "https",
        headers: dict | None = None,
    ) -> http.client.HTTPResponse:
        all_headers = {"Host": HOST, "X-Forwarded-For": "203.0.113.5", **(headers or {})}
        if proto:
            all_headers["X-Forwarded-Proto"] = proto
        if self.cookies:
            all_headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in self.cookies.items())
        data = None
        if body is not None:
            data = urllib.parse.urlencode(body)
            all_headers["Content-Type"] = "application/x-www-form-urlencoded"
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        connection.request(method, path, body=data, headers=all_headers)
        response = connection.getresponse()
        response.text = response.read().decode()  # type: ignore[attr-defined]
        connection.close()
        for header in response.headers.get_all("Set-Cookie") or []:
            self.set_cookie_headers.append(header)
            for name, morsel in SimpleCookie(header).items():
                self.cookies[name] = morsel.value
        return response


@pytest.fixture
def proxied_server(processes, django_user_model):
    django_user_model.objects.create_superuser("operator", "op@example.org", PASSWORD)
    port = free_port()
    env = processes.env(
        DEBUG="false",
        SECRET_KEY=SECRET,
        ALLOWED_HOSTS=HOST,
        SECURE_PROXY_SSL_HEADER="X-Forwarded-Proto",
        SECURE_SSL_REDIRECT="true",
        SECURE_HSTS_SECONDS="3600",
        BUS_AUTOSTART="false",
        BUS_ENDPOINTS="",
    )
    server = processes.manage("runserver", "--noreload", f"127.0.0.1:{port}", env=env, name="runserver")

    def answering() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"runserver exited:\n{processes.output(server)}")
        try:
            return Browser(port).request("GET", "/accounts/login/").status == 200
        except OSError:
            return False

    wait_until(answering, timeout=60, interval=0.1, message="runserver answering")
    return port


def test_sign_in_through_a_tls_proxy_lands_on_the_dashboard(proxied_server):
    browser = Browser(proxied_server)
    page = browser.request("GET", "/accounts/login/")
    assert page.status == 200
    assert page.headers["Strict-Transport-Security"].startswith("max-age=3600")
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page.text).group(1)
    assert any(h.startswith("csrftoken=") and "Secure" in h for h in browser.set_cookie_headers)

    signed_in = browser.request(
        "POST",
        "/accounts/login/",
        body={"csrfmiddlewaretoken": token, "username": "operator", "password": PASSWORD},
        headers={"Origin": f"https://{HOST}", "Referer": f"https://{HOST}/accounts/login/"},
    )
    assert signed_in.status == 302, signed_in.text[:2000]
    assert signed_in.headers["Location"] == "/"
    assert any(h.startswith("sessionid=") and "Secure" in h and "HttpOnly" in h for h in browser.set_cookie_headers)

    dashboard = browser.request("GET", "/")
    assert dashboard.status == 200
    assert 'id="current-user">operator<' in dashboard.text


def test_a_forged_origin_is_still_refused_behind_the_proxy(proxied_server):
    browser = Browser(proxied_server)
    token = re.search(
        r'name="csrfmiddlewaretoken" value="([^"]+)"', browser.request("GET", "/accounts/login/").text
    ).group(1)
    refused = browser.request(
        "POST",
        "/accounts/login/",
        body={"csrfmiddlewaretoken": token, "username": "operator", "password": PASSWORD},
        headers={"Origin": "https://evil.example.net"},
    )
    assert refused.status == 403


def test_plain_http_is_redirected_to_https_except_health(proxied_server):
    browser = Browser(proxied_server)
    redirected = browser.request("GET", "/jobs/", proto=None)
    assert redirected.status == 301 and redirected.headers["Location"] == f"https://{HOST}/jobs/"
    health = browser.request("GET", "/health", proto=None)
    assert health.status in (200, 503) and '"database": "ok"' in health.text
