"""The engine without a model: real schedulers and loops over an instant runner, with the tokenizer
of a random_models folder (Llama-3's vocabulary of "t0".."t128255"), as the CPU harnesses use it.

`build_loop` makes what the engine factory makes on a GPU, sized by the arguments: one EngineLoop,
or two pipelined halves that split the pages, max_seqs and the step's tokens. Every step's tokens
are ready at once ((seq_id * 7919 + step) % vocab, engine/simulated.py), so every second measured
is the engine's CPU work; workloads run with `ignore_eos`.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from tokabatch.config import EngineConfig, SchedulerConfig
from tokabatch.engine.api import ModelInfo
from tokabatch.engine.core.hydragen import GroupingParams
from tokabatch.engine.core.scheduler import Scheduler
from tokabatch.engine.random_models import ARCHS, build_folder
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.engine.runtime.pipelined_loop import PipelinedLoop
from tokabatch.engine.simulated import SimulatedRunner
from tokabatch.text import Tokenizer

ARCH = "Llama-3.2-1B"
VOCAB: int = ARCHS[ARCH]["vocab_size"]
EOS: int = ARCHS[ARCH]["eos_token_id"]
CONTEXT: int = ARCHS[ARCH]["max_position_embeddings"]
PAGE_SIZE = 16
MAX_TOKENS_PER_STEP = 16384      # the CUDA default (config.DEVICE_STEP_SIZES)


def tokenizer() -> Tokenizer:
    with tempfile.TemporaryDirectory(prefix="tokabatch-synthetic-") as tmp:
        build_folder(ARCH, Path(tmp), weights=False)
        return Tokenizer.from_folder(tmp)


def build_loop(tok: Tokenizer, *, num_pages: int, max_seqs: int, halves: int = 1, hydragen: bool = True,
               affinity: bool = True) -> EngineLoop | PipelinedLoop:
    """Hydragen (unless `hydragen` is False) and the halves' prompt-start affinity (unless `affinity`
    is False) as the factory sets them from the default EngineConfig."""
    engine = EngineConfig()
    grouping = GroupingParams(min_prefix_tokens=engine.hydragen_min_prefix_tokens,
                              min_group=engine.hydragen_min_group) if hydragen else None
    loops = []
    for _ in range(halves):
        config = SchedulerConfig(page_size=PAGE_SIZE, max_seqs=max_seqs // halves,
                                 max_tokens_per_step=MAX_TOKENS_PER_STEP // halves)
        scheduler = Scheduler(config, num_pages // halves, max_model_len=CONTEXT, hydragen=grouping)
        info = ModelInfo(model_id="synthetic", context_length=CONTEXT, vocab_size=VOCAB, eos_token_ids=(EOS,),
                         page_size=PAGE_SIZE, num_pages=num_pages // halves, max_seqs=scheduler.max_running)
        runner = SimulatedRunner(None, VOCAB)
        loops.append(EngineLoop(scheduler=scheduler, runner=runner, sampler=runner.sampler, tokenizer=tok,
                                info=info))
    if halves == 1:
        return loops[0]
    return PipelinedLoop(loops, loops[0].info, affinity_tokens=engine.hydragen_min_prefix_tokens if affinity else 0)
