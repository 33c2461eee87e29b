"""Admission when KV memory is the limit: the plan a workload gets on the instant runner (CPU, no model).

Runs a workload through the real schedulers and engine loops of the CUDA default (two pipelined
halves, each with half the pages and half of max_seqs) with the instant
runner of benchmarks/synthetic.py, fed the way scripts/bench.py feeds it: an
optional warm-up first (`--warm-up N`: N random prompts of the workload's length with 4 output
tokens each, as bench.py does before it starts the clock), then every request at once. Prints the
plan's steps, forward tokens (the workload's own and the total), preemptions, the most sequences
running at once, and the CPU seconds of the whole run (the schedulers' forecasts included).

W6 on the H200 has 51,502 KV pages of 16 tokens for Llama-3.1-8B (scripts/bench.py's log): 2048
prompts of 1024 tokens with 512 out fit ~700 at a time, so admission decides every step.

    .venv/bin/python -m benchmarks.admission --workload W6 --warm-up 32
"""

from __future__ import annotations

import argparse
import random
import time

from benchmarks.synthetic import VOCAB, build_loop, tokenizer
from tokabatch.engine.api import GenerationRequest, SamplingParams

# name: (prompts, prompt tokens, output tokens, KV pages on the H200)
WORKLOADS = {"W6": (2048, 1024, 512, 51_502), "W6-quick": (512, 1024, 512, 51_502),
             "TA": (1024, 1024, 256, 237_434)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=list(WORKLOADS), default="W6")
    ap.add_argument("--num-pages", type=int, default=0, help="0: the workload's H200 pool")
    ap.add_argument("--max-seqs", type=int, default=2048)
    ap.add_argument("--warm-up", type=int, default=32, help="warm-up requests of 4 output tokens first (0: none)")
    args = ap.parse_args()
    num_prompts, prompt_len, output_len, pages = WORKLOADS[args.workload]
    pages = args.num_pages or pages
    loop = build_loop(tokenizer(), num_pages=pages, max_seqs=args.max_seqs, halves=2)
    rng = random.Random(0)

    def drain(count: int, max_tokens: int, tag: str) -> int:
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        for i in range(count):
            prompt = tuple(rng.randrange(VOCAB) for _ in range(prompt_len))
            loop.add(GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=prompt, sampling=params))
        most = 0
        schedulers = [half.scheduler for half in loop.halves]
        while loop.has_work():
            loop.step()
            most = max(most, sum(s.num_running for s in schedulers))
        return most

    drain(args.warm_up, 4, "warm")
    before = loop.stats()
    start = time.process_time()
    most = drain(num_prompts, output_len, "r")
    cpu = time.process_time() - start
    s = loop.stats()
    work = num_prompts * (prompt_len + output_len - 1)
    print(f"{args.workload}: {num_prompts} x {prompt_len} -> {output_len}, {pages:,} pages in two halves, "
          f"max_seqs {args.max_seqs}, warm-up {args.warm_up}")
    forward = s.num_forward_tokens - before.num_forward_tokens
    print(f"steps {s.num_steps - before.num_steps:,}; forward tokens {forward:,} "
          f"for {work:,} of work ({s.num_forward_tokens:,} with the warm-up); preemptions {s.num_preemptions}; "
          f"at most {most} running; CPU {cpu:.2f} s")


if __name__ == "__main__":
    main()
