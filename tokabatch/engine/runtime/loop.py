"""EngineLoop: the real StepLoop. Scheduler + runner + sampler + text, one step at a time.

Owns the requests in flight: admission checks, each sampled token taken into its choice, the stop
checks (EOS, stop token ids, stop strings, max_tokens, the end of the context) that end a choice,
prompt logprobs, when deltas and outputs are emitted, and the EngineStats counters; choices.py
keeps each choice's text and builds the deltas and outputs. The scheduler owns
pages and admission, the runner the forward pass and the sampler the draw; this module glues
them: add -> scheduler.add_request + sampler.register; step -> schedule, execute, on_step_done,
then look at every sampled token and finish sequences through scheduler.finish_sequence.

Runs inside the engine process (it imports torch through the runner); nothing of the service.
"""

from __future__ import annotations

import gc
import logging
from collections import deque
from itertools import repeat
from typing import Iterable, Protocol, Sequence

from tokabatch.engine.api import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    GenerationUpdate,
    Item,
    ModelInfo,
    RequestError,
    RequestRejected,
    SamplingParams,
    TokenLogprob,
)
from tokabatch.engine.core.hydragen import kv_reads_saved
from tokabatch.engine.core.plan import SampledTokens, StepPlan, StepResult
from tokabatch.engine.core.scheduler import Scheduler
from tokabatch.engine.runtime.choices import (
    Choice,
    RequestState,
    add_text,
    delta,
    empty_output,
    end_text,
    final_output,
    write_text_at_end,
)
from tokabatch.text import StopStringMatcher, Tokenizer


# The cyclic garbage collector's first generation runs when tracked allocations minus deallocations
# pass this many. At the default (700) a step of thousands of sequences, which holds tens of
# thousands of tracked objects (SeqWorks, tuples, sampled tokens) for a moment, runs many young
# collections, and their survivors push a full collection over the engine's per-sequence lists
# every few steps (benchmarks/step_overhead.py measures it). 50,000 leaves only the net growth.
GC_MIN_THRESHOLD0 = 50_000

log = logging.getLogger(__name__)


def raise_gc_threshold() -> None:
    """Raise gen-0's threshold to GC_MIN_THRESHOLD0 (process-wide; never lowers one set higher).
    Called when an EngineLoop is built: it runs in the engine process."""
    threshold0, threshold1, threshold2 = gc.get_threshold()
    if threshold0 < GC_MIN_THRESHOLD0:
        gc.set_threshold(GC_MIN_THRESHOLD0, threshold1, threshold2)


class PendingStep(Protocol):
    """A launched step: `result()` waits for its sampled tokens. `draw()` launches its sampling if
    the runner held it back (a draw with constrained rows waits for their masks); `result()` does too."""

    def draw(self) -> None: ...

    def result(self) -> StepResult: ...


class StepRunner(Protocol):
    """What the loop needs of a runner (runner.ModelRunner; engine/simulated.SimulatedRunner).
    `launch` raises StepOutOfMemory when the step ran out of device memory before any of it was
    applied."""

    def launch(self, plan: StepPlan) -> PendingStep: ...


class StepOutOfMemory(RuntimeError):
    """A step ran out of device memory (its activations, logits or draw) before any of it was
    applied: the loop shrinks the scheduler's steps (Scheduler.shrink_step) and plans it again."""


class SequenceSampler(Protocol):
    """What the loop tells the runner's sampler: which sequences exist, with which parameters."""

    def register(self, seq_id: int, params: SamplingParams, prompt_ids: Sequence[int], *,
                 choice_index: int = 0) -> None: ...

    def release(self, seq_id: int) -> None: ...


Launched = tuple[StepPlan, PendingStep | None]      # begin_step's step for end_step (no pending: nothing ran)


class EngineLoop:
    """The StepLoop over a real model. Not thread-safe: serve() owns it."""

    # The texts of ended requests made per step, in ids (docs/benchmarks.md, the wave ends): a wave of
    # sequences ending together would otherwise hold the one CPU thread for one long step while the
    # GPU runs dry; their outputs follow a few steps later instead. Also with nothing left to
    # schedule: the other pipelined half may still be running.
    TEXT_TOKENS_PER_STEP = 8192

    def __init__(self, *, scheduler: Scheduler, runner: StepRunner, sampler: SequenceSampler, tokenizer: Tokenizer,
                 info: ModelInfo, check_invariants: bool = False) -> None:
        self.info = info
        self.scheduler, self.runner, self.sampler, self.tokenizer = scheduler, runner, sampler, tokenizer
        self.check_invariants = check_invariants   # tests: the scheduler checks its books after every step
        self._eos_ids = frozenset(info.eos_token_ids)
        self._requests: dict[str, RequestState] = {}
        self._by_seq: dict[int, tuple[RequestState, Choice]] = {}
        self._ready: list[Item] = []
        self._unwritten: deque[RequestState] = deque()   # done; a choice's text still to make
        self._stats = EngineStats(num_pages=info.num_pages)
        raise_gc_threshold()

    # ---- StepLoop -------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        """Admit a request to the scheduler's queue; raises RequestRejected / ValueError(param, msg)."""
        self._check_request(request)
        if request.sampling.max_tokens == 0 and request.sampling.prompt_logprobs is None:
            self._stats.num_requests_finished += 1
            self._ready.append(empty_output(request))   # nothing to compute
            return
        seq_ids = self.scheduler.add_request(request)
        params = request.sampling
        state = RequestState(request, [])
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = []
        num_prompt = len(request.prompt_token_ids)
        stop_token_ids = frozenset(params.stop_token_ids)
        stop_on = stop_token_ids | (frozenset() if params.ignore_eos else self._eos_ids)
        text_at_end = not params.stop and not request.stream
        plain = text_at_end and not stop_on and params.logprobs is None and params.max_tokens > 0
        try:
            for seq_id in seq_ids:
                seq = self.scheduler.sequence(seq_id)
                self.sampler.register(seq_id, params, request.prompt_token_ids, choice_index=seq.choice_index)
                max_output = min(params.max_tokens, self.info.context_length - num_prompt)
                max_len = getattr(seq, "max_len", None)
                if max_len is not None:
                    max_output = min(max_output, max_len - num_prompt)
                choice = Choice(
                    seq_id, seq.choice_index,
                    self.tokenizer.detokenizer(request.prompt_token_ids,
                                               skip_special_tokens=params.skip_special_tokens),
                    (StopStringMatcher(params.stop, include_stop=params.include_stop_str_in_output)
                     if params.stop else None),
                    min_tokens=params.min_tokens, stop_token_ids=stop_token_ids, stop_on=stop_on, max_output=max_output,
                    text_at_end=text_at_end, plain=plain, logprobs=[] if params.logprobs is not None else None)
                state.choices.append(choice)
                state.num_unfinished += 1
                self._by_seq[seq_id] = (state, choice)
        except BaseException:
            self._forget(request.request_id, self.scheduler.abort_request(request.request_id))
            self.scheduler.forget_request(request.request_id)
            raise
        state.choices.sort(key=lambda c: c.index)
        self._requests[request.request_id] = state

    def abort(self, request_id: str) -> None:
        state = self._requests.get(request_id)
        if state is None:
            return
        self._forget(request_id, self.scheduler.abort_request(request_id))
        self.scheduler.forget_request(request_id)
        self._ready.append(final_output(state, aborted=True))

    def has_work(self) -> bool:
        return bool(self._ready) or bool(self._unwritten) or self.scheduler.has_work()

    def num_wanted(self) -> int:
        return self.scheduler.num_wanted()

    def stats(self) -> EngineStats:
        s = self._stats
        sched = self.scheduler
        s.num_waiting, s.num_running, s.num_free_pages = sched.num_waiting, sched.num_running, sched.num_free_pages
        s.num_preemptions = sched.num_preemptions
        s.num_prompt_tokens, s.num_cached_tokens = sched.num_prompt_tokens, sched.num_cached_tokens   # admitted
        s.num_recent_ended, s.num_recent_ended_tokens, s.num_recent_capped = sched.predictor.summary()
        return EngineStats(**{name: getattr(s, name) for name in EngineStats.__slots__ if name != "extra"},
                           extra=dict(s.extra))

    def step(self) -> list[Item]:
        return self.end_step(self.begin_step())

    def begin_step(self) -> Launched | None:
        """Schedule one step and launch it on the device (on CUDA it runs while the caller goes on);
        None when there was nothing to schedule. `end_step` must get it before the next begin_step."""
        if not self.scheduler.has_work():
            return None
        plan: StepPlan = self.scheduler.schedule()
        if plan.is_empty:
            return (plan, None)
        try:
            return (plan, self.runner.launch(plan))
        except StepOutOfMemory as exc:
            # Nothing of the plan was applied: its sequences are planned again from where they were.
            shrunk = self.scheduler.shrink_step()
            if shrunk is None:
                raise                         # not even one sequence's step fits: the engine stops
            log.warning("a step of %d tokens ran out of device memory (%s): %s", plan.num_tokens, exc, shrunk)
            return (plan, None)

    def end_step(self, launched: Launched | None) -> list[Item]:
        """Wait for a begin_step's tokens, then stop checks, text and outputs; returns the ready items."""
        if launched is not None:
            plan, pending = launched
            if pending is not None:
                result: StepResult = pending.result()
                self.scheduler.on_step_done(plan, result)
                self._stats.num_steps += 1
                self._stats.num_forward_tokens += result.num_forward_tokens
                self._count_decode_reads(plan)
                self._take_prompt_logprobs(result)
                touched = self._take_samples(result.sampled)
                touched.update(self._finish_scored_prompts(plan))
                for state in touched.values():
                    self._emit(state)
            if self.check_invariants:
                self.scheduler.check_invariants()
        if self._unwritten:
            self._write_texts(self.TEXT_TOKENS_PER_STEP)
        out, self._ready = self._ready, []
        return out

    def _write_texts(self, budget: int) -> None:
        """The outputs of ended requests whose text was left to the end, oldest first, until `budget`
        ids were detokenized; a request of n choices may take several steps."""
        while self._unwritten:
            state = self._unwritten[0]
            for choice in state.choices:          # (a choice already written takes 0 ids)
                if budget <= 0:
                    return
                budget -= write_text_at_end(choice)
            self._unwritten.popleft()
            self._stats.num_requests_finished += 1
            self._ready.append(final_output(state))

    def _count_decode_reads(self, plan: StepPlan) -> None:
        """Hydragen sharing for /metrics: the KV-token reads of this step's decodes without grouping
        (each reads its whole context, current token included) and those its prefix groups save."""
        # (A decode runs one token, so its reads are start_pos + 1.)
        self._stats.num_decode_kv_reads += sum(plan.decodes.start_pos) + len(plan.decodes)
        self._stats.num_hydragen_saved_kv_reads += kv_reads_saved(plan.prefix_groups)

    # ---- admission ------------------------------------------------------------------------

    def _check_request(self, request: GenerationRequest) -> None:
        if request.request_id in self._requests:
            raise RequestRejected(RequestError(400, f"request_id {request.request_id!r} is already running",
                                               code="duplicate_request_id", param="request_id"))
        request.sampling.validate(self.info.vocab_size)
        if request.n < 1:
            raise ValueError("n", "n must be at least 1")
        num_prompt = len(request.prompt_token_ids)
        if num_prompt == 0:
            raise ValueError("prompt", "the prompt must contain at least one token")
        if any(not 0 <= t < self.info.vocab_size for t in request.prompt_token_ids):
            raise ValueError("prompt", f"prompt token ids must be between 0 and {self.info.vocab_size - 1}")
        # The context and the KV cache are checked once, where the limits live: Scheduler.add_request.

    def _forget(self, request_id: str, seq_ids: Iterable[int] | None) -> None:
        self._requests.pop(request_id, None)
        for seq_id in seq_ids or ():
            self._by_seq.pop(seq_id, None)
            self.sampler.release(seq_id)

    # ---- after a step ---------------------------------------------------------------------

    def _take_prompt_logprobs(self, result: StepResult) -> None:
        for seq_id, scored in result.prompt_logprobs:
            entry = self._by_seq.get(seq_id)
            if entry is not None and entry[0].prompt_logprobs is not None:
                entry[0].prompt_logprobs.extend(scored)

    def _take_samples(self, sampled: SampledTokens) -> dict[str, RequestState]:
        """Each new token: its choice's token ids, logprobs, text and stop checks (ending the choice
        when one fires). Runs once per running sequence per step, so it is one loop with the
        checks reading fields fixed at admission (add), not a call chain per token; a `plain`
        choice's token (most rows of a dataset job) is handled inline. Returns the requests with
        something to emit: streamed or stop-string choices with a token, and ended ones."""
        touched: dict[str, RequestState] = {}
        by_seq = self._by_seq
        num_taken = 0
        logprobs = sampled.logprobs if sampled.logprobs is not None else repeat(None)
        for seq_id, tid, logprob in zip(sampled.seq_ids, sampled.token_ids, logprobs):
            entry = by_seq.get(seq_id)
            if entry is None:
                continue                      # aborted while its step ran
            state, choice = entry
            if choice.finish_reason is not None:
                continue                      # finished while its step ran
            if not choice.plain:
                num_taken += self._take_token(state, choice, tid, logprob, touched)
                continue
            num_taken += 1
            token_ids = choice.token_ids
            token_ids.append(tid)
            if len(token_ids) >= choice.max_output:
                self._finish(choice, FinishReason.LENGTH, None)
                touched[state.request.request_id] = state
        self._stats.num_generated_tokens += num_taken
        return touched

    def _take_token(self, state: RequestState, choice: Choice, tid: int, logprob: TokenLogprob | None,
                    touched: dict[str, RequestState]) -> int:
        """`_take_samples` for a choice that is not plain: 1 when the token was taken (0: the
        request scores a prompt only, echo), its request put in `touched` when it has something to emit."""
        if state.request.sampling.max_tokens == 0:
            return 0
        token_ids = choice.token_ids
        token_ids.append(tid)
        if choice.logprobs is not None and logprob is not None:
            choice.logprobs.append(logprob)
        if tid in choice.stop_on and len(token_ids) >= choice.min_tokens:
            # A stop token id (stop_reason: the id) or EOS (None); a stop token is not in the text.
            self._finish(choice, FinishReason.STOP, tid if tid in choice.stop_token_ids else None,
                         num_text_tokens=len(token_ids) - 1)
            touched[state.request.request_id] = state
            return 1
        if not choice.text_at_end:
            # Streamed or with stop strings: its text grows now (a text made at the end has
            # something to emit only when its choice ends).
            touched[state.request.request_id] = state
            piece = choice.detokenizer.push(tid)
            if choice.matcher is None:
                if piece:
                    choice.pieces.append(piece)
            else:
                matched = add_text(choice, piece)
                if matched is not None:
                    self._finish(choice, FinishReason.STOP, matched, flush=False)
                    return 1
        if len(token_ids) >= choice.max_output:
            self._finish(choice, FinishReason.LENGTH, None)
            touched[state.request.request_id] = state
        return 1

    def _finish(self, choice: Choice, reason: FinishReason, stop_reason: str | int | None, *,
                flush: bool = True, num_text_tokens: int | None = None) -> None:
        """End a choice. A stop token is in token_ids but not in the text (num_text_tokens: the ids
        before it); held-back text is released, or, when the text is made at the end, the text is
        left to `_write_texts`."""
        matched = None
        if choice.text_at_end:
            if choice.finish_reason is None:
                choice.text_tokens = len(choice.token_ids) if num_text_tokens is None else num_text_tokens
        else:
            matched = end_text(choice, flush=flush)
        if matched is not None:
            reason, stop_reason = FinishReason.STOP, matched
        if choice.finish_reason is None:
            self._by_seq[choice.seq_id][0].num_unfinished -= 1
        choice.finish_reason, choice.stop_reason = reason, stop_reason
        choice.num_cached_tokens = self.scheduler.sequence(choice.seq_id).num_cached_tokens
        self.scheduler.finish_sequence(choice.seq_id)
        self.sampler.release(choice.seq_id)

    def _finish_scored_prompts(self, plan: StepPlan) -> dict[str, RequestState]:
        """max_tokens == 0 with prompt logprobs (echo): done once the whole prompt has been scored."""
        touched: dict[str, RequestState] = {}
        for work in plan.prefills:
            entry = self._by_seq.get(work.seq_id)
            if entry is None or entry[1].finish_reason is not None:
                continue
            state, choice = entry
            if state.request.sampling.max_tokens > 0:
                continue
            if work.start_pos + work.num_tokens >= len(state.request.prompt_token_ids):
                self._finish(choice, FinishReason.LENGTH, None)
                touched[state.request.request_id] = state
        return touched

    # ---- outputs --------------------------------------------------------------------------

    def _emit(self, state: RequestState) -> None:
        request = state.request
        if request.stream:
            deltas = tuple(delta(c, request.sampling.logprobs is not None) for c in state.choices
                           if len(c.token_ids) > c.sent_tokens or (c.finish_reason and not c.finish_sent))
            if deltas:
                self._ready.append(GenerationUpdate(request.request_id, deltas))
        if state.done:
            self._forget(request.request_id, [c.seq_id for c in state.choices])
            self.scheduler.forget_request(request.request_id)
            if any(c.text_tokens >= 0 for c in state.choices):
                self._unwritten.append(state)
            else:
                self._stats.num_requests_finished += 1
                self._ready.append(final_output(state))


__all__ = ["EngineLoop"]
