"""GET /metrics: the engine, the batches, online latency and the process, through prometheus_client.

Owns the metric names and each app's CollectorRegistry (app key REGISTRY; never the library's
global one, since one process may hold many apps, as the tests do). On it: the process and
platform collectors, the online latency histogram that online.py observes (app key LATENCY), and
ScrapeFamilies, which the handler fills just before rendering with what it read for this scrape:
the engine's gauges and counters from `Engine.stats()` (a cheap read of the last report), with
tokens/s and the busy fraction measured between scrapes (over at least RATE_WINDOW_S, so frequent
scrapers see a stable value); and the caller's batches (every batch when no API keys are
configured: then there is one owner) from repo.py: counts by status, each running batch's pace
and ETA, and how long batches waited before they started. The Hydragen sharing fraction (decode KV
reads saved by prefix groups) sits beside the prefix-cache hit rate, both since the engine started.
Must not import torch.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, PlatformCollector, ProcessCollector, generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from tokabatch.engine.api import EngineStats
from tokabatch.service.http.context import DB, owner_of
from tokabatch.service.storage import repo

RATE_WINDOW_S = 10.0
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
QUEUE_WAIT_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)

routes = web.RouteTableDef()


class OnlineLatency:
    """Online request latency per (endpoint, status), a histogram on the app's registry."""

    def __init__(self, registry: CollectorRegistry, buckets_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self._histogram = Histogram("tokabatch_online_request_duration_seconds",
                                    "Latency of online completion requests in seconds.", ("endpoint", "status"),
                                    buckets=buckets_s, registry=registry)

    def observe(self, endpoint: str, status: str, seconds: float) -> None:
        self._histogram.labels(endpoint=endpoint, status=status).observe(seconds)


@dataclass
class ScrapeWindow:
    """Engine totals sampled at scrape time, so that tokens/s and the busy fraction cover at least
    RATE_WINDOW_S of the engine's life however often the scrapes come."""

    samples: deque[tuple[float, int, float, float]] = field(default_factory=lambda: deque(maxlen=64))

    def update(self, now_s: float, stats: EngineStats) -> tuple[float, float]:
        """(generated tokens per second, busy seconds / (busy + idle)) since the oldest sample kept."""
        self.samples.append((now_s, stats.num_generated_tokens, stats.busy_seconds, stats.idle_seconds))
        while len(self.samples) > 2 and now_s - self.samples[1][0] >= RATE_WINDOW_S:
            self.samples.popleft()                  # keep the oldest sample still >= the window away
        t0, tokens0, busy0, idle0 = self.samples[0]
        rate = (stats.num_generated_tokens - tokens0) / (now_s - t0) if now_s > t0 else 0.0
        busy, idle = stats.busy_seconds - busy0, stats.idle_seconds - idle0
        if busy + idle <= 0:    # the first scrape, or no engine report since: the fraction since it started
            busy, idle = stats.busy_seconds, stats.idle_seconds
        return rate, busy / (busy + idle) if busy + idle > 0 else 0.0


class ScrapeFamilies:
    """The families one scrape read from the engine and the database. The handler sets them and
    renders with no await in between, so concurrent scrapes (of different callers) never mix."""

    def __init__(self) -> None:
        self.families: list[Metric] = []

    def collect(self) -> Iterable[Metric]:
        return list(self.families)


REGISTRY = web.AppKey("metrics_registry", CollectorRegistry)
LATENCY = web.AppKey("online_latency", OnlineLatency)
SCRAPE_WINDOW = web.AppKey("scrape_window", ScrapeWindow)
SCRAPE_FAMILIES = web.AppKey("scrape_families", ScrapeFamilies)


def install(app: web.Application) -> None:
    """Add /metrics, its registry and the state it keeps (call from make_app/server before the app starts)."""
    registry = app[REGISTRY] = CollectorRegistry()
    app[SCRAPE_FAMILIES] = ScrapeFamilies()
    registry.register(app[SCRAPE_FAMILIES])
    app[LATENCY] = OnlineLatency(registry)
    ProcessCollector(registry=registry)         # process_cpu_seconds_total, process_resident_memory_bytes, ...
    PlatformCollector(registry=registry)        # python_info
    app[SCRAPE_WINDOW] = ScrapeWindow()
    app.add_routes(routes)


def hydragen_saved_ratio(stats: EngineStats) -> float:
    """The Hydragen sharing fraction: decode KV reads the prefix groups saved over those without them."""
    return stats.num_hydragen_saved_kv_reads / stats.num_decode_kv_reads if stats.num_decode_kv_reads else 0.0


def engine_families(stats: EngineStats, tokens_per_second: float, busy_fraction: float) -> list[Metric]:
    """The engine's gauges and counters from one stats report, with the two rates measured between scrapes.
    Counter names keep their `_total` (prometheus_client strips it from the family and writes it back)."""
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    return [
        gauge("tokabatch_queue_depth", "Requests queued in the engine, not yet admitted.", value=stats.num_waiting),
        gauge("tokabatch_running_sequences", "Sequences holding KV pages.", value=stats.num_running),
        gauge("tokabatch_kv_pages_free", "Free KV-cache pages.", value=stats.num_free_pages),
        gauge("tokabatch_kv_pages", "KV-cache pages in all.", value=stats.num_pages),
        gauge("tokabatch_generation_tokens_per_second",
              f"Generated tokens per second over the last {RATE_WINDOW_S:g} s of scrapes.", value=tokens_per_second),
        counter("tokabatch_generated_tokens_total", "Tokens generated.", value=stats.num_generated_tokens),
        counter("tokabatch_prompt_tokens_total", "Prompt tokens of admitted requests.", value=stats.num_prompt_tokens),
        counter("tokabatch_cached_prompt_tokens_total", "Prompt tokens served from the prefix cache.",
                value=stats.num_cached_tokens),
        gauge("tokabatch_prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens since start.",
              value=stats.prefix_cache_hit_rate),
        gauge("tokabatch_hydragen_kv_read_saved_ratio",
              "Decode KV-token reads saved by Hydragen prefix groups / decode KV-token reads since start.",
              value=hydragen_saved_ratio(stats)),
        counter("tokabatch_hydragen_saved_kv_reads_total", "Decode KV-token reads saved by Hydragen prefix groups.",
                value=stats.num_hydragen_saved_kv_reads),
        counter("tokabatch_decode_kv_reads_total", "Decode KV-token reads a step would make without prefix groups.",
                value=stats.num_decode_kv_reads),
        counter("tokabatch_engine_steps_total", "Forward passes (steps) the engine ran.", value=stats.num_steps),
        counter("tokabatch_forward_tokens_total", "Tokens that went through the model's forward.",
                value=stats.num_forward_tokens),
        counter("tokabatch_engine_busy_seconds_total",
                "Wall seconds the engine process had work (stepping or handling messages).", value=stats.busy_seconds),
        counter("tokabatch_engine_idle_seconds_total", "Wall seconds the engine process waited for work.",
                value=stats.idle_seconds),
        gauge("tokabatch_engine_busy_fraction",
              f"Engine busy seconds / (busy + idle) over the last {RATE_WINDOW_S:g} s of scrapes.",
              value=busy_fraction),
        counter("tokabatch_requests_finished_total", "Engine requests finished.", value=stats.num_requests_finished),
        counter("tokabatch_preemptions_total", "Sequences preempted.", value=stats.num_preemptions),
    ]


def per_engine_families(parts: list[EngineStats]) -> list[Metric]:
    """With several engines under one server (--data-parallel): how the work spread over them."""
    families = [
        CounterMetricFamily("tokabatch_engine_requests_finished_total", "Requests each engine finished.",
                            labels=["engine"]),
        CounterMetricFamily("tokabatch_engine_generated_tokens_total", "Tokens each engine generated.",
                            labels=["engine"]),
        GaugeMetricFamily("tokabatch_engine_running_sequences", "Sequences holding KV pages in each engine.",
                          labels=["engine"]),
        GaugeMetricFamily("tokabatch_engine_hydragen_kv_read_saved_ratio",
                          "Each engine's decode KV-token reads saved by Hydragen prefix groups, since start.",
                          labels=["engine"]),
    ]
    for i, stats in enumerate(parts):
        values = (stats.num_requests_finished, stats.num_generated_tokens, stats.num_running,
                  hydragen_saved_ratio(stats))
        for family, value in zip(families, values):
            family.add_metric([str(i)], value)
    return families


def batch_families(counts: dict[str, int], waits: list[int], wait_sum_s: float,
                   running: list[tuple[str, float | None, float | None]]) -> list[Metric]:
    """The caller's batches: `counts` by status, `waits` (cumulative per QUEUE_WAIT_BUCKETS_S, then
    all started batches) with their sum, and (id, throughput, eta_seconds) per running batch."""
    batches = GaugeMetricFamily("tokabatch_batches", "The caller's batches by status.", labels=["status"])
    for status, n in sorted(counts.items()):
        batches.add_metric([status], n)
    throughput = GaugeMetricFamily("tokabatch_batch_throughput_tokens_per_second",
                                   "Output tokens per second of each running batch over its last minute.",
                                   labels=["batch_id"])
    eta = GaugeMetricFamily("tokabatch_batch_eta_seconds", "Seconds each running batch has left at its pace.",
                            labels=["batch_id"])
    for batch_id, tokens_per_s, eta_s in running:
        if tokens_per_s is not None:
            throughput.add_metric([batch_id], tokens_per_s)
        if eta_s is not None:
            eta.add_metric([batch_id], eta_s)
    bounds = [floatToGoString(b) for b in QUEUE_WAIT_BUCKETS_S] + ["+Inf"]
    queue_wait = HistogramMetricFamily("tokabatch_batch_queue_wait_seconds",
                                       "Seconds the caller's started batches waited from created to in_progress.",
                                       buckets=list(zip(bounds, waits)), sum_value=wait_sum_s)
    return [batches, throughput, eta, queue_wait]


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.Response:
    from tokabatch.service.http.online import ENGINE   # online imports this module for LATENCY

    app, owner = request.app, owner_of(request)
    counts = await repo.count_batches_by_status(app[DB], owner=owner)
    waits, wait_sum_s, running = await repo.batch_timings(app[DB], owner=owner, wait_bounds_s=QUEUE_WAIT_BUCKETS_S)
    families = []
    engine = app.get(ENGINE)
    if engine is not None:
        stats = engine.stats()
        families += engine_families(stats, *app[SCRAPE_WINDOW].update(time.monotonic(), stats))
        per_engine = getattr(engine, "engine_stats", None)     # a DataParallelEngine: each engine too
        if per_engine is not None:
            families += per_engine_families(per_engine())
    app[SCRAPE_FAMILIES].families = families + batch_families(counts, waits, wait_sum_s, running)
    return web.Response(body=generate_latest(app[REGISTRY]), headers={"Content-Type": CONTENT_TYPE_LATEST})


__all__ = ["LATENCY", "OnlineLatency", "REGISTRY", "SCRAPE_WINDOW", "ScrapeFamilies", "ScrapeWindow", "batch_families",
           "engine_families", "hydragen_saved_ratio", "install", "per_engine_families", "routes"]
