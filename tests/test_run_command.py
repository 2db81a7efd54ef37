"""The README's run command, ./bin/run, as a user runs it: a real crawl end to end, then Ctrl-C.

It runs on its own SQLite file (the embedded default), whatever database the
suite uses, so it runs once, in the SQLite run of the suite.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from tests.conftest import ROOT, free_port, is_postgres, local_site, wait_until

pytestmark = pytest.mark.timeout(300)


def health(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:  # 503: up, but no crawler session yet
        return None if exc.code != 503 else {"live_sessions": 0}
    except OSError:
        return None


def rows(db: str, sql: str) -> list[tuple]:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(sql).fetchall()


def test_bin_run_crawls_a_page_end_to_end_and_ctrl_c_leaves_nothing_running(tmp_path, short_socket_path):
    if is_postgres():
        pytest.skip("./bin/run uses its own SQLite file; the SQLite run covers it")
    db = str(tmp_path / "run.sqlite3")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_") and k != "DJANGO_SETTINGS_MODULE"}
    env.update(
        PORT=str(port),
        CRAWLER_SOCKET=short_socket_path,
        DATABASE_URL=f"sqlite:///{db}",
        ALLOW_PRIVATE="1",
        ADMIN_PASSWORD_FILE=str(tmp_path / "admin-password"),
    )
    log = open(tmp_path / "run.log", "wb")
    with local_site("Hello from the test") as (site, _, _):
        run = subprocess.Popen(
            [sys.executable, str(ROOT / "bin" / "run")],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                lambda: (health(port) or {}).get("live_sessions") == 1,
                timeout=120,
                interval=0.2,
                message="./bin/run serving pages with its crawler connected",
            )
            password = (tmp_path / "admin-password").read_text().strip()
            assert password and password in (tmp_path / "run.log").read_text()
            assert rows(db, "SELECT is_superuser FROM auth_user WHERE username = 'admin'") == [(1,)]

            subprocess.run(
                [str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "manage.py"), "enqueue", f"{site}/page"],
                cwd=ROOT,
                env={**env, "DEBUG": "true"},
                check=True,
                capture_output=True,
            )
            done = wait_until(
                lambda: rows(db, "SELECT status, result FROM jobs_job WHERE status = 'succeeded'"),
                timeout=30,
                interval=0.1,
                message="the page crawled",
            )
            result = json.loads(done[0][1])
            assert result["status"] == 200 and result["title"] == "Hello from the test", result

            run.send_signal(signal.SIGINT)  # what Ctrl-C sends
            assert run.wait(timeout=30) == 0
        except BaseException:
            print((tmp_path / "run.log").read_text(errors="replace")[-6000:])
            raise
        finally:
            if run.poll() is None:
                os.killpg(run.pid, signal.SIGKILL)
                run.wait(timeout=10)
    assert rows(db, "SELECT COUNT(*) FROM jobs_job WHERE status = 'running'") == [(0,)]
    assert rows(db, "SELECT COUNT(*) FROM bus_bussession WHERE closed_at IS NULL") == [(0,)]
    assert "Traceback" not in (tmp_path / "run.log").read_text(errors="replace")
