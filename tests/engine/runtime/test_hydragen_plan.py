"""plan_hydragen's page tables cover every decode row's context exactly once, and the math flashinfer
runs over them (emulated here in float32 torch) equals plain attention over each row's whole context.

CPU only: the emulation reads the plan the way the wrappers do (CSR indptr/indices/last_page_len
per request, group queries gathered by group_rows) and merges by state_index as merge_states does.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.engine.runtime.test_hydragen_attention import random_batch
from tokabatch.engine.core.hydragen import GroupingParams, find_prefix_groups
from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import (
    SeqAttn,
    attention_with_lse,
    fold_query_heads,
    merge_attention,
    unfold_into,
)
from tokabatch.engine.runtime.hydragen_plan import EMPTY_LSE, HydragenPlan, plan_hydragen, plan_hydragen_padded

TOL = 1e-5


def decode_rows(tables: list[tuple[int, ...]], lens: list[int], ids: list[int] | None = None) -> list[SeqAttn]:
    ids = list(range(len(tables))) if ids is None else ids
    return [SeqAttn(q_start=r, q_len=1, start_pos=n - 1, page_ids=t, seq_id=i)
            for r, (t, n, i) in enumerate(zip(tables, lens, ids))]


def request_slots(indptr: torch.Tensor, indices: torch.Tensor, last_page_len: torch.Tensor, i: int,
                  page_size: int) -> torch.Tensor:
    """Flat cache slots request i reads, as flashinfer's paged layout defines them."""
    pages = indices[indptr[i]:indptr[i + 1]].long()
    slots = (pages[:, None] * page_size + torch.arange(page_size)).reshape(-1)
    return slots[:(pages.numel() - 1) * page_size + int(last_page_len[i])]


def emulate_run(hp: HydragenPlan, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                fold: bool = False) -> torch.Tensor:
    """FlashInferHydragenAttention.run in torch: own requests, group requests (with `fold`, as
    flashinfer_ops.run_group_parts makes them: query heads folded into rows), then the merge."""
    ps = hp.page_size
    k, v = k_cache.reshape(-1, *k_cache.shape[2:]), v_cache.reshape(-1, *v_cache.shape[2:])
    outs, lses = [], []
    for i in range(hp.num_own):
        s = request_slots(hp.own_kv_indptr, hp.own_kv_indices, hp.own_last_page_len, i, ps)
        o, lse = attention_with_lse(q[hp.own_rows[i]][None], k[s], v[s])
        outs.append(o)
        lses.append(lse)
    group_q, qo_indptr = q[hp.group_rows], hp.group_qo_indptr
    if fold:
        g = q.shape[1] // k.shape[1]
        group_q, qo_indptr = fold_query_heads(group_q, k.shape[1]), qo_indptr * g
    group_outs, group_lses = [], []
    for i in range(hp.num_groups):
        s = request_slots(hp.group_kv_indptr, hp.group_kv_indices, hp.group_last_page_len, i, ps)
        o, lse = attention_with_lse(group_q[qo_indptr[i]:qo_indptr[i + 1]], k[s], v[s])   # non-causal: no mask
        group_outs.append(o)
        group_lses.append(lse)
    if group_outs:
        o, lse = torch.cat(group_outs), torch.cat(group_lses)
        if fold:
            o, lse = unfold(o, lse, q.shape[1])
        outs.append(o)
        lses.append(lse)
    outs.append(torch.zeros(1, *q.shape[1:]))
    lses.append(torch.full((1, q.shape[1]), EMPTY_LSE))
    part_out, part_lse = torch.cat(outs), torch.cat(lses)
    assert part_out.shape[0] == hp.empty_state + 1
    out, lse = part_out[hp.state_index[:, 0]], part_lse[hp.state_index[:, 0]]
    for j in range(1, hp.num_states):
        out, lse = merge_attention(out, lse, part_out[hp.state_index[:, j]], part_lse[hp.state_index[:, j]])
    return out


def unfold(out: torch.Tensor, lse: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    m = out.shape[0] * out.shape[1] // num_heads
    unfolded = torch.empty(m, num_heads, out.shape[2]), torch.empty(m, num_heads)
    unfold_into(out, lse, *unfolded)
    return unfolded


def full_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   rows: list[SeqAttn], page_size: int) -> torch.Tensor:
    k, v = k_cache.reshape(-1, *k_cache.shape[2:]), v_cache.reshape(-1, *v_cache.shape[2:])
    out = []
    for r, s in enumerate(rows):
        slots = torch.tensor([s.page_ids[p // page_size] * page_size + p % page_size for p in range(s.kv_len)])
        out.append(attention_with_lse(q[r][None], k[slots], v[slots])[0][0])
    return torch.stack(out)


def assert_exact_cover(hp: HydragenPlan, rows: list[SeqAttn]) -> None:
    """Each row's parts read exactly its positions 0..kv_len-1 (each once), and its states are
    exactly its parts (own first), padded with the empty state."""
    ps = hp.page_size
    assert hp.num_rows == len(rows)
    assert torch.equal(hp.group_last_page_len, torch.full((hp.num_groups,), ps, dtype=torch.int32))
    group_of_query = torch.repeat_interleave(torch.arange(hp.num_groups),
                                             (hp.group_qo_indptr[1:] - hp.group_qo_indptr[:-1]).long())
    own_index = {int(r): i for i, r in enumerate(hp.own_rows)}
    assert hp.own_rows.tolist() == sorted(own_index)
    for r, s in enumerate(rows):
        read: list[int] = []
        states: list[int] = []
        if r in own_index:
            i = own_index[r]
            own = request_slots(hp.own_kv_indptr, hp.own_kv_indices, hp.own_last_page_len, i, ps).tolist()
            assert own, "an own request is never empty"
            assert 1 <= int(hp.own_last_page_len[i]) <= ps
            read += own
            states.append(i)
        for j in (hp.group_rows == r).nonzero().flatten().tolist():
            read += request_slots(hp.group_kv_indptr, hp.group_kv_indices, hp.group_last_page_len,
                                  int(group_of_query[j]), ps).tolist()
            states.append(hp.num_own + j)
        want = [s.page_ids[p // ps] * ps + p % ps for p in range(s.kv_len)]
        assert sorted(read) == sorted(want), f"row {r}: parts do not cover its context exactly once"
        index = hp.state_index[r].tolist()
        assert index[:len(states)] == states and set(index[len(states):]) <= {hp.empty_state}
        assert hp.own_starts[r] == s.kv_len - (len(own) if r in own_index else 0)


def check(tables: list[tuple[int, ...]], lens: list[int], groups: tuple[PrefixGroup, ...], page_size: int,
          kv_heads: int, num_heads: int, seed: int, ids: list[int] | None = None) -> HydragenPlan:
    rows = decode_rows(tables, lens, ids)
    hp = plan_hydragen(rows, groups, page_size)
    assert_exact_cover(hp, rows)
    num_pages = max(max(t) for t in tables) + 1
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(num_pages, page_size, kv_heads, 8, generator=gen)
    v_cache = torch.randn(num_pages, page_size, kv_heads, 8, generator=gen)
    q = torch.randn(len(rows), num_heads, 8, generator=gen)
    want = full_attention(q, k_cache, v_cache, rows, page_size)
    for fold in (False, True):
        got = emulate_run(hp, q, k_cache, v_cache, fold=fold)
        assert (got - want).abs().max().item() < TOL, f"fold={fold}"
    return hp


@pytest.mark.parametrize("seed", range(25))
def test_random_groups_cover_each_context_once(seed: int) -> None:
    rng = random.Random(seed)
    page_size = rng.choice([1, 2, 3, 4, 16])
    kv_heads, group = rng.choice([(1, 4), (2, 3), (3, 1), (2, 7), (8, 4)])
    tables, lens = random_batch(rng, page_size, num_seqs=rng.randint(5, 20))
    shareable = {i: t[:(c - 1) // page_size] for i, (t, c) in enumerate(zip(tables, lens))}
    groups = find_prefix_groups(shareable, page_size, GroupingParams(
        min_prefix_tokens=rng.randint(1, 2 * page_size), min_group=2, call_cost_tokens=0, merge_cost_tokens=0))
    check(tables, lens, groups, page_size, kv_heads, kv_heads * group, seed)


def two_level_batch(page_size: int) -> tuple[list[tuple[int, ...]], list[int], tuple[PrefixGroup, ...]]:
    """Rows 0..2 under a 3-page system prompt and a 2-page few-shot block, rows 3..4 under the system
    prompt only, rows 5..6 in no group; row 2's context ends exactly at its groups' end (no own part)."""
    system, fewshot = (11, 4, 29), (7, 30)
    tables = [system + fewshot + (40,), system + fewshot + (41, 42), system + fewshot,
              system + (50, 51, 52), system + (60,), (70, 71), (72,)]
    lens = [5 * page_size + 1, 6 * page_size + (page_size + 1) // 2, 5 * page_size,
            5 * page_size + 2 if page_size > 2 else 6 * page_size, 4 * page_size,
            2 * page_size, 1]
    groups = (PrefixGroup(seq_ids=(100, 101, 102), page_ids=fewshot, num_tokens=2 * page_size, start_page=3),
              PrefixGroup(seq_ids=(100, 101, 102, 103, 104), page_ids=system, num_tokens=3 * page_size))
    return tables, lens, groups


@pytest.mark.parametrize("page_size", [1, 4, 7, 16])
@pytest.mark.parametrize("kv_heads,num_heads", [(2, 8), (2, 14), (3, 3)])
def test_nested_groups_rows_in_no_group_and_an_empty_own_part(page_size: int, kv_heads: int, num_heads: int) -> None:
    tables, lens, groups = two_level_batch(page_size)
    ids = [100 + i for i in range(len(tables))]
    hp = check(tables, lens, groups, page_size, kv_heads, num_heads, seed=page_size, ids=ids)
    assert hp.num_states == 3                            # own + system + few-shot
    assert hp.own_rows.tolist() == [0, 1, 3, 4, 5, 6]    # row 2 has no own part
    # Outer group first: its request reads the system prompt for rows 0..4 at once.
    assert hp.group_rows.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert hp.group_qo_indptr.tolist() == [0, 5, 8] and hp.group_kv_indices.tolist() == [11, 4, 29, 7, 30]
    assert hp.own_starts == (5 * page_size, 5 * page_size, 5 * page_size, 3 * page_size, 3 * page_size, 0, 0)
    # The groups' order in the step does not matter.
    flipped = check(tables, lens, groups[::-1], page_size, kv_heads, num_heads, seed=page_size, ids=ids)
    assert torch.equal(flipped.state_index, hp.state_index)


@pytest.mark.parametrize("context", [17, 31, 32, 33, 48])
def test_page_boundaries(context: int) -> None:
    """Page size 16, a one-page group: contexts just after the group, on and around page edges."""
    shared = (5,)
    tables = [shared + (1 + i, 9 + i, 20 + i) for i in range(3)]
    lens = [context, 17, 16 * 4]
    groups = (PrefixGroup(seq_ids=(0, 1, 2), page_ids=shared, num_tokens=16),)
    hp = check(tables, lens, groups, 16, 2, 6, seed=context)
    assert hp.own_last_page_len.tolist() == [(context - 1) % 16 + 1, 1, 16]
    assert hp.own_kv_indptr.tolist() == [0, -(-context // 16) - 1, -(-context // 16), -(-context // 16) + 3]


def test_worked_example_of_the_module_doc() -> None:
    rows = decode_rows([(7, 2, 9), (7, 2, 5, 1)], [11, 14])
    hp = plan_hydragen(rows, (PrefixGroup(seq_ids=(0, 1), page_ids=(7, 2), num_tokens=8),), 4)
    assert hp.group_rows.tolist() == [0, 1] and hp.group_qo_indptr.tolist() == [0, 2]
    assert hp.group_kv_indices.tolist() == [7, 2] and hp.group_last_page_len.tolist() == [4]
    assert hp.own_kv_indices.tolist() == [9, 5, 1] and hp.own_kv_indptr.tolist() == [0, 1, 3]
    assert hp.own_last_page_len.tolist() == [3, 2]
    assert hp.state_index.tolist() == [[0, 2], [1, 3]] and hp.empty_state == 4


def test_no_groups_is_each_row_over_all_its_pages() -> None:
    tables, lens = [(3, 1), (2,), (0, 4, 5)], [5, 1, 9]
    hp = check(tables, lens, (), 4, 2, 4, seed=1)
    assert hp.own_only and hp.num_groups == 0 and hp.num_group_queries == 0
    assert hp.own_kv_indices.tolist() == [3, 1, 2, 0, 4, 5] and hp.own_last_page_len.tolist() == [1, 1, 1]
    # Pages past the context are not read.
    hp = plan_hydragen(decode_rows([(3, 1, 8)], [4]), (), 4)
    assert hp.own_kv_indices.tolist() == [3]


def test_empty_batch() -> None:
    hp = plan_hydragen([], (), 16)
    assert hp.num_rows == 0 and hp.own_only and hp.state_index.shape == (0, 1)


@pytest.mark.parametrize("bad", ["prefill_row", "short_table", "duplicate_ids", "wrong_pages", "gap"])
def test_inconsistent_steps_are_rejected(bad: str) -> None:
    tables, lens, groups = two_level_batch(4)
    ids = [100 + i for i in range(len(tables))]
    rows = decode_rows(tables, lens, ids)
    if bad == "prefill_row":
        rows[0] = SeqAttn(q_start=0, q_len=2, start_pos=lens[0] - 2, page_ids=tables[0], seq_id=100)
    elif bad == "short_table":
        rows[0] = SeqAttn(q_start=0, q_len=1, start_pos=6 * 4, page_ids=tables[0], seq_id=100)
    elif bad == "duplicate_ids":
        rows[1] = SeqAttn(q_start=1, q_len=1, start_pos=lens[1] - 1, page_ids=tables[1], seq_id=100)
    elif bad == "wrong_pages":
        groups = (PrefixGroup(seq_ids=(100, 105), page_ids=(11, 4, 29), num_tokens=12),)
    else:
        groups = groups[:1]                              # the nested group without its parent
    with pytest.raises(ValueError):
        plan_hydragen(rows, groups, 4)
    with pytest.raises(ValueError):
        plan_hydragen_padded(rows, groups, 4, 16, 4, 32, 4, scratch_page=99)


def emulate_padded(pp, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int,
                   bs: int, max_queries: int) -> torch.Tensor:
    """The CUDA-graph Hydragen step in torch: bs own requests, max_groups group requests (empty
    padded ones skipped, as the kernel skips them), one empty state, merged by state_index."""
    k, v = k_cache.reshape(-1, *k_cache.shape[2:]), v_cache.reshape(-1, *v_cache.shape[2:])
    heads, dim = q.shape[1:]
    q = torch.cat([q, torch.zeros(bs - q.shape[0], heads, dim)])
    part_out = torch.full((bs + max_queries + 1, heads, dim), float("nan"))   # unread rows stay NaN
    part_lse = torch.full((bs + max_queries + 1, heads), float("nan"))
    for r in range(bs):
        s = request_slots(pp.own_kv_indptr, pp.own_kv_indices, pp.own_last_page_len, r, page_size)
        part_out[r], part_lse[r] = (t[0] for t in attention_with_lse(q[r][None], k[s], v[s]))
    qg = q[pp.groups.group_rows]
    for g in range(pp.groups.group_qo_indptr.numel() - 1):
        a, b = int(pp.groups.group_qo_indptr[g]), int(pp.groups.group_qo_indptr[g + 1])
        if a == b:
            continue
        groups = pp.groups
        s = request_slots(groups.group_kv_indptr, groups.group_kv_indices, groups.group_last_page_len, g, page_size)
        part_out[bs + a:bs + b], part_lse[bs + a:bs + b] = attention_with_lse(qg[a:b], k[s], v[s])
    part_out[-1], part_lse[-1] = 0.0, EMPTY_LSE
    idx = pp.groups.state_index
    out, lse = part_out[idx[:, 0]], part_lse[idx[:, 0]]
    for j in range(1, idx.shape[1]):
        out, lse = merge_attention(out, lse, part_out[idx[:, j]], part_lse[idx[:, j]])
    return out


@pytest.mark.parametrize("seed", range(12))
def test_padded_plan_in_graph_shapes_equals_full_attention(seed: int) -> None:
    rng = random.Random(100 + seed)
    page_size = rng.choice([2, 4, 16])
    tables, lens = random_batch(rng, page_size, num_seqs=rng.randint(5, 20))
    shareable = {i: t[:(c - 1) // page_size] for i, (t, c) in enumerate(zip(tables, lens))}
    groups = find_prefix_groups(shareable, page_size, GroupingParams(
        min_prefix_tokens=page_size, min_group=2, call_cost_tokens=0, merge_cost_tokens=0))
    rows = decode_rows(tables, lens)
    hp = plan_hydragen(rows, groups, page_size)
    bs = len(rows) + rng.randint(0, 6)
    max_groups, max_states = hp.num_groups + rng.randint(0, 3), hp.num_states + rng.randint(0, 2)
    max_queries = hp.num_group_queries + rng.randint(0, 9)
    scratch = max(max(t) for t in tables) + 1
    pp = plan_hydragen_padded(rows, groups, page_size, bs, max_groups, max_queries, max_states, scratch)
    assert pp is not None
    assert pp.own_kv_indptr.numel() == bs + 1 and pp.groups.group_qo_indptr.numel() == max_groups + 1
    assert pp.groups.group_rows.numel() == max_queries and tuple(pp.groups.state_index.shape) == (bs, max_states)
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(scratch + 1, page_size, 2, 8, generator=gen)
    v_cache = torch.randn(scratch + 1, page_size, 2, 8, generator=gen)
    q = torch.randn(len(rows), 6, 8, generator=gen)
    got = emulate_padded(pp, q, k_cache, v_cache, page_size, bs, max_queries)
    assert not torch.isnan(got[:len(rows)]).any(), "a real row merged a part nobody computed"
    assert (got[:len(rows)] - full_attention(q, k_cache, v_cache, rows, page_size)).abs().max().item() < TOL
    # Each row writes its new K/V at its current position; padded rows write only the scratch page.
    for r, s in enumerate(rows):
        assert int(pp.positions[r]) == s.kv_len - 1
        assert int(pp.slots[r]) == s.page_ids[(s.kv_len - 1) // page_size] * page_size + (s.kv_len - 1) % page_size
    assert all(int(x) // page_size == scratch for x in pp.slots[len(rows):])


def test_padded_plan_refuses_what_the_shapes_cannot_hold() -> None:
    tables, lens, groups = two_level_batch(4)
    rows = decode_rows(tables, lens, [100 + i for i in range(len(tables))])
    assert plan_hydragen_padded(rows, groups, 4, 16, 4, 32, 4, scratch_page=99) is None      # row 2 has no own part
    keep = [0, 1, 3, 4, 5, 6]
    rows2 = [rows[i] for i in keep]
    trimmed = tuple(PrefixGroup(tuple(s for s in g.seq_ids if s != 102), g.page_ids, g.num_tokens, g.start_page)
                    for g in groups)
    assert plan_hydragen_padded(rows2, trimmed, 4, 8, 2, 16, 3, scratch_page=99) is not None
    assert plan_hydragen_padded(rows2, trimmed, 4, 5, 2, 16, 3, scratch_page=99) is None      # more rows than bs
    assert plan_hydragen_padded(rows2, trimmed, 4, 8, 1, 16, 3, scratch_page=99) is None      # more groups
    assert plan_hydragen_padded(rows2, trimmed, 4, 8, 2, 5, 3, scratch_page=99) is None       # more group queries
    assert plan_hydragen_padded(rows2, trimmed, 4, 8, 2, 16, 2, scratch_page=99) is None      # more states per row
