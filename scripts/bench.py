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
`--profile N` afterwards profiles N pure-decode steps (GPU time per kernel class against wall time),
`--profile-prefill N` the first N steps of a fresh batch of the workload's prompts.
`--via engine,batch,batch-lines,online` adds rows for the same workload through `tokabatch serve`
(bench_service.py: its batch API, a line per prompt or per sample, and the online endpoint) and
their ratios to the in-process engine; `--engine simulated` runs all of it on a CPU over
engine/simulated.py's modeled GPU (a ratio to watch, not a speed to quote).

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from bench_phases import time_phases, untime_phases  # noqa: E402  (scripts/, beside this file)

from tokabatch.engine.random_models import ARCHS, build_folder  # noqa: E402

DEMO = "demo"                    # the demo model (tokabatch models fetch), for the CPU rows
DEMO_VOCAB = 49152

@dataclass(frozen=True)
class Workload:
    model: str
    num_prompts: int
    prompt_len: int
    output_len: int
    temperature: float
    sequential_bound: float          # output tok/s, performance.md "Limits" (0: none)
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
    # The CPU with the demo model (SmolLM2-135M, float32): TA's and TB's shapes made small, so the
    # service's overhead against the engine can be watched without a GPU. No bound.
    "TA-cpu": Workload(DEMO, 32, 128, 32, 0.0, 0),
    "TB-cpu": Workload(DEMO, 4, 320, 32, 1.0, 0, n=16),
}
WARM_UP_PROMPTS = 32
PREFILL_PROFILE_SEED = 777         # --profile-prefill: prompts the timed run did not leave in the prefix cache
# Structured outputs: one 8-field JSON schema on every prompt, outputs up to 256 tokens, against the same
# engine unconstrained on the same output lengths (benchmarks/structured.py; needs --tokenizer-from).
JSON_WORKLOAD = Workload("Llama-3.2-1B", 1024, 128, 256, 1.0, 0)
SIMULATED = "tokabatch.engine.simulated:build_simulated_loop"
VIAS = ("engine", "batch", "batch-lines", "online")


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


def run_engine(folder: Path, runs: list[tuple[str, Workload, list[list[int]]]], args: argparse.Namespace) -> dict:
    """The workloads in this process, one after the other on one engine loop; {name: row}."""
    bench = _EngineBench(folder, args)
    # Warm-up: compiles the attention kernels and touches a full-size step; different prompts so the
    # prefix cache does not shorten the timed run.
    rng = random.Random(12345)
    w0 = runs[0][1]
    warm = [[rng.randrange(bench.loop.info.vocab_size) for _ in range(w0.prompt_len)] for _ in range(WARM_UP_PROMPTS)]
    bench.drain(warm, "warm", bench.params(4, w0.temperature))
    startup = time.perf_counter() - bench.began
    rows = {}
    for name, w, prompts in runs:
        rows[name] = {**bench.measure(name, w, prompts), "startup_s": startup}
        if args.profile:
            from bench_profile import profile_decode_steps  # noqa: PLC0415 (scripts/ sibling)
            profile_decode_steps(bench.loop, prompts[:max(1, args.profile_batch // w.n)], w, args.profile,
                                 args.out_dir, tag=f"{name}-hydragen-{args.hydragen}")
        if args.profile_prefill:
            from bench_profile import profile_prefill_steps  # noqa: PLC0415 (scripts/ sibling)
            fresh = prompts_of(w, bench.loop.info.vocab_size, seed=PREFILL_PROFILE_SEED)
            profile_prefill_steps(bench.loop, fresh, w, args.profile_prefill, args.out_dir, tag=f"{name}-prefill")
    return rows


class _EngineBench:
    """One engine loop in this process (real or simulated), and the timed runs on it."""

    def __init__(self, folder: Path, args: argparse.Namespace) -> None:
        from tokabatch.config import EngineConfig, ModelConfig, SchedulerConfig

        self.args = args
        self.torch = None
        if args.engine == "simulated":
            from tokabatch.engine.simulated import build_simulated_loop as build_loop
        else:
            import torch

            from tokabatch.engine.runtime.factory import build_loop
            self.torch = torch if torch.cuda.is_available() else None
        self.began = time.perf_counter()
        config = EngineConfig(
            model=ModelConfig(path=str(folder)),
            scheduler=SchedulerConfig(max_seqs=args.max_seqs, max_tokens_per_step=args.max_tokens_per_step,
                                      **({} if args.page_size is None else {"page_size": args.page_size})),
            enable_cuda_graphs=not args.no_cuda_graphs,
            enable_hydragen={"auto": None, "on": True, "off": False}[args.hydragen], pipelined=not args.no_pipeline,
            fused_kernels=args.fused_kernels == "on",
            **({"kv_memory_fraction": args.kv_memory_fraction} if args.kv_memory_fraction else {}))
        real = {} if args.engine == "simulated" else {"attention": _attention_config(args)}
        self.loop = loop = build_loop(config, **real)
        info, graphs = loop.info, loop.runner.graphs
        print(f"engine: {info.num_pages} pages x {info.page_size} = {info.num_pages * info.page_size} KV tokens, "
              f"max_seqs {info.max_seqs}, backend {loop.runner.backend.name}, "
              f"layer kernels {getattr(getattr(getattr(loop.runner, 'model', None), 'kernels', None), 'name', '-')}, "
              f"{'two pipelined halves' if hasattr(loop, 'halves') else 'one loop'}, CUDA graphs "
              f"{f'up to {graphs.max_batch} ({len(graphs.sizes)} sizes)' if graphs else 'off'}, "
              f"built in {time.perf_counter() - self.began:.1f} s", flush=True)

    @staticmethod
    def params(max_tokens: int, temperature: float) -> Any:
        from tokabatch.engine.api import SamplingParams

        return SamplingParams(max_tokens=max_tokens, temperature=temperature, ignore_eos=True)

    def drain(self, batch: list[list[int]], tag: str, params: Any, n: int = 1) -> tuple[int, int, float]:
        """Add every prompt, step until all are done: (prompt tokens, output tokens, first done s)."""
        from tokabatch.engine.api import GenerationOutput, GenerationRequest

        began = time.perf_counter()
        for i, ids in enumerate(batch):
            self.loop.add(GenerationRequest(request_id=f"{tag}{i}", prompt_token_ids=tuple(ids), sampling=params, n=n))
        done = out_tokens = in_tokens = 0
        first_s = 0.0
        while done < len(batch):
            for item in self.loop.step():
                if isinstance(item, GenerationOutput):
                    if not item.ok:
                        raise RuntimeError(f"request {item.request_id} failed: {item.error}")
                    first_s = first_s or time.perf_counter() - began
                    done += 1
                    out_tokens += item.num_completion_tokens
                    in_tokens += item.num_prompt_tokens
        if self.torch is not None:
            self.torch.cuda.synchronize()
        return in_tokens, out_tokens, first_s

    def measure(self, name: str, w: Workload, prompts: list[list[int]]) -> dict:
        """One timed run of a workload: its row (without start-up), phases printed."""
        args, loop = self.args, self.loop
        if self.torch is not None:
            self.torch.cuda.reset_peak_memory_stats()
        allocator0 = self.allocator_counts()
        timers, timeline = time_phases(loop, detail=args.phase_detail)
        stats0 = loop.stats()
        profiler = cProfile.Profile() if args.cpu_profile else None
        cpu0, start = time.process_time(), time.perf_counter()
        if profiler is not None:
            profiler.enable()
        params = self.params(w.output_len, w.temperature)
        in_tokens, out_tokens, first_s = self.drain(prompts, f"{name}-", params, n=w.n)
        wall, cpu_s = time.perf_counter() - start, time.process_time() - cpu0
        if profiler is not None:
            profiler.disable()
            _write_cpu_profile(profiler, args, name)
        untime_phases(loop)
        _print_phases(name, timers, timeline, wall)
        stats = loop.stats()
        runners = getattr(loop, "runners", [loop.runner])
        allocator = {k: v - allocator0[k] for k, v in self.allocator_counts().items()}
        saved = stats.num_hydragen_saved_kv_reads - stats0.num_hydragen_saved_kv_reads
        reads = stats.num_decode_kv_reads - stats0.num_decode_kv_reads
        return dict(engine="tokabatch", wall_s=wall, out_tok_s=out_tokens / wall, out_tokens=out_tokens,
                    total_tok_s=(in_tokens + out_tokens) / wall, first_s=first_s, engine_cpu_s=cpu_s,
                    peak_gib=self.torch.cuda.max_memory_allocated() / 2**30 if self.torch is not None else 0.0,
                    steps=stats.num_steps - stats0.num_steps,
                    forward_tokens=stats.num_forward_tokens - stats0.num_forward_tokens,
                    cached_tokens=stats.num_cached_tokens - stats0.num_cached_tokens,
                    graph_steps=sum(r.num_graph_steps for r in runners),
                    eager_steps=sum(r.num_eager_steps for r in runners),
                    hydragen_sharing=round(saved / max(1, reads), 3), allocator=allocator)

    def allocator_counts(self) -> dict[str, int]:
        """torch's CUDA caching allocator: retries after freeing its cache, cudaMalloc and cudaFree
        calls. A cudaFree waits for the whole device, so any during a run are steps that waited."""
        if self.torch is None:
            return {}
        stats = self.torch.cuda.memory_stats()
        return {k: int(stats.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def _print_phases(name: str, timers: dict[str, float], timeline: Any, wall: float) -> None:
    phases = {k: v for k, v in timers.items() if "(in " not in k}
    print(f"{name} phases (s): " + ", ".join(f"{k} {v:.2f}" for k, v in phases.items())
          + f"; loop rest {wall - sum(phases.values()):.2f}", flush=True)
    if timeline is not None:
        timeline.settle(timers)               # (after drain's synchronize: every event is done)
        print("detail (s): " + ", ".join(f"{k} {v:.2f}" for k, v in timers.items() if "(in " in k), flush=True)


def _attention_config(args: argparse.Namespace) -> Any:
    """The attention kernels of --decode-tensor-cores, --hydragen-own-tensor-cores, --hydragen-group-kernel,
    --hydragen-fold-heads and --flashinfer-builtin-max (attention.AttentionConfig;
    "auto" keeps its default)."""
    from tokabatch.engine.runtime.attention import AttentionConfig

    choice = {"on": True, "off": False, "as-decode": None}
    switches = {"decode_tensor_cores": args.decode_tensor_cores, "own_tensor_cores": args.hydragen_own_tensor_cores,
                "fold_group_heads": args.hydragen_fold_heads}
    return AttentionConfig(fast_planning=not args.flashinfer_builtin_max, group_kernel=args.hydragen_group_kernel,
                           **{field: choice[flag] for field, flag in switches.items() if flag != "auto"})


def _write_cpu_profile(profiler: cProfile.Profile, args: argparse.Namespace, name: str) -> None:
    report = io.StringIO()
    by = pstats.Stats(profiler, stream=report)
    by.sort_stats("tottime").print_stats(args.cpu_profile)
    by.sort_stats("cumulative").print_stats(args.cpu_profile)
    path = Path(args.out_dir) / f"cpu-profile-{name}-hydragen-{args.hydragen}.txt"
    path.write_text(report.getvalue())
    print(f"cpu profile (the timed run, under cProfile: slower than without): {path}", flush=True)


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


def run_service(folder: Path, runs: list[tuple[str, Workload, list[list[int]]]], vias: list[str],
                args: argparse.Namespace, tmp: Path) -> dict:
    """The service rows (bench_service.py): one `tokabatch serve` for every workload and way in."""
    from bench_service import ServiceRun, service_rows  # noqa: PLC0415 (scripts/ sibling)

    flags = [f for flag, value in (("--max-seqs", args.max_seqs), ("--max-tokens-per-step", args.max_tokens_per_step),
                                   ("--kv-memory-fraction", args.kv_memory_fraction),
                                   ("--data-parallel", args.data_parallel), ("--shard-lines", args.shard_lines),
                                   ("--engine-factory", SIMULATED if args.engine == "simulated" else None))
             if value is not None for f in (flag, str(value))]
    model = runs[0][1].model
    vocab = DEMO_VOCAB if model == DEMO else ARCHS[model]["vocab_size"]
    # Each way in gets prompts of its own (seeds from 101) that the prefix cache has not seen.
    todo = [ServiceRun(name, via, w.output_len, w.temperature, w.n, lambda seed, w=w: prompts_of(w, vocab, seed))
            for name, w, _ in runs for via in vias if via != "engine" and not (via == "batch-lines" and w.n == 1)]
    warm_rng = random.Random(12345)
    warm = [[warm_rng.randrange(vocab) for _ in range(runs[0][1].prompt_len)] for _ in range(WARM_UP_PROMPTS)]
    return service_rows(folder, todo, warm, flags, Path(args.out_dir), tmp, py_spy=args.py_spy)


def print_table(runs: list[tuple[str, Workload, list[list[int]]]], rows: dict, vias: list[str]) -> None:
    """One row per workload and way in, the service's as a fraction of the engine's row."""
    print("| workload | path | wall s | output tok/s | of engine | frac. of seq. bound | first done s "
          "| engine busy | server CPU s | engine CPU s | Hydragen saved | start-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, w, _ in runs:
        base = rows.get((name, "engine"))
        for via in vias:
            row = rows.get((name, via))
            if row is None:
                continue
            ratio = f"{row['out_tok_s'] / base['out_tok_s']:.2f}" if base else "-"
            frac = f"{row['out_tok_s'] / w.sequential_bound:.2f}" if w.sequential_bound else "-"
            busy = f"{row['engine_busy']:.2f}" if "engine_busy" in row else "-"
            first = f"{row['first_s']:.2f}" if row.get("first_s") is not None else "-"
            print(f"| {name} | {row['engine']} | {row['wall_s']:.1f} | {row['out_tok_s']:,.0f} | {ratio} | {frac} "
                  f"| {first} | {busy} | {row.get('server_cpu_s', 0.0):.1f} | {row['engine_cpu_s']:.1f} "
                  f"| {row.get('hydragen_sharing', 0.0):.2f} | {row['startup_s']:.1f} |", flush=True)


def print_row(name: str, w: Workload, row: dict) -> None:
    frac = f"{row['out_tok_s'] / w.sequential_bound:.2f}" if w.sequential_bound else "-"
    print(f"| {name} | {row['engine']} | {row['wall_s']:.1f} | {row['out_tok_s']:,.0f} | {row['total_tok_s']:,.0f} "
          f"| {frac} | {row['startup_s']:.1f} | {row['peak_gib']:.1f} GiB |", flush=True)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", required=True, help="a workload, or several of one model: TA,TB; or JSON "
                                                      "(a schema's cost per token, with --tokenizer-from)")
    ap.add_argument("--tokenizer-from", type=Path, help="JSON: a byte-level tokenizer's folder (the demo model's) "
                                                         "for the random model (the grammar needs real tokens)")
    ap.add_argument("--via", default="engine",
                    help=f"comma-separated ways in, of {', '.join(VIAS)}: engine (in this process), batch (the "
                         "batch API of `tokabatch serve`, a line per prompt), batch-lines (each sample its own "
                         "line, shuffled), online (concurrent /v1/completions); the service ones share one server")
    ap.add_argument("--engine", choices=("real", "simulated"), default="real",
                    help="simulated: the real schedulers and loops over a modeled H200 (engine/simulated.py), "
                         "for the service rows on a CPU")
    ap.add_argument("--vs-hf", action="store_true")
    ap.add_argument("--py-spy", metavar="PATH", help="sample the server and engine processes with this py-spy "
                                                     "during the service rows (collapsed stacks into --out-dir)")
    ap.add_argument("--max-seqs", type=int, help="default: the engine's for the device (config.DEVICE_STEP_SIZES, or "
                    "LARGE_STEP_SIZES on a GPU with the memory for them: factory.step_memory_bytes)")
    ap.add_argument("--page-size", type=_positive_int, help="KV cache tokens per page (default: the engine's)")
    ap.add_argument("--max-tokens-per-step", type=int, help="default: the engine's for the device")
    ap.add_argument("--kv-memory-fraction", type=float, help="default: the engine's (EngineConfig)")
    ap.add_argument("--data-parallel", type=int, help="the service rows: engine processes under the one server "
                                                       "(they share the device and split its KV memory)")
    ap.add_argument("--shard-lines", type=int, help="the service rows: cut batches into shards of this many "
                    "lines (run one after another by the one server: what a shard boundary costs)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="run every step eagerly")
    ap.add_argument("--hydragen", choices=("auto", "on", "off"), default="auto",
                    help="Hydragen prefix groups (auto: EngineConfig's default, on)")
    ap.add_argument("--no-pipeline", action="store_true", help="one engine loop instead of two in turn")
    ap.add_argument("--fused-kernels", choices=("on", "off"), default="on",
                    help="flashinfer's fused rotary, residual + RMSNorm, SwiGLU and sampler draw (off: torch's)")
    ap.add_argument("--decode-tensor-cores", choices=("auto", "on", "off"), default="auto",
                    help="flashinfer's tensor-core decode kernel (auto: the engine's default, on; off: the "
                         "CUDA-core kernel where it exists for the GQA group)")
    ap.add_argument("--hydragen-own-tensor-cores", choices=("auto", "on", "off", "as-decode"),
                    default="auto", help="the same choice for the own parts of Hydragen steps (auto: the "
                                         "engine's default, off; as-decode: as --decode-tensor-cores)")
    ap.add_argument("--hydragen-group-kernel", choices=("auto", "fa2", "fa3"), default="auto",
                    help="flashinfer's prefill backend for Hydragen's shared-prefix parts")
    ap.add_argument("--hydragen-fold-heads", choices=("auto", "on", "off"), default="auto",
                    help="the shared-prefix parts' GQA query heads folded into query rows (auto: the engine's default)")
    ap.add_argument("--flashinfer-builtin-max", action="store_true",
                    help="flashinfer's decode plan() with Python's max over host tensors, as shipped (the "
                         "engine installs a one-reduction max: flashinfer_ops.speed_up_planning)")
    ap.add_argument("--profile", type=_positive_int, default=0, help="profile this many pure decode steps afterwards")
    ap.add_argument("--profile-prefill", type=_positive_int, default=0, metavar="N",
                    help="afterwards, profile the first N steps of the workload's prompts with fresh ids (prompt "
                         "chunks, and the decode rows that ride along), then abort them")
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
    if args.engine == "simulated" and (args.phase_detail or args.profile or args.profile_prefill):
        ap.error("--phase-detail, --profile and --profile-prefill time the real engine's CUDA steps: not with "
                 "--engine simulated")
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    return args


def _model_folder(model: str, args: argparse.Namespace, tmp: Path) -> Path:
    """--folder, the demo model's folder, or a random-weight folder built now (no weights when simulated)."""
    if args.folder or model == DEMO:
        from tokabatch.model_store import resolve_model_path

        return Path(args.folder) if args.folder else resolve_model_path(DEMO)
    folder = tmp / model
    t = time.perf_counter()
    build_folder(model, folder, weights=args.engine == "real")
    print(f"built random {model} in {time.perf_counter() - t:.1f} s", flush=True)
    return folder


def _hf_row(folder: Path, name: str) -> dict | None:
    """HF transformers' row, run in its own process so the engine later sees all the free memory."""
    proc = subprocess.run([sys.executable, __file__, "--workload", name, "--hf-only", "--folder", str(folder)],
                          capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("HFROW ")]
    if proc.returncode or not lines:
        print(f"HF run failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
        return None
    return json.loads(lines[-1][6:])


def main() -> None:
    args = _arguments()
    names = args.workload.split(",")
    if names[0].removesuffix("-quick") == "JSON":
        return _json_row(names[0], args)
    vias = args.via.split(",")
    if not set(vias) <= set(VIAS):
        raise SystemExit(f"--via takes {', '.join(VIAS)}, not {args.via!r}")
    loads = [workload(name) for name in names]
    if len({w.model for w in loads}) != 1:
        raise SystemExit("the workloads of one call must share a model")
    model = loads[0].model
    vocab = DEMO_VOCAB if model == DEMO else ARCHS[model]["vocab_size"]
    # Each workload's prompts of its own (seed 0, 1, ...): one engine runs them all, and a later
    # workload must not find an earlier one's prompts in the prefix cache.
    runs = [(name, w, prompts_of(w, vocab, seed)) for seed, (name, w) in enumerate(zip(names, loads))]
    if args.hf_only:
        print("HFROW " + json.dumps(run_hf(Path(args.folder), loads[0], runs[0][2])), flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="tokabatch-bench-") as tmp:
        folder = _model_folder(model, args, Path(tmp))
        hf_row = _hf_row(folder, names[0]) if args.vs_hf else None
        rows: dict = {}
        if set(vias) - {"engine"}:       # first: the server's engine must see all the free memory
            rows.update(run_service(folder, runs, vias, args, Path(tmp)))
        if "engine" in vias:
            rows.update({(name, "engine"): row for name, row in run_engine(folder, runs, args).items()})
    for (name, via), row in rows.items():
        if via == "engine":
            print(f"{name} engine detail: {json.dumps(row)}")
    if set(vias) != {"engine"}:
        print_table(runs, rows, ["engine", *[v for v in VIAS if v in vias and v != "engine"]])
    else:
        _print_engine_rows(runs, rows, hf_row)


def _json_row(name: str, args: argparse.Namespace) -> None:
    """A schema's cost per output token on the engine in this process (benchmarks/structured.py)."""
    if args.tokenizer_from is None and not args.folder:
        raise SystemExit("--workload JSON needs --tokenizer-from: a byte-level tokenizer's folder (JSON punctuation "
                         "must be tokens; the random models' t0..tN vocabulary has none), or a --folder that has one")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))     # benchmarks/ is beside scripts/
    from benchmarks.structured import adopt_tokenizer, measure  # noqa: PLC0415 (imports the engine)

    w = JSON_WORKLOAD if name == "JSON" else replace(JSON_WORKLOAD, num_prompts=JSON_WORKLOAD.num_prompts // 4)
    with tempfile.TemporaryDirectory(prefix="tokabatch-bench-") as tmp:
        folder = _model_folder(w.model, args, Path(tmp))
        if not args.folder:
            adopt_tokenizer(folder, args.tokenizer_from)
        row = measure(str(folder), w.num_prompts, w.output_len, w.prompt_len)
    print(f"{name} detail: {json.dumps(row)}")
    print("| workload | output tokens | constrained s | unconstrained s | constrained / unconstrained per token "
          "| mask ms per step |")
    print("|---|---|---|---|---|---|")
    print(f"| {name} | {row['output_tokens']} | {row['constrained_s']} | {row['unconstrained_s']} "
          f"| {row['ratio_per_token']:.3f} | {row['mask_ms_per_step']} |")


def _print_engine_rows(runs: list[tuple[str, Workload, list[list[int]]]], rows: dict, hf_row: dict | None) -> None:
    print("| workload | engine | wall s | output tok/s | total tok/s | frac. of seq. bound | start-up s "
          "| peak GPU mem |")
    print("|---|---|---|---|---|---|---|---|")
    for name, w, _ in runs:
        print_row(name, w, rows[(name, "engine")])
    if hf_row:
        name, w, _ = runs[0]
        print_row(f"{name} (first 256)", w, hf_row)
        print(f"ratio tokabatch / HF (output tok/s): {rows[(name, 'engine')]['out_tok_s'] / hf_row['out_tok_s']:.1f}x")


if __name__ == "__main__":
    main()
