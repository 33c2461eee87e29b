"""StepPlan, PrefixGroup and StepResult: what the scheduler asks of the runner, and what comes back.

Ints, tuples and floats only: the runner turns them into tensors. Pure stdlib.

One step is one forward pass over the tokens of `decodes` (one token per running sequence) and
`prefills` (chunks of prompts, or of prompt+output for a recomputed sequence). Each `SeqWork`
carries its sequence's whole page table, so the runner needs no state of its own to attend.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokabatch.engine.api import TokenLogprob


@dataclass(frozen=True, slots=True)
class SeqWork:
    """The tokens one sequence runs in this step.

    The KV of `token_ids` is written at positions start_pos .. start_pos+len-1, and those tokens
    attend to every position before them through `page_ids` (position p lives in page
    page_ids[p // page_size] at slot p % page_size).
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

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


_new_object = object.__new__
_SEQ_WORK_SLOTS = ("seq_id", "token_ids", "start_pos", "page_ids", "sample", "prompt_logprobs",
                   "prompt_logprob_targets")
if set(SeqWork.__slots__) != set(_SEQ_WORK_SLOTS):   # a new field must be set by decode_seq_work too
    raise AssertionError(f"decode_seq_work is out of date with SeqWork's fields {SeqWork.__slots__}")
(_set_seq_id, _set_token_ids, _set_start_pos, _set_page_ids, _set_sample, _set_prompt_logprobs,
 _set_prompt_logprob_targets) = (SeqWork.__dict__[name].__set__ for name in _SEQ_WORK_SLOTS)


def decode_seq_work(seq_id: int, token_id: int, start_pos: int, page_ids: tuple[int, ...]) -> SeqWork:
    """SeqWork(seq_id, (token_id,), start_pos, page_ids, sample=True), equal in every way, built in
    about half the time: a frozen dataclass's __init__ goes through object.__setattr__ once per
    field, this sets the slots directly. The scheduler builds one per running sequence per step."""
    work = _new_object(SeqWork)
    _set_seq_id(work, seq_id)
    _set_token_ids(work, (token_id,))
    _set_start_pos(work, start_pos)
    _set_page_ids(work, page_ids)
    _set_sample(work, True)
    _set_prompt_logprobs(work, None)
    _set_prompt_logprob_targets(work, ())
    return work


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """Decoding sequences that share pages start_page .. start_page+len(page_ids)-1 (Hydragen).

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


@dataclass(frozen=True, slots=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: TokenLogprob | None = None  # filled when the sequence asked for logprobs


@dataclass(frozen=True, slots=True)
class StepResult:
    step_idx: int
    sampled: tuple[SampledToken, ...]    # one per SeqWork with sample=True, in plan order
    prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]], ...] = ()  # (seq_id, per chunk position)
    num_forward_tokens: int = 0
