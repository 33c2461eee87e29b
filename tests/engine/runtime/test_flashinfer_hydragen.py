"""FlashInferHydragenAttention (grouped) equals plain attention: bf16, relative error < 2e-2 against
float32 torch, on Llama-3.2-1B attention shapes (32 q / 8 kv heads, head_dim 64: CUDA-core decode
kernel for own parts) and a GQA-7 shape (14 / 2: own parts through the prefill kernel).

Runs on the GPU machine only (marked `gpu`; skipped without CUDA or flashinfer). 256 decode rows,
contexts ~1000 over scrambled page tables: two system prompts, two few-shot blocks nested under
the first (2 levels), rows in no group; two layers (each its own K/V). The same rows without
groups (one decode request per row) are the ungrouped flashinfer path, checked the same way.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from tokabatch.engine.core.plan import PrefixGroup  # noqa: E402
from tokabatch.engine.runtime.attention import (  # noqa: E402
    AttentionConfig,
    SeqAttn,
    attention_with_lse,
    fold_query_heads,
)
from tokabatch.engine.runtime.flashinfer_hydragen import FlashInferHydragenAttention  # noqa: E402
from tokabatch.engine.runtime.hydragen_plan import plan_hydragen  # noqa: E402
from tokabatch.engine.runtime.kv_cache import KVCache  # noqa: E402
from tokabatch.engine.runtime.weights import ModelSpec  # noqa: E402

TOL = 2e-2
PAGE = 16
DEV = torch.device("cuda")
SHAPES = {"llama-3.2-1b": (32, 8, 64), "gqa-7": (14, 2, 64)}
NUM_PAGES = 12_000                       # the big batch uses at most ~8.8k (shared pages once)


def make_cache(num_heads: int, num_kv_heads: int, head_dim: int, num_pages: int, seed: int) -> KVCache:
    spec = ModelSpec(architecture="test", num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                     head_dim=head_dim, hidden_size=num_heads * head_dim, vocab_size=1,
                     max_position_embeddings=4096, eos_token_ids=(), dtype=torch.bfloat16, device=DEV)
    cache = KVCache(spec, num_pages=num_pages, page_size=PAGE)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    for t in cache.k + cache.v:
        t.copy_(torch.randn(t.shape, generator=gen, device=DEV))
    return cache


def shared_prompt_batch(rng: random.Random) -> tuple[list[SeqAttn], tuple[PrefixGroup, ...]]:
    """256 decode rows: 0..95 system A + few-shot 1, 96..159 A + few-shot 2, 160..191 A only,
    192..223 system B only, 224..255 no group. Contexts 900..1100, ending anywhere in a page."""
    pool = list(range(NUM_PAGES))
    rng.shuffle(pool)
    fresh = iter(pool)

    def pages(n: int) -> tuple[int, ...]:
        return tuple(next(fresh) for _ in range(n))

    sys_a, sys_b, shot_1, shot_2 = pages(32), pages(24), pages(16), pages(8)
    prefixes = [sys_a + shot_1] * 96 + [sys_a + shot_2] * 64 + [sys_a] * 32 + [sys_b] * 32 + [()] * 32
    rows = []
    for r, prefix in enumerate(prefixes):
        kv_len = rng.randint(900, 1100)
        table = prefix + pages(-(-kv_len // PAGE) - len(prefix))
        rows.append(SeqAttn(q_start=r, q_len=1, start_pos=kv_len - 1, page_ids=table, seq_id=1000 + r))
    ids = [s.seq_id for s in rows]
    groups = (PrefixGroup(seq_ids=tuple(ids[:192]), page_ids=sys_a, num_tokens=32 * PAGE),
              PrefixGroup(seq_ids=tuple(ids[:96]), page_ids=shot_1, num_tokens=16 * PAGE, start_page=32),
              PrefixGroup(seq_ids=tuple(ids[96:160]), page_ids=shot_2, num_tokens=8 * PAGE, start_page=32),
              PrefixGroup(seq_ids=tuple(ids[192:224]), page_ids=sys_b, num_tokens=24 * PAGE))
    return rows, groups


def reference(q: torch.Tensor, cache: KVCache, layer: int, rows: list[SeqAttn]) -> torch.Tensor:
    """Plain attention of each row over its whole context, float32 (bf16 K/V upcast)."""
    k_flat, v_flat = cache.flat(layer)
    out = []
    for chunk in range(0, len(rows), 64):
        part = rows[chunk:chunk + 64]
        max_kv = max(s.kv_len for s in part)
        pos = torch.arange(max_kv, device=DEV)
        n = -(-max_kv // PAGE)
        tables = torch.tensor([list(s.page_ids[:n]) + [0] * (n - len(s.page_ids[:n])) for s in part], device=DEV)
        slots = tables[:, pos // PAGE] * PAGE + pos % PAGE
        valid = pos[None, :] < torch.tensor([s.kv_len for s in part], device=DEV)[:, None]
        slots = torch.where(valid, slots, 0)
        o, _ = attention_with_lse(q[chunk:chunk + 64, None].float(), k_flat[slots].float(), v_flat[slots].float(),
                                  valid[:, None, :])
        out.append(o[:, 0])
    return torch.cat(out)


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want).norm(dim=-1) / want.norm(dim=-1)).max().item()


def cuda_us(fn: Callable[[int], object], iters: int = 20) -> float:
    """Microseconds per fn(layer) call on the GPU (layers alternate), after a warm-up call."""
    fn(0)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i % 2)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / iters


def timings(grouped: FlashInferHydragenAttention, plain: FlashInferHydragenAttention, q: torch.Tensor) -> str:
    """run() per layer, grouped and not, and the grouped run's parts alone (the rest is gathers + merge)."""
    kv = grouped.cache.k, grouped.cache.v
    q_groups = q.index_select(0, grouped.group_rows)
    if grouped.config.fold_group_heads:
        q_groups = fold_query_heads(q_groups, grouped.shape.num_kv_heads)
    own = cuda_us(lambda layer: grouped.own_wrapper.run(q, (kv[0][layer], kv[1][layer]), return_lse=True))
    group = cuda_us(lambda layer: grouped.group_wrapper.run(q_groups, (kv[0][layer], kv[1][layer]), return_lse=True))
    total, base = cuda_us(lambda layer: grouped.run(layer, q)), cuda_us(lambda layer: plain.run(layer, q))
    return (f"run() per layer: grouped {total:.0f} us (own parts {own:.0f}, group parts {group:.0f}), "
            f"ungrouped {base:.0f} us")


@pytest.mark.parametrize("fold", [False, True], ids=["group-heads", "folded-group-heads"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_grouped_equals_plain_attention(shape: str, fold: bool) -> None:
    num_heads, num_kv_heads, head_dim = SHAPES[shape]
    rows, groups = shared_prompt_batch(random.Random(0))
    cache = make_cache(num_heads, num_kv_heads, head_dim, NUM_PAGES, seed=1)
    workspace = torch.zeros(256 * 1024 * 1024, dtype=torch.uint8, device=DEV)
    grouped = FlashInferHydragenAttention(cache, num_heads, workspace, AttentionConfig(fold_group_heads=fold))
    plain = FlashInferHydragenAttention(cache, num_heads, workspace)
    t0 = time.perf_counter()
    hp = plan_hydragen(rows, groups, PAGE)
    t1 = time.perf_counter()
    grouped.plan(hp)
    t2 = time.perf_counter()
    assert hp.num_states == 3 and hp.num_groups == 4
    q = torch.randn(len(rows), num_heads, head_dim, generator=torch.Generator(device=DEV).manual_seed(2),
                    device=DEV).to(torch.bfloat16)
    plain.plan(plan_hydragen(rows, (), PAGE))
    for layer in range(2):
        want = reference(q, cache, layer, rows)
        got, base = grouped.run(layer, q), plain.run(layer, q)
        assert got.shape == q.shape and got.dtype == torch.bfloat16 and torch.isfinite(got).all()
        err, base_err = rel_error(got, want), rel_error(base, want)
        print(f"\n{shape} layer {layer}: grouped rel err {err:.2e}, ungrouped {base_err:.2e}")
        assert err < TOL and base_err < TOL
    # Planning is host work once per step; report it with the per-layer GPU time.
    print(f"{shape}: plan_hydragen {1e3 * (t1 - t0):.2f} ms, plan() {1e3 * (t2 - t1):.2f} ms (first: JIT); "
          + timings(grouped, plain, q))


def test_rows_without_own_part_and_padded_states() -> None:
    """Three rows, three states (merge_states' many-states kernel, which runs when states >= rows):
    row 0 in two nested groups plus its own part, row 1 in the outer group only (one padding
    state), row 2 in both groups with its context ending at the inner group's end (no own part,
    one padding state). Then the same wrappers are re-planned without groups."""
    num_heads, num_kv_heads, head_dim = SHAPES["llama-3.2-1b"]
    cache = make_cache(num_heads, num_kv_heads, head_dim, 16, seed=3)
    outer, inner = (3, 7), (11,)
    rows = [SeqAttn(q_start=0, q_len=1, start_pos=3 * PAGE + 5, page_ids=outer + inner + (5,), seq_id=0),
            SeqAttn(q_start=1, q_len=1, start_pos=2 * PAGE + 4, page_ids=outer + (9, 12), seq_id=1),
            SeqAttn(q_start=2, q_len=1, start_pos=3 * PAGE - 1, page_ids=outer + inner, seq_id=2)]
    groups = (PrefixGroup(seq_ids=(0, 1, 2), page_ids=outer, num_tokens=2 * PAGE),
              PrefixGroup(seq_ids=(0, 2), page_ids=inner, num_tokens=PAGE, start_page=2))
    attn = FlashInferHydragenAttention(cache, num_heads, torch.zeros(128 * 1024 * 1024, dtype=torch.uint8,
                                                                     device=DEV))
    q = torch.randn(3, num_heads, head_dim, device=DEV).to(torch.bfloat16)
    hp = plan_hydragen(rows, groups, PAGE)
    assert hp.own_rows.tolist() == [0, 1] and hp.num_states == 3
    assert hp.state_index[1, 2].item() == hp.state_index[2, 2].item() == hp.empty_state
    attn.plan(hp)
    for layer in range(2):
        got = attn.run(layer, q)
        assert torch.isfinite(got).all() and rel_error(got, reference(q, cache, layer, rows)) < TOL
    attn.plan(plan_hydragen(rows, (), PAGE))
    assert rel_error(attn.run(1, q), reference(q, cache, 1, rows)) < TOL


def test_shared_prefix_batch_agrees_with_grouping_on_and_off(tmp_path) -> None:
    """500 requests = one 512-token prefix + 16 own tokens, 32 greedy tokens each, through the
    whole engine (flashinfer backend, CUDA graphs on): prefix groups formed and attended by parts."""
    from tests.engine.runtime.test_cuda_graphs import assert_agree, shared_prefix_on_off

    on, off, off_logprobs, on_stats, off_stats, _ = shared_prefix_on_off(tmp_path, 500, seed=5)
    saved = on_stats.num_hydragen_saved_kv_reads / max(1, on_stats.num_decode_kv_reads)
    print(f"hydragen: {saved:.0%} of decode KV reads saved")
    assert saved > 0.5 and off_stats.num_hydragen_saved_kv_reads == 0
    assert_agree(on, off, off_logprobs, 32, "grouping on/off")
