"""The sampler's draw in one pass over the logits (Triton): for rows that sample the raw logits
with the shared generator, as flashinfer_kernels.draw_from_logits does, from one random number
per row.

flashinfer's `sampling_from_logits` converts the logits to float32 before it draws, a second pass
over [rows, vocab]. Here one program per row reads the row in its own dtype, scales it by the row's
inverse temperature in float32, and draws by inverse CDF: the vocabulary is dealt into LANES
columns (token j in column j mod LANES), one pass keeps each column's max and sum of
exp(x / T - max) online, as a softmax does, then one uniform number picks a column by its share of
the mass and a token inside it. A token masked to -inf is never drawn; a row with every token
masked gives token 0, as argmax does. The uniform number comes from Philox keyed by the
generator's seed at the generator's offset plus the row, and the offset then advances past the
rows, as flashinfer advances it. Needs CUDA and triton; runner._fused_draw tries it once and falls
back to flashinfer's.

It replaced a Gumbel-max kernel (argmax of x / T + G, one Philox number and two logarithms per
token), which Philox bounded; the timings and frequency checks of both are in docs/benchmarks.md,
"The inverse-CDF draw on a GPU" (`python3 -m benchmarks.draw_kernel`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

LANES = 4096                 # columns the vocabulary is dealt into: a power of two


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


def draw_from_logits(logits: Tensor, inv_temperature: Tensor | float, generator: torch.Generator,
                     lanes: int = LANES) -> Tensor:
    """One token per row from softmax(logits * inv_temperature), the meaning of the sampler's torch
    draw (a softmax, then sampling_ops.draw_by_inverse_cdf) in one pass. inv_temperature: [rows] or
    one float (> 0); logits [rows, vocab] in any float dtype on the generator's device. Returns
    [rows] int32. lanes: a power of two."""
    logits, out, inv_t, per_row = _launch_args(logits, inv_temperature)
    rows, vocab = logits.shape
    if rows == 0:
        return out
    seed, offset = _seed_and_offset(generator, rows)
    column = triton.next_power_of_2(triton.cdiv(vocab, lanes))
    _inverse_cdf[(rows,)](logits, inv_t, out, vocab, logits.stride(0), seed, offset,
                          PER_ROW=per_row, LANES=lanes, COLUMN=column, num_warps=8)
    return out


__all__ = ["draw_from_logits"]
