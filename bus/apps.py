"""The bus app: starts the bus in a background thread of server processes.

`server_process_kind` is the single place that decides whether this process
serves pages (and so runs the bus); it reads argv and the environment only,
no database, so importing and setting up Django stays cheap.
"""

from __future__ import annotations

import os
import sys
import traceback

from django.apps import AppConfig

# Commands that serve pages. Every other manage.py command (migrate, shell,
# test, reset_jobs, enqueue, runbus itself, ...) never starts the bus thread.
SERVER_COMMANDS = {"runserver"}
SERVER_PROGRAMS = {"gunicorn", "uvicorn", "daphne", "hypercorn", "granian"}


def server_process_kind(argv: list[str], environ: os._Environ | dict) -> str | None:
    """Return "runserver", the server program's name, or None when this is no server process."""
    program = os.path.basename(argv[0]) if argv else ""
    if program in ("manage.py", "django-admin") or program.endswith("manage.py"):
        command = argv[1] if len(argv) > 1 else ""
        if command not in SERVER_COMMANDS:
            return None
        # With the autoreloader, the parent only watches files; the child it
        # spawns (RUN_MAIN=true) serves requests.
        if "--noreload" in argv or environ.get("RUN_MAIN") == "true":
            return command
        return None
    for name in SERVER_PROGRAMS:
        if (
            program == name
            or program.startswith(name + "-")
            or (program in ("python", "python3", "__main__.py") and len(argv) > 1 and argv[1] == name)
        ):
            return name
    if program == "__main__.py" and any(name in sys.modules for name in SERVER_PROGRAMS):
        return next(name for name in SERVER_PROGRAMS if name in sys.modules)
    return None


def _in_gunicorn_master() -> bool:
    """True while gunicorn --preload loads the app in the arbiter, before forking workers."""
    files = [frame.filename for frame in traceback.extract_stack()]
    # A worker forked by the arbiter still has the arbiter's frames below its own.
    return any("gunicorn/arbiter.py" in name for name in files) and not any(
        "gunicorn/workers/" in name for name in files
    )


class BusConfig(AppConfig):
    name = "bus"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from django.conf import settings

        from . import checks  # noqa: F401  (registers the system checks)

        if not settings.BUS_AUTOSTART:
            return
        kind = server_process_kind(sys.argv, os.environ)
        if kind is None or "pytest" in sys.modules:  # a test run serves no crawler
            return
        from .runtime import start_background_bus

        if kind == "gunicorn" and _in_gunicorn_master():
            # A thread started here would not survive the fork: start it in
            # each worker instead.
            os.register_at_fork(after_in_child=start_background_bus)
            return
        if kind == "runserver":
            _exit_cleanly_on_sigterm()  # before the bus starts: it may hold jobs at once
        start_background_bus()


def _exit_cleanly_on_sigterm() -> None:
    """runserver dies on SIGTERM without running atexit; make it say bye, requeue, and exit 0.

    The handler raises nothing into the main thread: an exception injected at
    whatever bytecode the signal lands on can be swallowed (one landing in the
    URL system check let runserver serve on, its bus holding jobs). It starts
    a thread that shuts the bus down (bounded: at most 3 s) and then ends the
    process. Only in the main thread, and only where nobody installed a
    handler of their own (gunicorn and uvicorn handle SIGTERM themselves, and
    exit normally, so their atexit hooks run).
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return
    stopping = threading.Event()

    def stop_then_exit() -> None:
        from .runtime import background_bus

        bus = background_bus()
        if bus is not None:
            bus.shutdown(3.0)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(0)  # what is left (the dev server's request threads) has nothing to save

    def on_sigterm(signum, frame) -> None:
        if not stopping.is_set():  # a second SIGTERM while stopping changes nothing
            stopping.set()
            threading.Thread(target=stop_then_exit, name="bus-sigterm", daemon=True).start()

    signal.signal(signal.SIGTERM, on_sigterm)
