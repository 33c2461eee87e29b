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
the CPU seconds of the whole workload (adds, every step, the instant runner included), and the CPU
of the steps in which sequences finish (the wave ends, where a GPU would idle). The medians of
the steady steps, and of the two kinds of step where a wave's samples move together: page growth
(most rows gain a page: `schedule`) and page filling (most rows publish one: `on_step_done`),
once every page_size steps, where a GPU would wait for the launch. --profile N adds a
cProfile top-20 over N steady decode steps, --profile-finishing one over the finishing steps;
--digest a hash of every plan in order and every output whatever step emitted it (equal before and
after a change that should not change behaviour); --num-pages 50000 makes TA memory-bound (the queue
waits for pages, so admission is tried every step); --max-seqs 1024 runs TB in waves.

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
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from benchmarks.synthetic import PAGE_SIZE, VOCAB, build_loop, tokenizer
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


class Recorder:
    """What one workload's steps cost: the steady decode steps' split, the finishing steps' CPU, the
    profiles asked for, the digest."""

    def __init__(self, args: argparse.Namespace, parts: dict[str, Timed]) -> None:
        self.args, self.parts = args, parts
        self.steady: list[dict[str, float]] = []
        self.growth: list[dict[str, float]] = []          # the steady steps where most rows gain a page
        self.filling: list[dict[str, float]] = []         # ... and where most rows fill one (publish it)
        self.finishing: list[tuple[float, int]] = []     # (CPU s, sequences finished) of each step where some finish
        self.step_cpu: list[float] = []                   # every step's CPU s (no runner)
        self.profiler = cProfile.Profile() if args.profile else None
        self.finish_stats: pstats.Stats | None = None
        self.digest = hashlib.sha256() if args.digest else None
        self.outputs: dict[str, str] = {}        # the digest's outputs, hashed in request order at the end
        self.num_profiled = self.num_done = self.num_tokens = 0
        self.was_steady = False

    def step(self, loop: EngineLoop) -> None:
        for t in self.parts.values():
            t.seconds, t.last = 0.0, None
        # Profile the steps after a steady one until N steady ones were profiled.
        profiling = self.profiler is not None and self.was_steady and self.num_profiled < self.args.profile
        profilers = ([self.profiler] if profiling else []) + ([cProfile.Profile()] if self.args.profile_finishing
                                                               else [])
        t0 = time.thread_time()
        for p in profilers:
            p.enable()
        items = loop.step()
        t1 = time.thread_time()
        loop.num_wanted()        # what serve() asks after every step (engine/loop_protocol.py)
        loop.stats()
        t2 = time.thread_time()
        for p in profilers:
            p.disable()
        total = t2 - t0
        outputs = [item for item in items if isinstance(item, GenerationOutput)]
        self.step_cpu.append(total - self.parts["runner"].seconds)
        self.num_done += len(outputs)
        self.num_tokens += sum(o.num_completion_tokens for o in outputs)
        if self.digest is not None:
            for o in outputs:
                self.outputs[o.request_id] = repr([(c.token_ids, c.text) for c in o.choices])
        if outputs:
            self.finishing.append((total - self.parts["runner"].seconds, sum(len(o.choices) for o in outputs)))
            if self.args.profile_finishing:
                stats = self.finish_stats
                self.finish_stats = pstats.Stats(profilers[-1]) if stats is None else stats.add(profilers[-1])
        plan = self.parts["schedule"].last
        if self.digest is not None and plan is not None:
            self.digest.update(repr(plan).encode())
        # Steady decode: nothing prefills, nothing finishes (with the default pool: everyone decodes).
        self.was_steady = plan is not None and bool(plan.decodes) and not plan.prefills and not outputs
        if self.was_steady:
            self.num_profiled += profiling
            split = {k: t.seconds for k, t in self.parts.items()}
            split["num_wanted+stats"] = t2 - t1
            split["post-processing"] = total - sum(split.values())
            split["step (no runner)"] = total - split["runner"]
            split["decodes"] = len(plan.decodes) / 1000   # (printed as a mean count, not ms)
            self.steady.append(split)
            # Most rows at a page's first slot (they gained a page in `schedule`) or its last (the
            # page they fill is published in `on_step_done`): where a wave's samples move together.
            offsets = [p % PAGE_SIZE for p in plan.decodes.start_pos]
            if 2 * offsets.count(0) > len(offsets):
                self.growth.append(split)
            elif 2 * offsets.count(PAGE_SIZE - 1) > len(offsets):
                self.filling.append(split)


def run(name: str, tok: Tokenizer, args: argparse.Namespace) -> dict[str, float]:
    w = WORKLOADS[name]
    rng = random.Random(0)
    prompts = [tuple(rng.choices(range(VOCAB), k=w.prompt_len)) for _ in range(w.num_requests)]
    params = SamplingParams(max_tokens=w.output_len, temperature=w.temperature, ignore_eos=True)
    loop = build_loop(tok, num_pages=args.num_pages, max_seqs=args.max_seqs, hydragen=not args.no_hydragen)
    sched, runner = loop.scheduler, loop.runner
    parts = {"schedule": Timed(sched.schedule), "runner": Timed(runner.launch),
             "on_step_done": Timed(sched.on_step_done)}
    sched.schedule, sched.on_step_done = parts["schedule"], parts["on_step_done"]
    runner.launch = parts["runner"]
    recorder = Recorder(args, parts)
    cpu0 = time.process_time()
    for i, prompt in enumerate(prompts):
        loop.add(GenerationRequest(request_id=f"r{i}", prompt_token_ids=prompt, sampling=params, n=w.n))
    while loop.has_work():
        recorder.step(loop)
    cpu = time.process_time() - cpu0
    if recorder.num_done != w.num_requests or recorder.num_tokens != w.num_requests * w.n * w.output_len:
        raise SystemExit(f"{name}: {recorder.num_done} requests, {recorder.num_tokens} tokens: the workload did "
                         "not complete")
    return report(name, loop, recorder, cpu)


def report(name: str, loop: EngineLoop, recorder: Recorder, cpu: float) -> dict[str, float]:
    """Print one workload's means (and profiles), return them for the table."""
    steady = recorder.steady
    if not steady:
        raise SystemExit(f"{name}: no steady decode step was seen")
    w = WORKLOADS[name]
    num_seqs = w.num_requests * w.n
    mean = {k: 1000 * sum(s[k] for s in steady) / len(steady) for k in steady[0]}
    if recorder.digest is not None:
        for request_id in sorted(recorder.outputs):     # whichever step emitted it
            recorder.digest.update(f"{request_id}{recorder.outputs[request_id]}".encode())
        print(f"\n{name}: digest of every plan and output: {recorder.digest.hexdigest()[:16]}")
    print(f"\n{name}: {num_seqs} sequences, {loop._stats.num_steps} steps, {len(steady)} steady decode steps "
          f"of {mean['decodes']:.0f} decodes on average, {loop._stats.num_preemptions} preemptions, "
          f"workload CPU {cpu:.1f} s")
    for k in ("schedule", "on_step_done", "post-processing", "num_wanted+stats", "step (no runner)", "runner"):
        print(f"  {k:<18} {mean[k]:8.2f} ms/step")
    median = {k: 1000 * statistics.median(s[k] for s in steady) for k in ("schedule", "on_step_done",
                                                                            "step (no runner)")}
    print(f"  median steady step {median['step (no runner)']:.2f} ms (schedule {median['schedule']:.2f}, "
          f"on_step_done {median['on_step_done']:.2f})")
    if recorder.growth:
        print(f"  page-growth steps (most rows gain a page): {len(recorder.growth)}, median schedule "
              f"{1000 * statistics.median(s['schedule'] for s in recorder.growth):.2f} ms")
    if recorder.filling:
        print(f"  page-filling steps (most rows publish a page): {len(recorder.filling)}, median on_step_done "
              f"{1000 * statistics.median(s['on_step_done'] for s in recorder.filling):.2f} ms")
    if recorder.profiler is not None:
        _print_top(pstats.Stats(recorder.profiler), 20, f"cProfile over {recorder.num_profiled} steady decode steps")
    seconds, seqs = sum(f[0] for f in recorder.finishing), sum(f[1] for f in recorder.finishing)
    print(f"  finishing steps: {len(recorder.finishing)}, {1000 * seconds:.1f} ms of CPU (no runner) for {seqs} "
          f"sequences ({1e6 * seconds / max(1, seqs):.1f} us each)")
    longest = sorted(recorder.step_cpu, reverse=True)[:3]
    print(f"  longest steps (CPU, no runner): {', '.join(f'{1000 * t:.1f}' for t in longest)} ms")
    if recorder.finish_stats is not None:
        _print_top(recorder.finish_stats, 25, "cProfile over the finishing steps")
    return {"longest_ms": 1000 * longest[0], "steady_ms": mean["step (no runner)"], "cpu_s": cpu,
            "finish_ms": 1000 * seconds, "finish_us": 1e6 * seconds / max(1, seqs), **mean}


def _print_top(stats: pstats.Stats, count: int, title: str) -> None:
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(count)
    print(f"  {title} (by own time):")
    print("\n".join("    " + line for line in out.getvalue().splitlines()[4:] if line.strip()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    ap.add_argument("--num-pages", type=int, default=400_000,
                    help="KV pages of 16 tokens; fewer (e.g. 50000 for TA) make admission memory-bound")
    ap.add_argument("--no-hydragen", action="store_true")
    ap.add_argument("--max-seqs", type=int, default=4096,
                    help="sequences running at once (1024, one pipelined half's on the H200: TB in waves)")
    ap.add_argument("--digest", action="store_true",
                    help="print a hash of every plan and output (equal before and after a change: same behaviour)")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="cProfile N steady decode steps")
    ap.add_argument("--profile-finishing", action="store_true",
                    help="cProfile the steps in which sequences finish (the wave ends)")
    args = ap.parse_args()
    tok = tokenizer()
    rows = {name: run(name, tok, args) for name in (WORKLOADS if args.workload == "all" else [args.workload])}
    print("\n| workload | sequences | steady decode ms/step (CPU, no runner) | schedule | on_step_done | post "
          "| num_wanted+stats | finishing steps ms (us per sequence) | longest step ms | workload CPU s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        w = WORKLOADS[name]
        print(f"| {name} | {w.num_requests * w.n} | {r['steady_ms']:.2f} | {r['schedule']:.2f} "
              f"| {r['on_step_done']:.2f} | {r['post-processing']:.2f} | {r['num_wanted+stats']:.2f} "
              f"| {r['finish_ms']:.0f} ({r['finish_us']:.0f}) | {r['longest_ms']:.0f} | {r['cpu_s']:.1f} |")


if __name__ == "__main__":
    main()
