"""The scheduler: which sequences run in each step, where their KV lives, and who waits.

Owns the running set, admission (by page-use forecast, admission.py, from the candidates of the
waiting queue, waiting.py: prefix-cache hits, deferral behind pages in flight), preemption and
the pages every sequence holds; a step's result is applied to its sequences (tokens appended, full
pages published) by progress.py. Pure stdlib: must not import torch.

Contract with the engine loop, one step at a time:
    plan = scheduler.schedule()                   # every decode + FIFO prefill chunks
    result = runner.launch(plan).result()
    scheduler.on_step_done(plan, result)          # appends sampled tokens, publishes full pages
    scheduler.finish_sequence(seq_id)             # for each sequence the loop decides has ended;
                                                  # it MUST end one whose num_tokens reached seq.max_len
on_step_done(plan N) must come before schedule() of step N+1: page tables may change in between
(a page computed twice is swapped for the canonical copy in the prefix tree).
A prefill chunk that reaches a sequence's last token always samples, even with max_tokens 0 (the
loop then discards the token and finishes it). Only choice 0 of a request computes prompt logprobs;
the other choices share its prompt pages.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from operator import attrgetter
from typing import Protocol

from tokabatch.engine.api import GenerationRequest, RequestError, RequestRejected, context_length_exceeded
from tokabatch.engine.core.admission import Forecast, build_forecast, fits_with
from tokabatch.engine.core.decode_batch import DecodeBatch
from tokabatch.engine.core.hydragen import DecodeGroupCache, GroupingParams
from tokabatch.engine.core.inflight import InflightPages
from tokabatch.engine.core.invariants import check_scheduler
from tokabatch.engine.core.pages import PagePool
from tokabatch.engine.core.plan import DecodeWorks, StepPlan, StepResult
from tokabatch.engine.core.predictor import LengthPredictor
from tokabatch.engine.core.progress import apply_step_result, publish_full_pages
from tokabatch.engine.core.request import Sequence, SeqStatus, chunk_end, pages_for, prefill_work
from tokabatch.engine.core.waiting import WaitingQueue


class SchedulerSizes(Protocol):
    """What the scheduler reads of its config (config.SchedulerConfig, with the device's sizes filled in)."""

    page_size: int
    max_seqs: int
    max_tokens_per_step: int
    enable_prefix_cache: bool
    admission_margin: float


class Scheduler:
    def __init__(self, config: SchedulerSizes, num_pages: int, *, max_model_len: int,
                 predictor: LengthPredictor | None = None, hydragen: GroupingParams | None = None,
                 retain_finished_requests: int = 4096) -> None:
        self.config = config
        self.page_size = config.page_size
        self.max_model_len = max_model_len
        self.pool = PagePool(num_pages, config.page_size)
        self.predictor = predictor if predictor is not None else LengthPredictor(config.admission_margin)
        # Every running sequence decodes every step, so the cap is also bounded by the token budget.
        self.max_running = max(1, min(config.max_seqs, config.max_tokens_per_step))
        self.max_tokens_per_step = config.max_tokens_per_step     # (shrink_step lowers both)
        self._retain = retain_finished_requests
        self._hydragen = hydragen            # None: no prefix groups in the plans
        self._groups = DecodeGroupCache(config.page_size, hydragen) if hydragen else None
        self._seqs: dict[int, Sequence] = {}
        self._requests: dict[str, list[int]] = {}
        self._running: dict[int, Sequence] = {}               # admission order == prefill order
        self._running_avg_pages: float | None = None          # num_wanted's average; None: to compute
        self._finished_requests: OrderedDict[str, None] = OrderedDict()
        self._inflight = InflightPages()     # full pages running sequences are computing (prefix cache on)
        self._waiting = WaitingQueue(self.pool, self._inflight, enable_prefix_cache=config.enable_prefix_cache)
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self._step_idx = 0
        self._planned: tuple[StepPlan | None, list[Sequence]] = (None, [])  # the last plan and its decodes' sequences
        self._batch: DecodeBatch | None = None   # the last plan's decodes, while they are the running set
        self.num_preemptions = 0
        self.num_prompt_tokens = 0           # of admitted sequences (first admission), for metrics
        self.num_cached_tokens = 0           # of which served from the prefix cache
        self.num_admitted = 0

    # ---- requests in, sequences out ----------------------------------------------------------

    def add_request(self, request: GenerationRequest) -> list[int]:
        """Queue request.n sequences. A request that can never run raises RequestRejected (a prompt
        the context or the whole KV cache cannot hold) or ValueError(param, message)."""
        num_prompt = len(request.prompt_token_ids)
        capacity = self.pool.num_pages * self.page_size
        if num_prompt == 0:
            raise ValueError("prompt", "the prompt must contain at least one token")
        if num_prompt > self.max_model_len - (request.sampling.max_tokens > 0):
            raise RequestRejected(context_length_exceeded(num_prompt, self.max_model_len))
        if num_prompt > capacity:
            raise RequestRejected(RequestError(400, f"The prompt has {num_prompt} tokens but this server's KV cache "
                                                    f"holds only {capacity} tokens.",
                                               code="context_length_exceeded", param="prompt"))
        if request.n < 1:
            raise ValueError("n", "n must be at least 1")
        if request.request_id in self._requests:
            self.forget_request(request.request_id)      # a finished one may be submitted again
            if request.request_id in self._requests:
                raise ValueError("request_id", f"request {request.request_id!r} is already queued")
        max_len = min(num_prompt + max(1, request.sampling.max_tokens), self.max_model_len, capacity + 1)
        seq_ids: list[int] = []
        for choice in range(request.n):
            seq = Sequence(
                seq_id=next(self._seq_ids), request_id=request.request_id, choice_index=choice,
                prompt_ids=tuple(request.prompt_token_ids), sampling=request.sampling,
                priority=request.priority, arrival=next(self._arrivals), max_len=max_len)
            self._seqs[seq.seq_id] = seq
            self._waiting.push(seq)
            seq_ids.append(seq.seq_id)
        self._requests[request.request_id] = seq_ids
        return seq_ids

    def abort_request(self, request_id: str) -> list[int]:
        """Drop the request's unfinished sequences (waiting or running); returns their seq_ids."""
        removed: list[int] = []
        for seq_id in self._requests.get(request_id, []):
            seq = self._seqs[seq_id]
            if seq.status is SeqStatus.FINISHED:
                continue
            self._end(seq)
            removed.append(seq_id)
        if request_id in self._requests:
            self._retire_if_done(request_id)
        return removed

    def finish_sequence(self, seq_id: int) -> None:
        """The loop ended this sequence: free its pages (full ones stay cached) and learn its length."""
        seq = self._seqs[seq_id]
        if seq.status is SeqStatus.FINISHED:
            return
        self.predictor.observe_finished(seq)
        self._end(seq)
        self._retire_if_done(seq.request_id)

    def forget_request(self, request_id: str) -> None:
        """Drop a finished request's sequences now (otherwise the last `retain` are kept for lookups)."""
        if all(self._seqs[s].status is SeqStatus.FINISHED for s in self._requests.get(request_id, [])):
            for seq_id in self._requests.pop(request_id, []):
                del self._seqs[seq_id]
            self._finished_requests.pop(request_id, None)

    def sequence(self, seq_id: int) -> Sequence:
        return self._seqs[seq_id]

    def request_seq_ids(self, request_id: str) -> list[int]:
        return list(self._requests[request_id])

    # ---- the step ----------------------------------------------------------------------------

    def schedule(self) -> StepPlan:
        """Every decode (pages grown, preempting the newest when they run out), then admission,
        then prefill chunks within the token budget (online prompts first, then admission order).
        While every running sequence decodes and none joins or leaves, the decodes come from the
        last step's columns (decode_batch.DecodeBatch); otherwise _walk_decodes walks the sequences."""
        self._step_idx += 1
        preempted_before = self.num_preemptions
        ps = self.page_size
        running = SeqStatus.RUNNING
        batch = self._batch
        steady = batch.next_decodes(self.pool.allocate) if batch is not None else None
        if steady is not None:            # every running sequence decodes again: no walk over them
            decode_works, grown = steady
            decodes, prefilling = batch.seqs, []
        else:
            self._batch = None
            decode_works, decodes, prefilling, grown = self._walk_decodes()
        if self.num_preemptions == preempted_before:
            # After a preemption the forecast was just proven wrong: admit nothing this step.
            prefilling.extend(self._admit())   # admitted last, so they prefill after the others
        chunks = self._prefill_chunks(prefilling, self.max_tokens_per_step - len(decodes))
        if self.num_preemptions != preempted_before:
            # A sequence preempted after it was planned (to make room for a later one) drops out.
            # (Its page table changed only then, so the works of the others stand.)
            kept = [i for i, seq in enumerate(decodes) if seq.status is running]
            decodes = [decodes[i] for i in kept]
            decode_works = decode_works.select(kept)
            grown = {}                        # (rows renumbered: the groups check every moved row)
        prefill_works = tuple(prefill_work(s, a, b, ps) for s, a, b in chunks if s.status is running)
        # A whole-sequence cache hit reruns one token, as a decode does: its work goes first among
        # the prefills (with the decodes, the runner's single-token rows) and into the prefix
        # groups, so a wave of n samples starting together reads its shared prompt once per group.
        cached = tuple(w for w in prefill_works if w.kv_cached)
        if cached:
            prefill_works = cached + tuple(w for w in prefill_works if not w.kv_cached)
        groups = self._groups.groups(decode_works, cached, self.pool.refcount, grown) if self._groups else ()
        plan = StepPlan(step_idx=self._step_idx, decodes=decode_works, prefills=prefill_works, prefix_groups=groups)
        self._planned = (plan, decodes)
        if (steady is None and decodes and not prefill_works and len(decodes) == len(self._running)
                and self.num_preemptions == preempted_before):
            self._batch = DecodeBatch(decodes, decode_works, ps)   # every running sequence decodes
        return plan

    def _walk_decodes(self) -> tuple[DecodeWorks, list[Sequence], list[Sequence], dict[int, tuple[int, ...]]]:
        """Every running sequence's decode, walking the sequences: (the decode columns, their
        sequences, the running sequences still prefilling in admission order, the rows grown:
        row -> its table before the page added here). Pages are grown as needed, preempting the
        newest sequence when they run out."""
        ps = self.page_size
        running = SeqStatus.RUNNING
        decodes: list[Sequence] = []
        # The decode rows' columns (DecodeWorks), appended to as each is planned.
        seq_ids: list[int] = []
        token_ids: list[int] = []
        starts: list[int] = []
        tables: list[tuple[int, ...]] = []
        add_seq, add_token, add_start, add_table = seq_ids.append, token_ids.append, starts.append, tables.append
        prefilling: list[Sequence] = []       # running but not decoding, in admission order
        allocate = self.pool.allocate
        grown: dict[int, tuple[int, ...]] = {}   # row -> its table before the page added below
        for seq in list(self._running.values()):
            if seq.status is not running:
                continue                      # preempted this step to give an earlier one pages
            output_ids = seq.output_ids
            num_tokens = len(seq.prompt_ids) + len(output_ids)
            if not output_ids or seq.num_computed != num_tokens - 1:    # not seq.is_decoding
                prefilling.append(seq)
                continue
            if num_tokens >= seq.max_len:
                raise RuntimeError(f"sequence {seq.seq_id} has {num_tokens} tokens, its max_len; "
                                   "the engine loop must finish it (finish_reason length)")
            if num_tokens > len(seq.page_ids) * ps:
                # A decode is one page short at most: it is allocated here, without a _grow call
                # per row where a wave's samples all gain a page together; out of pages, _grow preempts.
                page = allocate() if num_tokens <= (len(seq.page_ids) + 1) * ps else None
                if page is not None:
                    grown[len(seq_ids)] = seq.page_ids
                    seq.page_ids += (page,)
                elif self._grow(seq, num_tokens, shrinkable_from=None) is None:
                    continue
            decodes.append(seq)               # its last output token at position num_tokens - 1, sampled
            add_seq(seq.seq_id)
            add_token(output_ids[-1])
            add_start(num_tokens - 1)
            add_table(seq.page_ids)
        return DecodeWorks(seq_ids, token_ids, starts, tables), decodes, prefilling, grown

    def _prefill_chunks(self, prefilling: list[Sequence], budget: int) -> list[tuple[Sequence, int, int]]:
        """(sequence, start, end) of the prompt chunks that fit `budget` tokens, pages grown for them,
        in admission order within a priority: an online request's prompt goes before the batch
        prompts still prefilling (a stable sort)."""
        if len(prefilling) > 1 and len({seq.priority for seq in prefilling}) > 1:
            prefilling = sorted(prefilling, key=attrgetter("priority"))
        running = SeqStatus.RUNNING
        chunks: list[tuple[Sequence, int, int]] = []
        for seq in prefilling:
            if budget <= 0:
                break
            # (A sequence admitted just now with all but its last token cached runs a 1-token chunk.)
            if seq.status is not running:
                continue
            start = seq.num_computed
            end = chunk_end(seq, start, min(seq.num_tokens, start + budget))
            end = self._grow(seq, end, shrinkable_from=start)
            if end is not None:
                chunks.append((seq, start, end))
                budget -= end - start
        return chunks

    def on_step_done(self, plan: StepPlan, result: StepResult) -> None:
        """Advance every sequence of `plan` past the tokens it ran, append its sampled token and
        publish its full pages (progress.py; the decodes of the plan schedule() just made take a
        short path, their sequences known by position)."""
        planned, planned_seqs = self._planned
        apply_step_result(plan, result.sampled, planned_seqs if plan is planned else None, self._seqs,
                          self.page_size, self._publish_all)
        batch = self._batch                   # (dropped above if a page was swapped)
        if batch is not None:
            sampled = result.sampled
            same_rows = sampled.seq_ids is plan.decodes.seq_ids or sampled.seq_ids == plan.decodes.seq_ids
            if plan is planned and batch.seqs is planned_seqs and same_rows:
                batch.advance(plan.decodes, list(sampled.token_ids))
            else:
                self._batch = None

    def shrink_step(self) -> str | None:
        """After a step that ran out of device memory: halve the tokens a step may run, down to
        max_running (every running sequence decodes every step); once there, halve both, preempting
        the newest running sequences beyond the new cap (they run again later, their full pages
        cached). Returns what changed, for the log; None when a step is down to one sequence."""
        if self.max_tokens_per_step > self.max_running:
            self.max_tokens_per_step = max(self.max_running, self.max_tokens_per_step // 2)
            return f"steps now take at most {self.max_tokens_per_step} tokens"
        if self.max_running <= 1:
            return None
        self.max_running = self.max_tokens_per_step = self.max_running // 2
        newest_first = sorted(self._running.values(), key=lambda s: (int(s.priority), s.arrival), reverse=True)
        victims = newest_first[:max(0, len(newest_first) - self.max_running)]
        for seq in victims:                   # (one sort: thousands may go at once)
            self._preempt(seq)
        return (f"steps now take at most {self.max_tokens_per_step} tokens and sequences "
                f"({len(victims)} preempted)")

    # ---- admission ---------------------------------------------------------------------------

    def _predicted_len(self, seq: Sequence) -> int:
        seq.predicted_len = min(seq.num_prompt_tokens + self.predictor.predict(seq), seq.max_len)
        self._running_avg_pages = None
        return seq.predicted_len

    def forecast(self) -> Forecast:
        """The page-use forecast of the running sequences (tests check admissions against it)."""
        budget = self.max_tokens_per_step
        return build_forecast(self._running.values(), self.pool, self._predicted_len,
                              budget - (self.max_running - 1), budget)

    def _admit(self) -> list[Sequence]:
        """Admit waiting sequences in order, in batches that halve when the forecast overflows.
        Returns the sequences started, in order.

        Adding a candidate never lowers the forecast at any step (its curve is non-negative; a page
        it shares moves out of its owner's curve but is counted until the later of the two ends),
        so when the first candidate alone does not fit, no batch does: that is checked first, with
        only the first candidate looked up. A memory-bound engine (a queue that waits for pages)
        otherwise spent ~10 halvings over every running sequence and candidate on every step."""
        keys: dict[int, list[int]] = {}
        found = self._waiting.candidates(self._seqs, self.max_running - len(self._running), keys)
        first = next(found, None)
        if first is None:
            return []
        fc = self.forecast()                  # built once: nothing is started until the end
        # Alone, a sequence always fits (its max_len is capped by the pool): never wait forever.
        if self._running and not fits_with(fc, self.pool, [first], self._predicted_len)[0]:
            return []
        candidates = [first, *found]
        accepted: list[tuple[Sequence, list[int]]] = []
        batch = len(candidates)
        while candidates and batch > 0:
            trial = accepted + candidates[:batch]
            fits, _ = fits_with(fc, self.pool, trial, self._predicted_len)
            if fits or (len(trial) == 1 and not self._running):
                accepted = trial
                candidates = candidates[batch:]
                batch = min(batch, len(candidates))
            else:
                batch //= 2
        for seq, hit_pages in accepted:
            self._start(seq, hit_pages, keys.get(seq.seq_id, []))
        return [seq for seq, _ in accepted]

    def _start(self, seq: Sequence, hit_pages: list[int], keys: list[int]) -> None:
        self._waiting.remove(seq)             # (before ever_admitted changes: it is part of its place)
        self._inflight.register(seq.seq_id, keys[len(hit_pages):], len(hit_pages))
        self.pool.incref_all(hit_pages)
        seq.page_ids = tuple(hit_pages)
        seq.num_published_pages = len(hit_pages)
        # Every token a hit (a prompt of whole pages, cached): the last one still runs, to sample,
        # its KV write sent to the scratch page (request.prefill_work, SeqWork.kv_cached).
        seq.num_computed = min(len(hit_pages) * self.page_size, seq.num_tokens - 1)
        seq.status = SeqStatus.RUNNING
        self._running[seq.seq_id] = seq
        self._batch = None
        self._running_avg_pages = None
        if not seq.ever_admitted:
            seq.ever_admitted = True
            seq.num_cached_tokens = seq.num_computed
            self.num_prompt_tokens += seq.num_prompt_tokens
            self.num_cached_tokens += seq.num_computed
            self.num_admitted += 1

    # ---- pages, preemption -------------------------------------------------------------------

    def _grow(self, seq: Sequence, end: int, *, shrinkable_from: int | None) -> int | None:
        """Give `seq` pages for positions [0, end). When pages run out, a prefill chunk (shrinkable
        past `shrinkable_from`) is cut to the pages it holds; otherwise the newest sequence is
        preempted. Returns the end that got pages, or None if `seq` itself was preempted."""
        num_pages = pages_for(end, self.page_size)
        while len(seq.page_ids) < num_pages:
            new_pages: list[int] = []
            for _ in range(num_pages - len(seq.page_ids)):
                page = self.pool.allocate()
                if page is None:
                    break
                new_pages.append(page)
            if new_pages:
                seq.page_ids += tuple(new_pages)   # held before any preemption below can release them
                continue
            held_end = len(seq.page_ids) * self.page_size
            if shrinkable_from is not None and held_end > shrinkable_from:
                return held_end
            victim = max(self._running.values(), key=lambda s: (int(s.priority), s.arrival))
            self._preempt(victim)
            if victim is seq:
                return None
        return end

    def _preempt(self, seq: Sequence) -> None:
        """Free its pages (full ones stay cached, so the recompute may hit them) and requeue it first."""
        self._publish(seq)
        self._release(seq)
        del self._running[seq.seq_id]
        self._batch = None
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._waiting.push(seq)               # ahead of new ones (see waiting.py)

    def _release(self, seq: Sequence) -> None:
        self._running_avg_pages = None
        self._inflight.drop(seq.seq_id)
        self.pool.decref_all(reversed(seq.page_ids))
        seq.page_ids = ()
        seq.num_computed = 0
        seq.num_published_pages = 0

    def _end(self, seq: Sequence) -> None:
        if seq.status is SeqStatus.RUNNING:
            self._publish(seq)
            self._release(seq)
            del self._running[seq.seq_id]
            self._batch = None
        elif seq.status is SeqStatus.WAITING:
            self._waiting.remove(seq)
        seq.status = SeqStatus.FINISHED

    def _publish(self, seq: Sequence) -> None:
        self._publish_all([seq])

    def _publish_all(self, seqs: list[Sequence]) -> None:
        if self.config.enable_prefix_cache and publish_full_pages(seqs, self.pool, self._inflight, self.page_size):
            self._batch = None                # a table changed: the batch's copy of it is stale

    def _retire_if_done(self, request_id: str) -> None:
        if all(self._seqs[s].status is SeqStatus.FINISHED for s in self._requests[request_id]):
            self._finished_requests[request_id] = None
            while len(self._finished_requests) > self._retain:
                old, _ = self._finished_requests.popitem(last=False)
                for seq_id in self._requests.pop(old):
                    del self._seqs[seq_id]

    # ---- gauges and checks -------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        """Waiting sequences (a request with n > 1 counts n)."""
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_free_pages(self) -> int:
        return self.pool.num_free

    @property
    def num_cached_pages(self) -> int:
        return self.pool.num_cached

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def num_wanted(self) -> int:
        """How many more requests to add now: enough waiting sequences to refill every slot the
        pool could hold (by the running sequences' average predicted size), minus those waiting.
        The average is kept until the running set or a prediction changes (not recomputed over
        thousands of sequences after every step)."""
        target = self.max_running
        if self._running:
            avg_pages = self._running_avg_pages
            if avg_pages is None:
                avg_pages = self._running_avg_pages = sum(pages_for(s.predicted_len or s.max_len, self.page_size)
                                                          for s in self._running.values()) / len(self._running)
            target = min(target, max(1, int(self.pool.num_pages / max(1.0, avg_pages)) + 1))
        return max(0, target - len(self._waiting))

    def check_invariants(self) -> None:
        """Raise AssertionError (with the reason) if the pages or the queues are inconsistent."""
        check_scheduler(self)


__all__ = ["Scheduler"]
