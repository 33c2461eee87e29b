"""Constrained decoding: each constrained row's allowed next tokens, from its grammar (llguidance).

Owns the grammar matchers of the sequences whose SamplingParams carry a `grammar` (llguidance's
grammar text, built by the service from a JSON schema, a regex, a choice list or an EBNF grammar:
service/jobs/structured.py) and turns their states into the masks of a step's constrained rows. llguidance was
chosen over xgrammar for two reasons that matter here: it needs no torch (the service compiles and
checks every line's grammar at validation without loading torch), and it computes a row's mask
in microseconds from the tokenizer's byte trie, with no per-schema precompilation (the engine
keeps first matchers of each grammar and hands out copies of them: `matcher`).

The tokenizer llguidance needs is built once, on the first constrained request, from the model's
tokenizer.json (about a second for a 50k vocabulary). The masks are computed on the CPU for the
constrained rows only, sent to the device packed, and unpacked and applied there; unconstrained
rows never pay for them. As soon as a step's tokens are known the sampler hands them to the grammar
thread, which advances the matchers and makes their next masks while the engine thread schedules
and launches the next step.

Threads. The copies of one first matcher share the lexer states it builds, and two threads working
on copies of one first matcher at once take turns (docs/benchmarks.md, "Mask threads"). So each
grammar keeps one first matcher per mask thread (made when a copy is first wanted on that
thread), a copy stays on the thread of its first matcher (handed out round-robin), and a step's
rows run on their threads at once: the grammar thread takes one share, helper threads the others,
each through a one-thread llguidance executor, which releases the GIL. Advancing a row and making
its next mask happen in one share, so a step's rows cost each thread one start and one return,
and the process's GIL switch interval is shortened (GIL_SWITCH_INTERVAL_S) so that those do not
wait behind the engine thread's Python.
Torch + llguidance only.
"""

from __future__ import annotations

import os
import sys
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Sequence

import torch
from torch import Tensor

from tokabatch.errors import InvalidRequest

CACHED_GRAMMARS = 256
# The engine process's GIL switch interval once masks are made (Python's default: 5 ms; the whole
# process's where the engine runs in-process, as in `tokabatch run`). Each mask thread takes the
# GIL to start its share and to return; while the engine thread runs Python (scheduling,
# launching), each of those waits up to one interval (docs/benchmarks.md, "The GIL").
GIL_SWITCH_INTERVAL_S = 0.00005


def default_threads() -> int:
    """llguidance's own default for its executor: 80% of the cores, at least 1, at most 32."""
    return min(32, max(1, (os.cpu_count() or 1) * 4 // 5))


class Grammars:
    """Makes matchers for grammars and the masks of a step's constrained rows."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: Sequence[int],
                 threads: int | None = None) -> None:
        self.vocab_size = vocab_size
        self.threads = threads or default_threads()
        self._tokenizer_json = tokenizer_json
        self._eos_token_ids = list(eos_token_ids)
        self._ll_tokenizer = None
        self._executors: list = []                  # one single-thread llguidance executor per mask thread
        self._thread: ThreadPoolExecutor | None = None     # the grammar thread
        self._helpers: ThreadPoolExecutor | None = None    # the other mask threads
        # grammar text -> its first matchers by mask thread (made on demand, never advanced)
        self._first_matchers: OrderedDict[str, dict[int, object]] = OrderedDict()
        self._thread_of: dict[int, int] = {}        # id(matcher handed out) -> its mask thread
        self._handed_out = 0
        # Counters (benchmarks/structured.py): masks made, their rows and the grammar thread's
        # seconds making them (with the advance before them), and the seconds the engine waited.
        self.mask_calls = self.mask_rows = 0
        self.mask_seconds = self.wait_seconds = 0.0
        self._bits: dict[torch.device, Tensor] = {}

    def _tokenizer(self):
        import llguidance

        if self._ll_tokenizer is None:
            self._ll_tokenizer = llguidance.LLTokenizer(self._tokenizer_json, n_vocab=self.vocab_size,
                                                        eos_token=self._eos_token_ids or None)
            self._executors = [llguidance.LLExecutor(num_threads=1) for _ in range(self.threads)]
            if sys.getswitchinterval() > GIL_SWITCH_INTERVAL_S:
                sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        return self._ll_tokenizer

    def matcher(self, grammar: str):
        """A fresh matcher at the grammar's start; InvalidRequest for a grammar llguidance refuses.

        A copy of a kept first matcher of the grammar (never advanced; kept for the last
        CACHED_GRAMMARS grammars): building one from the text compiles the grammar again, a copy
        does not, takes a fraction of the memory, and shares the lexer states the other copies of
        that first matcher built, so masks cost less (docs/benchmarks.md, "matchers as copies").
        Matchers go to the mask threads in turn, each copied from its thread's first matcher."""
        import llguidance

        firsts = self._first_matchers.get(grammar)
        if firsts is not None:
            self._first_matchers.move_to_end(grammar)
        thread = self._handed_out % self.threads
        first = firsts.get(thread) if firsts is not None else None
        if first is None:
            first = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0)
            if first.is_error():
                raise InvalidRequest(f"The output format cannot be used: {first.get_error()}",
                                     param="response_format", code="invalid_value")
            if firsts is None:
                firsts = self._first_matchers[grammar] = {}
                while len(self._first_matchers) > CACHED_GRAMMARS:
                    self._first_matchers.popitem(last=False)
            firsts[thread] = first
        self._handed_out += 1
        copy = first.deep_copy()
        self._thread_of[id(copy)] = thread
        return copy

    def release(self, matcher) -> None:
        """Forget a matcher `matcher()` made (its sequence ended)."""
        self._thread_of.pop(id(matcher), None)

    def masks_async(self, matchers: list, pinned: bool) -> Future:
        """Start computing the packed masks of `matchers` (bit j of word w of row i: token 32w+j is
        allowed) on the mask threads; its result is an int32 [rows, words] CPU tensor, in pinned
        memory when `pinned` (a GPU's copy from pageable memory would wait for the step it runs).
        llguidance lets go of the GIL while it works, so the engine's thread goes on meanwhile.
        Do not touch these matchers until the result is in."""
        return self._submit(self._masks, list(matchers), pinned)

    def advance_async(self, matchers: list, tokens: list[int], pinned: bool) -> Future:
        """Advance each matcher by its row's sampled token, then make its next mask, all on the mask
        threads (the engine thread only queues it): the result is as masks_async's, one row per
        matcher. A stopped matcher's mask allows only EOS; a token the grammar refuses leaves its
        matcher in the error state, whose mask does the same, so the row can end.
        Do not touch these matchers until the result is in."""
        return self._submit(self._masks, list(matchers), pinned, list(tokens))

    def wait(self, job: Future):
        """The result of `masks_async` or `advance_async`, counting the seconds spent waiting for it."""
        began = time.perf_counter()
        try:
            return job.result()
        finally:
            self.wait_seconds += time.perf_counter() - began

    def _submit(self, fn, *args) -> Future:
        if self._thread is None:                    # (matchers exist, so the executors do)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="tokabatch-grammar")
        return self._thread.submit(fn, *args)

    def _on_threads(self, work, items: list) -> None:
        """Call work(executor, share) for each mask thread's share of `items` (matcher, value) pairs,
        the threads at once: a matcher's share is its thread's (a matcher this object did not hand
        out goes to any). Returns, or raises the first error, only when every share is done (they
        write into the caller's buffer)."""
        shares: list[list] = [[] for _ in range(self.threads)]
        thread_of = self._thread_of
        for i, item in enumerate(items):
            shares[thread_of.get(id(item[0]), i % self.threads)].append(item)
        jobs = [(ex, share) for ex, share in zip(self._executors, shares) if share]
        if len(jobs) > 1 and self._helpers is None:
            self._helpers = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="tokabatch-grammar-helper")
        helped = [self._helpers.submit(work, ex, share) for ex, share in jobs[1:]]
        error = None
        try:
            if jobs:
                work(*jobs[0])
        except Exception as exc:  # noqa: BLE001 (raised below, once the helpers are done)
            error = exc
        for job in helped:
            failed = job.exception()              # (waits for it)
            error = error or failed
        if error is not None:
            raise error

    def _masks(self, matchers: list, pinned: bool, tokens: list[int] | None = None) -> Tensor:
        """One packed mask row per matcher, in order; with `tokens`, each matcher consumes its row's
        token first, on the same thread in the same share (no barrier between the two)."""
        began = time.perf_counter()
        words = (self.vocab_size + 31) // 32
        rows = len(matchers)
        bitmask = torch.empty((rows, words), dtype=torch.int32, pin_memory=pinned)   # every row written
        ptr = bitmask.data_ptr()

        def work(ex, share: list) -> None:          # share: [(matcher, (row, token))]
            if tokens is not None:
                ex.consume_token_par([(m, token) for m, (_, token) in share])
            ex.unsafe_compute_mask_ptr([(m, row) for m, (row, _) in share], ptr, words * 4, rows)

        self._on_threads(work, [(m, (i, tokens[i] if tokens is not None else None)) for i, m in enumerate(matchers)])
        self.mask_calls += 1
        self.mask_rows += rows
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


__all__ = ["Grammars", "default_threads"]
