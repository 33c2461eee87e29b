"""A one-reduction `max` for flashinfer's planning code: its plan() takes builtins.max of 1-D tensors.

flashinfer 0.6.18's decode and prefill wrappers compute the longest KV length while planning with
`max(kv_lens_arr_host).item()` (decode.py, tensor-core branch; prefill.py), where the argument is a
host torch tensor (the prefill planner is given the longest query: flashinfer_ops.plan_prefill; its
`max_sequence_kv` argument breaks its fa2 path in that release). Python's max
iterates it element by element, each element a 0-d tensor and each comparison a torch call, a
thousand times slower than `tensor.max()`. The engine plans a decode of up to 1,024 rows per
half-step (and the Hydragen own parts), on a CPU the grouped decode steps wait for
(docs/benchmarks.md has the figures).

`install` puts `tensor_max` into those modules' globals, where their unqualified `max` finds it before
the builtin: the same value for a 1-D tensor (as a 0-d tensor, so `.item()` still works), and
builtins.max for anything else. Torch only; flashinfer_ops.speed_up_planning installs it, on the
flashinfer release it was written for.
"""

from __future__ import annotations

import builtins
from types import ModuleType
from typing import Any, Iterable

import torch


def tensor_max(*args: Any, **kwargs: Any) -> Any:
    """builtins.max, except for a lone non-empty 1-D tensor: one reduction, the same value."""
    if len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor) and args[0].dim() == 1 \
            and args[0].numel() > 0:
        return args[0].max()
    return builtins.max(*args, **kwargs)


def install(modules: Iterable[ModuleType]) -> None:
    """Make `max` inside each module tensor_max (idempotent)."""
    for module in modules:
        module.max = tensor_max


__all__ = ["install", "tensor_max"]
