"""/metrics shows the Hydragen sharing fraction (decode KV reads saved) beside the prefix-cache hit
rate, and the counters a service benchmark reads (engine busy/idle seconds, steps): the pure family
builder, and GET /metrics on an app whose engine reports known stats."""

from __future__ import annotations

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tokabatch.config import Config, ServerConfig, StorageConfig
from tokabatch.engine.api import EngineStats
from tokabatch.service.app import make_app
from tokabatch.service.http import metrics, online
from tokabatch.service.http.middleware import hash_key
from tokabatch.service.storage import repo


def value(lines: list[str], name: str) -> float:
    return float(next(line for line in lines if line.startswith(name + " ")).split()[-1])


def sample_values(families) -> dict[str, float]:
    """Sample name (a counter's keeps its _total) -> value, for families without labels."""
    return {s.name: s.value for family in families for s in family.samples}


def test_ratio_is_saved_over_decode_reads() -> None:
    stats = EngineStats(num_hydragen_saved_kv_reads=300, num_decode_kv_reads=1200,
                        num_prompt_tokens=100, num_cached_tokens=40)
    families = metrics.engine_families(stats, 0.0, 0.0)
    values = sample_values(families)
    assert values["tokabatch_hydragen_kv_read_saved_ratio"] == 0.25
    assert values["tokabatch_prefix_cache_hit_rate"] == 0.4
    types = {family.name: family.type for family in families}
    assert types["tokabatch_hydragen_kv_read_saved_ratio"] == "gauge"
    names = [family.name for family in families]
    assert names.index("tokabatch_hydragen_kv_read_saved_ratio") == names.index("tokabatch_prefix_cache_hit_rate") + 1
    empty = sample_values(metrics.engine_families(EngineStats(), 0.0, 0.0))
    assert empty["tokabatch_hydragen_kv_read_saved_ratio"] == 0.0


def test_counters_for_service_benchmarks() -> None:
    # What scripts/bench.py reads between two scrapes: the engine's busy and idle seconds, its steps
    # and forward tokens, and the two counters the sharing ratio is made of (a ratio per run).
    stats = EngineStats(num_steps=7, num_forward_tokens=900, num_hydragen_saved_kv_reads=300,
                        num_decode_kv_reads=1200, busy_seconds=2.5, idle_seconds=0.5)
    values = sample_values(metrics.engine_families(stats, 0.0, 0.0))
    assert values["tokabatch_engine_steps_total"] == 7
    assert values["tokabatch_forward_tokens_total"] == 900
    assert values["tokabatch_hydragen_saved_kv_reads_total"] == 300
    assert values["tokabatch_decode_kv_reads_total"] == 1200
    assert values["tokabatch_engine_busy_seconds_total"] == 2.5
    assert values["tokabatch_engine_idle_seconds_total"] == 0.5


class _StatsEngine:
    """Only what /metrics reads of an engine."""

    def __init__(self, stats: EngineStats) -> None:
        self._stats = stats

    def stats(self) -> EngineStats:
        return self._stats


def _app(db, blobs, tmp_path, api_keys: tuple[str, ...] = ()) -> web.Application:
    config = Config(storage=StorageConfig(data_dir=str(tmp_path / "data")), server=ServerConfig(api_keys=api_keys))
    app = make_app(config, db=db, blobs=blobs, served_model_names=("m",), sweep_interval_s=None)
    app[online.ENGINE] = _StatsEngine(EngineStats(num_hydragen_saved_kv_reads=7, num_decode_kv_reads=8))
    metrics.install(app)
    return app


async def test_metrics_endpoint_exports_the_ratio(db, blobs, tmp_path) -> None:
    async with TestClient(TestServer(_app(db, blobs, tmp_path))) as client:
        resp = await client.get("/metrics")
        assert resp.status == 200
        text = await resp.text()
    assert value(text.splitlines(), "tokabatch_hydragen_kv_read_saved_ratio") == 0.875


async def test_batch_counts_are_the_caller_s_own(db, blobs, tmp_path) -> None:
    app = _app(db, blobs, tmp_path, api_keys=("key-a", "key-b"))
    async with TestClient(TestServer(app)) as client:
        owner_a = hash_key("key-a")
        for _ in range(2):
            await repo.create_batch(db, owner=owner_a, input_file_id="file-x", endpoint="/v1/completions",
                                    completion_window="24h", now_s=1000, window_s=86400)
        counts = {}
        for key in ("key-a", "key-b"):
            resp = await client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            counts[key] = value((await resp.text()).splitlines(), 'tokabatch_batches{status="validating"}')
    assert counts == {"key-a": 2, "key-b": 0}
