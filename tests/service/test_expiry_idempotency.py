"""File expiry (contract §2.2-2.5: expired files answer like deleted ones; the sweep removes them,
never an unfinished batch's input) and the Idempotency-Key header on POST /v1/files and
/v1/batches (contract §1.2 [tb]). Raw HTTP through aiohttp's test server with the fake clock;
the repo/sweeper/seal parts directly. SQLite always, PostgreSQL when configured."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import FormData
from aiohttp.test_utils import TestClient, TestServer

from tests.service.live_server import server_config
from tokabatch.service.app import make_app
from tokabatch.service.jobs.outputs import ResultWriter
from tokabatch.service.jobs.seal import seal_results
from tokabatch.service.storage.states import BatchStatus as S
from tokabatch.service.storage import repo
from tokabatch.service.storage.sweeper import sweep_forever, sweep_once

LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
HOUR = 3600


@pytest.fixture
async def http(db, blobs, clock, tmp_path):
    app = make_app(server_config(tmp_path), db=db, blobs=blobs, clock=clock, served_model_names=("m",),
                   sweep_interval_s=None)
    client = TestClient(TestServer(app))
    await client.start_server()
    yield client
    await client.close()


def _form(data: bytes = LINE, *, filename: str = "in.jsonl", purpose: str = "batch",
          seconds: int | None = None) -> FormData:
    form = FormData()
    form.add_field("purpose", purpose)
    if seconds is not None:
        form.add_field("expires_after[anchor]", "created_at")
        form.add_field("expires_after[seconds]", str(seconds))
    form.add_field("file", data, filename=filename, content_type="application/octet-stream")
    return form


async def _upload(http, key: str | None = None, **kw) -> tuple[int, dict, dict]:
    headers = {"Idempotency-Key": key} if key is not None else {}
    r = await http.post("/v1/files", data=_form(**kw), headers=headers)
    return r.status, dict(r.headers), await r.json()


# --- expiry ----------------------------------------------------------------------------------

async def test_expired_file_is_hidden_like_a_deleted_one(http, clock, blobs):
    _, _, short = await _upload(http, seconds=HOUR)
    _, _, long = await _upload(http, seconds=2 * HOUR)
    clock.advance(HOUR - 1)
    assert (await http.get(f"/v1/files/{short['id']}")).status == 200
    clock.advance(1)                                    # now == expires_at: expired
    listed = await (await http.get("/v1/files")).json()
    assert [f["id"] for f in listed["data"]] == [long["id"]]
    for method, path in [("GET", ""), ("GET", "/content"), ("DELETE", "")]:
        r = await http.request(method, f"/v1/files/{short['id']}{path}")
        body = await r.json()
        assert r.status == 404 and body["error"]["param"] == "id", (method, path, body)
        assert short["id"] in body["error"]["message"] or "no longer" in body["error"]["message"]
    assert blobs.exists(short["id"])                    # hidden at once; the sweep frees the disk
    assert (await http.get(f"/v1/files/{long['id']}/content")).status == 200


async def test_default_batch_expiry_is_30_days(http, clock):
    _, _, f = await _upload(http)
    assert f["expires_at"] == f["created_at"] + 30 * 86400
    _, _, other = await _upload(http, purpose="user_data")
    assert other["expires_at"] is None
    clock.advance(30 * 86400)
    assert (await http.get(f"/v1/files/{f['id']}")).status == 404
    assert (await http.get(f"/v1/files/{other['id']}")).status == 200


async def test_sweep_removes_expired_rows_and_blobs_but_not_a_running_input(db, blobs, clock, http):
    _, _, gone = await _upload(http, seconds=HOUR)
    _, _, running_input = await _upload(http, seconds=HOUR)
    _, _, kept = await _upload(http, seconds=2 * HOUR)
    batch = await repo.create_batch(db, owner="", input_file_id=running_input["id"], endpoint="/v1/completions",
                                    completion_window="24h", now_s=int(clock()), window_s=86400)
    clock.advance(HOUR)
    result = await sweep_once(db, blobs, int(clock()))
    assert result.files == 1
    assert await repo.get_file(db, gone["id"], owner=None) is None and not blobs.exists(gone["id"])
    # The runner (no now_s) still reads the unfinished batch's input; users see it as expired.
    assert (await repo.get_file(db, running_input["id"], owner="")).id == running_input["id"]
    assert blobs.exists(running_input["id"])
    assert (await http.get(f"/v1/files/{running_input['id']}")).status == 404
    assert (await repo.get_file(db, kept["id"], owner="", now_s=int(clock()))) is not None
    # Once the batch is terminal the input goes with the next sweep.
    assert await repo.transition_batch(db, batch.id, S.FAILED, int(clock()), errors=[])
    assert (await sweep_once(db, blobs, int(clock()))).files == 1
    assert await repo.get_file(db, running_input["id"], owner=None) is None
    assert not blobs.exists(running_input["id"])


async def test_sweep_forever_runs_periodically_and_stops_on_cancel(db, blobs, clock, http):
    _, _, f = await _upload(http, seconds=HOUR)
    clock.advance(HOUR)
    task = asyncio.create_task(sweep_forever(db, blobs, clock, interval_s=0.02))
    for _ in range(500):
        if await repo.get_file(db, f["id"], owner=None) is None:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await repo.get_file(db, f["id"], owner=None) is None and not blobs.exists(f["id"])


async def test_seal_anchors_output_expiry_at_the_output_files_creation(db, blobs, tmp_path):
    batch = await repo.create_batch(db, owner="o", input_file_id="file-x", endpoint="/v1/completions",
                                    completion_window="24h", now_s=1000, window_s=86400,
                                    output_expires_after_s=7200)
    writer = ResultWriter(tmp_path / "work")
    writer.open()
    writer.write_response("ok", status_code=200, request_id="req_1", body={"usage": None})
    writer.write_error("bad", code="batch_expired", message="expired")
    sealed = await seal_results(db, blobs, batch, writer, now_s=50_000)
    for file_id in (sealed.output_file_id, sealed.error_file_id, sealed.output_parquet_file_id):
        row = await repo.get_file(db, file_id, owner="o")
        assert (row.created_at, row.expires_at) == (50_000, 57_200)


# --- idempotency keys ------------------------------------------------------------------------

async def test_upload_with_same_key_returns_the_same_file(http, db, blobs):
    s1, _, first = await _upload(http, key="k1")
    s2, headers, again = await _upload(http, key="k1")
    assert (s1, s2) == (200, 200) and again == first
    assert headers.get("Idempotent-Replayed") == "true"
    listed = await (await http.get("/v1/files")).json()
    assert [f["id"] for f in listed["data"]] == [first["id"]]
    assert sorted(p.name for p in blobs.root.iterdir()) == [first["id"]]   # the repeat's bytes dropped
    _, _, other = await _upload(http, key="k2")
    assert other["id"] != first["id"]
    _, _, unkeyed = await _upload(http)
    assert unkeyed["id"] not in (first["id"], other["id"])


@pytest.mark.parametrize("change", [{"data": LINE * 2}, {"data": LINE.replace(b'"a"', b'"b"')},
                                    {"filename": "other.jsonl"}, {"purpose": "user_data"}, {"seconds": HOUR}])
async def test_upload_reusing_a_key_for_different_content_is_409(http, change):
    await _upload(http, key="k1")
    r = await http.post("/v1/files", data=_form(**change), headers={"Idempotency-Key": "k1"})
    body = await r.json()
    assert r.status == 409 and r.headers["x-should-retry"] == "false"
    assert body["error"]["code"] == "idempotency_key_reused" and "different request" in body["error"]["message"]


async def test_batch_create_with_same_key_returns_the_same_batch(http):
    _, _, f = await _upload(http)
    body = {"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h",
            "metadata": {"a": "1", "b": "2"}}
    headers = {"Idempotency-Key": "batch-key"}
    first = await (await http.post("/v1/batches", json=body, headers=headers)).json()
    # Same body with its keys in another order and other whitespace: still the same request.
    reordered = json.dumps(dict(reversed(list(body.items()))), indent=2)
    r = await http.post("/v1/batches", data=reordered,
                        headers=headers | {"Content-Type": "application/json"})
    assert r.status == 200 and (await r.json())["id"] == first["id"]
    listed = await (await http.get("/v1/batches")).json()
    assert [b["id"] for b in listed["data"]] == [first["id"]]
    r = await http.post("/v1/batches", json=body | {"metadata": {"a": "1"}}, headers=headers)
    assert r.status == 409 and r.headers["x-should-retry"] == "false"
    # A key is per endpoint request: the upload's key cannot name a batch either.
    r = await http.post("/v1/files", data=_form(), headers=headers)
    assert r.status == 409


async def test_keys_are_per_owner_and_expire_after_24h(http, db, clock, blobs):
    _, _, first = await _upload(http, key="k1")
    assert await repo.find_idempotency_key(db, owner="someone-else", key="k1", now_s=int(clock())) is None
    clock.advance(repo.IDEMPOTENCY_TTL_S - 1)
    assert (await _upload(http, key="k1"))[2]["id"] == first["id"]
    assert (await sweep_once(db, blobs, int(clock()))).idempotency_keys == 0
    clock.advance(1)
    _, _, later = await _upload(http, key="k1")          # the key is free again: a new file
    assert later["id"] != first["id"]
    assert (await _upload(http, key="k1", data=LINE * 3))[0] == 409   # now bound to the new file
    clock.advance(repo.IDEMPOTENCY_TTL_S)
    assert (await sweep_once(db, blobs, int(clock()))).idempotency_keys == 1


async def test_key_of_a_deleted_file_creates_a_new_one(http):
    _, _, first = await _upload(http, key="k1")
    assert (await http.delete(f"/v1/files/{first['id']}")).status == 200
    status, headers, again = await _upload(http, key="k1")
    assert status == 200 and again["id"] != first["id"] and "Idempotent-Replayed" not in headers


async def test_bad_key_header_is_400(http):
    for value in ["   ", "k" * 256]:
        r = await http.post("/v1/files", data=_form(), headers={"Idempotency-Key": value})
        body = await r.json()
        assert r.status == 400 and body["error"]["param"] == "Idempotency-Key", body


async def test_concurrent_repeats_create_one_object(http):
    _, _, f = await _upload(http)
    body = {"input_file_id": f["id"], "endpoint": "/v1/completions", "completion_window": "24h"}
    responses = await asyncio.gather(*[
        http.post("/v1/batches", json=body, headers={"Idempotency-Key": "race"}) for _ in range(6)])
    ids = {(r.status, (await r.json())["id"]) for r in responses}
    assert len(ids) == 1 and next(iter(ids))[0] == 200
    listed = await (await http.get("/v1/batches")).json()
    assert len(listed["data"]) == 1


async def test_repo_loser_of_a_key_race_gets_key_taken(db):
    claim = repo.IdempotencyClaim("k", "/v1/batches", "f" * 64)
    kw = dict(owner="o", input_file_id="file-x", endpoint="/v1/completions", completion_window="24h",
              now_s=1000, window_s=86400, idempotency=claim)
    first = await repo.create_batch(db, **kw)
    with pytest.raises(repo.IdempotencyKeyTaken):
        await repo.create_batch(db, **kw)
    page = await repo.list_batches(db, owner="o")
    assert [b.id for b in page.items] == [first.id]        # the loser's batch was rolled back


# --- the runner and expired inputs -----------------------------------------------------------

async def test_runner_reads_an_input_that_expires_while_the_batch_waits(db, blobs, clock, tmp_path):
    from tests.service.jobsutil import tiny_tokenizer
    from tests.service.runnerutil import OWNER, chat_line, fake_engine, make_runner, run_to_terminal

    raw = b"".join(json.dumps(chat_line(i)).encode() + b"\n" for i in range(2))

    async def put(expires_at: int) -> str:
        file_id = repo.new_file_id()
        temp = blobs.temp_path(file_id)
        temp.write_bytes(raw)
        blobs.commit(temp, file_id)
        await repo.create_file(db, owner=OWNER, filename="in.jsonl", purpose="batch", num_bytes=len(raw),
                               now_s=int(clock()), expires_at=expires_at, file_id=file_id)
        return file_id

    async def batch_on(file_id: str) -> str:
        return (await repo.create_batch(db, owner=OWNER, input_file_id=file_id, endpoint="/v1/chat/completions",
                                        completion_window="24h", now_s=int(clock()), window_s=86_400)).id

    waiting = await batch_on(await put(int(clock()) + HOUR))     # created before its input expires
    late_input = await put(int(clock()) + HOUR)
    clock.advance(HOUR)
    too_late = await batch_on(late_input)                        # created after: the file is gone
    assert (await sweep_once(db, blobs, int(clock()))).files == 0  # both are inputs of unfinished batches
    engine = await fake_engine()
    try:
        tok = tiny_tokenizer(tmp_path)
        assert (await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, waiting)
                ).status == "completed"
        failed = await run_to_terminal(make_runner(db, blobs, engine, tok, clock, tmp_path), db, too_late)
    finally:
        await engine.close()
    assert failed.status == "failed" and "cannot find file" in failed.errors[0]["message"]
    assert (await sweep_once(db, blobs, int(clock()))).files == 2   # both batches are terminal now
