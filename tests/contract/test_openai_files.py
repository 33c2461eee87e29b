"""Contract §8 items 1-7 and 28 for the Files API, driven by the official openai client; every
returned object is strict-validated with the openai types."""

from __future__ import annotations

import json
import os
from pathlib import Path

import openai
import psutil
import pytest
from openai.types import FileDeleted, FileObject

from tests.service.live_server import raw_request, stream_multipart_upload

LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "messages": []}}\n'


def _valid(obj) -> FileObject:
    return FileObject.model_validate(obj.model_dump())


def test_upload_three_ways_and_names(client, tmp_path):                      # item 1
    p = tmp_path / "requests.jsonl"
    p.write_bytes(LINE * 3)
    with open(p, "rb") as f:
        from_handle = _valid(client.files.create(file=f, purpose="batch"))
    from_bytes = _valid(client.files.create(file=LINE, purpose="batch"))
    from_path = _valid(client.files.create(file=p, purpose="batch"))
    assert from_handle.filename == "requests.jsonl" and from_path.filename == "requests.jsonl"
    assert from_bytes.filename == "upload"
    assert (from_handle.bytes, from_bytes.bytes) == (len(LINE) * 3, len(LINE))
    assert from_handle.purpose == "batch" and from_handle.expires_at == from_handle.created_at + 2_592_000


def test_expires_after(client):                                              # item 2
    f = _valid(client.files.create(file=LINE, purpose="batch",
                                   expires_after={"anchor": "created_at", "seconds": 3600}))
    assert f.expires_at == f.created_at + 3600
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=LINE, purpose="batch", expires_after={"anchor": "created_at", "seconds": 3599})
    assert e.value.param == "expires_after.seconds" and e.value.code == "invalid_value"


def test_oversize_upload_gets_envelope_and_streams(server_factory, tmp_path):  # item 3
    server = server_factory(max_upload_bytes=1 << 20)
    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    big = tmp_path / "big.jsonl"
    big.write_bytes(LINE * ((3 << 20) // len(LINE)))
    with pytest.raises(openai.APIStatusError) as e:
        client.files.create(file=big, purpose="batch")
    assert e.value.status_code == 413
    assert e.value.body == {"message": e.value.body["message"], "type": "invalid_request_error",
                            "param": "file", "code": "file_too_large"}
    # The same through a client that streams its body (the openai client builds it in memory), so
    # the process's RSS is the server's: 48 MB against a 4 MB limit must not be buffered anywhere.
    server = server_factory(max_upload_bytes=4 << 20)
    rss_before = psutil.Process(os.getpid()).memory_info().rss
    status, body = stream_multipart_upload(f"{server.base_url}/files", purpose="batch",
                                           num_bytes=48 << 20, line=LINE)
    rss_growth = psutil.Process(os.getpid()).memory_info().rss - rss_before
    assert status == 413 and json.loads(body)["error"]["code"] == "file_too_large"
    assert rss_growth < 16 << 20, f"a 48 MB upload grew RSS by {rss_growth >> 20} MB"
    assert not list((Path(server.config.storage.data_dir) / "files").iterdir())


def test_retrieve_and_wait_for_processing(client):                            # item 4
    created = client.files.create(file=LINE, purpose="batch")
    got = _valid(client.files.retrieve(created.id))
    assert got.status == "processed" and got.model_dump() == created.model_dump()
    assert client.files.wait_for_processing(created.id, poll_interval=0.01, max_wait_seconds=1).id == created.id


def test_list_pagination_order_and_purpose(client):                           # item 5
    ids = [client.files.create(file=LINE, purpose="batch").id for _ in range(5)]
    other = client.files.create(file=b"hello", purpose="user_data").id
    seen = [_valid(f).id for f in client.files.list(limit=2)]
    assert seen == [other] + ids[::-1]
    assert [f.id for f in client.files.list(limit=2, order="asc")] == ids + [other]
    assert [f.id for f in client.files.list(purpose="user_data")] == [other]
    page = client.files.list(limit=2)
    assert page.has_more and len(page.data) == 2


def test_content_and_streaming(client, live_server):                          # item 6
    payload = LINE * 1000
    f = client.files.create(file=payload, purpose="batch")
    assert client.files.content(f.id).text == payload.decode()
    with client.files.with_streaming_response.content(f.id) as response:
        assert b"".join(response.iter_bytes(4096)) == payload
    status, _, body = raw_request(f"{live_server.base_url}/files/{f.id}/content", headers={"Range": "bytes=10-19"})
    assert status == 206 and body == payload[10:20]


def test_delete_then_not_found(client):                                      # item 7
    f = client.files.create(file=LINE, purpose="batch")
    deleted = client.files.delete(f.id)
    assert FileDeleted.model_validate(deleted.model_dump()).deleted is True and deleted.id == f.id
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve(f.id)
    assert e.value.type == "invalid_request_error" and e.value.param == "id"
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)


def test_request_ids_everywhere(client, live_server):                         # item 28
    f = client.files.create(file=LINE, purpose="batch")
    assert f._request_id and f._request_id.startswith("req_")
    assert client.files.retrieve(f.id)._request_id
    raw = client.files.with_raw_response.list()
    assert raw.headers["x-request-id"].startswith("req_")
    with pytest.raises(openai.NotFoundError) as e:
        client.files.retrieve("file-nope")
    assert e.value.request_id and e.value.response.headers["x-request-id"] == e.value.request_id
    status, headers, _ = raw_request(f"{live_server.root_url}/nowhere")
    assert status == 404 and headers["x-request-id"].startswith("req_")
