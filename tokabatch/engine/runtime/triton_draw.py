"""The sampler's draw in one pass over the logits (Triton): for rows that sample the raw logits
with the shared generator, as flashinfer_kernels.draw_from_logits does, reading each row once.

flashinfer's `sampling_from_logits` converts the logits to float32 before it draws: on a 1,024-row
step over a 128,256-token vocabulary that copy took 0.41 ms and the draw 0.37 ms of a 6.84 ms step
(H100 profile, docs/benchmarks.md, "Where TB's time goes now"). Here one program per row reads the
row in its own dtype, scales it by the row's inverse temperature in float32, adds Gumbel noise and
keeps the running argmax: argmax(x / T + G), G = -log(-log U), is a draw from softmax(x / T). U
comes from Philox keyed by the generator's seed, at counters from its offset, which then advances by
rows x vocab (rounded up to 4), as flashinfer advances it; a token masked to -inf is never drawn.
Not yet the engine's draw: written after the session's last GPU call, it has run only under
Triton's CPU interpreter (token frequencies within 0.0035 of the softmax at 20,000 draws for T = 0.5
and 1, 0.011 at 5,000 for T = 1.7; a planted token drawn across three blocks; -inf never drawn). The
GPU tests (test_flashinfer_kernels.py) run both draws; runner.build_runners takes this one once
they pass and a TB run against flashinfer's draw shows the gain. Needs CUDA and triton.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_max(logits, inv_temperature, out, vocab, row_stride, seed, offset,
                PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_temperature + row) if PER_ROW else tl.load(inv_temperature)
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK], tl.int32)
    for start in range(0, vocab, BLOCK):
        cols = start + lanes
        inside = cols < vocab
        x = tl.load(logits + row * row_stride + cols, mask=inside, other=float("-inf")).to(tl.float32)
        u = tl.rand(seed, offset + row * vocab + cols)
        score = x * inv_t - tl.log(-tl.log(u))
        better = score > best
        best = tl.where(better, score, best)
        best_at = tl.where(better, cols, best_at)
    top = tl.max(best, axis=0)
    tl.store(out + row, tl.min(tl.where(best == top, best_at, vocab), axis=0))


def _seed_and_offset(generator: torch.Generator, increment: int) -> tuple[int, int]:
    """The generator's Philox seed and offset, its offset advanced past `increment` numbers."""
    seed, offset = generator.get_state().view(torch.int64).tolist()
    advanced = torch.tensor([seed, offset + (increment + 3) // 4 * 4], dtype=torch.int64)
    generator.set_state(advanced.view(torch.uint8))
    return seed, offset


def draw_from_logits(logits: Tensor, inv_temperature: Tensor | float, generator: torch.Generator) -> Tensor:
    """One token per row from softmax(logits * inv_temperature), the meaning of
    sampling_ops.draw_from_logits. inv_temperature: [rows] or one float (> 0); logits [rows, vocab]
    in any float dtype on the generator's device. Returns [rows] int32."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.int32, device=logits.device)
    if rows == 0:
        return out
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    per_row = isinstance(inv_temperature, Tensor)
    if per_row:
        inv_t = inv_temperature.to(device=logits.device, dtype=torch.float32).contiguous()
    else:
        inv_t = torch.full((1,), float(inv_temperature), dtype=torch.float32, device=logits.device)
    seed, offset = _seed_and_offset(generator, rows * vocab)
    _gumbel_max[(rows,)](logits, inv_t, out, vocab, logits.stride(0), seed, offset,
                         PER_ROW=per_row, BLOCK=BLOCK, num_warps=8)
    return out


__all__ = ["draw_from_logits"]
