"""Create a virtualenv and install pinned requirements when they changed (used by bin/run and bin/test)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
PYTHON = VENV / "bin" / "python"


def ensure_venv(
    requirements: str, *, folder: Path = VENV, interpreter: str | None = None, extra: tuple[str, ...] = ()
) -> Path:
    """Return the venv's python, creating the venv and installing `requirements` (then `extra`) if needed.

    `interpreter` builds the venv with another Python (e.g. python3.12 for Django 6);
    `extra` are pinned packages installed over the requirements (e.g. Django==6.1.3).
    """
    if sys.version_info < (3, 11):  # noqa: UP036  (bin/ runs on whatever python3 is first)
        sys.exit(f"jobsite needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    python = folder / "bin" / "python"
    req = ROOT / requirements
    wanted = hashlib.sha256(
        b"".join(path.read_bytes() for path in _with_includes(req)) + " ".join(extra).encode()
    ).hexdigest()
    stamp = folder / f".installed-{req.stem}"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    if not python.exists():
        print(f"creating {folder}", flush=True)
        if interpreter:
            subprocess.run([interpreter, "-m", "venv", "--clear", str(folder)], check=True)
        else:
            venv.EnvBuilder(with_pip=True, clear=True).create(folder)
    print(f"installing {requirements} {' '.join(extra)}".strip(), flush=True)
    pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    env = {**os.environ, "PIP_NO_INPUT": "1"}
    subprocess.run([*pip, "-r", str(req)], check=True, env=env)
    if extra:
        subprocess.run([*pip, *extra], check=True, env=env)
    stamp.write_text(wanted)
    return python


def _with_includes(req: Path) -> list[Path]:
    """The requirements file and every file it includes with `-r` (recursively): a change to any reinstalls."""
    files: list[Path] = []
    pending = [req]
    while pending:
        path = pending.pop(0)
        if path in files or not path.exists():
            continue
        files.append(path)
        for line in path.read_text().splitlines():
            parts = line.split("#", 1)[0].split()
            if len(parts) == 2 and parts[0] in ("-r", "--requirement"):
                pending.append(path.parent / parts[1])
    return files
