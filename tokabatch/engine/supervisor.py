"""SupervisedEngine: the server's Engine, which starts its engine process again when it dies.

Owns the engine's lifetime in `tokabatch serve`: it launches an EngineClient and watches it; when
the engine process stops on its own (killed, out of memory, a step that raised), it logs why and
launches a new one, waiting `retry_after_s` before each attempt (doubling to `max_retry_after_s`)
for as long as it takes. While there is no engine, generate() and submit() raise
EngineUnavailable (online requests answer 503) and health() says why (/health and /ready answer
503, and the batch runner claims nothing). The requests in flight when the process died got their
503 outputs from the dead client: the batch runner leaves those lines unwritten and runs them again
on its next claim.

Must not import torch (the service process uses it): stdlib, engine/api, engine/client, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
from typing import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable

from tokabatch import errors
from tokabatch.config import EngineConfig
from tokabatch.engine.api import EngineStats, GenerationOutput, GenerationRequest, GenerationUpdate, ModelInfo
from tokabatch.engine.client import EngineClient
from tokabatch.engine.data_parallel import DataParallelEngine

log = logging.getLogger(__name__)

Launch = Callable[[], Awaitable[EngineClient]]


class SupervisedEngine:
    """An Engine over a restartable EngineClient. Create with `await SupervisedEngine.start(launch)`."""

    def __init__(self, launch: Launch, first: EngineClient, *, retry_after_s: float = 1.0,
                 max_retry_after_s: float = 60.0) -> None:
        self._launch = launch
        self._client: EngineClient | None = first
        self._info = first.info
        self._stats = first.stats()
        self._down: str | None = None
        self._closing = False
        self.retry_after_s, self.max_retry_after_s = retry_after_s, max_retry_after_s
        self.num_restarts = 0
        self._watcher = asyncio.create_task(self._watch(), name="engine-supervisor")

    @classmethod
    async def start(cls, launch: Launch, **kwargs: float) -> SupervisedEngine:
        """Launch the first engine (a failure to start is raised: a bad model is not retried)."""
        return cls(launch, await launch(), **kwargs)

    # ---- the Engine protocol --------------------------------------------------------------

    @property
    def info(self) -> ModelInfo:
        return self._info

    @property
    def pid(self) -> int | None:
        return self._client.pid if self._client is not None else None

    def stats(self) -> EngineStats:
        if self._client is not None:
            self._stats = self._client.stats()
        return self._stats

    def health(self) -> str | None:
        return self._down

    async def generate(self, requests: AsyncIterable[GenerationRequest]) -> AsyncIterator[GenerationOutput]:
        async with contextlib.aclosing(self._running().generate(requests)) as outputs:
            async for output in outputs:
                yield output

    async def submit(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate | GenerationOutput]:
        async with contextlib.aclosing(self._running().submit(request)) as items:
            async for item in items:
                yield item

    async def abort(self, request_ids: Iterable[str]) -> None:
        if self._client is not None:
            await self._client.abort(request_ids)

    async def close(self) -> None:
        self._closing = True
        self._watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watcher
        if self._client is not None:
            await self._client.close()

    # ---- supervision ----------------------------------------------------------------------

    def _running(self) -> EngineClient:
        if self._client is None or self._down is not None:
            raise errors.EngineUnavailable(f"the engine is not running: {self._down or 'starting'}")
        return self._client

    async def _watch(self) -> None:
        while True:
            client = self._client
            assert client is not None
            await client.stopped.wait()
            if self._closing:
                return
            self._down = f"the engine stopped ({client.failure}); starting it again"
            log.error("%s", self._down)
            await client.close()                  # reap the process, release the pipe
            self._client = None
            self._client = await self._relaunch()
            self.num_restarts += 1
            self._down = None
            log.info("the engine is running again (restart %d)", self.num_restarts)

    async def _relaunch(self) -> EngineClient:
        attempt = 0
        while True:
            await asyncio.sleep(min(self.max_retry_after_s, self.retry_after_s * 2 ** attempt))
            attempt += 1
            try:
                return await self._launch()
            except Exception as exc:              # noqa: BLE001 - kept trying; /health says why meanwhile
                self._down = f"the engine could not start again ({type(exc).__name__}: {exc}); retrying"
                log.error("%s", self._down)


async def start_engine(engine_config: EngineConfig) -> SupervisedEngine | DataParallelEngine:
    """The engine `engine_config` describes, in a process of its own, started again whenever that
    process dies: what `tokabatch serve` runs (the service's one way to start an engine). With
    `data_parallel` N: N such engines behind one DataParallelEngine."""
    if engine_config.data_parallel == 1:
        return await SupervisedEngine.start(lambda: EngineClient.from_config(engine_config))
    configs = engine_configs(engine_config)
    engines = [await SupervisedEngine.start(functools.partial(EngineClient.from_config, c)) for c in configs]
    return DataParallelEngine(engines, affinity_tokens=engine_config.hydragen_min_prefix_tokens)


def engine_configs(engine_config: EngineConfig) -> list[EngineConfig]:
    """Each data-parallel engine's config: its device (`devices` in turn), and its share of the KV
    memory when engines share a device."""
    n = engine_config.data_parallel
    devices = [engine_config.devices[i % len(engine_config.devices)] if engine_config.devices
               else engine_config.model.device for i in range(n)]
    configs = []
    for i, device in enumerate(devices):
        sharing = devices.count(device)
        configs.append(dataclasses.replace(
            engine_config, data_parallel=1, devices=(),
            model=dataclasses.replace(engine_config.model, device=device),
            kv_memory_fraction=engine_config.kv_memory_fraction / sharing, engines_on_device=sharing,
            kv_cache_tokens=None if engine_config.kv_cache_tokens is None else engine_config.kv_cache_tokens // sharing,
            seed=engine_config.seed + i))
    return configs


__all__ = ["SupervisedEngine", "engine_configs", "start_engine"]
