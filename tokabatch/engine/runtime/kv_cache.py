"""The paged KV cache: one K and one V tensor per layer, and how many pages fit.

Layout per layer: K and V each [num_pages, page_size, num_kv_heads, head_dim] (flashinfer's "NHD"
paged layout, so a faster backend can use the same tensors). Token position p of a sequence lives
in page page_ids[p // page_size] at offset p % page_size; its flat slot is
page * page_size + offset. Page bookkeeping (which pages are free) is engine/core's job, not this
module's. `reserved_pages` extra pages at the end belong to no sequence: the first is the scratch
page where padded CUDA-graph rows write their K/V (harmless, nobody reads it as context). Must not
import the service or engine/core scheduling code.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from tokabatch.engine.runtime.weights import ModelSpec
from tokabatch.errors import ConfigError

CPU_DEFAULT_KV_TOKENS = 65_536


def zeroed(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """torch.zeros(shape), and on the CPU without writing it: numpy's zeros come from calloc, whose
    large blocks are pages the OS hands over zeroed when first touched. A CPU cache then costs no
    memset at start-up and no resident memory for the pages no sequence has reached."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    numel = math.prod(shape)
    raw = torch.from_numpy(np.zeros(numel * dtype.itemsize, dtype=np.uint8))
    return raw.view(dtype).view(shape)


class KVCache:
    def __init__(self, spec: ModelSpec, num_pages: int, page_size: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 reserved_pages: int = 0) -> None:
        """`num_pages` usable pages (what the scheduler's pool gets) plus `reserved_pages` after them."""
        if num_pages < 1 or page_size < 1 or reserved_pages < 0:
            raise ConfigError(f"KV cache needs at least one page of at least one token "
                              f"(num_pages={num_pages}, page_size={page_size})")
        self.num_pages, self.page_size = num_pages, page_size
        self.scratch_page = num_pages if reserved_pages else None
        self.dtype = dtype or spec.dtype
        self.device = torch.device(device) if device is not None else spec.device
        shape = (spec.num_layers, num_pages + reserved_pages, page_size, spec.num_kv_heads, spec.head_dim)
        # One allocation each for K and V; per-layer views index into them.
        self._k = zeroed(shape, self.dtype, self.device)
        self._v = zeroed(shape, self.dtype, self.device)
        self.k: list[Tensor] = list(self._k.unbind(0))
        self.v: list[Tensor] = list(self._v.unbind(0))

    def split(self, parts: int) -> list["KVCache"]:
        """Disjoint sub-caches over this one's pages (no copy): `parts` equal slices of all its pages,
        each with its last page reserved as its scratch page. For engines that run several
        schedulers over one model, each with its own page pool (page ids local to the part)."""
        total = self._k.shape[1]
        per_part = total // parts
        if parts < 1 or per_part < 2:
            raise ConfigError(f"cannot split {total} KV pages into {parts} parts of at least 2 pages")
        out = []
        for i in range(parts):
            part = object.__new__(KVCache)
            part.num_pages, part.page_size = per_part - 1, self.page_size
            part.scratch_page = per_part - 1
            part.dtype, part.device = self.dtype, self.device
            part._k = self._k[:, i * per_part:(i + 1) * per_part]
            part._v = self._v[:, i * per_part:(i + 1) * per_part]
            part.k, part.v = list(part._k.unbind(0)), list(part._v.unbind(0))
            out.append(part)
        return out

    @property
    def num_tokens(self) -> int:
        """Usable token slots (reserved pages excluded)."""
        return self.num_pages * self.page_size

    def flat(self, layer_idx: int) -> tuple[Tensor, Tensor]:
        """K and V of one layer as [num_pages * page_size, num_kv_heads, head_dim] views (by slot)."""
        k, v = self.k[layer_idx], self.v[layer_idx]
        return k.view(-1, *k.shape[2:]), v.view(-1, *v.shape[2:])


def kv_bytes_per_token(spec: ModelSpec, dtype: torch.dtype | None = None) -> int:
    """Bytes of K+V that one token takes over all layers."""
    elem = torch.empty((), dtype=dtype or spec.dtype).element_size()
    return 2 * spec.num_layers * spec.num_kv_heads * spec.head_dim * elem


def num_pages_for_tokens(num_tokens: int, page_size: int) -> int:
    """Pages holding at least `num_tokens` tokens."""
    return max(1, -(-num_tokens // page_size))


def num_pages_from_free_memory(spec: ModelSpec, page_size: int, memory_fraction: float = 0.9,
                               reserve_bytes: int = 0, dtype: torch.dtype | None = None) -> int:
    """GPU sizing: pages that fit in `memory_fraction` of the device's free memory minus `reserve_bytes`.

    Call it after the model is loaded and a warm-up step (largest activations) has run, so free
    memory already excludes weights and workspace; `reserve_bytes` covers what is still to come
    (CUDA graphs, sampler buffers).
    """
    if spec.device.type != "cuda":
        raise ConfigError("sizing the KV cache from free memory needs a CUDA device")
    free_bytes, _total = torch.cuda.mem_get_info(spec.device)
    budget = int(free_bytes * memory_fraction) - reserve_bytes
    page_bytes = kv_bytes_per_token(spec, dtype) * page_size
    if budget < page_bytes:
        raise ConfigError(f"not enough free GPU memory for one KV page ({free_bytes} bytes free)")
    return budget // page_bytes


def choose_num_pages(spec: ModelSpec, page_size: int, kv_cache_tokens: int | None = None,
                     memory_fraction: float = 0.9) -> int:
    """The page count: from an explicit token budget, else 65,536 tokens on CPU, else free GPU memory."""
    if kv_cache_tokens is not None:
        return num_pages_for_tokens(kv_cache_tokens, page_size)
    if spec.device.type == "cuda":
        return num_pages_from_free_memory(spec, page_size, memory_fraction)
    return num_pages_for_tokens(CPU_DEFAULT_KV_TOKENS, page_size)
