"""Test doubles for the engine: FakeLoop (a deterministic StepLoop) and FakeEngine (EngineClient over it).

FakeLoop needs no model: choice i of a request emits token (sum(prompt) + i + k) % vocab_size as its
k-th token (`fake_token_ids` computes the same sequence for assertions), and the text of a token is
`<id>`. It honours max_tokens, EOS (unless ignore_eos, and only after min_tokens), stop_token_ids,
stop strings, abort, logprobs and streaming, runs at most `max_running` batch requests (online
requests always run at once) and holds at most `max_waiting` more, and counts `add()` calls per request_id
in `executions`, so a
service test can prove that no line ran twice. `token_interval_s` (a number, or a function of the
request) slows requests down in wall time, for tests of cancel, expiry and timeouts; `fail_request`
(a function of the request) makes the engine fail the requests it picks, as a 500.

Stdlib + engine/api only: FakeEngine is torch-free, like the service that uses it.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable

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
from tokabatch.engine.client import EngineClient
from tokabatch.engine.api import RequestRejected
from tokabatch.engine.loop_protocol import LoopSpec

MAX_IDLE_SLEEP_S = 0.02   # a sleeping step returns this often so the engine can read aborts


def fake_token_ids(prompt_token_ids: tuple[int, ...] | list[int], count: int, *, index: int = 0,
                   vocab_size: int = 1000) -> list[int]:
    """The first `count` tokens FakeLoop generates for choice `index` of this prompt."""
    base = sum(prompt_token_ids) + index
    return [(base + k) % vocab_size for k in range(count)]


def fake_text(token_ids: list[int] | tuple[int, ...]) -> str:
    return "".join(f"<{t}>" for t in token_ids)


@dataclass(slots=True)
class _Seq:
    index: int
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    sent_tokens: int = 0                 # streaming: tokens already sent as deltas
    sent_chars: int = 0
    finish_sent: bool = False


@dataclass(slots=True)
class _Req:
    request: GenerationRequest
    seqs: list[_Seq]
    interval_s: float
    next_due_s: float = 0.0


class FakeLoop:
    """A deterministic StepLoop. Not thread-safe: serve() owns it (tests only read the counters)."""

    def __init__(self, *, vocab_size: int = 1000, context_length: int = 4096, eos_token_id: int | None = None,
                 max_running: int = 8, max_waiting: int = 8,
                 token_interval_s: float | Callable[[GenerationRequest], float] = 0.0,
                 fail_on_step: int | None = None, model_id: str = "fake",
                 fail_request: Callable[[GenerationRequest], bool] | None = None) -> None:
        self.eos_token_id = vocab_size - 1 if eos_token_id is None else eos_token_id
        self.info = ModelInfo(model_id=model_id, context_length=context_length, vocab_size=vocab_size,
                              eos_token_ids=(self.eos_token_id,), max_seqs=max_running)
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.token_interval_s = token_interval_s
        self.fail_on_step = fail_on_step
        self.fail_request = fail_request     # a request it says yes to fails with a 500 (engine_error) at add()
        self.executions: collections.Counter[str] = collections.Counter()
        self.max_batch_requests_held = 0  # high-water mark of batch requests waiting or running here
        self._waiting: dict[str, _Req] = {}
        self._running: dict[str, _Req] = {}
        self._ready: list[GenerationUpdate | GenerationOutput] = []
        self._stats = EngineStats()

    # ---- StepLoop -------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        self.executions[request.request_id] += 1
        request.sampling.validate(self.info.vocab_size)
        if self.fail_request is not None and self.fail_request(request):
            raise RequestRejected(RequestError(500, "FakeLoop: injected engine failure", code="engine_error"))
        if len(request.prompt_token_ids) >= self.info.context_length:
            raise RequestRejected(RequestError(
                400, f"this model's maximum context length is {self.info.context_length} tokens, but the prompt "
                     f"has {len(request.prompt_token_ids)}", code="context_length_exceeded", param="messages"))
        interval = self.token_interval_s
        interval_s = interval(request) if callable(interval) else interval
        self._waiting[request.request_id] = _Req(request, [_Seq(i) for i in range(request.n)], interval_s)
        held = sum(1 for r in (*self._waiting.values(), *self._running.values()) if r.request.priority > 0)
        self.max_batch_requests_held = max(self.max_batch_requests_held, held)
        self._stats.num_prompt_tokens += len(request.prompt_token_ids)

    def abort(self, request_id: str) -> None:
        req = self._waiting.pop(request_id, None) or self._running.pop(request_id, None)
        if req is not None:
            self._ready.append(GenerationOutput(
                request_id=request_id, choices=(), num_prompt_tokens=len(req.request.prompt_token_ids),
                num_cached_tokens=0, num_completion_tokens=sum(len(s.token_ids) for s in req.seqs), aborted=True))

    def has_work(self) -> bool:
        return bool(self._waiting or self._running or self._ready)

    def num_wanted(self) -> int:
        return max(0, self.max_running + self.max_waiting - len(self._waiting) - len(self._running))

    def stats(self) -> EngineStats:
        self._stats.num_waiting = len(self._waiting)
        self._stats.num_running = sum(len(r.seqs) for r in self._running.values())
        return dataclasses.replace(self._stats)

    def step(self) -> list[GenerationUpdate | GenerationOutput]:
        if self.fail_on_step is not None and self._stats.num_steps + 1 >= self.fail_on_step:
            raise RuntimeError(f"FakeLoop: injected failure at step {self._stats.num_steps + 1}")
        self._admit()
        now = time.monotonic()
        due = [r for r in self._running.values() if r.next_due_s <= now]
        if self._running and not due and not self._ready:
            time.sleep(min(MAX_IDLE_SLEEP_S, min(r.next_due_s for r in self._running.values()) - now))
            now = time.monotonic()
            due = [r for r in self._running.values() if r.next_due_s <= now]
        if due:
            self._stats.num_steps += 1
        for req in due:
            req.next_due_s = now + req.interval_s
            for seq in req.seqs:
                if seq.finish_reason is None:
                    self._advance(req.request, seq)
            self._emit(req)
        out, self._ready = self._ready, []
        return out

    # ---- internals ------------------------------------------------------------------------

    def _admit(self) -> None:
        order = sorted(self._waiting.values(), key=lambda r: r.request.priority)
        for req in order:
            # online requests never wait behind batch work (a real scheduler would preempt for them)
            num_batch_running = sum(1 for r in self._running.values() if r.request.priority > 0)
            if req.request.priority > 0 and num_batch_running >= self.max_running:
                break
            del self._waiting[req.request.request_id]
            self._running[req.request.request_id] = req
            for seq in req.seqs:
                if req.request.sampling.max_tokens == 0:
                    seq.finish_reason = FinishReason.LENGTH

    def _advance(self, request: GenerationRequest, seq: _Seq) -> None:
        params, vocab = request.sampling, self.info.vocab_size
        token = (sum(request.prompt_token_ids) + seq.index + len(seq.token_ids)) % vocab
        seq.token_ids.append(token)
        self._stats.num_generated_tokens += 1
        self._stats.num_forward_tokens += 1
        if params.logprobs is not None:
            top = tuple(((token + j) % vocab, -float(j)) for j in range(params.logprobs))
            seq.logprobs.append(TokenLogprob(token, 0.0, top))
        seq.text += f"<{token}>"
        may_stop = len(seq.token_ids) >= params.min_tokens
        if may_stop and (token in params.stop_token_ids or (token == self.eos_token_id and not params.ignore_eos)):
            seq.finish_reason, seq.stop_reason = FinishReason.STOP, (token if token in params.stop_token_ids else None)
            return
        for stop in params.stop:
            at = seq.text.find(stop)
            if at >= 0:
                seq.text = seq.text[: at + len(stop)] if params.include_stop_str_in_output else seq.text[:at]
                seq.finish_reason, seq.stop_reason = FinishReason.STOP, stop
                return
        total = len(request.prompt_token_ids) + len(seq.token_ids)
        if len(seq.token_ids) >= params.max_tokens or total >= self.info.context_length:
            seq.finish_reason = FinishReason.LENGTH

    def _emit(self, req: _Req) -> None:
        request = req.request
        if request.stream:
            deltas = tuple(
                ChoiceDelta(s.index, tuple(s.token_ids[s.sent_tokens:]), s.text[s.sent_chars:],
                            tuple(s.logprobs[s.sent_tokens:]) if request.sampling.logprobs is not None else None,
                            s.finish_reason)
                for s in req.seqs if len(s.token_ids) > s.sent_tokens or (s.finish_reason and not s.finish_sent))
            for s in req.seqs:
                s.sent_tokens, s.sent_chars = len(s.token_ids), len(s.text)
                s.finish_sent = s.finish_reason is not None
            if deltas:
                self._ready.append(GenerationUpdate(request.request_id, deltas))
        if any(s.finish_reason is None for s in req.seqs):
            return
        del self._running[request.request_id]
        self._stats.num_requests_finished += 1
        choices = tuple(
            ChoiceOutput(s.index, tuple(s.token_ids), s.text, s.finish_reason,
                         tuple(s.logprobs) if request.sampling.logprobs is not None else None, s.stop_reason)
            for s in req.seqs)
        prompt_logprobs = None
        if request.sampling.prompt_logprobs is not None:
            prompt_logprobs = (None,) + tuple(TokenLogprob(t, -1.0) for t in request.prompt_token_ids[1:])
        self._ready.append(GenerationOutput(
            request_id=request.request_id, choices=choices, num_prompt_tokens=len(request.prompt_token_ids),
            num_cached_tokens=0, num_completion_tokens=sum(len(s.token_ids) for s in req.seqs),
            prompt_logprobs=prompt_logprobs))


def build_fake_loop(**kwargs) -> FakeLoop:
    """LoopSpec factory for running FakeLoop in a real engine process."""
    return FakeLoop(**kwargs)


FAKE_FACTORY = "tokabatch.engine.testing:build_fake_loop"


class FakeEngine(EngineClient):
    """EngineClient in-process over a FakeLoop; `loop` is the FakeLoop (its counters are live)."""

    loop: FakeLoop

    @classmethod
    async def launch(cls, loop: FakeLoop | None = None, **loop_kwargs) -> FakeEngine:
        loop = loop if loop is not None else FakeLoop(**loop_kwargs)
        client = await cls.start(LoopSpec(lambda: loop), in_process=True)
        assert isinstance(client, FakeEngine)
        client.loop = loop
        return client

    @property
    def executions(self) -> collections.Counter[str]:
        """add() calls per request_id: a request that ran twice shows 2."""
        return self.loop.executions


__all__ = ["FAKE_FACTORY", "FakeEngine", "FakeLoop", "build_fake_loop", "fake_text", "fake_token_ids"]
