"""flashinfer's fused layer kernels and draw (flashinfer_kernels.py) against the torch ones they replace.

GPU machine only (marked `gpu`; skipped without CUDA or flashinfer). Each kernel on the shapes of
Llama-3.2-1B (llama3 rotary scaling, positions up to 100k) and Qwen2.5-0.5B, within bf16 rounding of
torch's LayerKernels; a two-layer model's logits with either set within the backends' tolerance;
the fused draws' token frequencies against the softmax at three temperatures, and seeded
reproduction through the sampler's shared generator: flashinfer's and the one-pass inverse-CDF
Triton draw (triton_draw.py, where triton imports).
"""

from __future__ import annotations

import math

import pytest
import torch

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)
pytest.importorskip("flashinfer")

from tests.engine.runtime.test_cuda_graphs import QWEN_05B  # noqa: E402
from tests.engine.runtime.test_flashinfer import LLAMA_1B, PAGE, Driver, random_model  # noqa: E402
from tokabatch.engine.api import SamplingParams  # noqa: E402
from tokabatch.engine.models.layers import LayerKernels  # noqa: E402
from tokabatch.engine.runtime.flashinfer_backend import FlashInferBackend  # noqa: E402
from tokabatch.engine.runtime.flashinfer_kernels import FlashInferLayerKernels  # noqa: E402
from tokabatch.engine.runtime.flashinfer_kernels import draw_from_logits as flashinfer_draw  # noqa: E402
from tokabatch.engine.runtime.kv_cache import KVCache  # noqa: E402
from tokabatch.engine.runtime.sampling import Sampler  # noqa: E402

DEV = torch.device("cuda")


def _draws() -> list:
    flashinfer = pytest.param(flashinfer_draw, id="flashinfer")
    try:
        from tokabatch.engine.runtime.triton_draw import draw_from_logits as triton_draw
    except ImportError as e:
        return [flashinfer, pytest.param(None, id="triton", marks=pytest.mark.skip(reason=f"triton: {e}"))]
    return [flashinfer, pytest.param(triton_draw, id="triton")]


DRAWS = pytest.mark.parametrize("draw_from_logits", _draws())
CONFIGS = pytest.mark.parametrize("config", [LLAMA_1B, QWEN_05B], ids=["llama-3.2-1b", "qwen2.5-0.5b"])


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@CONFIGS
@torch.inference_mode()
def test_each_kernel_matches_torch(config: dict) -> None:
    model, spec = random_model(config, num_layers=1)
    torch_k = LayerKernels(model.rotary)
    fused = FlashInferLayerKernels(model.rotary, spec.max_position_embeddings, DEV)
    gen = torch.Generator(device=DEV).manual_seed(0)
    n, hq, hk, d = 300, spec.num_heads, spec.num_kv_heads, spec.head_dim
    positions = torch.randint(0, min(100_000, spec.max_position_embeddings), (n,), generator=gen, device=DEV)
    qkv = torch.randn(n, hq + 2 * hk, d, generator=gen, device=DEV).to(torch.bfloat16)
    want = torch_k.rotate_qk(qkv[:, :hq + hk], hq, torch_k.rotary_state(positions, torch.bfloat16))
    got_qkv = qkv.clone()
    got = fused.rotate_qk(got_qkv[:, :hq + hk], hq, fused.rotary_state(positions, torch.bfloat16))
    assert rel_err(got, want) < 1e-2, "rotary"
    assert torch.equal(got_qkv[:, hq + hk:], qkv[:, hq + hk:]), "rotary touched v"

    norm = model.layers[0].attn_norm
    x = torch.randn(n, spec.hidden_size, generator=gen, device=DEV).to(torch.bfloat16)
    residual = torch.randn(n, spec.hidden_size, generator=gen, device=DEV).to(torch.bfloat16)
    want_h, want_r = torch_k.add_rms_norm(x.clone(), residual.clone(), norm)
    got_h, got_r = fused.add_rms_norm(x.clone(), residual.clone(), norm)
    assert rel_err(got_h, want_h) < 1e-2 and rel_err(got_r, want_r) < 1e-2, "residual + RMSNorm"
    want_h, want_r = torch_k.add_rms_norm(x.clone(), None, norm)
    got_h, got_r = fused.add_rms_norm(x.clone(), None, norm)
    assert rel_err(got_h, want_h) < 1e-2 and torch.equal(got_r, x), "first RMSNorm"

    gate_up = torch.randn(n, 2 * 512, generator=gen, device=DEV).to(torch.bfloat16)
    assert rel_err(fused.silu_mul(gate_up), torch_k.silu_mul(gate_up)) < 1e-2, "SwiGLU"


@CONFIGS
def test_model_logits_match_with_either_kernel_set(config: dict) -> None:
    model, spec = random_model(config)
    streams = [[(7 * i + 3 * j) % spec.vocab_size for j in range(140)] for i in range(4)]
    tables = [tuple(range(i * 10, i * 10 + 10)) for i in range(4)]
    steps = [[(i, 130) for i in range(4)]] + [[(i, 1) for i in range(4)] for _ in range(6)]
    runs = {}
    for name, kernels in (("torch", LayerKernels(model.rotary)),
                          ("flashinfer", FlashInferLayerKernels(model.rotary, spec.max_position_embeddings, DEV))):
        model.use_kernels(kernels)
        driver = Driver(model, FlashInferBackend(KVCache(spec, num_pages=41, page_size=PAGE), spec.num_heads),
                        streams, tables)
        runs[name] = [driver.step(chunks) for chunks in steps]
    for step, (got, want) in enumerate(zip(runs["flashinfer"], runs["torch"])):
        rel = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max().item()
        assert rel < 2e-2, f"step {step}: max relative error {rel:.3g}"


@DRAWS
@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_fused_draw_follows_the_softmax(temperature: float, draw_from_logits) -> None:
    logits = [2.0, 1.5, 1.2, 0.9, 0.3, -0.2, -1.0, 0.5]
    num = 40_000
    sampler = Sampler(len(logits), DEV, (7,), seed=1, draw=draw_from_logits)
    for seq in range(num):
        sampler.register(seq, SamplingParams(temperature=temperature), [])
    rows = torch.tensor([logits] * num, device=DEV, dtype=torch.bfloat16)
    tokens = torch.tensor([t.token_id for t in sampler.sample(list(range(num)), rows)])
    observed = (torch.bincount(tokens, minlength=len(logits)).double() / num).tolist()
    z = sum(math.exp(x / temperature) for x in logits)
    expected = [math.exp(x / temperature) / z for x in logits]
    assert max(abs(o - e) for o, e in zip(observed, expected)) < 0.01, (observed, expected)


@DRAWS
def test_fused_draw_follows_the_softmax_over_a_large_vocabulary_with_masked_tokens(draw_from_logits) -> None:
    """Twelve tokens spread over Llama's 128,256 ids (the inverse-CDF draw's columns and the last,
    partial one), every other token masked to -inf: the frequencies follow their softmax and no
    masked token is ever drawn."""
    vocab, num = 128256, 20_000
    ids = torch.tensor([0, 5, 4095, 4096, 8193, 50_000, 77_777, 100_003, 127_999, 128_000, 128_254, 128_255])
    values = torch.linspace(-1.0, 2.0, len(ids))
    row = torch.full((vocab,), float("-inf"))
    row[ids] = values
    logits = row.to(DEV, torch.bfloat16).expand(num, vocab)         # (one row read num times)
    tokens = draw_from_logits(logits, 1.0, torch.Generator(device=DEV).manual_seed(5)).long().cpu()
    assert set(tokens.tolist()) <= set(ids.tolist())
    observed = torch.bincount(tokens, minlength=vocab)[ids].double() / num
    expected = torch.softmax(values.to(torch.bfloat16).double(), 0)
    assert (observed - expected).abs().max().item() < 0.01, (observed, expected)


@DRAWS
def test_fused_draw_reproduces_from_the_sampler_seed_and_mixes_temperatures(draw_from_logits) -> None:
    gen = torch.Generator(device=DEV).manual_seed(3)
    logits = torch.randn(64, 128256, generator=gen, device=DEV).to(torch.bfloat16)

    def draws(seed: int) -> list[int]:
        sampler = Sampler(128256, DEV, (2,), seed=seed, draw=draw_from_logits)
        for seq in range(64):
            sampler.register(seq, SamplingParams(temperature=0.5 + seq / 64), [])
        return [t.token_id for t in sampler.sample(list(range(64)), logits)]

    assert draws(11) == draws(11)
    assert draws(11) != draws(12)
    # Each row's own temperature and logits: a token 20 above the rest is drawn (p > 0.999 at T <= 1).
    targets = torch.randint(0, 128256, (64,), generator=gen, device=DEV)
    logits[torch.arange(64, device=DEV), targets] += 20
    sampler = Sampler(128256, DEV, (2,), seed=11, draw=draw_from_logits)
    for seq in range(64):
        sampler.register(seq, SamplingParams(temperature=0.2 + seq / 80), [])
    assert [t.token_id for t in sampler.sample(list(range(64)), logits)] == targets.tolist()
