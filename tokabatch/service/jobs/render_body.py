"""Response bodies (contract §6): chat.completion and text_completion objects, logprobs, usage.

Split out of render.py so that streaming chunks (render_stream.py) reuse the same per-choice
pieces. Token strings come from tokenizer.token_text and bytes from tokenizer.token_bytes.
Logprobs are clamped to -9999.0 (OpenAI's "very unlikely" value) because a masked token's -inf is
not representable in JSON. Must not import torch, aiohttp or SQLAlchemy.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Iterable, Sequence

from tokabatch import __version__
from tokabatch.engine.api import ChoiceOutput, FinishReason, GenerationOutput, TokenLogprob
from tokabatch.service.jobs.structured import tool_calls

if TYPE_CHECKING:
    from tokabatch.service.jobs.render import PreparedRequest
    from tokabatch.text import Tokenizer

MIN_LOGPROB = -9999.0


def clamp_logprob(value: float) -> float:
    return MIN_LOGPROB if math.isnan(value) or value < MIN_LOGPROB else float(value)


def finish_reason(reason: FinishReason) -> str:
    """Only `stop` and `length` are renderable; abort/error lines go to the error file instead."""
    if reason in (FinishReason.STOP, FinishReason.LENGTH):
        return reason.value
    raise ValueError(f"finish reason {reason} cannot be rendered as a choice")


def system_fingerprint(model_id: str) -> str:
    """Identifies the model and engine build (contract §6.1), stable across requests."""
    digest = hashlib.blake2b(f"{model_id}/{__version__}".encode(), digest_size=6).hexdigest()
    return f"fp_{digest}"


def usage(outputs: Iterable[GenerationOutput]) -> dict:
    prompt = cached = completion = 0
    for o in outputs:
        prompt += o.num_prompt_tokens
        cached += o.num_cached_tokens
        completion += o.num_completion_tokens
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


# ---- chat -----------------------------------------------------------------------------------------
def _chat_token(tokenizer: Tokenizer, token_id: int, logprob: float) -> dict:
    return {"token": tokenizer.token_text(token_id), "logprob": clamp_logprob(logprob),
            "bytes": list(tokenizer.token_bytes(token_id))}


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprob] | None, top_k: int) -> dict:
    content = [
        {**_chat_token(tokenizer, t.token_id, t.logprob),
         "top_logprobs": [_chat_token(tokenizer, i, lp) for i, lp in t.top[:top_k]]}
        for t in logprobs or ()
    ]
    return {"content": content, "refusal": None}


def chat_choice(prepared: PreparedRequest, choice: ChoiceOutput) -> dict:
    logprobs = None
    if prepared.logprobs is not None:
        logprobs = chat_logprobs(prepared.tokenizer, choice.logprobs, prepared.logprobs)
    message: dict = {"role": "assistant", "content": choice.text, "refusal": None}
    reason = finish_reason(choice.finish_reason)
    if prepared.output.tool is not None and choice.finish_reason is FinishReason.STOP:
        calls = tool_calls(prepared.output, choice.text, _call_id(prepared.response_id, choice.index))
        if calls is not None:       # a call cut by max_tokens stays text, with finish_reason "length"
            message, reason = {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}, "tool_calls"
    return {"index": choice.index, "message": message, "finish_reason": reason, "logprobs": logprobs}


def _call_id(response_id: str, index: int) -> str:
    return "call_" + hashlib.blake2b(f"{response_id}:{index}".encode(), digest_size=12).hexdigest()


def render_chat_body(prepared: PreparedRequest, output: GenerationOutput, *, created: int) -> dict:
    return {
        "id": prepared.response_id,
        "object": "chat.completion",
        "created": created,
        "model": prepared.model,
        "choices": [chat_choice(prepared, c) for c in sorted(output.choices, key=lambda c: c.index)],
        "usage": usage([output]),
        "system_fingerprint": system_fingerprint(prepared.model),
    }


# ---- completions ----------------------------------------------------------------------------------
def completion_logprobs(tokenizer: Tokenizer, entries: Sequence[TokenLogprob | None], token_ids: Sequence[int],
                        top_k: int, *, text_offset0: int = 0) -> dict:
    """OpenAI's legacy logprobs: parallel lists; `text_offset` counts characters into the returned text.

    An echoed prompt's first token has no logprob: its entries are null, as OpenAI and vLLM send them
    (lm-eval's loglikelihood skips it).
    """
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []
    offset = text_offset0
    for token_id, entry in zip(token_ids, entries):
        text = tokenizer.token_text(token_id)
        tokens.append(text)
        text_offset.append(offset)
        offset += len(text)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(clamp_logprob(entry.logprob))
        top: dict[str, float] = {}
        for i, lp in entry.top[:top_k]:
            top.setdefault(tokenizer.token_text(i), clamp_logprob(lp))
        top_logprobs.append(top)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
            "text_offset": text_offset}


def completion_choice(prepared: PreparedRequest, prompt_idx: int, output: GenerationOutput,
                      choice: ChoiceOutput) -> dict:
    request = prepared.requests[prompt_idx]
    prompt_text = prepared.prompt_texts[prompt_idx] if prepared.echo else ""
    logprobs = None
    if prepared.logprobs is not None:
        entries: list[TokenLogprob | None] = []
        ids: list[int] = []
        if prepared.echo:
            prompt_entries = output.prompt_logprobs or (None,) * len(request.prompt_token_ids)
            entries.extend(prompt_entries)
            ids.extend(request.prompt_token_ids)
        entries.extend(choice.logprobs or ())
        ids.extend(choice.token_ids[:len(choice.logprobs or ())])
        logprobs = completion_logprobs(prepared.tokenizer, entries, ids, prepared.logprobs)
    return {
        "index": prompt_idx * prepared.n + choice.index,
        "text": prompt_text + choice.text,
        "finish_reason": finish_reason(choice.finish_reason),
        "logprobs": logprobs,
    }


def render_completion_body(prepared: PreparedRequest, outputs: Sequence[GenerationOutput], *, created: int) -> dict:
    """`outputs` is ordered like prepared.requests (one per prompt)."""
    choices = [
        completion_choice(prepared, prompt_idx, output, c)
        for prompt_idx, output in enumerate(outputs)
        for c in sorted(output.choices, key=lambda c: c.index)
    ]
    return {
        "id": prepared.response_id,
        "object": "text_completion",
        "created": created,
        "model": prepared.model,
        "choices": choices,
        "usage": usage(outputs),
        "system_fingerprint": system_fingerprint(prepared.model),
    }


__all__ = [
    "MIN_LOGPROB", "chat_choice", "chat_logprobs", "clamp_logprob", "completion_choice", "completion_logprobs",
    "finish_reason", "render_chat_body", "render_completion_body", "system_fingerprint", "usage",
]
