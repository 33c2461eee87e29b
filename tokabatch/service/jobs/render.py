"""OpenAI request bodies -> engine requests, and engine outputs -> OpenAI response bodies.

Shared by the batch runner and the online endpoints (http/online.py): a batch line is treated
exactly like a synchronous `POST <url>` (contract §4), so both paths call `prepare_request` (which
raises `InvalidRequest` for anything the endpoint rejects: the runner writes it as a 4xx line, the
online handler as a 400 response) and `render_response`. Streaming chunks live in render_stream.py
and reuse the per-choice helpers of render_body.py.

Defaults are OpenAI's, not the engine's: chat temperature 1 and max tokens = the remaining context;
completions max_tokens 16. Must not import torch, aiohttp or SQLAlchemy.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Mapping

from tokabatch.engine.api import (
    MAX_TOP_LOGPROBS, GenerationOutput, GenerationRequest, ModelInfo, Priority, RequestError, SamplingParams,
)
from tokabatch.errors import InvalidRequest, NotFound, TokabatchError
from tokabatch.service.jobs import body_fields as bf
from tokabatch.service.jobs.render_body import render_chat_body, render_completion_body
from tokabatch.service.jobs.structured import GUIDED_FIELDS, NO_FORMAT, OutputFormat, output_format

if TYPE_CHECKING:
    from tokabatch.text import Tokenizer

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"
ENDPOINTS = (CHAT_ENDPOINT, COMPLETIONS_ENDPOINT)
MAX_N = 128
TRUNCATE_MARGIN_TOKENS = 64              # tokens more than a truncated prompt keeps, tokenized at its cut
MAX_COMPLETION_LOGPROBS = 5

# Accepted by both endpoints: common sampling fields and the vLLM/SGLang extension names (§5.1).
_COMMON = {
    "model", "n", "temperature", "top_p", "stop", "seed", "frequency_penalty", "presence_penalty",
    "logit_bias", "max_tokens", "stream", "stream_options", "user", "logprobs",
    "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
    "skip_special_tokens", "include_stop_str_in_output", "spaces_between_special_tokens",
    "truncate_prompt_tokens", "priority", *GUIDED_FIELDS,
}
# Hosted-only fields: accepted and ignored (contract §5.1 [tb]).
_IGNORED = {"user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention", "metadata", "store",
            "service_tier", "spaces_between_special_tokens", "priority", "logprobs_in_fingerprint",
            "apply_chat_template_overrides"}
# Features this engine cannot do: a 400 when given a non-null value (tools: structured.py).
_CHAT_UNSUPPORTED = {"functions", "function_call", "audio", "prediction", "web_search_options",
                     "reasoning_effort", "verbosity", "moderation"}
_CHAT_FIELDS = _COMMON | _IGNORED | _CHAT_UNSUPPORTED | {
    "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools", "tool_choice",
    "parallel_tool_calls", "modalities", "chat_template_kwargs", "add_generation_prompt",
    "continue_final_message",
}
_COMPLETION_FIELDS = _COMMON | _IGNORED | {"prompt", "echo", "best_of", "suffix"}


@dataclass(frozen=True, slots=True)
class PreparedRequest:
    """One endpoint call turned into engine requests (one per prompt), plus what rendering needs."""

    endpoint: str
    model: str                           # the served model name, echoed in responses
    response_id: str                     # chatcmpl-… / cmpl-…
    requests: tuple[GenerationRequest, ...]
    texts: tuple[str | None, ...]        # per engine request: the prompt text, None for a token-id prompt
    n: int
    logprobs: int | None                 # top-k alternatives per position; None: logprobs off
    echo: bool = False
    stream: bool = False
    include_usage: bool = False          # stream_options.include_usage
    output: OutputFormat = NO_FORMAT     # structured outputs: the grammar, and whether it is a tool call
    tokenizer: Tokenizer | None = field(default=None, compare=False, repr=False)

    @property
    def prompt_texts(self) -> tuple[str, ...]:
        """Per engine request, the prompt's text (for echo and the Parquet file); a token-id prompt
        is decoded here, when a result is written, not while the request is prepared."""
        return tuple(text if text is not None else self.tokenizer.decode_prompt(request.prompt_token_ids)
                     for text, request in zip(self.texts, self.requests))


def _per_request_errors(prepare: Callable[..., PreparedRequest]) -> Callable[..., PreparedRequest]:
    """What a body can make the tokenizer or the template raise (a lone surrogate in a string, a
    structure nested too deeply, a value of a type nothing expected) becomes that request's 400,
    never a failure of its batch or a 500."""
    @functools.wraps(prepare)
    def wrapper(endpoint: str, body: Mapping[str, Any], **kwargs: Any) -> PreparedRequest:
        try:
            return prepare(endpoint, body, **kwargs)
        except TokabatchError:
            raise
        except (TypeError, ValueError, UnicodeError, RecursionError, LookupError) as exc:
            raise bf.unprocessable(body, exc) from exc
    return wrapper


@_per_request_errors
def prepare_request(
    endpoint: str,
    body: Mapping[str, Any],
    *,
    tokenizer: Tokenizer,
    model_info: ModelInfo,
    served_model_names: set[str],
    request_id: str,
    priority: Priority = Priority.BATCH,
) -> PreparedRequest:
    """Validate `body` exactly as the endpoint would and build its engine requests.

    Raises InvalidRequest (400, with param and code) or NotFound (404 model_not_found), also for
    what the body makes the tokenizer raise (_per_request_errors)."""
    if endpoint not in ENDPOINTS:
        raise InvalidRequest(f"Unsupported endpoint {endpoint!r}; supported: {', '.join(ENDPOINTS)}.",
                             param="endpoint", code="invalid_value")
    if not isinstance(body, Mapping):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_type")
    chat = endpoint == CHAT_ENDPOINT
    allowed = _CHAT_FIELDS if chat else _COMPLETION_FIELDS
    for name in body:
        if name not in allowed:
            raise InvalidRequest(f"Unrecognized request argument supplied: {name}", param=name,
                                 code="unknown_parameter")
    model = body.get("model")
    if model is None:
        raise InvalidRequest("Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if model not in served_model_names:
        raise NotFound(f"The model `{model}` does not exist or you do not have access to it.", param="model",
                       code="model_not_found")
    output = output_format(body, chat=chat)
    if output.grammar is not None and bf.get_bool(body, "ignore_eos", False):
        raise bf.invalid_value("ignore_eos", "Invalid 'ignore_eos': a constrained output ends when its format is "
                               "complete; ignore_eos cannot be combined with it.")
    if chat:
        _reject_unsupported_chat(body)
        prompts = [_chat_prompt(body, tokenizer, model_info.context_length, output.tools)]
    else:
        _reject_unsupported_completion(body)
        prompts = _completion_prompts(body, tokenizer, model_info.vocab_size, model_info.context_length)
    prompts = [_truncate(body, ids, text) for ids, text in prompts]
    n = bf.get_int(body, "n", 1, 1, MAX_N)
    logprobs = _logprobs(body, chat)
    echo = bf.get_bool(body, "echo", False)
    stream = bf.get_bool(body, "stream", False)
    include_usage = _include_usage(body, stream)
    requests = []
    for i, (ids, _text) in enumerate(prompts):
        sampling = _sampling(body, chat=chat, num_prompt_tokens=len(ids), model_info=model_info,
                             logprobs=logprobs, echo=echo)
        if output.grammar is not None:
            sampling = dataclasses.replace(sampling, grammar=output.grammar)
        requests.append(GenerationRequest(_engine_request_id(request_id, i, len(prompts)), tuple(ids), sampling,
                                          n=n, priority=priority, stream=stream))
    return PreparedRequest(
        endpoint=endpoint, model=model_info.model_id, response_id=_response_id(endpoint, request_id),
        requests=tuple(requests), texts=tuple(text for _, text in prompts), n=n, logprobs=logprobs,
        echo=echo, stream=stream, include_usage=include_usage, tokenizer=tokenizer, output=output,
    )


def with_request_id(prepared: PreparedRequest, request_id: str) -> PreparedRequest:
    """The same prepared call under another id (what prepare_request gives an equal body with it)."""
    num = len(prepared.requests)
    requests = tuple(dataclasses.replace(r, request_id=_engine_request_id(request_id, i, num))
                     for i, r in enumerate(prepared.requests))
    return dataclasses.replace(prepared, requests=requests, response_id=_response_id(prepared.endpoint, request_id))


def _engine_request_id(request_id: str, index: int, num_prompts: int) -> str:
    return request_id if num_prompts == 1 else f"{request_id}-{index}"


def _response_id(endpoint: str, request_id: str) -> str:
    return ("chatcmpl-" if endpoint == CHAT_ENDPOINT else "cmpl-") + request_id.split("_", 1)[-1]


def _reject_unsupported_chat(body: Mapping[str, Any]) -> None:
    for name in _CHAT_UNSUPPORTED:
        if body.get(name) is not None:
            raise bf.unsupported(name)
    tool_choice = body.get("tool_choice")
    if tool_choice is not None and tool_choice != "none" and body.get("tools") is None:
        raise bf.invalid_value("tool_choice", "Invalid 'tool_choice': it needs 'tools'.")
    if body.get("tools") is not None and bf.get_bool(body, "stream", False):
        raise bf.unsupported("tools", "with stream=true is not supported (send tool calls without streaming)")
    modalities = body.get("modalities")
    if modalities is not None and modalities != ["text"]:
        raise bf.unsupported("modalities", "other than ['text'] is not supported")


def _reject_unsupported_completion(body: Mapping[str, Any]) -> None:
    best_of = bf.get_int(body, "best_of", 1, 0, 20)
    if best_of is not None and best_of > 1:
        raise bf.unsupported("best_of", "greater than 1 is not supported")
    suffix = body.get("suffix")
    if suffix is not None and suffix != "":
        raise bf.unsupported("suffix", "(fill-in-the-middle) is not supported")


def _chat_prompt(body: Mapping[str, Any], tokenizer: Tokenizer, context_length: int,
                 tools: tuple[dict, ...] = ()) -> tuple[list[int], str]:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("Missing required parameter: 'messages'.", param="messages",
                             code="missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise bf.invalid_value("messages", "Invalid 'messages': expected a non-empty array of messages.")
    if len(messages) > bf.MAX_MESSAGES:
        raise bf.invalid_value("messages", f"Invalid 'messages': at most {bf.MAX_MESSAGES} messages, got "
                               f"{len(messages)}.")
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise bf.invalid_type("chat_template_kwargs", "an object", kwargs)
    continue_final = bf.get_bool(body, "continue_final_message", False)
    add_generation = bf.get_bool(body, "add_generation_prompt", not continue_final)
    if tools:
        kwargs = {"tools": list(tools), **kwargs}       # templates that know tools describe them to the model
    text = tokenizer.render_chat(messages, add_generation_prompt=add_generation,
                                 continue_final_message=continue_final, **kwargs)
    return _encode(body, tokenizer, text, context_length, "messages", add_special_tokens=False), text


def _encode(body: Mapping[str, Any], tokenizer: Tokenizer, text: str, context_length: int, param: str, *,
            add_special_tokens: bool = True) -> list[int]:
    """The prompt's token ids, without tokenizing what cannot fit: a text longer than the context
    times the longest token is refused at once (tokenizing megabytes costs ~150 bytes of memory per
    character), or, with truncate_prompt_tokens, only its tail that can hold the kept tokens is tokenized."""
    limit = context_length * tokenizer.max_token_chars
    if len(text) > limit:
        keep = bf.get_int(body, "truncate_prompt_tokens", None, 1)
        if keep is None:
            raise InvalidRequest(
                f"This model's maximum context length is {context_length} tokens. However, your {param} has "
                f"{len(text):,} characters, at least {len(text) // tokenizer.max_token_chars:,} tokens. Please "
                f"reduce the length of the {param}.", param=param, code="context_length_exceeded")
        text = text[-(min(keep, context_length) + TRUNCATE_MARGIN_TOKENS) * tokenizer.max_token_chars:]
    return tokenizer.encode(text, add_special_tokens=add_special_tokens)


def _is_token_ids(value: Any) -> bool:
    """A non-empty list of ints (not bools), checked at C speed: a prompt of token ids."""
    return type(value) is list and bool(value) and set(map(type, value)) == {int}


def _completion_prompts(body: Mapping[str, Any], tokenizer: Tokenizer, vocab_size: int,
                        context_length: int) -> list[tuple[list[int], str | None]]:
    """`prompt`: string | string[] | int[] | int[][] -> [(ids, text)], one per engine request; the
    text of a token-id prompt is None (PreparedRequest.prompt_texts decodes it when needed)."""
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif _is_token_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt:
        items = prompt
    else:
        raise bf.invalid_value("prompt", "Invalid 'prompt': expected a string, an array of strings, an array of "
                               "token ids or an array of token id arrays, not an empty value.")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = _encode(body, tokenizer, item, context_length, "prompt")
            text = item
        elif _is_token_ids(item) or item == []:
            if item and (min(item) < 0 or max(item) >= vocab_size):
                bad = next(t for t in item if not 0 <= t < vocab_size)
                raise bf.invalid_value("prompt", f"Invalid 'prompt': token id {bad} is outside the vocabulary "
                                       f"(0..{vocab_size - 1}).")
            ids, text = item, None
        else:
            raise bf.invalid_type("prompt", "a string, an array of strings or token id arrays", item)
        if not ids:
            raise bf.invalid_value("prompt", "Invalid 'prompt': a prompt must contain at least one token.")
        out.append((ids, text))
    return out


def _truncate(body: Mapping[str, Any], ids: list[int], text: str | None) -> tuple[list[int], str | None]:
    keep = bf.get_int(body, "truncate_prompt_tokens", None, 1)
    if keep is None or len(ids) <= keep:
        return ids, text
    return ids[-keep:], None          # the kept tokens' text is decoded when needed


def _logprobs(body: Mapping[str, Any], chat: bool) -> int | None:
    """Top-k alternatives per position, or None. Chat: logprobs bool + top_logprobs; completions: int."""
    if chat:
        want = bf.get_bool(body, "logprobs", False)
        top = bf.get_int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
        if top is not None and not want:
            raise bf.invalid_value("top_logprobs", "Invalid 'top_logprobs': 'logprobs' must be set to true when "
                                   "'top_logprobs' is used.")
        return (top or 0) if want else None
    return bf.get_int(body, "logprobs", None, 0, MAX_COMPLETION_LOGPROBS)


def _include_usage(body: Mapping[str, Any], stream: bool) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not stream:
        raise bf.invalid_value("stream_options", "Invalid 'stream_options': only allowed when 'stream' is true.")
    if not isinstance(options, dict):
        raise bf.invalid_type("stream_options", "an object", options)
    return bf.get_bool(options, "include_usage", False)


def _max_tokens(body: Mapping[str, Any], *, chat: bool, num_prompt_tokens: int, context_length: int) -> int:
    """OpenAI's limit: chat max_completion_tokens/max_tokens (default: the rest of the context),
    completions max_tokens (default 16). Prompt plus limit must fit the context."""
    if chat:
        new = bf.get_int(body, "max_completion_tokens", None, 1)
        old = bf.get_int(body, "max_tokens", None, 1)
        if new is not None and old is not None and new != old:
            raise bf.invalid_value("max_tokens", f"Invalid 'max_tokens': {old} differs from 'max_completion_tokens' "
                                   f"{new}; set only one of them.")
        requested = new if new is not None else old
        if num_prompt_tokens >= context_length:
            raise _too_long(context_length, num_prompt_tokens, 1, "messages")
        if requested is None:
            return context_length - num_prompt_tokens
    else:
        requested = bf.get_int(body, "max_tokens", 16, 0)
        assert requested is not None
    if num_prompt_tokens + requested > context_length:
        raise _too_long(context_length, num_prompt_tokens, requested, "messages" if chat else "prompt")
    return requested


def _too_long(context_length: int, num_prompt: int, num_completion: int, param: str) -> InvalidRequest:
    return InvalidRequest(
        f"This model's maximum context length is {context_length} tokens. However, you requested "
        f"{num_prompt + num_completion} tokens ({num_prompt} in the {param}, {num_completion} in the completion). "
        f"Please reduce the length of the {param} or completion.",
        param=param, code="context_length_exceeded")


def _sampling(body: Mapping[str, Any], *, chat: bool, num_prompt_tokens: int, model_info: ModelInfo,
              logprobs: int | None, echo: bool) -> SamplingParams:
    vocab = model_info.vocab_size
    max_tokens = _max_tokens(body, chat=chat, num_prompt_tokens=num_prompt_tokens,
                             context_length=model_info.context_length)
    temperature = bf.get_number(body, "temperature", 1.0, 0, 2)
    top_p = bf.get_number(body, "top_p", 1.0, 0, 1)
    if top_p == 0.0:                     # keep only the most likely token: that is greedy decoding
        temperature, top_p = 0.0, 1.0
    top_k = bf.get_int(body, "top_k", 0, -1)
    min_tokens = bf.get_int(body, "min_tokens", 0, 0)
    if min_tokens > max_tokens:
        raise bf.invalid_value("min_tokens", f"Invalid 'min_tokens': {min_tokens} is greater than the maximum "
                               f"number of tokens {max_tokens}.")
    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=0 if top_k == -1 else top_k,
        min_p=bf.get_number(body, "min_p", 0.0, 0, 1),
        presence_penalty=bf.get_number(body, "presence_penalty", 0.0, -2, 2),
        frequency_penalty=bf.get_number(body, "frequency_penalty", 0.0, -2, 2),
        repetition_penalty=bf.get_number(body, "repetition_penalty", 1.0, 0),
        logit_bias=bf.get_logit_bias(body, vocab),
        seed=bf.get_int(body, "seed", None, bf.INT64_MIN, bf.INT64_MAX),
        logprobs=logprobs,
        prompt_logprobs=logprobs if (echo and logprobs is not None) else None,
        stop=bf.get_stop(body), stop_token_ids=bf.get_token_ids(body, "stop_token_ids", vocab),
        ignore_eos=bf.get_bool(body, "ignore_eos", False), min_tokens=min_tokens,
        include_stop_str_in_output=bf.get_bool(body, "include_stop_str_in_output", False),
        skip_special_tokens=bf.get_bool(body, "skip_special_tokens", True),
    )
    try:
        params.validate(vocab)
    except ValueError as exc:
        param, message = exc.args if len(exc.args) == 2 else (None, str(exc))
        raise bf.invalid_value(param, f"Invalid '{param}': {message}.") from None
    return params


def first_failure(outputs: list[GenerationOutput]) -> GenerationOutput | None:
    """The first output that failed or was aborted (its line is an error, not a response body)."""
    return next((o for o in outputs if not o.ok), None)


def render_response(prepared: PreparedRequest, outputs: list[GenerationOutput], *, created: int) -> dict:
    """The endpoint's JSON response body (strict-valid ChatCompletion / Completion).

    `outputs` holds one successful GenerationOutput per engine request, in any order.
    """
    by_id = {o.request_id: o for o in outputs}
    ordered = [by_id[r.request_id] for r in prepared.requests]
    bad = first_failure(ordered)
    if bad is not None:
        raise ValueError(f"request {bad.request_id} did not finish (error or abort); render it with error_body")
    if prepared.endpoint == CHAT_ENDPOINT:
        return render_chat_body(prepared, ordered[0], created=created)
    return render_completion_body(prepared, ordered, created=created)


def error_body(err: TokabatchError | RequestError) -> dict:
    """OpenAI's error envelope {"error": {message, type, param, code}} for either error kind."""
    if isinstance(err, TokabatchError):
        return err.to_dict()
    kind = "invalid_request_error" if err.status < 500 else "server_error"
    return {"error": {"message": err.message, "type": kind, "param": err.param, "code": err.code}}


def error_status(err: TokabatchError | RequestError) -> int:
    return err.status


__all__ = [
    "CHAT_ENDPOINT", "COMPLETIONS_ENDPOINT", "ENDPOINTS", "PreparedRequest", "error_body", "error_status",
    "first_failure", "prepare_request", "render_response",
]
