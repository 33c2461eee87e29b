"""Webhooks on batch state changes.

Through a live `serve_async` (fake engine, the demo tokenizer) and a receiver on loopback that
verifies every signature with the `standardwebhooks` package and with the openai client's
`webhooks.unwrap`: one event per ended batch (completed, failed, expired, cancelled), of the right
type; a receiver down for the first two attempts still gets each event once, also across a server
restart between attempts; a batch's metadata.webhook_url routes its events. Against the outbox
directly (SQLite, and PostgreSQL when configured) with a fake clock: the back-off schedule and
abandoning after max_attempts (or at once without a URL), one event's failure never stops the
others or the loop, a 2xx whose record is lost is sent again with the same webhook-id (the
at-least-once limit), and an attempt cut at shutdown leaves its event due when the lease lapses."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import openai
import pytest
import standardwebhooks

from tests.cli.conftest import FakeServer, needs_demo_tokenizer
from tokabatch.config import WebhookConfig
from tokabatch.errors import InvalidRequest
from tokabatch.service.jobs.webhooks import WebhookSender, check_webhook_metadata, signature_headers
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage import outbox, repo
from tokabatch.service.storage.states import BatchStatus

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = {"retry_s": 0.2, "poll_interval_s": 0.05, "timeout_s": 2.0}


class Receiver:
    """Answers 503 to the first `fail_first` requests (after `hang_s`), then 200; keeps what it verified."""

    def __init__(self, fail_first: int = 0, hang_s: float = 0.0) -> None:
        self.fail_first, self.hang_s, self.num_requests = fail_first, hang_s, 0
        self.events: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:   # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                assert headers["content-type"] == "application/json"
                time.sleep(receiver.hang_s)
                with receiver.lock:
                    receiver.num_requests += 1
                    failing = receiver.num_requests <= receiver.fail_first
                    if not failing:
                        standardwebhooks.Webhook(SECRET).verify(body, headers)        # raises if forged
                        event = openai.OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=SECRET)
                        receiver.events.append({"id": headers["webhook-id"], "type": event.type,
                                                "batch": event.data.id, "raw": json.loads(body)})
                self.send_response(503 if failing else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def wait_for(self, count: int, timeout_s: float = 20.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while len(self.events) < count:
            assert time.monotonic() < deadline, f"{len(self.events)} of {count} events arrived"
            time.sleep(0.05)
        time.sleep(0.5)                                  # and no duplicate follows
        return list(self.events)

    def close(self) -> None:
        self.server.shutdown()


def _line(i: int, **body) -> str:
    return json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions", "body": {
        "model": "demo", "messages": [{"role": "user", "content": f"hi {i}"}], "max_tokens": 3, **body}})


def _batch(client: openai.OpenAI, tmp_path, lines: list[str], **kwargs):
    path = tmp_path / f"in{time.monotonic_ns()}.jsonl"
    path.write_text("\n".join(lines) + "\n")
    upload = client.files.create(file=path.open("rb"), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 **{"completion_window": "24h", **kwargs})


def _wait(client, batch_id, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while (batch := client.batches.retrieve(batch_id)).status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return batch


def test_signatures_verify_with_standardwebhooks_and_the_openai_client():
    body = b'{"id":"evt_1","object":"event","created_at":1,"type":"batch.completed","data":{"id":"batch_1"}}'
    headers = signature_headers(SECRET, "evt_1", int(time.time()), body)
    standardwebhooks.Webhook(SECRET).verify(body, headers)
    event = openai.OpenAI(api_key="x").webhooks.unwrap(body, headers, secret=SECRET)
    assert event.type == "batch.completed" and event.data.id == "batch_1"
    forged = {**headers, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(SECRET).verify(body, forged)


@needs_demo_tokenizer
def test_each_ended_batch_is_one_signed_event_even_when_the_receiver_is_down_at_first(tmp_path):
    # The runner's clock runs 30x the wall clock, so a 1-minute window has ended by the time it looks.
    receiver = Receiver(fail_first=2)
    server = FakeServer(tmp_path / "data", loop_kwargs={"token_interval_s": 0.05, "max_running": 1},
                        clock_speed=30.0, webhooks={"url": receiver.url, "secret": SECRET, **FAST}).start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        done = _wait(client, _batch(client, tmp_path, [_line(0), _line(1)]).id)
        failed = _wait(client, _batch(client, tmp_path, [_line(0), "{not json"]).id)
        expired = _wait(client, _batch(client, tmp_path, [_line(i, max_tokens=40) for i in range(3)],
                                       completion_window="1m").id)
        slow = _batch(client, tmp_path, [_line(i, max_tokens=40) for i in range(6)])
        time.sleep(0.3)
        client.batches.cancel(slow.id)
        cancelled = _wait(client, slow.id)
        assert [b.status for b in (done, failed, expired, cancelled)] == ["completed", "failed", "expired", "cancelled"]
        events = receiver.wait_for(4)
    finally:
        server.stop()
        receiver.close()
    assert sorted((e["batch"], e["type"]) for e in events) == sorted(
        [(done.id, "batch.completed"), (failed.id, "batch.failed"), (expired.id, "batch.expired"),
         (cancelled.id, "batch.cancelled")])
    assert len({e["id"] for e in events}) == 4 and receiver.num_requests >= 6     # two refused first
    assert all(e["raw"]["object"] == "event" and e["raw"]["id"] == e["id"] for e in events)


@needs_demo_tokenizer
def test_an_event_survives_a_server_restart_between_attempts(tmp_path):
    receiver = Receiver(fail_first=1)
    hooks = {"url": receiver.url, "secret": SECRET, **FAST, "retry_s": 3.0}    # the retry falls after the restart
    server = FakeServer(tmp_path / "data", loop_kwargs={}, webhooks=hooks).start()
    client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
    batch = _wait(client, _batch(client, tmp_path, [_line(0)]).id)
    deadline = time.monotonic() + 10
    while receiver.num_requests < 1:                  # the first attempt was refused
        assert time.monotonic() < deadline
        time.sleep(0.05)
    server.stop()
    [waiting] = asyncio.run(_events(server))                      # stopped between the two attempts
    assert (waiting.attempts, waiting.delivered_at, waiting.last_error) == (1, None, "HTTP 503")
    restarted = FakeServer(tmp_path / "data", loop_kwargs={}, webhooks=hooks).start()
    try:
        events = receiver.wait_for(1, timeout_s=30)
    finally:
        restarted.stop()
        receiver.close()
    assert [(e["batch"], e["type"]) for e in events] == [(batch.id, "batch.completed")]
    assert receiver.num_requests == 2


@needs_demo_tokenizer
def test_a_batchs_webhook_url_routes_its_events(tmp_path):
    own, default = Receiver(), Receiver()
    server = FakeServer(tmp_path / "data", loop_kwargs={},
                        webhooks={"url": default.url, "secret": SECRET, **FAST}).start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        routed = _wait(client, _batch(client, tmp_path, [_line(0)], metadata={"webhook_url": own.url}).id)
        plain = _wait(client, _batch(client, tmp_path, [_line(1)]).id)
        assert [e["batch"] for e in own.wait_for(1)] == [routed.id]
        assert [e["batch"] for e in default.wait_for(1)] == [plain.id]
        with pytest.raises(openai.BadRequestError) as bad:
            _batch(client, tmp_path, [_line(2)], metadata={"webhook_url": "ftp://x"})
        assert bad.value.body["param"] == "metadata.webhook_url"
    finally:
        server.stop()
        own.close()
        default.close()
    assert (own.num_requests, default.num_requests) == (1, 1)


def test_a_webhook_url_in_metadata_must_be_absolute_http_and_signable():
    check_webhook_metadata({"webhook_url": "https://example.com/h"}, secret_configured=True)
    check_webhook_metadata({"other": "x"}, secret_configured=False)
    check_webhook_metadata(None, secret_configured=False)
    for metadata, configured in (({"webhook_url": "example.com"}, True), ({"webhook_url": "ftp://h/x"}, True),
                                 ({"webhook_url": "https://"}, True), ({"webhook_url": ""}, True),
                                 ({"webhook_url": "https://x/"}, False)):
        with pytest.raises(InvalidRequest) as error:
            check_webhook_metadata(metadata, secret_configured=configured)
        assert (error.value.param, error.value.code) == ("metadata.webhook_url", "invalid_value")


def test_an_allow_list_keeps_webhooks_off_other_hosts():
    allowed = ("hooks.example.com", ".ci.example.org")
    for url in ("https://hooks.example.com/h", "https://HOOKS.example.com:8443/x", "http://a.ci.example.org/"):
        check_webhook_metadata({"webhook_url": url}, secret_configured=True, allowed_hosts=allowed)
    for url in ("http://127.0.0.1:8080/admin", "http://169.254.169.254/latest", "https://example.com/h",
                "https://hooks.example.com.evil.net/", "https://evilci.example.org/"):
        with pytest.raises(InvalidRequest, match="only to hooks.example.com") as error:
            check_webhook_metadata({"webhook_url": url}, secret_configured=True, allowed_hosts=allowed)
        assert error.value.param == "metadata.webhook_url"


async def _events(server: FakeServer) -> list:
    db = await dbmod.Database.open(dbmod.database_url(server.config.storage))
    try:
        return await outbox.list_events(db)
    finally:
        await db.close()


async def _ended_batch(db, now_s: float, status: BatchStatus = BatchStatus.FAILED, **metadata: str) -> str:
    batch = await repo.create_batch(db, owner="", input_file_id="file-x", endpoint="/v1/chat/completions",
                                    completion_window="24h", now_s=int(now_s), window_s=86400,
                                    metadata=metadata or None)
    path = [BatchStatus.CANCELLING, status] if status is BatchStatus.CANCELLED else [status]
    for step in path:
        assert await repo.transition_batch(db, batch.id, step, int(now_s))
    return batch.id


def _sender(db, clock, **settings) -> WebhookSender:
    return WebhookSender(WebhookConfig(**{"secret": SECRET, "timeout_s": 2.0, **settings}), db, clock=clock)


async def test_retries_back_off_4x_then_the_event_is_abandoned(db, clock):
    receiver = Receiver(fail_first=100)
    await _ended_batch(db, clock(), webhook_url=receiver.url)
    sender = _sender(db, clock, retry_s=5.0, max_attempts=4)
    delays_s = []
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(3):
                assert await sender.deliver_due(session) == 1
                [event] = await outbox.list_events(db)
                delays_s.append(event.next_attempt_at - clock())
                clock.advance(delays_s[-1] - 0.01)
                assert await sender.deliver_due(session) == 0            # not due before its time
                clock.advance(0.01)
            assert await sender.deliver_due(session) == 1
            assert await sender.deliver_due(session) == 0
            clock.advance(10 * 86400)
            assert await sender.deliver_due(session) == 0                # abandoned: never again
    finally:
        receiver.close()
    [event] = await outbox.list_events(db)
    assert delays_s == [5.0, 20.0, 80.0] and receiver.num_requests == 4
    assert (event.attempts, event.abandoned_at is not None, event.last_error) == (4, True, "HTTP 503")
    assert sender.retry_after_s(7) == 5.0 * 4**6 and sender.retry_after_s(8) == 6 * 3600     # the cap


async def test_without_a_url_the_event_is_abandoned_not_retried(db, clock):
    await _ended_batch(db, clock(), BatchStatus.CANCELLED)
    sender = _sender(db, clock)                                          # a secret, no --webhook-url
    async with aiohttp.ClientSession() as session:
        assert await sender.deliver_due(session) == 1
        clock.advance(7 * 86400)
        assert await sender.deliver_due(session) == 0
    [event] = await outbox.list_events(db)
    assert event.type == "batch.cancelled" and event.attempts == 1 and event.abandoned_at is not None
    assert event.last_error.startswith("no webhook URL")


async def test_one_events_failure_stays_its_own_and_a_lost_record_resends_the_same_id(db, clock, monkeypatch):
    # The receiver's 2xx for `lost` comes back but is not recorded (as if the process died there):
    # the event goes again when its lease lapses, with the same webhook-id; `fine` is unaffected.
    receiver = Receiver()
    lost = await _ended_batch(db, clock(), webhook_url=receiver.url)
    fine = await _ended_batch(db, clock(), BatchStatus.EXPIRED, webhook_url=receiver.url)
    [lost_event] = await outbox.list_events(db, batch_id=lost)
    mark_delivered = outbox.mark_delivered

    async def mark_but_not_lost_once(db_, event_id, now_s):
        if event_id == lost_event.id and not getattr(mark_but_not_lost_once, "done", False):
            mark_but_not_lost_once.done = True
            raise ConnectionError("the database went away")
        return await mark_delivered(db_, event_id, now_s)

    monkeypatch.setattr(outbox, "mark_delivered", mark_but_not_lost_once)
    sender = _sender(db, clock)
    try:
        async with aiohttp.ClientSession() as session:
            assert await sender.deliver_due(session) == 2
            assert await sender.deliver_due(session) == 0                # leased
            clock.advance(sender.lease_s)
            assert await sender.deliver_due(session) == 1
            clock.advance(sender.lease_s)
            assert await sender.deliver_due(session) == 0
    finally:
        receiver.close()
    assert sorted((e["batch"], e["type"]) for e in receiver.events) == sorted(
        [(lost, "batch.failed"), (lost, "batch.failed"), (fine, "batch.expired")])
    assert [e["id"] for e in receiver.events if e["batch"] == lost] == [lost_event.id] * 2
    assert all(e.delivered_at is not None for e in await outbox.list_events(db))


async def test_the_loop_outlives_a_database_that_is_away(db, monkeypatch):
    receiver = Receiver()
    batch_id = await _ended_batch(db, time.time(), webhook_url=receiver.url)
    claim_due, num_failures = outbox.claim_due, []

    async def away_twice(*args, **kwargs):
        if len(num_failures) < 2:
            num_failures.append(1)
            raise ConnectionError("the database went away")
        return await claim_due(*args, **kwargs)

    monkeypatch.setattr(outbox, "claim_due", away_twice)
    sender = _sender(db, time.time, poll_interval_s=0.02)
    task = asyncio.create_task(sender.run_forever())
    try:
        for _ in range(200):
            if receiver.events:
                break
            await asyncio.sleep(0.02)
    finally:
        sender.stop()
        await asyncio.wait_for(task, 5)
        receiver.close()
    assert len(num_failures) == 2 and [e["batch"] for e in receiver.events] == [batch_id]


async def test_an_attempt_cut_at_shutdown_is_due_again_when_its_lease_lapses(db, clock):
    receiver = Receiver(hang_s=1.0)
    await _ended_batch(db, clock(), webhook_url=receiver.url)
    sender = _sender(db, clock)
    try:
        async with aiohttp.ClientSession() as session:
            attempt = asyncio.create_task(sender.deliver_due(session))
            while receiver.num_requests == 0:
                await asyncio.sleep(0.01)
            attempt.cancel()                                             # as the shutdown's wait_for does
            with pytest.raises(asyncio.CancelledError):
                await attempt
            clock.advance(sender.lease_s - 0.01)
            assert await outbox.claim_due(db, clock(), sender.lease_s) == []
            clock.advance(0.01)
            [again] = await outbox.claim_due(db, clock(), sender.lease_s)
    finally:
        receiver.close()
    assert again.attempts == 2 and again.delivered_at is None


async def test_a_late_outcome_does_not_move_a_newer_lease(db, clock):
    await _ended_batch(db, clock())
    [first] = await outbox.claim_due(db, clock(), 15.0)
    clock.advance(15.0)
    [second] = await outbox.claim_due(db, clock(), 15.0)                 # the first one's lease lapsed
    assert (first.attempts, second.attempts) == (1, 2)
    assert not await outbox.retry_later(db, first.id, clock() + 5.0, "HTTP 503", attempt=1)
    assert not await outbox.abandon(db, first.id, int(clock()), "HTTP 503", attempt=1)
    [event] = await outbox.list_events(db)
    assert event.next_attempt_at == clock() + 15.0 and event.abandoned_at is None
    assert await outbox.mark_delivered(db, first.id, int(clock()))       # a 2xx ends it, whoever sent it
    assert not await outbox.retry_later(db, first.id, clock() + 5.0, "HTTP 503", attempt=2)
