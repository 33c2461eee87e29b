"""The runner on the REAL engine (demo model, float32 on CPU, in its own process): a chat batch with
a shared long prefix completes with real text, strict-valid bodies, a per-line 4xx, usage sums that
match the lines, and prefix-cache hits reported as cached_tokens (contract item 21)."""

from __future__ import annotations

import pytest
from openai.types.chat import ChatCompletion

from tests.service.runnerutil import assert_exactly_once, make_runner, new_batch, run_to_terminal
from tokabatch.config import EngineConfig, ModelConfig
from tokabatch.engine.client import EngineClient
from tokabatch.text import Tokenizer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
SYSTEM = ("You are a careful assistant. Answer briefly and precisely. " * 12).strip()


@pytest.fixture
def db_url(tmp_path):      # SQLite only: the storage backends are covered by the fake-engine tests
    return f"sqlite+aiosqlite:///{tmp_path / 'tokabatch.db'}"


async def test_chat_batch_on_the_demo_model(demo_model_path, db, blobs, clock, tmp_path):
    config = EngineConfig(model=ModelConfig(path="demo", dtype="float32", device="cpu"), kv_cache_tokens=8192,
                          enable_cuda_graphs=False)
    engine = await EngineClient.from_config(config)
    try:
        model = engine.info.model_id
        questions = ["What is the capital of France?", "Name a primary color.", "What is 2 + 2?"]
        lines = [{"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions",
                  "body": {"model": model, "temperature": 0, "max_tokens": 12,
                           "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]}}
                 for i, q in enumerate(questions)]
        lines.append({**lines[0], "custom_id": "bad", "body": {**lines[0]["body"], "top_logprobs": 3}})
        batch_id = await new_batch(db, blobs, lines, clock)
        tokenizer = Tokenizer.from_folder(demo_model_path)
        runner = make_runner(db, blobs, engine, tokenizer, clock, tmp_path)
        runner.served_model_names = {model}
        row = await run_to_terminal(runner, db, batch_id, timeout_s=500)
        assert row.status == "completed"
        out, err = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
        assert [x["custom_id"] for x in err] == ["bad"] and err[0]["response"]["status_code"] == 400
        bodies = [ChatCompletion.model_validate(x["response"]["body"]) for x in out]
        assert all(b.choices[0].message.content.strip() for b in bodies)
        assert sum(b.usage.prompt_tokens for b in bodies) == row.input_tokens
        assert sum(b.usage.completion_tokens for b in bodies) == row.output_tokens
        assert row.cached_tokens == sum(b.usage.prompt_tokens_details.cached_tokens for b in bodies) > 0
    finally:
        await engine.close()
