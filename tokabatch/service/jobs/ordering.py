"""Batch-aware ordering: feed a batch's lines so that lines sharing a prompt prefix run together.

Owns the order in which the feed (feed.py) hands prepared lines to the engine: `SpanCollector`
(the file-level order, built during validation's pass over the file), `clustered_spans` (the same
from a pass of its own, for a batch resumed after validation) and the read-ahead windows
(`window_sizes`, `sort_window`, `windowed`). Pure stdlib; must not import torch or the engine runtime.

Why: the engine shares what it sees at the same time. Lines with a common prompt prefix that are
admitted together compute the prefix pages once (prefix cache) and decode as one large Hydragen
group; the same lines spread over a 50,000-line file arrive one at a time, long after the prefix
pages were evicted and among strangers, so groups stay small or never form.

How (bounded memory), in two levels:
  1. Across the whole file (before the first line is fed): each request line's prompt (chat
     messages or completion prompt, as canonical JSON: no tokenizer) gives a sort key of its first
     KEY_CHARS characters plus a 64-bit digest of all of it, kept with the line's byte offset: under
     1 KB per line whatever the prompt length (measured on the dev VM: 50,000 lines of 5 KB
     prompts, 3.5 s, 45 MB at the peak of the sort, 8 MB kept). Sorted by key, lines with the same
     prompt are adjacent and lines whose prompts share their first KEY_CHARS characters form one
     contiguous run; the feed then reads the lines back by offset in that order.
  2. Within a window of prepared lines: sorted by prompt token ids, which nests runs the way the
     prefix tree does (a system prompt shared by all, then a few-shot block shared by some, stay
     adjacent at both levels). Equal keys keep their order (stable sorts). Windows grow from
     FIRST_WINDOW lines, doubling, to the configured size, so the engine gets its first requests
     once a few dozen lines are prepared, not thousands.

Why both: windows alone group a prefix only within each window, so the n lines of one problem
spread through a big file meet only ~W/problems at a time. Measured with benchmarks/ordering.py
(W4 as 12,800 shuffled lines of 128 problems, real schedulers, fake runner): Hydragen sharing
fraction 55% with windows of 2048 alone, 78% with the whole file in one sort, as with one request of
n=100 per problem.

Trade-offs (RunnerConfig.order_window, default 2048; 1 is file order, without the file-level order):
  - memory: the file-level keys (above), plus two windows of prepared lines (their token ids)
    beside the engine's in-flight lines; 2048 lines of 4,000 tokens is about 8 M ints;
  - output order follows the feed, not the file (the contract guarantees no order; match on
    custom_id);
  - lines fed together are admitted together; the engine's router keeps requests with the same
    prompt start in one pipelined half (pipelined_loop.py) so their groups are not split.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from tokabatch.service.jobs.parse import iter_request_spans

T = TypeVar("T")
KEY_CHARS = 512                          # prompt characters a file-level sort key keeps
FIRST_WINDOW = 64                        # lines in the first read-ahead window


def prompt_key(body: dict[str, Any]) -> tuple[str, bytes]:
    """A request body's place in the file-level order: the first KEY_CHARS characters of its prompt
    (the chat `messages` or the completion `prompt`, as canonical JSON) and a digest of all of it."""
    prompt = body.get("messages", body.get("prompt"))
    if type(prompt) is list and prompt and set(map(type, prompt)) == {int}:
        # Token ids: printing thousands of ints is most of the cost, so the text is made of the first
        # KEY_CHARS // 2 ids only (at least two characters each) and the digest of their machine form.
        head = json.dumps(prompt[:KEY_CHARS // 2], separators=(",", ":"))[:KEY_CHARS]
        try:
            return head, hashlib.blake2b(array("q", prompt).tobytes(), digest_size=8).digest()
        except OverflowError:
            pass                              # an id beyond 64 bits (rejected later, at execution)
    text = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return text[:KEY_CHARS], hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class SpanCollector:
    """The file-level order, built by a pass that reads the file anyway: `add` every request line
    (parse.validate_input_file's `on_request`), then `spans()`."""

    def __init__(self) -> None:
        self._keyed: list[tuple[tuple[str, bytes], int, int, int]] = []

    def add(self, line_no: int, offset: int, length: int, obj: dict[str, Any]) -> None:
        try:
            key = prompt_key(obj["body"])
        except (RecursionError, ValueError, TypeError):   # a prompt JSON cannot print: last, in file order
            key = ("\U0010ffff", b"")
        self._keyed.append((key, line_no, offset, length))

    def spans(self) -> list[tuple[int, int, int]]:
        """(line number, byte offset, byte length) of every line added, by prompt_key, ties in file order."""
        self._keyed.sort(key=lambda entry: (entry[0], entry[1]))
        return [(line_no, offset, length) for _, line_no, offset, length in self._keyed]

    def shard_ranges(self, shard_lines: int) -> list[tuple[int, int]]:
        """The order of spans() cut into [first, end) ranges of about `shard_lines` lines for shards,
        keeping what shares together: a cut moves forward (up to half a shard) to where the prompts'
        first KEY_CHARS characters change, else to where the whole prompt does; lines with one
        prompt are never parted. Call after spans()."""
        keys = [key for key, *_ in self._keyed]
        return cut_ranges(len(keys), shard_lines, lambda i: keys[i - 1][0] != keys[i][0],
                          lambda i: keys[i - 1] != keys[i])


def cut_ranges(num_lines: int, shard_lines: int, head_changes: Callable[[int], bool],
               prompt_changes: Callable[[int], bool]) -> list[tuple[int, int]]:
    """[first, end) ranges covering range(num_lines), each about `shard_lines` long: a cut at i
    (between line i-1 and i) is taken at the first i >= the target where `head_changes(i)` within
    half a shard, else at the first i where `prompt_changes(i)`. One range when the lines fit in one."""
    ranges: list[tuple[int, int]] = []
    first = 0
    while num_lines - first > shard_lines:
        target = first + shard_lines
        cut = next((i for i in range(target, min(num_lines, target + shard_lines // 2)) if head_changes(i)), None)
        if cut is None:
            cut = next((i for i in range(target, num_lines) if prompt_changes(i)), num_lines)
        ranges.append((first, cut))
        first = cut
    if first < num_lines:
        ranges.append((first, num_lines))
    return ranges


def clustered_spans(path: str | Path) -> list[tuple[int, int, int]]:
    """SpanCollector.spans() of a validated file, from a pass of its own. Blocking (run it in a thread)."""
    collector = SpanCollector()
    for line_no, offset, length, obj in iter_request_spans(path):
        collector.add(line_no, offset, length, obj)
    return collector.spans()


def file_spans(path: str | Path) -> list[tuple[int, int, int]]:
    """(line number, byte offset, byte length) of every request line of a validated file, in file order."""
    return [(line_no, offset, length) for line_no, offset, length, _ in iter_request_spans(path)]


def window_sizes(order_window: int) -> Iterator[int]:
    """Read-ahead window sizes in lines: FIRST_WINDOW, doubling up to `order_window`, then that for ever."""
    size = min(FIRST_WINDOW, order_window)
    while True:
        yield size
        size = min(2 * size, order_window)


def sort_window(items: list[T], prompt_of: Callable[[T], Sequence[int]]) -> list[T]:
    """`items` sorted by `prompt_of(item)` (token ids, compared lexicographically; stable)."""
    # Tuples compare element by element at C speed; tuple() of a tuple (what
    # GenerationRequest.prompt_token_ids is) returns it as is, without a copy.
    return sorted(items, key=lambda item: tuple(prompt_of(item)))


def windowed(items: Iterable[T], order_window: int, prompt_of: Callable[[T], Sequence[int]]) -> Iterator[T]:
    """`items` in the feed's windows (window_sizes), each sorted by prompt; order_window <= 1 passes
    them through in their order."""
    if order_window <= 1:
        yield from items
        return
    iterator = iter(items)
    for size in window_sizes(order_window):
        window = [item for _, item in zip(range(size), iterator)]
        if not window:
            return
        yield from sort_window(window, prompt_of)


__all__ = ["FIRST_WINDOW", "KEY_CHARS", "SpanCollector", "clustered_spans", "cut_ranges", "file_spans", "prompt_key",
           "sort_window", "window_sizes", "windowed"]
