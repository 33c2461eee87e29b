"""CUDA graphs of decode steps with Hydragen prefix groups: the grouped twin of cuda_graphs.py.

Owns `GroupedDecodeGraphs`: for every ladder size of a DecodeGraphs, one more captured decode step
whose attention is by parts (hydragen_plan.py's parts) in fixed shapes: the own part is one
decode request per row (DecodeGraphs' cuda-graph decode wrapper of that size and its buffers, or
one more over the same buffers when the AttentionConfig picks another kernel for own parts), the
group parts are `max_groups` requests of one cuda-graph prefill wrapper (non-causal) over at most
`(max_states - 1) * bs` gathered queries, and `merge_states` folds `max_states` parts per row. The
parts write their outputs and log-sum-exps straight into one buffer pair (flashinfer's out=/lse=).
A step's parts are laid into those shapes by `plan_hydragen_padded` (tested on the CPU against
full attention); a step that does not fit (too many groups, levels or queries) runs eagerly.

Unlike the plain graphs, positions and KV slots come from host-filled buffers: a row's own part
starts after its groups, so its page count no longer gives its position.

Per step the CPU plans only what changed: the group half of the layout (pad_groups: group page
tables, gathered query rows, merge states) and the group wrapper's flashinfer plan are kept while
the step's seq_ids and groups are the same as the last grouped step's, so a steady step lays out
and plans only its own parts (pad_own). Built whenever Hydragen is on with CUDA graphs (the
default); tests/engine/runtime/test_hydragen_graphs.py checks it on the GPU (a replay equals the
eager grouped step exactly, and 300 shared-prefix requests agree 100% with grouping off). CUDA only
(wrappers and plans: flashinfer_ops.py). Must not import the service or engine/core scheduling code.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from tokabatch.engine.core.plan import PrefixGroup
from tokabatch.engine.runtime.attention import SeqAttn, pinned, to_device
from tokabatch.engine.runtime.cuda_graphs import DecodeGraphs, capture_graph
from tokabatch.engine.runtime.flashinfer_ops import (
    PagedStepAttention,
    merge_states,
    plan_decode,
    plan_group_parts,
    prefill_wrapper,
    run_group_parts,
    tensor_cores,
)
from tokabatch.engine.runtime.hydragen_plan import EMPTY_LSE, PaddedGroups, pad_groups, pad_own
from tokabatch.engine.runtime.page_indices import PageIndexCache


class _GroupedAttention(PagedStepAttention):
    """Per-layer attention of a grouped graph step (everything in fixed shapes of one size)."""

    def __init__(self, owner: "GroupedDecodeGraphs", bs: int) -> None:
        super().__init__(owner.cache, owner.slots[:bs])
        self.o, self.bs = owner, bs

    def attend(self, layer_idx: int, q: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        o, bs = self.o, self.bs
        m = o.max_queries(bs)
        part_out, part_lse = o.part_out[:bs + m + 1], o.part_lse[:bs + m + 1]    # own, group, empty state
        o.own_wrappers[bs].run(q, kv, out=part_out[:bs], lse=part_lse[:bs], return_lse=True)
        run_group_parts(o.group_wrappers[bs], q.index_select(0, o.group_rows[:m]), kv, part_out[bs:bs + m],
                        part_lse[bs:bs + m], o.folded)
        index = o.state_index[:bs * o.max_states]
        states_out = part_out.index_select(0, index).view(bs, o.max_states, *q.shape[1:])
        states_lse = part_lse.index_select(0, index).view(bs, o.max_states, q.shape[1])
        out, _ = merge_states(states_out, states_lse)
        return out


class GroupedDecodeGraphs:
    """Grouped decode steps captured for every size of `graphs` (a captured DecodeGraphs)."""

    def __init__(self, graphs: DecodeGraphs, max_groups: int = 128, max_states: int = 3) -> None:
        self.graphs = graphs
        self.cache = graphs.cache
        self.max_groups, self.max_states = max_groups, max_states
        dev, heads, dim = self.cache.device, graphs.num_heads, graphs.head_dim
        max_bs = graphs.max_batch
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=dev)
        self.slots = torch.full((max_bs,), self.cache.scratch_page * self.cache.page_size, dtype=torch.long,
                                device=dev)
        self.group_qo_indptr = torch.zeros(max_groups + 1, dtype=torch.int32, device=dev)
        self.group_kv_indptr = torch.arange(max_groups + 1, dtype=torch.int32, device=dev)
        self.group_last_page_len = torch.ones(max_groups, dtype=torch.int32, device=dev)
        self.group_kv_indices = torch.full((graphs.max_indices,), self.cache.scratch_page, dtype=torch.int32,
                                           device=dev)
        self.group_rows = torch.zeros(self.max_queries(max_bs), dtype=torch.long, device=dev)
        self.state_index = torch.zeros(max_bs * max_states, dtype=torch.long, device=dev)
        # The parts' outputs, written by flashinfer in place (no concatenation per layer): a step of bs
        # rows uses rows [own 0..bs-1; group queries; the empty state at bs + max_queries(bs)].
        parts = max_bs + self.max_queries(max_bs) + 1
        self.part_out = torch.zeros(parts, heads, dim, dtype=self.cache.dtype, device=dev)
        self.part_lse = torch.full((parts, heads), EMPTY_LSE, dtype=torch.float32, device=dev)
        # The group parts' folded results, when the config folds their query heads (run_group_parts).
        self.folded: tuple[Tensor, Tensor] | None = None
        if graphs.config.fold_group_heads:
            kv_heads = graphs.shape.num_kv_heads
            rows = self.max_queries(max_bs) * (heads // kv_heads)
            self.folded = (torch.zeros(rows, kv_heads, dim, dtype=self.cache.dtype, device=dev),
                           torch.zeros(rows, kv_heads, dtype=torch.float32, device=dev))
        self.group_wrappers: dict[int, Any] = {}
        # The own parts' decode wrapper per size: the plain graphs' own (same buffers), unless the
        # config picks another kernel for Hydragen own parts; then one more over them.
        self.own_wrappers: dict[int, Any] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        # The group half of the last planned step and its key (bs, seq_ids, groups): while a step has
        # the same key, its group buffers and the group wrapper's plan are still in place (they are
        # shared by all sizes, so only the last step's can be reused).
        self._groups_key: tuple | None = None
        self._padded_groups: PaddedGroups | None = None
        # The own parts' page ids, made from the last grouped step's (not shared with the plain
        # graphs: each reuses its own last step).
        self._page_index = PageIndexCache()

    def max_queries(self, bs: int) -> int:
        """Group-part query rows a step of `bs` rows may have: each row in up to max_states - 1 groups."""
        return (self.max_states - 1) * bs

    # ---- start-up ------------------------------------------------------------------------------

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture a grouped step for every size (largest first, one shared memory pool)."""
        pool = torch.cuda.graph_pool_handle()
        scratch = self.cache.scratch_page
        g = self.max_groups
        gr = self.graphs
        own_kernel_differs = tensor_cores(gr.config, gr.shape, own_parts=True) != tensor_cores(gr.config, gr.shape)
        for bs in reversed(self.graphs.sizes):
            self.own_wrappers[bs] = gr.graph_decode_wrapper(bs, own_parts=True) if own_kernel_differs \
                else gr._wrappers[bs]
            self.group_wrappers[bs] = prefill_wrapper(
                gr.workspace, gr.config.group_kernel, use_cuda_graph=True, qo_indptr_buf=self.group_qo_indptr,
                paged_kv_indptr_buf=self.group_kv_indptr, paged_kv_indices_buf=self.group_kv_indices,
                paged_kv_last_page_len_buf=self.group_last_page_len)
            # The first plan fixes the largest query count: all of it in group 0, the rest empty.
            m = self.max_queries(bs)
            qo = torch.full((g + 1,), m, dtype=torch.int32)
            qo[0] = 0
            self._plan_own(bs, torch.arange(bs + 1, dtype=torch.int32), torch.full((bs,), scratch, dtype=torch.int32),
                           torch.ones(bs, dtype=torch.int32))
            self._plan_groups(bs, qo, torch.arange(g + 1, dtype=torch.int32),
                              torch.full((g,), scratch, dtype=torch.int32), torch.ones(g, dtype=torch.int32))
            self._graphs[bs], _ = capture_graph(lambda bs=bs: self._forward(bs), pool)
        self._groups_key = None
        torch.cuda.synchronize()

    def _forward(self, bs: int) -> Tensor:
        model = self.graphs.model
        empty = bs + self.max_queries(bs)            # a larger size's parts may have written this row
        self.part_out[empty].zero_()
        self.part_lse[empty].fill_(EMPTY_LSE)
        hidden = model(self.graphs.input_ids[:bs], self.positions[:bs], _GroupedAttention(self, bs))
        return model.compute_logits(hidden, out=self.graphs.logits[:bs])   # the plain graphs' buffer

    # ---- per step ------------------------------------------------------------------------------

    def run(self, token_ids: Sequence[int], start_positions: Sequence[int], page_tables: Sequence[Sequence[int]],
            seq_ids: Sequence[int], groups: Sequence[PrefixGroup]) -> Tensor | None:
        """One grouped decode step (row i: token_ids[i] at position start_positions[i]); logits
        [rows, vocab] valid until the next replay, or None when it does not fit (run it eagerly)."""
        rows = len(token_ids)
        bs = self.graphs.bucket(rows)
        if bs is None or rows == 0:
            return None
        ps = self.cache.page_size
        key = (bs, tuple(seq_ids), tuple(groups))
        reuse = key == self._groups_key
        if not reuse:
            seqs = [SeqAttn(q_start=i, q_len=1, start_pos=p, page_ids=t, seq_id=s)
                    for i, (p, t, s) in enumerate(zip(start_positions, page_tables, seq_ids))]
            self._groups_key = None           # the shared group buffers are about to change
            self._padded_groups = pad_groups(seqs, groups, ps, bs, self.max_groups, self.max_queries(bs),
                                             self.max_states, self.cache.scratch_page)
            if self._padded_groups is None or len(self._padded_groups.group_kv_indices) > self.graphs.max_indices:
                return None
        padded = pad_own([p + 1 for p in start_positions], page_tables, self._padded_groups, ps, bs,
                         self.cache.scratch_page, self._page_index)
        if padded is None or len(padded.own_kv_indices) > self.graphs.max_indices:
            return None
        dev = self.cache.device
        ids = torch.zeros(bs, dtype=torch.long)
        ids[:rows] = torch.as_tensor(token_ids, dtype=torch.long)
        copies = [(self.graphs.input_ids, ids), (self.positions, padded.positions), (self.slots, padded.slots)]
        if not reuse:
            copies += [(self.group_rows, padded.groups.group_rows),
                       (self.state_index, padded.groups.state_index.reshape(-1))]
        for buffer, host in copies:
            buffer[:host.numel()].copy_(pinned(host), non_blocking=True)
        self._plan_own(bs, padded.own_kv_indptr, to_device(padded.own_kv_indices, dev), padded.own_last_page_len)
        if not reuse:
            self._plan_groups(bs, padded.groups.group_qo_indptr, padded.groups.group_kv_indptr,
                              to_device(padded.groups.group_kv_indices, dev), padded.groups.group_last_page_len)
            self._groups_key = key
        self._graphs[bs].replay()
        self.num_replays += 1
        return self.graphs.logits[:rows]

    def _plan_own(self, bs: int, indptr: Tensor, indices: Tensor, last_page_len: Tensor) -> None:
        plan_decode(self.own_wrappers[bs], self.graphs.shape, indptr, indices, last_page_len)

    def _plan_groups(self, bs: int, qo_indptr: Tensor, indptr: Tensor, indices: Tensor, last_page_len: Tensor) -> None:
        plan_group_parts(self.group_wrappers[bs], self.graphs.shape, qo_indptr, indptr, indices, last_page_len,
                         self.graphs.config)
