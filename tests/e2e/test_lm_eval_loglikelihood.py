"""lm-eval's loglikelihood path against a live server on the demo model.

EleutherAI lm-eval's `local-completions` model scores a (context, continuation) pair by POSTing
token ids to /v1/completions with echo=true, logprobs=1, max_tokens=1 (or 0), temperature 0, then
reads `token_logprobs[ctxlen:-1]` and checks greediness against `top_logprobs`. Both are checked
here against log_softmax of HF transformers' logits on the same weights (float32).
"""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.conftest import demo_model_ready
from tests.e2e.test_serve_real_engine import Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.skipif(not demo_model_ready(), reason="needs the demo model (`tokabatch models fetch`)")]


def post(port: int, body: dict) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json", "Authorization": "Bearer x"})
    return json.loads(urllib.request.urlopen(request, timeout=120).read())


def reference_logprobs(folder, ids: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_echo_logprobs_match_hf_log_softmax(tmp_path, demo_model_path):
    """max_tokens 1 and 0 (lm-eval sends either), on one server."""
    from tokabatch.text import Tokenizer

    tokenizer = Tokenizer.from_folder(demo_model_path)
    context = tokenizer.encode("The capital of France is")
    continuation = tokenizer.encode(" Paris, and the capital of Italy is Rome.")
    ids = context + continuation
    server = Server(tmp_path / "data", tmp_path / "server.log")
    try:
        bodies = {max_tokens: post(server.port, {"model": "demo", "prompt": [ids], "echo": True, "logprobs": 1,
                                                 "max_tokens": max_tokens, "temperature": 0})
                  for max_tokens in (1, 0)}
    finally:
        server.stop()
    ref = reference_logprobs(demo_model_path, ids)
    for max_tokens, body in bodies.items():
        check_scores(body, ids, len(context), max_tokens, ref, tokenizer)


def check_scores(body: dict, ids: list[int], ctxlen: int, max_tokens: int, ref, tokenizer) -> None:
    choice = body["choices"][0]
    logprobs = choice["logprobs"]
    assert logprobs["tokens"][:len(ids)] == [tokenizer.token_text(t) for t in ids]
    assert logprobs["token_logprobs"][0] is None          # the first token has no context
    assert len(logprobs["token_logprobs"]) == len(ids) + max_tokens

    for pos in range(1, len(ids)):
        expected = ref[pos - 1, ids[pos]].item()
        assert abs(logprobs["token_logprobs"][pos] - expected) < 1e-4, pos
        top_token, top_logprob = next(iter(logprobs["top_logprobs"][pos].items()))
        best = int(ref[pos - 1].argmax())
        assert top_token == tokenizer.token_text(best)
        assert abs(top_logprob - ref[pos - 1, best].item()) < 1e-4

    # What lm-eval computes: the continuation's summed logprob and whether it is the greedy choice.
    scored = logprobs["token_logprobs"][ctxlen:len(ids)]
    expected_sum = sum(ref[p - 1, ids[p]].item() for p in range(ctxlen, len(ids)))
    assert abs(sum(scored) - expected_sum) < 1e-3
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["completion_tokens"] == max_tokens
