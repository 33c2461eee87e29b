"""`tokabatch serve` with two engine processes (`data_parallel=2`, the simulated engine: real
schedulers, no model) through the batch API: every line once, the lines spread over both engines
(per-engine counters in /metrics), and lines that share a long prompt start kept on one engine."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tokabatch.config import load_config
from tokabatch.engine.random_models import build_folder
from tokabatch.service.server import serve_async

pytestmark = pytest.mark.timeout(240)


def test_one_batch_spreads_over_two_engine_processes(tmp_path):
    folder = tmp_path / "Qwen2.5-0.5B"
    build_folder("Qwen2.5-0.5B", folder, weights=False)
    config = load_config(env={}, model={"path": str(folder)}, storage={"data_dir": str(tmp_path / "data")},
                         server={"port": 0}, engine={"data_parallel": 2,
                                                     "loop_factory": "tokabatch.engine.simulated:build_simulated_loop"},
                         runner={"poll_interval_s": 0.1, "progress_interval_s": 0.2})
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    started = threading.Event()
    port: list[int] = []

    def main() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve_async(config, stop=stop, on_started=lambda p: (port.append(p), started.set())))

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    assert started.wait(120), "the server did not start"
    base = f"http://127.0.0.1:{port[0]}/v1"
    try:
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0)
        model = client.models.list().data[0].id
        lines = []
        for problem in range(8):                     # 8 problems x 6 samples; each problem's prompt starts alike
            shared = list(range(problem * 1000 + 1, problem * 1000 + 301))
            for sample in range(6):
                body = {"model": model, "prompt": shared + [5000 + sample], "max_tokens": 8, "ignore_eos": True,
                        "temperature": 1.0}
                lines.append(json.dumps({"custom_id": f"p{problem}s{sample}", "method": "POST",
                                         "url": "/v1/completions", "body": body}))
        path = tmp_path / "in.jsonl"
        path.write_text("\n".join(lines) + "\n")
        upload = client.files.create(file=path.open("rb"), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h")
        deadline = time.monotonic() + 120
        while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert batch.status == "completed" and batch.request_counts.completed == 48
        ids = [json.loads(x)["custom_id"] for x in client.files.content(batch.output_file_id).text.splitlines()]
        assert sorted(ids) == sorted(json.loads(x)["custom_id"] for x in lines)
        text = urllib.request.urlopen(base.removesuffix("/v1") + "/metrics", timeout=10).read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        finished = {s.labels["engine"]: s.value for s in families["tokabatch_engine_requests_finished"].samples
                    if s.name.endswith("_total")}
        assert set(finished) == {"0", "1"} and all(v > 0 for v in finished.values())
        assert sum(finished.values()) == 48
        # Whole problems went to one engine or the other: each engine finished a multiple of 6 lines.
        assert all(v % 6 == 0 for v in finished.values()), finished
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(60)
