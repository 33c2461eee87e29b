"""A simulated GPU engine: the real schedulers and loops over a runner that models the GPU's time.

Owns `build_simulated_loop`, a StepLoop factory (`EngineConfig.loop_factory`, `tokabatch serve
--engine-factory tokabatch.engine.simulated:build_simulated_loop`) for benchmarks of the service
on a machine without a GPU: everything the engine process does on the CPU is real (admission,
prefix cache, Hydragen grouping, two pipelined halves, stop checks, text, outputs), and only the
forward pass is replaced by `SimulatedGpu`, one queue of steps whose durations come from a cost
model of Llama-3.2-1B on one H200 (`H200_LLAMA_1B`: a step's fixed cost, prefill per token, decode
per row and per KV token read after Hydragen's savings), so `launch` returns at once and
`result()` sleeps until the modeled GPU has finished that step. Tokens are deterministic
((seq_id * 7919 + step) % vocab): run workloads with `ignore_eos`.

Not a performance model to quote: it lets the ratio of the service to the in-process engine, and
where the service's time goes, be watched on a CPU (scripts/bench.py --engine simulated).
Torch-free: engine/core, engine/runtime/loop.py and pipelined_loop.py, and the tokenizer.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from itertools import chain
from pathlib import Path
from typing import Sequence

from tokabatch.config import EngineConfig
from tokabatch.engine.api import ModelInfo, SamplingParams
from tokabatch.engine.core.hydragen import GroupingParams, kv_reads_saved
from tokabatch.engine.core.plan import SampledTokens, StepPlan, StepResult
from tokabatch.engine.core.scheduler import Scheduler
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.engine.runtime.pipelined_loop import PipelinedLoop
from tokabatch.model_store import read_eos_token_ids
from tokabatch.text import Tokenizer

SIMULATED_KV_TOKENS = 3_781_696          # the H200's KV cache for Llama-3.2-1B at the default memory fraction


@dataclass(frozen=True, slots=True)
class StepCosts:
    """Seconds of GPU per step: fixed + per prefill token + per decode row + per KV token a decode reads."""

    step_s: float
    prefill_token_s: float
    decode_row_s: float
    kv_token_s: float


# Rough fits to scripts/bench.py's H200 runs (TA ~10 s, TB ~12 s in-process), not measurements.
H200_LLAMA_1B = StepCosts(step_s=0.6e-3, prefill_token_s=3.5e-6, decode_row_s=8.5e-6, kv_token_s=9e-9)


class SimulatedGpu:
    """One device queue shared by every runner: a step starts when the previous one ends."""

    def __init__(self, costs: StepCosts) -> None:
        self.costs = costs
        self.busy_until = 0.0
        self.busy_s = 0.0

    def enqueue(self, plan: StepPlan) -> float:
        """Queue `plan`; returns the monotonic time its tokens are ready."""
        c = self.costs
        kv_reads = sum(plan.decodes.start_pos) + len(plan.decodes) - kv_reads_saved(plan.prefix_groups)
        seconds = (c.step_s + c.prefill_token_s * sum(len(w.token_ids) for w in plan.prefills)
                   + c.decode_row_s * len(plan.decodes) + c.kv_token_s * kv_reads)
        self.busy_until = max(time.monotonic(), self.busy_until) + seconds
        self.busy_s += seconds
        return self.busy_until


class _Pending:
    def __init__(self, result: StepResult, ready_at: float) -> None:
        self._result, self._ready_at = result, ready_at

    def draw(self) -> None:
        """Nothing is held back here."""

    def result(self) -> StepResult:
        wait = self._ready_at - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        return self._result


class LiveSequences:
    """The runner's sampler as the loop sees it when nothing samples: which sequences are live."""

    def __init__(self) -> None:
        self.live: set[int] = set()

    def register(self, seq_id: int, params: SamplingParams, prompt_ids: Sequence[int], *,
                 choice_index: int = 0) -> None:
        if seq_id in self.live:
            raise ValueError(f"sequence {seq_id} is already registered")
        self.live.add(seq_id)

    def release(self, seq_id: int) -> None:
        self.live.discard(seq_id)


class _Backend:
    name = "simulated"


class SimulatedRunner:
    """The runner interface EngineLoop drives (launch -> pending -> result), on a SimulatedGpu; with
    no GPU every step's tokens are ready at once (benchmarks/synthetic.py: the CPU harnesses of the
    engine's bookkeeping)."""

    graphs = None
    backend = _Backend()

    def __init__(self, gpu: SimulatedGpu | None, vocab_size: int) -> None:
        self.gpu = gpu
        self.vocab_size = vocab_size
        self.sampler = LiveSequences()
        self.num_graph_steps = 0
        self.num_eager_steps = 0

    def launch(self, plan: StepPlan) -> _Pending:
        step, vocab = plan.step_idx, self.vocab_size
        seq_ids = list(chain(plan.decodes.seq_ids, (w.seq_id for w in plan.prefills if w.sample)))
        sampled = SampledTokens(seq_ids, [(s * 7919 + step) % vocab for s in seq_ids])
        if plan.prefills:
            self.num_eager_steps += 1
        else:
            self.num_graph_steps += 1
        return _Pending(StepResult(step_idx=step, sampled=sampled, num_forward_tokens=plan.num_tokens),
                        self.gpu.enqueue(plan) if self.gpu is not None else 0.0)


def build_simulated_loop(engine_config: EngineConfig, *, costs: StepCosts = H200_LLAMA_1B) -> PipelinedLoop:
    """Two pipelined halves over a SimulatedGpu, sized as the real engine is on a GPU; the model
    folder gives the tokenizer, vocabulary, context length and EOS (a random_models folder works)."""
    folder = Path(engine_config.model.path)
    tokenizer = Tokenizer.from_folder(folder)
    spec = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    sched_cfg = engine_config.scheduler.for_device("cuda")
    sched_cfg = replace(sched_cfg, max_seqs=-(-sched_cfg.max_seqs // 2),
                        max_tokens_per_step=max(1, sched_cfg.max_tokens_per_step // 2))
    num_pages = (engine_config.kv_cache_tokens or SIMULATED_KV_TOKENS) // sched_cfg.page_size // 2
    grouping = None
    if engine_config.enable_hydragen is not False:
        grouping = GroupingParams(min_prefix_tokens=engine_config.hydragen_min_prefix_tokens,
                                  min_group=engine_config.hydragen_min_group)
    eos_ids = read_eos_token_ids(folder, spec) or tokenizer.eos_token_ids
    gpu = SimulatedGpu(costs)
    loops = []
    for _ in range(2):
        scheduler = Scheduler(sched_cfg, num_pages, max_model_len=spec["max_position_embeddings"], hydragen=grouping)
        info = ModelInfo(model_id=engine_config.model.served_model_name or folder.name,
                         context_length=spec["max_position_embeddings"], vocab_size=spec["vocab_size"],
                         eos_token_ids=eos_ids, page_size=sched_cfg.page_size, num_pages=num_pages,
                         max_seqs=scheduler.max_running, device="simulated", dtype="bfloat16")
        runner = SimulatedRunner(gpu, spec["vocab_size"])
        loops.append(EngineLoop(scheduler=scheduler, runner=runner, sampler=runner.sampler, tokenizer=tokenizer,
                                info=info))
    info = replace(loops[0].info, num_pages=2 * num_pages, max_seqs=2 * loops[0].info.max_seqs)
    return PipelinedLoop(loops, info, affinity_tokens=engine_config.hydragen_min_prefix_tokens)


__all__ = ["H200_LLAMA_1B", "LiveSequences", "SimulatedGpu", "SimulatedRunner", "StepCosts", "build_simulated_loop"]
