"""Constrained sampling: the sampler draws only what a row's grammar allows next (llguidance masks
from the demo model's tokenizer), unconstrained rows of the same step are untouched, and a grammar
the matcher refuses is the request's 400. CPU, random logits."""

from __future__ import annotations

import json
import re
import time

import llguidance
import pytest
import torch

from tests.conftest import demo_model_ready
from tokabatch import model_store
from tokabatch.engine.api import SamplingParams
from tokabatch.engine.runtime.grammar import Grammars
from tokabatch.engine.runtime.sampling import Sampler
from tokabatch.errors import InvalidRequest
from tokabatch.service.jobs.structured import json_schema_grammar

pytestmark = pytest.mark.skipif(not demo_model_ready(), reason="needs the demo model's tokenizer")


@pytest.fixture(scope="module")
def tokenizer():
    from tokabatch.text import Tokenizer

    return Tokenizer.from_folder(model_store.resolve_model_path("demo"))


@pytest.fixture(scope="module")
def grammars(tokenizer):
    """Two mask threads (also on a one-core machine), so every test below splits its rows."""
    return Grammars(tokenizer.to_json(), 49152, tokenizer.eos_token_ids, threads=2)


def _run(sampler, tokenizer, params_by_row, steps=60, seed=0):
    """Sample rows on random logits until each ends (EOS) or `steps`; returns (texts, ended)."""
    gen = torch.Generator().manual_seed(seed)
    eos = set(tokenizer.eos_token_ids)
    for i, params in enumerate(params_by_row):
        sampler.register(i, params, [1, 2, 3])
    outputs = [[] for _ in params_by_row]
    live = list(range(len(params_by_row)))
    for _ in range(steps):
        if not live:
            break
        logits = torch.randn((len(live), sampler.vocab_size), generator=gen) * 3
        for row, token in zip(live, sampler.sample(live, logits)):
            outputs[row].append(token.token_id)
        live = [r for r in live if outputs[r][-1] not in eos]
    ended = [bool(o) and o[-1] in eos for o in outputs]
    texts = [tokenizer.decode([t for t in o if t not in eos]) for o in outputs]
    return texts, ended


def test_rows_draw_only_what_their_grammar_allows(tokenizer, grammars):
    sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids, seed=3)
    sampler.grammars = grammars
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "ok": {"type": "boolean"}}, "required": ["n", "ok"],
              "additionalProperties": False}
    rows = [SamplingParams(max_tokens=60, grammar=llguidance.grammar_from("choice", '["red", "green"]')),
            SamplingParams(max_tokens=60, grammar=llguidance.grammar_from("regex", "[a-c]{3}-[0-9]{2}")),
            SamplingParams(max_tokens=60, grammar=json_schema_grammar(schema)),   # whitespace runs bounded
            SamplingParams(max_tokens=60)]                                       # free, in the same steps
    texts, ended = _run(sampler, tokenizer, rows, steps=200)
    assert ended[:3] == [True, True, True]
    assert texts[0] in ("red", "green")
    assert re.fullmatch("[a-c]{3}-[0-9]{2}", texts[1])
    value = json.loads(texts[2])
    assert set(value) == {"n", "ok"} and 0 <= value["n"] <= 9 and isinstance(value["ok"], bool)
    assert not re.fullmatch(r"\s*", texts[3])                                   # random text, not masked


def test_a_grammar_the_matcher_refuses_is_the_requests_400(tokenizer, grammars):
    sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids)
    sampler.grammars = grammars
    with pytest.raises(InvalidRequest):
        sampler.register(0, SamplingParams(grammar="this is not a grammar %%%"), [1])
    bare = Sampler(49152, "cpu", tokenizer.eos_token_ids)                     # no grammars: cannot constrain
    with pytest.raises(InvalidRequest):
        bare.register(0, SamplingParams(grammar=llguidance.grammar_from("regex", "a")), [1])


@pytest.mark.parametrize("kind", ["all-draw", "all-greedy", "mixed-and-adjusted"])
def test_every_row_constrained_however_it_samples(tokenizer, grammars, kind):
    """All rows of a step constrained (the mask covers the whole step), drawing from the shared
    generator, greedy, or mixed with seeds and steps 1-3's other adjustments on the same rows."""
    sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids, seed=7)
    sampler.grammars = grammars
    regex = llguidance.grammar_from("regex", "[a-c]{3}-[0-9]{2}")
    if kind == "all-draw":
        rows = [SamplingParams(max_tokens=60, temperature=t, grammar=regex) for t in (0.7, 1.0, 1.3)]
    elif kind == "all-greedy":
        rows = [SamplingParams(max_tokens=60, temperature=0.0, grammar=regex)] * 3
    else:
        rows = [SamplingParams(max_tokens=60, temperature=0.0, grammar=regex),
                SamplingParams(max_tokens=60, seed=5, top_p=0.9, grammar=regex),
                SamplingParams(max_tokens=60, presence_penalty=1.5, grammar=regex),
                SamplingParams(max_tokens=60, min_tokens=4, grammar=regex),
                SamplingParams(max_tokens=60, logit_bias=((tokenizer.eos_token_ids[0], 100.0),), grammar=regex)]
    texts, ended = _run(sampler, tokenizer, rows)
    assert all(ended), texts
    assert all(re.fullmatch("[a-c]{3}-[0-9]{2}", t) for t in texts), texts


def test_a_matcher_in_error_lets_its_row_end(tokenizer, grammars):
    """A token the grammar refuses (appended from outside, e.g. a resumed prefix) leaves the matcher
    in its error state; the row is then allowed EOS only, instead of drawing from all -inf."""
    sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids, seed=1)
    sampler.grammars = grammars
    sampler.register(0, SamplingParams(max_tokens=8, grammar=llguidance.grammar_from("regex", "[0-9]+")), [1])
    sampler.append_output(0, tokenizer.encode("x")[0])
    token = sampler.sample([0], torch.randn(1, 49152))[0].token_id
    assert token in tokenizer.eos_token_ids


def test_rows_joining_leaving_and_reordered_between_steps(tokenizer, grammars):
    """The masks started after a step (for the rows that go on) serve the next step whatever its rows:
    a row that joined gets its mask made then, and the order of the rows may change."""
    sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids, seed=2)
    sampler.grammars = grammars
    regex = llguidance.grammar_from("regex", "[a-c]{3}-[0-9]{2}")
    eos = set(tokenizer.eos_token_ids)
    outputs: dict[int, list[int]] = {}
    gen = torch.Generator().manual_seed(4)
    for step in range(80):
        if step % 3 == 0 and len(outputs) < 6:                  # a row joins every third step
            sampler.register(len(outputs), SamplingParams(max_tokens=60, grammar=regex), [1])
            outputs[len(outputs)] = []
        live = [r for r, out in outputs.items() if not out or out[-1] not in eos]
        if not live:
            break
        live = live[::-1] if step % 2 else live                   # the row order changes between steps
        for row, token in zip(live, sampler.sample(live, torch.randn(len(live), 49152, generator=gen) * 3)):
            outputs[row].append(token.token_id)
    assert len(outputs) == 6
    for out in outputs.values():
        assert out and out[-1] in eos
        assert re.fullmatch("[a-c]{3}-[0-9]{2}", tokenizer.decode(out[:-1]))


def test_matchers_of_one_grammar_are_copies_that_move_alone(tokenizer, grammars, monkeypatch):
    """The second matcher of a grammar is a copy of the kept first one: advancing one leaves the other
    (and later copies) at the start; the kept matchers are bounded; a refused grammar is never kept."""
    from tokabatch.engine.runtime import grammar as grammar_module

    regex = llguidance.grammar_from("regex", "[a-c]{3}-[0-9]{2}")
    a, b = grammars.matcher(regex), grammars.matcher(regex)
    assert a.consume_tokens(tokenizer.encode("abc")) and not a.is_error()
    assert b.consume_tokens(tokenizer.encode("cab-12")) and b.is_accepting()
    c = grammars.matcher(regex)
    assert not c.is_accepting() and c.consume_tokens(tokenizer.encode("bbb-00")) and c.is_accepting()
    monkeypatch.setattr(grammar_module, "CACHED_GRAMMARS", 2)
    for letters in ("[a-c]", "[d-f]", "[g-i]"):
        grammars.matcher(llguidance.grammar_from("regex", letters + "{2}"))
    assert len(grammars._first_matchers) == 2
    with pytest.raises(InvalidRequest):
        grammars.matcher("this is not a grammar %%%")
    assert "this is not a grammar %%%" not in grammars._first_matchers


def test_rows_split_over_mask_threads_get_their_own_masks(tokenizer):
    """Matchers go to the mask threads in turn, each copied from its thread's first matcher of the
    grammar; a step's rows, computed on their threads at once, land at their own rows: the masks and
    the advanced matchers equal one thread's, an advance's masks equal masks made after it, and a
    stopped matcher's row allows only EOS. A released sequence's matcher is forgotten."""
    schema = json_schema_grammar({"type": "object", "required": ["name", "n"],
                                  "properties": {"name": {"type": "string", "maxLength": 8}, "n": {"type": "integer"}}})
    regex = llguidance.grammar_from("regex", "[a-c]{3}-[0-9]{2}")
    rows = [(schema, '{"n": 12, "name": "ab'), (regex, "ab"), (schema, '{"n'), (schema, ""), (regex, "abc-1"),
            (schema, '{"n": 1'), (regex, "")]             # (keys in sorted order: the canonical schema's)
    results = []
    for threads in (1, 3):
        g = Grammars(tokenizer.to_json(), 49152, tokenizer.eos_token_ids, threads=threads)
        matchers = [g.matcher(grammar) for grammar, _ in rows]
        for m, (_, text) in zip(matchers, rows):
            assert m.consume_tokens(tokenizer.encode(text)) if text else True
        assert sorted(g._thread_of[id(m)] for m in matchers) == sorted(i % threads for i in range(len(rows)))
        masks = g.wait(g.masks_async(matchers, pinned=False))
        first_allowed = [int(torch.nonzero(g.blocked(masks[i:i + 1])[0] == 0)[0]) for i in range(len(rows))]
        after = g.wait(g.advance_async(matchers, first_allowed, pinned=False))
        assert torch.equal(after, g.wait(g.masks_async(matchers, pinned=False)))   # as if made after the advance
        stopped = [m.is_stopped() for m in matchers]
        for row in (i for i, s in enumerate(stopped) if s):          # a stopped row may only end
            assert torch.nonzero(g.blocked(after[row:row + 1])[0] == 0).flatten().tolist() == \
                sorted(tokenizer.eos_token_ids)
        results.append((masks, stopped, after))
        sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids)
        sampler.grammars = g
        sampler.register(0, SamplingParams(grammar=regex), [1])
        made = sampler._states[0].matcher
        assert id(made) in g._thread_of
        sampler.release(0)
        assert id(made) not in g._thread_of
    (one_masks, one_stopped, one_after), (three_masks, three_stopped, three_after) = results
    assert torch.equal(one_masks, three_masks) and one_stopped == three_stopped and torch.equal(one_after, three_after)
    assert any(one_stopped) and not all(one_stopped)      # "abc-1" + a digit completes its regex
    assert bool((one_masks != one_masks[0]).any())        # the rows' masks differ: a mix-up would show


def test_a_failing_share_is_raised_once_the_other_shares_are_done(tokenizer):
    """The shares write into one buffer: an error in one is raised only after the others finished."""
    g = Grammars(tokenizer.to_json(), 49152, tokenizer.eos_token_ids, threads=3)
    g._tokenizer()
    done = []

    def work(executor, share):
        if executor is g._executors[0]:                    # the share run on the calling thread
            raise ValueError("boom")
        time.sleep(0.05)
        done.append(len(share))

    with pytest.raises(ValueError, match="boom"):
        g._on_threads(work, [(object(), i) for i in range(6)])
    assert done == [2, 2]


def test_a_constrained_draw_is_held_back_until_asked(tokenizer):
    """sample_async launches an unconstrained step's draw at once, and a step with constrained rows
    only at draw() or the call (its masks may still be in the making: pipelined_loop.py)."""
    g = Grammars(tokenizer.to_json(), 49152, tokenizer.eos_token_ids, threads=1)
    sampler = Sampler(49152, "cpu", tokenizer.eos_token_ids, seed=1)
    sampler.grammars = g
    sampler.register(0, SamplingParams(grammar=llguidance.grammar_from("regex", "[a-c]{3}")), [1])
    sampler.register(1, SamplingParams(temperature=1.0), [1])
    logits = torch.randn(1, 49152)
    before = sampler._shared.get_state()
    free = sampler.sample_async([1], logits)
    assert not torch.equal(before, sampler._shared.get_state())         # drawn already
    pending = sampler.sample_async([0], logits)
    assert g.mask_calls == 0
    pending.draw()
    pending.draw()                                                        # once
    assert g.mask_calls == 1
    (token,) = pending()
    text = tokenizer.decode([token.token_id])
    assert 1 <= len(text) <= 3 and set(text) <= set("abc")
    assert len(free()) == 1
