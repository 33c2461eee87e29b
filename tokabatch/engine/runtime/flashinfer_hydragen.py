"""Hydragen decode attention by parts on the GPU, through flashinfer: `FlashInferHydragenAttention`
runs a hydragen_plan.HydragenPlan (the parts and the worked example are there) with two wrappers
planned once per step, a group-part prefill call and an own-part decode call, and folds each row's
part outputs with flashinfer.merge_states, per layer.

The caller appends the step's K/V to the cache before `run` (as FlashInferAttentionContext does):
the own part includes the current token. flashinfer's lse is base 2, never mixed with
attention.py's natural-log values. CUDA only (wrappers and plans: flashinfer_ops.py). Must not
import the service or engine/core scheduling code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokabatch.engine.runtime.attention import DEFAULT_ATTENTION, AttentionConfig
from tokabatch.engine.runtime.flashinfer_ops import (
    PagedShape,
    decode_wrapper,
    merge_states,
    plan_decode,
    plan_group_parts,
    prefill_wrapper,
    run_group_parts,
)
from tokabatch.engine.runtime.hydragen_plan import EMPTY_LSE, HydragenPlan
from tokabatch.engine.runtime.kv_cache import KVCache

__all__ = ["FlashInferHydragenAttention"]


class _DeviceBuffer:
    """A device tensor reused from step to step (first dim grows, by re-allocation, when needed)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        self.tensor = torch.empty(shape, dtype=dtype, device=device)

    def take(self, n: int) -> Tensor:
        """The first n rows, growing the buffer to at least 2x its size if it is too small."""
        if n > self.tensor.shape[0]:
            grown = max(n, 2 * self.tensor.shape[0])
            self.tensor = torch.empty((grown, *self.tensor.shape[1:]), dtype=self.tensor.dtype,
                                      device=self.tensor.device)
        return self.tensor[:n]

    def load(self, host: Tensor) -> Tensor:
        """`host` copied into the first rows (asynchronously; stream order protects earlier readers)."""
        view = self.take(host.shape[0])
        view.copy_(host, non_blocking=True)
        return view


class FlashInferHydragenAttention:
    """Hydragen decode attention on CUDA over a KVCache's NHD tensors (bf16 or fp16).

    Per step: `plan(plan_hydragen(rows, groups, page_size))` once, then per layer, after the
    step's K/V is appended to the cache, `run(layer_idx, q)` with q [B, heads, dim] in row order.
    `workspace` is flashinfer's float scratch (>= 128 MiB); both wrappers share it (they run one
    after the other on one stream), and it may be the one the FlashInferBackend's wrappers use.
    `config` picks the own parts' decode kernel. `max_rows` sizes the reused device buffers up
    front (they grow if a step needs more)."""

    def __init__(self, cache: KVCache, num_heads: int, workspace: Tensor,
                 config: AttentionConfig = DEFAULT_ATTENTION, max_rows: int = 512) -> None:
        if cache.device.type != "cuda":
            raise ValueError("FlashInferHydragenAttention needs a CUDA KV cache")
        self.cache = cache
        self.shape = PagedShape.of(cache, num_heads)
        self.num_heads, self.head_dim = num_heads, self.shape.head_dim
        dev = cache.device
        self.group_wrapper = prefill_wrapper(workspace, config.group_kernel)
        self.own_wrapper = decode_wrapper(workspace, self.shape, config, own_parts=True)
        pages_guess = max_rows * 64
        self._group_indices = _DeviceBuffer((pages_guess,), torch.int32, dev)
        self._own_indices = _DeviceBuffer((pages_guess,), torch.int32, dev)
        self._group_rows = _DeviceBuffer((max_rows,), torch.long, dev)
        self._own_rows = _DeviceBuffer((max_rows,), torch.long, dev)
        self._state_index = _DeviceBuffer((2 * max_rows,), torch.long, dev)
        self._part_out = _DeviceBuffer((3 * max_rows, num_heads, self.head_dim), cache.dtype, dev)
        self._part_lse = _DeviceBuffer((3 * max_rows, num_heads), torch.float32, dev)
        # The group parts' folded results (AttentionConfig.fold_group_heads), before they are unfolded.
        self.config = config
        folded_rows = 2 * max_rows * (num_heads // self.shape.num_kv_heads) if config.fold_group_heads else 0
        self._folded_out = _DeviceBuffer((folded_rows, self.shape.num_kv_heads, self.head_dim), cache.dtype, dev)
        self._folded_lse = _DeviceBuffer((folded_rows, self.shape.num_kv_heads), torch.float32, dev)
        # The planned step's device gather indices (views into the buffers above).
        self.group_rows = self.own_rows = self.state_index = torch.empty(0, dtype=torch.long, device=dev)
        self.hplan: HydragenPlan | None = None

    def plan(self, hplan: HydragenPlan) -> None:
        """Plan the step: copy the indices to the device and plan both wrappers (once per step)."""
        if hplan.page_size != self.cache.page_size:
            raise ValueError(f"plan for page size {hplan.page_size}, cache has {self.cache.page_size}")
        if hplan.num_groups:
            plan_group_parts(self.group_wrapper, self.shape, hplan.group_qo_indptr, hplan.group_kv_indptr,
                             self._group_indices.load(hplan.group_kv_indices), hplan.group_last_page_len,
                             self.config)
            self.group_rows = self._group_rows.load(hplan.group_rows)
        if hplan.num_own:
            plan_decode(self.own_wrapper, self.shape, hplan.own_kv_indptr,
                        self._own_indices.load(hplan.own_kv_indices), hplan.own_last_page_len)
            self.own_rows = self._own_rows.load(hplan.own_rows)
        if not hplan.own_only:
            self.state_index = self._state_index.load(hplan.state_index.reshape(-1))
            # The empty state: never written by run(), so set once per step.
            empty = hplan.empty_state
            self._part_out.take(empty + 1)[empty].zero_()
            self._part_lse.take(empty + 1)[empty].fill_(EMPTY_LSE)
        self.hplan = hplan

    def run(self, layer_idx: int, q: Tensor) -> Tensor:
        """q: [B, heads, dim] in the cache dtype, decode rows in plan order -> out [B, heads, dim].
        The step's K/V must already be in the cache."""
        hp = self.hplan
        if hp is None:
            raise RuntimeError("run() before plan()")
        if hp.num_rows == 0 and q.shape[0] == 0:
            return q.new_empty(q.shape)
        if q.shape != (hp.num_rows, self.num_heads, self.head_dim):
            expected = (hp.num_rows, self.num_heads, self.head_dim)
            raise ValueError(f"expected q of shape {expected}, got {tuple(q.shape)}")
        kv = (self.cache.k[layer_idx], self.cache.v[layer_idx])
        q = q.contiguous()
        if hp.own_only:
            return self.own_wrapper.run(q, kv)
        n_own, n_grp = hp.num_own, hp.num_group_queries
        part_out = self._part_out.take(hp.empty_state + 1)
        part_lse = self._part_lse.take(hp.empty_state + 1)
        if n_own:
            q_own = q if n_own == hp.num_rows else q.index_select(0, self.own_rows)
            self.own_wrapper.run(q_own, kv, out=part_out[:n_own], lse=part_lse[:n_own], return_lse=True)
        if n_grp:
            folded = None
            if self.config.fold_group_heads:
                n_folded = n_grp * (self.num_heads // self.shape.num_kv_heads)
                folded = self._folded_out.take(n_folded), self._folded_lse.take(n_folded)
            run_group_parts(self.group_wrapper, q.index_select(0, self.group_rows), kv,
                            part_out[n_own:n_own + n_grp], part_lse[n_own:n_own + n_grp], folded)
        b, s = hp.num_rows, hp.num_states
        states_out = part_out.index_select(0, self.state_index).view(b, s, self.num_heads, self.head_dim)
        states_lse = part_lse.index_select(0, self.state_index).view(b, s, self.num_heads)
        out, _ = merge_states(states_out, states_lse)
        return out
