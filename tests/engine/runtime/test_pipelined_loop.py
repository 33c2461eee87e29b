"""PipelinedLoop: two engine loops over one model give the same outputs as one loop (CPU, float32).

On the CPU a step runs to the end inside `launch`, so this checks the routing, the alternation,
aborts and the merged stats; the overlap itself shows on the GPU (scripts/bench.py --no-pipeline).
"""

from __future__ import annotations

import dataclasses

from tests.engine.runtime.test_loop import EngineConfig, ModelConfig, SchedulerConfig, drain, greedy, prompt, run
from tests.engine.runtime.test_loop import tiny  # noqa: F401  (a fixture)
from tokabatch.engine.api import GenerationOutput
from tokabatch.engine.runtime.factory import build_loop
from tokabatch.engine.runtime.pipelined_loop import PipelinedLoop


def make(folder, parts: int):
    config = EngineConfig(model=ModelConfig(path=str(folder), dtype="float32", device="cpu"),
                          scheduler=SchedulerConfig(page_size=4, max_tokens_per_step=64, max_seqs=8),
                          kv_cache_tokens=4096)
    return build_loop(config, check_invariants=True, parts=parts)


def test_two_halves_give_the_same_greedy_outputs_as_one_loop(tiny) -> None:  # noqa: F811
    _, folder = tiny
    requests = [greedy(f"r{i}", prompt(i, 5 + 7 * i % 40), 12 + i % 5, n=1 + i % 3) for i in range(14)]
    single = run(make(folder, 1), requests)
    loop = make(folder, 2)
    assert isinstance(loop, PipelinedLoop)
    assert loop.info.num_pages == sum(h.info.num_pages for h in loop.halves)
    piped = run(loop, requests)
    assert piped.keys() == single.keys()
    for rid, out in single.items():
        assert [c.token_ids for c in piped[rid].choices] == [c.token_ids for c in out.choices], rid
        assert [c.text for c in piped[rid].choices] == [c.text for c in out.choices], rid
    # Both halves ran steps, and the merged stats add up.
    assert all(h.stats().num_steps > 0 for h in loop.halves)
    stats = loop.stats()
    assert stats.num_requests_finished == len(requests)
    assert stats.num_generated_tokens == sum(len(c.token_ids) for o in single.values() for c in o.choices)
    assert not loop.has_work() and loop._load == [0, 0]


def test_abort_reaches_the_half_that_runs_the_request(tiny) -> None:  # noqa: F811
    _, folder = tiny
    loop = make(folder, 2)
    for i in range(4):
        loop.add(greedy(f"a{i}", prompt(i, 9), 40))
    loop.step()
    loop.step()
    loop.abort("a1")
    loop.abort("a2")
    outputs = drain(loop)
    assert outputs["a1"].aborted and outputs["a2"].aborted
    assert not outputs["a0"].aborted and len(outputs["a0"].choices[0].token_ids) == 40
    assert all(isinstance(o, GenerationOutput) for o in outputs.values())
    assert not loop.has_work()


async def test_engine_client_drives_a_pipelined_loop(tiny) -> None:  # noqa: F811
    """The service's path: EngineClient (engine thread, back-pressure, streaming) over the two halves."""
    from tokabatch.engine.api import GenerationUpdate
    from tokabatch.engine.client import EngineClient
    from tokabatch.engine.loop_protocol import LoopSpec

    _, folder = tiny
    requests = [greedy(f"c{i}", prompt(50 + i, 6 + i), 10, n=1 + i % 2) for i in range(9)]
    expected = run(make(folder, 1), requests)
    client = await EngineClient.start(LoopSpec(make, {"folder": folder, "parts": 2}), in_process=True)
    try:
        async def source():
            for r in requests:
                yield r

        got = {o.request_id: o async for o in client.generate(source())}
        stream_request = dataclasses.replace(greedy("s", prompt(99, 8), 6), stream=True)
        streamed = [item async for item in client.submit(stream_request)]
    finally:
        await client.close()
    assert {rid: [c.token_ids for c in o.choices] for rid, o in got.items()} == \
        {rid: [c.token_ids for c in o.choices] for rid, o in expected.items()}
    assert isinstance(streamed[-1], GenerationOutput) and len(streamed[-1].choices[0].token_ids) == 6
    assert any(isinstance(item, GenerationUpdate) for item in streamed)


class _RecordingHalf:
    def __init__(self) -> None:
        self.added: list[str] = []

    def add(self, request) -> None:
        self.added.append(request.request_id)


def _routed(requests, affinity_tokens: int = 4) -> tuple[PipelinedLoop, list[int]]:
    halves = [_RecordingHalf(), _RecordingHalf()]
    loop = PipelinedLoop(halves, None, affinity_tokens=affinity_tokens)
    for r in requests:
        loop.add(r)
    return loop, [0 if r.request_id in halves[0].added else 1 for r in requests]


def test_requests_with_the_same_prompt_start_go_to_one_half() -> None:
    # Lines of 8 problems, each problem's lines side by side (as batch-aware ordering feeds them):
    # without affinity they alternate between the halves; with it each problem stays in one half.
    lines = [greedy(f"p{p}-{j}", (100 + p,) * 4 + (j,), 10) for p in range(8) for j in range(20)]
    _, alternating = _routed(lines, affinity_tokens=0)
    assert alternating[:4] == [0, 1, 0, 1]
    _, halves = _routed(lines)
    for p in range(8):
        assert len(set(halves[20 * p:20 * p + 20])) == 1, p
    assert halves.count(0) == 80                             # and the problems are spread evenly
    # Lines of one problem spread through the file still meet in one half.
    shuffled = [greedy(f"q{i}", (7 + i % 3,) * 4 + (i,), 10) for i in range(30)]
    _, halves = _routed(shuffled)
    for p in range(3):
        assert len({h for i, h in enumerate(halves) if i % 3 == p}) == 1


def test_a_start_shared_by_everything_moves_between_halves_in_runs() -> None:
    # W5's shape: every prompt starts with the same system prompt. The halves take turns in runs of
    # AFFINITY_RUN requests, so neither gets ahead by more than that.
    lines = [greedy(f"r{i}", (5,) * 4 + (i,), 10) for i in range(1000)]
    loop, halves = _routed(lines)
    switches = sum(a != b for a, b in zip(halves, halves[1:]))
    assert 5 <= switches <= 1000 // PipelinedLoop.AFFINITY_RUN + 1
    assert abs(loop._load[0] - loop._load[1]) <= (PipelinedLoop.AFFINITY_RUN + 1) * (5 + 10)


def test_the_affinity_table_is_bounded() -> None:
    halves = [_RecordingHalf(), _RecordingHalf()]
    loop = PipelinedLoop(halves, None, affinity_tokens=4)
    loop.AFFINITY_KEYS = 10
    for i in range(50):
        loop.add(greedy(f"k{i}", (i,) * 4, 10))
    assert len(loop._affinity) == 10 and (49,) * 4 in loop._affinity and (0,) * 4 not in loop._affinity


class _Pending:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.read = name, log, False

    def draw(self) -> None:
        self.log.append(f"draw {self.name}")

    def result(self):                  # read once, as runner.PendingStep
        if not self.read:
            self.read = True
            self.log.append(f"tokens {self.name}")


class _TimedHalf:
    """Logs when its steps launch, draw and give their tokens."""

    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log, self.steps = name, log, 0

    def begin_step(self):
        self.steps += 1
        self.log.append(f"launch {self.name}{self.steps}")
        return ("plan", _Pending(f"{self.name}{self.steps}", self.log))

    def end_step(self, launched):
        if launched is not None:
            launched[1].result()
            self.log.append(f"end {launched[1].name}")
        return []


def test_the_other_half_tokens_are_read_before_this_half_draws() -> None:
    """A held-back draw (constrained rows) waits for its masks; the other half's tokens are read
    first, so its grammar job queues behind this half's instead of after the wait."""
    log: list[str] = []
    loop = PipelinedLoop([_TimedHalf("a", log), _TimedHalf("b", log)], None)
    for _ in range(3):
        loop.step()
    assert log == ["launch a1", "draw a1",
                   "launch b1", "tokens a1", "draw b1", "end a1",
                   "launch a2", "tokens b1", "draw a2", "end b1"]


def test_constrained_and_free_rows_give_the_same_outputs_in_two_halves(tiny) -> None:  # noqa: F811
    """Constrained rows (their draws held back while the other half's tokens are read first) mixed
    with free ones: two halves give one loop's tokens, and every constrained output matches."""
    import re

    import llguidance

    _, folder = tiny
    pattern = "[a-c]{2,6}-[0-9]{1,3}"
    grammar = llguidance.grammar_from("regex", pattern)
    requests = [greedy(f"g{i}", prompt(200 + i, 6 + 5 * i % 30), 12, grammar=grammar if i % 3 else None,
                       n=1 + i % 2) for i in range(12)]
    single = run(make(folder, 1), requests)
    piped = run(make(folder, 2), requests)
    assert piped.keys() == single.keys()
    for rid, out in single.items():
        assert [c.token_ids for c in piped[rid].choices] == [c.token_ids for c in out.choices], rid
    constrained = [r.request_id for i, r in enumerate(requests) if i % 3]
    for rid in constrained:
        for choice in piped[rid].choices:
            assert re.fullmatch(pattern, choice.text) and choice.finish_reason == "stop", choice   # (<= 10 tokens)
