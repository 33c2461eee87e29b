"""Idempotency-Key and file expiry through the official openai client (contract §1.2 [tb],
§2.2-2.5): the client forwards `extra_headers` verbatim, a repeat gets the same strict-valid
File/Batch back, and an expired file is not listed and answers NotFoundError."""

from __future__ import annotations

import openai
import pytest
from openai.types import Batch, FileObject

from tests.service.conftest import FakeClock
from tests.service.live_server import LiveServer, server_config

LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}\n'


def test_idempotency_key_on_files_and_batches(client):
    first = FileObject.model_validate(
        client.files.create(file=LINE, purpose="batch", extra_headers={"Idempotency-Key": "k1"}).model_dump())
    again = client.files.create(file=LINE, purpose="batch", extra_headers={"Idempotency-Key": "k1"})
    assert again.id == first.id
    assert [f.id for f in client.files.list()] == [first.id]
    with pytest.raises(openai.ConflictError) as e:
        client.files.create(file=LINE * 2, purpose="batch", extra_headers={"Idempotency-Key": "k1"})
    assert e.value.code == "idempotency_key_reused"

    kw = dict(input_file_id=first.id, endpoint="/v1/chat/completions", completion_window="24h",
              extra_headers={"Idempotency-Key": "b1"})
    batch = Batch.model_validate(client.batches.create(**kw).model_dump())
    assert client.batches.create(**kw).id == batch.id
    assert [b.id for b in client.batches.list()] == [batch.id]


@pytest.fixture
def clocked_server(tmp_path):
    clock = FakeClock()
    server = LiveServer(server_config(tmp_path / "data"), clock=clock).start()
    yield server, clock
    server.stop()


def test_expired_file_is_not_listed_and_not_found(clocked_server):
    server, clock = clocked_server
    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    short = client.files.create(file=LINE, purpose="batch", expires_after={"anchor": "created_at", "seconds": 3600})
    kept = client.files.create(file=LINE, purpose="batch")
    clock.advance(3600)
    assert [f.id for f in client.files.list()] == [kept.id]
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(short.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(short.id)
    with pytest.raises(openai.NotFoundError):
        client.files.delete(short.id)
    assert client.files.retrieve(kept.id).id == kept.id
