"""Contract §8 items 12-22 and 24: the whole batch flow through the official openai client against a
live server whose BatchRunner drives a FakeEngine (the real engine's flow is an e2e test). The
server and the runner share an injectable clock (real time plus an offset) so expiry takes no
wall time. Every Batch is strict-validated with openai.types.Batch, every body with its type."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import openai
import pytest
from openai.types import Batch
from openai.types.chat import ChatCompletion

from tests.service.jobsutil import tiny_tokenizer
from tests.service.live_server import LiveServer, server_config
from tests.service.runnerutil import FAST
from tokabatch.engine.testing import FakeEngine, FakeLoop
from tokabatch.service.app import blobs_dir
from tokabatch.service.jobs.runner import BatchRunner
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage.blobs import BlobStore

pytestmark = pytest.mark.timeout(120)
CHAT = "/v1/chat/completions"
TERMINAL = {"completed", "failed", "expired", "cancelled"}


class OffsetClock:
    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset_s


@dataclass
class Flow:
    server: LiveServer
    client: openai.OpenAI
    clock: OffsetClock
    engine: FakeEngine


def _in_server_loop(server: LiveServer, coro):
    return asyncio.run_coroutine_threadsafe(coro, server._loop).result(timeout=60)


@pytest.fixture
def flow(tmp_path):
    clock = OffsetClock()
    server = LiveServer(server_config(tmp_path / "data", allow_custom_windows=True), served_model_names=("fake",),
                        clock=clock).start()
    tokenizer = tiny_tokenizer(tmp_path)

    async def start():
        engine = await FakeEngine.launch(FakeLoop(model_id="fake", token_interval_s=0.02, max_running=2,
                                                  max_waiting=0))
        db = await dbmod.Database.open(dbmod.database_url(server.config.storage))
        runner = BatchRunner(FAST, db, BlobStore(blobs_dir(server.config)), engine, tokenizer, {"fake"}, clock=clock)
        return engine, db, runner, asyncio.create_task(runner.run_forever())

    engine, db, runner, task = _in_server_loop(server, start())
    try:
        yield Flow(server, openai.OpenAI(base_url=server.base_url, api_key="EMPTY"), clock, engine)
    finally:
        async def stop():
            await runner.stop()
            await task
            await engine.close()
            await db.close()

        _in_server_loop(server, stop())
        server.stop()


def line(custom_id: str, **body_changes) -> dict:
    body = {"model": "fake", "messages": [{"role": "user", "content": f"Hi {custom_id}"}], "max_tokens": 4,
            **body_changes}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def submit(flow: Flow, lines: list, *, window: str = "24h") -> Batch:
    raw = b"".join((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n" for x in lines)
    f = flow.client.files.create(file=raw, purpose="batch")
    return Batch.model_validate(flow.client.batches.create(input_file_id=f.id, endpoint=CHAT,
                                                           completion_window=window).model_dump())


def wait(flow: Flow, batch_id: str, predicate=lambda b: b.status in TERMINAL, timeout_s: float = 30.0) -> Batch:
    deadline = time.monotonic() + timeout_s
    while True:
        b = Batch.model_validate(flow.client.batches.retrieve(batch_id).model_dump())
        if predicate(b):
            return b
        assert time.monotonic() < deadline, f"batch stuck in {b.status}"
        time.sleep(0.05)


def lines_of(flow: Flow, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in flow.client.files.content(file_id).text.splitlines()]


def exactly_once(flow: Flow, b: Batch, custom_ids: list[str]) -> tuple[list[dict], list[dict]]:   # item 20
    out, err = lines_of(flow, b.output_file_id), lines_of(flow, b.error_file_id)
    assert sorted(x["custom_id"] for x in out + err) == sorted(custom_ids)
    rc = b.request_counts
    assert (rc.total, rc.completed, rc.failed) == (len(custom_ids), len(out), len(err))
    return out, err


def errors_of(b: Batch) -> list[tuple]:
    return [(e.code, e.param, e.line) for e in b.errors.data]


def test_missing_input_file_fails(flow):                                            # item 12
    b = flow.client.batches.create(input_file_id="file-doesnotexist", endpoint=CHAT, completion_window="24h")
    b = wait(flow, b.id)
    assert b.status == "failed" and isinstance(b.failed_at, int)
    assert b.errors.data[0].code == "invalid_request" and b.errors.data[0].line is None


def test_validation_failures(flow):                                                # items 13-16
    b = wait(flow, submit(flow, [line("a"), b'{"custom_id": "b",']).id)
    assert b.status == "failed" and errors_of(b) == [("invalid_json_line", None, 2)]
    missing = []
    for name in ("custom_id", "method", "url", "body"):
        x = line(f"m-{name}")
        del x[name]
        missing.append(x)
    b = wait(flow, submit(flow, missing).id)
    assert errors_of(b) == [("missing_required_parameter", n, i + 1)
                            for i, n in enumerate(("custom_id", "method", "url", "body"))]
    b = wait(flow, submit(flow, [line("a"), line("b", stream=True)]).id)
    assert errors_of(b) == [("streaming_unsupported", "body.stream", 2)]
    b = wait(flow, submit(flow, [{**line("a"), "url": "/v1/completions"}, line("b", model="gpt-4o"), line("c"),
                                 line("c")]).id)
    assert errors_of(b) == [("invalid_url", "url", 1), ("model_not_found", "body.model", 2),
                            ("duplicate_custom_id", "custom_id", 4)]
    assert sum(flow.engine.executions.values()) == 0


def test_mixed_all_bad_all_good(flow):                                             # items 17-19, 21
    b = wait(flow, submit(flow, [line("good"), line("bad", temperature=7)]).id)
    assert b.status == "completed" and isinstance(b.completed_at, int)
    out, err = exactly_once(flow, b, ["good", "bad"])
    assert out[0]["response"]["status_code"] == 200
    ChatCompletion.model_validate(out[0]["response"]["body"])
    assert 400 <= err[0]["response"]["status_code"] < 500 and err[0]["error"] is None
    assert err[0]["response"]["body"]["error"]["message"]
    usage = out[0]["response"]["body"]["usage"]
    assert (b.usage.input_tokens, b.usage.output_tokens, b.usage.total_tokens) == (
        usage["prompt_tokens"], usage["completion_tokens"], usage["total_tokens"])
    assert b.usage.input_tokens_details.cached_tokens == usage["prompt_tokens_details"]["cached_tokens"]

    b = wait(flow, submit(flow, [line("x", n=0), line("y", bogus=1)]).id)
    assert b.status == "completed" and b.output_file_id is None and b.error_file_id is not None
    exactly_once(flow, b, ["x", "y"])

    b = wait(flow, submit(flow, [line(f"g{i}") for i in range(4)]).id)
    assert b.status == "completed" and b.error_file_id is None and b.output_file_id is not None
    out, _ = exactly_once(flow, b, [f"g{i}" for i in range(4)])
    assert b.usage.total_tokens == sum(x["response"]["body"]["usage"]["total_tokens"] for x in out)
    parquet_id = b.model_extra["output_parquet_file_id"]
    assert parquet_id and flow.client.files.retrieve(parquet_id).purpose == "batch_output"
    assert flow.client.files.content(parquet_id).content[:4] == b"PAR1"


def slow_lines(n: int = 10) -> list[dict]:
    return [line(f"s{i}", max_tokens=10, ignore_eos=True) for i in range(n)]


def test_cancel_while_running(flow):                                               # items 22, 20
    b = submit(flow, slow_lines())
    wait(flow, b.id, lambda x: x.request_counts.completed >= 1)
    c = Batch.model_validate(flow.client.batches.cancel(b.id).model_dump())
    assert c.status == "cancelling" and isinstance(c.cancelling_at, int)
    b = wait(flow, b.id)
    assert b.status == "cancelled" and isinstance(b.cancelled_at, int)
    out, err = exactly_once(flow, b, [f"s{i}" for i in range(10)])
    assert out and err and all(x["error"]["code"] == "batch_cancelled" for x in err)


def test_custom_window_expires(flow):                                              # items 24, 20
    b = submit(flow, slow_lines(), window="1m")
    assert b.completion_window == "1m" and b.expires_at - b.created_at == 60
    wait(flow, b.id, lambda x: x.request_counts.completed >= 1)
    flow.clock.offset_s += 61
    b = wait(flow, b.id)
    assert b.status == "expired" and isinstance(b.expired_at, int)
    out, err = exactly_once(flow, b, [f"s{i}" for i in range(10)])
    assert out and err and all(x["error"]["code"] == "batch_expired" for x in err)
