"""FlashInfer paged attention on CUDA: the fast backend, checked against TorchBackend (the reference).

Owns `FlashInferBackend`, its per-step `FlashInferAttentionContext`, and `paged_layout` (a step's
page tables as the CSR arrays flashinfer plans from, shared with cuda_graphs.py). One step is
planned once (`begin_step`), and every layer then only appends its K/V into the paged cache and
calls `run()` on each part.

A step is split in two parts by row: the leading single-token rows (the plan's decodes come first)
go through `BatchDecodeWithPagedKVCacheWrapper`, the rest (prefill chunks, chunked prefill after
cached positions) through one causal `BatchPrefillWithPagedKVCacheWrapper`. Measured on the H200:
the prefill kernel reads the KV cache of a 256-sequence decode batch at only ~0.55 TB/s, the decode
kernel at ~2.9 TB/s, so mixed steps must not send their decodes through the prefill kernel. The
decode wrapper runs its tensor-core variant (any GQA group size; 3.4-4.0 TB/s where the CUDA-core
kernel reads 3.0: decode_wrapper); the CUDA-core kernel (groups 1,2,3,4,6,8 only) stays selectable,
and takes Hydragen's own parts (short contexts over many rows) by default (HYDRAGEN_OWN_TENSOR_CORES).

KV append: each step token's flat slot (page * page_size + offset, as kv_cache.py lays it out) is
computed on the GPU from the step's page indices, then `index_copy_` into the flat view.
Importing this module also replaces the `max` flashinfer's plan() uses on host tensors by one
reduction (flashinfer_plan_speedup.py: Python's max over a tensor is slow enough to matter per step).
flashinfer is imported only here and in cuda_graphs.py; runner.select_backend imports this module
only on CUDA. Must not import the service or engine/core scheduling code.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass
from itertools import chain
from typing import Any, Sequence

import flashinfer
import flashinfer.decode
import flashinfer.prefill
import torch
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import SeqAttn, csr_indptr
from tokabatch.engine.runtime.cuda_graphs import MIN_WORKSPACE_BYTES as WORKSPACE_BYTES   # eager scratch
from tokabatch.engine.runtime.flashinfer_hydragen import FlashInferHydragenAttention
from tokabatch.engine.runtime.flashinfer_plan_speedup import install as install_fast_max
from tokabatch.engine.runtime.hydragen_plan import plan_hydragen
from tokabatch.engine.runtime.kv_cache import KVCache

PLAN_MODULES = (flashinfer.decode, flashinfer.prefill)       # their plan() takes max() of host tensors
install_fast_max(PLAN_MODULES)

CUDA_CORE_DECODE_GROUP_SIZES = (1, 2, 3, 4, 6, 8)


@dataclass(frozen=True, slots=True)
class PagedLayout:
    """Rows' page tables as host int32 CSR arrays (what flashinfer's plan() takes)."""

    q_lens: Tensor             # [n]
    kv_lens: Tensor            # [n]
    qo_indptr: Tensor          # [n + 1]
    kv_indptr: Tensor          # [n + 1], in pages
    kv_indices: Tensor         # [kv_indptr[-1]] page ids
    last_page_len: Tensor      # [n], 1..page_size


def paged_layout(seqs: Sequence[SeqAttn], page_size: int) -> PagedLayout:
    """CSR layout of `seqs` (each reads pages 0..ceil(kv_len / page_size)-1 of its table)."""
    q_lens, kv_lens, pages_per_seq, last = array("i"), array("i"), array("i"), array("i")
    tables = []
    for s in seqs:
        kv_len = s.kv_len
        num_pages = -(-kv_len // page_size)
        if len(s.page_ids) < num_pages:
            raise ValueError(f"page table of {len(s.page_ids)} pages cannot hold {kv_len} positions")
        q_lens.append(s.q_len)
        kv_lens.append(kv_len)
        pages_per_seq.append(num_pages)
        last.append(kv_len - (num_pages - 1) * page_size)
        tables.append(s.page_ids if len(s.page_ids) == num_pages else s.page_ids[:num_pages])
    q_lens_t = _int32(q_lens)
    pages_t = _int32(pages_per_seq)
    return PagedLayout(q_lens=q_lens_t, kv_lens=_int32(kv_lens), qo_indptr=csr_indptr(q_lens_t),
                       kv_indptr=csr_indptr(pages_t), kv_indices=_int32(array("i", chain.from_iterable(tables))),
                       last_page_len=_int32(last))


def _int32(values: array) -> Tensor:
    return torch.frombuffer(values, dtype=torch.int32) if len(values) else torch.zeros(0, dtype=torch.int32)


# None: the tensor-core decode kernel for every GQA group (faster on the H200: below); False: the
# CUDA-core kernel where it exists for the group; True: tensor cores always. Read when a wrapper is
# made (scripts/bench.py --decode-tensor-cores sets it for a run).
DECODE_TENSOR_CORES: bool | None = None
# The same choice for the own parts of Hydragen steps (eager and graphs): a sample's own tokens, so
# short contexts (TB: 0-256 tokens) over many rows, where the CUDA-core kernel is faster (the step
# profile and TB on and off: docs/benchmarks.md). False (the default): the CUDA-core kernel where it
# exists for the group; True: tensor cores; None: as DECODE_TENSOR_CORES.
HYDRAGEN_OWN_TENSOR_CORES: bool | None = False


def decode_tensor_cores(num_heads: int, num_kv_heads: int, own_parts: bool = False) -> bool:
    """Whether decode_wrapper (for Hydragen own parts, with `own_parts`) takes the tensor-core kernel."""
    setting = DECODE_TENSOR_CORES
    if own_parts and HYDRAGEN_OWN_TENSOR_CORES is not None:
        setting = HYDRAGEN_OWN_TENSOR_CORES
    return setting is not False or num_heads // num_kv_heads not in CUDA_CORE_DECODE_GROUP_SIZES


def decode_wrapper(workspace: Tensor, num_heads: int, num_kv_heads: int, own_parts: bool = False,
                   **graph_buffers: Any) -> flashinfer.BatchDecodeWithPagedKVCacheWrapper:
    """A decode wrapper on the tensor-core kernel (the CUDA-core one when decode_tensor_cores says
    so): on the H200 it reads the KV cache faster at the contexts the workloads decode
    (benchmarks/decode_kernel.py; docs/benchmarks.md, "The decode kernel")."""
    return flashinfer.BatchDecodeWithPagedKVCacheWrapper(
        workspace, "NHD", use_tensor_cores=decode_tensor_cores(num_heads, num_kv_heads, own_parts), **graph_buffers)


class FlashInferAttentionContext:
    """A planned step: the slot of every step token, and the wrappers of its decode and prefill rows."""

    def __init__(self, cache: KVCache, slot_mapping: Tensor,
                 decode: flashinfer.BatchDecodeWithPagedKVCacheWrapper | None, num_decode_rows: int,
                 prefill: flashinfer.BatchPrefillWithPagedKVCacheWrapper | None,
                 hydragen: FlashInferHydragenAttention | None = None) -> None:
        """`hydragen` (a planned FlashInferHydragenAttention) replaces `decode` for the decode rows."""
        self.cache, self.slot_mapping = cache, slot_mapping
        self.decode, self.num_decode_rows, self.prefill = decode, num_decode_rows, prefill
        self.hydragen = hydragen

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q: [num_tokens, heads, dim]; k, v: [num_tokens, kv_heads, dim] -> [num_tokens, heads, dim]."""
        k_flat, v_flat = self.cache.flat(layer_idx)
        k_flat.index_copy_(0, self.slot_mapping, k.to(k_flat.dtype))
        v_flat.index_copy_(0, self.slot_mapping, v.to(v_flat.dtype))
        kv = (self.cache.k[layer_idx], self.cache.v[layer_idx])
        d = self.num_decode_rows
        if self.prefill is None:
            return self._decode(layer_idx, q, kv).to(q.dtype)
        if d == 0:
            return self.prefill.run(q.contiguous(), kv).to(q.dtype)
        out = torch.empty_like(q)
        out[:d] = self._decode(layer_idx, q[:d], kv)
        out[d:] = self.prefill.run(q[d:].contiguous(), kv)
        return out

    def _decode(self, layer_idx: int, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        if self.hydragen is not None:
            return self.hydragen.run(layer_idx, q)
        return self.decode.run(q.contiguous(), kv)


class FlashInferBackend:
    """Paged attention through flashinfer over the KVCache's NHD tensors (bf16 or fp16 on CUDA).

    use_hydragen=False: prefix groups are ignored, every decode reads all its pages.
    use_hydragen=True: a step's decode rows with prefix groups are attended by parts
    (flashinfer_hydragen.py over hydragen_plan.py: shared pages read once per group, merged with the own parts)."""

    name = "flashinfer"

    def __init__(self, cache: KVCache, num_heads: int, workspace_bytes: int = WORKSPACE_BYTES,
                 use_hydragen: bool = False) -> None:
        if cache.device.type != "cuda":
            raise ValueError("FlashInferBackend needs a CUDA KV cache")
        self.cache = cache
        self.num_heads = num_heads
        self.num_kv_heads, self.head_dim = cache.k[0].shape[2], cache.k[0].shape[3]
        self.workspace = torch.empty(workspace_bytes, dtype=torch.uint8, device=cache.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, kv_layout="NHD")
        self.decode = decode_wrapper(self.workspace, num_heads, self.num_kv_heads)
        self.use_hydragen = use_hydragen
        self._hydragen: FlashInferHydragenAttention | None = None     # built on first use

    def begin_step(self, seqs: Sequence[SeqAttn], num_tokens: int,
                   prefix_groups: Sequence[PrefixGroup] = ()) -> FlashInferAttentionContext:
        """Plan one forward pass over `num_tokens` rows described by `seqs` (in row order, no gaps).

        `prefix_groups` (Hydragen; members are decode rows, named by SeqAttn.seq_id) change only
        how shared pages are read, never the result, and are used only with use_hydragen."""
        expected_start = 0
        num_decode = 0                   # leading single-token rows: the decode part
        for s in seqs:
            if s.q_start != expected_start:
                raise ValueError("FlashInferBackend needs sequences in row order without gaps")
            if s.q_len == 1 and expected_start == num_decode:
                num_decode += 1
            expected_start += s.q_len
        if expected_start != num_tokens:
            raise ValueError(f"sequences cover {expected_start} rows, the step has {num_tokens}")
        ps, dev, dtype = self.cache.page_size, self.cache.device, self.cache.dtype
        layout = paged_layout(seqs, ps)
        kv_indices = layout.kv_indices.pin_memory().to(dev, non_blocking=True)
        decode = prefill = hydragen = None
        if num_decode and self.use_hydragen and prefix_groups:
            if self._hydragen is None:
                self._hydragen = FlashInferHydragenAttention(self.cache, self.num_heads, self.workspace)
            self._hydragen.plan(plan_hydragen(seqs[:num_decode], prefix_groups, ps))
            hydragen = self._hydragen
        elif num_decode:
            n_pages = int(layout.kv_indptr[num_decode])
            self.decode.plan(layout.kv_indptr[:num_decode + 1], kv_indices[:n_pages],
                             layout.last_page_len[:num_decode], self.num_heads, self.num_kv_heads,
                             self.head_dim, ps, pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype)
            decode = self.decode
        if num_decode < len(seqs):
            first_page = int(layout.kv_indptr[num_decode])
            qo = layout.qo_indptr[num_decode:] - layout.qo_indptr[num_decode]
            kvp = layout.kv_indptr[num_decode:] - first_page
            self.prefill.plan(qo, kvp, kv_indices[first_page:], layout.last_page_len[num_decode:],
                              self.num_heads, self.num_kv_heads, self.head_dim, ps, causal=True,
                              q_data_type=dtype, kv_data_type=dtype)
            prefill = self.prefill
        slot_mapping = slot_mapping_of(layout, kv_indices, ps, num_tokens, dev)
        return FlashInferAttentionContext(self.cache, slot_mapping, decode, num_decode, prefill, hydragen)


def slot_mapping_of(layout: PagedLayout, kv_indices: Tensor, page_size: int, num_tokens: int,
                    device: torch.device) -> Tensor:
    """Flat cache slot of every step token, computed on the GPU (no per-token Python).

    Token t of sequence s sits at position kv_len[s] - q_len[s] + (t - qo_indptr[s]); its page is
    kv_indices[kv_indptr[s] + pos // page_size] and its slot page * page_size + pos % page_size.
    """
    q_lens = layout.q_lens.to(device, non_blocking=True)
    kv_lens = layout.kv_lens.to(device, non_blocking=True)
    qo_indptr = layout.qo_indptr.to(device, non_blocking=True).long()
    kv_indptr = layout.kv_indptr.to(device, non_blocking=True).long()
    # output_size keeps repeat_interleave from syncing with the GPU to learn the length.
    seq_of_token = torch.repeat_interleave(torch.arange(q_lens.numel(), device=device), q_lens.long(),
                                           output_size=num_tokens)
    row = torch.arange(num_tokens, device=device)
    pos = (kv_lens - q_lens).long()[seq_of_token] + (row - qo_indptr[seq_of_token])
    pages = kv_indices.long()[kv_indptr[seq_of_token] + pos // page_size]
    return pages * page_size + pos % page_size
