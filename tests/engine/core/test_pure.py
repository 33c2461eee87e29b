"""engine/core is pure: importing it (scheduler included) loads no torch, in a fresh interpreter."""

from __future__ import annotations

import subprocess
import sys


def test_core_imports_no_torch() -> None:
    code = ("import sys, tokabatch.engine.core.scheduler, tokabatch.engine.core.admission; "
            "bad = [m for m in ('torch', 'numpy', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
