"""DataParallelEngine: one Engine over several (one engine process per GPU, or several on one).

Owns how the work of one server is spread over its engines. A batch's request stream is dealt out
as the engines ask for work (each engine's own back-pressure pulls from its own queue), with two
rules: requests whose prompts start alike go to the engine that took the first of them (the
prefix cache and Hydragen help only within one engine; "alike" is the first `affinity_tokens`
tokens, or the whole prompt when shorter), and a prompt seen for the first time goes to the engine
with the least outstanding predicted work (prompt tokens plus n times the expected output,
EngineStats.expected_output_tokens), not the fewest requests. Online requests go to the engine with
the least outstanding work. Outputs of all engines come back as one stream; closing it closes every
engine's. Stats are summed (and kept per engine: `engine_stats()`); health is the first problem.

Torch-free: stdlib and engine/api only, like the service that drives it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections import OrderedDict
from typing import AsyncIterable, AsyncIterator, Iterable

from tokabatch.engine.api import Engine, EngineStats, GenerationOutput, GenerationRequest, GenerationUpdate, ModelInfo

QUEUE_DEPTH = 8                      # requests waiting in front of one engine beyond what it pulled
MAX_REMEMBERED_PREFIXES = 200_000    # prompt starts -> engine, least recently used forgotten first


class DataParallelEngine:
    def __init__(self, engines: list[Engine], *, affinity_tokens: int = 256) -> None:
        if not engines:
            raise ValueError("DataParallelEngine needs at least one engine")
        self.engines = list(engines)
        self.affinity_tokens = affinity_tokens
        first = engines[0].info
        self._info = dataclasses.replace(first, num_pages=sum(e.info.num_pages for e in engines),
                                         max_seqs=sum(e.info.max_seqs for e in engines))
        self._work = [0.0] * len(engines)                 # outstanding predicted tokens per engine
        self._owner: dict[str, tuple[int, float]] = {}   # request id -> (engine, its predicted work)
        self._prefixes: OrderedDict[int, int] = OrderedDict()

    @property
    def info(self) -> ModelInfo:
        return self._info

    # ---- placement ------------------------------------------------------------------------

    def _predicted_work(self, request: GenerationRequest) -> float:
        stats = self.engines[0].stats()
        sampling = request.sampling
        expected = stats.expected_output_tokens(sampling.max_tokens, runs_to_max_tokens=sampling.runs_to_max_tokens)
        return len(request.prompt_token_ids) + request.n * expected

    def _least_loaded(self) -> int:
        return min(range(len(self.engines)), key=lambda i: (self._work[i], i))

    def _place(self, request: GenerationRequest) -> int:
        """The engine for a batch request: where its prompt's start went before, else the least loaded."""
        key = hash(tuple(request.prompt_token_ids[:self.affinity_tokens]))
        engine = self._prefixes.get(key)
        if engine is None:
            engine = self._least_loaded()
            if len(self._prefixes) >= MAX_REMEMBERED_PREFIXES:
                self._prefixes.popitem(last=False)
        self._prefixes[key] = engine
        self._prefixes.move_to_end(key)
        return engine

    def _assign(self, request: GenerationRequest, engine: int) -> None:
        work = self._predicted_work(request)
        self._owner[request.request_id] = (engine, work)
        self._work[engine] += work

    def _finished(self, request_id: str) -> None:
        engine, work = self._owner.pop(request_id, (None, 0.0))
        if engine is not None:
            self._work[engine] -= work

    # ---- the Engine protocol --------------------------------------------------------------

    def generate(self, requests: AsyncIterable[GenerationRequest]) -> AsyncIterator[GenerationOutput]:
        return self._generate(requests)

    async def _generate(self, requests: AsyncIterable[GenerationRequest]) -> AsyncIterator[GenerationOutput]:
        queues: list[asyncio.Queue] = [asyncio.Queue(maxsize=QUEUE_DEPTH) for _ in self.engines]
        outputs: asyncio.Queue = asyncio.Queue()
        done = object()

        async def engine_input(i: int) -> AsyncIterator[GenerationRequest]:
            while (request := await queues[i].get()) is not done:
                yield request

        async def run_engine(i: int) -> None:
            stream = self.engines[i].generate(engine_input(i))
            try:
                async for output in stream:
                    self._finished(output.request_id)
                    await outputs.put(output)
            finally:
                with contextlib.suppress(Exception):
                    await stream.aclose()

        async def deal() -> None:
            try:
                async for request in requests:
                    engine = self._place(request)
                    self._assign(request, engine)
                    await queues[engine].put(request)
            finally:
                for queue in queues:
                    await queue.put(done)

        workers = [asyncio.ensure_future(run_engine(i)) for i in range(len(self.engines))]
        dealer = asyncio.ensure_future(deal())
        finished = asyncio.ensure_future(asyncio.gather(*workers))
        try:
            while True:
                getter = asyncio.ensure_future(outputs.get())
                await asyncio.wait({getter, finished}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield getter.result()
                    continue
                getter.cancel()
                while not outputs.empty():
                    yield outputs.get_nowait()
                finished.result()             # an engine's failure reaches the caller
                await dealer
                return
        finally:
            for task in (dealer, finished, *workers):
                task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(dealer, *workers, return_exceptions=True)

    async def submit(self, request: GenerationRequest) -> AsyncIterator[GenerationUpdate | GenerationOutput]:
        engine = self._least_loaded()
        self._assign(request, engine)
        try:
            async for item in self.engines[engine].submit(request):
                yield item
        finally:
            self._finished(request.request_id)

    async def abort(self, request_ids: Iterable[str]) -> None:
        by_engine: dict[int, list[str]] = {}
        for request_id in request_ids:
            owner = self._owner.get(request_id)
            if owner is not None:
                by_engine.setdefault(owner[0], []).append(request_id)
        await asyncio.gather(*(self.engines[i].abort(ids) for i, ids in by_engine.items()))

    def engine_stats(self) -> list[EngineStats]:
        return [e.stats() for e in self.engines]

    def stats(self) -> EngineStats:
        parts = self.engine_stats()
        summed = {f.name: sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(EngineStats)
                  if f.name != "extra"}
        return EngineStats(**summed, extra={k: v for p in parts for k, v in p.extra.items()})

    def health(self) -> str | None:
        problems = [f"engine {i}: {p}" for i, e in enumerate(self.engines) if (p := e.health()) is not None]
        return "; ".join(problems) or None

    async def close(self) -> None:
        await asyncio.gather(*(e.close() for e in self.engines), return_exceptions=True)


__all__ = ["DataParallelEngine"]
