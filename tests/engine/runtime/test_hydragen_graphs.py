"""Hydragen inside CUDA graphs (GPU machine only; marked `gpu`, skipped in CI).

- A replayed grouped step's logits equal the eager grouped step's and the eager ungrouped step's
  within bf16 tolerance (Llama-3.2-1B and Qwen2.5-0.5B shapes; nested groups, rows in no group, a
  batch padded up to its ladder size).
- A shared-prefix batch through the whole engine with Hydragen on replays grouped graphs (counted)
  and agrees with grouping off on >= 99% of tokens.
The fixed-shape layout itself is checked on the CPU (test_hydragen_plan.py).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from tests.engine.runtime.test_cuda_graphs import QWEN_05B, TOL, assert_agree, shared_prefix_on_off  # noqa: E402
from tests.engine.runtime.test_flashinfer import LLAMA_1B, PAGE, random_model  # noqa: E402
from tokabatch.engine.core.plan import PrefixGroup  # noqa: E402
from tokabatch.engine.runtime.attention import AttentionConfig, SeqAttn  # noqa: E402
from tokabatch.engine.runtime.cuda_graphs import DecodeGraphs  # noqa: E402
from tokabatch.engine.runtime.flashinfer_backend import FlashInferBackend  # noqa: E402
from tokabatch.engine.runtime.hydragen_graphs import GroupedDecodeGraphs  # noqa: E402
from tokabatch.engine.runtime.kv_cache import KVCache  # noqa: E402


@pytest.mark.parametrize("attention", [
    AttentionConfig(own_tensor_cores=False), AttentionConfig(own_tensor_cores=None),
    AttentionConfig(fold_group_heads=True), AttentionConfig(group_kernel="fa2"),
], ids=["own-cuda-cores", "own-as-decode", "folded-group-heads", "fa2-groups"])
@pytest.mark.parametrize("config", [LLAMA_1B, QWEN_05B], ids=["llama-3.2-1b", "qwen2.5-0.5b"])
@torch.inference_mode()
def test_grouped_graph_step_matches_eager_steps(config: dict, attention: AttentionConfig) -> None:
    """(own-cuda-cores, the default: the own parts on the CUDA-core decode kernel, the plain decode
    on the tensor-core one, so the grouped graphs get decode wrappers of their own over the same
    buffers; own-as-decode: both on tensor cores, the grouped graphs reuse the plain ones' wrappers;
    folded-group-heads: the group parts' query heads folded into rows, eager and captured;
    fa2-groups: the FA2 group kernel, which splits its KV and merges in the graphs.)"""
    model, spec = random_model(config)
    rng = random.Random(2)
    system = list(range(0, 6))                  # 6 pages shared by rows 0..15
    fewshot = [list(range(6, 9)), list(range(9, 12))]   # 3 more pages for rows 0..7 and 8..15
    next_page = 12
    tables, lens = [], []
    for r in range(22):                          # rows 16..21 share nothing
        shared = system + fewshot[r // 8] if r < 16 else []
        own = list(range(next_page, next_page + 3))
        next_page += 3
        tables.append(tuple(shared + own))
        lens.append(len(shared) * PAGE + rng.randrange(1, 2 * PAGE))
    cache = KVCache(spec, num_pages=next_page + 2, page_size=PAGE, reserved_pages=1)
    dev = torch.device("cuda")
    # Fill the cache: every row's context once (shared pages written by their first row).
    with torch.no_grad():
        for layer in range(spec.num_layers):
            cache.k[layer].normal_()
            cache.v[layer].normal_()
    groups = (PrefixGroup(tuple(range(16)), tuple(system), 6 * PAGE),
              PrefixGroup(tuple(range(8)), tuple(fewshot[0]), 3 * PAGE, start_page=6),
              PrefixGroup(tuple(range(8, 16)), tuple(fewshot[1]), 3 * PAGE, start_page=6))
    tokens = [rng.randrange(spec.vocab_size) for _ in lens]
    dec = [SeqAttn(q_start=i, q_len=1, start_pos=n - 1, page_ids=tables[i], seq_id=i) for i, n in enumerate(lens)]
    ids, pos = torch.tensor(tokens, device=dev), torch.tensor([n - 1 for n in lens], device=dev)
    backend = FlashInferBackend(cache, spec.num_heads, attention)
    plain = model.compute_logits(model(ids, pos, backend.begin_step(dec, len(dec)))).float()
    grouping = FlashInferBackend(cache, spec.num_heads, replace(attention, hydragen=True))
    grouped_eager = model.compute_logits(model(ids, pos, grouping.begin_step(dec, len(dec), groups))).float()
    graphs = DecodeGraphs(model, cache, spec.num_heads, max_batch=32, sizes=[8, 32], config=attention)
    graphs.capture()
    grouped = GroupedDecodeGraphs(graphs, max_groups=4, max_states=3)
    grouped.capture()
    replayed = grouped.run(tokens, [n - 1 for n in lens], tables, list(range(len(lens))), groups)
    assert replayed is not None and grouped.num_replays == 1
    for name, ref in (("eager grouped", grouped_eager), ("eager ungrouped", plain)):
        rel = (replayed.float() - ref).norm() / ref.norm()
        print(f"grouped graph vs {name}: relative error {rel:.2e}")
        assert rel < TOL, f"grouped graph vs {name}: relative error {rel:.4f}"
    # A plain graph replay after the grouped one still matches (they share the decode buffers, and
    # the decode wrapper unless the own parts take another kernel).
    again = graphs.run(tokens, lens, tables)
    assert (again.float() - plain).norm() / plain.norm() < TOL


def test_shared_prefix_batch_replays_grouped_graphs(tmp_path: Path) -> None:
    on, off, off_logprobs, on_stats, _, grouped_replays = shared_prefix_on_off(tmp_path, 300, seed=7)
    print(f"grouped graph replays: {grouped_replays}; saved KV reads "
          f"{on_stats.num_hydragen_saved_kv_reads / max(1, on_stats.num_decode_kv_reads):.0%}")
    assert grouped_replays >= 20
    assert_agree(on, off, off_logprobs, 32, "grouped graphs on/off")
