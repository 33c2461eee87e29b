"""The feeding core (jobs/feed.py) through the batch runner on a FakeEngine: alike lines run as one
engine request and are split back into each line's own answer and usage; lines that must run alone
(a seed, several prompts) do; merges stop at MAX_MERGED_N; the first request leaves the feed
before a whole read-ahead window is prepared."""

from __future__ import annotations

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    assert_exactly_once, chat_line, fake_engine, make_runner, new_batch, run_to_terminal,
)
from tokabatch.engine.testing import fake_text, fake_token_ids
from tokabatch.service.jobs.feed import MAX_MERGED_N

pytestmark = pytest.mark.timeout(120)

SHARED = [{"role": "user", "content": "What is the capital of France? Answer briefly, please."}]


@pytest.fixture
def tok(tmp_path):
    return tiny_tokenizer(tmp_path)


def shared_line(i: int, **body_changes) -> dict:
    return chat_line(i, messages=SHARED, temperature=1.0, **body_changes)


async def run_lines(db, blobs, clock, tok, tmp_path, lines: list[dict]):
    """The batch run to its end on a FakeEngine: (its row, engine request id -> times executed)."""
    batch_id = await new_batch(db, blobs, lines, clock)
    engine = await fake_engine()
    try:
        row = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, batch_id)
        return row, dict(engine.executions)
    finally:
        await engine.close()


async def test_alike_lines_run_as_one_request_and_get_their_own_choice(db, blobs, clock, tok, tmp_path):
    # Lines 0, 2, 4, 5 ask the same of the same prompt; 1 differs in its prompt, 3 has a seed (the
    # same seed must give what it gives alone), 6 asks for 2 choices (merged: it takes two).
    lines = [shared_line(0), chat_line(1), shared_line(2), shared_line(3, seed=7), shared_line(4),
             shared_line(5), shared_line(6, n=2)]
    row, executions = await run_lines(db, blobs, clock, tok, tmp_path, lines)
    assert row.status == "completed"
    out, _ = assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    merged = [rid for rid in executions if rid.endswith("-x5")]
    assert len(merged) == 1 and len(executions) == 3 and set(executions.values()) == {1}
    by_id = {x["custom_id"]: x["response"]["body"] for x in out}
    prompt_ids = tok.encode(tok.render_chat(SHARED), add_special_tokens=False)
    texts = []
    for i in (0, 2, 4, 5, 6):
        body = by_id[f"line-{i}"]
        assert [c["index"] for c in body["choices"]] == list(range(2 if i == 6 else 1))
        usage = body["usage"]
        assert usage["completion_tokens"] == sum(5 for _ in body["choices"])
        assert usage["prompt_tokens"] == by_id["line-3"]["usage"]["prompt_tokens"]
        texts += [c["message"]["content"] for c in body["choices"]]
    # The merged request's six choices in file order: line 0 took choice 0, ..., line 6 took 4 and 5.
    assert texts == [fake_text(fake_token_ids(prompt_ids, 5, index=k)) for k in range(6)]
    # Each line is billed for its prompt, as separate requests are; the cache serves all but the first.
    cached = [by_id[f"line-{i}"]["usage"].get("prompt_tokens_details", {}).get("cached_tokens", 0)
              for i in (0, 2, 4, 5, 6)]
    assert cached[0] == 0 and all(c == cached[1] for c in cached[1:])
    assert row.input_tokens == sum(b["usage"]["prompt_tokens"] for b in by_id.values())


async def test_merges_stop_at_the_largest_n(db, blobs, clock, tok, tmp_path):
    lines = [shared_line(i, max_tokens=1) for i in range(MAX_MERGED_N + 3)]
    row, executions = await run_lines(db, blobs, clock, tok, tmp_path, lines)
    assert row.status == "completed"
    assert_exactly_once(blobs, row, [x["custom_id"] for x in lines])
    sizes = sorted(int(rid.rsplit("-x", 1)[1]) if "-x" in rid else 1 for rid in executions)
    assert sum(sizes) == len(lines) and max(sizes) <= MAX_MERGED_N and len(sizes) >= 2
