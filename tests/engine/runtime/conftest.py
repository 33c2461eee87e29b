"""Tiny random HF checkpoints (built in milliseconds) and a paged step driver for runtime tests."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokabatch.engine.runtime.attention import SeqAttn, TorchBackend  # noqa: E402
from tokabatch.engine.runtime.kv_cache import KVCache  # noqa: E402

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64, "rope_theta": 500000.0}


# Every runtime test that takes `device` runs on CPU, and on CUDA where present (the GPU machine).
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


def build_hf_model(arch: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random HF model whose every parameter is perturbed (biases non-zero, norms not all ones)."""
    import transformers

    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "mistral": transformers.MistralConfig}[arch]
    model_cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[arch]
    config = config_cls(**{**TINY, **overrides})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = model_cls(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith(".bias"):
                p.copy_(0.2 * torch.randn_like(p))
    return model


@pytest.fixture
def hf_checkpoint(tmp_path: Path) -> Callable[..., tuple[torch.nn.Module, Path]]:
    """Factory: (hf_model, folder) for an architecture and config overrides, saved as safetensors."""
    counter = iter(range(1000))

    def make(arch: str = "llama", seed: int = 0, max_shard_size: str | None = None,
             **overrides: Any) -> tuple[torch.nn.Module, Path]:
        model = build_hf_model(arch, seed, **overrides)
        folder = tmp_path / f"{arch}-{next(counter)}"
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(folder, safe_serialization=True, **kwargs)
        return model, folder

    return make


def hf_logits(model: torch.nn.Module, token_ids: Sequence[int]) -> torch.Tensor:
    """HF's logits for every position of one sequence: [len, vocab] float32."""
    with torch.no_grad():
        return model(torch.tensor([list(token_ids)])).logits[0].float()


class PagedDriver:
    """Runs steps of (seq_index, num_tokens) chunks through our model and a paged KV cache, keeping
    every position's logits, so tests can compare against HF's full-sequence logits."""

    def __init__(self, model: torch.nn.Module, spec: Any, prompts: Sequence[Sequence[int]],
                 page_size: int = 16, seed: int = 0) -> None:
        self.model, self.prompts = model, [list(p) for p in prompts]
        pages_per_seq = [-(-len(p) // page_size) for p in self.prompts]
        self.cache = KVCache(spec, num_pages=sum(pages_per_seq) + 3, page_size=page_size)
        self.backend = TorchBackend(self.cache)
        free = list(range(self.cache.num_pages))
        random.Random(seed).shuffle(free)    # non-contiguous page tables on purpose
        self.page_ids = []
        for n in pages_per_seq:
            self.page_ids.append(tuple(free[:n]))
            free = free[n:]
        self.done = [0] * len(self.prompts)
        self.logits: list[list[torch.Tensor]] = [[] for _ in self.prompts]

    def step(self, chunks: Sequence[tuple[int, int]]) -> None:
        ids, positions, seqs = [], [], []
        for i, n in chunks:
            start = self.done[i]
            seqs.append(SeqAttn(q_start=len(ids), q_len=n, start_pos=start, page_ids=self.page_ids[i]))
            ids += self.prompts[i][start:start + n]
            positions += range(start, start + n)
            self.done[i] += n
        ctx = self.backend.begin_step(seqs, len(ids))
        with torch.inference_mode():
            dev = self.cache.device
            hidden = self.model(torch.tensor(ids, device=dev), torch.tensor(positions, device=dev), ctx)
            logits = self.model.compute_logits(hidden).float()
        for (i, _n), s in zip(chunks, seqs):
            self.logits[i].extend(logits[s.q_start:s.q_start + s.q_len])

    def all_logits(self, i: int) -> torch.Tensor:
        return torch.stack(self.logits[i]).cpu()
