"""The sampler against simple references: hand-computed penalties, analytically filtered
distributions (checked statistically on an 8-token vocabulary), log_softmax for logprobs, and
exact reproduction of seeded rows whatever their batch. CPU, float32, a few seconds in all."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from tokabatch.engine.api import SamplingParams
from tokabatch.engine.runtime import sampling_ops as ops
from tokabatch.engine.runtime.sampling import Sampler, choice_seed
from tokabatch.errors import InvalidRequest

# Every test that runs the Sampler also runs on CUDA where one is present (the GPU machine).
DEVICES = ["cpu"] + ([pytest.param("cuda", marks=pytest.mark.gpu)] if torch.cuda.is_available() else [])
on_devices = pytest.mark.parametrize("device", DEVICES)

VOCAB = 8
EOS = 7
LOGITS8 = [2.0, 1.5, 1.2, 0.9, 0.3, -0.2, -1.0, 0.5]   # distinct, so every filter has a unique answer


def make_sampler(vocab: int = VOCAB, seed: int = 1234, device: str = "cpu") -> Sampler:
    return Sampler(vocab, device, (EOS,), seed=seed)


def reference_distribution(logits: list[float], p: SamplingParams) -> list[float]:
    """Temperature, top_k, top_p over the top-k renormalized distribution, min_p, in float64 loops."""
    scaled = [x / p.temperature for x in logits]
    order = sorted(range(len(scaled)), key=lambda i: (-scaled[i], i))
    keep = set(order[:p.top_k] if p.top_k > 0 else order)

    def normalized(kept: set[int]) -> dict[int, float]:
        z = sum(math.exp(scaled[i]) for i in kept)
        return {i: math.exp(scaled[i]) / z for i in kept}

    probs, cumulative, nucleus = normalized(keep), 0.0, set()
    for i in (j for j in order if j in keep):
        if cumulative >= p.top_p:
            break
        nucleus.add(i)
        cumulative += probs[i]
    probs = normalized(nucleus)
    top = max(probs.values())
    probs = normalized({i for i, q in probs.items() if q >= p.min_p * top})
    return [probs.get(i, 0.0) for i in range(len(logits))]


def empirical_distribution(params: SamplingParams, device: str, num: int = 40_000,
                           logits: list[float] = LOGITS8, seeded: bool = False) -> list[float]:
    """Token frequencies of `num` rows drawn in one step; `seeded`: each row with a seed of its own
    (inverse CDF from its stream) instead of the shared generator (the exponential race)."""
    sampler = make_sampler(vocab=len(logits), device=device)
    for seq in range(num):
        sampler.register(seq, replace(params, seed=seq) if seeded else params, [])
    tokens = sampler.sample(list(range(num)), torch.tensor([logits] * num, device=device))
    counts = torch.bincount(torch.tensor([t.token_id for t in tokens]), minlength=len(logits))
    return (counts.double() / num).tolist()


FILTERS = [
    SamplingParams(),
    SamplingParams(temperature=0.5),
    SamplingParams(temperature=1.7),
    SamplingParams(top_k=3),
    SamplingParams(top_k=-1, top_p=0.6),
    SamplingParams(top_p=0.3),                    # below the top token's probability: only it is kept
    SamplingParams(min_p=0.2),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1),
]


def filters_id(p: SamplingParams) -> str:
    return f"t{p.temperature}-k{p.top_k}-p{p.top_p}-m{p.min_p}"


@pytest.mark.parametrize("params", FILTERS, ids=filters_id)
@on_devices
def test_distribution_matches_the_filtered_reference(params, device):
    check_distribution(params, device, seeded=False)


@pytest.mark.parametrize("params", [FILTERS[0], FILTERS[1], FILTERS[-1]], ids=filters_id)   # 40,000 rows each
@on_devices
def test_seeded_rows_draw_from_the_filtered_reference(params, device):
    check_distribution(params, device, seeded=True)


def check_distribution(params: SamplingParams, device: str, seeded: bool) -> None:
    expected = reference_distribution(LOGITS8, params)
    observed = empirical_distribution(params, device, seeded=seeded)
    assert max(abs(o - e) for o, e in zip(observed, expected)) < 0.01, (observed, expected)
    for token, e in enumerate(expected):
        if e == 0.0:
            assert observed[token] == 0.0, f"filtered token {token} was sampled"


def test_a_cpu_filters_among_candidates_as_a_whole_sort_does():
    vocab = 3 * ops.CANDIDATES
    gen = torch.Generator().manual_seed(11)
    rows = []
    for scale in (8.0, 3.0, 0.05):                   # peaked rows keep few tokens; a flat one keeps thousands
        for k in (vocab, 3, 50, ops.CANDIDATES, ops.CANDIDATES + 7):
            for p in (1.0, 0.9, 0.5):
                rows.append((scale, k, p))
    logits = torch.stack([torch.randn(vocab, generator=gen) * scale for scale, _, _ in rows])
    logits[::4] = (logits[::4] * 2).round() / 2      # ties at every value
    logits[1::5, ::7] = float("-inf")                # a grammar's mask
    top_k = torch.tensor([k for _, k, _ in rows])
    top_p = torch.tensor([p for _, _, p in rows])
    filtered = ops.filter_top_k_top_p(logits, top_k, top_p)
    assert torch.equal(filtered.isfinite(), ops._kept_by_sort(logits, top_k, top_p) & logits.isfinite())
    _, whole = ops._kept_among_candidates(logits, top_k, top_p, ops.CANDIDATES)
    assert 0 < int(whole.sum()) < len(rows) / 2       # most rows answered from their candidates, some sorted whole


def test_inverse_cdf_never_draws_a_zero_probability_token():
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 6)
    numbers = torch.tensor([0.0, 0.2499, 0.25, 0.9, 1.0 - 2.0 ** -24, 1.0])   # 1.0 stands for a rounded-up number
    assert ops.draw_by_inverse_cdf(probs, numbers).tolist() == [1, 1, 3, 3, 3, 3]
    # Where the most likely token stands alone at the front and every later token is filtered.
    one = torch.tensor([[1.0, 0.0, 0.0]])
    assert ops.draw_by_inverse_cdf(one, torch.tensor([0.999999])).tolist() == [0]


def test_seeded_streams_differ_by_seed_and_choice_and_reproduce():
    def draws(seed: int, choice: int) -> list[int]:
        sampler = make_sampler(vocab=len(LOGITS8))
        sampler.register(0, SamplingParams(seed=seed), [], choice_index=choice)
        logits = torch.tensor([LOGITS8])
        return [sampler.sample([0], logits)[0].token_id for _ in range(40)]

    assert draws(7, 0) == draws(7, 0) and draws(7, 1) == draws(7, 1)
    assert len({tuple(draws(7, 0)), tuple(draws(7, 1)), tuple(draws(8, 0))}) == 3


def test_reference_filters_actually_filter():
    # Guards the statistical test: each filter removes something on LOGITS8.
    assert sum(q == 0.0 for q in reference_distribution(LOGITS8, SamplingParams(top_k=3))) == 5
    assert sum(q == 0.0 for q in reference_distribution(LOGITS8, SamplingParams(top_p=0.6))) == 5
    assert sum(q == 0.0 for q in reference_distribution(LOGITS8, SamplingParams(min_p=0.2))) == 3


@on_devices
def test_greedy_is_argmax_with_ties_to_the_lowest_id(device):
    sampler = make_sampler(device=device)
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    logits[5] = torch.tensor([0.0, 3.0, 1.0, 3.0, 3.0, 0.0, 0.0, 0.0])
    for seq in range(6):
        sampler.register(seq, SamplingParams(temperature=0.0, top_k=2, top_p=0.5), [])
    tokens = [t.token_id for t in sampler.sample(list(range(6)), logits.to(device))]
    assert tokens[:5] == logits[:5].argmax(-1).tolist()
    assert tokens[5] == 1


@on_devices
def test_a_temperature_float32_cannot_hold_samples_greedily(device):
    """1e-320 is 0 in float32: dividing the logits by it drew garbage (an empty text, through the
    server). Below GREEDY_BELOW a row takes the argmax, with penalties and seeds or without."""
    sampler = make_sampler(device=device)
    logits = torch.tensor([LOGITS8] * 3)
    for seq, params in enumerate([SamplingParams(temperature=1e-320), SamplingParams(temperature=5e-6, seed=3),
                                  SamplingParams(temperature=1e-320, repetition_penalty=1.3, top_p=0.5)]):
        assert params.greedy
        sampler.register(seq, params, [1])
    assert [t.token_id for t in sampler.sample([0, 1, 2], logits.to(device))] == [0, 0, 0]
    assert not SamplingParams(temperature=1e-4).greedy


def run_seeded(sampler: Sampler, target: int, neighbours: list[int], position: int,
               steps: list[torch.Tensor]) -> list[int]:
    """Sample `target` for every step inside a batch of `neighbours`, at row `position`."""
    out = []
    for step, row in enumerate(steps):
        ids = list(neighbours)
        ids.insert(position, target)
        logits = torch.randn(len(ids), row.shape[0], generator=torch.Generator().manual_seed(step))
        logits[position] = row
        out.append(sampler.sample(ids, logits.to(sampler.device))[position].token_id)
    return out


@on_devices
def test_seeded_rows_reproduce_whatever_the_batch(device):
    vocab = 50
    steps = [torch.randn(vocab, generator=torch.Generator().manual_seed(100 + i)) for i in range(30)]
    params = SamplingParams(temperature=1.3, top_p=0.95, top_k=40, seed=42, presence_penalty=0.3)

    alone = make_sampler(vocab, seed=1, device=device)
    alone.register(0, params, [1, 2, 3])
    solo = run_seeded(alone, 0, [], 0, steps)

    crowded = make_sampler(vocab, seed=2, device=device)
    crowded.register(10, params, [1, 2, 3])
    crowded.register(11, SamplingParams(temperature=1.0), [5])
    crowded.register(12, replace(params, seed=7, min_p=0.1), [4])        # another seeded row
    crowded.register(13, SamplingParams(temperature=0.0, repetition_penalty=1.2), [9])
    busy = run_seeded(crowded, 10, [11, 12, 13], 2, steps)

    again = make_sampler(vocab, seed=3, device=device)
    again.register(99, params, [1, 2, 3])
    again.register(98, SamplingParams(), [])
    last = run_seeded(again, 99, [98], 1, steps)

    assert solo == busy == last
    assert len(set(solo)) > 3                     # it really sampled


def test_different_seeds_and_choices_differ():
    vocab = 50
    steps = [torch.zeros(vocab)] * 20             # uniform: any two draws agree with prob 1/50
    outputs = []
    for seed, choice in [(1, 0), (2, 0), (1, 1)]:
        sampler = make_sampler(vocab)
        sampler.register(0, SamplingParams(seed=seed), [], choice_index=choice)
        outputs.append(run_seeded(sampler, 0, [], 0, steps))
    assert outputs[0] != outputs[1] and outputs[0] != outputs[2]
    assert choice_seed(5, 0) == 5 and choice_seed(5, 1) != choice_seed(5, 2)
    assert 0 <= choice_seed(-1, 3) < 2 ** 64


def test_penalties_match_a_hand_computation():
    sampler = make_sampler()
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler.register(0, params, [1, 2, 2])
    for token in [2, 3, 3]:
        sampler.append_output(0, token)
    raw = torch.tensor([[1.0, 2.0, 3.0, -1.0, 4.0, 0.5, -0.5, 0.0]])
    adjusted = sampler._adjust(raw, [sampler._state(0)])[0].tolist()
    expected = [
        1.0,                                      # unseen
        2.0 / 2.0,                                # prompt only: repetition penalty (positive: divide)
        3.0 / 2.0 - 0.5 - 0.25 * 1,               # prompt + once in the output
        -1.0 * 2.0 - 0.5 - 0.25 * 2,              # output twice, negative logit: multiply
        4.0, 0.5, -0.5, 0.0,
    ]
    assert adjusted == pytest.approx(expected, abs=1e-6)
    assert raw[0, 2].item() == 3.0               # the caller's logits are untouched


@on_devices
def test_penalty_flips_greedy_and_sample_counts_its_own_tokens(device):
    sampler = make_sampler(device=device)
    sampler.register(0, SamplingParams(temperature=0.0, frequency_penalty=2.0), [])
    logits = torch.tensor([[0.0, 3.0, 2.5, 0, 0, 0, 0, 0]], device=device)
    tokens = [sampler.sample([0], logits)[0].token_id for _ in range(3)]
    # 1 first; then 1 is at 3 - 2 = 1 < 2.5, so 2; then 2 is at 0.5 < 1, so 1 again.
    assert tokens == [1, 2, 1]
    assert sampler.num_outputs(0) == 3


def test_apply_penalties_identity_when_disabled():
    x = torch.randn(3, VOCAB)
    counts = torch.randint(0, 3, (3, VOCAB)).float()
    mask = torch.rand(3, VOCAB) > 0.5
    ones, zeros = torch.ones(3), torch.zeros(3)
    assert torch.equal(ops.apply_penalties(x, counts, mask, zeros, zeros, ones), x)


@on_devices
def test_logit_bias_forces_and_bans_tokens(device):
    sampler = make_sampler(device=device)
    sampler.register(0, SamplingParams(logit_bias=((5, 100.0),)), [])
    sampler.register(1, SamplingParams(temperature=0.0, logit_bias=((0, -100.0),)), [])
    logits = torch.tensor([LOGITS8, LOGITS8], device=device)
    for _ in range(50):
        a, b = sampler.sample([0, 1], logits)
        assert a.token_id == 5 and b.token_id == 1


@on_devices
def test_min_tokens_masks_eos_and_stop_ids_until_enough_outputs(device):
    sampler = make_sampler(device=device)
    sampler.register(0, SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(4,)), [])
    sampler.register(1, SamplingParams(temperature=0.0, min_tokens=3, stop_token_ids=(4,), ignore_eos=True), [])
    logits = torch.tensor([[0.0, 1.0, 0, 0, 5.0, 0, 0, 9.0]] * 2, device=device)
    steps = [[t.token_id for t in sampler.sample([0, 1], logits)] for _ in range(4)]
    assert [s[0] for s in steps] == [1, 1, 1, EOS]
    assert [s[1] for s in steps] == [EOS, EOS, EOS, EOS]   # ignore_eos: EOS is an ordinary token


@on_devices
def test_logprobs_are_raw_log_softmax_with_sorted_top(device):
    sampler = make_sampler(vocab=37, device=device)
    params = SamplingParams(temperature=0.6, top_k=5, presence_penalty=1.0, logit_bias=((3, 5.0),), logprobs=4)
    sampler.register(0, params, [3])
    sampler.register(1, SamplingParams(), [])                     # no logprobs wanted
    sampler.register(2, replace(params, logprobs=0, temperature=0.0), [])
    logits = torch.randn(3, 37, generator=torch.Generator().manual_seed(5))
    reference = torch.log_softmax(logits.double(), dim=-1)
    out = sampler.sample([0, 1, 2], logits.to(device))
    assert out[1].logprob is None
    for row in (0, 2):
        lp = out[row].logprob
        assert lp.token_id == out[row].token_id
        assert abs(lp.logprob - reference[row, lp.token_id].item()) < 1e-5
        for token, value in lp.top:
            assert abs(value - reference[row, token].item()) < 1e-5
    top = out[0].logprob.top
    assert len(top) == 4 and [t for t, _ in top] == reference[0].topk(4).indices.tolist()
    assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
    assert out[2].logprob.top == ()


@on_devices
def test_bf16_logits_are_accepted(device):
    sampler = make_sampler(device=device)
    sampler.register(0, SamplingParams(temperature=0.0, logprobs=2), [])
    out = sampler.sample([0], torch.tensor([LOGITS8], dtype=torch.bfloat16, device=device))
    assert out[0].token_id == 0 and len(out[0].logprob.top) == 2


@on_devices
def test_prompt_logprobs_are_raw_log_softmax(device):
    sampler = make_sampler(vocab=37, device=device)
    logits = torch.randn(17, 37, generator=torch.Generator().manual_seed(9))
    targets = torch.randint(0, 37, (17,), generator=torch.Generator().manual_seed(10))
    reference = torch.log_softmax(logits.double(), dim=-1)
    out = sampler.prompt_logprobs(logits.to(device), targets.to(device), 3)
    assert [lp.token_id for lp in out] == targets.tolist()
    for row, lp in enumerate(out):
        assert abs(lp.logprob - reference[row, lp.token_id].item()) < 1e-5
        assert [t for t, _ in lp.top] == reference[row].topk(3).indices.tolist()
        assert all(abs(v - reference[row, t].item()) < 1e-5 for t, v in lp.top)
    assert all(lp.top == () for lp in sampler.prompt_logprobs(logits.to(device), targets.to(device), 0))
    assert sampler.prompt_logprobs(logits[:0].to(device), targets[:0].to(device), 3) == []


def test_state_lifecycle_and_errors():
    sampler = make_sampler()
    sampler.register(0, SamplingParams(), [1])
    with pytest.raises(ValueError, match="already registered"):
        sampler.register(0, SamplingParams(), [1])
    with pytest.raises(InvalidRequest) as info:
        sampler.register(1, SamplingParams(logit_bias=((VOCAB, 1.0),)), [])
    assert info.value.param == "logit_bias"
    with pytest.raises(ValueError, match="shape"):
        sampler.sample([0], torch.zeros(1, VOCAB + 1))
    with pytest.raises(KeyError, match="not registered"):
        sampler.sample([5], torch.zeros(1, VOCAB))
    assert sampler.sample([], torch.zeros(0, VOCAB)) == []
    sampler.append_output(0, 3)
    assert 0 in sampler and sampler.num_outputs(0) == 1
    sampler.release(0)
    sampler.release(0)
    assert 0 not in sampler and len(sampler) == 0


def test_a_step_of_the_last_steps_rows_reuses_their_states_until_one_is_released(monkeypatch):
    """The scheduler's steady decode batch passes one seq_ids list while its rows stay the same:
    the sampler then looks nothing up per row; a release (a finished row) or another list does."""
    sampler = make_sampler()
    for seq_id in range(3):
        sampler.register(seq_id, SamplingParams(temperature=0.0), [1])
    logits = torch.zeros(3, VOCAB)
    logits[:, 4] = 1.0
    rows = [0, 1, 2]
    assert sampler.sample(rows, logits).token_ids == [4, 4, 4]
    lookups = []
    state = sampler._state
    monkeypatch.setattr(sampler, "_state", lambda seq_id: lookups.append(seq_id) or state(seq_id))
    assert sampler.sample(rows, logits).token_ids == [4, 4, 4]
    assert lookups == []
    assert sampler.sample([0, 1, 2], logits).token_ids == [4, 4, 4]     # equal, but another list
    assert lookups == [0, 1, 2]
    sampler.release(2)
    with pytest.raises(KeyError, match="not registered"):
        sampler.sample(rows, logits)
    assert sampler.num_outputs(0) == 3


def test_top_p_always_keeps_one_token_and_top_p_one_keeps_all():
    logits = torch.tensor([[10.0, 0.0, -30.0, -80.0], [1.0, 1.0, 1.0, 1.0]])
    kept = ops.filter_top_k_top_p(logits, torch.tensor([4, 4]), torch.tensor([1.0, 1e-6]))
    assert torch.isfinite(kept[0]).all()          # tail tokens survive top_p == 1 despite rounding
    assert torch.isfinite(kept[1]).tolist() == [True, False, False, False]   # ties: the lowest id
