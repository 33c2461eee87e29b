"""Constrained decoding: each constrained row's allowed next tokens, from its grammar (llguidance).

Owns the grammar matchers of the sequences whose SamplingParams carry a `grammar` (llguidance's
grammar text, built by the service from a JSON schema, a regex, a choice list or an EBNF grammar:
tokabatch/grammars.py) and turns their states into one boolean mask per step. llguidance was
chosen over xgrammar for two reasons that matter here: it needs no torch (the service compiles and
checks every line's grammar at validation without loading torch), and it computes a row's mask
in microseconds from the tokenizer's byte trie, with no per-schema precompilation to cache.

The tokenizer llguidance needs is built once, on the first constrained request, from the model's
tokenizer.json (about a second for a 50k vocabulary). The masks are computed on the CPU for the
constrained rows only (llguidance's executor spreads the rows over threads), sent to the device,
and applied there; unconstrained rows never pay for them. Torch + llguidance only.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from tokabatch.errors import InvalidRequest


class Grammars:
    """Makes matchers for grammars and the masks of a step's constrained rows."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer_json = tokenizer_json
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None
        self._executor = None
        self._shifts: dict[torch.device, Tensor] = {}

    def _tokenizer(self):
        import llguidance

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                        eos_token=self._eos_token_ids or None)
            self._executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def matcher(self, grammar: str):
        """A fresh matcher at the grammar's start; InvalidRequest for a grammar llguidance refuses."""
        import llguidance

        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequest(f"The output format cannot be used: {matcher.get_error()}",
                                 param="response_format", code="invalid_value")
        return matcher

    def allowed(self, matchers: list, device: torch.device) -> Tensor:
        """[rows, vocab] bool on `device`: the tokens each matcher accepts next (EOS once it may end).
        The packed mask (a bit per token) goes to the device, which unpacks it. Nothing here waits
        for the device: on a GPU the mask is written into pinned memory (a copy from pageable memory
        would first wait for the step the GPU is running) and the bit shifts live on the device, so
        the CPU computes the masks while the GPU runs the step's forward."""
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32, pin_memory=device.type == "cuda")
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               words * 4, len(matchers))
        packed = bitmask.to(device, non_blocking=True)
        bits = (packed.unsqueeze(-1) >> self._bit_shifts(device)) & 1     # [rows, words, 32]: token 32w+j
        return bits.reshape(len(matchers), words * 32)[:, :self.vocab_size].bool()

    def _bit_shifts(self, device: torch.device) -> Tensor:
        shifts = self._shifts.get(device)
        if shifts is None:
            shifts = self._shifts[device] = torch.arange(32, dtype=torch.int32, device=device)
        return shifts

    def consume(self, matchers: list, tokens: list[int]) -> None:
        """Advance each matcher by its row's sampled token (llguidance's threads, in parallel). A token
        the grammar refuses leaves its matcher in the error state, whose next mask lets the row end."""
        self._executor.consume_token_par(list(zip(matchers, tokens)))


__all__ = ["Grammars"]
