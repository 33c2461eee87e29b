"""Load, on loopback: hundreds of concurrent uploads, creates, retrieves and lists against one
`tokabatch serve` while a batch runs. Every request answers 2xx; the figures (error rate, p50/p99
latency per kind, RSS and open file descriptors before and after) are printed for
docs/reliability.md; descriptors and memory come back (no leak) and no temporary file is left."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from pathlib import Path

import aiohttp
import pytest

from tests.service.dbutil import backends, fresh_database
from tests.service.serve_process import ServeProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
UPLOADS, CREATES, RETRIEVES, LISTS = 200, 200, 400, 100
CONCURRENCY = 64


def _batch_file(model: str, tag: str, num_lines: int) -> bytes:
    return b"".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": model, "messages": [{"role": "user", "content": f"{tag} {i}"}],
                                         "max_tokens": 4}}).encode() + b"\n" for i in range(num_lines))


async def _load(url: str, model: str, running_batch: str) -> dict[str, list[tuple[int, float]]]:
    """Every request of the mix at once (CONCURRENCY in flight): {kind: [(status, seconds)]}."""
    results: dict[str, list[tuple[int, float]]] = {"upload": [], "create": [], "retrieve": [], "list": []}
    gate = asyncio.Semaphore(CONCURRENCY)
    file_ids: asyncio.Queue[str] = asyncio.Queue()
    async with aiohttp.ClientSession(url, connector=aiohttp.TCPConnector(limit=0)) as session:

        async def timed(kind: str, call) -> dict | None:
            async with gate:
                began = time.perf_counter()
                async with call() as r:
                    body = await r.json(content_type=None)
                results[kind].append((r.status, time.perf_counter() - began))
                return body if r.status == 200 else None

        async def upload(i: int) -> None:
            def call():
                form = aiohttp.FormData()
                form.add_field("purpose", "batch")
                form.add_field("file", _batch_file(model, f"u{i}", 20), filename=f"u{i}.jsonl")
                return session.post("/v1/files", data=form)
            body = await timed("upload", call)
            if body is not None:
                file_ids.put_nowait(body["id"])

        async def create(_: int) -> None:
            file_id = await file_ids.get()
            await timed("create", lambda: session.post("/v1/batches", json={
                "input_file_id": file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}))

        async def retrieve(_: int) -> None:
            await timed("retrieve", lambda: session.get(f"/v1/batches/{running_batch}"))

        async def listing(_: int) -> None:
            await timed("list", lambda: session.get("/v1/files?limit=100"))

        await asyncio.gather(*(upload(i) for i in range(UPLOADS)), *(create(i) for i in range(CREATES)),
                             *(retrieve(i) for i in range(RETRIEVES)), *(listing(i) for i in range(LISTS)))
    return results


def _percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


@pytest.mark.parametrize("backend", backends())
def test_hundreds_of_concurrent_requests_while_a_batch_runs(backend, tmp_path):
    with fresh_database(backend, tmp_path) as url:
        _measure(tmp_path, [] if backend == "sqlite" else ["--db", url])


def _measure(tmp_path: Path, flags: list[str]) -> None:
    data = tmp_path / "data"
    server = ServeProcess(data, tmp_path / "serve.log", *flags)
    try:
        client = server.client()
        model = client.models.list().data[0].id
        f = client.files.create(file=_batch_file(model, "run", 400), purpose="batch")
        running = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
        time.sleep(1.0)                                   # the batch is running
        start = (server.rss_mb(), server.open_fds())
        asyncio.run(_load(server.url, model, running.id))     # round 1 fills the pools and caches
        time.sleep(1.0)
        warm = (server.rss_mb(), server.open_fds())
        began = time.perf_counter()
        results = asyncio.run(_load(server.url, model, running.id))
        wall = time.perf_counter() - began
        time.sleep(1.0)                                   # connections closed, files flushed
        end = (server.rss_mb(), server.open_fds())
        assert client.batches.retrieve(running.id).status in ("in_progress", "completed")
        for created in client.batches.list(limit=100):    # the new batches are not the test's subject
            if created.id != running.id and created.status in ("validating", "in_progress"):
                client.batches.cancel(created.id)
    finally:
        code = server.stop()
    total = sum(len(v) for v in results.values())
    failed = [(kind, status) for kind, rows in results.items() for status, _ in rows if status != 200]
    print(f"\nload (round 2 of 2): {total} requests in {wall:.1f} s ({total / wall:.0f}/s), {CONCURRENCY} in "
          f"flight, {len(failed)} failed; RSS {start[0]:.0f} -> {warm[0]:.0f} (after round 1) -> {end[0]:.0f} MB; "
          f"open fds {len(start[1])} -> {len(warm[1])} -> {len(end[1])}")
    for kind, rows in results.items():
        seconds = [s for _, s in rows]
        print(f"  {kind:8s} {len(rows):4d}  p50 {_percentile(seconds, 50) * 1000:6.0f} ms  "
              f"p99 {_percentile(seconds, 99) * 1000:6.0f} ms")
    assert not failed, failed[:10]
    assert total == UPLOADS + CREATES + RETRIEVES + LISTS
    # Round 1 may grow the database pool (SQLAlchemy's 5 + 10 overflow connections) and caches;
    # a second round of the same load must not grow either (a leak would).
    assert len(end[1]) <= len(warm[1]) + 4, f"open file descriptors grew from {warm[1]} to {end[1]}"
    assert end[0] - warm[0] < 40 and end[0] - start[0] < 150, (start[0], warm[0], end[0])
    assert code == 0
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text and " 500 " not in text, text[-3000:]
    leftovers = [p.name for p in Path(data / "files").iterdir() if p.name.endswith(".tmp")]
    assert not leftovers, leftovers
