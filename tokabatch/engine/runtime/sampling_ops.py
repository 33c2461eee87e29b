"""Batched tensor operations behind the sampler: penalties, filters, the inverse-CDF draw, logprobs.

Pure functions over [rows, vocab] tensors with per-row parameters as 1-D tensors, so one call
serves a whole batch on CPU or CUDA with no Python loop over the vocabulary. Every operation is
row-local and a disabled parameter is an exact identity (x / 1.0, x - 0.0, a mask that keeps
everything): a row's result never depends on which other rows share the batch, which the seeded
reproducibility of `Sampler` relies on. Imports torch only; no engine state lives here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_penalties(
    logits: Tensor,
    output_counts: Tensor,
    prompt_mask: Tensor,
    presence: Tensor,
    frequency: Tensor,
    repetition: Tensor,
) -> Tensor:
    """Repetition (HF/vLLM), then presence and frequency (OpenAI) penalties; returns a new tensor.

    logits: [rows, vocab] float32. output_counts: [rows, vocab] float32, how often each token was
    generated so far. prompt_mask: [rows, vocab] bool, tokens of the prompt. presence, frequency,
    repetition: [rows] float32.
    Repetition: a token seen in the prompt or the output has its logit divided by the penalty when
    positive and multiplied by it otherwise. Then
    logit -= presence * (count > 0) + frequency * count, over generated tokens only.
    """
    seen = prompt_mask | (output_counts > 0)
    rep = repetition.unsqueeze(1)
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    out = torch.where(seen, penalized, logits)
    out = out - (presence.unsqueeze(1) * (output_counts > 0).to(out.dtype)
                 + frequency.unsqueeze(1) * output_counts)
    return out


CANDIDATES = 256       # a CPU's top-k/top-p filter looks among each row's most likely tokens first


def filter_top_k_top_p(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Keep each row's `top_k` most likely tokens, then its nucleus; the rest become -inf.

    logits: [rows, vocab] float32 (already divided by the temperature). top_k: [rows] long, the
    vocabulary size where disabled. top_p: [rows] float32, 1.0 where disabled.
    top_p is applied to the distribution renormalized over the top-k survivors (vLLM's order): the
    smallest set of most likely tokens whose cumulative probability reaches top_p is kept, so a
    token survives when the probability of the tokens before it is still below top_p. The most
    likely token always survives; ties go to the lower token id (stable sort).

    On a CPU, a row whose kept tokens lie among its CANDIDATES most likely ones is filtered from
    those alone (torch.topk, where sorting a whole vocabulary per row costs the CPU most of a step);
    the other rows are sorted whole. The kept set is the same either way.
    """
    if logits.device.type == "cpu" and logits.shape[-1] > 2 * CANDIDATES and len(logits):
        kept, whole = _kept_among_candidates(logits, top_k, top_p, CANDIDATES)
        if whole.any():
            kept[whole] = _kept_by_sort(logits[whole], top_k[whole], top_p[whole])
        return logits.masked_fill(~kept, float("-inf"))
    return logits.masked_fill(~_kept_by_sort(logits, top_k, top_p), float("-inf"))


def _kept_by_sort(logits: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """filter_top_k_top_p's kept tokens ([rows, vocab] bool), from a stable sort of each whole row."""
    vocab = logits.shape[-1]
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True, stable=True)
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
    keep = ranks < top_k.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs
    # Rounding can push the running sum to 1.0 before the tail; top_p == 1 must keep everything.
    nucleus = (before < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1)
    keep &= nucleus
    keep[:, 0] = True
    return torch.empty_like(keep).scatter_(1, order, keep)


def _kept_among_candidates(logits: Tensor, top_k: Tensor, top_p: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """_kept_by_sort's answer from each row's k most likely tokens: ([rows, vocab] bool kept, [rows]
    bool `whole`: the rows it cannot answer, whose kept rows must come from _kept_by_sort).

    The candidates are put in the stable sort's order (value descending, then token id). A row's
    answer holds when the last token it keeps is worth more than its least candidate: then every
    token tied with it, and every token before it, is a candidate. The nucleus is measured on the
    distribution over the whole row (top_k off) or over the top-k candidates; a top_k between k
    and the vocabulary cannot be, so such rows are `whole`."""
    vocab = logits.shape[-1]
    values, ids = torch.topk(logits, k, dim=-1)
    ids, by_id = torch.sort(ids, dim=-1)
    values, order = torch.sort(values.gather(1, by_id), dim=-1, descending=True, stable=True)
    ids = ids.gather(1, order)
    in_top_k = torch.arange(k).unsqueeze(0) < top_k.unsqueeze(1)
    whole_row = top_k >= vocab
    log_z = torch.where(whole_row, torch.logsumexp(logits, dim=-1),
                        torch.logsumexp(values.masked_fill(~in_top_k, float("-inf")), dim=-1))
    probs = torch.exp(values - log_z.unsqueeze(1)).masked_fill(~in_top_k, 0.0)
    before = torch.cumsum(probs, dim=-1) - probs
    keep = in_top_k & ((before < top_p.unsqueeze(1)) | (top_p >= 1.0).unsqueeze(1))
    keep[:, 0] = True
    last = keep.sum(dim=-1, keepdim=True) - 1        # keep is a prefix of the candidates
    keeps_all = whole_row & (top_p >= 1.0)
    answered = keeps_all | ((values.gather(1, last).squeeze(1) > values[:, -1]) & (whole_row | (top_k <= k)))
    kept = torch.zeros(logits.shape, dtype=torch.bool).scatter_(1, ids, keep)
    kept[keeps_all] = True
    return kept, ~answered


def filter_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p times the row's highest probability.

    logits: [rows, vocab] float32; min_p: [rows] float32 (0.0 keeps everything).
    The ratio test is the same on any renormalization, so it may follow top-k/top-p.
    """
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def draw_by_inverse_cdf(probs: Tensor, numbers: Tensor) -> Tensor:
    """One token per row: the first whose cumulative probability exceeds number * (the row's sum).

    probs [rows, vocab] float32 (filtered tokens exactly 0), numbers [rows] float32 uniform in
    [0, 1). Returns [rows] long. A zero-probability token adds nothing to the running sum, so it
    can only be hit by rounding (a number that rounds up to the row's whole sum, or a parallel
    scan's sums out of order on a GPU); such a row takes its most likely token instead.
    """
    cdf = probs.cumsum(dim=-1)
    target = (numbers * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max_(probs.shape[1] - 1)
    hit = probs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    return torch.where(hit > 0, tokens, torch.argmax(probs, dim=-1))


def logprobs_with_top(logprobs: Tensor, targets: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The logprob of each row's target and its top k alternatives, most likely first.

    logprobs: [rows, vocab] float32 (log_softmax already applied). targets: [rows] long.
    Returns (target_logprob [rows], top_values [rows, k], top_ids [rows, k] long).
    """
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1)
    if k > 0:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1, largest=True, sorted=True)
    else:
        top_values = logprobs.new_empty((logprobs.shape[0], 0))
        top_ids = targets.new_empty((logprobs.shape[0], 0))
    return chosen, top_values, top_ids
