"""GET /metrics: Prometheus text format (version 0.0.4) for the engine, the batches and online latency.

Owns the metric names and the latency histogram that online.py observes (app key LATENCY).
Engine gauges and counters come from `Engine.stats()` (a cheap read of the last report); tokens/s
is measured between scrapes (over at least RATE_WINDOW_S, so frequent scrapers see a stable value);
the Hydragen sharing fraction (decode KV reads saved by prefix groups) sits beside the prefix-cache
hit rate, both since the engine started;
the batches by status are the caller's own (every batch when no API keys are configured: then
there is one owner), counted by repo.py. Must not import torch.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from aiohttp import web
from tokabatch.engine.api import EngineStats
from tokabatch.service.http.context import DB, owner_of
from tokabatch.service.storage import repo

RATE_WINDOW_S = 10.0
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

routes = web.RouteTableDef()


@dataclass
class LatencyHistogram:
    """Online request latency per (endpoint, status), cumulative buckets as Prometheus expects."""

    buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S
    _series: dict[tuple[str, str], list[float]] = field(default_factory=dict)   # bucket counts, +Inf, sum

    def observe(self, endpoint: str, status: str, seconds: float) -> None:
        series = self._series.setdefault((endpoint, status), [0.0] * (len(self.buckets_s) + 2))
        series[bisect.bisect_left(self.buckets_s, seconds)] += 1      # the first bucket with le >= seconds
        series[-1] += seconds

    def lines(self, name: str) -> list[str]:
        out = [f"# HELP {name} Latency of online completion requests in seconds.", f"# TYPE {name} histogram"]
        for (endpoint, status), series in sorted(self._series.items()):
            labels = f'endpoint="{endpoint}",status="{status}"'
            cumulative = 0.0
            for le, count in zip((*self.buckets_s, float("inf")), series[:-1]):
                cumulative += count
                bound = "+Inf" if le == float("inf") else repr(le)
                out.append(f'{name}_bucket{{{labels},le="{bound}"}} {cumulative:g}')
            out.append(f"{name}_sum{{{labels}}} {series[-1]:.6f}")
            out.append(f"{name}_count{{{labels}}} {cumulative:g}")
        return out


@dataclass
class TokenRate:
    """Generated tokens per second from (time, total) samples taken at scrape time."""

    samples: deque = field(default_factory=lambda: deque(maxlen=64))

    def update(self, now_s: float, total_tokens: int) -> float:
        self.samples.append((now_s, total_tokens))
        while len(self.samples) > 2 and now_s - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()                  # keep the oldest sample still >= the window away
        t0, k0 = self.samples[0]
        return (total_tokens - k0) / (now_s - t0) if now_s > t0 else 0.0


LATENCY = web.AppKey("online_latency", LatencyHistogram)
TOKEN_RATE = web.AppKey("token_rate", TokenRate)


def install(app: web.Application) -> None:
    """Add /metrics and the state it keeps (call from make_app/server before the app starts)."""
    app[LATENCY] = LatencyHistogram()
    app[TOKEN_RATE] = TokenRate()
    app.add_routes(routes)


def _metric(name: str, kind: str, help_text: str, value: float | int, labels: str = "") -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{labels} {value:g}"]


def hydragen_saved_ratio(stats: EngineStats) -> float:
    """The Hydragen sharing fraction: decode KV reads the prefix groups saved over those without them."""
    return stats.num_hydragen_saved_kv_reads / stats.num_decode_kv_reads if stats.num_decode_kv_reads else 0.0


def engine_lines(stats: EngineStats, rate: float) -> list[str]:
    """The engine's gauges and counters from one stats report; `rate` is generated tokens per second."""
    lines: list[str] = []
    lines += _metric("tokabatch_queue_depth", "gauge", "Requests queued in the engine, not yet admitted.",
                     stats.num_waiting)
    lines += _metric("tokabatch_running_sequences", "gauge", "Sequences holding KV pages.", stats.num_running)
    lines += _metric("tokabatch_kv_pages_free", "gauge", "Free KV-cache pages.", stats.num_free_pages)
    lines += _metric("tokabatch_kv_pages", "gauge", "KV-cache pages in all.", stats.num_pages)
    lines += _metric("tokabatch_generation_tokens_per_second", "gauge",
                     f"Generated tokens per second over the last {RATE_WINDOW_S:g} s of scrapes.", rate)
    lines += _metric("tokabatch_generated_tokens_total", "counter", "Tokens generated.",
                     stats.num_generated_tokens)
    lines += _metric("tokabatch_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
                     stats.num_prompt_tokens)
    lines += _metric("tokabatch_cached_prompt_tokens_total", "counter",
                     "Prompt tokens served from the prefix cache.", stats.num_cached_tokens)
    lines += _metric("tokabatch_prefix_cache_hit_rate", "gauge",
                     "Cached prompt tokens / prompt tokens since start.", stats.prefix_cache_hit_rate)
    lines += _metric("tokabatch_hydragen_kv_read_saved_ratio", "gauge",
                     "Decode KV-token reads saved by Hydragen prefix groups / decode KV-token reads since start.",
                     hydragen_saved_ratio(stats))
    lines += _metric("tokabatch_hydragen_saved_kv_reads_total", "counter",
                     "Decode KV-token reads saved by Hydragen prefix groups.", stats.num_hydragen_saved_kv_reads)
    lines += _metric("tokabatch_decode_kv_reads_total", "counter",
                     "Decode KV-token reads a step would make without prefix groups.", stats.num_decode_kv_reads)
    lines += _metric("tokabatch_engine_steps_total", "counter", "Forward passes (steps) the engine ran.",
                     stats.num_steps)
    lines += _metric("tokabatch_forward_tokens_total", "counter", "Tokens that went through the model's forward.",
                     stats.num_forward_tokens)
    lines += _metric("tokabatch_engine_busy_seconds_total", "counter",
                     "Wall seconds the engine process had work (stepping or handling messages).", stats.busy_seconds)
    lines += _metric("tokabatch_engine_idle_seconds_total", "counter",
                     "Wall seconds the engine process waited for work.", stats.idle_seconds)
    lines += _metric("tokabatch_requests_finished_total", "counter", "Engine requests finished.",
                     stats.num_requests_finished)
    lines += _metric("tokabatch_preemptions_total", "counter", "Sequences preempted.", stats.num_preemptions)
    return lines


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    from tokabatch.service.http.online import ENGINE   # online imports this module for LATENCY

    lines: list[str] = []
    engine = request.app.get(ENGINE)
    if engine is not None:
        stats = engine.stats()
        rate = request.app[TOKEN_RATE].update(time.monotonic(), stats.num_generated_tokens)
        lines += engine_lines(stats, rate)
    counts = await repo.count_batches_by_status(request.app[DB], owner=owner_of(request))
    lines += ["# HELP tokabatch_batches The caller's batches by status.", "# TYPE tokabatch_batches gauge"]
    lines += [f'tokabatch_batches{{status="{status}"}} {n}' for status, n in sorted(counts.items())]
    lines += request.app[LATENCY].lines("tokabatch_online_request_duration_seconds")
    return web.Response(body=("\n".join(lines) + "\n").encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})


__all__ = ["LATENCY", "LatencyHistogram", "TOKEN_RATE", "TokenRate", "engine_lines", "hydragen_saved_ratio", "install",
           "routes"]
