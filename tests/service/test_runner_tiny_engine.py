"""The batch runner on the REAL engine (EngineClient in-process over a tiny random Llama, float32 on
CPU): every runner behaviour the FakeEngine tests cover is run here at least once with real
tokenization, scheduling, sampling and back-pressure: chat and completions batches (string,
list-of-strings and token-id prompts, n=2, logprobs) with strict-valid bodies and usage sums, per-line
4xx lines, cancel and expiry mid-run, and a stop + resume with no written line run again.
On SQLite, and on PostgreSQL too when TOKABATCH_TEST_DATABASE_URL is set (the `db` fixture)."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.engine.runtime.conftest import build_hf_model
from tests.service.jobsutil import build_tokenizer_folder
from tests.service.runnerutil import (
    assert_exactly_once, chat_line, make_runner, new_batch, run_to_terminal, wait_for,
)
from tokabatch.config import EngineConfig, ModelConfig, SchedulerConfig
from tokabatch.engine.client import EngineClient
from tokabatch.service.storage import repo
from tokabatch.text import Tokenizer

pytestmark = pytest.mark.timeout(120)
COMPLETIONS = "/v1/completions"
CONTEXT = 512                 # the tiny model's max_position_embeddings (TINY in the runtime conftest)
NUM_SLOW = 12
SLOW_TOKENS = 128            # forced (ignore_eos) tokens of each line of the interrupted batches


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    """A tiny random Llama (2 layers, hidden 64) whose vocabulary is exactly the tiny ChatML
    tokenizer's, saved with that tokenizer; EOS is <|im_end|> (id 2) in both."""
    folder = build_tokenizer_folder(tmp_path_factory.mktemp("tiny-llama"))
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.eos_token_ids == (2,) or list(tokenizer.eos_token_ids) == [2]
    build_hf_model("llama", seed=5, vocab_size=tokenizer.vocab_size).save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture
def tok(model_folder) -> Tokenizer:
    return Tokenizer.from_folder(model_folder)


def engine_config(folder: Path) -> EngineConfig:
    # Two sequences at a time over a small KV budget: a 12-line batch of 128 forced tokens each takes a
    # second or two, long enough to interrupt after a few lines are written.
    return EngineConfig(model=ModelConfig(path=str(folder), dtype="float32", device="cpu", served_model_name="fake"),
                        scheduler=SchedulerConfig(page_size=16, max_seqs=2, max_tokens_per_step=256),
                        kv_cache_tokens=2048, enable_cuda_graphs=False, enable_hydragen=False)


async def start_engine(folder: Path) -> tuple[EngineClient, list[str]]:
    """A real in-process engine whose generate() records the id of every request it sends on."""
    engine = await EngineClient.from_config(engine_config(folder), in_process=True)
    return engine, record_executions(engine)


def record_executions(engine: EngineClient) -> list[str]:
    executed: list[str] = []
    original = engine.generate

    def generate(requests):
        async def recorded():
            async for request in requests:
                executed.append(request.request_id)
                yield request
        return original(recorded())

    engine.generate = generate
    return executed


def line_numbers(request_ids: list[str]) -> list[int]:
    """Input line numbers of engine requests (the runner's ids are req_<line>x<nonce>[...])."""
    numbers = []
    for request_id in request_ids:
        match = re.match(r"req_(\d+)x", request_id)
        assert match, request_id
        numbers.append(int(match.group(1)))
    return numbers


@pytest.fixture
async def engine(model_folder):
    e, executed = await start_engine(model_folder)
    e.executed = executed
    yield e
    await e.close()


def slow_lines() -> list[dict]:
    return [chat_line(i, max_tokens=SLOW_TOKENS, ignore_eos=True) for i in range(NUM_SLOW)]


def assert_usage_sums(row, bodies) -> None:
    assert row.input_tokens == sum(b.usage.prompt_tokens for b in bodies)
    assert row.output_tokens == sum(b.usage.completion_tokens for b in bodies)
    assert row.total_tokens == row.input_tokens + row.output_tokens


# ---- (1) happy paths --------------------------------------------------------------------------------

async def test_chat_batch_completes(db, blobs, clock, tok, engine, tmp_path):
    lines = [chat_line(0), chat_line(1, n=2, temperature=0.8, seed=7, max_tokens=5, ignore_eos=True, logprobs=True),
             chat_line(2, logprobs=True, top_logprobs=2, temperature=0, max_tokens=6),
             chat_line(3, max_tokens=8, ignore_eos=True)]
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "completed" and row.error_file_id is None and row.model == "fake"
    out, _ = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert all(x["response"]["status_code"] == 200 and x["error"] is None for x in out)
    bodies = {x["custom_id"]: ChatCompletion.model_validate(x["response"]["body"], strict=True) for x in out}
    for body in bodies.values():
        assert body.model == "fake" and body.object == "chat.completion"
        assert all(c.finish_reason in ("stop", "length") for c in body.choices)
        assert 0 < body.usage.completion_tokens and body.usage.prompt_tokens > 5
    two = bodies["line-1"]
    assert [c.index for c in two.choices] == [0, 1]
    assert [len(c.logprobs.content) for c in two.choices] == [5, 5] and two.usage.completion_tokens == 10
    logprobs = bodies["line-2"].choices[0].logprobs.content
    assert len(logprobs) == bodies["line-2"].usage.completion_tokens <= 6
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in logprobs)
    assert bodies["line-3"].usage.completion_tokens == 8 and bodies["line-3"].choices[0].finish_reason == "length"
    assert_usage_sums(row, bodies.values())
    assert sorted(line_numbers(engine.executed)) == [1, 2, 3, 4]      # one engine request per line


async def test_completions_batch_completes(db, blobs, clock, tok, engine, tmp_path):
    def line(cid, **body):
        return {"custom_id": cid, "method": "POST", "url": COMPLETIONS,
                "body": {"model": "fake", "max_tokens": 5, "ignore_eos": True, **body}}

    lines = [line("str", prompt="Hello, world!"),
             line("strs", prompt=["Hello", "What is the capital"], n=2, logprobs=2, temperature=0.7, seed=1),
             line("ids", prompt=[5, 6, 7, 8], logprobs=1, temperature=0),
             line("idss", prompt=[[5, 6], [9, 10, 11]], echo=True, max_tokens=3)]
    batch_id = await new_batch(db, blobs, lines, clock, endpoint=COMPLETIONS)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "completed" and row.error_file_id is None
    out, _ = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    bodies = {x["custom_id"]: Completion.model_validate(x["response"]["body"], strict=True) for x in out}
    assert all(b.object == "text_completion" and b.model == "fake" for b in bodies.values())
    assert [c.index for c in bodies["strs"].choices] == [0, 1, 2, 3]        # prompt-major, n per prompt
    assert bodies["strs"].usage.completion_tokens == 4 * 5
    # top_logprobs maps text -> logprob: two alternatives that both decode to "\ufffd" (a partial
    # UTF-8 byte of the byte-level vocabulary) share one key, as in OpenAI's legacy format.
    assert all(len(c.logprobs.tokens) == 5 and all(1 <= len(t) <= 2 for t in c.logprobs.top_logprobs)
               for c in bodies["strs"].choices)
    assert bodies["ids"].usage.prompt_tokens == 4 and len(bodies["ids"].choices[0].logprobs.tokens) == 5
    assert bodies["idss"].usage.prompt_tokens == 5 and len(bodies["idss"].choices) == 2
    assert bodies["idss"].choices[0].text.startswith(tok.decode([5, 6]))       # echo
    assert bodies["str"].usage.prompt_tokens == len(tok.encode("Hello, world!"))
    assert_usage_sums(row, bodies.values())
    assert len(engine.executed) == 1 + 2 + 1 + 2            # one engine request per prompt


# ---- (2) per-line 4xx -------------------------------------------------------------------------------

async def test_mixed_good_and_bad_lines(db, blobs, clock, tok, engine, tmp_path):
    too_long = "Paris is the capital of France. " * 120
    lines = [chat_line(0), chat_line(1, temperature=7), chat_line(2),
             {**chat_line(3), "body": {**chat_line(3)["body"], "messages": [{"role": "user", "content": too_long}]}},
             chat_line(4, max_tokens=CONTEXT + 1)]
    assert len(tok.encode(too_long)) > CONTEXT
    batch_id = await new_batch(db, blobs, lines, clock)
    row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
    assert row.status == "completed"
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert sorted(x["custom_id"] for x in out) == ["line-0", "line-2"]
    assert (row.request_completed, row.request_failed, row.request_total) == (2, 3, 5)
    codes = {x["custom_id"]: (x["response"]["status_code"], x["response"]["body"]["error"]["code"],
                              x["response"]["body"]["error"]["param"]) for x in err}
    assert codes["line-1"] == (400, "invalid_value", "temperature")
    assert codes["line-3"][:2] == (400, "context_length_exceeded")
    assert codes["line-4"][:2] == (400, "context_length_exceeded")
    assert all(x["error"] is None and x["response"]["body"]["error"]["message"] for x in err)
    assert sorted(line_numbers(engine.executed)) == [1, 3]             # rejected bodies never ran
    bodies = [ChatCompletion.model_validate(x["response"]["body"], strict=True) for x in out]
    assert_usage_sums(row, bodies)


# ---- (3) cancel and (4) expiry mid-run --------------------------------------------------------------

async def interrupt_mid_run(db, blobs, clock, tok, engine, tmp_path, interrupt, end_status: str, *, window_s=86_400):
    lines = slow_lines()
    batch_id = await new_batch(db, blobs, lines, clock, window_s=window_s)
    runner = make_runner(db, blobs, engine, tok, clock, tmp_path)
    task = asyncio.create_task(runner.run_forever())
    try:
        await wait_for(db, batch_id, lambda r: r.request_completed >= 2)
        await interrupt(batch_id)
        row = await wait_for(db, batch_id, lambda r: r.status == end_status)
    finally:
        await runner.stop()
        await task
    out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    assert 2 <= len(out) < NUM_SLOW and len(out) + len(err) == NUM_SLOW
    for line in out:
        body = ChatCompletion.model_validate(line["response"]["body"], strict=True)
        assert body.usage.completion_tokens == SLOW_TOKENS and body.choices[0].finish_reason == "length"
    assert len(engine.executed) < NUM_SLOW            # the interrupt stopped the feed: not every line ran
    return row, err


async def test_cancel_mid_run(db, blobs, clock, tok, engine, tmp_path):
    async def cancel(batch_id):
        cancelling = await repo.cancel_batch(db, batch_id, owner="owner-a", now_s=int(clock()))
        assert cancelling.status == "cancelling"

    row, err = await interrupt_mid_run(db, blobs, clock, tok, engine, tmp_path, cancel, "cancelled")
    assert row.cancelled_at and row.completed_at is None and row.expired_at is None
    assert err and all(x["response"] is None and x["error"]["code"] == "batch_cancelled" for x in err)


async def test_expiry_mid_run(db, blobs, clock, tok, engine, tmp_path):
    async def expire(_batch_id):
        clock.advance(61)

    row, err = await interrupt_mid_run(db, blobs, clock, tok, engine, tmp_path, expire, "expired", window_s=60)
    assert row.expired_at == int(clock()) and row.completed_at is None and row.cancelled_at is None
    assert err and all(x["response"] is None and x["error"]["code"] == "batch_expired" for x in err)


# ---- (5) stop + resume ------------------------------------------------------------------------------

async def test_stop_and_resume_runs_no_written_line_again(db, blobs, clock, tok, model_folder, tmp_path):
    lines = slow_lines()
    batch_id = await new_batch(db, blobs, lines, clock)
    engine1, executed1 = await start_engine(model_folder)
    try:
        runner1 = make_runner(db, blobs, engine1, tok, clock, tmp_path, worker_id="worker-1")
        task = asyncio.create_task(runner1.run_forever())
        await wait_for(db, batch_id, lambda r: r.request_completed >= 3)
        await runner1.stop()
        await task
    finally:
        await engine1.close()
    row = await repo.get_batch(db, batch_id, owner=None)
    assert (row.status, row.worker_id, row.num_claims) == ("in_progress", None, 1), row.request_completed
    output = tmp_path / "work" / batch_id / "output.jsonl"
    written = {json.loads(x)["custom_id"] for x in output.read_text().splitlines()}
    assert 3 <= len(written) < NUM_SLOW
    written_lines = {int(cid.split("-")[1]) + 1 for cid in written}

    engine2, executed2 = await start_engine(model_folder)      # a new runner on a new engine
    try:
        runner2 = make_runner(db, blobs, engine2, tok, clock, tmp_path, worker_id="worker-2")
        row = await run_to_terminal(runner2, db, batch_id)
    finally:
        await engine2.close()
    assert (row.status, row.num_claims) == ("completed", 2)
    out, _ = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    rerun = set(line_numbers(executed2)) & written_lines
    assert not rerun, f"lines {sorted(rerun)} were written before the stop and ran again"
    assert sorted(line_numbers(executed2)) == sorted(set(range(1, NUM_SLOW + 1)) - written_lines), (
        executed1, executed2, written_lines)
    assert len(set(line_numbers(executed1))) == len(executed1) and set(line_numbers(executed1)) >= written_lines, (
        executed1, written_lines)
    bodies = [ChatCompletion.model_validate(x["response"]["body"], strict=True) for x in out]
    assert all(b.usage.completion_tokens == SLOW_TOKENS for b in bodies)
    assert_usage_sums(row, bodies)
