"""GET /metrics through prometheus_client: the text parses, each app has a registry of its own with
the process metrics on it, every name the docs and scripts read is still there, and the new
metrics have their values: each running batch's pace and ETA (the caller's own), the queue wait
histogram from known created_at/in_progress_at, and the engine's busy fraction between scrapes."""

from __future__ import annotations

import os

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from tokabatch.config import Config, ServerConfig, StorageConfig
from tokabatch.engine.api import EngineStats
from tokabatch.service.app import make_app
from tokabatch.service.http import metrics, online
from tokabatch.service.http.middleware import hash_key
from tokabatch.service.storage import repo
from tokabatch.service.storage.states import BatchStatus

# What docs/cli.md, scripts/bench_service.py and the e2e tests read: the names must not change.
NAMES_BEFORE_PROMETHEUS_CLIENT = (
    "tokabatch_queue_depth", "tokabatch_running_sequences", "tokabatch_kv_pages_free", "tokabatch_kv_pages",
    "tokabatch_generation_tokens_per_second", "tokabatch_generated_tokens_total", "tokabatch_prompt_tokens_total",
    "tokabatch_cached_prompt_tokens_total", "tokabatch_prefix_cache_hit_rate", "tokabatch_hydragen_kv_read_saved_ratio",
    "tokabatch_hydragen_saved_kv_reads_total", "tokabatch_decode_kv_reads_total", "tokabatch_engine_steps_total",
    "tokabatch_forward_tokens_total", "tokabatch_engine_busy_seconds_total", "tokabatch_engine_idle_seconds_total",
    "tokabatch_requests_finished_total", "tokabatch_preemptions_total", "tokabatch_batches",
    "tokabatch_online_request_duration_seconds_count",
)


class _StatsEngine:
    """Only what /metrics reads of an engine; tests change `stats` between scrapes."""

    def __init__(self, stats: EngineStats) -> None:
        self.stats_now = stats

    def stats(self) -> EngineStats:
        return self.stats_now


def _app(db, blobs, tmp_path, stats: EngineStats | None = None, api_keys: tuple[str, ...] = ()) -> web.Application:
    config = Config(storage=StorageConfig(data_dir=str(tmp_path / "data")), server=ServerConfig(api_keys=api_keys))
    app = make_app(config, db=db, blobs=blobs, served_model_names=("m",), sweep_interval_s=None)
    app[online.ENGINE] = _StatsEngine(stats or EngineStats())
    metrics.install(app)
    return app


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, through the library's own parser."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


async def _scrape(client: TestClient, key: str | None = None) -> str:
    resp = await client.get("/metrics", headers={"Authorization": f"Bearer {key}"} if key else {})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    return await resp.text()


async def _batch(db, owner: str, *, created_s: int, started_s: int | None = None) -> str:
    batch = await repo.create_batch(db, owner=owner, input_file_id="file-x", endpoint="/v1/completions",
                                    completion_window="24h", now_s=created_s, window_s=86400)
    if started_s is not None:
        assert await repo.transition_batch(db, batch.id, BatchStatus.IN_PROGRESS, started_s)
    return batch.id


async def test_the_text_parses_and_keeps_every_name(db, blobs, tmp_path) -> None:
    app = _app(db, blobs, tmp_path)
    app[metrics.LATENCY].observe("/v1/completions", "ok", 0.2)
    async with TestClient(TestServer(app)) as client:
        text = await _scrape(client)
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    names = {name for name, _ in samples(text)}
    assert set(NAMES_BEFORE_PROMETHEUS_CLIENT) <= names
    assert families["tokabatch_generated_tokens"] == "counter"        # the parser's name: the sample keeps _total
    assert "# TYPE tokabatch_generated_tokens_total counter" in text.splitlines()
    assert families["tokabatch_online_request_duration_seconds"] == "histogram"
    assert families["tokabatch_batch_queue_wait_seconds"] == "histogram"
    assert families["tokabatch_engine_busy_fraction"] == "gauge"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="ProcessCollector reads /proc")
async def test_process_metrics_are_present(db, blobs, tmp_path) -> None:
    async with TestClient(TestServer(_app(db, blobs, tmp_path))) as client:
        values = samples(await _scrape(client))
    assert values[("process_cpu_seconds_total", ())] > 0
    assert values[("process_resident_memory_bytes", ())] > 0
    assert values[("process_open_fds", ())] > 0
    assert any(name == "python_info" for name, _ in values)


async def test_two_apps_in_one_process_keep_their_own_registries(db, blobs, tmp_path) -> None:
    first, second = _app(db, blobs, tmp_path / "a"), _app(db, blobs, tmp_path / "b")   # the same names, twice
    assert first[metrics.REGISTRY] is not second[metrics.REGISTRY]
    first[metrics.LATENCY].observe("/v1/chat/completions", "ok", 0.3)
    count = ("tokabatch_online_request_duration_seconds_count",
             (("endpoint", "/v1/chat/completions"), ("status", "ok")))
    async with TestClient(TestServer(first)) as a, TestClient(TestServer(second)) as b:
        assert samples(await _scrape(a))[count] == 1
        assert count not in samples(await _scrape(b))


async def test_running_batches_pace_and_eta_are_the_caller_s_own(db, blobs, tmp_path) -> None:
    app = _app(db, blobs, tmp_path, api_keys=("key-a", "key-b"))
    owner_a, owner_b = hash_key("key-a"), hash_key("key-b")
    paced = await _batch(db, owner_a, created_s=1000, started_s=1010)
    throughput_only = await _batch(db, owner_a, created_s=1000, started_s=1010)
    unpaced = await _batch(db, owner_a, created_s=1000, started_s=1010)
    others = await _batch(db, owner_b, created_s=1000, started_s=1010)
    counts, usage = repo.RequestCounts(total=10, completed=4), repo.Usage(output_tokens=400)
    await repo.update_progress(db, paced, counts, usage, throughput=123.5, eta_seconds=42.0)
    await repo.update_progress(db, throughput_only, counts, usage, throughput=7.0)
    await repo.update_progress(db, others, counts, usage, throughput=99.0, eta_seconds=1.0)
    async with TestClient(TestServer(app)) as client:
        values = samples(await _scrape(client, "key-a"))
    tps = {dict(labels)["batch_id"]: v for (name, labels), v in values.items()
           if name == "tokabatch_batch_throughput_tokens_per_second"}
    eta = {dict(labels)["batch_id"]: v for (name, labels), v in values.items() if name == "tokabatch_batch_eta_seconds"}
    assert tps == {paced: 123.5, throughput_only: 7.0}
    assert eta == {paced: 42.0}
    assert unpaced not in tps and others not in tps


async def test_a_finished_batch_has_no_pace(db, blobs, tmp_path) -> None:
    batch_id = await _batch(db, "", created_s=1000, started_s=1001)
    await repo.update_progress(db, batch_id, repo.RequestCounts(total=1), repo.Usage(), throughput=5.0, eta_seconds=3.0)
    assert await repo.transition_batch(db, batch_id, BatchStatus.FINALIZING, 1002)
    async with TestClient(TestServer(_app(db, blobs, tmp_path))) as client:
        names = {name for name, _ in samples(await _scrape(client))}
    assert "tokabatch_batch_throughput_tokens_per_second" not in names
    assert "tokabatch_batch_eta_seconds" not in names


async def test_queue_wait_histogram_from_created_and_started_times(db, blobs, tmp_path) -> None:
    for wait_s in (0, 3, 60, 7200):                         # 60 sits on a bound: le is inclusive
        await _batch(db, "", created_s=1000, started_s=1000 + wait_s)
    await _batch(db, "", created_s=1000)                   # still validating: it has not waited its last yet
    failed = await _batch(db, "", created_s=1000)
    assert await repo.transition_batch(db, failed, BatchStatus.FAILED, 5000)    # never started
    await _batch(db, "someone-else", created_s=1000, started_s=1001)
    async with TestClient(TestServer(_app(db, blobs, tmp_path))) as client:
        values = samples(await _scrape(client))
    name = "tokabatch_batch_queue_wait_seconds"
    buckets = {dict(labels)["le"]: v for (n, labels), v in values.items() if n == name + "_bucket"}
    assert buckets == {"1.0": 1, "5.0": 2, "15.0": 2, "60.0": 3, "300.0": 3, "900.0": 3, "3600.0": 3,
                       "14400.0": 4, "86400.0": 4, "+Inf": 4}
    assert values[(name + "_count", ())] == 4
    assert values[(name + "_sum", ())] == 0 + 3 + 60 + 7200


def test_busy_fraction_and_token_rate_over_the_window() -> None:
    window = metrics.ScrapeWindow()
    # The first scrape has no window yet: the fraction since the engine started, and no rate.
    assert window.update(100.0, EngineStats(num_generated_tokens=50, busy_seconds=3.0, idle_seconds=1.0)) == (0.0, 0.75)
    # Between scrapes: 1 s busy of 4.
    rate, busy = window.update(105.0, EngineStats(num_generated_tokens=100, busy_seconds=4.0, idle_seconds=4.0))
    assert (rate, busy) == (10.0, 0.25)
    # A scrape 15 s later drops the first sample (the second is still >= RATE_WINDOW_S away): 6 s busy of 6.
    rate, busy = window.update(120.0, EngineStats(num_generated_tokens=400, busy_seconds=10.0, idle_seconds=4.0))
    assert (rate, busy) == (20.0, 1.0)


def test_busy_fraction_without_a_report_in_the_window_is_the_one_since_start() -> None:
    window, stats = metrics.ScrapeWindow(), EngineStats(busy_seconds=1.0, idle_seconds=4.0)
    window.update(100.0, stats)
    assert window.update(101.0, stats) == (0.0, 0.2)      # not 0/0: the engine sent nothing new


async def test_busy_fraction_on_the_endpoint(db, blobs, tmp_path) -> None:
    app = _app(db, blobs, tmp_path, EngineStats(busy_seconds=1.0, idle_seconds=3.0))
    async with TestClient(TestServer(app)) as client:
        first = samples(await _scrape(client))[("tokabatch_engine_busy_fraction", ())]
        app[online.ENGINE].stats_now = EngineStats(busy_seconds=4.0, idle_seconds=4.0)   # 3 s busy of 4 since
        second = samples(await _scrape(client))[("tokabatch_engine_busy_fraction", ())]
    assert (first, second) == (0.25, 0.75)
