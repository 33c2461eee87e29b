"""flashinfer_plan_speedup: the `max` installed into flashinfer's planning modules (CPU; no flashinfer)."""

from __future__ import annotations

import time
import types

import pytest
import torch

from tokabatch.engine.runtime.flashinfer_plan_speedup import install, tensor_max


def test_same_values_as_builtin_max() -> None:
    t = torch.tensor([3, 1027, 16, 1027, 5], dtype=torch.int32)
    assert tensor_max(t).item() == max(t).item() == 1027
    assert tensor_max(t).dtype == torch.int32 and tensor_max(t).dim() == 0
    assert tensor_max(torch.tensor([-7])).item() == -7
    assert tensor_max([4, 9, 2]) == 9
    assert tensor_max(4, 9, 2) == 9
    assert tensor_max((n for n in [4, 9, 2]), key=lambda n: -n) == 2
    assert tensor_max([], default=0) == 0
    with pytest.raises(ValueError):
        tensor_max([])
    with pytest.raises(ValueError):                        # an empty tensor fails like the builtin
        tensor_max(torch.empty(0, dtype=torch.int32))


def test_install_replaces_max_where_module_code_looks_it_up() -> None:
    module = types.ModuleType("fake_flashinfer_decode")
    exec("def longest(kv_lens):\n    return max(kv_lens).item()\n", module.__dict__)
    lens = torch.randint(1, 4096, (1024,), dtype=torch.int32)
    expected = module.longest(lens)
    start = time.perf_counter()
    module.longest(lens)
    builtin_s = time.perf_counter() - start
    install([module])
    assert module.max is tensor_max
    start = time.perf_counter()
    assert module.longest(lens) == expected == int(lens.max())
    installed_s = time.perf_counter() - start
    print(f"max of 1,024 lengths: builtin {builtin_s * 1e3:.3f} ms, installed {installed_s * 1e3:.3f} ms")
    assert installed_s < builtin_s
