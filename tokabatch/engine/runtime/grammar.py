"""Constrained decoding: each constrained row's allowed next tokens, from its grammar (llguidance).

Owns the grammar matchers of the sequences whose SamplingParams carry a `grammar` (llguidance's
grammar text, built by the service from a JSON schema, a regex, a choice list or an EBNF grammar:
service/jobs/structured.py) and turns their states into the masks of a step's constrained rows. llguidance was
chosen over xgrammar for two reasons that matter here: it needs no torch (the service compiles and
checks every line's grammar at validation without loading torch), and it computes a row's mask
in microseconds from the tokenizer's byte trie, with no per-schema precompilation (the engine
keeps each grammar's first matcher and hands out copies of it: `matcher`).

The tokenizer llguidance needs is built once, on the first constrained request, from the model's
tokenizer.json (about a second for a 50k vocabulary). The masks are computed on the CPU for the
constrained rows only, on one grammar thread (llguidance's executor spreads the rows over its own
threads and releases the GIL), sent to the device packed, and unpacked and applied there;
unconstrained rows never pay for them. As soon as a step's tokens are known the sampler hands them
to the grammar thread, which advances the matchers and makes their next masks while the engine
thread schedules and launches the next step.
Torch + llguidance only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor

from tokabatch.errors import InvalidRequest

CACHED_GRAMMARS = 256


class Grammars:
    """Makes matchers for grammars and the masks of a step's constrained rows."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.vocab_size = vocab_size
        self._tokenizer_json = tokenizer_json
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None
        self._executor = None
        self._thread: ThreadPoolExecutor | None = None
        self._first_matchers: OrderedDict[str, object] = OrderedDict()     # grammar text -> its first matcher
        # Counters (benchmarks/structured.py): masks made, their rows and seconds on the grammar
        # thread, its seconds advancing matchers, and the seconds the engine thread waited for both.
        self.mask_calls = self.mask_rows = 0
        self.mask_seconds = self.consume_seconds = self.wait_seconds = 0.0
        self._bits: dict[torch.device, Tensor] = {}

    def _tokenizer(self):
        import llguidance

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                        eos_token=self._eos_token_ids or None)
            self._executor = llguidance.LLExecutor()
        return self._ll_tokenizer

    def matcher(self, grammar: str):
        """A fresh matcher at the grammar's start; InvalidRequest for a grammar llguidance refuses.

        A copy of the grammar's first matcher (kept, never advanced, for the last CACHED_GRAMMARS
        grammars): building one from the text compiles the grammar again, a copy does not, takes a
        fraction of the memory, and shares the lexer states the other copies built, so masks cost
        less (docs/benchmarks.md, "matchers as copies")."""
        import llguidance

        first = self._first_matchers.get(grammar)
        if first is None:
            first = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
            if first.is_error():
                raise InvalidRequest(f"The output format cannot be used: {first.get_error()}",
                                     param="response_format", code="invalid_value")
            self._first_matchers[grammar] = first
            while len(self._first_matchers) > CACHED_GRAMMARS:
                self._first_matchers.popitem(last=False)
        else:
            self._first_matchers.move_to_end(grammar)
        return first.deep_copy()

    def masks_async(self, matchers: list, pinned: bool) -> Future:
        """Start computing the packed masks of `matchers` (bit j of word w of row i: token 32w+j is
        allowed) on the grammar thread; its result is an int32 [rows, words] CPU tensor, in pinned
        memory when `pinned` (a GPU's copy from pageable memory would wait for the step it runs).
        llguidance lets go of the GIL while it works, so the engine's thread goes on meanwhile.
        Do not touch these matchers until the result is in."""
        return self._submit(self._masks, list(matchers), pinned)

    def advance_async(self, matchers: list, tokens: list[int], pinned: bool) -> Future:
        """Advance each matcher by its row's sampled token, then make the masks of those not stopped,
        all on the grammar thread (the engine thread only queues it). The result: (the matchers
        going on, their packed masks as masks_async makes them, or None when none goes on). A token
        the grammar refuses leaves its matcher in the error state, whose next mask lets the row end.
        Do not touch these matchers until the result is in."""
        return self._submit(self._advance, list(matchers), list(tokens), pinned)

    def wait(self, job: Future):
        """The result of `masks_async` or `advance_async`, counting the seconds spent waiting for it."""
        began = time.perf_counter()
        try:
            return job.result()
        finally:
            self.wait_seconds += time.perf_counter() - began

    def _submit(self, fn, *args) -> Future:
        if self._thread is None:                    # (matchers exist, so the executor does)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokabatch-grammar")
        return self._thread.submit(fn, *args)

    def _advance(self, matchers: list, tokens: list[int], pinned: bool) -> tuple[list, Tensor | None]:
        began = time.perf_counter()
        self._executor.consume_token_par(list(zip(matchers, tokens)))
        self.consume_seconds += time.perf_counter() - began
        going_on = [m for m in matchers if not m.is_stopped()]
        return going_on, self._masks(going_on, pinned) if going_on else None

    def _masks(self, matchers: list, pinned: bool) -> Tensor:
        began = time.perf_counter()
        words = (self.vocab_size + 31) // 32
        bitmask = torch.full((len(matchers), words), -1, dtype=torch.int32, pin_memory=pinned)
        self._executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)], bitmask.data_ptr(),
                                               words * 4, len(matchers))
        self.mask_calls += 1
        self.mask_rows += len(matchers)
        self.mask_seconds += time.perf_counter() - began
        return bitmask

    def blocked(self, packed: Tensor) -> Tensor:
        """Packed masks (int32 [rows, words], on the device that will use them) -> [rows, vocab] bool:
        True where the token is NOT allowed. One elementwise pass on the device; nothing waits."""
        bits = self._bits.get(packed.device)
        if bits is None:                            # 1 << j as int32 (bit 31 is the sign bit)
            bits = self._bits[packed.device] = torch.tensor([1 << j for j in range(31)] + [-(1 << 31)],
                                                            dtype=torch.int32).to(packed.device)
        rows, words = packed.shape
        return ((packed.unsqueeze(-1) & bits) == 0).reshape(rows, words * 32)[:, :self.vocab_size]


__all__ = ["Grammars"]
