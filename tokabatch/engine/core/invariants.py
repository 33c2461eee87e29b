"""The scheduler's invariant checker: page references, queues, the in-flight registry and the prefix
tree agree. Tests call it after every step (and EngineLoop with check_invariants=True).

Reads the scheduler's private state on purpose: it is the scheduler's own audit, kept in its own
module so scheduler.py stays about scheduling. Pure stdlib.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokabatch.engine.core.request import SeqStatus, pages_for

if TYPE_CHECKING:
    from tokabatch.engine.core.scheduler import Scheduler


def check_scheduler(scheduler: "Scheduler") -> None:
    """Raise AssertionError (with the reason) if the pages or the queues are inconsistent."""
    refs: dict[int, int] = {}
    ps = scheduler.page_size
    assert len(scheduler._running) <= scheduler.max_running, "more running sequences than max_seqs"
    for seq in scheduler._running.values():
        sid = seq.seq_id
        assert seq.status is SeqStatus.RUNNING, f"sequence {sid} is in the running set but {seq.status}"
        assert seq.num_computed <= seq.num_tokens - 1, f"sequence {sid} computed its last token twice"
        assert pages_for(seq.num_computed, ps) <= len(seq.page_ids) <= pages_for(seq.num_tokens, ps), \
            f"sequence {sid}: {len(seq.page_ids)} pages for {seq.num_computed}/{seq.num_tokens} positions"
        assert seq.num_tokens <= seq.max_len, f"sequence {sid} is longer than its max_len"
        assert len(set(seq.page_ids)) == len(seq.page_ids), f"sequence {sid} holds a page twice"
        assert type(seq.page_ids) is tuple, f"sequence {sid}: page table is not a tuple (plans share it)"
        for page in seq.page_ids:
            refs[page] = refs.get(page, 0) + 1
        published = seq.num_published_pages
        # A whole-sequence cache hit holds published pages up to its last token before it reruns it.
        whole_hit = published * ps == seq.num_tokens == seq.num_computed + 1
        assert published <= seq.num_computed // ps or whole_hit, f"sequence {sid} published an uncomputed page"
        if scheduler.config.enable_prefix_cache:
            assert published == seq.num_computed // ps or whole_hit, f"sequence {sid} left a full page unpublished"
            tokens = seq.token_slice(0, published * ps)
            assert tuple(scheduler.pool.match(tokens, published)) == seq.page_ids[:published], \
                f"sequence {sid}: its published pages are not the tree's pages for its tokens"
        else:
            assert published == 0 and not any(scheduler.pool.in_tree(p) for p in seq.page_ids)
    scheduler._waiting.check()
    for seq_id in scheduler._waiting.seq_ids():
        seq = scheduler._seqs[seq_id]
        assert seq.status is SeqStatus.WAITING and not seq.page_ids and seq.seq_id not in scheduler._running, \
            f"waiting sequence {seq_id} holds pages or is running"
    scheduler._inflight.check({s.seq_id: s.num_published_pages for s in scheduler._running.values()})
    scheduler.pool.check(refs)
