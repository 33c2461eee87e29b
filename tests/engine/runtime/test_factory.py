"""build_loop's sizes: the memory a GPU leaves an engine's steps decides its default batch."""

from __future__ import annotations

import types

import pytest
import torch

from tokabatch.config import LARGE_STEP_MEMORY_BYTES, EngineConfig, SchedulerConfig
from tokabatch.engine.runtime import factory
from tokabatch.engine.runtime.factory import step_memory_bytes

GIB = 2**30


@pytest.fixture
def gpu_of(monkeypatch):
    """Pretend the CUDA device has `total` bytes (no GPU needed: only its properties are read)."""
    def set_total(total: int) -> torch.device:
        props = types.SimpleNamespace(total_memory=total)
        monkeypatch.setattr(factory.torch.cuda, "get_device_properties", lambda device: props)
        return torch.device("cuda")
    return set_total


def test_an_engine_keeps_back_what_its_kv_fraction_leaves(gpu_of):
    h200 = gpu_of(int(139.8 * GIB))
    assert step_memory_bytes(EngineConfig(kv_memory_fraction=0.85), h200) == pytest.approx(0.15 * 139.8 * GIB, rel=1e-6)
    h100 = gpu_of(int(79.2 * GIB))
    assert step_memory_bytes(EngineConfig(kv_memory_fraction=0.85), h100) == pytest.approx(0.15 * 79.2 * GIB, rel=1e-6)


def test_the_h200_runs_large_steps_and_the_h100_the_standard_ones(gpu_of):
    def max_seqs(total: int, **engine) -> int:
        config = EngineConfig(**engine)
        return SchedulerConfig().for_device("cuda", step_memory_bytes(config, gpu_of(total))).max_seqs
    assert max_seqs(int(139.8 * GIB)) == 4096
    assert max_seqs(int(79.2 * GIB)) == 2048
    assert max_seqs(int(79.2 * GIB), kv_memory_fraction=0.75) == 4096     # a user who keeps more back


def test_engines_sharing_a_gpu_share_what_is_kept_back(gpu_of):
    h200 = gpu_of(int(139.8 * GIB))
    two = EngineConfig(kv_memory_fraction=0.85 / 2, engines_on_device=2)
    assert step_memory_bytes(two, h200) == pytest.approx(0.15 * 139.8 * GIB / 2, rel=1e-6)
    assert step_memory_bytes(two, h200) < LARGE_STEP_MEMORY_BYTES


def test_no_gpu_or_a_given_kv_size_keeps_the_standard_sizes():
    assert step_memory_bytes(EngineConfig(), torch.device("cpu")) == 0
    assert step_memory_bytes(EngineConfig(kv_cache_tokens=1 << 20), torch.device("cuda")) == 0
