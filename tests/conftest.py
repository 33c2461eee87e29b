"""Shared fixtures for the whole suite: small and generic.

`demo_model_path` is the demo model folder in the default cache (`tokabatch models fetch` puts it
there); tests that need it skip, with the reason, on a machine that has not fetched it.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_model_path() -> Path:
    """The converted demo model (SmolLM2-135M-Instruct) folder, or a skip if it was never fetched."""
    from tokabatch.model_store import demo_model_folder

    folder = demo_model_folder()
    if folder is None:
        pytest.skip("demo model not fetched: run `python -m tokabatch models fetch` first")
    return folder


def demo_model_ready() -> bool:
    """True when the demo model is in the cache (for module-level skipif marks)."""
    from tokabatch.model_store import demo_model_folder

    return demo_model_folder() is not None
