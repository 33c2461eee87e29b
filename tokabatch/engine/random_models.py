"""Random-weight checkpoints in the exact shapes of real models, for benchmarks and GPU tests.

Owns `ARCHS` (config.json contents of Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-0.5B/1.5B/7B, as
../shared/docs/performance.md lists them) and `build_folder`, which writes a loadable HF-style folder
(config, safetensors, a WordLevel tokenizer covering the vocabulary). No model hub is needed: the
GPU machine cannot reach one, and throughput does not depend on the weights' values when outputs
have a fixed length. Imports torch, safetensors and tokenizers inside `build_folder` only.
"""

from __future__ import annotations

import json
from pathlib import Path

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
_LLAMA = dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, rms_norm_eps=1e-5,
              rope_theta=500000.0, rope_scaling=_LLAMA3_ROPE, max_position_embeddings=131072,
              bos_token_id=128000, eos_token_id=128001, hidden_act="silu")
_QWEN = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], rms_norm_eps=1e-6, rope_theta=1000000.0,
             max_position_embeddings=32768, bos_token_id=151643, eos_token_id=151645, hidden_act="silu",
             use_sliding_window=False)
ARCHS: dict[str, dict] = {
    "Llama-3.2-1B": {**_LLAMA, "num_hidden_layers": 16, "hidden_size": 2048, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "tie_word_embeddings": True},
    "Llama-3.1-8B": {**_LLAMA, "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336,
                     "tie_word_embeddings": False, "rope_scaling": {**_LLAMA3_ROPE, "factor": 8.0}},
    "Qwen2.5-0.5B": {**_QWEN, "num_hidden_layers": 24, "hidden_size": 896, "num_attention_heads": 14,
                     "num_key_value_heads": 2, "intermediate_size": 4864, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "Qwen2.5-1.5B": {**_QWEN, "num_hidden_layers": 28, "hidden_size": 1536, "num_attention_heads": 12,
                     "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936,
                     "tie_word_embeddings": True},
    "Qwen2.5-7B": {**_QWEN, "num_hidden_layers": 28, "hidden_size": 3584, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}



def build_folder(arch: str, folder: Path, num_layers: int | None = None, final_norm_scale: float = 1.0,
                 *, weights: bool = True) -> None:
    """config.json + random bf16 safetensors (made on the GPU when there is one, std 0.02, norms near 1)
    + a WordLevel tokenizer "t0".."tN" covering the vocabulary. `num_layers` overrides the depth;
    `final_norm_scale` multiplies the final norm's weight (peakier logits, so fewer near-ties in greedy
    agreement tests). Without `weights` only the config and the tokenizer (enough for
    engine/simulated.py; torch is not imported)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    cfg = {**ARCHS[arch], "torch_dtype": "bfloat16"}
    if num_layers is not None:
        cfg["num_hidden_layers"] = num_layers
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": cfg["eos_token_id"]}))
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    tok = HFTokenizer(WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": f"t{cfg['eos_token_id']}"}))
    if not weights:
        return
    import torch
    from safetensors.torch import save_file

    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim", h // cfg["num_attention_heads"])
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                       p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
                       p + "mlp.down_proj.weight": (h, inter)})
        if cfg["model_type"] == "qwen2":
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(0)
    tensors = {}
    for name, shape in shapes.items():
        t = torch.randn(shape, generator=gen, device=dev, dtype=torch.float32)
        t = 1.0 + 0.1 * t if name.endswith("norm.weight") else 0.02 * t
        if name == "model.norm.weight":
            t = t * final_norm_scale
        tensors[name] = t.to(torch.bfloat16).cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    del t, gen
    if dev == "cuda":
        torch.cuda.empty_cache()     # an engine started next (another process) sizes its KV cache from free memory
