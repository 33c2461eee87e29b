"""decode_layout (the CUDA-graph decode step's page layout) against a plain reference, and
PageIndexCache's reuse of converted page tables from step to step. CPU only."""

from __future__ import annotations

import random

import pytest

from tokabatch.engine.runtime.page_indices import PageIndexCache, decode_layout


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
