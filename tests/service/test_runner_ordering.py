"""Batch-aware ordering: lines that share a prompt prefix reach the engine together (observed as the
order the FakeEngine receives them), clustered across the whole file by prompt start and sorted by
token ids within a bounded read-ahead window; file order with window 1; each custom_id still
exactly once. The file-level keys and the read-back by byte offset are checked directly too."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, executed_lines, fake_engine, make_runner, new_batch, run_to_terminal,
)
from tokabatch.service.jobs.ordering import (
    FIRST_WINDOW, KEY_CHARS, SpanCollector, clustered_spans, prompt_key, window_sizes, windowed,
)
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.jobs.parse import iter_requests, read_request, validate_input_file

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


@pytest.mark.parametrize("window, expected_runs", [(2048, 2), (6, 2), (1, 12)])
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
    # All A lines, then all B lines (or the reverse): the whole file is clustered by prompt start
    # before the windows (of 2048 or of 6 lines) sort by token ids; window 1 is file order, alternating.
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


def test_windows_grow_from_the_first_and_sort_each_window_stably() -> None:
    assert [size for size, _ in zip(window_sizes(2048), range(8))] == [64, 128, 256, 512, 1024, 2048, 2048, 2048]
    assert [size for size, _ in zip(window_sizes(100), range(3))] == [64, 100, 100]
    assert [size for size, _ in zip(window_sizes(6), range(3))] == [6, 6, 6]
    rng = random.Random(0)
    items = [(i, tuple(rng.choice([(5, 5, 5), (5, 5, 9), (7,)]) + (rng.randrange(3),))) for i in range(300)]
    for window in (1, 7, 100, 1000):
        out = list(windowed(items, window, lambda item: item[1]))
        assert sorted(out) == sorted(items)                     # nothing lost or repeated
        start, sizes = 0, window_sizes(window) if window > 1 else iter(lambda: len(items), None)
        while start < len(items):
            chunk = items[start:start + next(sizes)]
            expected = chunk if window <= 1 else sorted(chunk, key=lambda item: item[1])   # stable
            assert out[start:start + len(chunk)] == expected
            start += len(chunk)
    assert FIRST_WINDOW == 64


def test_validation_builds_the_same_order_in_its_own_pass(tmp_path) -> None:
    rng = random.Random(5)
    path = tmp_path / "in.jsonl"
    with path.open("w") as f:
        for i in range(50):
            body = {"model": "m", "messages": [{"role": "user", "content": rng.choice(["b", "a", "c"] * 3)}]}
            f.write(json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": body}) + ("\n\n" if i % 9 == 0 else "\n"))
    collector = SpanCollector()
    report = validate_input_file(path, endpoint="/v1/chat/completions", served_model_names={"m"}, max_lines=100,
                                 on_request=collector.add)
    assert report.ok and report.num_requests == 50
    assert collector.spans() == clustered_spans(path)


def test_clustered_spans_put_equal_prompt_starts_together_and_read_back(tmp_path) -> None:
    # A BOM, CRLF endings and blank lines: the offsets still read back the very lines iter_requests sees.
    rng = random.Random(3)
    starts = ["x" * (KEY_CHARS + 50) + "one", "x" * (KEY_CHARS + 50) + "two", "short a", "short b"]
    bodies = [{"model": "m", "messages": [{"role": "user", "content": rng.choice(starts)}]} for _ in range(40)]
    bodies.append({"model": "m", "prompt": [5, 6, 7]})
    raw = b"\xef\xbb\xbf"
    for i, body in enumerate(bodies):
        raw += json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
                           "body": body}).encode() + (b"\r\n" if i % 3 else b"\n")
        if i % 7 == 0:
            raw += b"\n"
    path = tmp_path / "in.jsonl"
    path.write_bytes(raw)
    spans = clustered_spans(path)
    in_file = {line_no: (cid, body) for line_no, cid, body in iter_requests(path)}
    assert sorted(n for n, _, _ in spans) == sorted(in_file)
    with path.open("rb") as f:
        read = [(n, read_request(f, offset, length)) for n, offset, length in spans]
    assert all(in_file[n] == got for n, got in read)
    keys = [prompt_key(body) for _, (_, body) in read]
    assert keys == sorted(keys)
    # Each distinct prompt is one contiguous run, and within a run the file order is kept.
    prompts = [json.dumps(body.get("messages", body.get("prompt"))) for _, (_, body) in read]
    assert runs(prompts) == len(set(prompts))
    for p in set(prompts):
        line_nos = [n for (n, _), q in zip(read, prompts) if q == p]
        assert line_nos == sorted(line_nos)
    # Prompts that differ only after KEY_CHARS characters still get different keys (the digest).
    long_one, long_two = ({"messages": [{"role": "user", "content": s}]} for s in starts[:2])
    assert prompt_key(long_one)[0] == prompt_key(long_two)[0] and prompt_key(long_one) != prompt_key(long_two)
