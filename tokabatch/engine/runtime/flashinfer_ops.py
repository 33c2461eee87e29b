"""The flashinfer helpers of every CUDA attention module: wrappers made and planned one way, the
paged step attention their per-step contexts share, and the planner speed-up.

A leaf: it imports flashinfer, torch and the runtime's torch-only modules, never the modules built
on it (flashinfer_backend: eager steps; flashinfer_hydragen: eager grouped decodes; cuda_graphs and
hydragen_graphs: captured decodes). Which kernel each wrapper takes comes from the AttentionConfig
it is given (attention.py), fixed at start-up. CUDA only. Must not import the service or
engine/core scheduling code.
"""

from __future__ import annotations

import builtins
import logging
from dataclasses import dataclass, replace
from typing import Any

import flashinfer
import flashinfer.decode
import flashinfer.prefill
import torch
from torch import Tensor

from tokabatch.engine.runtime.attention import AttentionConfig, fold_query_heads, unfold_into
from tokabatch.engine.runtime.flashinfer_plan_speedup import install
from tokabatch.engine.runtime.kv_cache import KVCache

log = logging.getLogger(__name__)

# The flashinfer release whose planners speed_up_planning was written for: their plan() takes Python's
# max over the host tensor of KV lengths (decode.py, tensor-core branch; prefill.py).
PLANNER_PATCHED_FOR = "0.6.18"

merge_states = flashinfer.merge_states


@dataclass(frozen=True, slots=True)
class PagedShape:
    """What every plan() call of one KV cache repeats: heads, head size, page size and dtype."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype

    @classmethod
    def of(cls, cache: KVCache, num_heads: int) -> PagedShape:
        return cls(num_heads, cache.k[0].shape[2], cache.k[0].shape[3], cache.page_size, cache.dtype)


def tensor_cores(config: AttentionConfig, shape: PagedShape, own_parts: bool = False) -> bool:
    """Whether a decode wrapper (for Hydragen own parts, with `own_parts`) takes the tensor-core kernel."""
    return config.tensor_cores(shape.num_heads, shape.num_kv_heads, own_parts)


def decode_wrapper(workspace: Tensor, shape: PagedShape, config: AttentionConfig, own_parts: bool = False,
                   **graph_buffers: Any) -> flashinfer.BatchDecodeWithPagedKVCacheWrapper:
    """A decode wrapper on the kernel `config` picks (`tensor_cores`); `graph_buffers`: flashinfer's
    CUDA-graph arguments (use_cuda_graph=True and the static CSR buffers)."""
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_tensor_cores=tensor_cores(config, shape, own_parts), **graph_buffers)


def prefill_wrapper(workspace: Tensor, backend: str = "auto",
                    **graph_buffers: Any) -> flashinfer.BatchPrefillWithPagedKVCacheWrapper:
    """A paged prefill wrapper over the cache's NHD layout on flashinfer's `backend` ("auto", "fa2",
    "fa3"; `graph_buffers` as for decode_wrapper)."""
    return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, kv_layout="NHD", backend=backend,
                                                          **graph_buffers)


def plan_decode(wrapper: flashinfer.BatchDecodeWithPagedKVCacheWrapper, shape: PagedShape, kv_indptr: Tensor,
                kv_indices: Tensor, last_page_len: Tensor) -> None:
    """Plan one decode call: row i reads pages kv_indices[kv_indptr[i]:kv_indptr[i+1]], the last one
    last_page_len[i] slots deep (host CSR; kv_indices may be on the device)."""
    wrapper.plan(kv_indptr, kv_indices, last_page_len, shape.num_heads, shape.num_kv_heads, shape.head_dim,
                 shape.page_size, pos_encoding_mode="NONE", q_data_type=shape.dtype, kv_data_type=shape.dtype)


def plan_prefill(wrapper: flashinfer.BatchPrefillWithPagedKVCacheWrapper, shape: PagedShape, qo_indptr: Tensor,
                 kv_indptr: Tensor, kv_indices: Tensor, last_page_len: Tensor, *, causal: bool,
                 **options: Any) -> None:
    """Plan one prefill call (query rows qo_indptr[i]:qo_indptr[i+1] for request i, pages as in
    plan_decode). The longest query is given to the planner, found with one reduction (without it,
    plan() takes Python's max over the host rows). The longest KV is not: in flashinfer 0.6.18 a
    given `max_sequence_kv` skips the host copy of the page indptr that its fa2 planner then reads
    (UnboundLocalError on the GPU), so the planner finds it itself, through speed_up_planning's max.
    `options`: more of the wrapper's plan() arguments (disable_split_kv)."""
    max_q = int((qo_indptr[1:] - qo_indptr[:-1]).max()) if qo_indptr.numel() > 1 else None
    wrapper.plan(qo_indptr, kv_indptr, kv_indices, last_page_len, shape.num_heads, shape.num_kv_heads,
                 shape.head_dim, shape.page_size, causal=causal, q_data_type=shape.dtype, kv_data_type=shape.dtype,
                 max_token_per_sequence=max_q, **options)


def plan_group_parts(wrapper: flashinfer.BatchPrefillWithPagedKVCacheWrapper, shape: PagedShape,
                     qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor, last_page_len: Tensor,
                     config: AttentionConfig) -> None:
    """Plan Hydragen's group parts: one non-causal prefill call, group i's queries (rows
    qo_indptr[i]:qo_indptr[i+1]) against its shared pages, as `config` says (fold_group_heads: as
    run_group_parts calls it with folded queries, g rows of kv_heads heads per query row)."""
    if config.fold_group_heads:
        qo_indptr = qo_indptr * (shape.num_heads // shape.num_kv_heads)
        shape = replace(shape, num_heads=shape.num_kv_heads)
    plan_prefill(wrapper, shape, qo_indptr, kv_indptr, kv_indices, last_page_len, causal=False)


def run_group_parts(wrapper: flashinfer.BatchPrefillWithPagedKVCacheWrapper, q: Tensor, kv: tuple[Tensor, Tensor],
                    out: Tensor, lse: Tensor, folded: tuple[Tensor, Tensor] | None) -> None:
    """Run the planned group parts on the gathered queries q [m, heads, dim], writing out [m, heads,
    dim] and lse [m, heads]. `folded`: None when planned unfolded; else the scratch (out, lse) of at
    least m * g rows of kv_heads heads that the folded call writes before it is unfolded into out/lse."""
    if folded is None:
        wrapper.run(q, kv, out=out, lse=lse, return_lse=True)
        return
    kv_heads = kv[0].shape[2]
    n = q.shape[0] * (q.shape[1] // kv_heads)
    folded_out, folded_lse = folded[0][:n], folded[1][:n]
    wrapper.run(fold_query_heads(q, kv_heads), kv, out=folded_out, lse=folded_lse, return_lse=True)
    unfold_into(folded_out, folded_lse, out, lse)


def speed_up_planning(on: bool = True) -> bool:
    """Make the decode and prefill planners' `max` one reduction (flashinfer_plan_speedup.tensor_max:
    the same value), only on the flashinfer release it was written for; `on=False` puts Python's back.
    Returns whether the fast max is in place."""
    version = getattr(flashinfer, "__version__", "")
    if on and not version.startswith(PLANNER_PATCHED_FOR):
        log.warning("flashinfer %s: its planners are left as they are (the one-reduction max was written "
                    "for %s)", version, PLANNER_PATCHED_FOR)
        on = False
    if on:
        install([flashinfer.decode, flashinfer.prefill])
    else:
        flashinfer.decode.max = flashinfer.prefill.max = builtins.max
    return on


class PagedStepAttention:
    """One step's attention over the paged KV cache, as a model calls it (models.layers.AttentionFn):
    write the step's K/V at `slots` (flat cache slots, one per step token), then `attend`. The eager
    step (flashinfer_backend), the captured decode (cuda_graphs) and the captured grouped decode
    (hydragen_graphs) contexts are its subclasses; each differs only in how it attends."""

    def __init__(self, cache: KVCache, slots: Tensor) -> None:
        self.cache, self.slots = cache, slots

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [num_tokens, heads, dim]; k, v: [num_tokens, kv_heads, dim] -> [num_tokens, heads, dim]."""
        k_flat, v_flat = self.cache.flat(layer_idx)
        k_flat.index_copy_(0, self.slots, k.to(k_flat.dtype))
        v_flat.index_copy_(0, self.slots, v.to(v_flat.dtype))
        kv = (self.cache.k[layer_idx], self.cache.v[layer_idx])
        # flashinfer's decode and prefill kernels (fa2, fa3) read q through its row and head strides,
        # so q stays a view of the model's qkv output instead of being copied every layer (measured
        # in docs/benchmarks.md, "Where TB's time goes now").
        return self.attend(layer_idx, q if q.stride(-1) == 1 else q.contiguous(), kv).to(q.dtype)

    def attend(self, layer_idx: int, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        """q (its last dimension contiguous; rows and heads may be strided, as a view of the
        projections) against the layer's paged K/V, the step's own K/V already in place."""
        raise NotImplementedError


__all__ = ["PLANNER_PATCHED_FOR", "PagedShape", "PagedStepAttention",
           "decode_wrapper", "merge_states", "plan_decode", "plan_group_parts", "plan_prefill", "prefill_wrapper",
           "run_group_parts", "speed_up_planning", "tensor_cores"]
