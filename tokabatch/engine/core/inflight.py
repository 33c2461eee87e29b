"""Full pages being computed right now, so a waiting sequence that shares them can wait for them.

Owns the registry of full pages that running sequences will publish once their prefill reaches
them. Without it, k waiting sequences sharing a long prefix that are admitted in the same step
(the batch runner feeds prefix-sharing lines together) would each compute the prefix, because a
page enters the prefix tree only after the step that computes it. With it, the scheduler admits
the first, defers the others until the shared pages are published, then they take them by
reference like any cache hit. Pure stdlib: must not import torch.

Pages are keyed like the prefix tree keys them, by chaining: key(i) = hash((key(i - 1), tokens of
page i)), key(-1) = ROOT. A hash stands in for the tree's (parent page id, tokens) key because the
parent page of a page being computed is not published yet. A collision can only make a sequence
wait (it takes pages solely through the exact tree match), and only while the colliding page is
being computed, so it can never hand out wrong KV nor wait forever.
"""

from __future__ import annotations

from tokabatch.engine.core.pages import ROOT


def chain_keys(token_ids: tuple[int, ...], page_size: int) -> list[int]:
    """The chained key of every full page of `token_ids`, in order."""
    keys: list[int] = []
    key = ROOT
    for i in range(len(token_ids) // page_size):
        key = hash((key, token_ids[i * page_size:(i + 1) * page_size]))
        keys.append(key)
    return keys


class InflightPages:
    """Chained keys of full pages that running sequences are computing (counted: two may compute
    the same page, e.g. one that asks for prompt logprobs and so never defers)."""

    def __init__(self) -> None:
        self._count: dict[int, int] = {}
        self._by_seq: dict[int, tuple[int, list[int]]] = {}   # seq_id -> (page index of keys[0], keys)

    def __contains__(self, key: int) -> bool:
        return key in self._count

    def __len__(self) -> int:
        return len(self._count)

    def register(self, seq_id: int, keys: list[int], first_page: int) -> None:
        """`seq_id` will compute pages first_page .. first_page + len(keys) - 1 (whose keys these are)."""
        self.drop(seq_id)
        if not keys:
            return
        self._by_seq[seq_id] = (first_page, list(keys))
        for key in keys:
            self._count[key] = self._count.get(key, 0) + 1

    def published(self, seq_id: int, num_published_pages: int) -> None:
        """Its pages before `num_published_pages` are in the prefix tree now: no longer in flight."""
        entry = self._by_seq.get(seq_id)
        if entry is None or num_published_pages <= entry[0]:
            return
        first, keys = entry
        done = min(len(keys), num_published_pages - first)
        for key in keys[:done]:
            self._forget(key)
        if done == len(keys):
            del self._by_seq[seq_id]
        else:
            self._by_seq[seq_id] = (first + done, keys[done:])

    def drop(self, seq_id: int) -> None:
        """It stopped (finished, aborted or preempted): whoever waits for its pages may compute them."""
        entry = self._by_seq.pop(seq_id, None)
        if entry is not None:
            for key in entry[1]:
                self._forget(key)

    def _forget(self, key: int) -> None:
        left = self._count[key] - 1
        if left:
            self._count[key] = left
        else:
            del self._count[key]

    def check(self, running: dict[int, int]) -> None:
        """Raise AssertionError unless only running sequences hold entries, each past its published
        pages (`running`: seq_id -> num_published_pages), and the counts add up."""
        counts: dict[int, int] = {}
        for seq_id, (first, keys) in self._by_seq.items():
            assert seq_id in running, f"sequence {seq_id} is not running but holds in-flight pages"
            assert keys and first >= running[seq_id], f"sequence {seq_id}: a published page is still in flight"
            for key in keys:
                counts[key] = counts.get(key, 0) + 1
        assert counts == self._count, "in-flight page counts drifted"


__all__ = ["InflightPages", "chain_keys"]
