"""Hydragen end to end on a tiny random Llama (float32, CPU): greedy outputs are identical with prefix
grouping on and off, groups are really formed and attended by parts, and the loop counts the decode
KV reads they save (the /metrics sharing fraction)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.engine.runtime.test_loop import greedy, prompt, run, tiny  # noqa: F401  (tiny is a fixture)
from tokabatch.config import EngineConfig, ModelConfig, SchedulerConfig, load_config
from tokabatch.engine.core.plan import StepPlan
from tokabatch.engine.runtime import hydragen_attention
from tokabatch.engine.runtime.attention import TorchBackend
from tokabatch.engine.runtime.factory import build_loop
from tokabatch.engine.runtime.loop import EngineLoop
from tokabatch.errors import ConfigError

pytestmark = pytest.mark.timeout(300)

SHARED = prompt(77, 288)                 # 72 pages of 4: long enough for a group to pay its call cost


def make_loop(folder: Path, hydragen: bool) -> EngineLoop:
    config = EngineConfig(
        model=ModelConfig(path=str(folder), dtype="float32", device="cpu"),
        scheduler=SchedulerConfig(page_size=4, max_tokens_per_step=512, max_seqs=64),
        kv_cache_tokens=8192, enable_hydragen=hydragen,
        hydragen_min_prefix_tokens=64, hydragen_min_group=4)
    return build_loop(config, check_invariants=True)


def workload():
    """16 requests on one 288-token prefix (different tails and lengths, so groups change size as
    they finish), one n=3 request on it too, and three unrelated prompts decoding beside them."""
    shared = [greedy(f"s{i}", SHARED + prompt(200 + i, 1 + i % 7), 10 + i % 9, ignore_eos=True)
              for i in range(16)]
    samples = [greedy("n3", SHARED + prompt(300, 5), 12, n=3, ignore_eos=True)]
    other = [greedy(f"o{i}", prompt(400 + i, 30 + 37 * i), 15, ignore_eos=True) for i in range(3)]
    return shared[:8] + other[:2] + samples + shared[8:] + other[2:]


def record_plans(loop: EngineLoop) -> list[StepPlan]:
    plans: list[StepPlan] = []
    launch = loop.runner.launch

    def recording(plan: StepPlan):
        plans.append(plan)
        return launch(plan)

    loop.runner.launch = recording
    return plans


def test_greedy_outputs_identical_with_grouping_on_and_off(tiny, monkeypatch) -> None:
    _, folder = tiny
    attended = []
    attend = hydragen_attention.HydragenLayout.attend

    def counting(self, *args, **kwargs):
        attended.append(len(self.groups))
        return attend(self, *args, **kwargs)

    monkeypatch.setattr(hydragen_attention.HydragenLayout, "attend", counting)
    results = {}
    for on in (False, True):
        loop = make_loop(folder, on)
        assert isinstance(loop.runner.backend, TorchBackend) and loop.runner.backend.use_hydragen is on
        plans = record_plans(loop)
        results[on] = (run(loop, workload()), plans, loop.stats())
    (off, off_plans, off_stats), (on, on_plans, on_stats) = results[False], results[True]

    assert not any(p.prefix_groups for p in off_plans)
    grouped = [p for p in on_plans if p.prefix_groups]
    assert len(grouped) >= 5, "the shared-prefix workload must form groups on several steps"
    sizes = {len(g.seq_ids) for p in grouped for g in p.prefix_groups}
    assert max(sizes) >= 16 and len(sizes) > 1           # groups shrink as members finish
    assert all(g.num_tokens >= 64 for p in grouped for g in p.prefix_groups)
    # Every layer of every grouped step went through the attention by parts.
    assert len(attended) == 2 * len(grouped) and all(attended)

    assert set(on) == set(off)
    for rid, out in off.items():
        assert [c.token_ids for c in on[rid].choices] == [c.token_ids for c in out.choices], rid
        assert [c.text for c in on[rid].choices] == [c.text for c in out.choices], rid

    # Decode KV reads are counted either way; only grouping saves some.
    assert on_stats.num_decode_kv_reads == off_stats.num_decode_kv_reads > 0
    assert off_stats.num_hydragen_saved_kv_reads == 0
    saved = sum((len(g.seq_ids) - 1) * g.num_tokens for p in grouped for g in p.prefix_groups)
    assert on_stats.num_hydragen_saved_kv_reads == saved > 0
    reads = sum(w.start_pos + 1 for p in on_plans for w in p.decodes)
    assert on_stats.num_decode_kv_reads == reads
    assert 0.3 < saved / reads < 1.0                      # most decode reads are of the shared prefix


def test_hydragen_settings_are_checked() -> None:
    cfg = load_config(env={}, engine={"hydragen_min_prefix_tokens": 32, "hydragen_min_group": 2})
    assert (cfg.engine.hydragen_min_prefix_tokens, cfg.engine.hydragen_min_group) == (32, 2)
    assert (EngineConfig().hydragen_min_prefix_tokens, EngineConfig().hydragen_min_group) == (256, 16)
    with pytest.raises(ConfigError):
        load_config(env={}, engine={"hydragen_min_group": 0})


@pytest.mark.parametrize("hydragen", [False, True])
def test_samples_of_a_whole_page_prompt_rerun_one_token_each(tiny, hydragen: bool) -> None:
    """n=12 greedy samples of a prompt of 72 whole pages: choice 0 prefills it, the other eleven take
    every page from the cache and rerun only the last token (SeqWork.kv_cached), grouped with
    choice 0's decode when grouping is on; all twelve continue as one greedy continuation."""
    _, folder = tiny
    loop = make_loop(folder, hydragen)
    plans = record_plans(loop)
    [out] = run(loop, [greedy("w", SHARED, 10, n=12, ignore_eos=True)]).values()
    assert len({c.token_ids for c in out.choices}) == 1 and len(out.choices[0].token_ids) == 10
    reruns = [w for p in plans for w in p.prefills if w.kv_cached]
    assert len(reruns) == 11 and all((w.start_pos, w.num_tokens) == (287, 1) for w in reruns)
    assert loop.stats().num_forward_tokens == len(SHARED) + 11 + 12 * 9
    first = next(p for p in plans if any(w.kv_cached for w in p.prefills))
    if hydragen:
        assert any({w.seq_id for w in first.prefills} <= set(g.seq_ids) for g in first.prefix_groups)
