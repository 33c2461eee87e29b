"""flashinfer's fused kernels outside attention: the layers' elementwise work and the sampler's draw.

A decode step of a 1B model spends as much GPU time in elementwise kernels as in attention
(docs/benchmarks.md, "Where the time goes in a grouped decode step"): HF's rotary is five kernels
over q and k, the residual add and RMSNorm two, SwiGLU's gate two, and the sampler's Gumbel-max
draw four passes over [rows, vocab] float32. flashinfer has one kernel for each (the ones vLLM and
SGLang run): `FlashInferLayerKernels` gives them to a model through `use_kernels` with the meaning
of models/layers.LayerKernels, and `draw_from_logits` is the Sampler's draw for rows that sample
the raw logits from the shared generator.

Arithmetic: rotary reads float32 cos/sin from a table and rounds once (HF rounds cos and sin to the
activation dtype first); residual + RMSNorm and SwiGLU compute in float32 inside and round once;
all within bf16 noise, as the GPU tests' greedy agreement with HF checks. Imported only on CUDA
with flashinfer (runner.build_runners).
"""

from __future__ import annotations

import flashinfer
import torch
from torch import Tensor

from tokabatch.engine.models.layers import LayerKernels, RMSNorm, RotaryEmbedding, rope_inv_freq


class FlashInferLayerKernels(LayerKernels):
    """LayerKernels on flashinfer: rotary from a cos/sin table of every position (float32,
    [max_positions, head_dim]: cos of the head_dim / 2 frequencies, then their sin), fused residual
    add + RMSNorm, fused SiLU-and-multiply."""

    name = "flashinfer"

    def __init__(self, rotary: RotaryEmbedding, max_positions: int, device: torch.device) -> None:
        super().__init__(rotary)
        self.head_dim = rotary.cfg.head_dim
        positions = torch.arange(max_positions, dtype=torch.float32, device=device)
        freqs = positions[:, None] * rope_inv_freq(rotary.cfg).to(device)[None, :]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).contiguous()

    def rotary_state(self, positions: Tensor, dtype: torch.dtype) -> object:
        return positions

    def rotate_qk(self, qk: Tensor, num_q_heads: int, state: object) -> Tensor:
        n = qk.shape[0]
        q, k = qk[:, :num_q_heads].reshape(n, -1), qk[:, num_q_heads:].reshape(n, -1)   # views: rotated in place
        flashinfer.rope.apply_rope_with_cos_sin_cache_inplace(state, q, k, self.head_dim, self.cos_sin,
                                                              is_neox=True)
        return qk

    def add_rms_norm(self, x: Tensor, residual: Tensor | None, norm: RMSNorm) -> tuple[Tensor, Tensor]:
        if residual is None:
            return flashinfer.norm.rmsnorm(x, norm.weight, norm.eps), x
        flashinfer.norm.fused_add_rmsnorm(x, residual, norm.weight, norm.eps)   # residual += x; x = norm(residual)
        return x, residual

    def silu_mul(self, gate_up: Tensor) -> Tensor:
        return flashinfer.activation.silu_and_mul(gate_up)


def draw_from_logits(logits: Tensor, inv_temperature: Tensor | float, generator: torch.Generator) -> Tensor:
    """One token per row from softmax(logits * inv_temperature): the sampler's torch draw in two
    passes (the temperature's multiply into float32, then flashinfer's fused Gumbel-max draw
    reading each row once). inv_temperature: [rows] float32 or one float; the random
    numbers come from `generator` (its Philox offset advances as torch's own draws advance it).
    Returns [rows] int32."""
    scaled = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    if isinstance(inv_temperature, Tensor):
        torch.mul(logits, inv_temperature.unsqueeze(1), out=scaled)    # a float32 tensor: computed in float32
    elif inv_temperature == 1.0:
        scaled.copy_(logits)
    else:
        torch.mul(logits, torch.full((1, 1), inv_temperature, dtype=torch.float32, device=logits.device), out=scaled)
    return flashinfer.sampling.sampling_from_logits(scaled, generator=generator)
