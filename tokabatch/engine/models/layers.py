"""Building blocks shared by the model families: RMSNorm, rotary embeddings (incl. llama3 scaling), SwiGLU MLP.

Plain torch. Must not import anything from engine/runtime (attention reaches a model only through
the `AttentionFn` protocol below, fused kernels through `LayerKernels`) nor any serving code. The
arithmetic mirrors HF transformers' (float32 RMSNorm, float32 rotary angles cast to the activation
dtype) so float32 logits match theirs to ~1e-6.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class AttentionFn(Protocol):
    """What a model calls for attention; the runtime's per-step attention context implements it.

    q: [num_tokens, num_heads, head_dim], k/v: [num_tokens, num_kv_heads, head_dim] (rotary already
    applied). Stores k/v in the KV cache and returns [num_tokens, num_heads, head_dim].
    """

    def __call__(self, layer_idx: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor: ...


class LayerKernels:
    """The elementwise work of a decoder layer, in plain torch with HF's arithmetic: the rotary
    embedding of q and k, residual add + RMSNorm, SwiGLU's gate. A model calls these and nothing
    else for that work, so the runtime can hand it fused GPU kernels with the same meaning
    (runtime/flashinfer_kernels.py) through `LlamaForCausalLM.use_kernels`."""

    name = "torch"

    def __init__(self, rotary: "RotaryEmbedding") -> None:
        self.rotary = rotary

    def rotary_state(self, positions: Tensor, dtype: torch.dtype) -> object:
        """Whatever `rotate_qk` needs for this step's positions, computed once per forward."""
        return self.rotary(positions, dtype)

    def rotate_qk(self, qk: Tensor, num_q_heads: int, state: object) -> Tensor:
        """qk: [tokens, q heads + kv heads, head_dim] (q's heads first) -> rotated (may be in place)."""
        cos, sin = state
        return apply_rotary(qk, cos, sin)

    def add_rms_norm(self, x: Tensor, residual: Tensor | None, norm: "RMSNorm") -> tuple[Tensor, Tensor]:
        """residual += x (residual None: x starts it), then (norm(residual), residual). `x` may be overwritten."""
        residual = x if residual is None else residual + x
        return norm(residual), residual

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        """[..., 2 * inter] (gate first) -> silu(gate) * up, [..., inter]."""
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary settings read from config.json (HF v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""

    head_dim: int
    theta: float = 10000.0
    rope_type: str = "default"           # "default" | "linear" | "llama3"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(cfg: RopeConfig) -> Tensor:
    """Inverse frequencies [head_dim // 2], float32 on CPU, as HF computes them for each rope_type."""
    exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float() / cfg.head_dim
    inv_freq = 1.0 / (cfg.theta ** exponents)
    if cfg.rope_type == "linear":
        return inv_freq / cfg.factor
    if cfg.rope_type != "llama3":
        return inv_freq
    # llama3: long wavelengths (beyond the original context / low_freq_factor) are slowed down by
    # `factor`, short ones (below original / high_freq_factor) kept, the band between interpolated.
    old_len = cfg.original_max_position_embeddings
    low_freq_wavelen = old_len / cfg.low_freq_factor
    high_freq_wavelen = old_len / cfg.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / cfg.factor, inv_freq)
    smooth = (old_len / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    smoothed = (1 - smooth) * scaled / cfg.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin for arbitrary positions (each token carries its own, so mixed steps need no layout).

    `inv_freq` is a non-persistent float32 buffer; a model built on the meta device gets it back
    through `init_buffers(device)` (the loader calls it after materializing the parameters).
    """

    def __init__(self, cfg: RopeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def init_buffers(self, device: torch.device) -> None:
        self.inv_freq = rope_inv_freq(self.cfg).to(device)

    def forward(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """positions: [num_tokens] int64 -> (cos, sin), each [num_tokens, head_dim] in `dtype`."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x: [num_tokens, heads, head_dim]; cos/sin: [num_tokens, head_dim] (HF's half-split layout)."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            # HF's arithmetic, exactly (the float32 tests compare logits with HF's to ~1e-6).
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        # bf16/fp16: one fused kernel (float32 inside) instead of ~7 elementwise passes; it rounds
        # once where HF rounds before and after the weight, a difference within bf16 noise.
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class GatedMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

        self.gate_up_proj: nn.Linear | None = None    # set by fuse()

    def fuse(self) -> None:
        """Replace gate/up_proj by one gate_up_proj (gate rows first): one GEMM instead of two."""
        if self.gate_up_proj is not None:
            return
        g, u = self.gate_proj, self.up_proj
        fused = nn.Linear(g.weight.shape[1], 2 * g.weight.shape[0], bias=g.bias is not None,
                          device=g.weight.device, dtype=g.weight.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([g.weight, u.weight]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([g.bias, u.bias]))
        self.gate_up_proj = fused.requires_grad_(False)
        del self.gate_proj, self.up_proj

    def forward(self, x: Tensor, kernels: LayerKernels) -> Tensor:
        if self.gate_up_proj is not None:
            return self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
