"""Webhooks on batch state changes, through a live `serve_async` (fake engine, the demo tokenizer) and
a receiver on loopback that verifies every signature with the `standardwebhooks` package and with the
openai client's `webhooks.unwrap`: one event per ended batch, of the right type; a receiver down for
the first two attempts still gets each event once, also across a server restart between attempts;
a batch's metadata.webhook_url routes its events; no URL abandons the event; bad settings are errors."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import openai
import pytest
import standardwebhooks

from tests.cli.conftest import FakeServer, needs_demo_tokenizer
from tokabatch.config import load_config
from tokabatch.errors import ConfigError, InvalidRequest
from tokabatch.service.jobs.webhooks import check_webhook_metadata, signature_headers

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = {"retry_s": 0.2, "poll_interval_s": 0.05, "timeout_s": 2.0}


class Receiver:
    """Answers 503 to the first `fail_first` requests, then 200; keeps what it verified."""

    def __init__(self, fail_first: int = 0) -> None:
        self.fail_first, self.num_requests = fail_first, 0
        self.events: list[dict] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:   # noqa: N802 - the stdlib's name
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
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
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h",
                                 **kwargs)


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
    receiver = Receiver(fail_first=2)
    server = FakeServer(tmp_path / "data", loop_kwargs={"token_interval_s": 0.05, "max_running": 1},
                        webhooks={"url": receiver.url, "secret": SECRET, **FAST}).start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        done = _wait(client, _batch(client, tmp_path, [_line(0), _line(1)]).id)
        failed = _wait(client, _batch(client, tmp_path, [_line(0), "{not json"]).id)
        slow = _batch(client, tmp_path, [_line(i, max_tokens=40) for i in range(6)])
        time.sleep(0.3)
        client.batches.cancel(slow.id)
        cancelled = _wait(client, slow.id)
        assert (done.status, failed.status, cancelled.status) == ("completed", "failed", "cancelled")
        events = receiver.wait_for(3)
    finally:
        server.stop()
        receiver.close()
    assert sorted((e["batch"], e["type"]) for e in events) == sorted(
        [(done.id, "batch.completed"), (failed.id, "batch.failed"), (cancelled.id, "batch.cancelled")])
    assert len({e["id"] for e in events}) == 3 and receiver.num_requests >= 5     # two refused first
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
    restarted = FakeServer(tmp_path / "data", loop_kwargs={}, webhooks=hooks).start()
    try:
        events = receiver.wait_for(1, timeout_s=30)
    finally:
        restarted.stop()
        receiver.close()
    assert [(e["batch"], e["type"]) for e in events] == [(batch.id, "batch.completed")]
    assert receiver.num_requests == 2


@needs_demo_tokenizer
def test_a_batchs_webhook_url_routes_its_events_and_no_url_abandons_them(tmp_path):
    own, default = Receiver(), Receiver()
    server = FakeServer(tmp_path / "data", loop_kwargs={}, webhooks={"secret": SECRET, **FAST}).start()
    try:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        routed = _wait(client, _batch(client, tmp_path, [_line(0)], metadata={"webhook_url": own.url}).id)
        _wait(client, _batch(client, tmp_path, [_line(1)]).id)                # no URL anywhere: abandoned
        assert [e["batch"] for e in own.wait_for(1)] == [routed.id]
        with pytest.raises(openai.BadRequestError) as bad:
            _batch(client, tmp_path, [_line(2)], metadata={"webhook_url": "ftp://x"})
        assert bad.value.body["param"] == "metadata.webhook_url"
    finally:
        server.stop()
        own.close()
        default.close()
    assert default.num_requests == 0


def test_webhook_metadata_and_settings_are_checked():
    check_webhook_metadata({"webhook_url": "https://example.com/h"}, secret_configured=True)
    check_webhook_metadata(None, secret_configured=False)
    for metadata, configured in (({"webhook_url": "example.com"}, True), ({"webhook_url": "https://x/"}, False)):
        with pytest.raises(InvalidRequest):
            check_webhook_metadata(metadata, secret_configured=configured)
    from_env = load_config(env={"TOKABATCH_WEBHOOK_SECRET": SECRET}, webhooks={"url": "https://h/"})
    assert from_env.webhooks.secret == SECRET
    for webhooks in ({"url": "https://h/"}, {"secret": "nope"}, {"secret": "whsec_!!"}, {"url": "h", "secret": SECRET},
                     {"secret": SECRET, "max_attempts": 0}):
        with pytest.raises(ConfigError):
            load_config(env={}, webhooks=webhooks)
