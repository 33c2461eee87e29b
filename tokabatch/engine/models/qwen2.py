"""Qwen2 (and Qwen2.5): Llama with a bias on q/k/v (not o). A flag on LlamaArgs, not a copy.

Sliding-window attention (`use_sliding_window: true`) is refused at load time rather than run
wrong. Plain torch; must not import engine/runtime.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from tokabatch.engine.models.llama import LlamaArgs, LlamaForCausalLM, parse_llama_args
from tokabatch.errors import ModelLoadError


def parse_qwen2_args(config: Mapping[str, Any]) -> LlamaArgs:
    if config.get("use_sliding_window", False):
        raise ModelLoadError("Qwen2 with use_sliding_window=true is not supported")
    layer_types = config.get("layer_types") or ()
    if any(t != "full_attention" for t in layer_types):
        raise ModelLoadError("Qwen2 with sliding-attention layers is not supported")
    args = parse_llama_args({**config, "attention_bias": False})
    return dataclasses.replace(args, qkv_bias=True, o_bias=False)


class Qwen2ForCausalLM(LlamaForCausalLM):
    args_parser = staticmethod(parse_qwen2_args)
