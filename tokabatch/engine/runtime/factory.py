"""Build the real engine loop from an EngineConfig: the LoopSpec factory the engine process calls.

Owns the order of start-up: resolve the model folder (model_store: "demo" is fetched once), load
the tokenizer (a bad folder fails before the slow weight load), load the weights (dtype auto:
float32 on CPU, bfloat16 on GPU), size the KV cache (kv_cache_tokens, else 65,536 tokens on CPU or
free GPU memory), then the scheduler over exactly that many pages; with enable_hydragen the scheduler
plans prefix groups and the backend (torch or flashinfer) attends them by parts. Runs in the engine process.
"""

from __future__ import annotations

import logging

from tokabatch.config import EngineConfig
from tokabatch.engine.api import ModelInfo
from tokabatch.engine.core.hydragen import GroupingParams
from tokabatch.engine.core.scheduler import Scheduler
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.engine.runtime.runner import build_runner
from tokabatch.model_store import resolve_model_path, served_model_name
from tokabatch.text import Tokenizer

log = logging.getLogger(__name__)


def build_loop(engine_config: EngineConfig, *, check_invariants: bool = False) -> EngineLoop:
    """A ready EngineLoop; raises ModelLoadError / ModelFetchError / ConfigError for a bad setup."""
    model_cfg = engine_config.model
    folder = resolve_model_path(model_cfg.path)
    tokenizer = Tokenizer.from_folder(folder)
    runner = build_runner(
        folder, dtype=model_cfg.dtype, device=model_cfg.device, page_size=engine_config.scheduler.page_size,
        kv_cache_tokens=engine_config.kv_cache_tokens, kv_memory_fraction=engine_config.kv_memory_fraction,
        seed=engine_config.seed, cuda_graphs=engine_config.enable_cuda_graphs,
        max_decode_batch=max(1, min(engine_config.scheduler.max_seqs, engine_config.scheduler.max_tokens_per_step)))
    spec = runner.spec
    num_pages = runner.kv_cache.num_pages
    grouping = None
    if engine_config.enable_hydragen:
        grouping = GroupingParams(min_prefix_tokens=engine_config.hydragen_min_prefix_tokens,
                                  min_group=engine_config.hydragen_min_group)
        if hasattr(runner.backend, "use_hydragen"):
            runner.backend.use_hydragen = True     # backends default to reading every page themselves
    scheduler = Scheduler(engine_config.scheduler, num_pages, max_model_len=spec.max_position_embeddings,
                          hydragen=grouping)
    info = ModelInfo(
        model_id=served_model_name(model_cfg.path, model_cfg.served_model_name),
        context_length=spec.max_position_embeddings,
        vocab_size=spec.vocab_size,
        eos_token_ids=spec.eos_token_ids or tokenizer.eos_token_ids,
        page_size=engine_config.scheduler.page_size,
        num_pages=num_pages,
        max_seqs=scheduler.max_running,
        device=str(spec.device),
        dtype=spec.dtype_name,
    )
    graphs = runner.graphs
    log.info("engine ready: KV cache %d pages x %d = %d tokens, largest batch %d sequences, backend %s, "
             "CUDA graphs %s", num_pages, info.page_size, num_pages * info.page_size, info.max_seqs,
             getattr(runner.backend, "name", "?"),
             f"for decode batches up to {graphs.max_batch} ({len(graphs.sizes)} sizes)" if graphs else "off")
    return EngineLoop(scheduler=scheduler, runner=runner, sampler=runner.sampler, tokenizer=tokenizer, info=info,
                      check_invariants=check_invariants)


__all__ = ["build_loop"]
