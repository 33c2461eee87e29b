"""The sampler's draw in one pass over the logits (Triton): for rows that sample the raw logits
with the shared generator, as flashinfer_kernels.draw_from_logits does, reading each row once.

flashinfer's `sampling_from_logits` converts the logits to float32 before it draws, a second pass
over [rows, vocab]. Here one program per row reads the row in its own dtype, scales it by the row's
inverse temperature in float32, adds Gumbel noise and keeps the running argmax: argmax(x / T + G),
G = -log(-log U), is a draw from softmax(x / T); a token masked to -inf is never drawn. U comes
from Philox keyed by the generator's seed, four numbers per counter (one Philox call serves the
same lane of a block's four quarters: Philox, not the logits' bytes, bounds this kernel), at
counters from the generator's offset, which then advances past the numbers used, as flashinfer
advances it. Measured against flashinfer's draw in docs/benchmarks.md, "The one-pass draw". Needs
CUDA and triton; runner._fused_draw tries it once and falls back to flashinfer's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 4096


@triton.jit
def _keep_best(row_logits, cols, vocab, inv_t, bits, best, best_at):
    """The running argmax of x / T + G over one quarter block; G = -log(-log U) from `bits`."""
    x = tl.load(row_logits + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
    score = x * inv_t - tl.log(-tl.log(tl.random.uint_to_uniform_float(bits)))
    better = score > best
    return tl.where(better, score, best), tl.where(better, cols, best_at)


@triton.jit(do_not_specialize=["seed", "offset"])
def _gumbel_max(logits, inv_temperature, out, vocab, padded_vocab, row_stride, seed, offset,
                PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    # One Philox call gives four 32-bit numbers: each counter serves the same lane of the block's
    # four quarters, so a row uses padded_vocab / 4 counters (padded_vocab: vocab rounded up to BLOCK).
    QUARTER: tl.constexpr = BLOCK // 4
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_temperature + row) if PER_ROW else tl.load(inv_temperature)
    row_logits = logits + row * row_stride
    lanes = tl.arange(0, QUARTER)
    first_counter = offset // 4 + row * (padded_vocab // 4)
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_at = tl.zeros([QUARTER], tl.int32)
    for start in range(0, vocab, BLOCK):
        r0, r1, r2, r3 = tl.randint4x(seed, first_counter + start // 4 + lanes)
        cols = start + lanes
        best, best_at = _keep_best(row_logits, cols, vocab, inv_t, r0, best, best_at)
        best, best_at = _keep_best(row_logits, cols + QUARTER, vocab, inv_t, r1, best, best_at)
        best, best_at = _keep_best(row_logits, cols + 2 * QUARTER, vocab, inv_t, r2, best, best_at)
        best, best_at = _keep_best(row_logits, cols + 3 * QUARTER, vocab, inv_t, r3, best, best_at)
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
    padded_vocab = triton.cdiv(vocab, BLOCK) * BLOCK
    seed, offset = _seed_and_offset(generator, rows * padded_vocab)
    _gumbel_max[(rows,)](logits, inv_t, out, vocab, padded_vocab, logits.stride(0), seed, offset,
                         PER_ROW=per_row, BLOCK=BLOCK, num_warps=8)
    return out


__all__ = ["draw_from_logits"]
