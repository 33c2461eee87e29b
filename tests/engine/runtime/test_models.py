"""Our Llama/Qwen2 through the paged torch backend equal HF transformers' logits (float32, < 1e-4),
the loader refuses bad folders with ModelLoadError naming the culprit, and merge_attention is exact."""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.runtime.conftest import DEVICES, LLAMA3_ROPE, PagedDriver, hf_logits
from tests.subprocess_util import run_python
from tokabatch.engine.runtime.attention import attention, attention_with_lse, merge_attention
from tokabatch.engine.runtime.kv_cache import KVCache, choose_num_pages, kv_bytes_per_token
from tokabatch.engine.runtime.weights import load_model
from tokabatch.errors import ModelLoadError

TOL = 1e-4


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(256) for _ in range(n)]


def _check(driver: PagedDriver, hf_model, i: int) -> None:
    expected = hf_logits(hf_model, driver.prompts[i])
    got = driver.all_logits(i)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() < TOL


VARIANTS = [
    pytest.param("llama", {}, id="llama-untied"),
    pytest.param("llama", {"tie_word_embeddings": True}, id="llama-tied"),
    pytest.param("llama", {"rope_scaling": LLAMA3_ROPE}, id="llama3-rope"),
    pytest.param("qwen2", {}, id="qwen2-bias"),
    pytest.param("qwen2", {"tie_word_embeddings": True}, id="qwen2-tied"),
]


@pytest.mark.parametrize("arch,overrides", VARIANTS)
@pytest.mark.parametrize("length", [17, 37, 16, 32])
def test_prefill_matches_hf(hf_checkpoint, arch, overrides, length):
    hf, folder = hf_checkpoint(arch, **overrides)
    model, spec = load_model(folder, dtype="float32", device="cpu")
    driver = PagedDriver(model, spec, [_prompt(length, length)])
    driver.step([(0, length)])
    _check(driver, hf, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,overrides", VARIANTS)
def test_chunked_prefill_then_decode_matches_hf(hf_checkpoint, arch, overrides, device):
    hf, folder = hf_checkpoint(arch, **overrides)
    model, spec = load_model(folder, dtype="float32", device=device)
    driver = PagedDriver(model, spec, [_prompt(37, 1)])
    for n in (16, 5, 11):                # crosses a page boundary mid-chunk and ends at one (32)
        driver.step([(0, n)])
    for _ in range(5):                   # decode one position at a time through the pages
        driver.step([(0, 1)])
    _check(driver, hf, 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("arch,overrides", VARIANTS[::2])
def test_mixed_steps_several_sequences(hf_checkpoint, arch, overrides, device):
    """Decodes and prefill chunks of different sequences share steps; each stays exact."""
    hf, folder = hf_checkpoint(arch, **overrides)
    model, spec = load_model(folder, dtype="float32", device=device)
    lengths = [19, 37, 19, 33, 5]      # seq 2: a full page, then decodes into the next
    driver = PagedDriver(model, spec, [_prompt(n, 10 + n) for n in lengths], seed=3)
    driver.step([(0, 12), (2, 16)])
    driver.step([(2, 1), (0, 5), (1, 20), (4, 1)])
    driver.step([(0, 1), (2, 1), (4, 1), (1, 17), (3, 32)])
    driver.step([(0, 1), (2, 1), (4, 1), (3, 1)])
    driver.step([(4, 2)])
    for i in range(len(lengths)):
        assert driver.done[i] == lengths[i]
        _check(driver, hf, i)


def test_mistral_loads_as_llama(hf_checkpoint):
    hf, folder = hf_checkpoint("mistral", sliding_window=None)
    model, spec = load_model(folder, dtype="float32", device="cpu")
    driver = PagedDriver(model, spec, [_prompt(20, 5)])
    driver.step([(0, 13)])
    driver.step([(0, 7)])
    _check(driver, hf, 0)


def test_mistral_sliding_window_caps_context(hf_checkpoint):
    _, folder = hf_checkpoint("mistral", sliding_window=128)
    _, spec = load_model(folder, dtype="float32", device="cpu")
    assert spec.max_position_embeddings == 128 and spec.architecture == "MistralForCausalLM"


def test_qwen2_sliding_window_refused(hf_checkpoint):
    _, folder = hf_checkpoint("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=1)
    with pytest.raises(ModelLoadError, match="sliding"):
        load_model(folder, dtype="float32", device="cpu")


def test_sharded_checkpoint(hf_checkpoint):
    hf, folder = hf_checkpoint("llama", max_shard_size="60KB")
    shards = sorted(folder.glob("*.safetensors"))
    assert len(shards) >= 2 and (folder / "model.safetensors.index.json").is_file()
    model, spec = load_model(folder, dtype="auto", device="auto")
    assert spec.dtype == (torch.bfloat16 if spec.device.type == "cuda" else torch.float32)
    if spec.device.type == "cuda":
        return                           # bf16 logits: the exact comparison is for float32
    driver = PagedDriver(model, spec, [_prompt(19, 2)])
    driver.step([(0, 19)])
    _check(driver, hf, 0)


def test_spec_and_tied_head(hf_checkpoint):
    _, folder = hf_checkpoint("qwen2", tie_word_embeddings=True, eos_token_id=[2, 7])
    model, spec = load_model(folder, dtype="float32", device="cpu")
    assert model.lm_head.weight is model.embed.weight
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads, spec.head_dim) == (2, 4, 2, 16)
    assert (spec.hidden_size, spec.vocab_size, spec.max_position_embeddings) == (64, 256, 512)
    assert spec.eos_token_ids[:2] == (2, 7) and spec.dtype == torch.float32
    assert spec.device == torch.device("cpu") and spec.architecture == "Qwen2ForCausalLM"
    assert not any(p.is_meta for p in model.parameters())


def test_compute_logits_into_a_given_buffer(hf_checkpoint):
    """The CUDA graphs' path: logits written into the first rows of one shared buffer."""
    _, folder = hf_checkpoint("qwen2", tie_word_embeddings=True)
    model, spec = load_model(folder, dtype="float32", device="cpu")
    hidden = torch.randn(3, spec.hidden_size, generator=torch.Generator().manual_seed(0))
    buffer = torch.full((5, spec.vocab_size), float("nan"))
    got = model.compute_logits(hidden, out=buffer[:3])
    assert got.data_ptr() == buffer.data_ptr()
    torch.testing.assert_close(buffer[:3], model.compute_logits(hidden))
    assert buffer[3:].isnan().all()


@pytest.mark.parametrize("device", DEVICES)
def test_bfloat16_load(hf_checkpoint, device):
    hf, folder = hf_checkpoint("llama")
    model, spec = load_model(folder, dtype="bfloat16", device=device)
    assert spec.dtype == torch.bfloat16 and model.embed.weight.dtype == torch.bfloat16
    driver = PagedDriver(model, spec, [_prompt(17, 4)])
    driver.step([(0, 17)])
    assert driver.cache.dtype == torch.bfloat16
    assert (driver.all_logits(0) - hf_logits(hf, driver.prompts[0])).abs().max().item() < 0.2


def test_unknown_architecture(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["GPTNeoXForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="GPTNeoXForCausalLM.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        load_model(folder, dtype="float32", device="cpu")


def _rewrite(folder, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_missing_weight(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ModelLoadError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(folder, dtype="float32", device="cpu")


def test_missing_qwen2_bias(hf_checkpoint):
    _, folder = hf_checkpoint("qwen2")
    _rewrite(folder, lambda t: t.pop("model.layers.0.self_attn.k_proj.bias"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.0\.self_attn\.k_proj\.bias"):
        load_model(folder, dtype="float32", device="cpu")


def test_shape_mismatch(hf_checkpoint):
    _, folder = hf_checkpoint("llama")

    def shrink(t):
        t["model.layers.0.self_attn.q_proj.weight"] = t["model.layers.0.self_attn.q_proj.weight"][:32].clone()
    _rewrite(folder, shrink)
    with pytest.raises(ModelLoadError, match=r"shape mismatch.*q_proj.*\(32, 64\).*\(64, 64\)"):
        load_model(folder, dtype="float32", device="cpu")


def test_unexpected_tensor(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    _rewrite(folder, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    with pytest.raises(ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.extra\.weight'"):
        load_model(folder, dtype="float32", device="cpu")


def test_unsupported_rope_type(hf_checkpoint):
    _, folder = hf_checkpoint("llama", rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 128})
    with pytest.raises(ModelLoadError, match="yarn"):
        load_model(folder, dtype="float32", device="cpu")


def test_kv_cache_sizing(hf_checkpoint):
    _, folder = hf_checkpoint("llama")
    _, spec = load_model(folder, dtype="float32", device="cpu")
    assert kv_bytes_per_token(spec) == 2 * 2 * 2 * 16 * 4
    assert choose_num_pages(spec, 16) == 65_536 // 16
    assert choose_num_pages(spec, 16, kv_cache_tokens=33) == 3
    cache = KVCache(spec, num_pages=5, page_size=16)
    assert cache.k[1].shape == (5, 16, 2, 16) and cache.flat(0)[0].shape == (80, 2, 16)
    assert cache.k[0].dtype == torch.float32 and not cache.k[0].any() and not cache.v[1].any()   # starts zeroed
    half = KVCache(spec, num_pages=3, page_size=16, dtype=torch.bfloat16)
    assert half.v[0].dtype == torch.bfloat16 and half.v[0].shape == (3, 16, 2, 16) and not half.v[0].any()


def test_loading_a_model_imports_no_compiler_machinery(hf_checkpoint):
    # A meta-device build's random init and to_empty import torch._dynamo and sympy (seconds of every
    # engine's start-up); the loader avoids both.
    _, folder = hf_checkpoint("llama")
    found = run_python(
        "import sys\n"
        "from tokabatch.engine.runtime.weights import load_model\n"
        f"load_model({str(folder)!r}, dtype='float32', device='cpu')\n"
        "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))")
    assert found.strip() == "[]"


@pytest.mark.parametrize("split", [1, 17, 36])
def test_merge_attention_equals_full(split):
    torch.manual_seed(split)
    q = torch.randn(5, 8, 16)
    k, v = torch.randn(37, 2, 16), torch.randn(37, 2, 16)
    full, full_lse = attention_with_lse(q, k, v)
    out_a, lse_a = attention_with_lse(q, k[:split], v[:split])
    out_b, lse_b = attention_with_lse(q, k[split:], v[split:])
    merged, merged_lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert (merged - full).abs().max().item() < 1e-5
    assert (merged_lse - full_lse).abs().max().item() < 1e-5


@pytest.mark.parametrize("heads, kv_heads", [(4, 2), (4, 4)])
def test_attention_without_lse_equals_the_reference(heads, kv_heads):
    torch.manual_seed(heads + kv_heads)
    q, k, v = torch.randn(3, 5, heads, 8), torch.randn(3, 11, kv_heads, 8), torch.randn(3, 11, kv_heads, 8)
    mask = torch.rand(3, 5, 11) < 0.6
    mask[..., 0] = True                  # every query may attend to something
    expected, _ = attention_with_lse(q, k, v, mask)
    assert (attention(q, k, v, mask) - expected).abs().max().item() < 1e-5
    assert attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask).dtype == torch.bfloat16


def test_attention_matches_sdpa_and_empty_rows():
    torch.manual_seed(0)
    q, k, v = torch.randn(7, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    mask = torch.ones(7, 9, dtype=torch.bool).tril(diagonal=2)
    mask[3] = False                      # a query that may attend to nothing: zero output, lse -inf
    out, lse = attention_with_lse(q, k, v, mask)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask).transpose(0, 1)
    keep = torch.arange(7) != 3
    assert (out[keep] - ref[keep]).abs().max().item() < 1e-5
    assert torch.all(out[3] == 0) and torch.all(torch.isinf(lse[3]))
    merged, _ = merge_attention(out, lse, out, lse)
    assert not torch.isnan(merged).any()
