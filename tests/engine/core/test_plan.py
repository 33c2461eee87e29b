"""DecodeWorks and SampledTokens: a step's decode rows and sampled tokens as columns, read as
SeqWorks and SampledTokens where rows are wanted."""

from __future__ import annotations

import pytest

from tokabatch.engine.api import TokenLogprob
from tokabatch.engine.core.plan import DecodeWorks, SampledToken, SampledTokens, SeqWork, StepPlan, StepResult

ROWS = (SeqWork(7, (11,), 40, (1, 2, 3), sample=True), SeqWork(9, (12,), 17, (4, 5), sample=True))


def test_the_columns_hold_each_row_and_read_back_as_the_same_seqworks():
    works = DecodeWorks.of(ROWS)
    assert (works.seq_ids, works.token_ids, works.start_pos, works.page_ids) == ([7, 9], [11, 12], [40, 17],
                                                                                [(1, 2, 3), (4, 5)])
    assert tuple(works) == ROWS and works == ROWS and works[1] == ROWS[1] and works[1:] == ROWS[1:]
    assert repr(works) == repr(ROWS)                     # (plan digests hash the repr)
    prefill = SeqWork(3, (1, 2), 0, (6,), sample=True)
    assert works + (prefill,) == ROWS + (prefill,) and (prefill,) + works == (prefill,) + ROWS
    assert len(works) == 2 and works and not DecodeWorks.of(())


def test_select_keeps_the_rows_named_in_order():
    works = DecodeWorks.of(ROWS)
    assert works.select([1]) == ROWS[1:] and works.select([1, 0]) == (ROWS[1], ROWS[0])
    assert works.select([]) == ()


@pytest.mark.parametrize("row", [
    SeqWork(1, (1, 2), 0, (1,), sample=True),                              # two tokens: a prefill chunk
    SeqWork(1, (1,), 0, (1,), sample=False),
    SeqWork(1, (1,), 0, (1,), sample=True, prompt_logprobs=1, prompt_logprob_targets=(2,)),
    SeqWork(1, (1,), 0, (1,), sample=True, kv_cached=True),                # a cache hit goes with the prefills
])
def test_only_plain_decodes_are_decode_rows(row):
    with pytest.raises(ValueError, match="sequence 1: a decode runs one token"):
        DecodeWorks.of((row,))
    with pytest.raises(ValueError):
        StepPlan(0, (row,), ())


def test_a_plan_given_a_tuple_of_decodes_keeps_their_columns():
    plan = StepPlan(4, ROWS, ())
    assert isinstance(plan.decodes, DecodeWorks) and plan.decodes.seq_ids == [7, 9]
    assert plan.works == ROWS and plan.num_tokens == 2 and not plan.is_empty
    assert StepPlan(5, (), ()).is_empty


def test_sampled_tokens_hold_their_columns_and_read_back_as_rows():
    plain = SampledTokens([7, 9], [11, 12])
    assert plain.logprobs is None and tuple(plain) == (SampledToken(7, 11), SampledToken(9, 12))
    assert plain == [SampledToken(7, 11), SampledToken(9, 12)] and plain[1].token_id == 12 and len(plain) == 2
    lp = TokenLogprob(12, -0.5)
    rows = (SampledToken(7, 11), SampledToken(9, 12, lp))
    mixed = SampledTokens.of(rows)
    assert (mixed.seq_ids, mixed.token_ids, mixed.logprobs) == ([7, 9], [11, 12], [None, lp])
    assert mixed == rows and repr(mixed) == repr(rows) and mixed != plain
    assert SampledTokens.of(plain) is plain and SampledTokens.of(plain.rows).logprobs is None


def test_a_result_given_sampled_rows_keeps_their_columns():
    result = StepResult(3, (SampledToken(7, 11),))
    assert isinstance(result.sampled, SampledTokens) and result.sampled.seq_ids == [7]
    assert StepResult(4, ()).sampled == ()
