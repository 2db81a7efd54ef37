"""Create .venv and install pinned requirements when they changed (used by bin/run and bin/test)."""

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


def ensure_venv(requirements: str) -> Path:
    """Return the venv's python, creating the venv and installing `requirements` if needed."""
    if sys.version_info < (3, 11):
        sys.exit(f"jobsite needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    req = ROOT / requirements
    wanted = hashlib.sha256(req.read_bytes() + (ROOT / "requirements.txt").read_bytes()).hexdigest()
    stamp = VENV / f".installed-{req.stem}"
    if PYTHON.exists() and stamp.exists() and stamp.read_text() == wanted:
        return PYTHON
    if not PYTHON.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    print(f"installing {requirements}", flush=True)
    subprocess.run(
        [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-r", str(req)],
        check=True, env={**os.environ, "PIP_NO_INPUT": "1"},
    )
    stamp.write_text(wanted)
    return PYTHON
