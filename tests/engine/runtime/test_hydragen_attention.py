"""Hydragen attention by parts plus merge equals plain attention over each sequence's whole context."""

from __future__ import annotations

import random

import pytest
import torch

from tokabatch.engine.core.hydragen import GroupingParams, find_prefix_groups
from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.hydragen_attention import (HydragenLayout, grouped_decode_attention,
                                                         merge_attention)

DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
TOL = 1e-5


def reference_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     page_tables: list[tuple[int, ...]], context_lens: list[int]) -> torch.Tensor:
    """Plain softmax attention in float64, one sequence at a time, K/V heads repeated (HF repeat_kv)."""
    ps = k_cache.shape[1]
    group = q.shape[1] // k_cache.shape[2]
    out = []
    for row, (table, ctx) in enumerate(zip(page_tables, context_lens)):
        slots = torch.tensor([table[p // ps] * ps + p % ps for p in range(ctx)], device=q.device)
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].double().repeat_interleave(group, dim=1)
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,khd->hk", q[row].double(), k) / q.shape[-1] ** 0.5
        out.append(torch.einsum("hk,khd->hd", scores.softmax(-1), v))
    return torch.stack(out).float()


def make_cache(num_pages: int, page_size: int, kv_heads: int, head_dim: int, device: str,
               seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_pages, page_size, kv_heads, head_dim)
    return (torch.randn(shape, generator=gen).to(device), torch.randn(shape, generator=gen).to(device))


def random_batch(rng: random.Random, page_size: int, num_seqs: int) -> tuple[list[tuple[int, ...]], list[int]]:
    """Page tables from a random tree of shared prefixes (page ids shuffled), contexts that end
    anywhere inside each sequence's private pages."""
    ids = list(range(1, 400))
    rng.shuffle(ids)
    fresh = iter(ids)
    prefixes: list[tuple[int, ...]] = [()]
    for _ in range(rng.randint(1, 6)):
        prefixes.append(rng.choice(prefixes) + tuple(next(fresh) for _ in range(rng.randint(1, 3))))
    tables, lens = [], []
    for _ in range(num_seqs):
        shared = rng.choice(prefixes)
        own = tuple(next(fresh) for _ in range(rng.randint(1, 3)))
        tables.append(shared + own)
        lens.append(rng.randint(len(shared) * page_size + 1, len(tables[-1]) * page_size))
    return tables, lens


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("seed", range(30))
def test_parts_equal_full_attention_for_random_groups(seed: int, device: str) -> None:
    rng = random.Random(seed)
    page_size = rng.randint(2, 5)
    kv_heads, group = rng.choice([(1, 4), (2, 3), (3, 1), (2, 2)])    # MQA, GQA, MHA
    head_dim = rng.choice([4, 8, 16])
    tables, lens = random_batch(rng, page_size, num_seqs=rng.randint(5, 14))
    shareable = {i: t[:(c - 1) // page_size] for i, (t, c) in enumerate(zip(tables, lens))}
    groups = find_prefix_groups(shareable, page_size, GroupingParams(
        min_prefix_tokens=rng.randint(1, 2 * page_size), min_group=2, call_cost_tokens=0, merge_cost_tokens=0))
    k_cache, v_cache = make_cache(400, page_size, kv_heads, head_dim, device, seed)
    q = torch.randn(len(tables), kv_heads * group, head_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    out = grouped_decode_attention(q, k_cache, v_cache, tables, lens, groups)
    ref = reference_decode(q, k_cache, v_cache, tables, lens)
    assert (out - ref).abs().max().item() < TOL


def two_level_batch(page_size: int) -> tuple[list[tuple[int, ...]], list[int], tuple[PrefixGroup, ...]]:
    """Six sequences under a 3-page system prompt; rows 0..2 also share a 2-page few-shot block;
    row 3's context is exactly the system prompt (empty own part); odd contexts elsewhere."""
    system, fewshot = (11, 4, 29), (7, 30)
    tables = [system + fewshot + (40,), system + fewshot + (41, 42), system + fewshot,
              system, system + (50, 51, 52), system + (60,)]
    lens = [5 * page_size + 1, min(6 * page_size + 3, 7 * page_size), 5 * page_size, 3 * page_size,
            min(5 * page_size + 2, 6 * page_size), 3 * page_size + 1]
    groups = (PrefixGroup(seq_ids=(100, 101, 102), page_ids=fewshot, num_tokens=2 * page_size, start_page=3),
              PrefixGroup(seq_ids=(100, 101, 102, 103, 104, 105), page_ids=system, num_tokens=3 * page_size))
    return tables, lens, groups


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page_size", [1, 4, 7])
@pytest.mark.parametrize("kv_heads,num_heads", [(2, 8), (3, 3), (1, 5)])
def test_nested_groups_and_empty_own_parts(page_size: int, kv_heads: int, num_heads: int, device: str) -> None:
    tables, lens, groups = two_level_batch(page_size)
    k_cache, v_cache = make_cache(64, page_size, kv_heads, 8, device, seed=page_size)
    q = torch.randn(len(tables), num_heads, 8, generator=torch.Generator().manual_seed(3)).to(device)
    ids = [100 + i for i in range(len(tables))]
    out = grouped_decode_attention(q, k_cache, v_cache, tables, lens, groups, seq_ids=ids)
    ref = reference_decode(q, k_cache, v_cache, tables, lens)
    assert (out - ref).abs().max().item() < TOL
    # Rows 2 and 3 have empty own parts: the groups alone carry them.
    layout = HydragenLayout.build(tables, lens, ids, groups, page_size, device)
    assert not layout.own_mask[2].any() and not layout.own_mask[3].any()
    # Groups in the other order merge to the same result (the merge is associative and commutative).
    flipped = grouped_decode_attention(q, k_cache, v_cache, tables, lens, groups[::-1], seq_ids=ids)
    assert (flipped - out).abs().max().item() < TOL


@pytest.mark.parametrize("context", [17, 37, 32, 33])
def test_odd_sizes_and_page_boundaries(context: int) -> None:
    """Page size 16: a one-page shared prefix, contexts that end on, just after and past page edges."""
    page_size, shared = 16, (5,)
    tables = [shared + (1 + i, 9 + i) for i in range(3)]
    lens = [context, 17, 16 + 1]
    groups = (PrefixGroup(seq_ids=(0, 1, 2), page_ids=shared, num_tokens=16),)
    k_cache, v_cache = make_cache(16, page_size, 2, 16, "cpu", seed=context)
    q = torch.randn(3, 6, 16, generator=torch.Generator().manual_seed(context))
    out = grouped_decode_attention(q, k_cache, v_cache, tables, lens, groups)
    assert (out - reference_decode(q, k_cache, v_cache, tables, lens)).abs().max().item() < TOL


def test_no_groups_is_plain_paged_attention() -> None:
    tables, lens = [(3, 1), (2,), (0, 4, 5)], [5, 1, 37 // 4 + 1]
    k_cache, v_cache = make_cache(6, 4, 2, 8, "cpu", seed=1)
    q = torch.randn(3, 4, 8, generator=torch.Generator().manual_seed(1))
    out = grouped_decode_attention(q, k_cache, v_cache, tables, lens, ())
    assert (out - reference_decode(q, k_cache, v_cache, tables, lens)).abs().max().item() < TOL


def test_group_part_reads_the_prefix_once_for_all_members() -> None:
    """The layout gathers a group's shared slots once (not per member) and excludes them from own parts."""
    tables, lens, groups = two_level_batch(4)
    layout = HydragenLayout.build(tables, lens, [100 + i for i in range(6)], groups, 4)
    assert [p.slots.numel() for p in layout.groups] == [8, 12]
    assert layout.own_mask.sum(-1).flatten().tolist() == [1, 7, 0, 0, 10, 1]


def test_merge_of_two_halves_equals_attention_over_both() -> None:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(5, 4, 8, generator=gen)
    k, v = torch.randn(23, 2, 8, generator=gen), torch.randn(23, 2, 8, generator=gen)
    tables = [tuple(range(23))] * 5    # page_size 1: every key is its own page
    full = reference_decode(q, k[:, None], v[:, None], tables, [23] * 5)
    groups_a = (PrefixGroup(seq_ids=tuple(range(5)), page_ids=tuple(range(9)), num_tokens=9),)
    out = grouped_decode_attention(q, k[:, None], v[:, None], tables, [23] * 5, groups_a)
    assert (out - full).abs().max().item() < TOL
    # Merging with an empty part (lse -inf, zero output) is the identity, with no NaN.
    o, lse = torch.randn(3, 2, 4), torch.randn(3, 2)
    merged, merged_lse = merge_attention(o, lse, torch.zeros_like(o), torch.full_like(lse, float("-inf")))
    assert torch.equal(merged, o) and torch.equal(merged_lse, lse)
    # Huge logits do not overflow (weights are taken relative to the merged lse); float32 holds
    # an lse near 1e4 to ~1e-3, which bounds the weights' precision there.
    merged, merged_lse = merge_attention(o, lse + 1e4, o, lse + 1e4)
    assert torch.allclose(merged, o, rtol=1e-3, atol=1e-3) and torch.isfinite(merged_lse).all()
    # Two empty parts merge to an empty part: zero output, lse -inf, no NaN.
    empty = torch.full_like(lse, float("-inf"))
    merged, merged_lse = merge_attention(torch.zeros_like(o), empty, torch.zeros_like(o), empty)
    assert torch.equal(merged, torch.zeros_like(o)) and torch.equal(merged_lse, empty)


@pytest.mark.parametrize("bad", ["unknown", "pages", "overlap", "gap", "past_context"])
def test_inconsistent_groups_are_rejected(bad: str) -> None:
    tables, lens, groups = two_level_batch(4)
    ids = [100 + i for i in range(6)]
    system_group, fewshot_group = groups[1], groups[0]
    broken = {
        "unknown": (PrefixGroup(seq_ids=(100, 999), page_ids=(11, 4, 29), num_tokens=12),),
        "pages": (PrefixGroup(seq_ids=(100, 104), page_ids=(11, 4, 7), num_tokens=12),),
        "overlap": (system_group, PrefixGroup(seq_ids=(100, 101), page_ids=(29, 7), num_tokens=8, start_page=2)),
        "gap": (fewshot_group,),
        "past_context": (PrefixGroup(seq_ids=(102, 103), page_ids=(11, 4, 29), num_tokens=12),
                         PrefixGroup(seq_ids=(102,), page_ids=(7, 30), num_tokens=8, start_page=3)),
    }[bad]
    if bad == "past_context":
        lens = [*lens[:2], 4 * 4 + 1, *lens[3:]]
    with pytest.raises(ValueError):
        HydragenLayout.build(tables, lens, ids, broken, 4)


def test_layout_is_reused_across_layers() -> None:
    tables, lens, groups = two_level_batch(4)
    ids = [100 + i for i in range(6)]
    layout = HydragenLayout.build(tables, lens, ids, groups, 4)
    for layer in range(3):
        k_cache, v_cache = make_cache(64, 4, 2, 8, "cpu", seed=10 + layer)
        q = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(layer))
        out, lse = layout.attend(q, k_cache, v_cache)
        assert (out - reference_decode(q, k_cache, v_cache, tables, lens)).abs().max().item() < TOL
        assert lse.shape == (6, 4) and lse.dtype == torch.float32


def test_bfloat16_queries_come_back_in_bfloat16() -> None:
    tables, lens, groups = two_level_batch(4)
    k_cache, v_cache = make_cache(64, 4, 2, 8, "cpu", seed=0)
    q = torch.randn(6, 4, 8).bfloat16()
    out = grouped_decode_attention(q, k_cache.bfloat16(), v_cache.bfloat16(), tables, lens, groups,
                                   seq_ids=[100 + i for i in range(6)])
    ref = reference_decode(q.float(), k_cache.bfloat16().float(), v_cache.bfloat16().float(), tables, lens)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max().item() < 2e-2

