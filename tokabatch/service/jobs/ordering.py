"""Batch-aware ordering: feed a batch's lines so that lines sharing a prompt prefix run together.

Owns `prompt_ordered`, the order in which the batch runner hands prepared lines to the engine.
Pure stdlib (asyncio-agnostic async generators); must not import torch or the engine runtime.

Why: the engine shares what it sees at the same time. Lines with a common prompt prefix that are
admitted together compute the prefix pages once (prefix cache) and decode as one large Hydragen
group; the same lines spread over a 50,000-line file arrive one at a time, long after the prefix
pages were evicted and among strangers, so groups stay small or never form.

How (bounded memory): read ahead a window of W prepared lines, sort the window by prompt token
ids, feed it, read the next window. Lexicographic order over token ids puts every set of lines with
a common prefix into one contiguous run, and nests runs the way the prefix tree does (a system
prompt shared by all, then a few-shot block shared by some, stay adjacent at both levels). Equal
keys keep file order (the sort is stable).

Trade-offs of the window W (RunnerConfig.order_window, default 2048; 1 is file order):
  - memory: W prepared lines (their token ids) are held beside the engine's in-flight lines;
    2048 lines of 4,000 tokens is about 8 M ints, whatever the batch size;
  - clustering is per window: a prefix whose lines are spread across the file is grouped only
    within each window (each window still computes it once while it runs, if the lines are dense
    enough to be resident together), so larger W groups better;
  - start-up: the first request reaches the engine after W lines are prepared (tokenized);
    later windows are prepared when the engine pulls past the end of the previous one, a short
    stall the engine's own queue of admitted work covers;
  - output order follows the feed, not the file (the contract guarantees no order; match on
    custom_id);
  - lines fed together are admitted together: until the scheduler holds a new sequence back while
    a running one computes the same prompt pages (as it already does for the n choices of one
    request), they prefill the shared prefix side by side and get no prefix-cache hits from each
    other. File order hides this only in small batches, where tokenizing the next line takes long
    enough for the previous line's pages to be published first.
A whole-file sort would cluster best but needs the whole file's token ids in memory (or an
external sort on disk); the window keeps the runner's memory independent of the batch size.
"""

from __future__ import annotations

from typing import AsyncIterable, AsyncIterator, Callable, Sequence, TypeVar

T = TypeVar("T")


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


__all__ = ["prompt_ordered"]
