"""StepLoop factories for `tokabatch run --engine-factory` in the CLI tests (importable by name)."""

from __future__ import annotations

from tokabatch.engine.testing import FakeLoop


def healthy(engine_config: object = None) -> FakeLoop:
    return FakeLoop(max_running=2, max_waiting=2)


def dies_at_step_6(engine_config: object = None) -> FakeLoop:
    """Two requests run at a time, each needs a few steps: some lines finish before the crash."""
    return FakeLoop(max_running=2, max_waiting=2, fail_on_step=6)


def slow(engine_config: object = None) -> FakeLoop:
    """Two lines at a time, ~0.25 s each: a job that is still running when a test interrupts it."""
    return FakeLoop(max_running=2, max_waiting=2, token_interval_s=0.06)


def refuses_to_start(engine_config: object = None) -> FakeLoop:
    raise RuntimeError("this job was finished: the engine must not start")
