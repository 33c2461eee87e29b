"""The output side of a request in the engine loop: each choice's token ids, incremental text,
stop-string matching, logprobs and streaming position, and what is sent from them (deltas, the
final GenerationOutput). engine/runtime/loop.py decides when a choice ends (its stop checks run in
the loop's per-token pass); this module keeps the text and builds the outputs.

Torch-free (api and text only); runs inside the engine process. Nothing of the service.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field

from tokabatch.engine.api import (
    ChoiceDelta,
    ChoiceOutput,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    TokenLogprob,
)
from tokabatch.text import IncrementalDetokenizer, StopStringMatcher


@dataclass(slots=True)
class Choice:
    """The output side of one sequence (one choice)."""

    seq_id: int
    index: int
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    # Fixed at admission, so the per-token checks read one attribute each:
    min_tokens: int = 0                  # no stop token before this many tokens
    stop_token_ids: frozenset[int] = frozenset()
    stop_on: frozenset[int] = frozenset()   # stop_token_ids, plus EOS unless ignore_eos
    max_output: int = 0                  # LENGTH at this many tokens (max_tokens, context, max_len)
    # No stop strings and no streaming: nothing reads the text before the end, so it is made then,
    # by one push_all of the ids the pushes would have seen (the same text, a tighter loop), after
    # the choice ended (write_text_at_end): how it ends cannot depend on it.
    text_at_end: bool = False
    # text_at_end, no stop token, no logprobs, max_tokens > 0: a new token is appended and counted, nothing else.
    plain: bool = False
    text_tokens: int = -1                # ended, text not yet made: the ids it is made of (-1: none pending)
    # An array, not a list: a full garbage collection walks every slot of a list (4096 of them
    # growing to thousands of ints each were a large part of its time).
    token_ids: array = field(default_factory=lambda: array("q"))
    pieces: list[str] = field(default_factory=list)   # the text, joined when read (no quadratic +=)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    sent_tokens: int = 0                 # streaming: how much was already sent as deltas
    sent_pieces: int = 0
    finish_sent: bool = False

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@dataclass(slots=True)
class RequestState:
    request: GenerationRequest
    choices: list[Choice]
    prompt_logprobs: list[TokenLogprob] | None = None
    num_unfinished: int = 0              # choices without a finish_reason

    @property
    def done(self) -> bool:
        return self.num_unfinished == 0


def add_text(choice: Choice, new_text: str) -> str | None:
    """Append text through the stop-string matcher; the stop string it completed, if any."""
    if choice.matcher is None:
        if new_text:
            choice.pieces.append(new_text)
        return None
    emit, matched = choice.matcher.feed(new_text)
    if emit:
        choice.pieces.append(emit)
    return matched


def write_text_at_end(choice: Choice) -> int:
    """The whole text of an ended text_at_end choice (its first `text_tokens` ids: a stop token is
    not in the text); returns how many ids it took (0 when none was pending)."""
    num = choice.text_tokens
    if num < 0:
        return 0
    choice.text_tokens = -1
    choice.pieces.append(choice.detokenizer.push_all(choice.token_ids[:num]))
    end_text(choice)
    return num


def end_text(choice: Choice, *, flush: bool = True) -> str | None:
    """A choice's last text: with `flush`, the detokenizer's and the matcher's held-back text
    released. Returns the stop string that released text completed (it, not the caller's reason,
    ends the choice), else None."""
    if not flush:
        return None
    matched = add_text(choice, choice.detokenizer.flush())
    if matched is not None:
        return matched
    if choice.matcher is not None:
        held = choice.matcher.flush()
        if held:
            choice.pieces.append(held)
    return None


def delta(choice: Choice, with_logprobs: bool) -> ChoiceDelta:
    """What a streaming choice has not sent yet; marks it sent."""
    out = ChoiceDelta(
        choice.index, tuple(choice.token_ids[choice.sent_tokens:]), "".join(choice.pieces[choice.sent_pieces:]),
        tuple(choice.logprobs[choice.sent_tokens:]) if with_logprobs and choice.logprobs is not None else None,
        choice.finish_reason)
    choice.sent_tokens, choice.sent_pieces = len(choice.token_ids), len(choice.pieces)
    choice.finish_sent = choice.finish_reason is not None
    return out


def final_output(state: RequestState, *, aborted: bool = False) -> GenerationOutput:
    request = state.request
    choices = () if aborted else tuple(
        ChoiceOutput(c.index, tuple(c.token_ids), c.text, c.finish_reason or FinishReason.ABORT,
                     tuple(c.logprobs) if c.logprobs is not None else None, c.stop_reason)
        for c in state.choices)
    prompt_logprobs = None
    if state.prompt_logprobs is not None and not aborted:
        prompt_logprobs = (None, *state.prompt_logprobs)
    return GenerationOutput(
        request_id=request.request_id, choices=choices, num_prompt_tokens=len(request.prompt_token_ids),
        num_cached_tokens=state.choices[0].num_cached_tokens if state.choices else 0,
        num_completion_tokens=sum(len(c.token_ids) for c in state.choices),
        prompt_logprobs=prompt_logprobs, aborted=aborted)


def empty_output(request: GenerationRequest) -> GenerationOutput:
    """The output of a request with nothing to compute (max_tokens 0, no prompt logprobs)."""
    choices = tuple(ChoiceOutput(i, (), "", FinishReason.LENGTH, () if request.sampling.logprobs is not None
                                 else None) for i in range(request.n))
    return GenerationOutput(request_id=request.request_id, choices=choices,
                            num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=0,
                            num_completion_tokens=0)


__all__ = ["Choice", "RequestState", "add_text", "delta", "empty_output", "end_text", "final_output",
           "write_text_at_end"]
