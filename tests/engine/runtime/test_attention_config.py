"""The decode kernel each AttentionConfig picks (what flashinfer_ops.decode_wrapper is given): CPU,
the decision only; the kernels themselves are checked by the GPU tests."""

from __future__ import annotations

import pytest

from tokabatch.engine.runtime.attention import DEFAULT_ATTENTION, AttentionConfig

LLAMA_1B_HEADS = (32, 8)       # GQA group 4: flashinfer has a CUDA-core decode kernel for it
GROUP_16_HEADS = (64, 4)       # group 16: it has none


@pytest.mark.parametrize("config, plain, own", [
    (DEFAULT_ATTENTION, True, False),                                  # tensor cores; own parts on CUDA cores
    (AttentionConfig(decode_tensor_cores=False), False, False),
    (AttentionConfig(own_tensor_cores=None), True, True),              # own parts as the plain decode
    (AttentionConfig(decode_tensor_cores=False, own_tensor_cores=True), False, True),
])
def test_each_setting_picks_its_kernel_where_one_exists(config, plain, own):
    assert config.tensor_cores(*LLAMA_1B_HEADS) is plain
    assert config.tensor_cores(*LLAMA_1B_HEADS, own_parts=True) is own


@pytest.mark.parametrize("config", [DEFAULT_ATTENTION, AttentionConfig(decode_tensor_cores=False),
                                    AttentionConfig(own_tensor_cores=False)])
def test_a_group_without_a_cuda_core_kernel_always_takes_tensor_cores(config):
    assert config.tensor_cores(*GROUP_16_HEADS) and config.tensor_cores(*GROUP_16_HEADS, own_parts=True)


def test_the_group_kernel_is_one_flashinfer_has():
    assert DEFAULT_ATTENTION.group_kernel == "auto"
    assert AttentionConfig(group_kernel="fa2").group_kernel == "fa2"
    with pytest.raises(ValueError, match="group_kernel must be one of auto, fa2, fa3, not 'fa4'"):
        AttentionConfig(group_kernel="fa4")

