"""EngineLoop: the real StepLoop. Scheduler + runner + sampler + text, one step at a time.

Owns each request's output side: its sequences' token ids, incremental text, stop checks (EOS,
stop token ids, stop strings, max_tokens, the end of the context), logprobs, prompt logprobs,
streaming deltas and the final GenerationOutput, plus the EngineStats counters. The scheduler owns
pages and admission, the runner the forward pass and the sampler the draw; this module glues
them: add -> scheduler.add_request + sampler.register; step -> schedule, execute, on_step_done,
then look at every sampled token and finish sequences through scheduler.finish_sequence.

Runs inside the engine process (it imports torch through the runner); nothing of the service.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tokabatch.engine.api import (
    ChoiceDelta,
    ChoiceOutput,
    EngineStats,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    GenerationUpdate,
    ModelInfo,
    RequestError,
    TokenLogprob,
)
from tokabatch.engine.core.hydragen import kv_reads_saved
from tokabatch.engine.core.plan import SampledToken, StepPlan, StepResult
from tokabatch.engine.loop_protocol import RequestRejected
from tokabatch.text import IncrementalDetokenizer, StopStringMatcher, Tokenizer

Item = GenerationUpdate | GenerationOutput


@dataclass(slots=True)
class _Choice:
    """The output side of one sequence (one choice)."""

    seq_id: int
    index: int
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] | None = None
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    num_cached_tokens: int = 0
    sent_tokens: int = 0                 # streaming: how much was already sent as deltas
    sent_chars: int = 0
    finish_sent: bool = False


@dataclass(slots=True)
class _RequestState:
    request: GenerationRequest
    choices: list[_Choice]
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def done(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices)


class EngineLoop:
    """The StepLoop over a real model. Not thread-safe: serve() owns it."""

    def __init__(self, *, scheduler: Any, runner: Any, sampler: Any, tokenizer: Tokenizer, info: ModelInfo,
                 check_invariants: bool = False) -> None:
        self.info = info
        self.scheduler, self.runner, self.sampler, self.tokenizer = scheduler, runner, sampler, tokenizer
        self.check_invariants = check_invariants   # tests: the scheduler checks its books after every step
        self._eos_ids = frozenset(info.eos_token_ids)
        self._requests: dict[str, _RequestState] = {}
        self._by_seq: dict[int, tuple[_RequestState, _Choice]] = {}
        self._ready: list[Item] = []
        self._stats = EngineStats(num_pages=info.num_pages)

    # ---- StepLoop -------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        """Admit a request to the scheduler's queue; raises RequestRejected / ValueError(param, msg)."""
        self._check_request(request)
        if request.sampling.max_tokens == 0 and request.sampling.prompt_logprobs is None:
            self._ready.append(self._empty_output(request))   # nothing to compute
            return
        seq_ids = self.scheduler.add_request(request)
        params = request.sampling
        state = _RequestState(request, [])
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = []
        try:
            for seq_id in seq_ids:
                seq = self.scheduler.sequence(seq_id)
                self.sampler.register(seq_id, params, request.prompt_token_ids, choice_index=seq.choice_index)
                choice = _Choice(
                    seq_id, seq.choice_index,
                    self.tokenizer.detokenizer(request.prompt_token_ids, skip_special_tokens=params.skip_special_tokens),
                    StopStringMatcher(params.stop, include_stop=params.include_stop_str_in_output) if params.stop else None,
                    logprobs=[] if params.logprobs is not None else None)
                state.choices.append(choice)
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
        self._ready.append(self._output(state, aborted=True))

    def has_work(self) -> bool:
        return bool(self._ready) or self.scheduler.has_work()

    def num_wanted(self) -> int:
        return self.scheduler.num_wanted()

    def stats(self) -> EngineStats:
        s = self._stats
        sched = self.scheduler
        s.num_waiting = _int_attr(sched, "num_waiting")
        s.num_running = _int_attr(sched, "num_running")
        s.num_free_pages = _int_attr(sched, "num_free_pages")
        s.num_preemptions = _int_attr(sched, "num_preemptions", s.num_preemptions)
        s.num_prompt_tokens = _int_attr(sched, "num_prompt_tokens", s.num_prompt_tokens)   # of admitted ones
        s.num_cached_tokens = _int_attr(sched, "num_cached_tokens", s.num_cached_tokens)
        return EngineStats(**{name: getattr(s, name) for name in EngineStats.__slots__ if name != "extra"},
                           extra=dict(s.extra))

    def step(self) -> list[Item]:
        if self.scheduler.has_work():
            plan: StepPlan = self.scheduler.schedule()
            if not plan.is_empty:
                result: StepResult = self.runner.execute(plan)
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
        out, self._ready = self._ready, []
        return out

    def _count_decode_reads(self, plan: StepPlan) -> None:
        """Hydragen sharing for /metrics: the KV-token reads of this step's decodes without grouping
        (each reads its whole context, current token included) and those its prefix groups save."""
        self._stats.num_decode_kv_reads += sum(w.start_pos + w.num_tokens for w in plan.decodes)
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
        limit = self.info.context_length - (1 if request.sampling.max_tokens > 0 else 0)
        if num_prompt > limit:
            raise RequestRejected(RequestError(
                400, f"This model's maximum context length is {self.info.context_length} tokens. However, your "
                     f"prompt has {num_prompt} tokens, leaving no room for completion tokens.",
                code="context_length_exceeded", param="messages"))

    def _forget(self, request_id: str, seq_ids: Any) -> None:
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

    def _take_samples(self, sampled: tuple[SampledToken, ...]) -> dict[str, _RequestState]:
        touched: dict[str, _RequestState] = {}
        for token in sampled:
            entry = self._by_seq.get(token.seq_id)
            if entry is None or entry[1].finish_reason is not None or entry[0].request.sampling.max_tokens == 0:
                continue   # aborted or finished while its step ran; or scoring a prompt only (echo)
            state, choice = entry
            self._stats.num_generated_tokens += 1
            self._append(state, choice, token)
            touched[state.request.request_id] = state
        return touched

    def _append(self, state: _RequestState, choice: _Choice, token: SampledToken) -> None:
        """One new token of one choice: text, stop checks, and the end of the sequence if it stops."""
        params = state.request.sampling
        tid = token.token_id
        choice.token_ids.append(tid)
        if choice.logprobs is not None and token.logprob is not None:
            choice.logprobs.append(token.logprob)
        may_stop = len(choice.token_ids) >= params.min_tokens
        if may_stop and tid in params.stop_token_ids:
            self._finish(choice, FinishReason.STOP, tid)
            return
        if may_stop and not params.ignore_eos and tid in self._eos_ids:
            self._finish(choice, FinishReason.STOP, None)
            return
        if self._add_text(choice, choice.detokenizer.push(tid)):
            return
        seq = self.scheduler.sequence(choice.seq_id)
        num_tokens = len(state.request.prompt_token_ids) + len(choice.token_ids)
        max_len = getattr(seq, "max_len", None)
        if (len(choice.token_ids) >= params.max_tokens or num_tokens >= self.info.context_length
                or (max_len is not None and num_tokens >= max_len)):
            self._finish(choice, FinishReason.LENGTH, None)

    def _add_text(self, choice: _Choice, new_text: str) -> bool:
        """Append text through the stop-string matcher; True when a stop string ended the choice."""
        if choice.matcher is None:
            choice.text += new_text
            return False
        emit, matched = choice.matcher.feed(new_text)
        choice.text += emit
        if matched is not None:
            self._finish(choice, FinishReason.STOP, matched, flush=False)
            return True
        return False

    def _finish(self, choice: _Choice, reason: FinishReason, stop_reason: str | int | None, *,
                flush: bool = True) -> None:
        """End a choice. A stop token is in token_ids but not in the text; held-back text is released."""
        if flush:
            if self._add_text(choice, choice.detokenizer.flush()):
                return   # the released text completed a stop string: that is what ended it
            if choice.matcher is not None:
                choice.text += choice.matcher.flush()
        choice.finish_reason, choice.stop_reason = reason, stop_reason
        choice.num_cached_tokens = _int_attr(self.scheduler.sequence(choice.seq_id), "num_cached_tokens")
        self.scheduler.finish_sequence(choice.seq_id)
        self.sampler.release(choice.seq_id)

    def _finish_scored_prompts(self, plan: StepPlan) -> dict[str, _RequestState]:
        """max_tokens == 0 with prompt logprobs (echo): done once the whole prompt has been scored."""
        touched: dict[str, _RequestState] = {}
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

    def _emit(self, state: _RequestState) -> None:
        request = state.request
        if request.stream:
            deltas = tuple(self._delta(c, request.sampling.logprobs is not None) for c in state.choices
                           if len(c.token_ids) > c.sent_tokens or (c.finish_reason and not c.finish_sent))
            if deltas:
                self._ready.append(GenerationUpdate(request.request_id, deltas))
        if state.done:
            self._forget(request.request_id, [c.seq_id for c in state.choices])
            self.scheduler.forget_request(request.request_id)
            self._stats.num_requests_finished += 1
            self._ready.append(self._output(state))

    @staticmethod
    def _delta(choice: _Choice, with_logprobs: bool) -> ChoiceDelta:
        delta = ChoiceDelta(
            choice.index, tuple(choice.token_ids[choice.sent_tokens:]), choice.text[choice.sent_chars:],
            tuple(choice.logprobs[choice.sent_tokens:]) if with_logprobs and choice.logprobs is not None else None,
            choice.finish_reason)
        choice.sent_tokens, choice.sent_chars = len(choice.token_ids), len(choice.text)
        choice.finish_sent = choice.finish_reason is not None
        return delta

    def _output(self, state: _RequestState, *, aborted: bool = False) -> GenerationOutput:
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

    def _empty_output(self, request: GenerationRequest) -> GenerationOutput:
        choices = tuple(ChoiceOutput(i, (), "", FinishReason.LENGTH, () if request.sampling.logprobs is not None
                                     else None) for i in range(request.n))
        self._stats.num_requests_finished += 1
        return GenerationOutput(request_id=request.request_id, choices=choices,
                                num_prompt_tokens=len(request.prompt_token_ids), num_cached_tokens=0,
                                num_completion_tokens=0)


def _int_attr(obj: Any, name: str, default: int = 0) -> int:
    value = getattr(obj, name, default)
    return int(value() if callable(value) else value)


__all__ = ["EngineLoop"]
