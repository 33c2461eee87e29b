"""Contract §8 items 8-11, 23, 25, 26 and 28 for the Batch API, plus the auth rules, driven by the
official openai client against a live server without an engine (the runner's items live with the
runner). Every returned Batch is strict-validated with openai.types.Batch."""

from __future__ import annotations

import openai
import pytest
from openai.types import Batch

from tests.contract.conftest import drive_batch
from tests.contract.test_openai_files import LINE
from tests.service.live_server import raw_request


def _valid(obj) -> Batch:
    return Batch.model_validate(obj.model_dump())


def _batch(client, **kwargs) -> Batch:
    f = client.files.create(file=LINE, purpose="batch")
    params = {"input_file_id": f.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"} | kwargs
    return _valid(client.batches.create(**params))


def test_create_returns_valid_batch(client):                                  # item 8
    b = _batch(client, metadata={"run": "nightly"})
    assert b.status in ("validating", "in_progress") and b.expires_at - b.created_at == 86400
    assert (b.request_counts.total, b.request_counts.completed, b.request_counts.failed) == (0, 0, 0)
    assert b.usage.total_tokens == 0 and b.usage.input_tokens_details.cached_tokens == 0
    assert b.model == "tiny-test-model" and b.metadata == {"run": "nightly"} and b.errors is None
    assert b.completion_window == "24h" and b.model_extra["output_parquet_file_id"] is None
    assert _valid(client.batches.retrieve(b.id)).model_dump() == b.model_dump()


def test_nonexistent_input_file_is_accepted(client):                          # item 12 (HTTP half)
    b = _valid(client.batches.create(input_file_id="file-doesnotexist", endpoint="/v1/completions",
                                     completion_window="24h"))
    assert b.status == "validating" and b.input_file_id == "file-doesnotexist"


def test_bad_endpoint(client):                                                # item 9
    f = client.files.create(file=LINE, purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/moderations", completion_window="24h")
    assert e.value.code == "invalid_value" and e.value.param == "endpoint"
    assert "/v1/chat/completions" in e.value.message and "/v1/completions" in e.value.message


def test_bad_completion_window(client, server_factory):                       # item 10
    f = client.files.create(file=LINE, purpose="batch")
    for window in ("48h", "1h", "", "invalid"):
        with pytest.raises(openai.BadRequestError) as e:
            client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window=window)
        assert "completion_window" in e.value.message and e.value.param == "completion_window"
    custom = server_factory(allow_custom_windows=True)
    c2 = openai.OpenAI(base_url=custom.base_url, api_key="EMPTY")
    b = _batch(c2, completion_window="30m")
    assert b.completion_window == "30m" and b.expires_at - b.created_at == 1800


def test_metadata_wrong_type(client):                                         # item 11
    f = client.files.create(file=LINE, purpose="batch")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h",
                              metadata={"k": ["x"]})
    assert e.value.code == "invalid_type" and e.value.param == "metadata.k"


def test_cancel_rules_and_no_retries(client, live_server):                    # items 22 (HTTP half), 23
    b = _batch(client)
    cancelling = _valid(client.batches.cancel(b.id))
    assert cancelling.status == "cancelling" and isinstance(cancelling.cancelling_at, int)
    drive_batch(live_server, b.id, "cancelled")
    cancelled = _valid(client.batches.cancel(b.id))
    assert cancelled.status == "cancelled" and cancelled.cancelling_at == cancelling.cancelling_at
    done = _batch(client)
    drive_batch(live_server, done.id, "in_progress", "finalizing", "completed")
    before = len(live_server.seen)
    with pytest.raises(openai.ConflictError) as e:
        client.batches.cancel(done.id)
    assert e.value.body["message"] == "Cannot cancel a batch with status 'completed'."
    assert e.value.response.headers["x-should-retry"] == "false"
    assert [s for s in live_server.seen[before:]] == [("POST", f"/v1/batches/{done.id}/cancel", 409)]


def test_delete_input_of_running_batch_conflicts(client, live_server):
    b = _batch(client)
    before = len(live_server.seen)
    with pytest.raises(openai.ConflictError):
        client.files.delete(b.input_file_id)
    assert len(live_server.seen) == before + 1
    drive_batch(live_server, b.id, "failed")
    assert client.files.delete(b.input_file_id).deleted


def test_list_pages_newest_first(client):                                     # item 25
    ids = [_batch(client).id for _ in range(4)]
    pages = client.batches.list(limit=1)
    assert len(pages.data) == 1 and pages.has_more
    assert [_valid(b).id for b in pages] == ids[::-1]      # auto-pagination terminates
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.list(after="batch_unknown")
    assert e.value.code == "invalid_value" and e.value.param == "after"


def test_unknown_batch_is_404_envelope(client):                               # item 26
    for call in (client.batches.retrieve, client.batches.cancel):
        with pytest.raises(openai.NotFoundError) as e:
            call("batch_doesnotexist")
        assert e.value.type == "invalid_request_error" and "No batch found" in e.value.message


def test_request_ids(client):                                                 # item 28
    f = client.files.create(file=LINE, purpose="batch")
    created = client.batches.create(input_file_id=f.id, endpoint="/v1/completions",
                                    completion_window="24h")
    for obj in (created, client.batches.retrieve(created.id), client.batches.cancel(created.id)):
        assert obj._request_id and obj._request_id.startswith("req_")
    with pytest.raises(openai.BadRequestError) as e:
        client.batches.create(input_file_id="x", endpoint="/v1/nope", completion_window="24h")
    assert e.value.request_id


def test_auth_rules(server_factory):
    server = server_factory(api_keys=("key-one", "key-two"))
    one = openai.OpenAI(base_url=server.base_url, api_key="key-one")
    two = openai.OpenAI(base_url=server.base_url, api_key="key-two")
    for bad in ("EMPTY", ""):
        with pytest.raises(openai.AuthenticationError) as e:
            openai.OpenAI(base_url=server.base_url, api_key=bad or "x", default_headers=(
                {"Authorization": ""} if not bad else None)).files.list()
        assert e.value.code == "invalid_api_key" and e.value.type == "invalid_request_error"
    status, headers, _ = raw_request(f"{server.base_url}/batches")
    assert status == 401 and headers["x-request-id"]
    f = one.files.create(file=LINE, purpose="batch")
    b = _batch(one)
    with pytest.raises(openai.NotFoundError):
        two.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        two.files.content(f.id)
    with pytest.raises(openai.NotFoundError):
        two.files.delete(f.id)
    with pytest.raises(openai.NotFoundError):
        two.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        two.batches.cancel(b.id)
    assert [x.id for x in two.files.list()] == [] and [x.id for x in two.batches.list()] == []
    with pytest.raises(openai.BadRequestError):
        two.batches.list(after=b.id)                   # another key's id is unknown here too
    assert {x.id for x in one.files.list()} == {f.id, b.input_file_id}
    assert [x.id for x in one.batches.list()] == [b.id]
    status, _, _ = raw_request(f"{server.root_url}/health")
    assert status == 200                               # health needs no key


def test_models(client, live_server):
    models = client.models.list()
    assert [m.id for m in models] == ["tiny-test-model"]
    assert client.models.retrieve("tiny-test-model").id == "tiny-test-model"
