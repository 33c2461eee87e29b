"""Load an HF model folder (config.json + *.safetensors) into one of our models, and describe it.

Owns: dtype/device resolution, the meta-device build, reading safetensors shards (through
model.safetensors.index.json when present) via the model's explicit HF-name -> our-name map, and
`ModelSpec`, the facts the KV cache, the runner and the engine loop need about a model. Every
failure a model folder can cause is a ModelLoadError naming the file or tensor. Must not import
the service or engine/core scheduling code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tokabatch.engine.models.llama import LlamaForCausalLM
from tokabatch.engine.models.registry import model_class
from tokabatch.errors import ModelLoadError
from tokabatch.model_store import read_eos_token_ids

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class ModelSpec:
    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_position_embeddings: int         # the context length we serve
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": cuda when available, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {device!r}") from exc


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on cuda, float32 elsewhere (bf16 on CPU is slow and changes greedy outputs)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc


def safetensors_files(folder: Path) -> list[Path]:
    """The shards: those named by model.safetensors.index.json when present, else every *.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = sorted({folder / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} names missing shard(s): {', '.join(missing)}")
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"no *.safetensors files in {folder}")
    return files


def build_on_meta(config: dict[str, Any], dtype: torch.dtype, device: torch.device) -> LlamaForCausalLM:
    """Build without allocating or initializing weights, then give it uninitialized storage on `device`."""
    cls = model_class(config)
    with torch.device("meta"):
        model = cls.from_config(config)
    model = model.to(dtype=dtype)
    _give_storage(model, device)
    model.post_materialize(device)       # rotary buffer, tied LM head
    return model


def _give_storage(model: nn.Module, device: torch.device) -> None:
    """`model.to_empty(device=device)` for a meta-device build, with plain `torch.empty` per tensor:
    to_empty's `empty_like` on meta tensors imports torch's symbolic-shape machinery (sympy, ~500
    modules) on the engine's start-up path. Like to_empty, it unties shared parameters."""
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                fresh = torch.empty(param.shape, dtype=param.dtype, device=device)
                module._parameters[name] = nn.Parameter(fresh, requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None:
                module._buffers[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)


def load_weights(model: LlamaForCausalLM, files: list[Path]) -> None:
    """Copy every mapped checkpoint tensor into its parameter; ModelLoadError on any mismatch."""
    name_map = model.hf_name_map()
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ModelLoadError(f"cannot open {file.name}: {exc}") from exc
        with handle:
            for hf_name in handle.keys():
                if hf_name not in name_map:
                    if model.is_ignored_hf_name(hf_name):
                        continue
                    raise ModelLoadError(f"unexpected tensor {hf_name!r} in {file.name}")
                ours = name_map[hf_name]
                param = params[ours]
                tensor = handle.get_tensor(hf_name)
                if tuple(tensor.shape) != tuple(param.shape):
                    raise ModelLoadError(
                        f"shape mismatch for {hf_name!r} in {file.name}: checkpoint has "
                        f"{tuple(tensor.shape)}, model expects {tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor.to(param.dtype))
                loaded.add(hf_name)
    missing = sorted(set(name_map) - loaded)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise ModelLoadError(f"missing weight(s) in checkpoint: {', '.join(missing[:5])}{more}")


def load_model(path: str | Path, dtype: str = "auto", device: str = "auto") -> tuple[nn.Module, ModelSpec]:
    """Load an HF folder; returns the model in eval mode on `device` and its ModelSpec."""
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ModelLoadError(f"no config.json in {folder}")
    config = _read_json(folder / "config.json")
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model = build_on_meta(config, dt, dev)
    load_weights(model, safetensors_files(folder))
    model.eval().requires_grad_(False)
    model.fuse()
    a = model.args
    spec = ModelSpec(
        architecture=config["architectures"][0], num_layers=a.num_layers, num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads, head_dim=a.head_dim, hidden_size=a.hidden_size,
        vocab_size=a.vocab_size, max_position_embeddings=a.max_position_embeddings,
        eos_token_ids=read_eos_token_ids(folder, config), dtype=dt, device=dev,
    )
    return model, spec
