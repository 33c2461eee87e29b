"""Where a step's time goes: GPU time per kernel class against the step's wall time.

Used by scripts/bench.py --profile N: admits a batch, steps until every sequence is decoding,
times N plain steps, runs a cProfile of N more (the Python the CPU side spends its time in), then
profiles N more with torch.profiler (CPU + CUDA) and prints GPU time per kernel class (matmul,
attention, fused elementwise: norm, rotary, SwiGLU; index/KV append, elementwise, reductions/sampling,
copies) per step. GPU busy time well under the wall time means the step is bound by CPU work
(Python, scheduling, launches), not by the GPU. The full tables go to OUT/profile-<tag>.txt and
OUT/cprofile-<tag>.txt.

And by scripts/bench.py --profile-prefill N: the first N steps of a fresh batch (prompt chunks, and
the decode rows of prompts already read that ride along), with the same classes, each step's
tokens and the heaviest kernels; the batch is then aborted. The table goes to OUT/profile-<tag>.txt.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

CLASSES = (          # first match wins: flashinfer's norm, rotary and SwiGLU kernels are not attention
    ("fused elementwise", ("norm", "rotary", "act_and_mul", "activation")),
    ("attention", ("prefill", "decode", "flashinfer", "attention", "fmha")),
    ("matmul", ("gemm", "cutlass", "nvjet", "cublas", "matmul", "sm90_xmma", "splitk")),
    ("copies", ("memcpy", "memset")),
    ("index/KV append", ("index", "scatter", "gather", "embedding")),
    ("reduce/sampling", ("reduce", "softmax", "argmax", "sort", "topk", "cumsum", "scan", "multinomial")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "fill", "copy_kernel", "cat")),
)


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, keys in CLASSES:
        if any(k in low for k in keys):
            return cls
    return "other"


def gpu_kernels(prof: Any) -> list[tuple[float, int, str]]:
    """(GPU us, calls, name) of every kernel a torch.profiler run timed on the device."""
    kernels = []
    for evt in prof.key_averages():
        gpu_us = getattr(evt, "self_device_time_total", 0.0) or 0.0
        if gpu_us > 0 and str(evt.device_type).endswith("CUDA"):
            kernels.append((gpu_us, evt.count, evt.key))
    return kernels


def print_classes(kernels: list[tuple[float, int, str]], num_steps: int) -> None:
    """GPU ms per step of each kernel class, largest first."""
    per_class: dict[str, float] = defaultdict(float)
    for gpu_us, _, name in kernels:
        per_class[kernel_class(name)] += gpu_us
    for cls, us in sorted(per_class.items(), key=lambda kv: -kv[1]):
        print(f"  {cls:18s} {us / num_steps / 1e3:8.3f} ms/step")


def python_profile(loop: Any, num_steps: int, path: Path) -> None:
    """cProfile of `num_steps` steps: the Python functions the CPU side spends its time in (the
    top of the cumulative list printed, both lists written to `path`)."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(num_steps):
        loop.step()
    prof.disable()
    text = {}
    for key in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats(key).print_stats(40)
        text[key] = buf.getvalue()
    path.write_text(text["cumulative"] + "\n\n" + text["tottime"])
    print(f"cProfile of {num_steps} steps (by own time; full lists in {path.name}):")
    lines = [ln for ln in text["tottime"].splitlines() if ln.strip()[:1].isdigit()]
    print("\n".join(lines[1:16]))


def profile_decode_steps(loop: Any, prompts: list[list[int]], w: Any, num_steps: int, out_dir: str,
                         tag: str = "decode") -> None:
    """`tag` names the files written to `out_dir` (profile-TAG.txt, cprofile-TAG.txt)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tokabatch.engine.api import GenerationRequest, SamplingParams

    params = SamplingParams(max_tokens=64 + 3 * num_steps, temperature=w.temperature, ignore_eos=True)
    for i, ids in enumerate(prompts):
        loop.add(GenerationRequest(request_id=f"prof{i}", prompt_token_ids=tuple(ids), sampling=params, n=w.n))
    # Until a round of steps (one per pipelined half) is all decodes: one token per running sequence.
    per_round = len(getattr(loop, "halves", [loop]))
    deltas: deque[int] = deque(maxlen=per_round)
    for _ in range(10_000):
        before = loop.stats().num_forward_tokens
        loop.step()
        s = loop.stats()
        deltas.append(s.num_forward_tokens - before)
        if s.num_waiting == 0 and len(deltas) == per_round and sum(deltas) == s.num_running > 0:
            break
    else:
        raise RuntimeError("profile: the batch never reached a pure decode round")
    batch = loop.stats().num_running
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(num_steps):
        loop.step()
    torch.cuda.synchronize()
    plain_ms = (time.perf_counter() - t) / num_steps * 1e3
    python_profile(loop, num_steps, Path(out_dir, f"cprofile-{tag}.txt"))
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            loop.step()
        torch.cuda.synchronize()
    kernels = gpu_kernels(prof)
    if loop.stats().num_running < batch:
        raise RuntimeError("profile: sequences finished during the profiled steps; raise max_tokens")
    gpu_ms = sum(us for us, _, _ in kernels) / num_steps / 1e3
    print(f"profile: {num_steps} decode steps at batch {batch} (context ~{w.prompt_len}+): wall "
          f"{plain_ms:.2f} ms/step unprofiled; GPU busy {gpu_ms:.2f} ms/step ({gpu_ms / plain_ms:.0%})")
    print_classes(kernels, num_steps)
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=40)
    cpu_table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    Path(out_dir, f"profile-{tag}.txt").write_text(table + "\n\n" + cpu_table)


def profile_prefill_steps(loop: Any, prompts: list[list[int]], w: Any, num_steps: int, out_dir: str,
                          tag: str = "prefill") -> None:
    """Kernel profile of the first `num_steps` steps of `prompts` (none of them cached: fresh ids)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tokabatch.engine.api import GenerationRequest, SamplingParams

    cuda = torch.cuda.is_available()        # on a CPU the steps run and no kernel is timed
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    params = SamplingParams(max_tokens=w.output_len, temperature=w.temperature, ignore_eos=True)
    ids = [f"prefill{i}" for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        loop.add(GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), sampling=params, n=w.n))
    sync()
    tokens = []
    t = time.perf_counter()
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(num_steps):
            before = loop.stats().num_forward_tokens
            loop.step()
            tokens.append(loop.stats().num_forward_tokens - before)
        sync()
    wall_ms = (time.perf_counter() - t) / num_steps * 1e3
    for rid in ids:
        loop.abort(rid)
    while loop.has_work():
        loop.step()
    kernels = gpu_kernels(prof)
    gpu_ms = sum(us for us, _, _ in kernels) / num_steps / 1e3
    print(f"prefill profile: {num_steps} steps, forward tokens per step as their results came back {tokens}; GPU busy "
          f"{gpu_ms:.2f} ms/step, wall {wall_ms:.2f} ms/step under the profiler")
    print_classes(kernels, num_steps)
    print("  heaviest kernels (ms/step, calls):")
    for us, count, name in sorted(kernels, reverse=True)[:12]:
        print(f"    {us / num_steps / 1e3:8.3f} {count:6d}  {name[:110]}")
    table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=60)
    Path(out_dir, f"profile-{tag}.txt").write_text(table)
