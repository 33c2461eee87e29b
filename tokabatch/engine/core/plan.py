"""StepPlan, PrefixGroup and StepResult: what the scheduler asks of the runner, and what comes back.

Ints, lists, tuples and floats only: the runner turns them into tensors. Pure stdlib.

One step is one forward pass over the tokens of `decodes` (one token per running sequence, as the
columns of a `DecodeWorks`) and `prefills` (chunks of prompts, or of prompt+output for a
recomputed sequence, one `SeqWork` each). Each row carries its sequence's whole page table, so
the runner needs no state of its own to attend.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import repeat
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

from tokabatch.engine.api import TokenLogprob


class SeqWork(NamedTuple):
    """The tokens one sequence runs in this step.

    The KV of `token_ids` is written at positions start_pos .. start_pos+len-1, and those tokens
    attend to every position before them through `page_ids` (position p lives in page
    page_ids[p // page_size] at slot p % page_size).

    A NamedTuple, not a dataclass: one is made per prefill chunk, and per decode row wherever a
    DecodeWorks is read as rows (decode_seq_work), and a tuple is built in about a third of the
    time of a frozen dataclass.
    """

    seq_id: int
    token_ids: tuple[int, ...]
    start_pos: int
    page_ids: tuple[int, ...]            # page table covering positions [0, start_pos + len(token_ids))
    sample: bool                         # sample the next token from the last position
    # Echo + logprobs: for position i of this chunk, the logprob of prompt_logprob_targets[i]
    # (the prompt token that follows it); the tuple may be one shorter than token_ids at the prompt's end.
    prompt_logprobs: int | None = None   # None: not wanted; k: with the top k alternatives
    prompt_logprob_targets: tuple[int, ...] = ()
    # The cache holds these tokens' KV already: a sequence whose every token was a prefix-cache hit
    # reruns its last one only to sample from it, and the runner sends its KV write to the scratch
    # page (the page it reads is shared, and holds the same token's KV at the same position).
    kv_cached: bool = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


_new_tuple = tuple.__new__


class _Columns:
    """Columns read as the tuple of their rows, made on first such use (iteration, indexing, repr):
    what DecodeWorks and SampledTokens share. `seq_ids` is a column of every subclass."""

    __slots__ = ("_rows",)
    seq_ids: list[int]

    def _make_rows(self) -> tuple:
        raise NotImplementedError

    @property
    def rows(self) -> tuple:
        if self._rows is None:
            self._rows = self._make_rows()
        return self._rows

    def __len__(self) -> int:
        return len(self.seq_ids)

    def __iter__(self) -> Iterator:
        return iter(self.rows)

    def __getitem__(self, index: int | slice) -> Any:
        return self.rows[index]          # (a row for an int, a tuple for a slice, as a tuple's)

    __hash__ = None                       # type: ignore[assignment]  (mutable lists inside)

    def __repr__(self) -> str:
        return repr(self.rows)            # (as the tuple of rows: plan digests do not change)


class DecodeWorks(_Columns):
    """A step's decode rows as columns: row i runs token_ids[i] at position start_pos[i] of
    sequence seq_ids[i] (pages page_ids[i]) and samples from it. What the scheduler builds and the
    runner, the prefix grouping and the step's bookkeeping read, column by column: building a
    SeqWork per row and step was most of the scheduler's per-row time (docs/benchmarks.md,
    "Columns read from the sequences do not pay"). As a sequence of SeqWorks (iteration, indexing,
    `+` with a tuple, ==, repr) it is the tuple of its rows, made on first such use: eager steps
    and tests read rows. Every row is a plain decode: one token, sampled, no prompt logprobs, its
    KV not cached (`of` checks the rows it is given). Treat it as immutable."""

    __slots__ = ("seq_ids", "token_ids", "start_pos", "page_ids")

    def __init__(self, seq_ids: list[int], token_ids: list[int], start_pos: list[int],
                 page_ids: list[tuple[int, ...]]) -> None:
        self.seq_ids, self.token_ids, self.start_pos, self.page_ids = seq_ids, token_ids, start_pos, page_ids
        self._rows: tuple[SeqWork, ...] | None = None

    @classmethod
    def of(cls, works: Iterable[SeqWork]) -> DecodeWorks:
        """The columns of `works`, which must be plain decodes (ValueError otherwise)."""
        if isinstance(works, DecodeWorks):
            return works
        works = tuple(works)
        for w in works:
            if len(w.token_ids) != 1 or not w.sample or w.prompt_logprobs is not None or w.kv_cached:
                raise ValueError(f"sequence {w.seq_id}: a decode runs one token, samples it, scores no "
                                 "prompt and is not a cache hit (a plan's prefills carry the others)")
        return cls([w.seq_id for w in works], [w.token_ids[0] for w in works], [w.start_pos for w in works],
                   [w.page_ids for w in works])

    def select(self, rows: Sequence[int]) -> DecodeWorks:
        """These rows only, in the order given."""
        return DecodeWorks([self.seq_ids[i] for i in rows], [self.token_ids[i] for i in rows],
                           [self.start_pos[i] for i in rows], [self.page_ids[i] for i in rows])

    def _make_rows(self) -> tuple[SeqWork, ...]:
        return tuple(map(decode_seq_work, self.seq_ids, self.token_ids, self.start_pos, self.page_ids))

    def __add__(self, other: tuple[SeqWork, ...]) -> tuple[SeqWork, ...]:
        return self.rows + tuple(other)

    def __radd__(self, other: tuple[SeqWork, ...]) -> tuple[SeqWork, ...]:
        return tuple(other) + self.rows

    def __eq__(self, other: object) -> bool:
        if isinstance(other, DecodeWorks):
            return (self.seq_ids == other.seq_ids and self.token_ids == other.token_ids
                    and self.start_pos == other.start_pos and self.page_ids == other.page_ids)
        return isinstance(other, tuple) and self.rows == other


def decode_seq_work(seq_id: int, token_id: int, start_pos: int, page_ids: tuple[int, ...]) -> SeqWork:
    """SeqWork(seq_id, (token_id,), start_pos, page_ids, sample=True), built without the keyword
    handling of the generated __new__ (a NamedTuple built this way is the cheapest record Python
    makes): a DecodeWorks' rows, when something reads them as rows."""
    return _new_tuple(SeqWork, (seq_id, (token_id,), start_pos, page_ids, True, None, (), False))


@dataclass(frozen=True, slots=True)
class PrefixGroup:
    """Decoding sequences that share pages start_page .. start_page+len(page_ids)-1 (Hydragen). A
    whole-sequence cache hit rerunning its last token (SeqWork.kv_cached, first among the prefills)
    is grouped as a decode is.

    A top-level group starts at page 0; a nested group (a few-shot block shared by a subset of a
    system-prompt group) starts where its parent group ends, so each sequence's groups tile its
    first pages consecutively and its own part is what follows the last one.
    """

    seq_ids: tuple[int, ...]
    page_ids: tuple[int, ...]            # the shared full pages, in position order
    num_tokens: int                      # len(page_ids) * page_size
    start_page: int = 0                  # index in each member's page table of page_ids[0]


@dataclass(frozen=True, slots=True)
class StepPlan:
    """`decodes` may be given as a tuple of SeqWorks (tests): it is kept as their DecodeWorks."""

    step_idx: int
    decodes: DecodeWorks                 # one token each, sampled
    prefills: tuple[SeqWork, ...]        # chunks, in admission order
    prefix_groups: tuple[PrefixGroup, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.decodes, DecodeWorks):
            object.__setattr__(self, "decodes", DecodeWorks.of(self.decodes))

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(w.num_tokens for w in self.prefills)

    @property
    def works(self) -> tuple[SeqWork, ...]:
        """Every row as a SeqWork (the decodes' made then): for eager steps and tests, not the decode path."""
        return self.decodes + self.prefills

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills


class SampledToken(NamedTuple):
    """One sampled token (a NamedTuple for the same reason as SeqWork: one per row per step)."""

    seq_id: int
    token_id: int
    logprob: TokenLogprob | None = None  # filled when the sequence asked for logprobs


class SampledTokens(_Columns):
    """A step's sampled tokens as columns: row i is token_ids[i], drawn for sequence seq_ids[i], with
    logprobs[i] when it asked for them (`logprobs` None: no row did). What the sampler returns and
    the step's bookkeeping reads, column by column (no SampledToken per row and step, as
    DecodeWorks). As a sequence of SampledTokens (iteration, indexing, ==, repr) it is the tuple of
    its rows, made on first such use. Treat it as immutable."""

    __slots__ = ("seq_ids", "token_ids", "logprobs")

    def __init__(self, seq_ids: list[int], token_ids: list[int],
                 logprobs: list[TokenLogprob | None] | None = None) -> None:
        self.seq_ids, self.token_ids, self.logprobs = seq_ids, token_ids, logprobs
        self._rows: tuple[SampledToken, ...] | None = None

    @classmethod
    def of(cls, tokens: Iterable[SampledToken]) -> SampledTokens:
        """The columns of `tokens` (logprobs None when no row has one)."""
        if isinstance(tokens, SampledTokens):
            return tokens
        tokens = tuple(tokens)
        logprobs = [t.logprob for t in tokens]
        return cls([t.seq_id for t in tokens], [t.token_id for t in tokens],
                   logprobs if any(lp is not None for lp in logprobs) else None)

    def _make_rows(self) -> tuple[SampledToken, ...]:
        logprobs = self.logprobs if self.logprobs is not None else repeat(None)
        return tuple(map(_new_tuple, repeat(SampledToken), zip(self.seq_ids, self.token_ids, logprobs)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, SampledTokens):
            return self.rows == other.rows
        return isinstance(other, (tuple, list)) and self.rows == tuple(other)


@dataclass(frozen=True, slots=True)
class StepResult:
    """`sampled` may be given as SampledToken rows (tests, simple runners): it is kept as their columns."""

    step_idx: int
    sampled: SampledTokens               # one per sampled row (decodes, then prefills that sample), in plan order
    prompt_logprobs: tuple[tuple[int, tuple[TokenLogprob, ...]], ...] = ()  # (seq_id, per chunk position)
    num_forward_tokens: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.sampled, SampledTokens):
            object.__setattr__(self, "sampled", SampledTokens.of(self.sampled))
