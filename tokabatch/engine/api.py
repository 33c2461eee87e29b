"""THE SEAM between the service and the engine: requests in, outputs out.

Everything here is a plain dataclass of ints, floats and strings (it crosses a process boundary
by pickling), the `Engine` protocol that `EngineClient` (engine/client.py, the process boundary)
and test doubles implement, and `RequestRejected`, the engine's one way to refuse a request with a
typed error. Imports no torch, no aiohttp, no SQLAlchemy.

Token ids are the engine's language; the service tokenizes prompts (tokabatch.text) before it
builds a `GenerationRequest`, and renders token ids of logprobs back to strings. The engine
detokenizes generated text itself because stop strings must be matched while generating.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import AsyncIterable, AsyncIterator, Iterable, Protocol, runtime_checkable

MAX_TOP_LOGPROBS = 20
GREEDY_BELOW = 1e-5                      # temperatures below this sample greedily (SamplingParams.greedy)
# The penalized logits (divided by the penalty where positive, multiplied where negative, then divided
# by the temperature) must stay finite in float32: a penalty of 1e-320 is 0 there.
REPETITION_PENALTY_RANGE = (1e-20, 1e20)


class Priority(enum.IntEnum):
    """Lower runs first: admission order, and the last to be preempted."""

    ONLINE = 0
    BATCH = 1


class FinishReason(str, enum.Enum):
    STOP = "stop"        # EOS, a stop token id or a stop string
    LENGTH = "length"    # max_tokens or the end of the context
    ABORT = "abort"      # aborted by the caller (cancel, expiry, client gone): never rendered as a choice
    ERROR = "error"      # the engine failed this request: see GenerationOutput.error


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """What to generate for one request. Validated by `validate()`; the service maps its errors to 400s."""

    max_tokens: int = 16
    temperature: float = 1.0             # 0 (or below GREEDY_BELOW) means greedy
    top_p: float = 1.0
    top_k: int = 0                       # 0 (or -1) disables
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token_id, bias) pairs, bias in [-100, 100]
    seed: int | None = None              # same seed => same output whatever else is in the batch
    logprobs: int | None = None          # None: off; k: the sampled token's logprob plus the top k (k <= 20)
    prompt_logprobs: int | None = None   # None: off; k: logprob of every prompt token plus the top k
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: int = 0                  # EOS and stop token ids are masked until this many tokens exist
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # llguidance grammar text (tokabatch/grammars.py builds it from a JSON schema, regex, choices or
    # EBNF): each token is drawn from those the grammar allows next. None: unconstrained.
    grammar: str | None = None

    @property
    def runs_to_max_tokens(self) -> bool:
        """Nothing but max_tokens (or the context) can end it: EOS ignored, no stop strings or ids."""
        return self.ignore_eos and not self.stop and not self.stop_token_ids

    def validate(self, vocab_size: int | None = None) -> None:
        """Raise ValueError(param, message) for a value the engine cannot honour."""
        checks: list[tuple[bool, str, str]] = [
            (self.max_tokens >= 0, "max_tokens", "must be >= 0"),
            (0.0 <= self.temperature <= 2.0, "temperature", "must be between 0 and 2"),
            (0.0 < self.top_p <= 1.0, "top_p", "must be greater than 0 and at most 1"),
            (self.top_k >= -1, "top_k", "must be -1, 0 or positive"),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be between 0 and 1"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty", "must be between -2 and 2"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty", "must be between -2 and 2"),
            (REPETITION_PENALTY_RANGE[0] <= self.repetition_penalty <= REPETITION_PENALTY_RANGE[1],
             "repetition_penalty", "must be between {:g} and {:g}".format(*REPETITION_PENALTY_RANGE)),
            (self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS, "logprobs",
             f"top logprobs must be between 0 and {MAX_TOP_LOGPROBS}"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS, "prompt_logprobs",
             f"must be between 0 and {MAX_TOP_LOGPROBS}"),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0"),
            (all(-100.0 <= b <= 100.0 for _, b in self.logit_bias), "logit_bias",
             "biases must be between -100 and 100"),
        ]
        if vocab_size is not None:
            checks.append((all(0 <= t < vocab_size for t, _ in self.logit_bias), "logit_bias",
                           f"token ids must be between 0 and {vocab_size - 1}"))
            checks.append((all(0 <= t < vocab_size for t in self.stop_token_ids), "stop_token_ids",
                           f"token ids must be between 0 and {vocab_size - 1}"))
        for ok, param, message in checks:
            if not ok:
                raise ValueError(param, f"{param} {message}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or below GREEDY_BELOW: a draw there differs from the argmax only at near
        ties, and far smaller temperatures are 0 or overflow in float32 (such a draw returned
        garbage). vLLM draws the same line."""
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One request: n choices sampled from one prompt (the n sequences share the prompt's pages)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    sampling: SamplingParams = SamplingParams()
    n: int = 1
    priority: Priority = Priority.BATCH
    stream: bool = False                 # send GenerationUpdate deltas before the final output


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """The logprob of one token, with the top-k alternatives at its position (ids, natural log)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()   # (token_id, logprob), most likely first


@dataclass(frozen=True, slots=True)
class RequestError:
    """Why the engine refused or failed a request; the service renders it as an HTTP-style error line."""

    status: int                          # 400 for a request the model rejects, 500/503 for engine failures
    message: str
    code: str | None = None              # e.g. "context_length_exceeded", "engine_error"
    param: str | None = None


class RequestRejected(Exception):
    """Raised by the engine's admission of a request it refuses; carries the typed error to send back
    (engine/loop_protocol turns it into that request's error output)."""

    def __init__(self, error: RequestError) -> None:
        super().__init__(error.message)
        self.error = error


def context_length_exceeded(num_prompt_tokens: int, context_length: int) -> RequestError:
    """The engine's refusal of a prompt that leaves no room to generate within the context."""
    return RequestError(400, f"This model's maximum context length is {context_length} tokens. However, your "
                             f"prompt has {num_prompt_tokens} tokens, leaving no room for completion tokens.",
                        code="context_length_exceeded", param="prompt")


@dataclass(frozen=True, slots=True)
class ChoiceOutput:
    index: int
    token_ids: tuple[int, ...]
    text: str                            # detokenized, stop string cut (unless include_stop_str_in_output)
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] | None = None
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it, if any


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """The final result of one request: every choice finished, or the request failed/was aborted."""

    request_id: str
    choices: tuple[ChoiceOutput, ...]
    num_prompt_tokens: int
    num_cached_tokens: int               # prompt tokens served from the prefix cache
    num_completion_tokens: int           # summed over choices
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None  # first entry None (no context)
    error: RequestError | None = None
    aborted: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and not self.aborted


@dataclass(frozen=True, slots=True)
class ChoiceDelta:
    index: int
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] | None = None
    finish_reason: FinishReason | None = None


@dataclass(frozen=True, slots=True)
class GenerationUpdate:
    """Incremental progress of a streaming request: only what is new since the previous update.

    A streaming request receives updates (the last one carries every choice's finish_reason) and
    then exactly one GenerationOutput with the whole result and the token counts.
    """

    request_id: str
    deltas: tuple[ChoiceDelta, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    model_id: str                        # the served model name
    context_length: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    page_size: int = 16
    num_pages: int = 0
    max_seqs: int = 0
    device: str = "cpu"
    dtype: str = "float32"


PREDICTOR_MIN_SAMPLES = 4                # finished sequences the length predictor needs before it predicts


@dataclass(slots=True)
class EngineStats:
    """Counters for /metrics. Totals only grow; gauges describe now."""

    num_waiting: int = 0                 # gauge: requests queued in the engine, not yet admitted
    num_running: int = 0                 # gauge: sequences holding KV pages
    num_free_pages: int = 0              # gauge
    num_pages: int = 0
    num_requests_finished: int = 0
    num_prompt_tokens: int = 0           # prompt tokens of admitted requests
    num_cached_tokens: int = 0           # of which served from the prefix cache
    num_generated_tokens: int = 0
    num_forward_tokens: int = 0          # tokens that went through the model's forward
    num_steps: int = 0
    num_preemptions: int = 0
    num_hydragen_saved_kv_reads: int = 0  # decode KV-token reads avoided by shared-prefix groups
    num_decode_kv_reads: int = 0          # decode KV-token reads without grouping (the denominator)
    busy_seconds: float = 0.0            # engine process: wall seconds with work (stepping, or messages to handle)
    idle_seconds: float = 0.0            # engine process: wall seconds waiting for work on an empty pipe
    # The length predictor's window (core/predictor.py): sequences that ended by themselves (their
    # number and output tokens) and those cut by their max_tokens, among the recently finished.
    num_recent_ended: int = 0
    num_recent_ended_tokens: int = 0
    num_recent_capped: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.num_cached_tokens / self.num_prompt_tokens if self.num_prompt_tokens else 0.0

    def expected_output_tokens(self, max_tokens: int, *, runs_to_max_tokens: bool,
                               min_samples: int = PREDICTOR_MIN_SAMPLES) -> float:
        """What the engine's length predictor expects a fresh sequence to generate: the mean of the
        recent lengths (a cut one counts as `max_tokens`), at most `max_tokens`; `max_tokens` itself
        for a sequence nothing but its limit can end, or while too few have finished."""
        count = self.num_recent_ended + self.num_recent_capped
        if runs_to_max_tokens or count < min_samples:
            return float(max_tokens)
        mean = (self.num_recent_ended_tokens + self.num_recent_capped * max_tokens) / count
        return float(min(max_tokens, mean))


Item = GenerationUpdate | GenerationOutput    # what an engine hands back for a request: deltas, then its output


@runtime_checkable
class Engine(Protocol):
    """What the service drives. EngineClient is the real one; tests may use doubles."""

    @property
    def info(self) -> ModelInfo: ...

    def generate(self, requests: AsyncIterable[GenerationRequest]) -> AsyncIterator[GenerationOutput]:
        """Run a stream of requests; yield each one's output as it finishes (in any order).

        Back-pressure: the next request is pulled from `requests` only when the engine wants more
        work (its scheduler could admit it soon), so a 50,000-line batch is never all in memory.
        Closing the returned iterator aborts this stream's unfinished requests.
        """
        ...

    def submit(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate | GenerationOutput]:
        """Run one request now, bypassing back-pressure (online traffic); the last item is the output."""
        ...

    async def abort(self, request_ids: Iterable[str]) -> None:
        """Stop these requests; each unfinished one yields an output with aborted=True."""
        ...

    def stats(self) -> EngineStats: ...

    def health(self) -> str | None:
        """None while the engine can take requests; else why it cannot (for /health and the runner)."""
        ...

    async def close(self) -> None: ...
