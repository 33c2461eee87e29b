"""The real demo model (SmolLM2-135M-Instruct) in float32: our greedy tokens equal HF generate's.

Eight chat prompts of mixed lengths, each run to EOS or 64 tokens, all in one batch (and the three
shortest alone). Skips when the demo model was never fetched (`tokabatch models fetch`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from tokabatch.config import EngineConfig, ModelConfig, SchedulerConfig
from tokabatch.engine.api import FinishReason, GenerationOutput, GenerationRequest, SamplingParams
from tokabatch.engine.runtime.factory import build_loop
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.text import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MAX_TOKENS = 64

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one paragraph why the sky is blue, as if to a ten year old child who loves dinosaurs.",
    "Hi!",
    "Translate 'good morning' into Spanish and German.",
    "What is 17 times 23? Show your work step by step.",
    "Give me a short recipe for pancakes with the ingredients as a list and then the steps.",
]


def make_loop(folder: Path) -> EngineLoop:
    config = EngineConfig(model=ModelConfig(path=str(folder), dtype="float32", device="cpu"),
                          scheduler=SchedulerConfig(page_size=16), kv_cache_tokens=8192)
    return build_loop(config, check_invariants=True)


def run(loop: EngineLoop, requests: list[GenerationRequest]) -> dict[str, GenerationOutput]:
    for r in requests:
        loop.add(r)
    outputs: dict[str, GenerationOutput] = {}
    while loop.has_work():
        outputs.update((o.request_id, o) for o in loop.step() if isinstance(o, GenerationOutput))
    return outputs


@pytest.fixture(scope="module")
def cases(demo_model_path: Path) -> list[tuple[GenerationRequest, tuple[int, ...]]]:
    """Each chat prompt as a request, with HF transformers' greedy continuation (one prompt at a time)."""
    import transformers

    tokenizer = Tokenizer.from_folder(demo_model_path)
    model = transformers.AutoModelForCausalLM.from_pretrained(demo_model_path, torch_dtype=torch.float32).eval()
    result = []
    for i, question in enumerate(QUESTIONS):
        ids = tuple(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_ids[0], pad_token_id=tokenizer.eos_token_ids[0])
        expected = tuple(out[0, len(ids):].tolist())
        request = GenerationRequest(f"q{i}", ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
        result.append((request, expected))
    return result


def check(outputs: dict[str, GenerationOutput], cases, eos_ids: tuple[int, ...], tokenizer: Tokenizer) -> None:
    for request, expected in cases:
        choice = outputs[request.request_id].choices[0]
        assert choice.token_ids == expected, (request.request_id, tokenizer.decode(expected), choice.text)
        assert len(expected) == MAX_TOKENS or expected[-1] in eos_ids
        if expected[-1] in eos_ids:
            assert choice.finish_reason is FinishReason.STOP
            assert choice.text == tokenizer.decode(expected[:-1])
        else:
            assert choice.finish_reason is FinishReason.LENGTH
            assert choice.text == tokenizer.decode(expected)


def test_demo_model_alone_equals_hf(demo_model_path: Path, cases) -> None:
    """One request at a time: the three shortest answers (all eight run together in the next test,
    which is where the suite's time for this model goes)."""
    loop = make_loop(demo_model_path)
    shortest = sorted(cases, key=lambda case: len(case[1]))[:3]
    outputs: dict[str, GenerationOutput] = {}
    for request, _ in shortest:
        outputs.update(run(loop, [request]))
    check(outputs, shortest, loop.info.eos_token_ids, loop.tokenizer)
    assert any(expected[-1] in loop.info.eos_token_ids for _, expected in shortest)   # EOS is exercised


def test_demo_model_batch_equals_hf(demo_model_path: Path, cases) -> None:
    loop = make_loop(demo_model_path)
    outputs = run(loop, [request for request, _ in cases])
    check(outputs, cases, loop.info.eos_token_ids, loop.tokenizer)
    assert loop.stats().num_steps <= MAX_TOKENS + 2   # they really ran together
