"""PipelinedLoop: two engine loops over one model, stepping in turn so the CPU work of one overlaps
the GPU work of the other.

Owns the routing of requests to halves and the alternation. A step of one EngineLoop needs the
previous step's sampled tokens before it can be scheduled, so a single loop leaves the GPU idle
while it schedules, builds the step's inputs and processes the tokens (at ~1000 decoding
sequences that CPU work is a large part of the GPU step's time). Two loops, each with its own
scheduler, page pool (a disjoint slice of the KV cache), sampler, attention wrappers and CUDA
graphs, but the same model weights, break that dependency: while the GPU runs half A's step N,
the CPU finishes half B's step N-1 (tokens, text, outputs) and schedules and launches B's step N,
which the GPU starts as soon as A's ends.

Each request runs whole in one half (its n samples share their prefix there). Routing: prefix
caching and Hydragen groups are per half, so requests whose prompts start alike (the same first
`affinity_tokens` tokens, 256 by default: Hydragen's minimum shared prefix) go to the half the last
such request went to, unless that half is ahead by more than 64 such requests' worth of
outstanding work (prompt plus max output tokens); otherwise, and for a new prompt start, to the
half with less outstanding work. Without the affinity, lines that batch-aware ordering put side
by side alternate between the halves: each half computes every prompt, and groups are half as
large (benchmarks/ordering.py measures both; docs/benchmarks.md). A prompt start shared by
everything (W5's system prompt) moves between the halves in runs of 64 requests. The StepLoop
protocol is unchanged, so the engine client and service do not know.
Runs inside the engine process; nothing of the service.
"""

from __future__ import annotations

from collections import OrderedDict

from tokabatch.engine.api import EngineStats, GenerationOutput, GenerationRequest, Item, ModelInfo
from tokabatch.engine.core.scheduler import Scheduler
from tokabatch.engine.runtime.loop import EngineLoop, Launched, StepRunner



class PipelinedLoop:
    """The StepLoop over two EngineLoops (`halves`) that share a model; not thread-safe."""

    AFFINITY_RUN = 64                 # how far (in requests like this one) a half may run ahead
    AFFINITY_KEYS = 65_536            # prompt starts remembered (least recently routed dropped)

    def __init__(self, halves: list[EngineLoop], info: ModelInfo, affinity_tokens: int = 256) -> None:
        """`affinity_tokens`: the prompt start that routes alike requests to one half (0: none)."""
        if len(halves) != 2:
            raise ValueError("PipelinedLoop alternates exactly two engine loops")
        self.halves = halves
        self.info = info
        self.affinity_tokens = affinity_tokens
        self._owner: dict[str, tuple[int, int]] = {}      # request_id -> (half, its load)
        self._load = [0, 0]                               # outstanding tokens per half
        self._affinity: OrderedDict[tuple[int, ...], int] = OrderedDict()   # prompt start -> half
        self._pending: list[Launched | None] = [None, None]   # launched, not yet finished step per half
        self._turn = 0

    @property
    def runner(self) -> StepRunner:
        """The first half's runner (benchmarks read its counters; `runners` has both)."""
        return self.halves[0].runner

    @property
    def runners(self) -> list[StepRunner]:
        return [h.runner for h in self.halves]

    @property
    def scheduler(self) -> Scheduler:
        return self.halves[0].scheduler

    # ---- StepLoop -------------------------------------------------------------------------

    def add(self, request: GenerationRequest) -> None:
        load = request.n * (len(request.prompt_token_ids) + request.sampling.max_tokens)
        key = tuple(request.prompt_token_ids[:self.affinity_tokens]) if self.affinity_tokens > 0 else None
        half = self._affinity.get(key) if key is not None else None
        if half is None or self._load[half] > self._load[1 - half] + self.AFFINITY_RUN * load:
            half = 0 if self._load[0] <= self._load[1] else 1
        self.halves[half].add(request)                   # raises for a rejected request: nothing recorded
        self._owner[request.request_id] = (half, load)
        self._load[half] += load
        if key is not None:
            self._affinity[key] = half
            self._affinity.move_to_end(key)
            if len(self._affinity) > self.AFFINITY_KEYS:
                self._affinity.popitem(last=False)

    def abort(self, request_id: str) -> None:
        owner = self._owner.get(request_id)
        if owner is not None:
            self.halves[owner[0]].abort(request_id)

    def has_work(self) -> bool:
        return any(p is not None for p in self._pending) or any(h.has_work() for h in self.halves)

    def num_wanted(self) -> int:
        return sum(h.num_wanted() for h in self.halves)

    def stats(self) -> EngineStats:
        a, b = (h.stats() for h in self.halves)
        merged = {name: getattr(a, name) + getattr(b, name) for name in EngineStats.__slots__ if name != "extra"}
        return EngineStats(**merged, extra={**a.extra, **b.extra})

    def step(self) -> list[Item]:
        """Launch this turn's half, then finish the other half's step that ran before it.

        The other half's tokens are read before this half's draw is launched: a draw with
        constrained rows waits for their masks (held back by the sampler), and reading the other
        half's tokens first queues its grammar job behind this one's, so the grammar thread goes
        from one to the next instead of waiting for the engine thread in between."""
        i, j = self._turn, 1 - self._turn
        self._turn = j
        launched = self.halves[i].begin_step()
        before = self._pending[j]
        if before is not None and before[1] is not None:
            before[1].result()
        if launched is not None and launched[1] is not None:
            launched[1].draw()
        out = self.halves[j].end_step(before)
        self._pending[j] = None
        self._pending[i] = launched
        for item in out:
            if isinstance(item, GenerationOutput):
                owner = self._owner.pop(item.request_id, None)
                if owner is not None:
                    self._load[owner[0]] -= owner[1]
        return out


__all__ = ["PipelinedLoop"]
