#!/usr/bin/env python
"""CPU benchmark: 64 chat prompts on the demo model, tokabatch's engine against HF transformers.

Both run in float32 on the same prompts with max_tokens 128 and EOS honoured; HF `generate` runs in
batches of 16 with left padding (what a user without a serving engine writes). Prints tokens/s of
each and the ratio. Run: `.venv/bin/python scripts/bench_cpu.py` (about 3 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import time

QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.", "What is 17 times 23?", "Name three primary colors.",
    "Why is the sky blue?", "Give me a tip for learning to cook.", "What does a CPU do?",
    "Summarize the plot of Romeo and Juliet.", "How do vaccines work?", "What is a prime number?",
    "Translate 'good morning' into Spanish.", "List four planets of the solar system.",
    "What is the boiling point of water?", "Describe a cat to someone who has never seen one.",
    "How do I make a cup of tea?", "What is gravity?", "Write a short poem about autumn.",
    "Who wrote Hamlet?", "What is the largest ocean on Earth?", "Explain what a database is.",
    "Give three reasons to exercise.", "What is the speed of light?", "How do birds fly?",
    "What is machine learning?", "Suggest a name for a pet dog.", "What causes rain?",
    "Explain the water cycle.", "What is the difference between weather and climate?",
    "How many days are in a leap year?", "What is an atom?", "Tell me a fun fact about octopuses.",
]


def chat_prompts(tokenizer, count: int) -> list[list[int]]:
    prompts = []
    for i in range(count):
        question = QUESTIONS[i % len(QUESTIONS)]
        if i >= len(QUESTIONS):
            question = f"{question} Answer briefly."
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": question}]))
    return prompts


def run_tokabatch(model: str, prompts: list[list[int]], max_tokens: int) -> tuple[int, float]:
    from tokabatch.config import load_config
    from tokabatch.engine.api import GenerationOutput, GenerationRequest, SamplingParams
    from tokabatch.engine.runtime.factory import build_loop

    config = load_config(model={"path": model, "dtype": "float32", "device": "cpu"})
    loop = build_loop(config.engine)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    for i, ids in enumerate(prompts):
        loop.add(GenerationRequest(request_id=f"r{i}", prompt_token_ids=tuple(ids), sampling=params))
    num_tokens = 0
    done = 0
    while done < len(prompts):
        for item in loop.step():
            if isinstance(item, GenerationOutput):
                done += 1
                num_tokens += item.num_completion_tokens
    return num_tokens, time.perf_counter() - start


def run_hf(folder: str, prompts: list[list[int]], max_tokens: int, batch_size: int) -> tuple[int, float]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else next(iter(eos_ids))
    num_tokens = 0
    start = time.perf_counter()
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b:b + batch_size]
        width = max(len(p) for p in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=pad_id)
        for row in out[:, width:].tolist():
            n = 0
            for token in row:
                n += 1
                if token in eos_ids:
                    break
            num_tokens += n
    return num_tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from tokabatch.model_store import resolve_model_path
    from tokabatch.text import Tokenizer

    folder = resolve_model_path(args.model)
    prompts = chat_prompts(Tokenizer.from_folder(folder), args.prompts)
    ours_tokens, ours_s = run_tokabatch(args.model, prompts, args.max_tokens)
    hf_tokens, hf_s = run_hf(str(folder), prompts, args.max_tokens, args.hf_batch_size)
    ours_rate, hf_rate = ours_tokens / ours_s, hf_tokens / hf_s
    print(f"{'engine':<24} {'tokens':>8} {'seconds':>8} {'tok/s':>8}")
    print(f"{'tokabatch':<24} {ours_tokens:>8} {ours_s:>8.1f} {ours_rate:>8.1f}")
    print(f"{'hf generate (batch ' + str(args.hf_batch_size) + ')':<24} {hf_tokens:>8} {hf_s:>8.1f} {hf_rate:>8.1f}")
    print(f"ratio tokabatch / hf: {ours_rate / hf_rate:.2f}x  ({args.prompts} prompts, max_tokens {args.max_tokens}, "
          f"float32, {args.threads} threads)")


if __name__ == "__main__":
    main()
