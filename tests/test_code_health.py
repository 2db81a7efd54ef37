"""Code health: apps depend one way (bus -> jobs -> jobsite), and commands share one set of number parsers.

The import rules are read from the source with `ast`, so an import hidden in a
function body counts as much as one at the top of a module.
"""

from __future__ import annotations

import argparse
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from jobsite_crawler.argtypes import seconds, whole_number
from tests.conftest import ROOT

# The project's wiring may name apps: the URLconf includes their URLs, and the
# server entry points load Django. Everything else in jobsite/ is below the apps.
WIRING = {"urls.py", "wsgi.py", "asgi.py"}


def imported_packages(path: Path) -> set[str]:
    """The top-level packages a module imports (absolute imports only: relative ones stay in the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def modules_under(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", modules_under("jobs"), ids=lambda path: str(path.relative_to(ROOT)))
def test_jobs_imports_nothing_from_bus(path):
    assert "bus" not in imported_packages(path), f"{path.relative_to(ROOT)} imports bus: jobs must not depend on it"


@pytest.mark.parametrize(
    "path",
    [path for path in modules_under("jobsite") if path.name not in WIRING],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_the_project_package_imports_no_app(path):
    apps = imported_packages(path) & {"bus", "jobs"}
    assert not apps, f"{path.relative_to(ROOT)} imports {sorted(apps)}: settings and helpers import no app"


@pytest.mark.parametrize("path", modules_under("jobsite_crawler"), ids=lambda path: str(path.relative_to(ROOT)))
def test_the_crawler_package_imports_neither_django_nor_the_project(path):
    """A crawler machine installs jobsite_crawler alone (pyproject.toml): no Django, no database, no app."""
    found = imported_packages(path) & {"django", "bus", "jobs", "jobsite", "psycopg2", "environ"}
    # The Scrapy add-on imports Scrapy, which only a Scrapy crawler machine installs (jobsite-crawler[scrapy]).
    assert not found, f"{path.relative_to(ROOT)} imports {sorted(found)}: jobsite_crawler must stay Django-free"


# A frame as a dict literal, as ruff formats one; raw wire bytes (b'{"type":...}') and frames that no
# builder may make on purpose (a hostile or unknown one, commented "# no builder") are not frames we send.
FRAME_LITERAL = re.compile(r"""\{\s*["']type["']: """)


@pytest.mark.parametrize(
    "path",
    [path for folder in ("bus", "jobs", "jobsite_crawler") for path in modules_under(folder) if path.name != "wire.py"],
    ids=lambda path: str(path.relative_to(ROOT)),
)
def test_frames_are_built_only_by_the_wire_module(path):
    """Every frame the bus or the crawler sends comes from a jobsite_crawler/wire.py builder: one spelling per field."""
    found = [
        number
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if FRAME_LITERAL.search(line) and "# no builder" not in line
    ]
    assert not found, f"{path.relative_to(ROOT)} builds frames as dict literals on lines {found}: use a wire builder"


def test_loading_the_settings_imports_no_app_module():
    probe = (
        "import sys, jobsite.settings\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('bus', 'jobs')))\n"
    )
    env = {"PATH": "/usr/bin:/bin", "DEBUG": "true", "SECRET_KEY": "x", "BUS_ENDPOINTS": "unix:/tmp/x.sock"}
    proc = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --- One set of number parsers for every command ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [("x", "'x' is not a whole number"), ("1.5", "'1.5' is not a whole number"), ("-1", "'-1' must be >= 0")],
)
def test_whole_number_names_the_refused_text(text, message):
    with pytest.raises(argparse.ArgumentTypeError, match=f"^{message}$"):
        whole_number(minimum=0)(text)


def test_whole_number_keeps_the_bounds_and_custom_messages():
    job_id = whole_number(minimum=1, maximum=9, invalid="is not a job id", out_of_range="is out of range")

    assert job_id("9") == 9
    with pytest.raises(argparse.ArgumentTypeError, match="^'10' is out of range$"):
        job_id("10")
    with pytest.raises(argparse.ArgumentTypeError, match="^'a' is not a job id$"):
        job_id("a")


@pytest.mark.parametrize("text", ["nan", "inf", "-inf", "-1", "0"])
def test_positive_seconds_refuse_what_is_not_a_finite_positive_number(text):
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive number of seconds"):
        seconds(allow_zero=False)(text)


def test_seconds_may_allow_zero_and_name_a_word_that_is_no_number():
    assert seconds(allow_zero=True)("0") == 0.0
    with pytest.raises(argparse.ArgumentTypeError, match="^'soon' is not a number of seconds$"):
        seconds(allow_zero=True)("soon")


def test_runcrawler_refuses_a_negative_resume_grace():
    with pytest.raises(CommandError, match="--resume-grace: '-1' must be a number of seconds, 0 or more"):
        call_command("runcrawler", "--listen", "/tmp/unused.sock", "--slots", "1", "--resume-grace", "-1")


def test_runcrawler_refuses_a_negative_slot_count():
    with pytest.raises(CommandError, match="--slots: '-1' must be >= 0"):
        call_command("runcrawler", "--listen", "/tmp/unused.sock", "--slots", "-1")


# --- No absolute machine paths ------------------------------------------------------------------

MACHINE_PATHS = ("/" + "work/", "/" + "root/", "/" + "home/")  # split so that this file does not match itself


def test_docs_and_code_name_no_absolute_machine_paths():
    paths = [ROOT / ".ci" / "run", *(ROOT / "bin").iterdir()]
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [name for name in subfolders if not name.startswith(".") and name != "node_modules"]
        paths += [Path(folder) / name for name in files if name.endswith((".md", ".py", ".html", ".toml", ".txt"))]
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in paths
        if path.is_file()
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1)
        if any(machine_path in line for machine_path in MACHINE_PATHS)
    ]
    assert not found, "\n".join(found)
