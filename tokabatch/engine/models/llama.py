"""The Llama family (Llama 2/3.x, SmolLM2, Mistral without sliding window) as a plain nn.Module.

Owns the architecture, the parsing of config.json into `LlamaArgs`, and the explicit map from HF
checkpoint names to our parameter names. Variants (Qwen2's q/k/v bias) are flags in `LlamaArgs`
set by small subclasses. No serving logic: the model sees flat token rows, their positions and an
`AttentionFn`; it never knows about pages, sequences or sampling. Must not import engine/runtime.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from tokabatch.engine.models.layers import (
    SUPPORTED_ROPE_TYPES,
    AttentionFn,
    GatedMLP,
    LayerKernels,
    RMSNorm,
    RopeConfig,
    RotaryEmbedding,
)
from tokabatch.errors import ModelLoadError


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool = False
    qkv_bias: bool = False               # Qwen2: bias on q/k/v but not o
    o_bias: bool = False                 # Llama's attention_bias puts a bias on all four
    mlp_bias: bool = False


def _need(config: Mapping[str, Any], key: str) -> Any:
    if key not in config:
        raise ModelLoadError(f"config.json lacks {key!r}")
    return config[key]


def parse_rope(config: Mapping[str, Any], head_dim: int) -> RopeConfig:
    """Rotary settings from HF v5 `rope_parameters` or v4 `rope_theta` + `rope_scaling`."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {})
    merged = {**scaling, **params}
    theta = merged.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope scaling type {rope_type!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError("partial_rotary_factor != 1 is not supported")
    kwargs: dict[str, Any] = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
        if merged.get(key) is not None:
            kwargs[key] = merged[key]
    return RopeConfig(head_dim=head_dim, theta=float(theta), rope_type=rope_type, **kwargs)


def parse_llama_args(config: Mapping[str, Any]) -> LlamaArgs:
    """LlamaArgs from a config.json dict; ModelLoadError for a missing key or an unsupported setting."""
    hidden = int(_need(config, "hidden_size"))
    num_heads = int(_need(config, "num_attention_heads"))
    head_dim = int(config.get("head_dim") or hidden // num_heads)
    act = config.get("hidden_act", "silu")
    if act != "silu":
        raise ModelLoadError(f"unsupported hidden_act {act!r}; supported: silu")
    attention_bias = bool(config.get("attention_bias", False))
    return LlamaArgs(
        vocab_size=int(_need(config, "vocab_size")),
        hidden_size=hidden,
        intermediate_size=int(_need(config, "intermediate_size")),
        num_layers=int(_need(config, "num_hidden_layers")),
        num_heads=num_heads,
        num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rope=parse_rope(config, head_dim),
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        mlp_bias=bool(config.get("mlp_bias", False)),
    )


class Attention(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.hidden_size, args.num_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.num_heads * args.head_dim, args.hidden_size, bias=args.o_bias)

        self.qkv_proj: nn.Linear | None = None    # set by fuse(): q, k, v in one matrix product

    def fuse(self) -> None:
        """Replace q/k/v_proj by one qkv_proj (concatenated rows): one GEMM and one rotary call."""
        if self.qkv_proj is not None:
            return
        parts = (self.q_proj, self.k_proj, self.v_proj)
        w = parts[0].weight
        fused = nn.Linear(w.shape[1], sum(p.weight.shape[0] for p in parts), bias=parts[0].bias is not None,
                          device=w.device, dtype=w.dtype)
        with torch.no_grad():
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            if fused.bias is not None:
                fused.bias.copy_(torch.cat([p.bias for p in parts]))
        self.qkv_proj = fused.requires_grad_(False)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: Tensor, rotary: object, attn: AttentionFn, kernels: LayerKernels) -> Tensor:
        n = x.shape[0]
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(x).view(n, hq + 2 * hk, d)
            qk = kernels.rotate_qk(qkv[:, :hq + hk], hq, rotary)
            v = qkv[:, hq + hk:]
        else:
            qk = kernels.rotate_qk(torch.cat([self.q_proj(x).view(n, hq, d), self.k_proj(x).view(n, hk, d)], dim=1),
                                   hq, rotary)
            v = self.v_proj(x).view(n, hk, d)
        q, k = qk[:, :hq], qk[:, hq:]
        out = attn(self.layer_idx, q, k, v)
        return self.o_proj(out.reshape(n, hq * d))


class DecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.attn = Attention(args, layer_idx)
        self.mlp_norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = GatedMLP(args.hidden_size, args.intermediate_size, bias=args.mlp_bias)

    def forward(self, x: Tensor, residual: Tensor | None, rotary: object, attn: AttentionFn,
                kernels: LayerKernels) -> tuple[Tensor, Tensor]:
        """x: the previous layer's output (its MLP's), residual: the stream before it (None before the
        first layer, where x is the embedding) -> this layer's (MLP output, residual stream): the
        sum of the two is the hidden state after this layer (HF's x + attn(..) then + mlp(..))."""
        h, residual = kernels.add_rms_norm(x, residual, self.attn_norm)
        h, residual = kernels.add_rms_norm(self.attn(h, rotary, attn, kernels), residual, self.mlp_norm)
        return self.mlp(h, kernels), residual


class LlamaForCausalLM(nn.Module):
    """forward(ids, positions, attn) -> hidden (pre final norm); compute_logits(rows) -> logits.

    The final norm lives in `compute_logits` so that only rows that will be sampled (or scored for
    prompt logprobs) pay for the norm and the LM head, which dominates small models.
    """

    args_parser = staticmethod(parse_llama_args)

    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.args = args
        # Given its weight, the embedding skips its random init: under weights.build_on_meta that init
        # (normal_ on the meta device) imports torch._dynamo, a slow import on every engine's start-up.
        self.embed = nn.Embedding(args.vocab_size, args.hidden_size,
                                  _weight=torch.empty(args.vocab_size, args.hidden_size))
        self.rotary = RotaryEmbedding(args.rope)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
        self.kernels = LayerKernels(self.rotary)

    def use_kernels(self, kernels: LayerKernels) -> None:
        """Run the layers' elementwise work with `kernels` (same meaning, e.g. fused GPU kernels)."""
        self.kernels = kernels

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "LlamaForCausalLM":
        return cls(cls.args_parser(config))

    def forward(self, input_ids: Tensor, positions: Tensor, attn: AttentionFn) -> Tensor:
        """input_ids, positions: [num_tokens] int64 -> hidden [num_tokens, hidden_size] (not normed)."""
        x = self.embed(input_ids)
        kernels = self.kernels
        rotary = kernels.rotary_state(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, rotary, attn, kernels)
        return x if residual is None else x + residual

    def fuse(self) -> None:
        """After loading: fused q/k/v and gate/up projections (fewer, larger matrix products; the
        same results up to float rounding). Loading needs the unfused names, so call it last."""
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()

    def compute_logits(self, hidden_rows: Tensor, out: Tensor | None = None) -> Tensor:
        """hidden_rows: [rows, hidden_size] from forward -> logits [rows, vocab_size] (model dtype),
        written into `out` when given (CUDA graphs of every batch size share one output buffer)."""
        normed = self.norm(hidden_rows)
        if out is None:
            return self.lm_head(normed)
        return torch.mm(normed, self.lm_head.weight.t(), out=out)

    def hf_name_map(self) -> dict[str, str]:
        """HF checkpoint tensor name -> our parameter name, for every weight the checkpoint must hold.

        A tied LM head is not listed: it is the embedding (see `ignored_hf_names`).
        """
        a = self.args
        names = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight"}
        if not a.tie_word_embeddings:
            names["lm_head.weight"] = "lm_head.weight"
        for i in range(a.num_layers):
            hf, ours = f"model.layers.{i}.", f"layers.{i}."
            names[hf + "input_layernorm.weight"] = ours + "attn_norm.weight"
            names[hf + "post_attention_layernorm.weight"] = ours + "mlp_norm.weight"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                names[f"{hf}self_attn.{proj}.weight"] = f"{ours}attn.{proj}.weight"
            if a.qkv_bias:
                for proj in ("q_proj", "k_proj", "v_proj"):
                    names[f"{hf}self_attn.{proj}.bias"] = f"{ours}attn.{proj}.bias"
            if a.o_bias:
                names[f"{hf}self_attn.o_proj.bias"] = f"{ours}attn.o_proj.bias"
            for proj in ("gate_proj", "up_proj", "down_proj"):
                names[f"{hf}mlp.{proj}.weight"] = f"{ours}mlp.{proj}.weight"
                if a.mlp_bias:
                    names[f"{hf}mlp.{proj}.bias"] = f"{ours}mlp.{proj}.bias"
        return names

    def is_ignored_hf_name(self, hf_name: str) -> bool:
        """Checkpoint tensors we knowingly skip: old rotary buffers, and a saved copy of a tied head."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return True
        return self.args.tie_word_embeddings and hf_name == "lm_head.weight"

    def post_materialize(self, device: torch.device) -> None:
        """After a meta-device build was given storage (weights._give_storage): recompute the non-persistent
        rotary buffer and re-tie the LM head (storage is given parameter by parameter, untying them)."""
        self.rotary.init_buffers(device)
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed.weight
