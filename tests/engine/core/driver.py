"""A fake model and a step-by-step driver for the scheduler, with a brute-force KV store.

The fake model is deterministic: the k-th output token of choice c of request r is a hash of
(seed, r, c, k), and each choice ends after a length fixed up front (or at its max_len). The KV
store records, for every (page, slot) written, a digest of the whole token prefix up to that
position, so a step that attends to a page holding some other sequence's KV (a prefix-cache bug)
is caught, as is a write into a page that is shared or in the prefix tree.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from tokabatch.config import SchedulerConfig
from tokabatch.engine.api import GenerationRequest, Priority, SamplingParams
from tokabatch.engine.core.admission import brute_force_peak
from tokabatch.engine.core.hydragen import find_decode_groups
from tokabatch.engine.core.plan import SampledToken, StepPlan, StepResult
from tokabatch.engine.core.predictor import LengthPredictor
from tokabatch.engine.core.request import Sequence, pages_for
from tokabatch.engine.core.scheduler import Scheduler


def fake_token(seed: int, request_id: str, choice: int, k: int, vocab: int) -> int:
    return random.Random(f"{seed}/{request_id}/{choice}/{k}").randrange(vocab)


class OraclePredictor(LengthPredictor):
    """Knows every sequence's true final output length (admission should then never overflow)."""

    def __init__(self, true_lens: dict[tuple[str, int], int]) -> None:
        super().__init__(0.0)
        self.true_lens = true_lens

    def predict(self, seq: Sequence) -> int:
        return self.true_lens[(seq.request_id, seq.choice_index)]


@dataclass
class Driver:
    scheduler: Scheduler
    seed: int = 0
    vocab: int = 3
    true_lens: dict[tuple[str, int], int] = field(default_factory=dict)
    kv: dict[tuple[int, int], int] = field(default_factory=dict)       # (page, slot) -> prefix digest
    prompt_logprob_positions: dict[int, list[int]] = field(default_factory=dict)
    forward_tokens: int = 0
    kv_cached_positions: int = 0                                       # rerun positions whose KV was cached
    steps: int = 0
    num_grouped_steps: int = 0                                         # steps whose plan had prefix groups
    finished: list[int] = field(default_factory=list)

    def add(self, request: GenerationRequest, true_len: int | list[int]) -> list[int]:
        seq_ids = self.scheduler.add_request(request)
        for choice in range(request.n):
            n_out = true_len[choice] if isinstance(true_len, list) else true_len
            self.true_lens[(request.request_id, choice)] = max(1, n_out)
        return seq_ids

    def expected_output(self, seq: Sequence) -> list[int]:
        n_out = min(self.true_lens[(seq.request_id, seq.choice_index)], seq.max_len - seq.num_prompt_tokens)
        return [fake_token(self.seed, seq.request_id, seq.choice_index, k, self.vocab) for k in range(n_out)]

    def step(self) -> StepPlan:
        sched = self.scheduler
        running_before = {s.seq_id for s in sched._running.values()}
        plan = sched.schedule()
        self.steps += 1
        cfg = sched.config
        assert plan.num_tokens <= cfg.max_tokens_per_step, "step exceeds max_tokens_per_step"
        assert sched.num_running <= cfg.max_seqs, "more running sequences than max_seqs"
        assert len({w.seq_id for w in plan.works}) == len(plan.works), "a sequence runs twice in one step"
        assert sched.pool.num_used <= sched.num_pages
        if sched._hydragen is not None:
            # The scheduler reuses the previous step's groups when they cannot differ: check that.
            # (A whole-sequence hit's rerun of its last token is grouped as a decode is: SeqWork.kv_cached.)
            grouped = plan.decodes + tuple(w for w in plan.prefills if w.kv_cached)
            assert plan.prefix_groups == find_decode_groups(grouped, sched.page_size, sched._hydragen), \
                f"step {plan.step_idx}: prefix groups differ from a fresh detection"
            self.num_grouped_steps += bool(plan.prefix_groups)
        sched.check_invariants()
        admitted = {s.seq_id for s in sched._running.values()} - running_before
        alone = not running_before and len(admitted) == 1     # always admitted: max_len fits the pool
        if admitted and not alone:
            # What was admitted fits under the predictions, by the slow step-by-step simulation.
            peak = forecast_peak(sched)
            assert peak <= sched.num_pages, f"admitted {sorted(admitted)} although the forecast peaks at {peak}"
        sampled = []
        for work in plan.works:
            sampled.extend(self._run_work(work))
        self.forward_tokens += plan.num_tokens
        sched.on_step_done(plan, StepResult(step_idx=plan.step_idx, sampled=tuple(sampled)))
        sched.check_invariants()
        for token in sampled:
            seq = sched.sequence(token.seq_id)
            if len(seq.output_ids) >= self.true_lens[(seq.request_id, seq.choice_index)] \
                    or seq.num_tokens >= seq.max_len:
                sched.finish_sequence(seq.seq_id)
                self.finished.append(seq.seq_id)
                sched.check_invariants()
        return plan

    def _run_work(self, work) -> list[SampledToken]:
        sched = self.scheduler
        seq = sched.sequence(work.seq_id)
        ps = sched.page_size
        end = work.start_pos + work.num_tokens
        assert work.start_pos == seq.num_computed
        assert work.token_ids == seq.token_slice(work.start_pos, end), "plan runs the wrong tokens"
        assert len(work.page_ids) >= pages_for(end, ps), "page table too short for the chunk"
        assert work.sample == (end == seq.num_tokens)
        tokens = seq.token_slice(0, end)
        for pos in range(work.start_pos):          # attention reads: every earlier position's KV
            assert self.kv.get((work.page_ids[pos // ps], pos % ps)) == hash(tokens[:pos + 1]), \
                f"sequence {seq.seq_id} reads wrong KV at position {pos}"
        for pos in range(work.start_pos, end):
            page = work.page_ids[pos // ps]
            if work.kv_cached:                     # a whole-sequence hit: the KV is there, nothing written
                assert self.kv.get((page, pos % ps)) == hash(tokens[:pos + 1]), \
                    f"sequence {seq.seq_id}: position {pos} is marked cached but its KV is not in page {page}"
                self.kv_cached_positions += 1
                continue
            # writes: only into pages this sequence owns alone
            assert sched.pool.refcount(page) == 1 and not sched.pool.in_tree(page), \
                f"sequence {seq.seq_id} writes position {pos} into shared page {page}"
            self.kv[(page, pos % ps)] = hash(tokens[:pos + 1])
        if work.prompt_logprobs is not None:
            n_prompt = seq.num_prompt_tokens
            want = tuple(seq.prompt_ids[p + 1] for p in range(work.start_pos, min(end, n_prompt - 1)))
            assert work.prompt_logprob_targets == want, "wrong prompt logprob targets"
            self.prompt_logprob_positions.setdefault(seq.seq_id, []).extend(
                range(work.start_pos, min(end, n_prompt - 1)))
        if not work.sample:
            return []
        token = fake_token(self.seed, seq.request_id, seq.choice_index, len(seq.output_ids), self.vocab)
        return [SampledToken(seq_id=seq.seq_id, token_id=token)]

    def run(self, max_steps: int = 10_000) -> None:
        while self.scheduler.has_work():
            self.step()
            assert self.steps < max_steps, "the scheduler made no progress (hang)"


def forecast_peak(sched: Scheduler) -> int:
    fc = sched.forecast()
    return brute_force_peak(fc.curves, fc.shared.values(), sched.page_size)


def make_scheduler(num_pages: int = 64, *, page_size: int = 2, max_seqs: int = 8, max_tokens_per_step: int = 64,
                   enable_prefix_cache: bool = True, max_model_len: int = 1000, **kw) -> Scheduler:
    config = SchedulerConfig(page_size=page_size, max_seqs=max_seqs, max_tokens_per_step=max_tokens_per_step,
                             enable_prefix_cache=enable_prefix_cache, admission_margin=0.1)
    return Scheduler(config, num_pages, max_model_len=max_model_len, **kw)


def request(rid: str, prompt: list[int] | tuple[int, ...], *, max_tokens: int = 8, n: int = 1,
            priority: Priority = Priority.BATCH, prompt_logprobs: int | None = None) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_token_ids=tuple(prompt), n=n, priority=priority,
                             sampling=SamplingParams(max_tokens=max_tokens, prompt_logprobs=prompt_logprobs))
