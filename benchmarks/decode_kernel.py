"""flashinfer's decode kernels on one paged KV cache: the CUDA-core kernel, the tensor-core variant
(`use_tensor_cores=True`, a prefill-style kernel that serves a whole GQA group per tile), and on
SM90 and later TensorRT-LLM's XQA kernel as flashinfer ships it (`xqa_batch_decode_with_kv_cache`:
no plan, a dense page table per row; measured against the engine's kernel in docs/benchmarks.md, stop 46).

On the GPU machine (after the wheel prelude of ../shared/gpu/README.md):

    python3 -m benchmarks.decode_kernel                   # Llama-3.2-1B and -3.1-8B shapes
    python3 -m benchmarks.decode_kernel --shapes 32/8/128 --batch 256 --context 1100

For each shape (query heads / KV heads / head dim) it plans one decode over `batch` sequences of
`context` tokens in 16-token pages (pages shuffled, as a running engine's are), times `iters` runs
of one layer with CUDA events, and prints ms per layer and the KV read rate (K and V of every
context token, bf16), and each kernel's output against the first one's. The first use of a kernel
compiles it (minutes, once per machine).
"""

from __future__ import annotations

import argparse
import functools

XQA_WORKSPACE_BYTES = 256 << 20      # 8 MiB of semaphores, then scratch for its multi-block mode


def bench_shape(heads: int, kv_heads: int, dim: int, batch: int, context: int, iters: int) -> None:
    import flashinfer
    import torch

    from tokabatch.engine.runtime.attention import CUDA_CORE_DECODE_GROUP_SIZES
    from tokabatch.engine.runtime.graph_sizes import MIN_WORKSPACE_BYTES as WORKSPACE_BYTES

    ps = 16
    dev = torch.device("cuda")
    pages_per_seq = -(-context // ps)
    num_pages = batch * pages_per_seq
    k = torch.randn(num_pages, ps, kv_heads, dim, dtype=torch.bfloat16, device=dev)
    v = torch.randn_like(k)
    perm = torch.randperm(num_pages, device="cpu").to(torch.int32)
    indptr = torch.arange(0, num_pages + 1, pages_per_seq, dtype=torch.int32)
    last = torch.full((batch,), context - (pages_per_seq - 1) * ps, dtype=torch.int32)
    q = torch.randn(batch, heads, dim, dtype=torch.bfloat16, device=dev)
    workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=dev)
    kv_bytes = 2 * batch * context * kv_heads * dim * 2
    kernels = {}
    for tensor_cores in (False, True):
        if not tensor_cores and heads // kv_heads not in CUDA_CORE_DECODE_GROUP_SIZES:
            continue
        w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tensor_cores)
        w.plan(indptr, perm.to(dev), last, heads, kv_heads, dim, ps, pos_encoding_mode="NONE",
               q_data_type=torch.bfloat16, kv_data_type=torch.bfloat16)
        kernels["tensor cores" if tensor_cores else "CUDA cores"] = functools.partial(w.run, q, (k, v))
    if torch.cuda.get_device_capability(dev)[0] >= 9:
        kernels["XQA"] = _xqa_run(q, k, v, perm.to(dev).view(batch, pages_per_seq), context)
    reference = None
    for name, run in kernels.items():
        try:
            for _ in range(3):
                out = run()
        except (RuntimeError, ValueError, AssertionError) as exc:    # e.g. a GQA group XQA was not built for
            print(f"| {heads}/{kv_heads}/{dim} | {batch} x {context} | {name} | failed: {exc} | |", flush=True)
            continue
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            run()
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / iters
        print(f"| {heads}/{kv_heads}/{dim} | {batch} x {context} | {name} | {ms:.3f} | {kv_bytes / ms / 1e9:.2f} |",
              flush=True)
        if reference is None:
            reference = (name, out.float())
        else:
            diff = (out.float() - reference[1]).norm() / reference[1].norm()
            print(f"  relative difference of {name} to {reference[0]}: {diff.item():.1e}", flush=True)


def _xqa_run(q, k, v, block_tables, context: int):
    """XQA over the same pages: its table is [batch, pages per sequence] (int32), its lengths uint32,
    and its workspace (semaphores first) must start zeroed."""
    import torch
    from flashinfer.decode import xqa_batch_decode_with_kv_cache

    seq_lens = torch.full((q.shape[0],), context, dtype=torch.int32, device=q.device).to(torch.uint32)
    workspace = torch.zeros(XQA_WORKSPACE_BYTES, dtype=torch.uint8, device=q.device)
    out = torch.empty_like(q)
    return functools.partial(xqa_batch_decode_with_kv_cache, q, (k, v), workspace, block_tables, seq_lens,
                             context, bmm1_scale=q.shape[-1] ** -0.5, out=out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["32/8/64", "32/8/128"],
                    help="query heads/KV heads/head dim (Llama-3.2-1B: 32/8/64, Llama-3.1-8B: 32/8/128)")
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--context", type=int, default=1100)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    print("| shape (heads/kv/dim) | batch x context | kernel | ms per layer | KV read TB/s |")
    print("|---|---|---|---|---|")
    for shape in args.shapes:
        heads, kv_heads, dim = (int(x) for x in shape.split("/"))
        bench_shape(heads, kv_heads, dim, args.batch, args.context, args.iters)


if __name__ == "__main__":
    main()
