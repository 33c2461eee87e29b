"""Phase timers for scripts/bench.py's engine rows: wall seconds per phase of the engine loop.

`time_phases(loop)` wraps the schedulers and runners of an engine loop (both pipelined halves) so
that a run adds up its seconds per phase; `untime_phases(loop)` undoes it before the next run.
`detail` adds parts of the phases and a GPU timeline from CUDA events (`GpuTimeline.settle`).
"""

from __future__ import annotations

import time
from typing import Any


def time_phases(loop, detail: bool = False) -> tuple[dict[str, float], "GpuTimeline | None"]:
    """Wrap the schedulers and runners to add up wall seconds per phase: CPU time to schedule, to
    build and launch a step (graph replay or eager), to process its result, and the time spent
    waiting for the GPU's tokens (with two pipelined halves much of the rest overlaps that).
    `detail` adds parts of those phases, marked "(in ...)": the grouped graph step's own-part
    layout, its flashinfer plans and the replay call, the sampler's launch, and the loop's
    handling of the sampled tokens (texts of finished sequences included); and, from CUDA events
    (the returned GpuTimeline: its settle() after the run adds them), the GPU's time per kind
    of step and where it was idle."""
    totals = {"schedule": 0.0, "launch graph": 0.0, "launch eager": 0.0, "wait for GPU": 0.0, "on_step_done": 0.0}
    halves = getattr(loop, "halves", [loop])
    timeline = None
    if detail:
        import torch

        from tokabatch.engine.runtime import hydragen_graphs

        parts = {"pad_own (in launch)": (hydragen_graphs, "pad_own"),
                 "grouped plans (in launch)": (hydragen_graphs.GroupedDecodeGraphs, "_plan_own"),
                 "graph replay call (in launch)": (torch.cuda.CUDAGraph, "replay")}
        for key, (owner, name) in parts.items():
            totals[key] = 0.0
            _PATCHED.append((owner, name, getattr(owner, name)))
            setattr(owner, name, _timed(getattr(owner, name), totals, key))
        totals["sample launch (in launch)"] = totals["take samples (in loop rest)"] = 0.0
        timeline = GpuTimeline(torch)
        replay = torch.cuda.CUDAGraph.replay

        def replay_timed(graph) -> None:
            began = timeline.event()
            replay(graph)
            timeline.replays.append((began, timeline.event()))
        _PATCHED.append((torch.cuda.CUDAGraph, "replay", torch.cuda.CUDAGraph.replay))
        torch.cuda.CUDAGraph.replay = replay_timed

    def timed(fn, key):
        return _timed(fn, totals, key)

    for half in halves:
        runner, sched = half.runner, half.scheduler

        def launch(plan, _runner=runner, _launch=runner.launch):
            before = _runner.num_graph_steps
            began = timeline.event() if timeline else None     # (queued behind the GPU's earlier work)
            t = time.perf_counter()
            pending = _launch(plan)
            kind = "graph" if _runner.num_graph_steps > before else "eager"
            totals[f"launch {kind}"] += time.perf_counter() - t
            pending.result = timed(pending.result, "wait for GPU")
            if timeline:
                timeline.launches.append((kind, began, timeline.event()))
            return pending

        runner.launch = launch
        sched.schedule = timed(sched.schedule, "schedule")
        sched.on_step_done = timed(sched.on_step_done, "on_step_done")
        if detail:
            runner.sampler.sample_async = timed(runner.sampler.sample_async, "sample launch (in launch)")
            half._take_samples = timed(half._take_samples, "take samples (in loop rest)")
    return totals, timeline


_PATCHED: list[tuple[Any, str, Any]] = []     # (owner, name, original) of the class-level timers
_INSTANCE_TIMERS = (("runner", "launch"), ("scheduler", "schedule"), ("scheduler", "on_step_done"),
                    ("sampler", "sample_async"), (None, "_take_samples"))


def untime_phases(loop) -> None:
    """Undo _time_phases (before the next workload's run wraps everything again)."""
    for half in getattr(loop, "halves", [loop]):
        for part, name in _INSTANCE_TIMERS:
            owner = half if part is None else (half.runner.sampler if part == "sampler" else getattr(half, part))
            owner.__dict__.pop(name, None) if hasattr(owner, "__dict__") else None
    while _PATCHED:
        owner, name, original = _PATCHED.pop()
        setattr(owner, name, original)


class GpuTimeline:
    """CUDA events around every launch (all on the one stream, in launch order) and every graph
    replay. An event runs when the GPU reaches it, so a launch's first event marks the end of the
    GPU's earlier work or, when the GPU had none, the launch's start: the time from the previous
    launch's last event to it is the GPU idle between steps, and a graph launch's span less its
    replay is the GPU idle while the CPU laid the step out."""

    def __init__(self, torch) -> None:
        self._torch = torch
        self.launches: list[tuple[str, Any, Any]] = []     # (kind, began, ended)
        self.replays: list[tuple[Any, Any]] = []

    def event(self) -> Any:
        e = self._torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def settle(self, totals: dict[str, float]) -> None:
        """(After a synchronize.) The GPU seconds per kind of step and of idle, into `totals`, and
        the idle's spread printed."""
        spans = [(kind, b.elapsed_time(e)) for kind, b, e in self.launches]
        replays = iter(b.elapsed_time(e) for b, e in self.replays)
        within = [span - next(replays) for kind, span in spans if kind == "graph"]
        between = [(prev[2].elapsed_time(cur[1]), prev[0]) for prev, cur in zip(self.launches, self.launches[1:])]
        for kind in ("graph", "eager"):
            totals[f"GPU of {kind} steps (in all)"] = sum(t for k, t in spans if k == kind) / 1000
        totals["GPU of graph replays (in all)"] = sum(b.elapsed_time(e) for b, e in self.replays) / 1000
        totals["GPU idle in graph launches (in all)"] = sum(within) / 1000
        totals["GPU idle between steps (in all)"] = sum(t for t, _ in between) / 1000
        big = sorted(between, reverse=True)
        print(f"GPU idle between steps: {sum(t > 2 for t, _ in between)} gaps over 2 ms hold "
              f"{sum(t for t, _ in between if t > 2) / 1000:.2f} s; largest (ms, after a step of kind): "
              + ", ".join(f"{t:.0f} {k}" for t, k in big[:8])
              + f". In graph launches: {sum(t > 2 for t in within)} over 2 ms hold "
              f"{sum(t for t in within if t > 2) / 1000:.2f} s of {sum(within) / 1000:.2f} s", flush=True)


def _timed(fn, totals: dict[str, float], key: str):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        out = fn(*a, **kw)
        totals[key] += time.perf_counter() - t
        return out
    return wrapper
