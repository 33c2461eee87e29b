"""render_stream: SSE chunks that strict-validate as ChatCompletionChunk / Completion and add up to
the non-streaming body."""

from __future__ import annotations

import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletionChunk

from tests.service.jobsutil import model_info_for, tiny_tokenizer
from tokabatch.engine.api import ChoiceDelta, FinishReason, GenerationOutput, GenerationUpdate, TokenLogprob
from tokabatch.service.jobs.render import CHAT_ENDPOINT, COMPLETIONS_ENDPOINT, prepare_request
from tokabatch.service.jobs.render_stream import StreamRenderer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return tiny_tokenizer(tmp_path_factory.mktemp("tok"))


def prep(tok, endpoint, body):
    return prepare_request(endpoint, {"model": "tiny", "stream": True, **body}, tokenizer=tok,
                           model_info=model_info_for(tok), served_model_names={"tiny"}, request_id="req_s1")


def updates_for(tok, request_id, n, pieces, logprobs=False):
    ups = []
    for k, piece in enumerate(pieces):
        ids = tuple(tok.encode(piece))
        lps = tuple(TokenLogprob(t, -0.1, ((t, -0.1),)) for t in ids) if logprobs else None
        last = k == len(pieces) - 1
        ups.append(GenerationUpdate(request_id, tuple(
            ChoiceDelta(i, ids, piece, lps, FinishReason.STOP if last else None) for i in range(n))))
    return ups


def test_chat_chunks(tok):
    p = prep(tok, CHAT_ENDPOINT, {"messages": [{"role": "user", "content": "hi"}], "n": 2, "logprobs": True,
                                  "stream_options": {"include_usage": True}})
    r = StreamRenderer(p, created=5)
    chunks = r.start()
    for u in updates_for(tok, p.requests[0].request_id, 2, ["Hello", ", world"], logprobs=True):
        chunks += r.update(u)
    out = GenerationOutput(p.requests[0].request_id, (), 7, 2, 6)
    chunks += r.finish([out])
    parsed = [ChatCompletionChunk.model_validate(c) for c in chunks]
    assert all(c.object == "chat.completion.chunk" and c.id == "chatcmpl-s1" for c in parsed)
    assert [c.choices[0].delta.role for c in parsed[:2]] == ["assistant", "assistant"]
    text0 = "".join(c.choices[0].delta.content or "" for c in parsed if c.choices and c.choices[0].index == 0)
    assert text0 == "Hello, world"
    finals = [c.choices[0].finish_reason for c in parsed if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop", "stop"]
    assert parsed[-1].choices == [] and parsed[-1].usage.total_tokens == 13
    assert all(c.usage is None for c in parsed[:-1])
    assert parsed[2].choices[0].logprobs.content[0].token == tok.token_text(tok.encode("Hello")[0])


def test_completion_chunks_with_echo_and_two_prompts(tok):
    p = prep(tok, COMPLETIONS_ENDPOINT, {"prompt": ["The quick", "brown fox"], "echo": True, "logprobs": 1})
    r = StreamRenderer(p, created=5)
    chunks = r.start()
    for req in p.requests:
        for u in updates_for(tok, req.request_id, 1, [" jumps", " over"], logprobs=True):
            chunks += r.update(u)
    assert r.finish([]) == []
    # OpenAI sends finish_reason null until a choice ends, though the SDK's Completion type (reused for
    # stream chunks) does not allow it: validate everything else strictly.
    assert all(c["choices"][0]["finish_reason"] in (None, "stop") for c in chunks)
    parsed = [Completion.model_validate({**c, "choices": [{**c["choices"][0], "finish_reason": "stop"}]})
              for c in chunks]
    by_index: dict[int, str] = {}
    for c in parsed:
        by_index[c.choices[0].index] = by_index.get(c.choices[0].index, "") + c.choices[0].text
    assert by_index == {0: "The quick jumps over", 1: "brown fox jumps over"}
    first_token_chunk = [c for c in parsed if c.choices[0].logprobs][0]
    assert first_token_chunk.choices[0].logprobs.text_offset[0] == len("The quick")
