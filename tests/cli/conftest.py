"""A live `tokabatch serve` (serve_async: migrations, runner, HTTP) in a background thread, with the
fake engine in place of the model, for end-to-end tests of `tokabatch submit --wait`."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable

import pytest

from tokabatch import model_store
from tokabatch.config import (
    Config, EngineConfig, ModelConfig, RunnerConfig, ServerConfig, StorageConfig, WebhookConfig,
)
from tokabatch.engine.testing import FakeEngine, FakeLoop
from tokabatch.service import server as server_mod

DEMO_READY = (model_store.models_dir() / model_store.DEMO_FOLDER / "config.json").is_file()
needs_demo_tokenizer = pytest.mark.skipif(not DEMO_READY, reason="needs the demo model's tokenizer "
                                          "(`tokabatch models fetch`)")


class FakeServer:
    """serve_async on port 0 in its own thread and event loop. `clock_speed` > 1 makes the runner's
    clock run faster than the wall clock (a 1-minute completion window expires in about 1/speed min)."""

    def __init__(self, data_dir: Path, *, loop_kwargs: dict, clock_speed: float = 1.0,
                 runner: dict | None = None, webhooks: dict | None = None) -> None:
        self.config = Config(
            engine=EngineConfig(model=ModelConfig(path="demo")),
            storage=StorageConfig(data_dir=str(data_dir)),
            server=ServerConfig(host="127.0.0.1", port=0, allow_custom_windows=True),
            runner=RunnerConfig(**{"lease_s": 3600.0, "heartbeat_s": 1.0, "progress_interval_s": 0.2,
                                   "poll_interval_s": 0.1, **(runner or {})}),
            webhooks=WebhookConfig(**(webhooks or {})),
        )
        self.loop_kwargs = {"model_id": "demo", **loop_kwargs}
        self.clock_speed = clock_speed
        self.engine: FakeEngine | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="cli-test-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _clock(self) -> Callable[[], float]:
        start = time.time()
        return lambda: start + (time.time() - start) * self.clock_speed

    async def _engine(self, config: Config) -> FakeEngine:
        self.engine = await FakeEngine.launch(FakeLoop(**self.loop_kwargs))
        return self.engine

    def _runner(self, config, db, blobs, engine):
        from tokabatch.service.jobs.runner import BatchRunner
        from tokabatch.text import Tokenizer

        tokenizer = Tokenizer.from_folder(model_store.resolve_model_path("demo"))
        runner = BatchRunner(config.runner, db, blobs, engine, tokenizer,
                             set(server_mod.served_model_names(config, engine)), clock=self._clock(),
                             max_batch_lines=config.server.max_batch_lines)
        return server_mod._RunnerTask(runner)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._stop = asyncio.Event()

        def started(port: int) -> None:
            self.port = port
            self._started.set()

        try:
            self._loop.run_until_complete(server_mod.serve_async(
                self.config, engine_factory=self._engine, runner_factory=self._runner, stop=self._stop,
                on_started=started))
        except BaseException as e:  # surfaced by start()/stop(), never lost
            self._error = e
            self._started.set()
        finally:
            self._loop.close()

    def start(self) -> "FakeServer":
        self._thread.start()
        self._started.wait(60)
        if self._error is not None or not self.port:
            raise RuntimeError(f"the test server did not start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        if self._error is not None:
            raise self._error


@pytest.fixture
def fake_server_factory(tmp_path):
    """start(loop_kwargs=..., clock_speed=..., runner=...) -> a started FakeServer; all stopped after."""
    servers: list[FakeServer] = []
    def start(**kwargs) -> FakeServer:
        server = FakeServer(tmp_path / f"server{len(servers)}", **kwargs)
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()
