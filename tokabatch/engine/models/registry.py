"""config.json `architectures[0]` -> the model class that serves it.

Owns the list of supported architectures; nothing else decides it. Plain torch (imports the model
modules); must not import engine/runtime.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from tokabatch.engine.models.llama import LlamaArgs, LlamaForCausalLM, parse_llama_args
from tokabatch.engine.models.qwen2 import Qwen2ForCausalLM
from tokabatch.errors import ModelLoadError


def parse_mistral_args(config: Mapping[str, Any]) -> LlamaArgs:
    """Mistral is Llama plus an optional sliding window; we serve it with the context capped at the
    window, where full attention and sliding-window attention agree exactly."""
    args = parse_llama_args(config)
    window = config.get("sliding_window")
    if window and window < args.max_position_embeddings:
        args = dataclasses.replace(args, max_position_embeddings=int(window))
    return args


class MistralForCausalLM(LlamaForCausalLM):
    args_parser = staticmethod(parse_mistral_args)


ARCHITECTURES: dict[str, type[LlamaForCausalLM]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def model_class(config: Mapping[str, Any]) -> type[LlamaForCausalLM]:
    """The class for config.json's `architectures[0]`; ModelLoadError naming it when unsupported."""
    archs = config.get("architectures") or []
    supported = ", ".join(sorted(ARCHITECTURES))
    if not archs:
        raise ModelLoadError(f"config.json has no 'architectures' entry; supported: {supported}")
    cls = ARCHITECTURES.get(archs[0])
    if cls is None:
        raise ModelLoadError(f"unsupported model architecture {archs[0]!r}; supported: {supported}")
    return cls
