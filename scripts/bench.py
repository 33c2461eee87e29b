#!/usr/bin/env python
"""GPU benchmark: a named workload (docs: ../shared/docs/performance.md) on a random-weight model.

Builds the exact architecture with random bf16 weights in a temp folder (config.json, safetensors,
a WordLevel tokenizer "t0".."tN" covering the vocabulary), runs the workload's random token-id
prompts through EngineLoop in this process (fixed output length, EOS ignored) and prints one row:
workload, engine, wall s, output tok/s, total tok/s, fraction of the sequential bound, start-up s,
peak GPU memory. Wall time runs from the first request added to the last token returned; model
build and warm-up (kernel compilation) are start-up, reported apart.

`--vs-hf` first runs HF transformers in its own process (static `generate`, bf16, sdpa, batch 256,
min_new_tokens = max_new_tokens, the first 256 prompts) and prints its row and the ratio.
`--profile N` afterwards profiles N pure-decode steps (GPU time per kernel class against wall time).
`--lines shuffled|ordered` (TB, W4) submits each sample as its own line, shuffled, in file order or
through the batch runner's batch-aware ordering (service/jobs/ordering.py): ordering on and off.

On the GPU machine (after the wheel prelude of ../shared/gpu/README.md):
    python3 scripts/bench.py --workload TA-quick --vs-hf --profile 5
Quick variants ("W1-quick") keep prompt and output lengths and take a quarter of the prompts.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokabatch.engine.random_models import ARCHS, build_folder  # noqa: E402

@dataclass(frozen=True)
class Workload:
    model: str
    num_prompts: int
    prompt_len: int
    output_len: int
    temperature: float
    sequential_bound: float          # output tok/s, performance.md "Limits"
    n: int = 1                       # samples per prompt (TB, W4: n samples of one problem)
    shared_prefix: int = 0           # W5: the first tokens of every prompt are the same


WORKLOADS = {
    "TA": Workload("Llama-3.2-1B", 1024, 1024, 256, 0.0, 45_000),
    "W1": Workload("Llama-3.2-1B", 4096, 1024, 512, 0.0, 55_600),
    "W2": Workload("Llama-3.2-1B", 16384, 256, 256, 0.0, 117_000),
    "W3": Workload("Llama-3.2-1B", 4096, 2048, 128, 0.0, 16_300),
    "W6": Workload("Llama-3.1-8B", 2048, 1024, 512, 0.0, 10_600),
    "W8": Workload("Qwen2.5-0.5B", 8192, 1024, 512, 0.0, 146_000),
    # Shared prompts (Hydragen): sequential bounds with Hydragen, from performance.md.
    "TB": Workload("Llama-3.2-1B", 64, 1024, 256, 1.0, 228_000, n=64),
    "W4": Workload("Llama-3.2-1B", 128, 1024, 512, 1.0, 192_000, n=100),
    "W5": Workload("Llama-3.2-1B", 16384, 2048 + 128, 256, 1.0, 154_000, shared_prefix=2048),
}


def workload(name: str) -> Workload:
    base = name.removesuffix("-quick")
    if base not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; known: {', '.join(WORKLOADS)} (+ '-quick')")
    w = WORKLOADS[base]
    if name.endswith("-quick"):
        w = replace(w, num_prompts=w.num_prompts // 4)
    return w


def prompts_of(w: Workload, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefix = [rng.randrange(vocab_size) for _ in range(w.shared_prefix)]
    return [prefix + [rng.randrange(vocab_size) for _ in range(w.prompt_len - w.shared_prefix)]
            for _ in range(w.num_prompts)]


def run_engine(folder: Path, w: Workload, prompts: list[list[int]], args: argparse.Namespace) -> dict:
    import torch

    from tokabatch.config import EngineConfig, ModelConfig, SchedulerConfig
    from tokabatch.engine.api import GenerationOutput, GenerationRequest, SamplingParams
    from tokabatch.engine.runtime import flashinfer_backend
    from tokabatch.engine.runtime.factory import build_loop

    flashinfer_backend.DECODE_TENSOR_CORES = {"auto": None, "on": True, "off": False}[args.decode_tensor_cores]
    flashinfer_backend.HYDRAGEN_OWN_TENSOR_CORES = {"auto": flashinfer_backend.HYDRAGEN_OWN_TENSOR_CORES,
                                                    "on": True, "off": False, "as-decode": None}[
        args.hydragen_own_tensor_cores]
    if args.flashinfer_builtin_max:           # undo flashinfer_plan_speedup (for a before/after in one call)
        import builtins

        for module in flashinfer_backend.PLAN_MODULES:
            module.max = builtins.max
    t0 = time.perf_counter()
    config = EngineConfig(
        model=ModelConfig(path=str(folder), dtype="bfloat16", device="cuda"),
        scheduler=SchedulerConfig(max_seqs=args.max_seqs, max_tokens_per_step=args.max_tokens_per_step),
        kv_memory_fraction=args.kv_memory_fraction, enable_cuda_graphs=not args.no_cuda_graphs,
        enable_hydragen={"auto": None, "on": True, "off": False}[args.hydragen], pipelined=not args.no_pipeline)
    loop = build_loop(config)
    info = loop.info
    graphs = loop.runner.graphs
    print(f"engine: {info.num_pages} pages x {info.page_size} = {info.num_pages * info.page_size} KV tokens, "
          f"max_seqs {info.max_seqs}, backend {loop.runner.backend.name}, "
          f"{'two pipelined halves' if hasattr(loop, 'halves') else 'one loop'}, CUDA graphs "
          f"{f'up to {graphs.max_batch} ({len(graphs.sizes)} sizes)' if graphs else 'off'}, "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    params = SamplingParams(max_tokens=w.output_len, temperature=w.temperature, ignore_eos=True)

    def drain(batch: list[list[int]], tag: str, params: SamplingParams = params, n: int = 1) -> tuple[int, int]:
        for i, ids in enumerate(batch):
            loop.add(GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=tuple(ids), sampling=params, n=n))
        done = out_tokens = in_tokens = 0
        while done < len(batch):
            for item in loop.step():
                if isinstance(item, GenerationOutput):
                    if not item.ok:
                        raise RuntimeError(f"request {item.request_id} failed: {item.error}")
                    done += 1
                    out_tokens += item.num_completion_tokens
                    in_tokens += item.num_prompt_tokens
        torch.cuda.synchronize()
        return in_tokens, out_tokens

    # Warm-up: compiles the attention kernels and touches a full-size step; different prompts so the
    # prefix cache does not shorten the timed run.
    rng = random.Random(12345)
    warm = [[rng.randrange(info.vocab_size) for _ in range(w.prompt_len)] for _ in range(32)]
    drain(warm, "warm", SamplingParams(max_tokens=4, temperature=w.temperature, ignore_eos=True))
    startup = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    timers, timeline = _time_phases(loop, detail=args.phase_detail)
    profiler = cProfile.Profile() if args.cpu_profile else None
    start = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    in_tokens, out_tokens = drain(prompts, "r", n=w.n) if args.lines == "n" else drain(as_lines(prompts, w, args), "r")
    wall = time.perf_counter() - start
    if profiler is not None:
        profiler.disable()
        report = io.StringIO()
        by = pstats.Stats(profiler, stream=report)
        by.sort_stats("tottime").print_stats(args.cpu_profile)
        by.sort_stats("cumulative").print_stats(args.cpu_profile)
        path = Path(args.out_dir) / f"cpu-profile-{args.workload}-hydragen-{args.hydragen}.txt"
        path.write_text(report.getvalue())
        print(f"cpu profile (the timed run, under cProfile: slower than without): {path}", flush=True)
    phases = {k: v for k, v in timers.items() if "(in " not in k}
    print("phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f"; loop rest {wall - sum(phases.values()):.2f}", flush=True)
    if args.phase_detail:
        timeline.settle(timers)               # (after drain's synchronize: every event is done)
        print("detail (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timers.items() if "(in " in k), flush=True)
    stats = loop.stats()
    runners = getattr(loop, "runners", [loop.runner])
    row = dict(engine="tokabatch", wall_s=wall, out_tok_s=out_tokens / wall,
               total_tok_s=(in_tokens + out_tokens) / wall, startup_s=startup,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, steps=stats.num_steps,
               forward_tokens=stats.num_forward_tokens, cached_tokens=stats.num_cached_tokens,
               graph_steps=sum(r.num_graph_steps for r in runners), eager_steps=sum(r.num_eager_steps for r in runners),
               hydragen_sharing=round(stats.num_hydragen_saved_kv_reads / max(1, stats.num_decode_kv_reads), 3))
    if args.profile:
        from bench_profile import profile_decode_steps  # noqa: PLC0415 (scripts/ sibling)
        profile_decode_steps(loop, prompts[:max(1, args.profile_batch // w.n)], w, args.profile, args.out_dir,
                             tag=f"{args.workload}-hydragen-{args.hydragen}")
    return row


def as_lines(prompts: list[list[int]], w: Workload, args: argparse.Namespace) -> list[list[int]]:
    """The workload as a batch file would hold it: each of the n samples its own line (n=1), the
    lines shuffled (a file written without regard to sharing), fed in that order ("shuffled") or
    through the batch runner's batch-aware ordering ("ordered": service/jobs/ordering.py, the whole
    file clustered by prompt start, then windows of the default RunnerConfig.order_window)."""
    from bench_ordering import feed_order  # noqa: PLC0415 (scripts/ sibling)

    return feed_order([p for p in prompts for _ in range(w.n)], args.lines, lambda p: p)


def _time_phases(loop, detail: bool = False) -> tuple[dict[str, float], "_GpuTimeline | None"]:
    """Wrap the schedulers and runners to add up wall seconds per phase: CPU time to schedule, to
    build and launch a step (graph replay or eager), to process its result, and the time spent
    waiting for the GPU's tokens (with two pipelined halves much of the rest overlaps that).
    `detail` adds parts of those phases, marked "(in ...)": the grouped graph step's own-part
    layout, its flashinfer plans and the replay call, the sampler's launch, and the loop's
    handling of the sampled tokens (texts of finished sequences included); and, from CUDA events
    (the returned _GpuTimeline: its settle() after the run adds them), the GPU's time per kind
    of step and where it was idle."""
    totals = {"schedule": 0.0, "launch graph": 0.0, "launch eager": 0.0, "wait for GPU": 0.0, "on_step_done": 0.0}
    halves = getattr(loop, "halves", [loop])
    timeline = None
    if detail:
        import torch

        from tokabatch.engine.runtime import hydragen_graphs

        parts = {"pad_own (in launch)": (hydragen_graphs, "pad_own"),
                 "grouped plans (in launch)": (hydragen_graphs.GroupedDecodeGraphs, "_plan_own"),
                 "graph replay call (in launch)": (torch.cuda.CUDAGraph, "replay")}
        for key, (owner, name) in parts.items():
            totals[key] = 0.0
            setattr(owner, name, _timed(getattr(owner, name), totals, key))
        totals["sample launch (in launch)"] = totals["take samples (in loop rest)"] = 0.0
        timeline = _GpuTimeline(torch)
        replay = torch.cuda.CUDAGraph.replay

        def replay_timed(graph) -> None:
            began = timeline.event()
            replay(graph)
            timeline.replays.append((began, timeline.event()))
        torch.cuda.CUDAGraph.replay = replay_timed

    def timed(fn, key):
        return _timed(fn, totals, key)

    for half in halves:
        runner, sched = half.runner, half.scheduler

        def launch(plan, _runner=runner, _launch=runner.launch):
            before = _runner.num_graph_steps
            began = timeline.event() if timeline else None     # (queued behind the GPU's earlier work)
            t = time.perf_counter()
            pending = _launch(plan)
            kind = "graph" if _runner.num_graph_steps > before else "eager"
            totals[f"launch {kind}"] += time.perf_counter() - t
            pending.result = timed(pending.result, "wait for GPU")
            if timeline:
                timeline.launches.append((kind, began, timeline.event()))
            return pending

        runner.launch = launch
        sched.schedule = timed(sched.schedule, "schedule")
        sched.on_step_done = timed(sched.on_step_done, "on_step_done")
        if detail:
            runner.sampler.sample_async = timed(runner.sampler.sample_async, "sample launch (in launch)")
            half._take_samples = timed(half._take_samples, "take samples (in loop rest)")
    return totals, timeline


class _GpuTimeline:
    """CUDA events around every launch (all on the one stream, in launch order) and every graph
    replay. An event runs when the GPU reaches it, so a launch's first event marks the end of the
    GPU's earlier work or, when the GPU had none, the launch's start: the time from the previous
    launch's last event to it is the GPU idle between steps, and a graph launch's span less its
    replay is the GPU idle while the CPU laid the step out."""

    def __init__(self, torch) -> None:
        self._torch = torch
        self.launches: list[tuple[str, Any, Any]] = []     # (kind, began, ended)
        self.replays: list[tuple[Any, Any]] = []

    def event(self) -> Any:
        e = self._torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def settle(self, totals: dict[str, float]) -> None:
        """(After a synchronize.) The GPU seconds per kind of step and of idle, into `totals`, and
        the idle's spread printed."""
        spans = [(kind, b.elapsed_time(e)) for kind, b, e in self.launches]
        replays = iter(b.elapsed_time(e) for b, e in self.replays)
        within = [span - next(replays) for kind, span in spans if kind == "graph"]
        between = [(prev[2].elapsed_time(cur[1]), prev[0]) for prev, cur in zip(self.launches, self.launches[1:])]
        for kind in ("graph", "eager"):
            totals[f"GPU of {kind} steps (in all)"] = sum(t for k, t in spans if k == kind) / 1000
        totals["GPU of graph replays (in all)"] = sum(b.elapsed_time(e) for b, e in self.replays) / 1000
        totals["GPU idle in graph launches (in all)"] = sum(within) / 1000
        totals["GPU idle between steps (in all)"] = sum(t for t, _ in between) / 1000
        big = sorted(between, reverse=True)
        print(f"GPU idle between steps: {sum(t > 2 for t, _ in between)} gaps over 2 ms hold "
              f"{sum(t for t, _ in between if t > 2) / 1000:.2f} s; largest (ms, after a step of kind): "
              + ", ".join(f"{t:.0f} {k}" for t, k in big[:8])
              + f". In graph launches: {sum(t > 2 for t in within)} over 2 ms hold "
              f"{sum(t for t in within if t > 2) / 1000:.2f} s of {sum(within) / 1000:.2f} s", flush=True)


def _timed(fn, totals: dict[str, float], key: str):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        totals[key] += time.perf_counter() - t
        return out
    return wrapper


def run_hf(folder: Path, w: Workload, prompts: list[list[int]], batch_size: int = 256) -> dict:
    """HF transformers static generate: bf16, sdpa, EOS ignored, first `batch_size` prompts, one batch."""
    import torch
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    batch = torch.tensor([p for p in prompts for _ in range(w.n)][:batch_size], device="cuda")   # n: repeated
    kw = dict(do_sample=w.temperature > 0, pad_token_id=0, eos_token_id=None)
    with torch.inference_mode():
        model.generate(batch[:8, :32], max_new_tokens=4, min_new_tokens=4, **kw)    # warm-up
        startup = time.perf_counter() - t0
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        out = model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=w.output_len,
                             min_new_tokens=w.output_len, **kw)
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    out_tokens = (out.shape[1] - batch.shape[1]) * batch.shape[0]
    return dict(engine="hf-transformers", wall_s=wall, out_tok_s=out_tokens / wall,
                total_tok_s=(out_tokens + batch.numel()) / wall, startup_s=startup,
                peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def print_row(name: str, w: Workload, row: dict) -> None:
    frac = row["out_tok_s"] / w.sequential_bound
    print(f"| {name} | {row['engine']} | {row['wall_s']:.1f} | {row['out_tok_s']:,.0f} | {row['total_tok_s']:,.0f} "
          f"| {frac:.2f} | {row['startup_s']:.1f} | {row['peak_gib']:.1f} GiB |", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True)
    ap.add_argument("--vs-hf", action="store_true")
    ap.add_argument("--max-seqs", type=int, default=2048)
    ap.add_argument("--max-tokens-per-step", type=int, default=16384)
    ap.add_argument("--kv-memory-fraction", type=float, default=0.85)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    ap.add_argument("--hydragen", choices=("auto", "on", "off"), default="auto",
                    help="Hydragen prefix groups (auto: EngineConfig's default, on)")
    ap.add_argument("--no-pipeline", action="store_true", help="one engine loop instead of two in turn")
    ap.add_argument("--decode-tensor-cores", choices=("auto", "on", "off"), default="auto",
                    help="flashinfer's tensor-core decode kernel (auto: the engine's default, on; off: the "
                         "CUDA-core kernel where it exists for the GQA group)")
    ap.add_argument("--hydragen-own-tensor-cores", choices=("auto", "on", "off", "as-decode"),
                    default="auto", help="the same choice for the own parts of Hydragen steps (auto: the "
                                         "engine's default, off; as-decode: as --decode-tensor-cores)")
    ap.add_argument("--flashinfer-builtin-max", action="store_true",
                    help="flashinfer's plan() with Python's max over host tensors, as shipped (the engine "
                         "installs a one-reduction max: flashinfer_plan_speedup.py)")
    ap.add_argument("--lines", choices=("n", "shuffled", "ordered"), default="n",
                    help="n: one request with n samples per problem; shuffled: n shuffled lines per problem, "
                         "fed in file order; ordered: the same lines through the batch runner's ordering")
    ap.add_argument("--profile", type=int, default=0, help="profile this many pure decode steps afterwards")
    ap.add_argument("--phase-detail", action="store_true",
                    help="also time parts of the phases (the grouped step's own-part layout and plans, the "
                         "graph replay call, the sampler's launch, the loop's handling of sampled tokens)")
    ap.add_argument("--cpu-profile", type=int, default=0, metavar="N",
                    help="run the timed part under cProfile and write its top N functions (by own and by "
                         "cumulative time) to --out-dir (the throughput then reads low)")
    ap.add_argument("--profile-batch", type=int, default=256, help="sequences (n samples each count)")
    ap.add_argument("--out-dir", default=os.environ.get("OUT", "."))
    ap.add_argument("--folder", help="reuse a model folder (skips the build)")
    ap.add_argument("--hf-only", action="store_true", help=argparse.SUPPRESS)   # the --vs-hf child
    args = ap.parse_args()
    w = workload(args.workload)
    vocab = ARCHS[w.model]["vocab_size"]
    prompts = prompts_of(w, vocab)
    if args.hf_only:
        print("HFROW " + json.dumps(run_hf(Path(args.folder), w, prompts)), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="tokabatch-bench-") as tmp:
        folder = Path(args.folder) if args.folder else Path(tmp) / w.model
        if not args.folder:
            t = time.perf_counter()
            build_folder(w.model, folder)
            print(f"built random {w.model} in {time.perf_counter() - t:.1f} s", flush=True)
        hf_row = None
        if args.vs_hf:   # first, in its own process, so the engine later sees all the free memory
            proc = subprocess.run([sys.executable, __file__, "--workload", args.workload, "--hf-only",
                                   "--folder", str(folder)], capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("HFROW ")]
            if proc.returncode or not lines:
                print(f"HF run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            else:
                hf_row = json.loads(lines[-1][6:])
        row = run_engine(folder, w, prompts, args)
    print(f"engine detail: {json.dumps(row)}")
    print("| workload | engine | wall s | output tok/s | total tok/s | frac. of seq. bound | start-up s | peak GPU mem |")
    print("|---|---|---|---|---|---|---|---|")
    print_row(args.workload, w, row)
    if hf_row:
        print_row(f"{args.workload} (first 256)", w, hf_row)
        print(f"ratio tokabatch / HF (output tok/s): {row['out_tok_s'] / hf_row['out_tok_s']:.1f}x")


if __name__ == "__main__":
    main()
