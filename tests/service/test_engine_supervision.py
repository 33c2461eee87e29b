"""The engine process killed under a running batch (SIGKILL, as the OOM killer does): the server
starts it again (engine/supervisor.py), /health and /ready answer 503 with the reason meanwhile, the
batch completes with every custom_id exactly once, and online requests work again."""

from __future__ import annotations

import asyncio
import json
import os
import signal

import pytest

from tests.service.jobsutil import build_tokenizer_folder
from tests.service.live_server import raw_request
from tokabatch.config import Config, EngineConfig, ModelConfig, RunnerConfig, ServerConfig, StorageConfig
from tokabatch.engine.client import EngineClient
from tokabatch.engine.loop_protocol import LoopSpec
from tokabatch.engine.supervisor import SupervisedEngine
from tokabatch.engine.testing import FAKE_FACTORY
from tokabatch.service import server
from tokabatch.text import Tokenizer

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]
NUM_LINES = 12


def _form(lines: list[dict]) -> tuple[bytes, str]:
    boundary = "bnd"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n"
            + "".join(json.dumps(x) + "\n" for x in lines) + f"\r\n--{boundary}--\r\n").encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def _get(url: str) -> tuple[int, dict]:
    status, _, raw = await asyncio.to_thread(raw_request, url)
    return status, json.loads(raw)


async def test_a_killed_engine_is_started_again_and_the_batch_completes(tmp_path):
    folder = build_tokenizer_folder(tmp_path / "tok")
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')   # never loaded: fake engine
    vocab = Tokenizer.from_folder(folder).vocab_size
    config = Config(engine=EngineConfig(model=ModelConfig(path=str(folder))),
                    storage=StorageConfig(data_dir=str(tmp_path / "data")), server=ServerConfig(port=0),
                    runner=RunnerConfig(poll_interval_s=0.05, progress_interval_s=0.1, heartbeat_s=0.1,
                                        retry_after_s=0.1, max_retry_after_s=0.5))
    engines: list[SupervisedEngine] = []

    async def engine_factory(cfg):
        spec = LoopSpec(FAKE_FACTORY, {"vocab_size": vocab, "model_id": "tiny", "token_interval_s": 0.05,
                                       "max_running": 2, "max_waiting": 2})
        engine = await SupervisedEngine.start(lambda: EngineClient.start(spec), retry_after_s=0.5)   # a process
        engines.append(engine)
        return engine

    stop, ports = asyncio.Event(), []
    task = asyncio.create_task(server.serve_async(config, engine_factory=engine_factory, stop=stop,
                                                  on_started=ports.append))
    while not ports:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.02)
    base = f"http://127.0.0.1:{ports[0]}"
    try:
        lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
                  "body": {"model": "tiny", "prompt": f"hello {i}", "max_tokens": 8}} for i in range(NUM_LINES)]
        data, content_type = _form(lines)
        status, _, raw = await asyncio.to_thread(raw_request, f"{base}/v1/files", method="POST", data=data,
                                                 headers={"Content-Type": content_type})
        file_id = json.loads(raw)["id"]
        status, _, raw = await asyncio.to_thread(
            raw_request, f"{base}/v1/batches", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"input_file_id": file_id, "endpoint": "/v1/completions",
                             "completion_window": "24h"}).encode())
        batch_id = json.loads(raw)["id"]
        for _ in range(400):                                     # some lines done, others running
            _, batch = await _get(f"{base}/v1/batches/{batch_id}")
            if batch["request_counts"]["completed"] >= 2:
                break
            await asyncio.sleep(0.02)
        engine = engines[0]
        assert engine.health() is None and (await _get(f"{base}/health"))[0] == 200
        os.kill(engine.pid, signal.SIGKILL)
        seen_down = None
        for _ in range(400):
            status, body = await _get(f"{base}/ready")
            if status == 503:
                seen_down = body
                break
            await asyncio.sleep(0.01)
        assert seen_down is not None and seen_down["status"] == "unavailable"
        assert "the engine stopped" in seen_down["problems"][0]
        assert (await _get(f"{base}/health"))[0] == 503
        status, _, raw = await asyncio.to_thread(
            raw_request, f"{base}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode())
        assert status == 503 and json.loads(raw)["error"]["code"]
        for _ in range(600):
            _, batch = await _get(f"{base}/v1/batches/{batch_id}")
            if batch["status"] == "completed":
                break
            await asyncio.sleep(0.05)
        assert batch["status"] == "completed" and batch["request_counts"] == {
            "total": NUM_LINES, "completed": NUM_LINES, "failed": 0}
        assert engine.num_restarts == 1 and (await _get(f"{base}/health"))[0] == 200
        status, _, raw = await asyncio.to_thread(raw_request, f"{base}/v1/files/{batch['output_file_id']}/content")
        ids = [json.loads(x)["custom_id"] for x in raw.decode().splitlines()]
        assert sorted(ids) == sorted(x["custom_id"] for x in lines)
        status, _, raw = await asyncio.to_thread(
            raw_request, f"{base}/v1/completions", method="POST", headers={"Content-Type": "application/json"},
            data=json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 2}).encode())
        assert status == 200, raw
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
