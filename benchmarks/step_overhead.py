"""CPU (Python) time per engine step at large batch, with an instant runner: no model, no torch.

Builds the real Scheduler and the real EngineLoop with the real Tokenizer (benchmarks/synthetic.py:
the vocabulary of scripts/bench.py's random-weight folders), but the runner
returns one token per sampled SeqWork instantly ((seq_id * 7919 + step) % vocab), so every
millisecond measured is engine bookkeeping that the GPU would have to wait for.

Workloads (fixed output length, EOS ignored; Hydragen grouping on, with EngineConfig's default
thresholds as factory.py builds them; --no-hydragen for off):
    TA  1024 requests x 1024 random prompt ids -> 256 out, greedy
    TB  64 requests, n=64 each (4096 sequences), 1024-id prompt -> 256 out, temperature 1

Prints, for the steady decode steps (pure decode: nothing prefills, nothing finishes; with the
default pool that is every sequence running at once), the mean CPU ms per step and
its split: scheduler.schedule, the instant runner, scheduler.on_step_done, the loop's post-processing
(take samples, detokenize, stop checks, emit) and the num_wanted() + stats() that serve() calls
after every step; "step (no runner)" is their sum, the CPU time a GPU step would wait on. Also
the CPU seconds of the whole workload (adds, every step, the instant runner included). --profile N
adds a cProfile top-20 over N steady decode steps; --digest a hash of every plan and output (equal
before and after a change that should not change behaviour); --num-pages 50000 makes TA
memory-bound (the queue waits for pages, so admission is tried every step).

    .venv/bin/python -m benchmarks.step_overhead                     # both workloads
    .venv/bin/python -m benchmarks.step_overhead --workload TB --profile 20
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import io
import pstats
import random
import time
from dataclasses import dataclass
from typing import Any, Callable

from benchmarks.synthetic import VOCAB, build_loop, tokenizer
from tokabatch.engine.api import GenerationOutput, GenerationRequest, SamplingParams
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.text import Tokenizer


@dataclass(frozen=True)
class Workload:
    num_requests: int
    n: int
    prompt_len: int
    output_len: int
    temperature: float


WORKLOADS = {
    "TA": Workload(1024, 1, 1024, 256, 0.0),
    "TB": Workload(64, 64, 1024, 256, 1.0),
}


class Timed:
    """Wraps a bound method; accumulates the CPU seconds (this thread) it takes in the current step."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn, self.seconds, self.last = fn, 0.0, None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        t = time.thread_time()
        try:
            self.last = self.fn(*args, **kwargs)
            return self.last
        finally:
            self.seconds += time.thread_time() - t


def run(name: str, tok: Tokenizer, args: argparse.Namespace) -> dict[str, float]:
    w = WORKLOADS[name]
    rng = random.Random(0)
    prompts = [tuple(rng.choices(range(VOCAB), k=w.prompt_len)) for _ in range(w.num_requests)]
    params = SamplingParams(max_tokens=w.output_len, temperature=w.temperature, ignore_eos=True)
    loop = build_loop(tok, num_pages=args.num_pages, max_seqs=4096, hydragen=not args.no_hydragen)
    sched, runner = loop.scheduler, loop.runner
    parts = {"schedule": Timed(sched.schedule), "runner": Timed(runner.launch),
             "on_step_done": Timed(sched.on_step_done)}
    sched.schedule, sched.on_step_done = parts["schedule"], parts["on_step_done"]
    runner.launch = parts["runner"]
    num_seqs = w.num_requests * w.n
    steady: list[dict[str, float]] = []
    profiler = cProfile.Profile() if args.profile else None
    num_profiled = 0
    was_steady = False
    digest = hashlib.sha256() if args.digest else None
    cpu0 = time.process_time()
    for i, prompt in enumerate(prompts):
        loop.add(GenerationRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=params, n=w.n))
    num_done = num_tokens = 0
    while loop.has_work():
        for t in parts.values():
            t.seconds, t.last = 0.0, None
        # Profile the steps after a steady one until N steady ones were profiled.
        profiling = profiler is not None and was_steady and num_profiled < args.profile
        t0 = time.thread_time()
        if profiling:
            profiler.enable()
        items = loop.step()
        t1 = time.thread_time()
        loop.num_wanted()        # what serve() asks after every step (engine/loop_protocol.py)
        loop.stats()
        t2 = time.thread_time()
        if profiling:
            profiler.disable()
        total = t2 - t0
        num_finished = 0
        for item in items:
            if isinstance(item, GenerationOutput):
                num_finished += 1
                num_tokens += item.num_completion_tokens
                if digest is not None:
                    digest.update(repr((item.request_id, [(c.token_ids, c.text) for c in item.choices])).encode())
        num_done += num_finished
        plan = parts["schedule"].last
        if digest is not None and plan is not None:
            digest.update(repr(plan).encode())
        # Steady decode: nothing prefills, nothing finishes (with the default pool: everyone decodes).
        was_steady = plan is not None and bool(plan.decodes) and not plan.prefills and num_finished == 0
        if was_steady:
            num_profiled += profiling
            split = {k: t.seconds for k, t in parts.items()}
            split["num_wanted+stats"] = t2 - t1
            split["post-processing"] = total - sum(split.values())
            split["step (no runner)"] = total - split["runner"]
            split["decodes"] = len(plan.decodes) / 1000   # (printed as a mean count, not ms)
            steady.append(split)
    cpu = time.process_time() - cpu0
    if num_done != w.num_requests or num_tokens != num_seqs * w.output_len:
        raise SystemExit(f"{name}: {num_done} requests, {num_tokens} tokens: the workload did not complete")
    return report(name, loop, steady, cpu, digest, profiler, num_profiled)


def report(name: str, loop: EngineLoop, steady: list[dict[str, float]], cpu: float, digest: Any,
           profiler: cProfile.Profile | None, num_profiled: int) -> dict[str, float]:
    """Print one workload's means (and profile), return them for the table."""
    if not steady:
        raise SystemExit(f"{name}: no steady decode step was seen")
    w = WORKLOADS[name]
    num_seqs = w.num_requests * w.n
    mean = {k: 1000 * sum(s[k] for s in steady) / len(steady) for k in steady[0]}
    if digest is not None:
        print(f"\n{name}: digest of every plan and output: {digest.hexdigest()[:16]}")
    print(f"\n{name}: {num_seqs} sequences, {loop._stats.num_steps} steps, {len(steady)} steady decode steps "
          f"of {mean['decodes']:.0f} decodes on average, {loop._stats.num_preemptions} preemptions, "
          f"workload CPU {cpu:.1f} s")
    for k in ("schedule", "on_step_done", "post-processing", "num_wanted+stats", "step (no runner)", "runner"):
        print(f"  {k:<18} {mean[k]:8.2f} ms/step")
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(20)
        print(f"  cProfile over {num_profiled} steady decode steps (by own time):")
        print("\n".join("    " + line for line in out.getvalue().splitlines()[4:] if line.strip()))
    return {"steady_ms": mean["step (no runner)"], "cpu_s": cpu, **mean}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    ap.add_argument("--num-pages", type=int, default=400_000,
                    help="KV pages of 16 tokens; fewer (e.g. 50000 for TA) make admission memory-bound")
    ap.add_argument("--no-hydragen", action="store_true")
    ap.add_argument("--digest", action="store_true",
                    help="print a hash of every plan and output (equal before and after a change: same behaviour)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile N steady decode steps")
    args = ap.parse_args()
    tok = tokenizer()
    rows = {name: run(name, tok, args) for name in (WORKLOADS if args.workload == "all" else [args.workload])}
    print("\n| workload | sequences | steady decode ms/step (CPU, no runner) | schedule | on_step_done | post "
          "| num_wanted+stats | workload CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        w = WORKLOADS[name]
        print(f"| {name} | {w.num_requests * w.n} | {r['steady_ms']:.2f} | {r['schedule']:.2f} "
              f"| {r['on_step_done']:.2f} "
              f"| {r['post-processing']:.2f} | {r['num_wanted+stats']:.2f} | {r['cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
