"""EngineLoop on a tiny random Llama: HF-exact greedy, stops, n > 1, prefix cache, seeds, echo, client wiring."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from tokabatch import errors
from tokabatch.config import EngineConfig, ModelConfig, SchedulerConfig
from tokabatch.engine.api import FinishReason, GenerationOutput, GenerationRequest, GenerationUpdate, SamplingParams
from tokabatch.engine.client import EngineClient, LoopSpec
from tokabatch.engine.api import RequestRejected
from tokabatch.engine.runtime.factory import build_loop
from tokabatch.engine.runtime.loop import EngineLoop, StepOutOfMemory

pytestmark = pytest.mark.timeout(300)

EOS = 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what a byte-level BPE vocabulary is written in)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def write_byte_tokenizer(folder: Path) -> None:
    """A byte-level tokenizer whose 256 ids are the 256 bytes: any id sequence decodes, like a real BPE."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": False}))


@pytest.fixture
def tiny(hf_checkpoint):
    """(hf_model, folder) of a tiny random Llama with a byte tokenizer; EOS is token 2."""
    model, folder = hf_checkpoint("llama", seed=3)
    write_byte_tokenizer(folder)
    return model, folder


def make_loop(folder: Path, *, page_size: int = 4, max_tokens_per_step: int = 64, prefix_cache: bool = True,
              max_seqs: int = 256) -> EngineLoop:
    config = EngineConfig(
        model=ModelConfig(path=str(folder), dtype="float32", device="cpu"),
        scheduler=SchedulerConfig(page_size=page_size, max_tokens_per_step=max_tokens_per_step,
                                  enable_prefix_cache=prefix_cache, max_seqs=max_seqs),
        kv_cache_tokens=4096)
    return build_loop(config, check_invariants=True)


def run(loop: EngineLoop, requests: list[GenerationRequest], max_steps: int = 5000) -> dict[str, GenerationOutput]:
    for r in requests:
        loop.add(r)
    return drain(loop, max_steps)


def drain(loop: EngineLoop, max_steps: int = 5000) -> dict[str, GenerationOutput]:
    outputs: dict[str, GenerationOutput] = {}
    for _ in range(max_steps):
        if not loop.has_work():
            return outputs
        for item in loop.step():
            if isinstance(item, GenerationOutput):
                assert item.request_id not in outputs
                outputs[item.request_id] = item
    raise AssertionError("the loop did not finish")


def prompt(seed: int, length: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.randrange(3, 256) for _ in range(length))


def greedy(rid: str, ids: tuple[int, ...], max_tokens: int, **kw) -> GenerationRequest:
    n = kw.pop("n", 1)
    return GenerationRequest(rid, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw), n=n)


def hf_greedy(model, ids: tuple[int, ...], max_tokens: int, eos: int = EOS) -> tuple[int, ...]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=0)
    return tuple(out[0, len(ids):].tolist())


def test_greedy_batch_equals_hf_generate(tiny) -> None:
    model, folder = tiny
    loop = make_loop(folder)
    lengths = [17, 37, 4, 16, 33, 1, 9]
    requests = [greedy(f"r{i}", prompt(i, n), 20) for i, n in enumerate(lengths)]
    outputs = run(loop, requests)
    for r in requests:
        out = outputs[r.request_id]
        expected = hf_greedy(model, r.prompt_token_ids, 20)
        choice = out.choices[0]
        assert choice.token_ids == expected, r.request_id
        assert choice.finish_reason is (FinishReason.STOP if expected[-1] == EOS else FinishReason.LENGTH)
        body = choice.token_ids[:-1] if choice.finish_reason is FinishReason.STOP else choice.token_ids
        assert choice.text == loop.tokenizer.decode(body)
        assert out.num_prompt_tokens == len(r.prompt_token_ids) and out.num_completion_tokens == len(expected)
    stats = loop.stats()
    assert stats.num_requests_finished == len(requests)
    assert stats.num_generated_tokens == sum(o.num_completion_tokens for o in outputs.values())
    assert stats.num_forward_tokens > 0 and stats.num_steps > 0


def short_of_memory_over(loop: EngineLoop, monkeypatch, max_tokens: int, message: str) -> None:
    """Make the loop's forward pass raise CUDA's out-of-memory error, as CUDA would, for steps over
    `max_tokens` tokens (-1: every step)."""
    forward = loop.runner.model.forward

    def short_of_memory(input_ids, *args, **kwargs):
        if input_ids.numel() > max_tokens:
            raise torch.cuda.OutOfMemoryError(message)
        return forward(input_ids, *args, **kwargs)

    monkeypatch.setattr(loop.runner.model, "forward", short_of_memory)


def test_a_step_out_of_device_memory_is_planned_again_with_half_the_tokens(tiny, monkeypatch, caplog) -> None:
    """A forward pass that runs out of memory (raised here for steps over 24 tokens, as CUDA
    would) loses nothing: the scheduler's tokens per step halve (64 -> 32 -> 16) and every output
    still equals HF's."""
    model, folder = tiny
    loop = make_loop(folder, max_seqs=8)
    short_of_memory_over(loop, monkeypatch, 24, "CUDA out of memory. Tried to allocate 2.00 GiB.\nmore")
    requests = [greedy(f"r{i}", prompt(i, n), 12) for i, n in enumerate([17, 37, 9])]
    with caplog.at_level("WARNING", logger="tokabatch.engine.runtime.loop"):
        outputs = run(loop, requests)
    for r in requests:
        assert outputs[r.request_id].choices[0].token_ids == hf_greedy(model, r.prompt_token_ids, 12), r.request_id
    assert (loop.scheduler.max_tokens_per_step, loop.scheduler.max_running) == (16, 8)
    assert "ran out of device memory (CUDA out of memory. Tried to allocate 2.00 GiB.)" in caplog.text


def test_where_the_decodes_alone_do_not_fit_fewer_sequences_run_at_once(tiny, monkeypatch, caplog) -> None:
    """Steps over 2 tokens run out of memory while 5 sequences decode: the tokens per step halve
    down to max_running (8), then both halve (4, then 2), the newest sequences preempted and run
    again later, and every output still equals HF's. Where not even one token fits, the error is raised."""
    model, folder = tiny
    loop = make_loop(folder, max_seqs=8)
    short_of_memory_over(loop, monkeypatch, 2, "CUDA out of memory.")
    requests = [greedy(f"r{i}", prompt(i, n), 6) for i, n in enumerate([5, 9, 3, 7, 4])]
    with caplog.at_level("WARNING", logger="tokabatch.engine.runtime.loop"):
        outputs = run(loop, requests)
    for r in requests:
        assert outputs[r.request_id].choices[0].token_ids == hf_greedy(model, r.prompt_token_ids, 6), r.request_id
    assert (loop.scheduler.max_tokens_per_step, loop.scheduler.max_running) == (2, 2)
    assert "sequences (" in caplog.text and loop.scheduler.num_preemptions > 0
    loop.scheduler.check_invariants()

    short_of_memory_over(loop, monkeypatch, -1, "CUDA out of memory.")
    loop.add(greedy("r9", prompt(9, 5), 4))
    with pytest.raises(StepOutOfMemory, match="CUDA out of memory"):
        drain(loop)
    assert (loop.scheduler.max_tokens_per_step, loop.scheduler.max_running) == (1, 1)


def test_texts_of_a_wave_of_ended_requests_follow_over_later_steps(tiny, monkeypatch) -> None:
    # Requests ending in one step while others still run: their pages and sequences are released at
    # once, their texts made a budget of ids per step (here 1: one request per step), the same texts.
    _, folder = tiny
    short = [greedy(f"s{i}", prompt(i, 8), 6, ignore_eos=True) for i in range(5)]
    long = greedy("long", prompt(9, 8), 40, ignore_eos=True)
    texts = {rid: out.choices[0].text for rid, out in run(make_loop(folder), [*short, long]).items()}
    monkeypatch.setattr(EngineLoop, "TEXT_TOKENS_PER_STEP", 1)
    loop = make_loop(folder)
    for r in [*short, long]:
        loop.add(r)
    seen: dict[str, int] = {}
    step = 0
    while loop.has_work():
        step += 1
        for item in loop.step():
            if isinstance(item, GenerationOutput):
                seen[item.request_id] = step
                assert item.choices[0].text == texts[item.request_id], item.request_id
        if step == 8:
            assert loop.scheduler.num_running == 1       # the short ones ended together, their text still to come
    assert sorted(seen[r.request_id] for r in short) == list(range(seen["s0"], seen["s0"] + 5))
    assert seen["long"] > seen["s4"] and loop.stats().num_requests_finished == 6


def test_eos_ends_a_choice_like_hf(hf_checkpoint) -> None:
    # With this seed, greedy decoding of prompt(5, 1) emits token 118 as its 7th token: make it EOS.
    model, folder = hf_checkpoint("llama", seed=3, eos_token_id=118)
    write_byte_tokenizer(folder)
    loop = make_loop(folder)
    assert loop.info.eos_token_ids == (118,)
    requests = [greedy(f"r{i}", prompt(i, n), 20) for i, n in enumerate([17, 37, 4, 16, 33, 1])]
    requests.append(greedy("ignore", prompt(5, 1), 20, ignore_eos=True))
    outputs = run(loop, requests)
    stopped = 0
    for r in requests[:-1]:
        expected = hf_greedy(model, r.prompt_token_ids, 20, eos=118)
        choice = outputs[r.request_id].choices[0]
        assert choice.token_ids == expected
        if expected[-1] == 118:
            stopped += 1
            assert choice.finish_reason is FinishReason.STOP and choice.stop_reason is None
            assert choice.text == loop.tokenizer.decode(expected[:-1])
    assert stopped >= 1
    assert len(outputs["ignore"].choices[0].token_ids) == 20


def test_stop_strings_stop_token_ids_and_min_tokens(tiny) -> None:
    _, folder = tiny
    loop = make_loop(folder)
    ids = prompt(11, 21)
    full = run(loop, [greedy("full", ids, 40, ignore_eos=True)])["full"].choices[0]
    assert len(full.token_ids) == 40
    text = full.text
    start = next(i for i in range(5, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text.find(text[i:i + 3]) == i)
    stop = text[start:start + 3]
    out = run(loop, [greedy("cut", ids, 40, ignore_eos=True, stop=(stop,)),
                     greedy("keep", ids, 40, ignore_eos=True, stop=(stop,), include_stop_str_in_output=True)])
    assert out["cut"].choices[0].text == text[:start]
    assert out["cut"].choices[0].finish_reason is FinishReason.STOP and out["cut"].choices[0].stop_reason == stop
    assert out["keep"].choices[0].text == text[:start + 3]
    assert len(out["cut"].choices[0].token_ids) < 40

    stop_token = full.token_ids[6]
    first = full.token_ids.index(stop_token)
    out = run(loop, [greedy("tok", ids, 40, ignore_eos=True, stop_token_ids=(stop_token,)),
                     greedy("min", ids, 40, ignore_eos=True, stop_token_ids=(stop_token,), min_tokens=first + 2)])
    assert out["tok"].choices[0].token_ids == full.token_ids[:first + 1]
    assert out["tok"].choices[0].stop_reason == stop_token
    assert len(out["min"].choices[0].token_ids) >= first + 2   # the masked stop token was not sampled early


def test_n_choices_share_the_prompt_and_seeds_reproduce(tiny) -> None:
    model, folder = tiny
    loop = make_loop(folder)
    ids = prompt(5, 23)
    out = run(loop, [greedy("g", ids, 12, n=3)])["g"]
    expected = hf_greedy(model, ids, 12)
    assert [c.index for c in out.choices] == [0, 1, 2]
    assert all(c.token_ids == expected for c in out.choices)

    seeded = GenerationRequest("s", ids, SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234,
                                                        ignore_eos=True), n=3)
    alone = run(loop, [seeded])["s"]
    companions = [GenerationRequest(f"c{i}", prompt(100 + i, 7 + 5 * i), SamplingParams(max_tokens=10 + i))
                  for i in range(4)]
    crowded = run(make_loop(folder, page_size=8), companions[:2] + [seeded] + companions[2:])["s"]
    assert [c.token_ids for c in alone.choices] == [c.token_ids for c in crowded.choices]
    assert len({c.token_ids for c in alone.choices}) > 1   # the n choices draw differently


def test_choices_ending_at_different_steps_give_one_output_after_the_last(tiny) -> None:
    """A request that is not streamed emits nothing until its last choice ends, then all of it once."""
    _, folder = tiny
    ids = prompt(5, 23)
    params = dict(max_tokens=16, temperature=0.9, seed=1234, ignore_eos=True)
    free = run(make_loop(folder), [GenerationRequest("s", ids, SamplingParams(**params), n=3)])["s"]
    stop = free.choices[0].token_ids[3]          # choice 0 ends at its 4th token, the others later or not
    loop = make_loop(folder)
    loop.add(GenerationRequest("s", ids, SamplingParams(**params, stop_token_ids=(stop,)), n=3))
    items = []
    while loop.has_work():
        items.extend(loop.step())
    assert [type(i) for i in items] == [GenerationOutput]
    out = items[0]
    for got, whole in zip(out.choices, free.choices):
        ends = whole.token_ids.index(stop) + 1 if stop in whole.token_ids else len(whole.token_ids)
        assert got.token_ids == whole.token_ids[:ends]
        assert got.finish_reason is (FinishReason.STOP if stop in whole.token_ids else FinishReason.LENGTH)
    assert len(out.choices[0].token_ids) == 4
    assert any(len(c.token_ids) > 4 for c in out.choices[1:])   # they did end at different steps


def test_prefix_cache_skips_shared_pages_with_identical_outputs(tiny) -> None:
    _, folder = tiny
    shared = prompt(7, 40)
    requests = [greedy(f"p{i}", shared + prompt(50 + i, 5), 8) for i in range(6)]
    results = {}
    for cache in (False, True):
        loop = make_loop(folder, prefix_cache=cache)
        outputs = run(loop, requests[:1])           # the first one publishes the shared pages
        outputs.update(run(loop, requests[1:]))
        results[cache] = (outputs, loop.stats().num_forward_tokens)
    (off, forward_off), (on, forward_on) = results[False], results[True]
    for r in requests:
        assert on[r.request_id].choices == off[r.request_id].choices
    assert all(on[f"p{i}"].num_cached_tokens == 40 for i in range(1, 6))   # 10 full pages of 4
    assert all(o.num_cached_tokens == 0 for o in off.values())
    assert forward_off - forward_on == 5 * 40


def test_logprobs_echo_streaming_and_abort(tiny) -> None:
    model, folder = tiny
    loop = make_loop(folder)
    ids = prompt(9, 19)
    echo = GenerationRequest("echo", ids, SamplingParams(max_tokens=0, prompt_logprobs=2, temperature=0.0))
    lp = GenerationRequest("lp", ids, SamplingParams(max_tokens=3, logprobs=3, temperature=0.0))
    streamed = GenerationRequest("st", ids, SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True), stream=True)
    loop.add(echo)
    loop.add(lp)
    loop.add(streamed)
    updates, outputs = [], {}
    while loop.has_work():
        for item in loop.step():
            if isinstance(item, GenerationUpdate):
                updates.append(item)
            else:
                outputs[item.request_id] = item
    reference = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    pl = outputs["echo"].prompt_logprobs
    assert pl[0] is None and len(pl) == len(ids) and outputs["echo"].num_completion_tokens == 0
    for pos in range(1, len(ids)):
        assert pl[pos].token_id == ids[pos]
        assert abs(pl[pos].logprob - reference[pos - 1, ids[pos]].item()) < 1e-4
        assert len(pl[pos].top) == 2
    first = outputs["lp"].choices[0].logprobs[0]
    assert first.token_id == outputs["lp"].choices[0].token_ids[0] and len(first.top) == 3
    assert abs(first.logprob - reference[-1].max().item()) < 1e-4
    assert "".join(d.text for u in updates for d in u.deltas) == outputs["st"].choices[0].text
    assert sum(len(d.token_ids) for u in updates for d in u.deltas) == 9
    assert updates[-1].deltas[0].finish_reason is FinishReason.LENGTH

    loop.add(greedy("long", ids, 200, ignore_eos=True))
    for _ in range(3):
        loop.step()
    loop.abort("long")
    aborted = drain(loop)["long"]
    assert aborted.aborted and not loop.has_work()
    assert loop.scheduler.num_running == 0 and loop.scheduler.num_free_pages == loop.scheduler.num_pages - \
        loop.scheduler.num_cached_pages


def test_rejected_requests(tiny) -> None:
    _, folder = tiny
    loop = make_loop(folder)
    with pytest.raises(RequestRejected) as info:
        loop.add(greedy("long", prompt(1, 512), 1))
    assert info.value.error.code == "context_length_exceeded"
    with pytest.raises(ValueError):
        loop.add(greedy("bad", (3, 999), 1))
    with pytest.raises(ValueError):
        loop.add(GenerationRequest("bias", (3, 4), SamplingParams(logit_bias=((300, 1.0),))))
    out = run(loop, [greedy("ok", (3, 4), 2)])
    assert out["ok"].ok and not loop.has_work()


async def test_engine_client_runs_the_real_loop(tiny) -> None:
    model, folder = tiny
    config = EngineConfig(model=ModelConfig(path=str(folder), dtype="float32", device="cpu"), kv_cache_tokens=1024)
    engine = await EngineClient.from_config(config, in_process=True)
    try:
        assert engine.info.vocab_size == 256 and engine.info.context_length == 512
        ids = prompt(3, 13)
        items = [i async for i in engine.submit(greedy("x", ids, 10))]
        assert items[-1].choices[0].token_ids == hf_greedy(model, ids, 10)
    finally:
        await engine.close()
    with pytest.raises(errors.ModelLoadError):
        await EngineClient.start(LoopSpec("tokabatch.engine.runtime.factory:build_loop",
                                          {"engine_config": EngineConfig(
                                              model=ModelConfig(path=str(folder / "nope")))}))
