"""StepPlan, PrefixGroup and StepResult: what the scheduler asks of the runner, and what comes back.

Ints, tuples and floats only: the runner turns them into tensors. Pure stdlib.

One step is one forward pass over the tokens of `decodes` (one token per running sequence) and
`prefills` (chunks of prompts, or of prompt+output for a recomputed sequence). Each `SeqWork`
carries its sequence's whole page table, so the runner needs no state of its own to attend.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Sequence

from tokabatch.engine.api import TokenLogprob


class SeqWork(NamedTuple):
    """The tokens one sequence runs in this step.

    The KV of `token_ids` is written at positions start_pos .. start_pos+len-1, and those tokens
    attend to every position before them through `page_ids` (position p lives in page
    page_ids[p // page_size] at slot p % page_size).

    A NamedTuple, not a dataclass: the scheduler makes one per running sequence per step, and a
    tuple is built in about a third of the time of a frozen dataclass (decode_seq_work).
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    page_ids: tuple[int, ...]            # page table covering positions [0, start_pos + len(token_ids))
    sample: bool                         # sample the next token from the last position
    # Echo + logprobs: for position i of this chunk, the logprob of prompt_logprob_targets[i]
    # (the prompt token that follows it); the tuple may be one shorter than token_ids at the prompt's end.
    prompt_logprobs: int | None = None   # None: not wanted; k: with the top k alternatives
    prompt_logprob_targets: tuple[int, ...] = ()
    # The cache holds these tokens' KV already: a sequence whose every token was a prefix-cache hit
    # reruns its last one only to sample from it, and the runner sends its KV write to the scratch
    # page (the page it reads is shared, and holds the same token's KV at the same position).
    kv_cached: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


_new_tuple = tuple.__new__


def decode_seq_work(seq_id: int, token_id: int, start_pos: int, page_ids: tuple[int, ...]) -> SeqWork:
    """SeqWork(seq_id, (token_id,), start_pos, page_ids, sample=True), built without the keyword
    handling of the generated __new__ (a NamedTuple built this way is the cheapest record Python
    makes). The scheduler builds one per running sequence per step."""
    return _new_tuple(SeqWork, (seq_id, (token_id,), start_pos, page_ids, True, None, (), False))


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """Decoding sequences that share pages start_page .. start_page+len(page_ids)-1 (Hydragen). A
    whole-sequence cache hit rerunning its last token (SeqWork.kv_cached, first among the prefills)
    is grouped as a decode is.

    A top-level group starts at page 0; a nested group (a few-shot block shared by a subset of a
    system-prompt group) starts where its parent group ends, so each sequence's groups tile its
    first pages consecutively and its own part is what follows the last one.
    """

    seq_ids: tuple[int, ...]
    page_ids: tuple[int, ...]            # the shared full pages, in position order
    num_tokens: int                      # len(page_ids) * page_size
    start_page: int = 0                  # index in each member's page table of page_ids[0]


@dataclass(frozen=True, slots=True)
class StepPlan:
    step_idx: int
    decodes: tuple[SeqWork, ...]         # one token each
    prefills: tuple[SeqWork, ...]        # chunks, in admission order
    prefix_groups: tuple[PrefixGroup, ...] = ()

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(w.num_tokens for w in self.prefills)

    @property
    def works(self) -> tuple[SeqWork, ...]:
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class SampledToken(NamedTuple):
    """One sampled token (a NamedTuple for the same reason as SeqWork: one per row per step)."""

    seq_id: int
    token_id: int
    logprob: TokenLogprob | None = None  # filled when the sequence asked for logprobs


def sampled_tokens(seq_ids: Sequence[int], token_ids: Sequence[int]) -> list[SampledToken]:
    """[SampledToken(s, t) for each pair], without logprobs, built as decode_seq_work builds its
    tuples (the sampler makes one per row per step)."""
    return [_new_tuple(SampledToken, (s, t, None)) for s, t in zip(seq_ids, token_ids)]


@dataclass(frozen=True, slots=True)
class StepResult:
    step_idx: int
    sampled: tuple[SampledToken, ...]    # one per SeqWork with sample=True, in plan order
    prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]], ...] = ()  # (seq_id, per chunk position)
    num_forward_tokens: int = 0
