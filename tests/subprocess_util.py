"""A fresh Python interpreter with the repository on its path: for checks of what a module imports."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_python(script: str, timeout_s: float = 120.0) -> str:
    """Run `script` with `python -c` from the repository root; its stdout (a failure is an assertion)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout_s,
                          env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout
