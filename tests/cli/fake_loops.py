"""StepLoop factories for `tokabatch run --engine-factory` in the CLI tests (importable by name)."""

from __future__ import annotations

import os
from pathlib import Path

from tokabatch.engine.api import GenerationOutput
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


class _CountingLoop(FakeLoop):
    """A FakeLoop that appends the id of every request it finishes to a file of its own process,
    line by line (a kill -9 loses none), so a test can count what every engine computed."""

    def __init__(self, path: Path, **kwargs) -> None:
        super().__init__(**kwargs)
        self._finished = path.open("a", buffering=1)

    def step(self):
        items = super().step()
        for item in items:
            if isinstance(item, GenerationOutput) and not item.aborted:
                self._finished.write(item.request_id + "\n")
        return items


def counting(engine_config: object = None) -> FakeLoop:
    """16 lines at a time, ~0.16 s each (8 tokens), each finished request id appended to
    $TOKABATCH_TEST_COUNT_DIR/<pid>.log."""
    folder = Path(os.environ["TOKABATCH_TEST_COUNT_DIR"])
    return _CountingLoop(folder / f"{os.getpid()}.log", max_running=16, max_waiting=16, token_interval_s=0.02)
