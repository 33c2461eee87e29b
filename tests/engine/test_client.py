"""EngineClient over FakeLoop: routing, back-pressure, abort, streaming, errors, engine death, no torch."""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap

import pytest

from tokabatch import errors
from tokabatch.engine.api import (
    Engine,
    FinishReason,
    GenerationOutput,
    GenerationRequest,
    GenerationUpdate,
    Priority,
    SamplingParams,
)
from tokabatch.engine.client import EngineClient
from tokabatch.engine.loop_protocol import LoopSpec
from tests.subprocess_util import run_python
from tokabatch.engine.testing import FAKE_FACTORY, FakeEngine, FakeLoop, fake_text, fake_token_ids

pytestmark = pytest.mark.timeout(60)


def req(rid: str, prompt: tuple[int, ...] = (1, 2, 3), max_tokens: int = 5, **kw) -> GenerationRequest:
    sampling = SamplingParams(**{"max_tokens": max_tokens, "temperature": 0.0,
                                 **{k: v for k, v in kw.items() if k not in ("n", "stream", "priority")}})
    extra = {k: kw[k] for k in ("n", "stream", "priority") if k in kw}
    return GenerationRequest(rid, prompt, sampling, **extra)


async def source(requests: list[GenerationRequest], pulled: list[str] | None = None):
    for r in requests:
        if pulled is not None:
            pulled.append(r.request_id)
        yield r


async def collect(engine: EngineClient, requests: list[GenerationRequest]) -> dict[str, GenerationOutput]:
    return {o.request_id: o async for o in engine.generate(source(requests))}


@pytest.fixture
async def fake():
    engine = await FakeEngine.launch(max_running=3, max_waiting=2)
    yield engine
    await engine.close()


async def test_outputs_are_routed_and_match_the_fake_model(fake: FakeEngine) -> None:
    assert isinstance(fake, Engine)
    requests = [req(f"r{i}", prompt=(i, 7, i * 3), max_tokens=1 + i % 7) for i in range(17)]
    outputs = await collect(fake, requests)
    assert set(outputs) == {r.request_id for r in requests}
    for r in requests:
        out = outputs[r.request_id]
        expected = fake_token_ids(r.prompt_token_ids, r.sampling.max_tokens)
        assert out.ok and out.choices[0].token_ids == tuple(expected)
        assert out.choices[0].text == fake_text(expected)
        assert out.choices[0].finish_reason is FinishReason.LENGTH
        assert out.num_prompt_tokens == 3 and out.num_completion_tokens == len(expected)
    assert all(count == 1 for count in fake.executions.values())
    assert fake.stats().num_requests_finished == 17


async def test_back_pressure_never_overfills_the_engine() -> None:
    engine = await FakeEngine.launch(max_running=2, max_waiting=1, token_interval_s=0.002)
    try:
        pulled: list[str] = []
        requests = [req(f"r{i}", max_tokens=4) for i in range(40)]
        pulled_at_first_output = None
        seen = 0
        async for _ in engine.generate(source(requests, pulled)):
            seen += 1
            if pulled_at_first_output is None:
                pulled_at_first_output = len(pulled)
        assert seen == 40
        assert engine.loop.max_batch_requests_held <= 3
        # 3 credits, plus the ones freed by the report that carried the first output (both running requests)
        assert pulled_at_first_output is not None and pulled_at_first_output <= 5
    finally:
        await engine.close()


async def test_concurrent_streams_and_submits(fake: FakeEngine) -> None:
    streams = [[req(f"s{s}-{i}", prompt=(s, i), max_tokens=3 + i) for i in range(6)] for s in range(3)]
    online = [req(f"o{i}", prompt=(9, i), max_tokens=4) for i in range(5)]

    async def run_submit(r: GenerationRequest) -> GenerationOutput:
        items = [item async for item in fake.submit(r)]
        assert isinstance(items[-1], GenerationOutput)
        return items[-1]

    results = await asyncio.gather(*(collect(fake, s) for s in streams), *(run_submit(r) for r in online))
    for stream, outputs in zip(streams, results[:3]):
        assert set(outputs) == {r.request_id for r in stream}
        for r in stream:
            assert outputs[r.request_id].choices[0].token_ids == tuple(
                fake_token_ids(r.prompt_token_ids, r.sampling.max_tokens))
    for r, out in zip(online, results[3:]):
        assert out.request_id == r.request_id and out.ok


async def test_online_submit_finishes_while_a_long_batch_runs() -> None:
    engine = await FakeEngine.launch(max_running=2, max_waiting=2, token_interval_s=0.01)
    try:
        batch = [req(f"b{i}", max_tokens=100) for i in range(6)]   # ~3 s of work, 2 at a time
        batch[4:] = [req(f"b{i}", max_tokens=1) for i in (4, 5)]
        gen = asyncio.create_task(collect(engine, batch))
        await asyncio.sleep(0.1)
        started = asyncio.get_running_loop().time()
        items = [item async for item in engine.submit(req("online", max_tokens=3, stream=True))]
        assert asyncio.get_running_loop().time() - started < 1.0
        assert not gen.done()
        assert isinstance(items[-1], GenerationOutput) and items[-1].ok
        updates = [i for i in items if isinstance(i, GenerationUpdate)]
        assert "".join(d.text for u in updates for d in u.deltas) == items[-1].choices[0].text
        assert updates[-1].deltas[0].finish_reason is FinishReason.LENGTH
        await engine.abort([r.request_id for r in batch])
        outputs = await gen
        # the two running ones stop; those the stream had not pulled yet were not in flight, and run
        assert {"b0", "b1"} <= {rid for rid, o in outputs.items() if o.aborted}
        assert len(outputs) == 6 and all(o.aborted or o.ok for o in outputs.values())
    finally:
        await engine.close()


async def test_abort_and_closing_a_stream_stop_the_work() -> None:
    engine = await FakeEngine.launch(token_interval_s=0.01)
    try:
        stream = engine.generate(source([req("quick", max_tokens=1), req("slow", max_tokens=10_000)]))
        first = await anext(stream)
        assert first.request_id == "quick" and first.ok
        await engine.abort(["slow"])
        second = await anext(stream)
        assert second.request_id == "slow" and second.aborted and not second.ok

        stream2 = engine.generate(source([req("slow2", max_tokens=10_000)]))
        task = asyncio.create_task(anext(stream2))
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await stream2.aclose()
        for _ in range(100):
            if not engine.loop.has_work():
                break
            await asyncio.sleep(0.02)
        assert not engine.loop.has_work()
        out = [item async for item in engine.submit(req("after", max_tokens=2))]
        assert out[-1].ok
    finally:
        await engine.close()


async def test_bad_requests_become_error_outputs(fake: FakeEngine) -> None:
    too_long = GenerationRequest("long", tuple(range(5000)), SamplingParams(max_tokens=1))
    bad = req("bad", temperature=5.0)
    outputs = await collect(fake, [too_long, bad, req("fine")])
    assert outputs["long"].error.status == 400 and outputs["long"].error.code == "context_length_exceeded"
    assert outputs["bad"].error.code == "invalid_value" and outputs["bad"].error.param == "temperature"
    assert outputs["fine"].ok


async def test_stop_strings_eos_and_n(fake: FakeEngine) -> None:
    prompt = (100,)
    tokens = fake_token_ids(prompt, 10)
    stop = f"<{tokens[3]}>"
    outputs = await collect(fake, [
        req("stop", prompt, max_tokens=10, stop=(stop,)),
        req("eos", (997,), max_tokens=10),               # tokens 997, 998, 999 = EOS
        req("ignore", (997,), max_tokens=5, ignore_eos=True),
        req("n3", prompt, max_tokens=2, n=3, logprobs=2),
    ])
    assert outputs["stop"].choices[0].text == fake_text(tokens[:3])
    assert outputs["stop"].choices[0].stop_reason == stop
    assert outputs["eos"].choices[0].token_ids == (997, 998, 999)
    assert outputs["eos"].choices[0].finish_reason is FinishReason.STOP
    assert len(outputs["ignore"].choices[0].token_ids) == 5
    n3 = outputs["n3"]
    assert [c.index for c in n3.choices] == [0, 1, 2] and n3.num_completion_tokens == 6
    assert n3.choices[2].token_ids == tuple(fake_token_ids(prompt, 2, index=2))
    assert len(n3.choices[0].logprobs[0].top) == 2


async def test_engine_failure_fails_in_flight_requests_with_503() -> None:
    engine = await FakeEngine.launch(fail_on_step=5, token_interval_s=0.001)
    try:
        outputs: list[GenerationOutput] = []
        with pytest.raises(errors.EngineUnavailable):
            async for out in engine.generate(source([req(f"r{i}", max_tokens=100) for i in range(4)])):
                outputs.append(out)
        assert len(outputs) == 4
        assert all(o.error.status == 503 and o.error.code == "engine_error" for o in outputs)
        assert engine.failure is not None
        with pytest.raises(errors.EngineUnavailable):
            await anext(engine.submit(req("late")))
    finally:
        await engine.close()


async def test_duplicate_request_id_is_refused() -> None:
    # Paced tokens: the first request must still be running when its duplicate arrives and when it is
    # aborted (unpaced, 10,000 fake tokens can finish within the sleep on a busy machine).
    fake = await FakeEngine.launch(token_interval_s=0.01)
    try:
        slow = fake.submit(req("dup", max_tokens=10_000))
        first = asyncio.create_task(anext(slow))
        await asyncio.sleep(0.05)
        items = [item async for item in fake.submit(req("dup"))]
        assert items[-1].error.code == "duplicate_request_id"
        await fake.abort(["dup"])
        assert (await first).aborted
        await slow.aclose()
    finally:
        await fake.close()


# ---- a real engine process --------------------------------------------------------------


async def test_subprocess_engine_runs_and_survives_nothing_when_killed() -> None:
    engine = await EngineClient.start(LoopSpec(FAKE_FACTORY, {"token_interval_s": 0.01, "max_running": 4}))
    try:
        assert engine.pid is not None and engine.info.model_id == "fake"
        first = await collect(engine, [req("a", max_tokens=3), req("b", prompt=(5,), max_tokens=4)])
        assert first["b"].choices[0].token_ids == tuple(fake_token_ids((5,), 4))

        outputs: list[GenerationOutput] = []

        async def run() -> None:
            async for out in engine.generate(source([req(f"r{i}", max_tokens=10_000) for i in range(6)])):
                outputs.append(out)

        task = asyncio.create_task(run())
        await asyncio.sleep(0.3)
        os.kill(engine.pid, signal.SIGKILL)
        with pytest.raises(errors.EngineUnavailable):
            await asyncio.wait_for(task, 10)
        assert outputs and all(o.error and o.error.status == 503 for o in outputs)
    finally:
        await engine.close()


async def test_subprocess_close_is_clean() -> None:
    engine = await EngineClient.start(LoopSpec(FAKE_FACTORY, {}))
    out = [item async for item in engine.submit(req("x", max_tokens=2))]
    assert out[-1].ok
    process = engine._process
    await engine.close()
    assert process is not None and process.exitcode == 0


def failing_factory() -> FakeLoop:
    raise errors.ModelLoadError("model folder /nowhere has no config.json", param="model")


async def test_start_up_failure_raises_the_engine_error() -> None:
    with pytest.raises(errors.ModelLoadError, match="no config.json"):
        await EngineClient.start(LoopSpec(f"{__name__}:failing_factory"))
    with pytest.raises(errors.EngineUnavailable, match="TypeError"):
        await EngineClient.start(LoopSpec(FAKE_FACTORY, {"no_such_option": 1}), in_process=True)


def torch_loop() -> FakeLoop:
    import torch  # noqa: F401 - the engine process may load torch; the client must not

    return FakeLoop()


def test_parent_process_never_imports_torch() -> None:
    script = textwrap.dedent("""
        import asyncio, sys
        from tokabatch.engine.client import EngineClient, LoopSpec
        from tokabatch.engine.api import GenerationRequest, SamplingParams

        async def main():
            engine = await EngineClient.start(LoopSpec("tests.engine.test_client:torch_loop"))
            items = [i async for i in engine.submit(GenerationRequest("x", (1, 2), SamplingParams(max_tokens=3)))]
            assert items[-1].ok, items[-1]
            await engine.close()

        asyncio.run(main())
        print("torch" in sys.modules)
    """)
    assert run_python(script).strip() == "False"


async def test_priority_defaults_and_online_bypass_capacity() -> None:
    engine = await FakeEngine.launch(max_running=1, max_waiting=0, token_interval_s=0.01)
    try:
        gen = asyncio.create_task(collect(engine, [req("b0", max_tokens=50), req("b1", max_tokens=50)]))
        await asyncio.sleep(0.05)
        out = [item async for item in engine.submit(req("o", max_tokens=2, priority=Priority.BATCH))]
        assert out[-1].ok and not gen.done()
        await engine.abort(["b0", "b1"])
        await gen
    finally:
        await engine.close()


def slow_factory() -> FakeLoop:
    import time

    time.sleep(60)
    return FakeLoop()


async def test_start_timeout_stops_the_engine_process() -> None:
    started = asyncio.get_running_loop().time()
    with pytest.raises(errors.EngineUnavailable, match="did not start"):
        await EngineClient.start(LoopSpec(f"{__name__}:slow_factory"), start_timeout_s=1.0)
    assert asyncio.get_running_loop().time() - started < 15


async def test_stats_carry_the_engine_s_busy_and_idle_seconds() -> None:
    engine = await FakeEngine.launch(FakeLoop(token_interval_s=0.05))
    try:
        await asyncio.sleep(0.4)                                      # nothing to do: idle
        request = GenerationRequest("b", (1, 2), SamplingParams(max_tokens=8, ignore_eos=True))
        items = [item async for item in engine.submit(request)]      # ~0.4 s of work
        assert items[-1].ok
        stats = engine.stats()
    finally:
        await engine.close()
    assert stats.idle_seconds >= 0.3 and stats.busy_seconds >= 0.3
    assert stats.busy_seconds + stats.idle_seconds < 5.0


async def test_a_burst_of_requests_reaches_the_engine_whole() -> None:
    # Requests queued while the writer thread sends go as one message; every one still runs once.
    engine = await FakeEngine.launch(FakeLoop(max_running=512, max_waiting=512))
    try:
        async def requests():
            for i in range(300):
                yield GenerationRequest(f"r{i}", (i + 1,), SamplingParams(max_tokens=2))
        outputs = [o async for o in engine.generate(requests())]
    finally:
        await engine.close()
    assert sorted(o.request_id for o in outputs) == sorted(f"r{i}" for i in range(300))
    assert all(o.ok for o in outputs) and set(engine.executions.values()) == {1}
