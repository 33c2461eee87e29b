"""ModelRunner: StepPlans through the paged model reproduce HF greedy decoding, logprobs and prompt logprobs."""

from __future__ import annotations

import random

import pytest
import torch

from tests.engine.runtime.conftest import DEVICES, hf_logits
from tokabatch.engine.api import SamplingParams
from tokabatch.engine.core.plan import SeqWork, StepPlan
from tokabatch.engine.runtime.runner import ModelRunner, build_runner

GREEDY = SamplingParams(temperature=0.0, max_tokens=12)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 256) for _ in range(n)]


def hf_greedy(hf, prompt: list[int], num_tokens: int) -> list[int]:
    """Reference greedy continuation: full forward, argmax, append (slow, obviously right)."""
    ids = list(prompt)
    for _ in range(num_tokens):
        ids.append(int(hf_logits(hf, ids)[-1].argmax()))
    return ids[len(prompt):]


class MiniLoop:
    """Just enough of a scheduler: pages handed out in a scrambled order, prefill chunks within a
    token budget (several per step), then one decode per running sequence, all mixed in one step."""

    def __init__(self, runner: ModelRunner, prompts: list[list[int]], params: SamplingParams,
                 budget: int = 24) -> None:
        self.runner, self.budget = runner, budget
        self.tokens = [list(p) for p in prompts]
        self.prompt_lens = [len(p) for p in prompts]
        self.done = [0] * len(prompts)               # positions whose KV is in the cache
        self.outputs: list[list[int]] = [[] for _ in prompts]
        self.free = list(range(runner.kv_cache.num_pages))
        random.Random(7).shuffle(self.free)
        self.pages: list[list[int]] = [[] for _ in prompts]
        for seq_id, p in enumerate(prompts):
            runner.sampler.register(seq_id, params, p)
        self.params, self.step_idx = params, 0

    def _pages_for(self, i: int, length: int) -> tuple[int, ...]:
        ps = self.runner.kv_cache.page_size
        while len(self.pages[i]) * ps < length:
            self.pages[i].append(self.free.pop())
        return tuple(self.pages[i])

    def step(self):
        decodes, prefills, budget = [], [], self.budget
        for i, toks in enumerate(self.tokens):
            if len(self.outputs[i]) >= self.params.max_tokens:
                continue
            if self.done[i] >= self.prompt_lens[i]:           # decoding: feed the last sampled token
                pos = len(toks) - 1
                decodes.append(SeqWork(i, (toks[pos],), pos, self._pages_for(i, pos + 1), sample=True))
            elif budget > 0:
                n = min(budget, self.prompt_lens[i] - self.done[i])
                start, budget = self.done[i], budget - n
                ends = start + n == self.prompt_lens[i]
                prefills.append(SeqWork(i, tuple(toks[start:start + n]), start, self._pages_for(i, start + n),
                                        sample=ends))
        plan = StepPlan(self.step_idx, tuple(decodes), tuple(prefills))
        self.step_idx += 1
        result = self.runner.execute(plan)
        assert result.num_forward_tokens == plan.num_tokens
        assert [s.seq_id for s in result.sampled] == [w.seq_id for w in plan.works if w.sample]
        for w in plan.works:
            self.done[w.seq_id] = w.start_pos + w.num_tokens
        for s in result.sampled:
            self.tokens[s.seq_id].append(s.token_id)
            self.outputs[s.seq_id].append(s.token_id)
        return plan, result

    def run(self) -> list[list[int]]:
        while any(len(o) < self.params.max_tokens for o in self.outputs):
            self.step()
        return self.outputs


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_batch_matches_hf(hf_checkpoint, device):
    hf, folder = hf_checkpoint("llama", tie_word_embeddings=True)
    runner = build_runner(folder, dtype="float32", device=device, page_size=16, kv_cache_tokens=1024)
    prompts = [_prompt(n, n) for n in (17, 37, 16, 5, 32)]
    outputs = MiniLoop(runner, prompts, GREEDY).run()
    for prompt, out in zip(prompts, outputs):
        assert out == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_qwen2_greedy_alone_and_batched_agree(hf_checkpoint):
    hf, folder = hf_checkpoint("qwen2")
    prompts = [_prompt(n, 100 + n) for n in (21, 9, 33)]
    batched = MiniLoop(build_runner(folder, dtype="float32", device="cpu", kv_cache_tokens=512),
                       prompts, GREEDY, budget=16).run()
    for prompt, out in zip(prompts, batched):
        alone = MiniLoop(build_runner(folder, dtype="float32", device="cpu", kv_cache_tokens=512),
                         [prompt], GREEDY, budget=64).run()[0]
        assert out == alone == hf_greedy(hf, prompt, GREEDY.max_tokens)


def test_logprobs_are_log_softmax_of_hf_logits(hf_checkpoint):
    hf, folder = hf_checkpoint("llama")
    runner = build_runner(folder, dtype="float32", device="cpu", kv_cache_tokens=256)
    params = SamplingParams(temperature=0.0, max_tokens=3, logprobs=4)
    prompt = _prompt(19, 3)
    loop = MiniLoop(runner, [prompt], params, budget=64)
    for _ in range(3):
        _, result = loop.step()
        (sampled,) = result.sampled
        ref = torch.log_softmax(hf_logits(hf, loop.tokens[0][:-1])[-1], dim=-1)
        lp = sampled.logprob
        assert lp.token_id == sampled.token_id == int(ref.argmax())
        assert abs(lp.logprob - ref[lp.token_id].item()) < 1e-4
        top_ids = [t for t, _ in lp.top]
        assert len(top_ids) == 4 and top_ids == ref.topk(4).indices.tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_prompt_logprobs_over_chunks(hf_checkpoint, device):
    """Echo scoring: each chunk row scores the next prompt token; the last chunk is one target short."""
    hf, folder = hf_checkpoint("qwen2", tie_word_embeddings=True)
    runner = build_runner(folder, dtype="float32", device=device, kv_cache_tokens=256)
    prompt = _prompt(37, 9)
    runner.sampler.register(0, SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=2), prompt)
    pages = (5, 1, 9)
    scored = []
    for start, n in ((0, 16), (16, 17), (33, 4)):
        targets = tuple(prompt[start + 1:start + n + 1])               # shorter by one at the end
        work = SeqWork(0, tuple(prompt[start:start + n]), start, pages[:-(-(start + n) // 16)], sample=False,
                       prompt_logprobs=2, prompt_logprob_targets=targets)
        result = runner.execute(StepPlan(start, decodes=(), prefills=(work,)))
        assert result.sampled == () and result.num_forward_tokens == n
        ((seq_id, entries),) = result.prompt_logprobs
        assert seq_id == 0 and len(entries) == len(targets)
        scored.extend(entries)
    ref = torch.log_softmax(hf_logits(hf, prompt), dim=-1)
    assert [e.token_id for e in scored] == prompt[1:]
    for pos, entry in enumerate(scored):
        assert abs(entry.logprob - ref[pos, prompt[pos + 1]].item()) < 1e-4
        assert [t for t, _ in entry.top] == ref[pos].topk(2).indices.tolist()


def test_empty_plan_and_no_sampling(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    runner = build_runner(folder, dtype="float32", device="cpu", kv_cache_tokens=64)
    assert runner.kv_cache.num_pages == 4
    empty = runner.execute(StepPlan(0, (), ()))
    assert empty.sampled == () and empty.num_forward_tokens == 0
    work = SeqWork(3, tuple(range(10, 30)), 0, (2, 0), sample=False)
    result = runner.execute(StepPlan(1, (), (work,)))
    assert result.sampled == () and result.prompt_logprobs == () and result.num_forward_tokens == 20
    assert runner.kv_cache.k[0][2].abs().sum() > 0 and runner.kv_cache.k[0][1].abs().sum() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_a_kv_cached_rerun_reads_the_cached_page_and_writes_only_the_scratch_page(hf_checkpoint, device):
    """A whole-prompt cache hit reruns its last token only to sample (SeqWork.kv_cached): it samples
    what the prefill that cached its pages sampled, and its KV write goes to the scratch page, so
    the shared pages other sequences read are never written."""
    hf, folder = hf_checkpoint("llama")
    runner = build_runner(folder, dtype="float32", device=device, kv_cache_tokens=64)
    cache = runner.kv_cache
    assert cache.page_size == 16 and cache.scratch_page is not None
    ids = _prompt(32, 5)                               # two full pages: 2 and 0
    for seq_id in (0, 1):
        runner.sampler.register(seq_id, GREEDY, ids)
    first = runner.execute(StepPlan(0, (), (SeqWork(0, tuple(ids), 0, (2, 0), sample=True),)))
    layers = range(len(cache.k))
    cached = [(cache.k[i][[2, 0]].clone(), cache.v[i][[2, 0]].clone()) for i in layers]
    scratch = [cache.k[i][cache.scratch_page].clone() for i in layers]
    rerun = SeqWork(1, (ids[-1],), 31, (2, 0), sample=True, kv_cached=True)
    again = runner.execute(StepPlan(1, (), (rerun,)))
    assert again.sampled[0].token_id == first.sampled[0].token_id == hf_greedy(hf, ids, 1)[0]
    for i in layers:
        assert torch.equal(cache.k[i][[2, 0]], cached[i][0]) and torch.equal(cache.v[i][[2, 0]], cached[i][1])
    assert any(not torch.equal(cache.k[i][cache.scratch_page], scratch[i]) for i in layers)


def test_the_fused_draw_falls_back_to_flashinfers_where_the_triton_draw_fails(monkeypatch, caplog):
    """runner._fused_draw tries the Triton draw once on the model's device (compiling it); where
    triton is missing or its kernel fails there, the sampler draws with flashinfer's kernel."""
    import sys
    import types

    from tokabatch.engine.runtime import runner as runner_module

    def fake(name, draw):
        module = types.ModuleType(name)
        module.draw_from_logits = draw
        monkeypatch.setitem(sys.modules, name, module)
        return draw

    flashinfer_draw = fake("tokabatch.engine.runtime.flashinfer_kernels", lambda *a: None)
    tried = []
    triton_draw = fake("tokabatch.engine.runtime.triton_draw", lambda logits, t, g: tried.append(logits.shape))
    spec = types.SimpleNamespace(vocab_size=50, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert runner_module._fused_draw(spec) is triton_draw and tried == [(1, 50)]

    def failing(logits, t, g):
        raise RuntimeError("no compiler here")

    fake("tokabatch.engine.runtime.triton_draw", failing)
    with caplog.at_level("WARNING"):
        assert runner_module._fused_draw(spec) is flashinfer_draw
    assert "no compiler here" in caplog.text
    monkeypatch.setitem(sys.modules, "tokabatch.engine.runtime.triton_draw", None)     # import fails
    assert runner_module._fused_draw(spec) is flashinfer_draw


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("prompt_lens, budget", [((40, 17, 64, 9), 24), ((1024,) * 12, 8192)],
                         ids=["short-steps", "8192-token-steps"])
def test_a_step_is_launched_without_waiting_for_the_work_queued_before_it(tmp_path, prompt_lens, budget):
    """The pipelined loop launches one half's step while the other half's runs. A launch that waits
    for the GPU (a host sync, a large copy from pageable memory, a planner reading device memory)
    serializes the halves. Behind a long spinning kernel, each kind of step (prompt chunks only,
    decodes mixed with chunks, decodes only: CUDA graphs) must return from `launch` with that
    work still queued; also at TA's 8,192 prompt tokens a step, whose host arrays are large enough
    for CUDA to stage a pageable copy by waiting. To find a culprit:
    torch.cuda.set_sync_debug_mode("warn") around `launch`."""
    pytest.importorskip("flashinfer")
    from tokabatch.engine.random_models import build_folder

    build_folder("Llama-3.2-1B", tmp_path, num_layers=2)
    runner = build_runner(tmp_path, dtype="bfloat16", device="cuda", page_size=16,
                          kv_cache_tokens=max(4096, 2 * sum(prompt_lens)), fused_kernels=True)
    prompts, params = [_prompt(n, n + i) for i, n in enumerate(prompt_lens)], SamplingParams(temperature=0.0,
                                                                                             max_tokens=4)
    MiniLoop(runner, prompts, params, budget).run()       # every kind of step once: nothing compiles below
    for seq_id in range(len(prompts)):
        runner.sampler.release(seq_id)
    loop = MiniLoop(runner, prompts, params, budget)
    stream, waited = torch.cuda.current_stream(), {}
    real_launch = runner.launch

    def launch_behind_queued_work(plan: StepPlan):
        kind = "decode" if not plan.prefills else "mixed" if plan.decodes else "prefill"
        torch.cuda._sleep(1_000_000_000)                  # ~0.5 s of a spinning kernel at ~2 GHz
        pending = real_launch(plan)
        waited.setdefault(kind, []).append(stream.query())
        return pending

    runner.launch = launch_behind_queued_work
    loop.run()
    assert set(waited) == {"prefill", "mixed", "decode"}
    assert not any(any(w) for w in waited.values()), f"launches that waited for the queued work: {waited}"
