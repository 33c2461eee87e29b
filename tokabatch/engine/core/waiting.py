"""The waiting queue: who is admitted next, and which waiting sequences may be admitted now.

Owns the queue order (priority first; within it, preempted sequences before new ones, oldest first),
each waiting sequence's page chain keys (kept while it waits), and the candidate search the
scheduler's admission starts from: prefix-cache hits, and deferral of a sequence whose next page is
being computed by someone else (inflight.py). Pure stdlib: must not import torch.

Concurrent prefixes (prefix cache on): a waiting sequence whose next uncached full page is being
computed right now (by a running sequence, or by a sequence admitted ahead of it in the same step;
inflight.py) is deferred -- skipped, so the queue behind it still moves -- until that page is
published; then it takes the page by reference like any cache hit. So k sequences sharing a prefix
compute it once, not k times (the n choices of one request are the special case: they wait for
choice 0). A sequence asking for prompt logprobs takes no cache hits and so never defers. No
deadlock: only running sequences hold in-flight pages, and a preempted, aborted or finished one
drops them, so when nothing runs nothing is deferred and the first waiting sequence is admitted.
An ONLINE sequence defers too, even behind a BATCH prefill: waiting for the pages being computed
is never slower than computing them again next to it.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from typing import Iterator, Mapping

from tokabatch.engine.core.inflight import InflightPages, chain_keys
from tokabatch.engine.core.pages import PagePool
from tokabatch.engine.core.request import Sequence


def _max_hit_tokens(seq: Sequence) -> int:
    """How many of its leading tokens a sequence may take from the prefix cache: all of them (when
    all are, the last still runs to sample: Scheduler._start), but with prompt logprobs only the
    positions already delivered (every undelivered one runs)."""
    if seq.wants_prompt_logprobs:
        return min(seq.num_tokens - 1, seq.num_prompt_logprobs_done)
    return seq.num_tokens


def _entry(seq: Sequence) -> tuple[int, int, int, int]:
    # A sequence admitted before is waiting again because it was preempted: it goes first.
    return int(seq.priority), 0 if seq.ever_admitted else 1, seq.arrival, seq.seq_id


class WaitingQueue:
    """Sequences waiting for admission, in admission order (see the module docstring)."""

    RECENT_PROMPTS = 16                       # token tuples whose chain keys are kept (the n choices are adjacent)

    def __init__(self, pool: PagePool, inflight: InflightPages, *, enable_prefix_cache: bool) -> None:
        self.pool = pool
        self.page_size = pool.page_size
        self._inflight = inflight
        self._prefix_cache = enable_prefix_cache
        self._entries: list[tuple[int, int, int, int]] = []   # (priority, 0=preempted/1=new, arrival, seq_id)
        self._keys: dict[int, tuple[int, list[int]]] = {}     # seq_id -> (num_tokens, chain keys)
        # id(token tuple) -> (the tuple, its chain keys), for the last RECENT_PROMPTS tuples keyed
        self._recent_keys: OrderedDict[int, tuple[tuple[int, ...], list[int]]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def seq_ids(self) -> list[int]:
        return [entry[-1] for entry in self._entries]

    def push(self, seq: Sequence) -> None:
        bisect.insort(self._entries, _entry(seq))

    def remove(self, seq: Sequence) -> None:
        """It was admitted or ended: out of the queue, its chain keys forgotten."""
        self._entries.remove(_entry(seq))
        self._keys.pop(seq.seq_id, None)

    def candidates(self, seqs: Mapping[int, Sequence], limit: int,
                   keys_of: dict[int, list[int]]) -> Iterator[tuple[Sequence, list[int]]]:
        """Up to `limit` admissible waiting sequences, in queue order, with their prefix-cache hits;
        (prefix cache on) the chain keys of their full pages go into `keys_of`. A sequence whose
        next uncached page is in flight, or will be computed by a candidate ahead of it, is
        deferred (skipped). Lazy: the caller may stop after the first."""
        num_found = 0
        planned: set[int] = set()             # pages the candidates so far will compute
        # The n choices of one request share one prompt tuple: while the tree cannot change (until
        # the caller starts someone), they share its lookup: (id(prompt), max tokens) -> hits.
        hits_of_prompt: dict[tuple[int, int], list[int]] = {}
        for *_, seq_id in list(self._entries):
            if num_found >= limit:
                break
            seq = seqs[seq_id]
            hits = self._cache_hits(seq, hits_of_prompt)
            if self._prefix_cache:
                keys = self._chain_keys(seq)
                if self._deferred(seq, keys, len(hits), planned):
                    continue
                planned.update(keys[len(hits):])
                keys_of[seq_id] = keys
            num_found += 1
            yield seq, hits

    def _chain_keys(self, seq: Sequence) -> list[int]:
        """Its pages' chain keys, kept while it waits (recomputed only if preemption grew it); the
        choices of one request, which share their prompt tuple, share one computation."""
        memo = self._keys.get(seq.seq_id)
        if memo is None or memo[0] != seq.num_tokens:
            tokens = seq.token_slice(0, seq.num_tokens)    # (the prompt tuple itself before any output)
            recent = self._recent_keys.get(id(tokens))
            if recent is None or recent[0] is not tokens:
                recent = (tokens, chain_keys(tokens, self.page_size))
                self._recent_keys[id(tokens)] = recent
                if len(self._recent_keys) > self.RECENT_PROMPTS:
                    self._recent_keys.popitem(last=False)
            memo = (seq.num_tokens, recent[1])
            self._keys[seq.seq_id] = memo
        return memo[1]

    def _deferred(self, seq: Sequence, keys: list[int], num_hits: int, planned: set[int]) -> bool:
        """Wait for its next full page rather than compute it: someone else is computing it."""
        if seq.wants_prompt_logprobs or num_hits >= _max_hit_tokens(seq) // self.page_size:
            return False                      # takes no hits / nothing more it could take
        return keys[num_hits] in self._inflight or keys[num_hits] in planned

    def _cache_hits(self, seq: Sequence, hits_of_prompt: dict[tuple[int, int], list[int]]) -> list[int]:
        if not self._prefix_cache:
            return []
        max_tokens = _max_hit_tokens(seq)
        if seq.output_ids:
            return self.pool.match(seq.token_slice(0, max_tokens), max_tokens // self.page_size)
        key = (id(seq.prompt_ids), max_tokens)    # (every seq holds its prompt: ids are not reused)
        hits = hits_of_prompt.get(key)
        if hits is None:
            hits = hits_of_prompt[key] = self.pool.match(seq.prompt_ids[:max_tokens], max_tokens // self.page_size)
        return hits

    def check(self) -> None:
        """Raise AssertionError if the queue is out of order or keeps keys of a sequence not in it."""
        assert self._entries == sorted(self._entries), "waiting queue out of order"
        assert self._keys.keys() <= set(self.seq_ids()), "chain keys kept for a non-waiting sequence"


__all__ = ["WaitingQueue"]
