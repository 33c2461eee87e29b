"""FlashInferBackend logits equal TorchBackend's (bf16, relative error < 2e-2) on real model shapes.

Runs on the GPU machine only (marked `gpu`; skipped without CUDA or flashinfer). Random weights in
the exact Llama-3.2-1B and Qwen2.5-1.5B shapes (two layers, to keep start-up short), the same
step schedule through both backends over scrambled, non-contiguous page tables: whole prefills,
chunked prefill (chunks not page-aligned), decode steps, and mixed steps (decodes + chunks).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from tokabatch.engine.runtime.attention import SeqAttn, TorchBackend  # noqa: E402
from tokabatch.engine.runtime.flashinfer_backend import FlashInferBackend  # noqa: E402
from tokabatch.engine.runtime.kv_cache import KVCache  # noqa: E402
from tokabatch.engine.runtime.runner import select_backend  # noqa: E402
from tokabatch.engine.runtime.weights import ModelSpec, build_on_meta  # noqa: E402

LLAMA_1B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
                intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=True,
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
QWEN_1_5B = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
                 intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=1000000.0)
TOL = 2e-2
PAGE = 16
DEV = torch.device("cuda")


def random_model(config: dict[str, Any], num_layers: int = 2, seed: int = 0) -> tuple[torch.nn.Module, ModelSpec]:
    """Our model in bf16 on CUDA with random weights (norms near 1, biases non-zero)."""
    config = {**config, "num_hidden_layers": num_layers}
    model = build_on_meta(config, torch.bfloat16, DEV)
    gen = torch.Generator(device=DEV).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=DEV, dtype=torch.float32)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith(".bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.02 * noise)
    model.eval().requires_grad_(False)
    a = model.args
    spec = ModelSpec(architecture=config["architectures"][0], num_layers=a.num_layers, num_heads=a.num_heads,
                     num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, hidden_size=a.hidden_size,
                     vocab_size=a.vocab_size, max_position_embeddings=a.max_position_embeddings,
                     eos_token_ids=(), dtype=torch.bfloat16, device=DEV)
    return model, spec


class Driver:
    """Feeds (seq, num_tokens) chunks of fixed token streams through the model with one backend."""

    def __init__(self, model: torch.nn.Module, backend: Any, streams: list[list[int]],
                 page_tables: list[tuple[int, ...]]) -> None:
        self.model, self.backend, self.streams, self.tables = model, backend, streams, page_tables
        self.done = [0] * len(streams)

    @torch.inference_mode()
    def step(self, chunks: list[tuple[int, int]]) -> torch.Tensor:
        ids, positions, seqs = [], [], []
        for i, n in chunks:
            start = self.done[i]
            seqs.append(SeqAttn(q_start=len(ids), q_len=n, start_pos=start, page_ids=self.tables[i], seq_id=i))
            ids += self.streams[i][start:start + n]
            positions += range(start, start + n)
            self.done[i] += n
        ctx = self.backend.begin_step(seqs, len(ids))
        hidden = self.model(torch.tensor(ids, device=DEV), torch.tensor(positions, device=DEV), ctx)
        return self.model.compute_logits(hidden).float()


def schedule(kind: str, lens: list[int], num_decodes: int) -> list[list[tuple[int, int]]]:
    """Steps of (seq, num_tokens): prompts first (whole or chunked), then decode / mixed steps."""
    if kind in ("prefill", "decode"):
        steps = [[(i, n) for i, n in enumerate(lens)]]
        if kind == "decode":
            steps += [[(i, 1) for i in range(len(lens))] for _ in range(num_decodes)]
        return steps
    if kind == "chunked":
        steps, left = [], list(lens)
        while any(left):
            chunk = [(i, min(37, n)) for i, n in enumerate(left) if n]
            for i, n in chunk:
                left[i] -= n
            steps.append(chunk)
        return steps
    # mixed: the first half is prefilled at once; then each step decodes it while the rest prefill in chunks
    half = len(lens) // 2
    steps, left = [[(i, lens[i]) for i in range(half)]], {i: lens[i] for i in range(half, len(lens))}
    while any(left.values()):
        chunk = [(i, min(53, n)) for i, n in left.items() if n]
        for i, n in chunk:
            left[i] -= n
        steps.append([(i, 1) for i in range(half)] + chunk)
    return steps


@pytest.mark.parametrize("config", [LLAMA_1B, QWEN_1_5B], ids=["llama-3.2-1b", "qwen2.5-1.5b"])
@pytest.mark.parametrize("kind", ["prefill", "chunked", "decode", "mixed"])
def test_flashinfer_logits_match_torch(config: dict[str, Any], kind: str) -> None:
    model, spec = random_model(config)
    rng = random.Random(1)
    prompt_lens = [1, 17, 100, 260, 513, 64]
    num_decodes = 8
    streams = [[rng.randrange(spec.vocab_size) for _ in range(n + 3 * num_decodes)] for n in prompt_lens]
    pages_per_seq = [-(-len(s) // PAGE) for s in streams]
    num_pages = sum(pages_per_seq) + 5
    free = list(range(num_pages))
    rng.shuffle(free)                            # scrambled page tables on purpose
    tables = []
    for n in pages_per_seq:
        tables.append(tuple(free[:n]))
        free = free[n:]
    steps = schedule(kind, prompt_lens, num_decodes)
    fi_cache = KVCache(spec, num_pages=num_pages, page_size=PAGE)
    fi = Driver(model, FlashInferBackend(fi_cache, spec.num_heads), streams, tables)
    ref = Driver(model, TorchBackend(KVCache(spec, num_pages=num_pages, page_size=PAGE)), streams, tables)
    for step_idx, chunks in enumerate(steps):
        got, want = fi.step(chunks), ref.step(chunks)
        rel = (got - want).norm(dim=-1) / want.norm(dim=-1)
        assert rel.max().item() < TOL, f"step {step_idx} ({kind}): max relative error {rel.max().item():.3g}"
    # The caches themselves agree too: the append wrote every token where the reference did.
    assert torch.allclose(fi_cache.k[0].float(), ref.backend.cache.k[0].float(), atol=1e-2, rtol=1e-2)


def test_select_backend_picks_flashinfer_on_cuda_bf16() -> None:
    _, spec = random_model(QWEN_1_5B, num_layers=1)
    assert select_backend(KVCache(spec, num_pages=4, page_size=PAGE), spec.num_heads).name == "flashinfer"
    cpu_cache = KVCache(spec, num_pages=4, page_size=PAGE, device="cpu")
    assert select_backend(cpu_cache, spec.num_heads).name == "torch"


def test_flashinfer_plans_take_the_one_reduction_max() -> None:
    """A FlashInferBackend puts flashinfer_plan_speedup.tensor_max where flashinfer's decode and
    prefill plan() look `max` up (this flashinfer is the release it was written for), and off puts
    Python's back; a 1,024-row tensor-core decode plan still finds the longest KV (and prints its
    time). The prefill planner, given the longest query (flashinfer_ops.plan_prefill), finds the same
    maxima as it would itself."""
    import builtins
    import time

    import flashinfer.decode
    import flashinfer.prefill

    from tokabatch.engine.runtime.attention import AttentionConfig
    from tokabatch.engine.runtime.flashinfer_ops import PagedShape, decode_wrapper, plan_decode, plan_prefill
    from tokabatch.engine.runtime.flashinfer_plan_speedup import tensor_max
    from tokabatch.engine.runtime.graph_sizes import MIN_WORKSPACE_BYTES

    _, spec = random_model(LLAMA_1B, num_layers=1)        # head_dim 64: the kernels the other GPU tests build
    cache = KVCache(spec, num_pages=4, page_size=PAGE)
    FlashInferBackend(cache, spec.num_heads, AttentionConfig(fast_planning=False))
    assert flashinfer.decode.max is builtins.max and flashinfer.prefill.max is builtins.max
    backend = FlashInferBackend(cache, spec.num_heads)
    assert flashinfer.decode.max is tensor_max and flashinfer.prefill.max is tensor_max
    rows = 1024
    shape = PagedShape(32, 8, 64, PAGE, torch.bfloat16)
    wrapper = decode_wrapper(torch.empty(MIN_WORKSPACE_BYTES, dtype=torch.uint8, device=DEV), shape, AttentionConfig())
    indptr = torch.arange(0, rows * 64 + 1, 64, dtype=torch.int32)
    indices = torch.arange(rows * 64, dtype=torch.int32)
    last = torch.full((rows,), 5, dtype=torch.int32)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        plan_decode(wrapper, shape, indptr, indices, last)
        times.append(time.perf_counter() - start)
    assert wrapper._max_kv_len == 63 * PAGE + 5
    print(f"1,024-row decode plan: {min(times) * 1e3:.3f} ms")
    qo = torch.tensor([0, 3, 10, 11], dtype=torch.int32)
    kv = torch.tensor([0, 1, 3, 4], dtype=torch.int32)
    plan_prefill(backend.prefill, PagedShape.of(cache, spec.num_heads), qo, kv, torch.arange(4, dtype=torch.int32),
                 torch.tensor([3, 9, 16], dtype=torch.int32), causal=True)
    assert (backend.prefill._max_q_len, backend.prefill._max_kv_len) == (7, PAGE + 9)
