"""The batch runner on a FakeEngine with an injectable clock, on SQLite (and PostgreSQL when
TOKABATCH_TEST_DATABASE_URL is set, through the `db` fixture): happy path, per-line 4xx, all-fail,
validation failures, completions with several prompts, and the Parquet file."""

from __future__ import annotations

import asyncio
import dataclasses

import pyarrow.parquet as pq
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, fake_engine, make_runner, new_batch, run_to_terminal, wait_for,
)
from tokabatch.service.storage import repo

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


@pytest.fixture
async def engine():
    e = await fake_engine()
    yield e
    await e.close()


async def test_happy_path(db, blobs, clock, tok, engine, tmp_path):
    lines = [chat_line(i) for i in range(7)]
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "completed" and row.error_file_id is None and row.errors is None
    assert row.in_progress_at and row.finalizing_at and row.completed_at and row.failed_at is None
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = ChatCompletion.model_validate(line["response"]["body"])
        assert body.model == "fake" and body.choices[0].finish_reason in ("stop", "length")
        assert body.choices[0].message.content.startswith("<")      # FakeLoop's text
    usages = [x["response"]["body"]["usage"] for x in out]
    assert row.input_tokens == sum(u["prompt_tokens"] for u in usages)
    assert row.output_tokens == sum(u["completion_tokens"] for u in usages)
    assert row.total_tokens == row.input_tokens + row.output_tokens and row.model == "fake"
    assert sum(engine.executions.values()) == 7
    # The Parquet file: one typed row per line, registered as a batch_output file of the owner.
    pq_file = await repo.get_file(db, row.output_parquet_file_id, owner="owner-a")
    assert pq_file.purpose == "batch_output" and pq_file.filename == f"{batch_id}_output.parquet"
    table = pq.read_table(blobs.path(row.output_parquet_file_id))
    assert sorted(table.column("custom_id").to_pylist()) == sorted(x["custom_id"] for x in lines)
    assert set(table.column("status_code").to_pylist()) == {200}
    assert all(p.startswith("<|im_start|>user\nHello number") for p in table.column("prompt").to_pylist())
    out_file = await repo.get_file(db, row.output_file_id, owner="owner-a")
    assert out_file.purpose == "batch_output" and out_file.bytes == blobs.path(row.output_file_id).stat().st_size
    assert not (tmp_path / "work" / batch_id).exists()


async def test_mixed_good_and_bad_params(db, blobs, clock, tok, engine, tmp_path):
    lines = [chat_line(0), chat_line(1, temperature=7)]
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "completed"
    out, (bad,) = assert_exactly_once(blobs, row, ["line-0", "line-1"])
    assert bad["custom_id"] == "line-1" and bad["error"] is None
    assert bad["response"]["status_code"] == 400
    assert bad["response"]["body"]["error"]["param"] == "temperature" and bad["response"]["body"]["error"]["message"]
    assert sum(engine.executions.values()) == 1          # the rejected body never reached the engine


async def test_all_lines_fail(db, blobs, clock, tok, engine, tmp_path):
    lines = [chat_line(0, n=0), chat_line(1, bogus=True), chat_line(2, max_tokens=100_000)]
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "completed" and row.output_file_id is None and row.error_file_id is not None
    _, err = assert_exactly_once(blobs, row, ["line-0", "line-1", "line-2"])
    assert {x["response"]["body"]["error"]["code"] for x in err} == {
        "invalid_value", "unknown_parameter", "context_length_exceeded"}
    assert row.output_parquet_file_id is not None


async def test_validation_errors_fail_the_batch(db, blobs, clock, tok, engine, tmp_path):
    lines = [chat_line(0), b'{"custom_id": "x", "method"', chat_line(2, stream=True), chat_line(0)]
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "failed" and row.failed_at and row.in_progress_at is None
    assert [(e["code"], e["param"], e["line"]) for e in row.errors] == [
        ("invalid_json_line", None, 2), ("streaming_unsupported", "body.stream", 3),
        ("duplicate_custom_id", "custom_id", 4)]
    assert sum(engine.executions.values()) == 0 and row.output_file_id is None and row.worker_id is None


async def test_missing_input_file(db, blobs, clock, tok, engine, tmp_path):
    batch = await repo.create_batch(db, owner="owner-a", input_file_id="file-doesnotexist",
                                    endpoint="/v1/chat/completions",
                                    completion_window="24h", now_s=int(clock()), window_s=86_400)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch.id)
    assert row.status == "failed"
    assert [(e["code"], e["param"], e["line"]) for e in row.errors] == [("invalid_request", "file_id", None)]


async def test_completions_with_several_prompts(db, blobs, clock, tok, engine, tmp_path):
    line = {"custom_id": "c", "method": "POST", "url": "/v1/completions",
            "body": {"model": "fake", "prompt": ["Hello", "world"], "n": 2, "max_tokens": 3, "logprobs": 2}}
    plain = {"custom_id": "d", "method": "POST", "url": "/v1/completions", "body": {"model": "fake", "prompt": [5, 6]}}
    batch_id = await new_batch(db, blobs, [line, plain], clock, endpoint="/v1/completions")
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    out, _ = assert_exactly_once(blobs, row, ["c", "d"])
    bodies = {x["custom_id"]: Completion.model_validate(x["response"]["body"]) for x in out}
    assert [c.index for c in bodies["c"].choices] == [0, 1, 2, 3]
    assert all(len(c.logprobs.tokens) == 3 for c in bodies["c"].choices)
    assert len(bodies["d"].choices[0].text) > 0 and bodies["d"].usage.completion_tokens == 16
    assert sum(engine.executions.values()) == 3


async def test_progress_is_written_while_running(db, blobs, clock, tok, tmp_path):
    engine = await fake_engine(token_interval_s=0.02, max_running=2, max_waiting=0)
    try:
        batch_id = await new_batch(db, blobs, [chat_line(i, max_tokens=5) for i in range(12)], clock)
        runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
        task = asyncio.create_task(runner.run_forever())
        try:
            mid = await wait_for(db, batch_id, lambda r: r.status == "in_progress" and 0 < r.request_completed < 12)
            assert mid.request_total == 12 and mid.input_tokens > 0
            end = await wait_for(db, batch_id, lambda r: r.status == "completed")
            assert end.request_completed == 12
        finally:
            await runner.stop()
            await task
    finally:
        await engine.close()


def test_runner_modules_do_not_import_torch():
    import subprocess
    import sys

    code = ("import sys; import tokabatch.service.jobs.runner, tokabatch.service.jobs.render, "
            "tokabatch.service.jobs.render_stream, tokabatch.service.jobs.outputs, tokabatch.service.jobs.seal; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


async def test_stop_without_run_returns(db, blobs, clock, tok, engine, tmp_path):
    runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
    await asyncio.wait_for(runner.stop(), 5)
    assert not await runner.run_once()          # no batch: nothing claimed


async def test_wake_claims_a_new_batch_before_the_next_poll(db, blobs, clock, tok, engine, tmp_path):
    runner = make_runner(db, blobs, engine, tok, clock, tmp_path,
                         config=dataclasses.replace(FAST, poll_interval_s=60.0))
    task = asyncio.create_task(runner.run_forever())
    try:
        await asyncio.sleep(0.3)                 # idle: waiting out a 60 s poll
        batch_id = await new_batch(db, blobs, [chat_line(0)], clock)
        runner.wake()                            # what POST /v1/batches does (app key BATCH_CREATED)
        row = await wait_for(db, batch_id, lambda r: r.status == "completed", timeout_s=10)
    finally:
        await runner.stop()
        await task
    assert row.request_completed == 1


async def test_parquet_rows_answer_per_choice_questions(db, blobs, clock, tok, engine, tmp_path):
    # Each row carries its input line, the model, and per-choice token counts (and logprobs when
    # asked), so grouping by finish reason counts each choice once, not a row of n=2 twice.
    lines = [chat_line(0, n=2, max_tokens=3), chat_line(1, max_tokens=4, logprobs=True),
             chat_line(2, temperature=7)]                                    # a 400 line: no choices
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    rows = {r["custom_id"]: r for r in pq.read_table(blobs.path(row.output_parquet_file_id)).to_pylist()}
    assert {cid: r["line"] for cid, r in rows.items()} == {"line-0": 1, "line-1": 2, "line-2": 3}
    assert rows["line-0"]["model"] == rows["line-1"]["model"] == "fake" and rows["line-2"]["model"] is None
    assert rows["line-0"]["choice_completion_tokens"] == [3, 3] and rows["line-0"]["completion_tokens"] == 6
    assert rows["line-1"]["choice_completion_tokens"] == [4] and rows["line-2"]["choice_completion_tokens"] is None
    assert rows["line-0"]["choice_logprobs"] is None
    assert [len(x) for x in rows["line-1"]["choice_logprobs"]] == [4]
    by_reason: dict[str, int] = {}
    for r in rows.values():
        for reason, tokens in zip(r["finish_reasons"], r["choice_completion_tokens"] or ()):
            by_reason[reason] = by_reason.get(reason, 0) + tokens
    assert sum(by_reason.values()) == row.output_tokens == 10
