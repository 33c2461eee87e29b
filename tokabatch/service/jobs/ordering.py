"""Batch-aware ordering: feed a batch's lines so that lines sharing a prompt prefix run together.

Owns `clustered_spans` and `prompt_ordered`: the order in which the batch runner hands prepared
lines to the engine. Pure stdlib (asyncio-agnostic async generators); must not import torch or
the engine runtime.

Why: the engine shares what it sees at the same time. Lines with a common prompt prefix that are
admitted together compute the prefix pages once (prefix cache) and decode as one large Hydragen
group; the same lines spread over a 50,000-line file arrive one at a time, long after the prefix
pages were evicted and among strangers, so groups stay small or never form.

How (bounded memory), in two levels:
  1. Across the whole file (`clustered_spans`, before the first line is fed): one streaming pass
     reads each line's prompt (chat messages or completion prompt, as canonical JSON: no
     tokenizer) and keeps a sort key of its first KEY_CHARS characters plus a 64-bit digest of
     all of it, with the line's byte offset: under 1 KB per line whatever the prompt length
     (measured on the dev VM: 50,000 lines of 5 KB prompts, 3.5 s, 45 MB at the peak of the
     sort, 8 MB kept). Sorted by key, lines with the same prompt are adjacent and
     lines whose prompts share their first KEY_CHARS characters form one contiguous run; the
     runner then reads the lines back by offset in that order.
  2. Within a window of W prepared lines (`prompt_ordered`): sorted by prompt token ids, which
     nests runs the way the prefix tree does (a system prompt shared by all, then a few-shot block
     shared by some, stay adjacent at both levels). Equal keys keep their order (stable sorts).

Why both: windows alone group a prefix only within each window, so the n lines of one problem
spread through a big file meet only ~W/problems at a time. Measured with scripts/bench_ordering.py
(W4 as 12,800 shuffled lines of 128 problems, real schedulers, fake runner): Hydragen sharing
fraction 55% with windows of 2048 alone, 78% with the whole file in one sort, as with one request of
n=100 per problem.

Trade-offs (RunnerConfig.order_window, default 2048; 1 is file order, without the file-level pass):
  - memory: the file-level keys (above), plus W prepared lines (their token ids) beside the
    engine's in-flight lines; 2048 lines of 4,000 tokens is about 8 M ints;
  - start-up: the file-level pass reads and parses the whole file once before the first line is
    fed (it was validated the same way just before); the first request then reaches the engine
    after W lines are prepared (tokenized); later windows are prepared when the engine pulls past
    the end of the previous one, a short stall the engine's own queue of admitted work covers;
  - output order follows the feed, not the file (the contract guarantees no order; match on
    custom_id);
  - lines fed together are admitted together; the engine's router keeps requests with the same
    prompt start in one pipelined half (pipelined_loop.py) so their groups are not split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, AsyncIterable, AsyncIterator, Callable, Sequence, TypeVar

from tokabatch.service.jobs.parse import iter_request_spans

T = TypeVar("T")
KEY_CHARS = 512                          # prompt characters a file-level sort key keeps


def prompt_key(body: dict[str, Any]) -> tuple[str, bytes]:
    """A request body's place in the file-level order: the first KEY_CHARS characters of its prompt
    (the chat `messages` or the completion `prompt`, as canonical JSON) and a digest of all of it."""
    prompt = body.get("messages", body.get("prompt"))
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text[:KEY_CHARS], hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


def clustered_spans(path: str | Path) -> list[tuple[int, int, int]]:
    """(line number, byte offset, byte length) of every request line of a validated file, in the
    file-level order: by prompt_key, equal keys in file order. Blocking (run it in a thread)."""
    keyed = [(prompt_key(obj["body"]), line_no, offset, length)
             for line_no, offset, length, obj in iter_request_spans(path)]
    keyed.sort(key=lambda entry: (entry[0], entry[1]))
    return [(line_no, offset, length) for _, line_no, offset, length in keyed]


async def prompt_ordered(lines: AsyncIterable[T], window: int,
                         prompt_of: Callable[[T], Sequence[int]]) -> AsyncIterator[T]:
    """`lines` in windows of `window` items, each window sorted by `prompt_of(item)` (token ids,
    compared lexicographically; stable). window <= 1 passes `lines` through in their order."""
    buffer: list[T] = []
    async for line in lines:
        if window <= 1:
            yield line
            continue
        buffer.append(line)
        if len(buffer) >= window:
            for item in _sorted(buffer, prompt_of):
                yield item
            buffer = []
    for item in _sorted(buffer, prompt_of):
        yield item


def _sorted(items: list[T], prompt_of: Callable[[T], Sequence[int]]) -> list[T]:
    # Tuples compare element by element at C speed; tuple() of a tuple (what
    # GenerationRequest.prompt_token_ids is) returns it as is, without a copy.
    return sorted(items, key=lambda item: tuple(prompt_of(item)))


__all__ = ["KEY_CHARS", "clustered_spans", "prompt_key", "prompt_ordered"]
