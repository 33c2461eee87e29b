"""A real tokabatch HTTP server on loopback (port 0) in a background thread, for tests that drive
it with the official `openai` client (which is synchronous here). No engine: the app is built with
make_app and only served model names. `seen` records (method, path, status) of every response."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from aiohttp import web

from tokabatch.config import Config, ServerConfig, StorageConfig
from tokabatch.service.app import make_app
from tokabatch.service.storage import db as dbmod


def server_config(data_dir: Path, db_url: str | None = None, **server: object) -> Config:
    return Config(storage=StorageConfig(data_dir=str(data_dir), db_url=db_url),
                  server=ServerConfig(port=0, **server))


class LiveServer:
    def __init__(self, config: Config, *, served_model_names: Sequence[str] = ("tiny-test-model",),
                 clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.served_model_names = tuple(served_model_names)
        self.clock = clock
        self.seen: list[tuple[str, str, int]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        url = dbmod.database_url(self.config.storage)
        await asyncio.to_thread(dbmod.upgrade, url)
        app = make_app(self.config, served_model_names=self.served_model_names, clock=self.clock)

        async def record(request: web.Request, response: web.StreamResponse) -> None:
            self.seen.append((request.method, request.path, response.status))

        app.on_response_prepare.append(record)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def start(self) -> "LiveServer":
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=60)
        return self

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


def raw_request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None,
                data: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one plain HTTP request; error statuses are returned, not raised."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def stream_multipart_upload(url: str, *, purpose: str, num_bytes: int, line: bytes,
                            headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """POST /v1/files with a generated body of `num_bytes` sent in chunks (never held in memory),
    so that a test can measure the SERVER's memory; the openai client builds the body in memory."""
    import http.client
    import urllib.parse

    boundary = "tokabatchtestboundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.jsonl\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    block = line * max(1, (1 << 20) // len(line))

    def body():
        yield head
        sent = 0
        while sent < num_bytes:
            chunk = block[: num_bytes - sent]
            sent += len(chunk)
            yield chunk
        yield tail

    parsed = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
    conn.request("POST", parsed.path, body=body(), encode_chunked=True, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Transfer-Encoding": "chunked",
        **(headers or {})})
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, data
