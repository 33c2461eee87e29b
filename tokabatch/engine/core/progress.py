"""A step's progress applied to its sequences: positions computed, sampled tokens appended, full
pages published into the prefix tree.

Owns the bookkeeping after a forward pass (the scheduler's on_step_done, and the publishing that
preemption and finishing also do); it decides nothing about who runs. Pure stdlib: must not
import torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from tokabatch.engine.core.inflight import InflightPages
from tokabatch.engine.core.pages import ROOT, PagePool
from tokabatch.engine.core.plan import SampledTokens, SeqWork, StepPlan
from tokabatch.engine.core.request import SeqStatus, Sequence


def apply_step_result(plan: StepPlan, sampled: SampledTokens, planned_seqs: list[Sequence] | None,
                      seqs: Mapping[int, Sequence], page_size: int,
                      publish: Callable[[list[Sequence]], None]) -> None:
    """Advance every sequence of `plan` past the tokens it ran and append its sampled token.

    `sampled` has one token per sampled work, in plan order (StepResult's contract), so tokens
    are matched by position, with a lookup by seq_id should the order ever differ. `planned_seqs`
    is given when `plan` is the one schedule() just made: the sequences of its decodes (one token
    each, sampled, decodes first), known by position too, so they take a short path where most of
    them only count one more position and one more token. `publish(seqs)` is called with the
    sequences whose computed positions reach past their published pages, in plan order."""
    num_done = 0                          # works (and tokens: all decodes sample) handled so far
    if planned_seqs is not None:
        num_done = _apply_planned_decodes(plan, sampled, planned_seqs, page_size, publish)
    if num_done == len(plan.decodes):
        works = plan.prefills             # (every decode done: their rows are never made)
    else:
        works = plan.decodes[num_done:] + plan.prefills
    _apply_works(plan.step_idx, works, sampled, num_done, seqs, page_size, publish)


def _apply_planned_decodes(plan: StepPlan, sampled: SampledTokens, planned_seqs: list[Sequence],
                           page_size: int, publish: Callable[[list[Sequence]], None]) -> int:
    """The short path: decodes matched to their sequences by position. Returns how many it handled
    (it stops at the first token out of order, which the general path then sorts out). The rows
    that filled a page are published together at the end: one call where a wave's samples all
    fill one at the same step."""
    running = SeqStatus.RUNNING
    num_done = 0
    decodes = plan.decodes
    filled: list[Sequence] = []
    for seq_id, start, seq, token_seq, token in zip(decodes.seq_ids, decodes.start_pos, planned_seqs,
                                                    sampled.seq_ids, sampled.token_ids):
        if token_seq != seq_id:
            break
        num_done += 1
        if seq.status is not running:
            continue                      # aborted or finished while the step ran
        if start != seq.num_computed:
            raise AssertionError(f"sequence {seq.seq_id}: step ran position {start}, "
                                 f"but {seq.num_computed} positions were computed")
        seq.num_computed = start + 1
        seq.output_ids.append(token)
        if (start + 1) // page_size > seq.num_published_pages:
            filled.append(seq)            # (nothing to publish otherwise: most decode steps)
    if filled:
        publish(filled)
    return num_done


def _apply_works(step_idx: int, works: tuple[SeqWork, ...], sampled: SampledTokens, num_sampled: int,
                 seqs: Mapping[int, Sequence], page_size: int, publish: Callable[[list[Sequence]], None]) -> None:
    """The general path: any work, its token (if it samples) found by position, else by seq_id."""
    running = SeqStatus.RUNNING
    sampled_seqs, sampled_tokens = sampled.seq_ids, sampled.token_ids
    by_seq: dict[int, int] | None = None
    for work in works:
        token_id = None
        if work.sample:
            if num_sampled < len(sampled_seqs) and sampled_seqs[num_sampled] == work.seq_id:
                token_id = sampled_tokens[num_sampled]
            else:
                if by_seq is None:
                    by_seq = dict(zip(sampled_seqs, sampled_tokens))
                token_id = by_seq.get(work.seq_id)
            num_sampled += 1
        seq = seqs.get(work.seq_id)
        if seq is None or seq.status is not running:
            continue                          # aborted or finished while the step ran
        if work.start_pos != seq.num_computed:
            raise AssertionError(f"sequence {seq.seq_id}: step ran position {work.start_pos}, "
                                 f"but {seq.num_computed} positions were computed")
        seq.num_computed = work.start_pos + work.num_tokens
        if work.prompt_logprobs is not None:
            seq.num_prompt_logprobs_done = max(seq.num_prompt_logprobs_done,
                                               min(seq.num_computed, seq.num_prompt_tokens - 1))
        if work.sample:
            if token_id is None:
                raise AssertionError(f"step {step_idx} result lacks the token of sequence {seq.seq_id}")
            seq.output_ids.append(token_id)
        if seq.num_computed // page_size > seq.num_published_pages:
            publish([seq])


def publish_full_pages(seqs: Iterable[Sequence], pool: PagePool, inflight: InflightPages, page_size: int) -> int:
    """Put every full page whose KV is computed into the prefix tree, each sequence's in order
    (parents first). A page computed twice (two sequences prefilled it together) is swapped for the
    tree's copy: returns how many were (each gave its sequence a new page table)."""
    ps = page_size
    swapped = 0
    pool_publish, inflight_published = pool.publish, inflight.published
    for seq in seqs:
        pages = seq.page_ids
        first, end = seq.num_published_pages, seq.num_computed // ps
        for i in range(first, end):
            own = pages[i]
            canonical = pool_publish(pages[i - 1] if i else ROOT, seq.token_slice(i * ps, (i + 1) * ps), own)
            if canonical != own:          # computed twice (two sequences prefilled it together)
                pool.incref(canonical)
                pool.decref(own)
                pages = pages[:i] + (canonical,) + pages[i + 1:]
                seq.page_ids = pages
                swapped += 1
        if end > first:
            seq.num_published_pages = end
        inflight_published(seq.seq_id, seq.num_published_pages)
    return swapped


__all__ = ["apply_step_result", "publish_full_pages"]
