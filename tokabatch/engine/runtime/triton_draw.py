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

`draw_by_inverse_cdf` is the same draw from one random number per row instead of one per token
(inverse CDF over the vocabulary dealt into columns), written because Philox bounds the Gumbel-max
kernel; it is not the engine's draw until a GPU measures it (`python3 -m benchmarks.draw_kernel`,
docs/benchmarks.md, "The inverse-CDF draw").
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


@triton.jit(do_not_specialize=["seed", "offset"])
def _inverse_cdf(logits, inv_temperature, out, vocab, row_stride, seed, offset,
                 PER_ROW: tl.constexpr, LANES: tl.constexpr, COLUMN: tl.constexpr):
    # Lane j holds the column of tokens j, j + LANES, j + 2 LANES, ...: one pass keeps each column's
    # max and its sum of exp(x / T - max) (online, as a softmax does), the draw picks a column by its
    # share of the mass and then a token inside it, from one uniform number per row.
    row = tl.program_id(0).to(tl.int64)
    inv_t = tl.load(inv_temperature + row) if PER_ROW else tl.load(inv_temperature)
    row_logits = logits + row * row_stride
    lanes = tl.arange(0, LANES)
    top = tl.full([LANES], float("-inf"), tl.float32)
    mass = tl.zeros([LANES], tl.float32)
    for start in range(0, vocab, LANES):
        cols = start + lanes
        x = tl.load(row_logits + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * inv_t
        new_top = tl.maximum(top, x)
        seen = new_top > float("-inf")
        mass = tl.where(seen, mass * tl.exp(top - new_top) + tl.exp(x - new_top), 0.0)
        top = new_top
    peak = tl.max(top, axis=0)
    peak = tl.where(peak > float("-inf"), peak, 0.0)          # every token masked: token 0, as argmax does
    mass = tl.where(top > float("-inf"), mass * tl.exp(top - peak), 0.0)
    target = tl.rand(seed, offset + row) * tl.sum(mass, axis=0)
    upto = tl.cumsum(mass, axis=0)
    lane = tl.min(tl.where((upto > target) & (mass > 0), lanes, LANES), axis=0)
    lane = tl.where(lane < LANES, lane, tl.max(tl.where(mass > 0, lanes, 0), axis=0))   # rounding at the end
    before = tl.sum(tl.where(lanes == lane, upto - mass, 0.0), axis=0)
    steps = tl.arange(0, COLUMN)
    cols = lane + steps * LANES
    x = tl.load(row_logits + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32) * inv_t
    p = tl.exp(x - peak)
    upto = before + tl.cumsum(p, axis=0)
    step = tl.min(tl.where((upto > target) & (p > 0), steps, COLUMN), axis=0)
    step = tl.where(step < COLUMN, step, tl.max(tl.where(p > 0, steps, 0), axis=0))
    tl.store(out + row, (lane + step * LANES).to(tl.int32))


def _seed_and_offset(generator: torch.Generator, increment: int) -> tuple[int, int]:
    """The generator's Philox seed and offset, its offset advanced past `increment` numbers."""
    seed, offset = generator.get_state().view(torch.int64).tolist()
    advanced = torch.tensor([seed, offset + (increment + 3) // 4 * 4], dtype=torch.int64)
    generator.set_state(advanced.view(torch.uint8))
    return seed, offset


def _launch_args(logits: Tensor, inv_temperature: Tensor | float) -> tuple[Tensor, Tensor, Tensor, bool]:
    """(logits with unit column stride, the [rows] int32 output, the inverse temperatures as a
    float32 tensor on the logits' device, whether they are one per row)."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(logits.shape[0], dtype=torch.int32, device=logits.device)
    per_row = isinstance(inv_temperature, Tensor)
    if per_row:
        inv_t = inv_temperature.to(device=logits.device, dtype=torch.float32).contiguous()
    else:
        inv_t = torch.full((1,), float(inv_temperature), dtype=torch.float32, device=logits.device)
    return logits, out, inv_t, per_row


def draw_from_logits(logits: Tensor, inv_temperature: Tensor | float, generator: torch.Generator) -> Tensor:
    """One token per row from softmax(logits * inv_temperature), the meaning of
    sampling_ops.draw_from_logits. inv_temperature: [rows] or one float (> 0); logits [rows, vocab]
    in any float dtype on the generator's device. Returns [rows] int32."""
    logits, out, inv_t, per_row = _launch_args(logits, inv_temperature)
    rows, vocab = logits.shape
    if rows == 0:
        return out
    padded_vocab = triton.cdiv(vocab, BLOCK) * BLOCK
    seed, offset = _seed_and_offset(generator, rows * padded_vocab)
    _gumbel_max[(rows,)](logits, inv_t, out, vocab, padded_vocab, logits.stride(0), seed, offset,
                         PER_ROW=per_row, BLOCK=BLOCK, num_warps=8)
    return out


def draw_by_inverse_cdf(logits: Tensor, inv_temperature: Tensor | float, generator: torch.Generator,
                        lanes: int = BLOCK) -> Tensor:
    """The meaning of draw_from_logits, by inverse CDF: one uniform number per row instead of one
    per token (lanes: a power of two, the columns the vocabulary is dealt into)."""
    logits, out, inv_t, per_row = _launch_args(logits, inv_temperature)
    rows, vocab = logits.shape
    if rows == 0:
        return out
    seed, offset = _seed_and_offset(generator, rows)
    column = triton.next_power_of_2(triton.cdiv(vocab, lanes))
    _inverse_cdf[(rows,)](logits, inv_t, out, vocab, logits.stride(0), seed, offset,
                          PER_ROW=per_row, LANES=lanes, COLUMN=column, num_warps=8)
    return out


__all__ = ["draw_by_inverse_cdf", "draw_from_logits"]
