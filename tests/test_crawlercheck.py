"""The conformance checker (`crawlercheck`) against real crawler processes: good ones pass, broken ones fail.

Each crawler runs as a real subprocess on a free Unix socket or TCP port:
the reference crawler, the asyncio example (examples/async_crawler.py), the
Scrapy add-on's test project, and tests/broken_crawlers.py with one flaw
each. The checker runs as a subprocess too (`python -m
jobsite_crawler.conformance`, or `manage.py crawlercheck`), and its PASS /
FAIL / SKIP lines and exit status are what is judged.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from bus.management.commands.crawlercheck import Command
from jobsite_crawler.conformance import RULES
from jobsite_crawler.endpoints import parse_endpoint
from tests.broken_crawlers import BREAKS
from tests.conftest import ROOT, free_port, wait_until

TOKEN = "crawlercheck-test-token"
CHECK_TIMEOUT = 170  # a full check takes about 15 s on an idle machine


def start(processes, name: str, argv: list[str], endpoint: str, *, cwd: Path = ROOT, **env: str):
    """Start a crawler process listening on `endpoint`; return once it accepts connections."""
    log = open(processes.tmp_path / f"{name}-{len(processes.started)}.log", "wb")
    proc = subprocess.Popen(
        argv,
        cwd=cwd,
        env=processes.env(BUS_AUTOSTART="false", **env),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # processes.stop_all kills its group
    )
    log.close()
    proc.log_path = log.name  # type: ignore[attr-defined]
    processes.started.append(proc)
    target = parse_endpoint(endpoint)

    def accepts() -> bool:
        try:
            target.connect(timeout=1).close()  # the crawler sees a session that ends at once
        except OSError:
            return False
        return True

    wait_until(lambda: proc.poll() is not None or accepts(), timeout=60, message=f"{name} listening")
    assert proc.poll() is None, processes.output(proc)
    return proc


def reference_crawler(processes, endpoint: str, *args: str, token: str = ""):
    argv = [sys.executable, "-m", "jobsite_crawler", "--listen", endpoint, "--allow-private", *args]
    return start(processes, "reference", argv, endpoint, BUS_TOKEN=token)


def crawlercheck(processes, endpoint: str, *args: str, token: str = "", manage: bool = False):
    """Run the checker; return (exit status, {rule: (status, reason)}, output)."""
    program = [str(ROOT / "manage.py"), "crawlercheck"] if manage else ["-m", "jobsite_crawler.conformance"]
    done = subprocess.run(
        [sys.executable, *program, endpoint, *args],
        cwd=ROOT,
        env=processes.env(BUS_AUTOSTART="false", BUS_TOKEN=token),
        capture_output=True,
        text=True,
        timeout=CHECK_TIMEOUT,
    )
    results = {}
    for line in done.stdout.splitlines():
        status, _, rest = line.partition(" ")
        if status in ("PASS", "FAIL", "SKIP"):
            rule, _, reason = rest.partition(": ")
            results[rule] = (status, reason)
    return done.returncode, results, done.stdout + done.stderr


def assert_passes(code: int, results: dict, output: str, *, skipped: set[str]) -> None:
    assert set(results) == set(RULES), output
    assert {rule for rule, (status, _) in results.items() if status == "SKIP"} == skipped, output
    assert all(status != "FAIL" for status, _ in results.values()), output
    assert code == 0, output
    passed = len(RULES) - len(skipped)
    assert f"{passed} passed, 0 failed, {len(skipped)} skipped of {len(RULES)} rules" in output


@pytest.mark.slow
def test_the_reference_crawler_passes_on_a_unix_socket_without_a_token(processes, short_socket_path):
    endpoint = f"unix:{short_socket_path}"
    reference_crawler(processes, endpoint)
    code, results, output = crawlercheck(processes, endpoint)
    assert_passes(code, results, output, skipped={"auth.ready_proof", "auth.hello_checked"})
    first = output.splitlines()[0]
    assert "loopback" in first and "--allow-private" in first  # the one thing a crawler must allow
    assert "resumed" in results["session_end.resume_within"][1]  # the reference has the extension


@pytest.mark.slow
def test_the_reference_crawler_passes_over_tcp_with_the_token_of_the_settings(processes):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    reference_crawler(processes, endpoint, token=TOKEN)
    code, results, output = crawlercheck(processes, endpoint, token=TOKEN, manage=True)
    assert_passes(code, results, output, skipped={"auth.no_token"})
    assert results["auth.ready_proof"][0] == results["auth.hello_checked"][0] == "PASS"


@pytest.mark.slow
def test_a_crawler_written_with_the_asyncio_api_passes(processes, short_socket_path):
    endpoint = f"unix:{short_socket_path}"
    argv = [sys.executable, str(ROOT / "examples" / "async_crawler.py"), "--listen", endpoint, "--token", TOKEN]
    start(processes, "async-example", argv, endpoint)
    code, results, output = crawlercheck(processes, endpoint, "--token", TOKEN)
    assert_passes(code, results, output, skipped={"auth.no_token"})
    assert "status" in results["jobs.run"][1]  # its handler's result


@pytest.mark.slow
def test_the_scrapy_addon_passes(processes, short_socket_path):
    pytest.importorskip("scrapy")
    endpoint = f"unix:{short_socket_path}"
    argv = [sys.executable, "-m", "scrapy", "crawl", "site", "-s", f"JOBSITE_LISTEN={endpoint}"]
    project = ROOT / "tests" / "scrapy_project"
    start(processes, "scrapy", argv, endpoint, cwd=project, PYTHONPATH=str(ROOT), BUS_TOKEN="")
    code, results, output = crawlercheck(processes, endpoint)
    assert_passes(code, results, output, skipped={"auth.ready_proof", "auth.hello_checked"})


@pytest.mark.parametrize("flaw", sorted(BREAKS))
def test_a_crawler_broken_on_purpose_fails_the_rule_it_breaks(processes, short_socket_path, flaw):
    expected = BREAKS[flaw]
    endpoint = f"unix:{short_socket_path}"
    token = TOKEN if expected.token else ""
    argv = [sys.executable, str(ROOT / "tests" / "broken_crawlers.py"), "--listen", endpoint, "--break", flaw]
    start(processes, flaw, argv + (["--token", token] if token else []), endpoint)
    code, results, output = crawlercheck(
        processes, endpoint, "--only", expected.rule, *(["--token", token] * bool(token))
    )
    assert results[expected.rule][0] == expected.status, output
    # The handshake still passes: the checker blames the flaw, not everything.
    assert results["handshake.welcome"][0] == results["handshake.ready"][0] == "PASS", output
    assert code == (1 if expected.status == "FAIL" else 0), output


def test_a_flaw_is_found_in_a_full_check_too_and_the_other_rules_still_pass(processes, short_socket_path):
    """Without --only: one broken rule fails, exit 1, and the rules it does not touch still pass."""
    endpoint = f"unix:{short_socket_path}"
    argv = [
        sys.executable,
        str(ROOT / "tests" / "broken_crawlers.py"),
        "--listen",
        endpoint,
        "--break",
        "resends-stale",
    ]
    start(processes, "resends-stale", argv, endpoint)
    code, results, output = crawlercheck(processes, endpoint)
    assert code == 1, output
    failed = {rule for rule, (status, _) in results.items() if status == "FAIL"}
    assert failed == {"late.stale"}, output
    assert "0 failed" not in output and "1 failed" in output


def test_usage_errors_exit_2_with_a_clear_message(processes, short_socket_path):
    for args, message in (
        (["http://crawler:7000"], "unknown scheme"),
        ([f"unix:{short_socket_path}"], "cannot connect to the crawler"),  # nothing listens there
        ([f"tcp://127.0.0.1:{free_port()}"], "requires a token"),
        ([f"unix:{short_socket_path}", "--only", "no.such.rule"], "no rule is called no.such.rule"),
    ):
        code, _, output = crawlercheck(processes, *args)
        assert code == 2, output
        assert message in output


def test_a_crawler_that_refuses_our_token_is_a_usage_error_not_a_failure(processes, short_socket_path):
    endpoint = f"unix:{short_socket_path}"
    reference_crawler(processes, endpoint, token=TOKEN)
    code, _, output = crawlercheck(processes, endpoint)  # no token: the crawler refuses the hello
    assert code == 2, output
    assert "unauthorized" in output and "--token" in output
    code, _, output = crawlercheck(processes, endpoint, "--token", "not-the-token")
    assert code == 2, output


def test_manage_py_crawlercheck_reports_usage_errors_as_command_errors(short_socket_path):
    with pytest.raises(CommandError, match="unknown scheme") as error:
        call_command("crawlercheck", "ftp://crawler", stdout=io.StringIO())
    assert error.value.returncode == 2
    with pytest.raises(CommandError, match="cannot connect to the crawler") as error:
        call_command("crawlercheck", f"unix:{short_socket_path}", stdout=io.StringIO())
    assert error.value.returncode == 2
    assert "--allow-private" in Command.help and not os.path.exists(short_socket_path)
