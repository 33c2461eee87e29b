"""The CSR helpers flashinfer's planners are fed from (attention.py; CPU)."""

from __future__ import annotations

import random

import torch

from tokabatch.engine.runtime.attention import csr_indptr, longest_lengths


def test_longest_lengths_match_a_row_by_row_count() -> None:
    """The longest query and KV length, as flashinfer's prefill planner would find them row by row
    (a row's KV: its pages but the last, full, plus its last page's fill; a row with no page counts
    its last_page_len), for random layouts, one-row layouts and rows without pages."""
    rng = random.Random(0)
    for trial in range(200):
        page_size = rng.choice([1, 16, 64])
        rows = 1 if trial % 10 == 0 else rng.randrange(1, 40)
        q_lens = [rng.randrange(0, 300) for _ in range(rows)]
        pages = [rng.randrange(0 if trial % 3 == 0 else 1, 90) for _ in range(rows)]
        last = [rng.randrange(1, page_size + 1) for _ in range(rows)]
        expected_kv = max((max(n - 1, 0)) * page_size + fill for n, fill in zip(pages, last))
        got = longest_lengths(csr_indptr(q_lens), csr_indptr(pages), torch.tensor(last, dtype=torch.int32), page_size)
        assert got == (max(q_lens), expected_kv)
        assert all(isinstance(v, int) for v in got)


def test_csr_indptr_is_the_running_sum() -> None:
    assert csr_indptr([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert csr_indptr([]).tolist() == [0]
    assert csr_indptr([4]).dtype == torch.int32
