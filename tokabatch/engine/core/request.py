"""Sequence state: one choice of one request, its tokens, its page table and its counters.

Owned and mutated only by the scheduler; the engine loop reads it through `Scheduler.sequence()`.
Pure stdlib: must not import torch (engine/core is unit-tested in milliseconds).

Vocabulary: a sequence holds `num_tokens = len(prompt_ids) + len(output_ids)` tokens. The KV of
positions [0, num_computed) is in its pages. A decoding sequence has num_computed == num_tokens - 1
(the last sampled token has not run yet); a prefilling one has fewer computed positions (a fresh
prompt, or prompt+output after preemption).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokabatch.engine.api import Priority, SamplingParams
from tokabatch.engine.core.plan import SeqWork


class SeqStatus(enum.Enum):
    WAITING = "waiting"      # queued; holds no pages
    RUNNING = "running"      # admitted; holds pages, prefilling or decoding
    FINISHED = "finished"    # the loop ended it (or it was aborted); holds no pages


@dataclass(slots=True, eq=False)
class Sequence:
    """One choice of a request. Identity is `seq_id`; the scheduler mutates it in place."""

    seq_id: int
    request_id: str
    choice_index: int                    # 0 .. n-1 within the request
    prompt_ids: tuple[int, ...]
    sampling: SamplingParams
    priority: Priority
    arrival: int                         # global order of creation: FIFO key, and "newest" for preemption
    max_len: int                         # hard cap on num_tokens: min(prompt+max_tokens, max_model_len, KV capacity)
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # A tuple, replaced (never mutated) when it changes: each step's SeqWork shares it without a copy.
    page_ids: tuple[int, ...] = ()
    num_computed: int = 0                # positions whose KV is in page_ids
    num_published_pages: int = 0         # leading pages already in the prefix tree
    num_cached_tokens: int = 0           # prompt tokens served from the prefix cache at first admission
    num_prompt_logprobs_done: int = 0    # prompt positions whose logprobs were already delivered
    num_preemptions: int = 0
    ever_admitted: bool = False
    predicted_len: int = 0               # predicted final num_tokens (set at each admission check)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def params(self) -> SamplingParams:
        return self.sampling

    @property
    def is_decoding(self) -> bool:
        """Exactly one token left to run (the last output token): a decode, not a prefill."""
        return bool(self.output_ids) and self.num_computed == self.num_tokens - 1

    @property
    def wants_prompt_logprobs(self) -> bool:
        # Only choice 0 reports prompt logprobs (they are the same for every choice), so the other
        # choices may take prefix-cache hits on its pages.
        return self.sampling.prompt_logprobs is not None and self.choice_index == 0

    def token_slice(self, start: int, stop: int) -> tuple[int, ...]:
        """Tokens [start, stop) of prompt+output without building the whole list."""
        num_prompt = len(self.prompt_ids)
        if stop <= num_prompt:
            return self.prompt_ids[start:stop]
        if start >= num_prompt:
            return tuple(self.output_ids[start - num_prompt:stop - num_prompt])
        return self.prompt_ids[start:] + tuple(self.output_ids[:stop - num_prompt])


def pages_for(num_positions: int, page_size: int) -> int:
    """Pages needed to hold the KV of `num_positions` positions."""
    return -(-num_positions // page_size)


def chunk_end(seq: Sequence, start: int, end: int) -> int:
    """Cut a prefill chunk [start, end) so prompt logprobs are asked for exactly once per position
    (a sequence preempted mid-prefill has delivered some already) and never past the prompt."""
    if not seq.wants_prompt_logprobs:
        return end
    done = seq.num_prompt_logprobs_done
    if start < done < end:
        return done
    if done <= start < seq.num_prompt_tokens - 1:
        return min(end, seq.num_prompt_tokens)
    return end


def prefill_work(seq: Sequence, start: int, end: int, page_size: int) -> SeqWork:
    """Tokens [start, end) of prompt+output; sampled when the chunk reaches the last token; its KV
    is cached already when its pages are published (a whole-sequence prefix-cache hit).

    With prompt logprobs, targets[i] is the prompt token after position start+i (so the tuple is
    one shorter than the chunk when the chunk ends the prompt)."""
    num_prompt = seq.num_prompt_tokens
    want = seq.wants_prompt_logprobs and seq.num_prompt_logprobs_done <= start < num_prompt - 1
    return SeqWork(
        seq_id=seq.seq_id, token_ids=seq.token_slice(start, end), start_pos=start,
        page_ids=seq.page_ids, sample=end == seq.num_tokens,
        prompt_logprobs=seq.sampling.prompt_logprobs if want else None,
        prompt_logprob_targets=seq.token_slice(start + 1, min(end + 1, num_prompt)) if want else (),
        kv_cached=end <= seq.num_published_pages * page_size)


__all__ = ["SeqStatus", "Sequence", "chunk_end", "pages_for", "prefill_work"]
