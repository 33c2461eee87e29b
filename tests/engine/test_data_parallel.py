"""DataParallelEngine over fake engines (in-process) and over two simulated engine processes:
every request answered once, requests whose prompts start alike on one engine, new prompts to the
engine with the least predicted work, online requests to the least loaded, aborts routed to the
owner, stats summed; and the per-engine configs of `--data-parallel` / `--gpus`."""

from __future__ import annotations

import asyncio

import pytest

from tokabatch.config import EngineConfig, ModelConfig
from tokabatch.engine.api import GenerationOutput, GenerationRequest, SamplingParams
from tokabatch.engine.data_parallel import DataParallelEngine
from tokabatch.engine.random_models import build_folder
from tokabatch.engine.supervisor import engine_configs, start_engine
from tokabatch.engine.testing import FakeEngine, FakeLoop


async def _engines(n: int = 2, **loop_kwargs) -> list[FakeEngine]:
    return [await FakeEngine.launch(FakeLoop(max_running=4, max_waiting=4, **loop_kwargs)) for _ in range(n)]


async def _requests(items):
    for item in items:
        yield item
        await asyncio.sleep(0)


def _request(i: int, prefix: int, *, max_tokens: int = 4, n: int = 1) -> GenerationRequest:
    prompt = (prefix, prefix, prefix, prefix, 100 + i)                # the first 4 tokens: the prefix
    return GenerationRequest(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), n=n)


def _where(engines: list[FakeEngine]) -> dict[str, int]:
    return {rid: i for i, e in enumerate(engines) for rid in e.executions}


async def test_every_request_once_and_alike_prompts_on_one_engine():
    engines = await _engines()
    router = DataParallelEngine(engines, affinity_tokens=4)
    try:
        requests = [_request(i, prefix=i % 6) for i in range(36)]
        outputs = [o async for o in router.generate(_requests(requests))]
    finally:
        await router.close()
    assert sorted(o.request_id for o in outputs) == sorted(r.request_id for r in requests)
    assert all(o.ok for o in outputs)
    where = _where(engines)
    assert all(count == 1 for e in engines for count in e.executions.values())
    for prefix in range(6):
        assert len({where[f"r{i}"] for i in range(36) if i % 6 == prefix}) == 1      # a prefix stays put
    assert set(where.values()) == {0, 1}                                             # both engines work


async def test_new_prompts_go_where_the_least_predicted_work_is():
    engines = await _engines(token_interval_s=0.01)
    router = DataParallelEngine(engines, affinity_tokens=4)
    try:
        requests = [_request(0, prefix=0, max_tokens=200)] + [_request(i, prefix=i, max_tokens=5) for i in range(1, 9)]
        outputs = [o async for o in router.generate(_requests(requests))]
    finally:
        await router.close()
    assert len(outputs) == 9
    where = _where(engines)
    assert all(where[f"r{i}"] != where["r0"] for i in range(1, 9))    # 8 x 5 tokens < one 200-token request


async def test_online_requests_go_to_the_least_loaded_engine_and_aborts_to_their_owner():
    engines = await _engines(token_interval_s=0.05)
    router = DataParallelEngine(engines, affinity_tokens=4)
    try:
        busy = router.generate(_requests([_request(0, prefix=0, max_tokens=400)]))
        first = asyncio.ensure_future(busy.__anext__())
        await asyncio.sleep(0.2)
        online = GenerationRequest("online", (9, 9), SamplingParams(max_tokens=2, ignore_eos=True))
        items = [item async for item in router.submit(online)]
        assert isinstance(items[-1], GenerationOutput) and items[-1].ok
        assert _where(engines)["online"] != _where(engines)["r0"]
        await router.abort(["r0"])
        aborted = await asyncio.wait_for(first, 10)
        assert aborted.request_id == "r0" and aborted.aborted
        assert router.stats().num_requests_finished >= 1 and router.health() is None
        assert router.info.max_seqs == sum(e.info.max_seqs for e in engines)
        await busy.aclose()
    finally:
        await router.close()


def test_engine_configs_place_engines_and_share_a_device():
    base = EngineConfig(model=ModelConfig(device="auto"), data_parallel=3, kv_memory_fraction=0.9)
    shared = engine_configs(base)
    assert [c.model.device for c in shared] == ["auto"] * 3
    assert all(c.kv_memory_fraction == pytest.approx(0.3) and c.data_parallel == 1 for c in shared)
    assert [c.seed for c in shared] == [0, 1, 2]
    placed = engine_configs(EngineConfig(data_parallel=3, devices=("cuda:0", "cuda:1"), kv_memory_fraction=0.8))
    assert [c.model.device for c in placed] == ["cuda:0", "cuda:1", "cuda:0"]
    assert [c.kv_memory_fraction for c in placed] == pytest.approx([0.4, 0.8, 0.4])
    assert [c.engines_on_device for c in shared] == [3] * 3
    assert [c.engines_on_device for c in placed] == [2, 1, 2]


@pytest.mark.timeout(180)
async def test_two_engine_processes_behind_one_server_engine(tmp_path):
    folder = tmp_path / "Qwen2.5-0.5B"
    build_folder("Qwen2.5-0.5B", folder, weights=False)
    config = EngineConfig(model=ModelConfig(path=str(folder)), data_parallel=2,
                          loop_factory="tokabatch.engine.simulated:build_simulated_loop")
    router = await start_engine(config)
    try:
        assert isinstance(router, DataParallelEngine) and len(router.engines) == 2
        params = SamplingParams(max_tokens=8, temperature=1.0, ignore_eos=True)
        requests = [GenerationRequest(f"p{p}", tuple(range(p * 1000, p * 1000 + 300)), params, n=16)
                    for p in range(6)]
        outputs = [o async for o in router.generate(_requests(requests))]
        per_engine = [s.num_requests_finished for s in router.engine_stats()]
    finally:
        await router.close()
    assert sorted(o.request_id for o in outputs) == [f"p{p}" for p in range(6)]
    assert all(o.ok and len(o.choices) == 16 for o in outputs)
    assert all(n > 0 for n in per_engine) and sum(per_engine) == 6
