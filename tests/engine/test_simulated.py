"""The simulated GPU engine (engine/simulated.py): the real schedulers and pipelined loops over a
modeled device queue. It runs a workload to the end with every token accounted, shares prompts as
the real engine does (Hydragen groups, prefix cache), starts through EngineConfig.loop_factory like
any engine, and keeps the service's world torch-free."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.subprocess_util import run_python
from tokabatch.config import EngineConfig, ModelConfig
from tokabatch.engine.api import GenerationOutput, GenerationRequest, SamplingParams
from tokabatch.engine.client import EngineClient
from tokabatch.engine.core.plan import StepPlan
from tokabatch.engine.random_models import build_folder
from tokabatch.engine.simulated import SimulatedGpu, StepCosts, build_simulated_loop

FAST_GPU = StepCosts(step_s=1e-5, prefill_token_s=0.0, decode_row_s=0.0, kv_token_s=0.0)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sim") / "Qwen2.5-0.5B"
    build_folder("Qwen2.5-0.5B", path, weights=False)        # config and tokenizer only
    return path


def test_a_shared_prompt_workload_runs_to_the_end_with_groups(folder):
    loop = build_simulated_loop(EngineConfig(model=ModelConfig(path=str(folder))), costs=FAST_GPU)
    params = SamplingParams(max_tokens=24, temperature=1.0, ignore_eos=True)
    prompts = [tuple(range(p * 1000, p * 1000 + 300)) for p in range(3)]
    for i, prompt in enumerate(prompts):
        loop.add(GenerationRequest(f"r{i}", prompt, params, n=20))
    outputs = []
    while loop.has_work():
        outputs += [item for item in loop.step() if isinstance(item, GenerationOutput)]
    assert sorted(o.request_id for o in outputs) == ["r0", "r1", "r2"]
    assert all(len(o.choices) == 20 and o.num_completion_tokens == 20 * 24 for o in outputs)
    stats = loop.stats()
    assert stats.num_generated_tokens == 3 * 20 * 24
    assert stats.num_hydragen_saved_kv_reads > 0 and stats.num_cached_tokens > 0
    assert loop.info.device == "simulated" and loop.info.max_seqs == 2048


def test_the_device_queue_runs_one_step_after_another():
    gpu = SimulatedGpu(StepCosts(step_s=0.5, prefill_token_s=0.0, decode_row_s=0.0, kv_token_s=0.0))

    plan = StepPlan(0, (), ())
    first, second = gpu.enqueue(plan), gpu.enqueue(plan)
    assert second - first == pytest.approx(0.5) and gpu.busy_s == pytest.approx(1.0)


async def test_it_starts_as_an_engine_through_the_loop_factory(folder):
    config = EngineConfig(model=ModelConfig(path=str(folder)),
                          loop_factory="tokabatch.engine.simulated:build_simulated_loop")
    engine = await EngineClient.from_config(config, in_process=True)
    try:
        items = [item async for item in engine.submit(
            GenerationRequest("x", (5, 6, 7), SamplingParams(max_tokens=3, ignore_eos=True)))]
    finally:
        await engine.close()
    assert items[-1].ok and items[-1].num_completion_tokens == 3 and engine.info.model_id == "Qwen2.5-0.5B"


def test_the_simulated_engine_imports_no_torch():
    script = textwrap.dedent("""
        import sys
        import tokabatch.engine.simulated
        print("torch" in sys.modules)
    """)
    assert run_python(script).strip() == "False"
