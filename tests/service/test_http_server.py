"""serve(): migrations applied, engine and runner started, HTTP answers, and a clean stop in reverse
order on SIGTERM. The engine and runner are stubs recording their lifetimes; torch stays unloaded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

from tests.service.live_server import raw_request, server_config
from tokabatch.engine.api import ModelInfo
from tokabatch.service import server
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage import repo


class StubEngine:
    def __init__(self, events: list[str]) -> None:
        self.events = events
        self.info = ModelInfo("stub-model", 2048, 1000, (2,))

    def health(self) -> str | None:
        return None

    async def close(self) -> None:
        self.events.append("engine.close")


class StubRunner:
    def __init__(self, events: list[str], engine) -> None:
        self.events, self.engine = events, engine

    async def start(self) -> None:
        self.events.append("runner.start")

    def wake(self) -> None:
        self.events.append("runner.wake")

    def health(self) -> str | None:
        return None

    def begin_stop(self) -> None:
        self.events.append("runner.begin_stop")

    async def stop(self) -> None:
        self.events.append("runner.stop")


async def test_serve_lifecycle_and_sigterm(tmp_path):
    events: list[str] = []
    config = server_config(tmp_path)
    ports: list[int] = []

    async def engine_factory(cfg):
        events.append("engine.start")
        return StubEngine(events)

    task = asyncio.create_task(server.serve_async(
        config, engine_factory=engine_factory,
        runner_factory=lambda cfg, db, blobs, engine: StubRunner(events, engine),
        on_started=ports.append))
    while not ports:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.02)
    base = f"http://127.0.0.1:{ports[0]}"
    status, _, body = await asyncio.to_thread(raw_request, f"{base}/v1/models")
    # The engine's name is the one name (here as --served-model-name would set it): no `demo` alias.
    assert status == 200 and [m["id"] for m in json.loads(body)["data"]] == ["stub-model"]
    status, _, _ = await asyncio.to_thread(raw_request, f"{base}/v1/models/demo")
    assert status == 404
    status, _, body = await asyncio.to_thread(
        raw_request, f"{base}/v1/batches", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"input_file_id": "file-x", "endpoint": "/v1/completions",
                         "completion_window": "24h"}).encode())
    assert status == 200 and json.loads(body)["model"] == "stub-model"
    os.kill(os.getpid(), signal.SIGTERM)          # handled by serve's loop signal handler
    await asyncio.wait_for(task, 30)
    # The created batch woke the runner (it claims at once instead of at its next poll).
    assert events == ["engine.start", "runner.start", "runner.wake", "runner.begin_stop", "runner.stop", "engine.close"]
    database = await dbmod.Database.open(dbmod.database_url(config.storage))
    try:                                          # migrated at start; the batch is durable
        assert len((await repo.list_batches(database, owner="")).items) == 1
    finally:
        await database.close()


def test_the_served_name_is_the_only_name():
    # `serve --model demo --served-model-name tiny` once listed and accepted `demo` beside `tiny`.
    from tokabatch.config import Config, EngineConfig, ModelConfig

    engine = StubEngine([])                 # its model id stands for --served-model-name
    demo = Config(engine=EngineConfig(model=ModelConfig(path="demo", served_model_name="stub-model")))
    other = Config(engine=EngineConfig(model=ModelConfig(path="/models/x")))
    assert server.served_model_names(demo, engine) == ("stub-model",)
    assert server.served_model_names(other, engine) == ("stub-model",)


def test_service_never_imports_torch():
    code = ("import sys, tokabatch.service.app, tokabatch.service.server, tokabatch.service.storage.repo, "
            "tokabatch.service.http.files, tokabatch.service.storage.states; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=os.environ | {"PYTHONPATH": os.getcwd()})


async def test_serve_wires_the_real_runner(tmp_path):
    """serve() with the default runner factory (BatchRunner + the model folder's tokenizer) and a
    FakeEngine: an uploaded batch runs to `completed` through HTTP only."""
    from tests.service.jobsutil import build_tokenizer_folder
    from tokabatch.config import Config, EngineConfig, ModelConfig, RunnerConfig, ServerConfig, StorageConfig
    from tokabatch.engine.testing import FakeEngine
    from tokabatch.text import Tokenizer

    folder = build_tokenizer_folder(tmp_path / "tok")
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')  # never loaded: fake engine
    vocab = Tokenizer.from_folder(folder).vocab_size
    config = Config(engine=EngineConfig(model=ModelConfig(path=str(folder))),
                    storage=StorageConfig(data_dir=str(tmp_path / "data")), server=ServerConfig(port=0),
                    runner=RunnerConfig(poll_interval_s=0.05, progress_interval_s=0.1, heartbeat_s=0.1))
    stop, ports = asyncio.Event(), []

    async def engine_factory(cfg):
        return await FakeEngine.launch(vocab_size=vocab, model_id="tiny")

    task = asyncio.create_task(server.serve_async(config, engine_factory=engine_factory, stop=stop,
                                                  on_started=ports.append))
    while not ports:
        assert not task.done(), task.exception()
        await asyncio.sleep(0.02)
    base = f"http://127.0.0.1:{ports[0]}/v1"
    line = {"custom_id": "c1", "method": "POST", "url": "/v1/completions",
            "body": {"model": "tiny", "prompt": "hello", "max_tokens": 3}}
    boundary = "bnd"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\r\n"
            f"{json.dumps(line)}\n\r\n--{boundary}--\r\n").encode()
    status, _, raw = await asyncio.to_thread(raw_request, f"{base}/files", method="POST", data=body,
                                             headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200, raw
    file_id = json.loads(raw)["id"]
    status, _, raw = await asyncio.to_thread(
        raw_request, f"{base}/batches", method="POST", headers={"Content-Type": "application/json"},
        data=json.dumps({"input_file_id": file_id, "endpoint": "/v1/completions", "completion_window": "24h"}).encode())
    batch_id = json.loads(raw)["id"]
    try:
        for _ in range(300):
            status, _, raw = await asyncio.to_thread(raw_request, f"{base}/batches/{batch_id}")
            batch = json.loads(raw)
            if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                break
            await asyncio.sleep(0.05)
        assert batch["status"] == "completed", batch
        assert batch["request_counts"] == {"total": 1, "completed": 1, "failed": 0}
        status, _, raw = await asyncio.to_thread(raw_request, f"{base}/files/{batch['output_file_id']}/content")
        assert status == 200 and json.loads(raw)["response"]["status_code"] == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
