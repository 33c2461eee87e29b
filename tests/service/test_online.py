"""The online endpoints and /metrics with the official openai client against a live app on loopback
(fake engine, the demo model's tokenizer): plain and streaming chat and completions, errors, metrics."""

from __future__ import annotations

import asyncio
import threading
import urllib.request
from typing import Callable

import openai
import pytest
from aiohttp import web
from openai.types import Completion
from openai.types.chat import ChatCompletion
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from tokabatch import model_store
from tokabatch.config import Config, ServerConfig, StorageConfig
from tokabatch.engine.api import GenerationRequest
from tokabatch.engine.testing import FakeEngine, FakeLoop
from tokabatch.service.app import make_app
from tokabatch.service.http import metrics, online
from tokabatch.service.storage import db as dbmod

pytestmark = pytest.mark.skipif(
    not (model_store.models_dir() / model_store.DEMO_FOLDER / "config.json").is_file(),
    reason="needs the demo model's tokenizer (`tokabatch models fetch`)")


class OnlineServer:
    def __init__(self, data_dir, token_interval_s: float | Callable[[GenerationRequest], float] = 0.001) -> None:
        self.config = Config(storage=StorageConfig(data_dir=str(data_dir)), server=ServerConfig(port=0))
        self.token_interval_s = token_interval_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    async def _start(self) -> None:
        from tokabatch.text import Tokenizer

        await asyncio.to_thread(dbmod.upgrade, dbmod.database_url(self.config.storage))
        self.engine = await FakeEngine.launch(FakeLoop(model_id="demo", token_interval_s=self.token_interval_s))
        app = make_app(self.config, engine_info=self.engine.info, served_model_names=("demo",))
        app[online.ENGINE] = self.engine
        app[online.TOKENIZER] = self.app_tokenizer = Tokenizer.from_folder(model_store.resolve_model_path("demo"))
        app.add_routes(online.routes)
        metrics.install(app)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        await self.runner.cleanup()
        await self.engine.close()

    def start(self) -> "OnlineServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(60)
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = OnlineServer(tmp_path_factory.mktemp("online")).start()
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="EMPTY", max_retries=0)


MESSAGES = [{"role": "user", "content": "Say hi"}]


def test_chat_completion_is_strict_valid(client):
    resp = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=5, temperature=0, n=2)
    ChatCompletion.model_validate(resp.model_dump())
    assert [c.index for c in resp.choices] == [0, 1]
    assert resp.choices[0].finish_reason in ("stop", "length") and resp.choices[0].message.content
    assert resp.usage.completion_tokens >= 2 and resp._request_id.startswith("req_")


def test_chat_stream_matches_the_plain_answer(client):
    plain = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=6, temperature=0)
    stream = client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=6, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_plain_and_stream_with_two_prompts(client):
    plain = client.completions.create(model="demo", prompt=["a b", "c d"], max_tokens=4, temperature=0)
    Completion.model_validate(plain.model_dump())
    assert sorted(c.index for c in plain.choices) == [0, 1]
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model="demo", prompt=["a b", "c d"], max_tokens=4, temperature=0,
                                           stream=True):
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {c.index: c.text for c in plain.choices}


def test_raw_sse_ends_with_done(server):
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/v1/chat/completions", method="POST",
        data=b'{"model": "demo", "messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "stream": true}',
        headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


def test_errors_are_openai_envelopes(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="demo", messages=MESSAGES, temperature=7)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.NotFoundError) as missing:
        client.completions.create(model="nope", prompt="x")
    assert missing.value.code == "model_not_found"


def test_metrics_in_prometheus_text(server, client):
    client.chat.completions.create(model="demo", messages=MESSAGES, max_tokens=2)
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as resp:
        assert resp.headers["Content-Type"] == CONTENT_TYPE_LATEST      # the text format, from prometheus_client
        text = resp.read().decode()
    for name in ("tokabatch_queue_depth", "tokabatch_running_sequences", "tokabatch_generation_tokens_per_second",
                 "tokabatch_prefix_cache_hit_rate", 'tokabatch_batches{status="completed"} 0',
                 'tokabatch_online_request_duration_seconds_count{endpoint="/v1/chat/completions",status="ok"}'):
        assert name in text
    generated = next(x for x in text.splitlines() if x.startswith("tokabatch_generated_tokens_total"))
    assert float(generated.split()[-1]) > 0


FIRST_TOKEN_IN_30_S = 3999


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    """Tokens every 10 ms; a request of max_tokens FIRST_TOKEN_IN_30_S waits 30 s for each."""
    srv = OnlineServer(tmp_path_factory.mktemp("online-slow"), token_interval_s=lambda req: (
        30.0 if req.sampling.max_tokens == FIRST_TOKEN_IN_30_S else 0.01)).start()
    yield srv
    srv.stop()


def _metric(server, prefix: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=30) as resp:
        lines = resp.read().decode().splitlines()
    return sum(float(x.split()[-1]) for x in lines if x.startswith(prefix))


@pytest.mark.parametrize("stream, max_tokens", [(False, 4000), (True, 4000), (True, FIRST_TOKEN_IN_30_S)],
                         ids=["plain", "stream", "stream-before-its-first-token"])
def test_a_client_that_leaves_aborts_its_request(slow_server, stream, max_tokens, caplog):
    """A request runs ~40 s of tokens; its client hangs up after its first bytes (a stream) or
    0.3 s (plain, or a stream whose first token is 30 s away). The engine must drop it within about a
    second, and the server log no error. A plain request used to run to its end: aiohttp does not
    cancel a handler whose client left."""
    import json
    import socket
    import time

    body = json.dumps({"model": "demo", "messages": MESSAGES, "max_tokens": max_tokens, "ignore_eos": True,
                       "stream": stream}).encode()
    cancelled = _metric(slow_server, 'tokabatch_online_request_duration_seconds_count{endpoint="/v1/chat/completions",'
                                     'status="cancelled"}')
    with socket.create_connection(("127.0.0.1", slow_server.port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        deadline = time.monotonic() + 10
        while slow_server.engine.loop.stats().num_running < 1:
            assert time.monotonic() < deadline, "the request never started"
            time.sleep(0.05)
        if stream and max_tokens != FIRST_TOKEN_IN_30_S:
            assert b"data: " in sock.recv(4096)
        else:
            time.sleep(0.3)
    left = time.monotonic()
    while slow_server.engine.loop.stats().num_running > 0:
        assert time.monotonic() - left < 5, "the request still runs after its client left"
        time.sleep(0.05)
    while _metric(slow_server, 'tokabatch_online_request_duration_seconds_count{endpoint="/v1/chat/completions",'
                               'status="cancelled"}') != cancelled + 1:
        assert time.monotonic() - left < 5, "the request was not counted as cancelled"
        time.sleep(0.05)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_latency_histogram_is_cumulative():
    registry = CollectorRegistry()
    hist = metrics.OnlineLatency(registry, buckets_s=(0.1, 1.0))
    for s in (0.05, 0.1, 0.5, 3.0):
        hist.observe("/v1/completions", "ok", s)
    name, labels = "tokabatch_online_request_duration_seconds", {"endpoint": "/v1/completions", "status": "ok"}
    assert registry.get_sample_value(name + "_bucket", {**labels, "le": "0.1"}) == 2
    assert registry.get_sample_value(name + "_bucket", {**labels, "le": "1.0"}) == 3
    assert registry.get_sample_value(name + "_bucket", {**labels, "le": "+Inf"}) == 4
    assert registry.get_sample_value(name + "_count", labels) == 4


@pytest.mark.slow
def test_a_huge_prompt_does_not_stall_the_server(server):
    # A prompt of megabytes (online bodies stop at 4 MB) is refused before tokenizing (longer than the
    # context times the longest token); one just within that bound is tokenized in a worker thread, with
    # the GIL let go, while /health keeps answering at once. (Both too long for the context: a 400.)
    bound = server.engine.info.context_length * server.app_tokenizer.max_token_chars
    for chars in (4_000_000, bound - 100):
        _tokenize_while_health_answers(server, "The quick brown fox. " * (chars // 21))


def _tokenize_while_health_answers(server, content: str) -> None:
    import json
    import time

    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": content}],
                       "max_tokens": 2}).encode()
    base = f"http://127.0.0.1:{server.port}"
    result: dict = {}

    def send() -> None:
        req = urllib.request.Request(f"{base}/v1/chat/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        try:
            urllib.request.urlopen(req, timeout=120)
        except urllib.error.HTTPError as e:
            result["status"] = e.code
        result["done"] = time.monotonic()

    sender = threading.Thread(target=send)
    started = time.monotonic()
    sender.start()
    # The gaps between answers, not each call's time: this test and the server share one process,
    # so a server thread holding the GIL would stall this thread before it could even ask.
    slowest, last = 0.0, time.monotonic()
    while sender.is_alive() and time.monotonic() - started < 120:
        with urllib.request.urlopen(f"{base}/health", timeout=30) as r:
            assert r.status == 200
        now = time.monotonic()
        slowest, last = max(slowest, now - last), now
        time.sleep(0.05)
    sender.join()
    assert result.get("status") == 400
    assert slowest < 0.5, slowest
