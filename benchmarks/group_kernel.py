"""Hydragen's shared-prefix (group) attention call, timed per flashinfer kernel and KV layout.

TB's grouped half-step attends each group's queries (n samples x the GQA group's heads) to the
group's shared prompt with one non-causal paged prefill call, which TB's kernel profile puts far
below the card's tensor-core rate (docs/benchmarks.md, "Where TB's time goes now"). This times the
same call, as the engine makes it and as it could be made instead:

- paged, FA3 and FA2 (FA2 may split a long KV over more thread blocks; `--hydragen-group-kernel`
  picks it in scripts/bench.py), at page sizes 16 (the engine's) to 128;
- paged, as the grouped CUDA graphs run it: a cuda-graph wrapper planned first at its largest, then
  with the step's groups and the padding groups of one scratch page (hydragen_graphs.py);
- FA2 with a fixed KV split, and FA3 with the KV cut by hand into parts merged by merge_states;
- paged with the GQA query heads of each KV head folded into the query rows (full query tiles);
- ragged: each group's KV contiguous (what a copy of the shared prefix per group would allow;
  flashinfer's SM90 ragged kernel loads K/V tiles with TMA, the paged one gathers them per thread).

On the GPU machine (after the wheel prelude of ../shared/gpu/README.md):

    python3 -m benchmarks.group_kernel                      # TB: 16 groups x 64 samples, 1,024-token prompt
    python3 -m benchmarks.group_kernel --groups 32 --queries 32 --prefix 2048

Every variant is checked against the first (max abs difference of the outputs) and timed over
`iters` calls replayed from one CUDA graph, so launch overhead is left out as the engine's graphs
leave it out. The first use of a kernel compiles it (minutes, once per machine).
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Callable


class Bench:
    """One shape's inputs, the reference output, and the rows printed."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.torch = torch
        self.args = args
        self.dev = torch.device("cuda")
        self.dt = torch.bfloat16
        g, ql, kvl = args.groups, args.queries, args.prefix
        self.heads, self.kv_heads, self.dim = args.heads, args.kv_heads, args.head_dim
        self.workspace = torch.empty(256 << 20, dtype=torch.uint8, device=self.dev)
        gen = torch.Generator(device=self.dev).manual_seed(0)
        self.q = torch.randn(g * ql, self.heads, self.dim, dtype=self.dt, device=self.dev, generator=gen)
        # Every group's KV, contiguous (ragged); `paged` scatters the same tokens into a page pool.
        self.k = torch.randn(g * kvl, self.kv_heads, self.dim, dtype=self.dt, device=self.dev, generator=gen)
        self.v = torch.randn_like(self.k)
        self.qo_indptr = torch.arange(g + 1, dtype=torch.int32) * ql
        self.flops = 4 * g * ql * self.heads * kvl * self.dim
        self.reference: Any = None

    def paged(self, page_size: int) -> tuple[Any, Any, Any, Any, Any]:
        """(k pages, v pages, page ids on the device, page indptr, last page lengths): each group's
        tokens in `prefix // page_size` pages at random places of a pool of `--pool-tokens`."""
        torch, a = self.torch, self.args
        num_pages = a.pool_tokens // page_size
        per_group = a.prefix // page_size
        k = torch.zeros(num_pages, page_size, self.kv_heads, self.dim, dtype=self.dt, device=self.dev)
        v = torch.zeros_like(k)
        ids = torch.randperm(num_pages)[:a.groups * per_group].to(torch.int32)
        k[ids.long().to(self.dev)] = self.k.view(-1, page_size, self.kv_heads, self.dim)
        v[ids.long().to(self.dev)] = self.v.view(-1, page_size, self.kv_heads, self.dim)
        indptr = torch.arange(a.groups + 1, dtype=torch.int32) * per_group
        last = torch.full((a.groups,), page_size, dtype=torch.int32)
        return k, v, ids.to(self.dev), indptr, last

    def plan_args(self, page_size: int | None = None) -> dict[str, Any]:
        extra = {} if page_size is None else {"page_size": page_size}
        return dict(num_qo_heads=self.heads, num_kv_heads=self.kv_heads, head_dim_qk=self.dim, causal=False,
                    q_data_type=self.dt, kv_data_type=self.dt, **extra)

    def report(self, name: str, make: Callable[[], Callable[[], Any]]) -> None:
        """Build a variant (`make` returns its call, which returns (out, lse)), check and time it."""
        try:
            call = make()
            out, lse = (t[:self.q.shape[0]].float() for t in call())
            if self.reference is None:
                self.reference = out, lse
            err = max((out - self.reference[0]).abs().max().item(), (lse - self.reference[1]).abs().max().item())
            us = self.time(call)
        except Exception as exc:            # (a kernel this flashinfer or card lacks: the rest still run)
            print(f"| {name} | failed: {type(exc).__name__}: {str(exc)[:160]} | | |", flush=True)
            return
        print(f"| {name} | {us:.1f} | {self.flops / us / 1e6:.0f} | {err:.2g} |", flush=True)

    def time(self, call: Callable[[], Any]) -> float:
        """Microseconds per call, `iters` calls replayed from CUDA graphs of 10 calls each."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(10):
                call()
        reps = max(1, self.args.iters // 10)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1000 / (reps * 10)


def paged_call(b: Bench, backend: str, pool: tuple[Any, ...], page_size: int, **plan: Any) -> Callable[[], Any]:
    """One paged prefill wrapper on `backend`, planned over `pool` (Bench.paged); its call."""
    import flashinfer

    k, v, ids, indptr, last = pool
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(b.workspace, "NHD", backend=backend)
    w.plan(b.qo_indptr, indptr, ids, last, **b.plan_args(page_size), **plan)
    return lambda: w.run(b.q, (k, v), return_lse=True)


def paged_variants(b: Bench) -> None:
    for backend, page_sizes in (("fa3", (16, 32, 64, 128)), ("fa2", (16, 64))):
        for ps in page_sizes:
            pool = b.paged(ps)
            b.report(f"paged {backend}, page {ps}", partial(paged_call, b, backend, pool, ps))
            if backend == "fa2" and ps == 16:
                b.report("paged fa2, page 16, no KV split",
                         partial(paged_call, b, "fa2", pool, 16, disable_split_kv=True))
                for split in (8, 16, 32):
                    b.report(f"paged fa2, page 16, KV split every {split} pages",
                             partial(paged_call, b, "fa2", pool, 16, fixed_split_size=split))


def graph_variants(b: Bench) -> None:
    """The grouped graphs' way: planned at the largest first, then padded with empty groups."""
    import flashinfer

    torch, a = b.torch, b.args
    max_groups, max_queries = 128, 2 * a.groups * a.queries
    if a.groups > max_groups:
        return
    k, v, ids, indptr, last = b.paged(16)
    pad = max_groups - a.groups
    for backend, options in (("fa3", {}), ("fa2", {}), ("fa2", {"disable_split_kv": True})):
        def make(backend: str = backend, options: dict = options) -> Callable[[], Any]:
            buffers = dict(
                qo_indptr_buf=torch.zeros(max_groups + 1, dtype=torch.int32, device=b.dev),
                paged_kv_indptr_buf=torch.zeros(max_groups + 1, dtype=torch.int32, device=b.dev),
                paged_kv_indices_buf=torch.zeros(ids.numel() + max_groups, dtype=torch.int32, device=b.dev),
                paged_kv_last_page_len_buf=torch.ones(max_groups, dtype=torch.int32, device=b.dev))
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(b.workspace, "NHD", backend=backend,
                                                               use_cuda_graph=True, **buffers)
            qo = torch.full((max_groups + 1,), max_queries, dtype=torch.int32)
            qo[0] = 0
            w.plan(qo, torch.arange(max_groups + 1, dtype=torch.int32),
                   torch.zeros(max_groups, dtype=torch.int32, device=b.dev), torch.ones(max_groups, dtype=torch.int32),
                   **b.plan_args(16), **options)
            qo = torch.cat([b.qo_indptr, torch.full((pad,), int(b.qo_indptr[-1]), dtype=torch.int32)])
            kv_indptr = torch.cat([indptr, indptr[-1] + torch.arange(1, pad + 1, dtype=torch.int32)])
            w.plan(qo, kv_indptr, torch.cat([ids, torch.zeros(pad, dtype=torch.int32, device=b.dev)]),
                   torch.cat([last, torch.ones(pad, dtype=torch.int32)]), **b.plan_args(16), **options)
            # (The engine's captured call reads max_queries rows of q, of which the plan uses these;
            # called outside a capture, flashinfer wants exactly the planned rows.)
            return lambda: w.run(b.q, (k, v), return_lse=True)

        split = ", no KV split" if options else ""
        b.report(f"paged {backend}, page 16, cuda-graph wrapper padded to {max_groups} groups{split}", make)


def split_variants(b: Bench) -> None:
    """FA3 over the KV cut into `parts` requests per group (queries repeated), merged by merge_states."""
    import flashinfer

    torch, a = b.torch, b.args
    k, v, ids, _, _ = b.paged(16)
    per_group = a.prefix // 16
    for parts in (2, 4):
        if per_group % parts:
            continue

        def make(parts: int = parts) -> Callable[[], Any]:
            n = a.groups * parts
            qo = torch.arange(n + 1, dtype=torch.int32) * a.queries
            indptr = torch.arange(n + 1, dtype=torch.int32) * (per_group // parts)
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(b.workspace, "NHD", backend="fa3")
            w.plan(qo, indptr, ids, torch.full((n,), 16, dtype=torch.int32), **b.plan_args(16))
            shape = (a.groups, parts, a.queries, b.heads, b.dim)
            q = b.q.view(a.groups, 1, a.queries, b.heads, b.dim).expand(shape).reshape(-1, b.heads, b.dim)

            def call() -> Any:
                out, lse = w.run(q, (k, v), return_lse=True)
                out = out.view(shape).transpose(1, 2).reshape(-1, parts, b.heads, b.dim)
                lse = lse.view(shape[:-1]).transpose(1, 2).reshape(-1, parts, b.heads)
                return flashinfer.merge_states(out, lse)
            return call

        b.report(f"paged fa3, page 16, KV in {parts} parts + merge_states", make)


def folded_variants(b: Bench) -> None:
    """Paged, with each KV head's GQA query heads folded into the query rows: a group's `queries x g`
    rows against one KV head (num_qo_heads = num_kv_heads), so a 128-row query tile is full even
    when a group has 64 samples. Timed as the engine runs it (flashinfer_ops.run_group_parts: the
    fold, the call into scratch, the unfold into the parts' buffers)."""
    import flashinfer

    from tokabatch.engine.runtime.attention import fold_query_heads, unfold_into

    torch = b.torch
    g = b.heads // b.kv_heads
    n = b.q.shape[0]
    for backend in ("fa3", "fa2"):
        def make(backend: str = backend) -> Callable[[], Any]:
            k, v, ids, indptr, last = b.paged(16)
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(b.workspace, "NHD", backend=backend)
            args = b.plan_args(16)
            args["num_qo_heads"] = b.kv_heads
            w.plan(b.qo_indptr * g, indptr, ids, last, **args)
            folded = (torch.empty(n * g, b.kv_heads, b.dim, dtype=b.dt, device=b.dev),
                      torch.empty(n * g, b.kv_heads, dtype=torch.float32, device=b.dev))
            out = torch.empty_like(b.q), torch.empty(n, b.heads, dtype=torch.float32, device=b.dev)

            def call() -> Any:
                w.run(fold_query_heads(b.q, b.kv_heads), (k, v), out=folded[0], lse=folded[1], return_lse=True)
                unfold_into(*folded, *out)
                return out
            return call

        b.report(f"paged {backend}, page 16, GQA heads folded into the query rows", make)


def ragged_variants(b: Bench) -> None:
    import flashinfer

    kv_indptr = b.torch.arange(b.args.groups + 1, dtype=b.torch.int32) * b.args.prefix
    for backend in ("fa3", "fa2"):
        def make(backend: str = backend) -> Callable[[], Any]:
            w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(b.workspace, "NHD", backend=backend)
            w.plan(b.qo_indptr, kv_indptr, **b.plan_args())
            return lambda: w.run(b.q, b.k, b.v, return_lse=True)

        b.report(f"ragged {backend} (each group's KV contiguous)", make)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--groups", type=int, default=16, help="groups in the call (TB: 16 per 1,024-row half-step)")
    ap.add_argument("--queries", type=int, default=64, help="queries (samples) per group")
    ap.add_argument("--prefix", type=int, default=1024, help="shared tokens per group (a multiple of 128)")
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--pool-tokens", type=int, default=1 << 20, help="the page pool the pages are scattered in")
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    b = Bench(args)
    print(f"{args.groups} groups x {args.queries} queries, {args.heads}/{args.kv_heads} heads of {args.head_dim}, "
          f"{args.prefix} shared tokens each\n")
    print("| variant | us per call | TFLOPS | max abs diff (out, lse) |\n|---|---|---|---|", flush=True)
    paged_variants(b)
    graph_variants(b)
    split_variants(b)
    folded_variants(b)
    ragged_variants(b)


if __name__ == "__main__":
    main()
