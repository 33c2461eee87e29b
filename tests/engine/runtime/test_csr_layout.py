"""The CSR helpers flashinfer's planners are fed from (attention.py; CPU)."""

from __future__ import annotations

import torch

from tokabatch.engine.runtime.attention import csr_indptr


def test_csr_indptr_is_the_running_sum() -> None:
    assert csr_indptr([3, 0, 2]).tolist() == [0, 3, 3, 5]
    assert csr_indptr([]).tolist() == [0]
    assert csr_indptr([4]).dtype == torch.int32
