"""Build the real engine loop from an EngineConfig: the LoopSpec factory the engine process calls.

Owns the order of start-up: resolve the model folder (model_store: "demo" is fetched once), load
the tokenizer (a bad folder fails before the slow weight load), load the weights (dtype auto:
float32 on CPU, bfloat16 on GPU), size the KV cache (kv_cache_tokens, else 65,536 tokens on CPU or
free GPU memory), then the scheduler over exactly that many pages; with enable_hydragen the scheduler
plans prefix groups and the backend (torch or flashinfer) attends them by parts. Runs in the engine process.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from tokabatch.config import EngineConfig
from tokabatch.engine.api import ModelInfo
from tokabatch.engine.core.hydragen import GroupingParams
from tokabatch.engine.core.scheduler import Scheduler
from tokabatch.engine.runtime.attention import DEFAULT_ATTENTION, AttentionConfig
from tokabatch.engine.runtime.grammar import Grammars
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.engine.runtime.pipelined_loop import PipelinedLoop
from tokabatch.engine.runtime.runner import build_runners
from tokabatch.engine.runtime.weights import resolve_device
from tokabatch.model_store import resolve_model_path, served_model_name
from tokabatch.text import Tokenizer

log = logging.getLogger(__name__)


def build_loop(engine_config: EngineConfig, *, check_invariants: bool = False, parts: int | None = None,
               attention: AttentionConfig = DEFAULT_ATTENTION) -> EngineLoop | PipelinedLoop:
    """A ready StepLoop: one EngineLoop, or on CUDA with `pipelined` a PipelinedLoop of two over one
    model (each half gets half of max_seqs, max_tokens_per_step and the KV cache; unset sizes are
    the device's, config.DEVICE_STEP_SIZES, or LARGE_STEP_SIZES on a GPU with the memory for them:
    step_memory_bytes); `parts` (tests: 1 or 2) overrides that choice.
    `attention`: the attention kernels (scripts/bench.py varies them); whether steps are grouped
    (Hydragen) and captured (CUDA graphs) comes from engine_config. Raises ModelLoadError /
    ModelFetchError / ConfigError for a bad setup."""
    model_cfg = engine_config.model
    folder = resolve_model_path(model_cfg.path)
    tokenizer = Tokenizer.from_folder(folder)
    device = resolve_device(model_cfg.device)
    device_type = device.type
    sched_cfg = engine_config.scheduler.for_device(device_type, step_memory_bytes(engine_config, device))
    if parts is None:
        parts = 2 if engine_config.pipelined and device_type == "cuda" else 1
    if parts > 1:
        sched_cfg = replace(sched_cfg, max_seqs=-(-sched_cfg.max_seqs // parts),
                            max_tokens_per_step=max(1, sched_cfg.max_tokens_per_step // parts))
    hydragen = engine_config.enable_hydragen is not False     # None: the default, on (see EngineConfig)
    attention = replace(attention, hydragen=hydragen, cuda_graphs=engine_config.enable_cuda_graphs)
    runners = build_runners(
        folder, dtype=model_cfg.dtype, device=model_cfg.device, page_size=sched_cfg.page_size,
        kv_cache_tokens=engine_config.kv_cache_tokens, kv_memory_fraction=engine_config.kv_memory_fraction,
        seed=engine_config.seed, attention=attention,
        max_decode_batch=max(1, min(sched_cfg.max_seqs, sched_cfg.max_tokens_per_step)), parts=parts,
        fused_kernels=engine_config.fused_kernels)
    spec = runners[0].spec
    grouping = None
    if hydragen:
        grouping = GroupingParams(min_prefix_tokens=engine_config.hydragen_min_prefix_tokens,
                                  min_group=engine_config.hydragen_min_group)
    schedulers = []
    for runner in runners:
        schedulers.append(Scheduler(sched_cfg, runner.kv_cache.num_pages, max_model_len=spec.max_position_embeddings,
                                    hydragen=grouping))
    num_pages = sum(r.kv_cache.num_pages for r in runners)
    info = ModelInfo(
        model_id=served_model_name(model_cfg.path, model_cfg.served_model_name),
        context_length=spec.max_position_embeddings,
        vocab_size=spec.vocab_size,
        eos_token_ids=spec.eos_token_ids or tokenizer.eos_token_ids,
        page_size=sched_cfg.page_size,
        num_pages=num_pages,
        max_seqs=sum(s.max_running for s in schedulers),
        device=str(spec.device),
        dtype=spec.dtype_name,
    )
    graphs = runners[0].graphs
    log.info("engine ready: KV cache %d pages x %d = %d tokens, largest batch %d sequences, backend %s, "
             "CUDA graphs %s, %s", num_pages, info.page_size, num_pages * info.page_size, info.max_seqs,
             getattr(runners[0].backend, "name", "?"),
             f"for decode batches up to {graphs.max_batch} ({len(graphs.sizes)} sizes)" if graphs else "off",
             "two pipelined halves" if parts > 1 else "one loop")
    grammars = Grammars(tokenizer.to_json(), spec.vocab_size, info.eos_token_ids)   # one tokenizer trie for all
    for runner in runners:
        runner.sampler.grammars = grammars
    loops = [EngineLoop(scheduler=sched, runner=runner, sampler=runner.sampler, tokenizer=tokenizer,
                        info=replace(info, num_pages=runner.kv_cache.num_pages, max_seqs=sched.max_running),
                        check_invariants=check_invariants)
             for sched, runner in zip(schedulers, runners)]
    if parts == 1:
        return loops[0]
    return PipelinedLoop(loops, info, affinity_tokens=engine_config.hydragen_min_prefix_tokens)


def step_memory_bytes(engine_config: EngineConfig, device: torch.device) -> int:
    """The device memory an engine's steps may use beyond weights and KV cache, roughly: its share
    of what kv_memory_fraction keeps back of the GPU's memory (0 off CUDA, and with an explicit
    kv_cache_tokens, whose remainder is not known before the weights load)."""
    if device.type != "cuda" or engine_config.kv_cache_tokens is not None:
        return 0
    total = torch.cuda.get_device_properties(device).total_memory
    share = engine_config.engines_on_device
    return int(total * (1.0 - engine_config.kv_memory_fraction * share) / share)


__all__ = ["build_loop", "step_memory_bytes"]
