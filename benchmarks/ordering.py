"""Batch-aware ordering and request routing: what they do to the engine's plan (CPU, instant runner).

A batch file whose lines share prompts (W4: 128 problems x 100 samples, each sample its own line,
1024-token prompt, 512 out) runs through the real schedulers and engine loops, with the instant
runner of benchmarks/synthetic.py (no model), so everything measured is
a scheduling outcome that does not depend on the GPU:
  - prefill tokens computed (the shared prompts' pages computed once per half, or again and again),
  - the Hydragen sharing fraction (decode KV reads the prefix groups save, as /metrics reports it),
  - steps, and the mean decode batch.
Lines are fed the way the engine process takes them from the service (`num_wanted()` before every
step), in one of four orders: `shuffled` (file order of a file written without regard to
sharing), `windowed` (the feed's windows, up to RunnerConfig's default size, alone), `ordered`
(what the batch runner does: the whole file clustered by ordering.prompt_key, then the windows)
and `n` (one request with n samples per problem: shares by construction). The engine is the CUDA default:
two pipelined halves (PipelinedLoop, with its prompt-start affinity; --no-affinity: without),
each with half the H200's KV pages and max_seqs. W5-quick: 4096 prompts, one shared 2048-token
prefix each, then 128 tokens of their own.

    .venv/bin/python -m benchmarks.ordering                         # W4-quick, every order
    .venv/bin/python -m benchmarks.ordering --workload W4 --order ordered
"""

from __future__ import annotations

import argparse
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

from benchmarks.synthetic import VOCAB, build_loop, tokenizer
from tokabatch.config import RunnerConfig
from tokabatch.engine.api import GenerationOutput, GenerationRequest, SamplingParams
from tokabatch.service.jobs.ordering import prompt_key, windowed
from tokabatch.text import Tokenizer

T = TypeVar("T")
H200_PAGES = 237_434          # KV pages of 16 tokens for Llama-3.2-1B on the H200 (scripts/bench.py's log)


@dataclass(frozen=True)
class Workload:
    problems: int                    # distinct prompts
    n: int                           # samples (lines) per prompt
    prompt_len: int
    output_len: int
    shared_prefix: int = 0           # W5: the first tokens of every prompt are the same


WORKLOADS = {"W4": Workload(128, 100, 1024, 512), "W4-quick": Workload(32, 100, 1024, 512),
             "TB": Workload(64, 64, 1024, 256), "W5-quick": Workload(4096, 1, 2048 + 128, 256, shared_prefix=2048)}


def requests(w: Workload, order: str, window: int = 0) -> list[GenerationRequest]:
    rng = random.Random(0)
    prefix = tuple(rng.choices(range(VOCAB), k=w.shared_prefix))
    prompts = [prefix + tuple(rng.choices(range(VOCAB), k=w.prompt_len - w.shared_prefix)) for _ in range(w.problems)]
    params = SamplingParams(max_tokens=w.output_len, temperature=1.0, ignore_eos=True)
    if order == "n":
        return [GenerationRequest(request_id=f"p{i}", prompt_token_ids=p, sampling=params, n=w.n)
                for i, p in enumerate(prompts)]
    lines = [GenerationRequest(request_id=f"p{i}-{j}", prompt_token_ids=p, sampling=params)
             for i, p in enumerate(prompts) for j in range(w.n)]
    return feed_order(lines, order, lambda r: r.prompt_token_ids, window)


def feed_order(lines: list[T], order: str, prompt_of: Callable[[T], Sequence[int]], window: int = 0) -> list[T]:
    """A batch file's lines as the engine receives them. The file is `lines` after a seeded shuffle
    (written without regard to sharing); "shuffled" feeds it in that order, "windowed" through
    the feed's windows alone, "ordered" as the batch runner does: the whole file sorted by
    ordering.prompt_key (of the body it would read), then the windows. `window`: 0 is RunnerConfig's."""
    lines = list(lines)
    random.Random(7).shuffle(lines)
    if order == "shuffled":
        return lines
    if order == "ordered":
        lines.sort(key=lambda line: prompt_key({"prompt": list(prompt_of(line))}))
    return list(windowed(lines, window or RunnerConfig().order_window, prompt_of))


def run(w: Workload, order: str, tok: Tokenizer, args: argparse.Namespace) -> dict[str, float]:
    todo = requests(w, order, args.window)
    loop = build_loop(tok, num_pages=args.num_pages, max_seqs=args.max_seqs, halves=args.halves,
                      affinity=not args.no_affinity)
    t0 = time.process_time()
    fed = done = decodes = steps_with_decodes = 0
    while fed < len(todo) or loop.has_work():
        for _ in range(min(loop.num_wanted(), len(todo) - fed) if fed < len(todo) else 0):
            loop.add(todo[fed])
            fed += 1
        before = loop.stats()
        done += sum(isinstance(item, GenerationOutput) for item in loop.step())
        after = loop.stats()
        if after.num_decode_kv_reads > before.num_decode_kv_reads:
            steps_with_decodes += 1
            decodes += after.num_generated_tokens - before.num_generated_tokens
    s = loop.stats()
    if done != len(todo) or s.num_generated_tokens != w.problems * w.n * w.output_len:
        raise SystemExit(f"{order}: {done} of {len(todo)} requests, {s.num_generated_tokens} tokens: incomplete")
    prefill = s.num_forward_tokens - s.num_generated_tokens
    return {"steps": s.num_steps, "prefill tokens": prefill, "cached": s.prefix_cache_hit_rate,
            "sharing": s.num_hydragen_saved_kv_reads / max(1, s.num_decode_kv_reads),
            "batch": decodes / max(1, steps_with_decodes), "cpu s": time.process_time() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=list(WORKLOADS), default="W4-quick")
    ap.add_argument("--order", choices=("shuffled", "windowed", "ordered", "n", "all"), default="all")
    ap.add_argument("--num-pages", type=int, default=H200_PAGES)
    ap.add_argument("--max-seqs", type=int, default=2048)
    ap.add_argument("--halves", type=int, choices=(1, 2), default=2, help="2: PipelinedLoop (the CUDA default)")
    ap.add_argument("--window", type=int, default=0, help="ordering window in lines (0: RunnerConfig's default)")
    ap.add_argument("--no-affinity", action="store_true",
                    help="route each request to the half with less work (no prompt-start affinity)")
    args = ap.parse_args()
    w = WORKLOADS[args.workload]
    tok = tokenizer()
    print(f"{args.workload}: {w.problems} prompts x {w.n} samples, {w.prompt_len} -> {w.output_len}; "
          f"{args.halves} half(s){'' if args.halves == 1 or not args.no_affinity else ' without affinity'}, "
          f"{args.num_pages} pages, max_seqs {args.max_seqs}")
    print("| order | steps | prefill tokens computed | prefix-cache hit rate | Hydragen sharing "
          "| mean decode batch per step | CPU s |")
    print("|---|---|---|---|---|---|---|")
    orders = ("shuffled", "windowed", "ordered", "n") if w.n > 1 else ("shuffled", "windowed", "ordered")
    for order in (orders if args.order == "all" else (args.order,)):
        r = run(w, order, tok, args)
        print(f"| {order} | {r['steps']} | {r['prefill tokens']:,} | {r['cached']:.1%} | {r['sharing']:.1%} "
              f"| {r['batch']:.0f} | {r['cpu s']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
