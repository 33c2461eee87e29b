"""decode_layout (the CUDA-graph decode step's page layout) and paged_layout (an eager step's)
against plain references, and PageIndexCache's reuse of converted page tables from step to step.
CPU only."""

from __future__ import annotations

import random

import pytest
import torch

from tokabatch.engine.runtime.attention import SeqAttn
from tokabatch.engine.runtime.page_indices import PageIndexCache, decode_layout, paged_layout


def reference(kv_lens, tables, page_size, bs, scratch):
    indptr, indices, last = [0], [], []
    for kv, table in zip(kv_lens, tables):
        n = -(-kv // page_size)
        indices += list(table[:n])
        indptr.append(len(indices))
        last.append(kv - (n - 1) * page_size)
    for _ in range(bs - len(kv_lens)):
        indices.append(scratch)
        indptr.append(len(indices))
        last.append(1)
    return indptr, indices, last


@pytest.mark.parametrize("seed", range(6))
def test_layout_matches_the_reference_over_steps(seed: int) -> None:
    rng = random.Random(seed)
    page_size = rng.choice([1, 4, 16])
    cache = PageIndexCache()
    kv_lens = [rng.randint(1, 200) for _ in range(rng.randint(1, 40))]
    # Some tables hold exactly the pages in use, some have spare pages at the end.
    tables = [tuple(rng.sample(range(10_000), -(-kv // page_size) + rng.choice([0, 0, 2]))) for kv in kv_lens]
    for step in range(4):
        bs = len(kv_lens) + rng.randint(0, 5)
        got = decode_layout(kv_lens, tables, page_size, bs, 10_001, cache)
        want = reference(kv_lens, tables, page_size, bs, 10_001)
        assert [t.tolist() for t in got] == list(want), step
        # Next step: every sequence grows by a token; one gains a page (a new tuple), one leaves.
        kv_lens = [kv + 1 for kv in kv_lens]
        tables = [t if len(t) * page_size >= kv else t + (20_000 + step,) for t, kv in zip(tables, kv_lens)]
        if len(kv_lens) > 1:
            kv_lens, tables = kv_lens[1:], tables[1:]


def test_each_table_object_is_converted_once_while_steps_name_it() -> None:
    cache = PageIndexCache()
    a, b = (1, 2, 3), (4, 5)
    for _ in range(3):
        assert cache.join([a, b], [3, 2]).tolist() == [1, 2, 3, 4, 5]
    assert cache.num_converted == 2
    b2 = b + (6,)                       # b gained a page: a new tuple, converted once
    assert cache.join([a, b2], [2, 3]).tolist() == [1, 2, 4, 5, 6]
    assert cache.num_converted == 3
    assert cache.join([b2], [1]).tolist() == [4]       # a is no longer named: dropped
    assert cache.join([a], [1]).tolist() == [1] and cache.num_converted == 4
    assert cache.join([], []).tolist() == []


def test_bad_steps_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        decode_layout([33], [(1, 2)], 16, 4, 99, PageIndexCache())
    with pytest.raises(ValueError, match="do not fit"):
        decode_layout([1, 1], [(1,), (2,)], 16, 1, 99, PageIndexCache())


def test_rows_may_start_after_their_first_pages() -> None:
    # Hydragen's own parts: row i reads its pages from starts[i] on; a start at its last page or
    # past it means the row has nothing of its own (None).
    tables, kv_lens, starts = [(1, 2, 3, 4), (5, 6, 7)], [15, 9], [2, 0]
    indptr, indices, last = decode_layout(kv_lens, tables, 4, 3, 99, PageIndexCache(), starts)
    assert indptr.tolist() == [0, 2, 5, 6] and indices.tolist() == [3, 4, 5, 6, 7, 99]
    assert last.tolist() == [3, 1, 1]
    assert decode_layout(kv_lens, tables, 4, 3, 99, PageIndexCache(), [4, 0]) is None


@pytest.mark.parametrize("seed", range(8))
def test_steady_steps_reuse_the_last_join_and_match_the_reference(seed: int) -> None:
    """Steps with the same rows copy the unchanged rows' ids from the last step: every step still
    equals the reference, through rows gaining pages (new tuples), growing within a page, moving
    their start (Hydragen own parts), and the odd step whose rows change (a full join)."""
    rng = random.Random(seed)
    ps = (1, 4, 16, 16)[seed % 4]
    cache = PageIndexCache()
    kv_lens = [rng.randint(1, 100) for _ in range(rng.randint(1, 60))]
    tables = [tuple(rng.sample(range(10_000), -(-kv // ps) + rng.choice([0, 1]))) for kv in kv_lens]
    starts = [0] * len(kv_lens)
    for step in range(60):
        if step % 10 == 5:                    # some rows' own parts start later from now on
            starts = [rng.randrange(-(-kv // ps)) if rng.random() < 0.3 else s for kv, s in zip(kv_lens, starts)]
        bs = len(kv_lens) + rng.randint(0, 3)
        got = decode_layout(kv_lens, tables, ps, bs, 10_001, cache, starts if any(starts) else None)
        want = reference(kv_lens, tables, ps, bs, 10_001)
        # The reference without starts, then each row's first starts[i] pages cut out of it.
        indptr, indices = want[0], want[1]
        kept = [p for r in range(bs) for p in indices[indptr[r] + (starts[r] if r < len(starts) else 0):indptr[r + 1]]]
        ends, total = [0], 0
        for r in range(bs):
            total += indptr[r + 1] - indptr[r] - (starts[r] if r < len(starts) else 0)
            ends.append(total)
        assert [t.tolist() for t in got] == [ends, kept, want[2]], step
        # Next step: every row grows by a token; a row past its table's pages gains one (a new tuple).
        kv_lens = [kv + 1 for kv in kv_lens]
        tables = [t if len(t) * ps >= kv else t + (20_000 + step * 100 + i,)
                  for i, (t, kv) in enumerate(zip(tables, kv_lens))]
        if rng.random() < 0.1 and len(kv_lens) > 1:   # a row leaves: the next join is a full one
            kv_lens, tables, starts = kv_lens[1:], tables[1:], starts[1:]
    # (With page_size 16 a row gains a page every 16 steps: most steps are the last one's plus a few rows.)
    assert cache.num_rows_reused > 0 or ps < 16


def test_an_unchanged_step_converts_nothing_and_a_grown_row_alone_is_converted() -> None:
    cache = PageIndexCache()
    tables = [(1, 2, 3), (4, 5), (6, 7, 8, 9), (10,)]
    assert cache.join(tables, [3, 2, 4, 1]).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    converted = cache.num_converted
    assert cache.join(list(tables), [3, 2, 4, 1]).tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    assert cache.num_converted == converted and cache.num_rows_reused == 4
    tables[1] = (4, 5, 11)                   # row 1 gained a page
    assert cache.join(tables, [3, 3, 4, 1]).tolist() == [1, 2, 3, 4, 5, 11, 6, 7, 8, 9, 10]
    assert cache.num_converted == converted + 1 and cache.num_rows_reused == 7
    assert cache.join(tables, [3, 3, 4, 1], [1, 0, 0, 0]).tolist() == [2, 3, 4, 5, 11, 6, 7, 8, 9, 10]



def test_a_step_where_every_row_gained_a_page_is_joined_from_the_last_one(monkeypatch) -> None:
    """All rows' tables grew together (a wave's samples): the last join plus each row's new pages,
    no table converted whole; a row whose joined part changed (a page swapped for the prefix tree's
    copy) or whose start moved makes it a full join, still equal to the reference."""
    cache = PageIndexCache()
    tables = [(1, 2, 3), (4, 5), (6, 7, 8, 9)]
    starts = [1, 0, 2]
    assert cache.join(tables, [3, 2, 4], starts).tolist() == [2, 3, 4, 5, 8, 9]
    full_join = cache._join_all
    monkeypatch.setattr(cache, "_join_all", lambda *args: pytest.fail("a full join of grown rows"))
    grown = [t + (100 + i,) for i, t in enumerate(tables)]
    assert cache.join(grown, [4, 3, 5], starts).tolist() == [2, 3, 100, 4, 5, 101, 8, 9, 102]
    # Grown again, one of them by two pages and one not at all (the same table object).
    again = [grown[0] + (200, 201), grown[1], grown[2] + (202,)]
    assert cache.join(again, [6, 3, 6], starts).tolist() == [2, 3, 100, 200, 201, 4, 5, 101, 8, 9, 102, 202]
    assert cache.num_rows_reused == 1
    monkeypatch.setattr(cache, "_join_all", full_join)
    # A page inside a row's joined part swapped: the ids come from the tables, not the last join.
    swapped = [again[0][:2] + (77,) + again[0][3:] + (300,), again[1] + (301,), again[2] + (302,)]
    assert cache.join(swapped, [7, 4, 7], starts).tolist() == \
        [2, 77, 100, 200, 201, 300, 4, 5, 101, 301, 8, 9, 102, 202, 302]
    # The starts moved: a full join too.
    moved = [t + (400 + i,) for i, t in enumerate(swapped)]
    assert cache.join(moved, [8, 5, 8], [2, 1, 2]).tolist() == \
        [77, 100, 200, 201, 300, 400, 5, 101, 301, 401, 8, 9, 102, 202, 302, 402]


def eager_reference(seqs, page_size):
    """paged_layout's arrays, row by row (the per-row loop it replaced)."""
    q_lens, kv_lens, qo, kv_indptr, indices, last = [], [], [0], [0], [], []
    for s in seqs:
        kv = s.start_pos + s.q_len
        n = -(-kv // page_size)
        q_lens.append(s.q_len)
        kv_lens.append(kv)
        qo.append(qo[-1] + s.q_len)
        indices += list(s.page_ids[:n])
        kv_indptr.append(len(indices))
        last.append(kv - (n - 1) * page_size)
    return q_lens, kv_lens, qo, kv_indptr, indices, last


@pytest.mark.parametrize("seed", range(6))
def test_eager_layout_matches_the_reference_over_steps(seed: int) -> None:
    """Decode rows, then prefill chunks of several tokens (some after cached positions); the same
    rows again (the cache copies their ids), then one row gaining a page and the chunks moving on."""
    rng = random.Random(seed)
    page_size = rng.choice([1, 4, 16])
    cache = PageIndexCache()
    seqs = []
    for i in range(rng.randint(1, 30)):
        q_len = 1 if i < 20 else rng.randint(2, 40)
        start = rng.randint(0, 150)
        pages = -(-(start + q_len) // page_size) + rng.choice([0, 0, 1])
        seqs.append(SeqAttn(q_start=0, q_len=q_len, start_pos=start, page_ids=tuple(rng.sample(range(10_000), pages))))
    for step in range(3):
        got = paged_layout(seqs, page_size, cache)
        arrays = (got.q_lens, got.kv_lens, got.qo_indptr, got.kv_indptr, got.kv_indices, got.last_page_len)
        assert all(t.dtype == torch.int32 for t in arrays)
        assert [t.tolist() for t in arrays] == list(eager_reference(seqs, page_size)), step
        if step == 1:
            assert cache.num_rows_reused == len(seqs)     # the same rows: the last join, copied
            s = seqs[0]
            seqs[0] = SeqAttn(0, 1, len(s.page_ids) * page_size, s.page_ids + (20_000,))
    assert paged_layout([], page_size).kv_indices.tolist() == []


def test_eager_layout_rejects_a_short_table() -> None:
    with pytest.raises(ValueError, match="cannot hold 33 positions"):
        paged_layout([SeqAttn(0, 1, 32, (1, 2))], 16)

