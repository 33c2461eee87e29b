"""The model runner: one StepPlan in, one forward pass, one StepResult out.

Owns the translation of a plan's plain ints into tensors (token ids, positions, and a `SeqAttn`
per sequence that the attention backend turns into slot mappings and page-table gathers), the
choice of which hidden rows go through the LM head (only the last row of each sequence that
samples, plus the scored rows of prompt-logprob chunks), and the hand-off to the Sampler.
Stateless between steps: each SeqWork carries its own page table. Sampler registration
(`register` on admission, `release` on finish) is the engine loop's job, not ours.

With `graphs` (cuda_graphs.DecodeGraphs, CUDA only) a pure decode step replays a captured graph
instead of running the model eagerly, and with `grouped_graphs` a prefix-grouped one its Hydragen
twin; mixed and prefill steps, grouped steps without grouped graphs, and steps larger than the
largest graph run eagerly. `num_graph_steps` /
`num_eager_steps` count which way each step went.
Must not import the scheduler or the service.
"""

from __future__ import annotations

import logging
from array import array
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Sequence

import torch
from torch import Tensor, nn

from tokabatch.engine.api import TokenLogprob
from tokabatch.engine.core.plan import PrefixGroup, SeqWork, StepPlan, StepResult
from tokabatch.engine.models.layers import AttentionFn
from tokabatch.engine.runtime.attention import DEFAULT_ATTENTION, AttentionConfig, SeqAttn, TorchBackend, to_device
from tokabatch.engine.runtime.kv_cache import KVCache, choose_num_pages
from tokabatch.engine.runtime.loop import StepOutOfMemory
from tokabatch.engine.runtime.sampling import Draw, PendingSample, Sampler, no_samples
from tokabatch.engine.runtime.weights import ModelSpec, load_model

# torch's CPU threads in a CUDA engine: its host tensors are small (a step's indices and lengths), and
# with the default (one per core) the idle OpenMP threads spin between ops, burning CPU for no gain
# in output rate (docs/benchmarks.md, "Where TB's time goes now").
CUDA_HOST_THREADS = 1

if TYPE_CHECKING:     # CUDA-only modules, imported where graphs are built
    from tokabatch.engine.runtime.cuda_graphs import DecodeGraphs
    from tokabatch.engine.runtime.hydragen_graphs import GroupedDecodeGraphs

log = logging.getLogger(__name__)

_new_tuple = tuple.__new__   # builds a NamedTuple without its keyword handling (_flatten)


class AttentionBackend(Protocol):
    """What the runner needs of an attention backend (TorchBackend, FlashInferBackend)."""

    use_hydragen: bool                   # prefix groups are attended by parts (AttentionConfig.hydragen)

    def begin_step(self, seqs: Sequence[SeqAttn], num_tokens: int,
                   prefix_groups: Sequence[PrefixGroup] = ()) -> AttentionFn: ...


class ModelRunner:
    def __init__(self, model: nn.Module, spec: ModelSpec, kv_cache: KVCache,
                 backend: AttentionBackend, sampler: Sampler, graphs: DecodeGraphs | None = None) -> None:
        self.model, self.spec, self.kv_cache = model, spec, kv_cache
        self.backend, self.sampler = backend, sampler
        self.graphs = graphs
        self.grouped_graphs: GroupedDecodeGraphs | None = None
        self.device = spec.device
        self.num_graph_steps = 0
        self.num_eager_steps = 0

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step: write the KV of every planned token, sample where asked, score prompts."""
        return self.launch(plan).result()

    def launch(self, plan: StepPlan) -> "PendingStep":
        """Queue one step on the device and return at once (on CUDA; the CPU runs it to the end):
        its `result()` waits for the sampled tokens. Call `result()` before the next `launch`.
        Raises StepOutOfMemory (its cached blocks freed) when the device runs out of memory."""
        try:
            return self._launch(plan)
        except torch.cuda.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            raise StepOutOfMemory(str(exc).split("\n", 1)[0]) from exc

    @torch.inference_mode()
    def _launch(self, plan: StepPlan) -> "PendingStep":
        if plan.is_empty:
            return PendingStep(StepResult(step_idx=plan.step_idx, sampled=(), num_forward_tokens=0))
        graph_kind = self._graph_kind(plan)
        if graph_kind is not None:
            d = plan.decodes                  # (columns: no row objects on this path)
            if graph_kind == "grouped":
                logits = self.grouped_graphs.run(d.token_ids, d.start_pos, d.page_ids, d.seq_ids, plan.prefix_groups)
            else:
                logits = self.graphs.run(d.token_ids, [p + 1 for p in d.start_pos], d.page_ids)
            if logits is not None:
                self.num_graph_steps += 1
                finish = self.sampler.sample_async(d.seq_ids, logits)
                return PendingStep(None, plan, finish)
        self.num_eager_steps += 1
        works = plan.works
        input_ids, positions, seqs = self._flatten(works)
        attn = self.backend.begin_step(seqs, plan.num_tokens, plan.prefix_groups)
        hidden = self.model(input_ids, positions, attn)            # [num_tokens, hidden]
        prompt_logprobs = self._prompt_logprobs(works, seqs, hidden)
        return PendingStep(None, plan, self._sample(works, seqs, hidden), prompt_logprobs)

    def _graph_kind(self, plan: StepPlan) -> str | None:
        """"plain" or "grouped" for a pure decode step (grouped: it has prefix groups and the backend
        attends them); None when the step must run eagerly. (Every decode row samples and scores
        no prompt: DecodeWorks.)"""
        if self.graphs is None or plan.prefills:
            return None
        if plan.prefix_groups and self.backend.use_hydragen:
            return "grouped" if self.grouped_graphs is not None else None
        return "plain"

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One eager step over the scratch page (a prefill chunk of one page and a decode row) and a
        draw from its logits, so the attention and draw kernels are compiled and loaded before the
        first request. Needs a scratch page."""
        scratch = self.kv_cache.scratch_page
        if scratch is None:
            return
        ps = self.kv_cache.page_size
        seqs = [SeqAttn(q_start=0, q_len=1, start_pos=0, page_ids=(scratch,)),
                SeqAttn(q_start=1, q_len=ps, start_pos=0, page_ids=(scratch,))]
        attn = self.backend.begin_step(seqs, ps + 1)
        hidden = self.model(self._long([0] * (ps + 1)), self._long([0] + list(range(ps))), attn)
        self.sampler.warm_up(self.model.compute_logits(hidden[[0, ps]]))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _flatten(self, works: Sequence[SeqWork]) -> tuple[Tensor, Tensor, list[SeqAttn]]:
        """Token ids and positions [num_tokens] (plan order) and each sequence's rows."""
        ids = array("q")                      # (an array becomes a tensor faster than a list: _long)
        positions = array("q")
        seqs: list[SeqAttn] = []
        for w in works:                       # (one row per decode: kept to tuple-level work)
            token_ids, start = w.token_ids, w.start_pos
            n = len(token_ids)
            seqs.append(_new_tuple(SeqAttn, (len(ids), n, start, w.page_ids, w.seq_id, w.kv_cached)))
            if n == 1:
                ids.append(token_ids[0])
                positions.append(start)
            else:
                ids.extend(token_ids)
                positions.extend(range(start, start + n))
        return self._long(ids), self._long(positions), seqs

    def _sample(self, works: Sequence[SeqWork], seqs: Sequence[SeqAttn],
                hidden: Tensor) -> PendingSample:
        picked = [(w.seq_id, s.q_start + s.q_len - 1) for w, s in zip(works, seqs) if w.sample]
        if not picked:
            return PendingSample(no_samples)
        rows = self._long([row for _, row in picked])
        logits = self.model.compute_logits(hidden.index_select(0, rows))   # [num_sampled, vocab]
        return self.sampler.sample_async([seq_id for seq_id, _ in picked], logits)

    def _prompt_logprobs(self, works: Sequence[SeqWork], seqs: Sequence[SeqAttn],
                         hidden: Tensor) -> tuple[tuple[int, tuple[TokenLogprob, ...]], ...]:
        """Per chunk asking for them: row i scores prompt_logprob_targets[i] (the token after it)."""
        result = []
        for w, s in zip(works, seqs):
            if w.prompt_logprobs is None:
                continue
            targets = w.prompt_logprob_targets
            if len(targets) > w.num_tokens:
                raise ValueError(f"sequence {w.seq_id}: {len(targets)} prompt logprob targets "
                                 f"for a chunk of {w.num_tokens} tokens")
            scored: tuple[TokenLogprob, ...] = ()
            if targets:
                logits = self.model.compute_logits(hidden[s.q_start:s.q_start + len(targets)])
                scored = tuple(self.sampler.prompt_logprobs(logits, self._long(list(targets)), w.prompt_logprobs))
            result.append((w.seq_id, scored))
        return tuple(result)

    def _long(self, values: list[int] | array) -> Tensor:
        """An int64 tensor on the device. From an array("q") it is made over the array's buffer, a
        fraction of torch.tensor's time on a list (docs/benchmarks.md, "The eager step's per-row Python").
        On CUDA it goes through pinned memory (`to_device`): CUDA stages only small copies from pageable
        memory, and a larger one (a long prefill step's token ids and positions) waits for the work
        queued on the stream, the other half's step (docs/benchmarks.md, "The service beside the engine
        on an H100; pinned copies")."""
        if not isinstance(values, array):
            host = torch.tensor(values, dtype=torch.long)
        elif not values:
            return torch.zeros(0, dtype=torch.long, device=self.device)
        else:
            host = torch.frombuffer(values, dtype=torch.long)
        if self.device.type == "cuda":
            return to_device(host, self.device)
        return host.to(self.device, non_blocking=True)


class PendingStep:
    """A launched step: `result()` waits for its sampled tokens (once) and returns the StepResult."""

    def __init__(self, done: StepResult | None, plan: StepPlan | None = None,
                 finish: PendingSample | None = None,
                 prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]], ...] = ()) -> None:
        self._done, self._plan, self._finish, self._prompt_logprobs = done, plan, finish, prompt_logprobs

    def draw(self) -> None:
        """Launch the step's draw if the sampler held it back (its constrained rows' masks)."""
        if self._finish is not None:
            self._finish.draw()

    def result(self) -> StepResult:
        if self._done is None:
            plan = self._plan
            self._done = StepResult(step_idx=plan.step_idx, sampled=self._finish(),
                                    prompt_logprobs=self._prompt_logprobs, num_forward_tokens=plan.num_tokens)
        return self._done


def _flashinfer_device(spec: ModelSpec) -> bool:
    """CUDA in bf16/fp16 with flashinfer importable (imported only here and only for CUDA, so CPU
    installs never need it)."""
    if spec.device.type != "cuda" or spec.dtype not in (torch.bfloat16, torch.float16):
        return False
    try:
        import flashinfer  # noqa: F401
    except ImportError:
        return False
    return True


def select_backend(cache: KVCache, num_heads: int, config: AttentionConfig = DEFAULT_ATTENTION) -> AttentionBackend:
    """FlashInfer on a CUDA cache in bf16/fp16 when flashinfer imports; the torch reference otherwise.
    Either attends prefix groups by parts when config.hydragen says so."""
    if cache.device.type == "cuda" and cache.dtype in (torch.bfloat16, torch.float16):
        try:
            from tokabatch.engine.runtime.flashinfer_backend import FlashInferBackend
        except ImportError:
            return TorchBackend(cache, use_hydragen=config.hydragen)
        return FlashInferBackend(cache, num_heads, config)
    return TorchBackend(cache, use_hydragen=config.hydragen)


def _fused_draw(spec: ModelSpec) -> Draw:
    """The sampler's fused draw: the one-pass inverse-CDF Triton draw (triton_draw.py) where triton imports and
    its kernel compiles and runs here (tried once on a row of zeros, which also compiles it), else
    flashinfer's (flashinfer_kernels.py), which converts the logits to float32 first."""
    from tokabatch.engine.runtime.flashinfer_kernels import draw_from_logits as flashinfer_draw
    try:
        from tokabatch.engine.runtime.triton_draw import draw_from_logits
        row = torch.zeros(1, spec.vocab_size, dtype=spec.dtype, device=spec.device)
        draw_from_logits(row, 1.0, torch.Generator(device=spec.device))
    except Exception as exc:              # (no triton, or its compiler failed on this machine)
        log.warning("the sampler draws with flashinfer's kernel: the Triton draw is unavailable (%s: %s)",
                    type(exc).__name__, exc)
        return flashinfer_draw
    return draw_from_logits


def build_runners(path: str | Path, *, dtype: str = "auto", device: str = "auto", page_size: int = 16,
                  kv_cache_tokens: int | None = None, kv_memory_fraction: float = 0.9,
                  seed: int | None = None, attention: AttentionConfig = DEFAULT_ATTENTION,
                  max_decode_batch: int = 256, parts: int = 1, fused_kernels: bool = False) -> list[ModelRunner]:
    """Model folder -> `parts` ready ModelRunners over one copy of the weights, each with its own
    slice of the KV cache (its `kv_cache.num_pages` is what its scheduler's pool must be sized to),
    sampler, `select_backend`'s backend and CUDA graphs. GPU sizing uses free memory after loading.

    `attention` fixes how steps attend (attention.AttentionConfig). On CUDA with flashinfer: a warm-up
    step compiles the attention kernels, then (with attention.cuda_graphs) decode steps of
    1..`max_decode_batch` rows are captured as CUDA graphs, per runner, and with attention.hydragen
    their grouped twins (hydragen_graphs.py); with `fused_kernels` the model's
    elementwise work runs on flashinfer's fused kernels (flashinfer_kernels.py) and the samplers' draw on
    `_fused_draw`'s."""
    model, spec = load_model(path, dtype=dtype, device=device)
    if spec.device.type == "cuda":
        torch.set_num_threads(CUDA_HOST_THREADS)
    draw = None
    if fused_kernels and _flashinfer_device(spec):
        from tokabatch.engine.runtime.flashinfer_kernels import FlashInferLayerKernels

        model.use_kernels(FlashInferLayerKernels(model.rotary, spec.max_position_embeddings, spec.device))
        draw = _fused_draw(spec)
    num_pages = choose_num_pages(spec, page_size, kv_cache_tokens, kv_memory_fraction)
    if parts == 1:
        caches = [KVCache(spec, num_pages=num_pages, page_size=page_size, reserved_pages=1)]
    else:
        caches = KVCache(spec, num_pages=num_pages, page_size=page_size).split(parts)
    runners = []
    for i, cache in enumerate(caches):
        sampler = Sampler(spec.vocab_size, spec.device, spec.eos_token_ids, seed=None if seed is None else seed + i,
                          draw=draw)
        backend = select_backend(cache, spec.num_heads, attention)
        runner = ModelRunner(model, spec, cache, backend, sampler)
        if getattr(backend, "name", "") == "flashinfer":
            runner.warm_up()
            if attention.cuda_graphs:
                from tokabatch.engine.runtime.cuda_graphs import DecodeGraphs   # CUDA + flashinfer only
                runner.graphs = DecodeGraphs(model, cache, spec.num_heads, max_decode_batch, config=attention)
                runner.graphs.capture()
                if attention.hydragen:
                    from tokabatch.engine.runtime.hydragen_graphs import GroupedDecodeGraphs

                    runner.grouped_graphs = GroupedDecodeGraphs(runner.graphs)
                    runner.grouped_graphs.capture()
        runners.append(runner)
    return runners


def build_runner(path: str | Path, **kwargs: Any) -> ModelRunner:
    """One ModelRunner (`build_runners` with parts=1)."""
    return build_runners(path, **kwargs)[0]
