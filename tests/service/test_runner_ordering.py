"""Batch-aware ordering: lines that share a prompt prefix reach the engine together (observed as the
order the FakeEngine receives them), within a bounded read-ahead window; file order with window 1;
each custom_id still exactly once."""

from __future__ import annotations

import dataclasses
import random

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, executed_lines, fake_engine, make_runner, new_batch, run_to_terminal,
)
from tokabatch.service.jobs.ordering import prompt_ordered
from tokabatch.service.jobs.outputs import ResultWriter

pytestmark = pytest.mark.timeout(120)

PREFIX_A = "You are a careful assistant. " + "The quick brown fox jumps over the lazy dog. " * 12
PREFIX_B = "You answer in French only. " + "What is the capital of France? Paris is. " * 12


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def interleaved_lines(num: int) -> list[dict]:
    """Line i has system prompt A (even i) or B (odd i): the two long prefixes alternate in the file."""
    return [chat_line(i, messages=[{"role": "system", "content": PREFIX_A if i % 2 == 0 else PREFIX_B},
                                   {"role": "user", "content": f"Question {i}?"}])
            for i in range(num)]


def prefix_of(line_no: int) -> str:
    return "A" if (line_no - 1) % 2 == 0 else "B"     # line_no is 1-based: line-i is line i+1


def runs(labels: list[str]) -> int:
    """How many maximal runs of equal labels: 2 when each prefix's lines are fed together."""
    return sum(1 for i, x in enumerate(labels) if i == 0 or labels[i - 1] != x)


@pytest.mark.parametrize("window, expected_runs", [(2048, 2), (6, 4), (1, 12)])
async def test_lines_sharing_a_prefix_are_fed_together(db, blobs, clock, tok, tmp_path, window, expected_runs):
    lines = interleaved_lines(12)
    batch_id = await new_batch(db, blobs, lines, clock)
    engine = await fake_engine()
    try:
        config = dataclasses.replace(FAST, order_window=window)
        row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path, config=config), db, batch_id)
        fed = executed_lines(engine)
    finally:
        await engine.close()
    assert row.status == "completed"
    assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert sorted(fed) == list(range(1, 13))
    labels = [prefix_of(n) for n in fed]
    # Whole file in one window: all A lines, then all B lines (or the reverse); windows of 6 lines
    # group within each window (3 A + 3 B per window); window 1 is file order, alternating.
    assert runs(labels) == expected_runs, labels
    if window == 1:
        assert fed == list(range(1, 13))


async def test_resume_with_ordering_runs_only_unwritten_lines(db, blobs, clock, tok, tmp_path):
    lines = interleaved_lines(10)
    batch_id = await new_batch(db, blobs, lines, clock)
    engine = await fake_engine()
    try:
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path, config=dataclasses.replace(FAST, order_window=4))
        # Lines already written by an earlier claim are skipped before the window is formed.
        writer = ResultWriter(tmp_path / "work" / batch_id)
        writer.open()
        for i in (0, 3, 4):
            writer.write_error(f"line-{i}", code="engine_error", message="written by an earlier claim")
        writer.close()
        row = await run_to_terminal(runner, db, batch_id)
        fed = executed_lines(engine)
    finally:
        await engine.close()
    assert row.status == "completed"
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert sorted(x["custom_id"] for x in err) == ["line-0", "line-3", "line-4"]
    assert sorted(fed) == [n + 1 for n in range(10) if n not in (0, 3, 4)]


async def test_prompt_ordered_sorts_each_window_stably() -> None:
    rng = random.Random(0)
    items = [(i, tuple(rng.choice([(5, 5, 5), (5, 5, 9), (7,)]) + (rng.randrange(3),))) for i in range(40)]

    async def source():
        for item in items:
            yield item

    for window in (1, 7, 40, 1000):
        out = [x async for x in prompt_ordered(source(), window, lambda item: item[1])]
        assert sorted(out) == sorted(items)                     # nothing lost or repeated
        for start in range(0, len(items), max(window, 1)):
            chunk = items[start:start + window]
            expected = chunk if window <= 1 else sorted(chunk, key=lambda item: item[1])   # stable
            assert out[start:start + len(chunk)] == expected
