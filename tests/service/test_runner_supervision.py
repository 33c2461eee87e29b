"""A batch cannot stall the queue, and the runner outlives what fails under it: a batch that keeps
failing in an unexpected way backs off (the others go first) and ends `failed` with its error after
RunnerConfig.max_failures; what one line can cause (a lone surrogate, a line nested too deeply) is
that line's error; a database that fails under the runner leaves it running and saying why."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, fake_engine, make_runner, new_batch, read_file_lines, run_to_terminal,
    wait_for,
)
from tokabatch.service.storage.states import is_terminal
from tokabatch.service.storage import repo

pytestmark = pytest.mark.timeout(120)


class PoisonTokenizer:
    """The real tokenizer, except that a prompt saying POISON makes it raise what no line should."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def encode(self, text: str, **kwargs):
        if "POISON" in text:
            raise RuntimeError("the tokenizer broke")
        return self._tokenizer.encode(text, **kwargs)


async def test_a_poison_batch_fails_after_the_cap_and_does_not_stall_a_good_one(db, blobs, tmp_path):
    tok = PoisonTokenizer(tiny_tokenizer(tmp_path))
    clock = time.time
    poison = await new_batch(db, blobs, [chat_line(0), chat_line(1, messages=[{"role": "user", "content": "POISON"}])],
                             clock)
    good_lines = [chat_line(i) for i in range(6)]
    good = await new_batch(db, blobs, good_lines, clock)            # created after: once always behind it
    engine = await fake_engine()
    runner = make_runner(db, blobs, engine, tok, clock, tmp_path, config=dataclasses.replace(FAST, max_failures=3))
    task = asyncio.create_task(runner.run_forever())
    try:
        good_row = await wait_for(db, good, lambda r: is_terminal(r.status), timeout_s=20)
        poison_row = await wait_for(db, poison, lambda r: is_terminal(r.status), timeout_s=20)
    finally:
        await runner.stop()
        await task
        await engine.close()
    assert good_row.status == "completed" and good_row.num_failures == 0
    assert_exactly_once(blobs, good_row, [x["custom_id"] for x in good_lines])
    assert poison_row.status == "failed" and poison_row.num_failures == 3 and poison_row.num_claims == 4
    (error,) = poison_row.errors
    assert error["code"] == "batch_failed" and "the tokenizer broke" in error["message"]
    assert "3 unexpected failures" in error["message"]


async def test_what_one_line_causes_is_that_line_s_error(db, blobs, clock, tmp_path):
    tok = tiny_tokenizer(tmp_path)
    surrogate = json.loads('"a \\ud800 b"')
    lines = [chat_line(0), chat_line(1, messages=[{"role": "user", "content": surrogate}]), chat_line(2)]
    batch_id = await new_batch(db, blobs, lines, clock)
    engine = await fake_engine()
    try:
        row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    finally:
        await engine.close()
    assert row.status == "completed" and row.num_failures == 0
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    (bad,) = err
    assert bad["custom_id"] == "line-1" and bad["response"]["status_code"] == 400
    assert "lone surrogate" in bad["response"]["body"]["error"]["message"]


async def test_a_line_nested_too_deeply_fails_validation_with_its_number(db, blobs, clock, tmp_path):
    tok = tiny_tokenizer(tmp_path)
    deep = b'{"custom_id": "x", "method": "POST", "url": "/v1/chat/completions", "body": ' + b"[" * 100_000 \
        + b"]" * 100_000 + b"}"
    batch_id = await new_batch(db, blobs, [chat_line(0), deep], clock)
    engine = await fake_engine()
    try:
        row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    finally:
        await engine.close()
    assert row.status == "failed" and row.num_failures == 0
    assert [(e["line"], e["code"]) for e in row.errors] == [(2, "invalid_json_line")]


async def test_the_runner_survives_a_failing_database_and_says_why(db, blobs, clock, tmp_path, monkeypatch):
    tok = tiny_tokenizer(tmp_path)
    engine = await fake_engine()
    runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
    real_claim = repo.claim_batch
    failing = {"on": True}

    async def claim(*args, **kwargs):
        if failing["on"]:
            raise OSError(28, "No space left on device")
        return await real_claim(*args, **kwargs)

    monkeypatch.setattr(repo, "claim_batch", claim)
    task = asyncio.create_task(runner.run_forever())
    try:
        for _ in range(200):
            if runner.health() is not None:
                break
            await asyncio.sleep(0.01)
        assert "No space left on device" in runner.health() and not task.done()
        failing["on"] = False
        batch_id = await new_batch(db, blobs, [chat_line(0)], clock)
        row = await wait_for(db, batch_id, lambda r: is_terminal(r.status))
        assert row.status == "completed" and runner.health() is None
    finally:
        await runner.stop()
        await task
        await engine.close()
    assert read_file_lines(blobs, row.output_file_id)[0]["custom_id"] == "line-0"
