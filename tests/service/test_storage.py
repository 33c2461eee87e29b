"""Storage: migrations, pragmas, the repository's queries and compare-and-set claims, blobs.
Runs on SQLite always and on PostgreSQL when TOKABATCH_TEST_DATABASE_URL is set."""

from __future__ import annotations

import asyncio
import json

import pytest
from sqlalchemy import inspect, text

from tokabatch.errors import Conflict, InvalidRequest
from tokabatch.service.storage import states
from tokabatch.service.storage.states import BatchStatus as S
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage import repo
from tokabatch.service.storage.blobs import BlobStore

NOW = 1_700_000_000


async def _tables(url: str) -> set[str]:
    database = await dbmod.Database.open(url)
    try:
        async with database.engine.connect() as conn:
            return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
    finally:
        await database.close()


async def test_migrations_upgrade_check_downgrade(db_url):
    await asyncio.to_thread(dbmod.upgrade, db_url)
    assert {"files", "batches", "alembic_version"} <= await _tables(db_url)
    await asyncio.to_thread(dbmod.check, db_url)      # raises if models and migrations differ
    await asyncio.to_thread(dbmod.downgrade, db_url, "base")
    assert not ({"files", "batches"} & await _tables(db_url))
    await asyncio.to_thread(dbmod.upgrade, db_url)
    assert {"files", "batches"} <= await _tables(db_url)


async def test_sqlite_pragmas(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'x.db'}"
    database = await dbmod.Database.open(url)
    try:
        async with database.engine.connect() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == dbmod.SQLITE_BUSY_TIMEOUT_MS
    finally:
        await database.close()


def test_transition_table_is_consistent():
    for to, sources in states.TRANSITIONS.items():
        assert not (sources & states.TERMINAL), f"{to} entered from a terminal state"
    reachable, frontier = {S.VALIDATING}, [S.VALIDATING]
    while frontier:
        frm = frontier.pop()
        for to in S:
            if states.can_transition(frm, to) and to not in reachable:
                reachable.add(to)
                frontier.append(to)
    assert reachable == set(S)
    assert set(states.TIMESTAMP_FIELD) == set(S) - {S.VALIDATING}


async def _file(db, owner="", purpose="batch", name="in.jsonl"):
    return await repo.create_file(db, owner=owner, filename=name, purpose=purpose, num_bytes=3, now_s=NOW)


async def test_files_pagination_and_owner_scoping(db):
    mine = [await _file(db, owner="a", name=f"f{i}") for i in range(5)]
    await _file(db, owner="b")
    page = await repo.list_files(db, owner="a", limit=2)
    assert [f.id for f in page.items] == [mine[4].id, mine[3].id] and page.has_more
    page = await repo.list_files(db, owner="a", limit=2, after=mine[1].id)
    assert [f.id for f in page.items] == [mine[0].id] and not page.has_more
    asc = await repo.list_files(db, owner="a", order="asc")
    assert [f.id for f in asc.items] == [f.id for f in mine] and not asc.has_more
    with pytest.raises(InvalidRequest) as e:
        await repo.list_files(db, owner="b", after=mine[0].id)   # another owner's id is unknown
    assert e.value.param == "after" and e.value.code == "invalid_value"
    assert await repo.get_file(db, mine[0].id, owner="b") is None
    assert (await repo.get_file(db, mine[0].id, owner="a")).filename == "f0"
    await _file(db, owner="a", purpose="batch_output")
    assert len((await repo.list_files(db, owner="a", purpose="batch_output")).items) == 1


async def test_delete_file_refuses_input_of_running_batch(db):
    f = await _file(db)
    b = await repo.create_batch(db, owner="", input_file_id=f.id, endpoint="/v1/completions",
                                completion_window="24h", now_s=NOW, window_s=86400)
    with pytest.raises(Conflict):
        await repo.delete_file(db, f.id, owner="")
    assert await repo.transition_batch(db, b.id, S.FAILED, NOW + 1, errors=[])
    assert (await repo.delete_file(db, f.id, owner="")).id == f.id
    assert await repo.get_file(db, f.id, owner="") is None
    assert await repo.delete_file(db, f.id, owner="") is None


async def test_batch_create_list_and_compare_and_set(db):
    ids = [(await repo.create_batch(db, owner="o", input_file_id="file-x", endpoint="/v1/completions",
                                    completion_window="24h", now_s=NOW, window_s=86400,
                                    metadata={"k": "v"}, model="m")).id for _ in range(3)]
    page = await repo.list_batches(db, owner="o", limit=2)
    assert [b.id for b in page.items] == ids[::-1][:2] and page.has_more   # newest first, same second
    b = await repo.get_batch(db, ids[0], owner="o")
    assert (b.status, b.expires_at, b.metadata_, b.request_total) == ("validating", NOW + 86400, {"k": "v"}, 0)
    assert await repo.get_batch(db, ids[0], owner="other") is None
    assert not await repo.transition_batch(db, ids[0], S.COMPLETED, NOW)        # not from validating
    assert await repo.transition_batch(db, ids[0], S.IN_PROGRESS, NOW + 5, request_total=7)
    assert not await repo.transition_batch(db, ids[0], S.IN_PROGRESS, NOW + 6)  # CAS: already there
    b = await repo.get_batch(db, ids[0], owner=None)
    assert (b.status, b.in_progress_at, b.request_total) == ("in_progress", NOW + 5, 7)
    with pytest.raises(ValueError):
        await repo.transition_batch(db, ids[0], S.FINALIZING, NOW, status="completed")


async def test_cancel_batch_rules(db):
    b = await repo.create_batch(db, owner="", input_file_id="f", endpoint="/v1/completions",
                                completion_window="24h", now_s=NOW, window_s=86400)
    got = await repo.cancel_batch(db, b.id, owner="", now_s=NOW + 3)
    assert (got.status, got.cancelling_at) == ("cancelling", NOW + 3)
    assert (await repo.cancel_batch(db, b.id, owner="", now_s=NOW + 9)).cancelling_at == NOW + 3
    assert await repo.cancel_batch(db, b.id, owner="x", now_s=NOW) is None
    assert await repo.transition_batch(db, b.id, S.CANCELLED, NOW + 10)
    assert (await repo.cancel_batch(db, b.id, owner="", now_s=NOW + 11)).status == "cancelled"
    done = await repo.create_batch(db, owner="", input_file_id="f", endpoint="/v1/completions",
                                   completion_window="24h", now_s=NOW, window_s=86400)
    for to in (S.IN_PROGRESS, S.FINALIZING, S.COMPLETED):
        assert await repo.transition_batch(db, done.id, to, NOW)
    with pytest.raises(Conflict, match="Cannot cancel a batch with status 'completed'"):
        await repo.cancel_batch(db, done.id, owner="", now_s=NOW)


async def test_claims_lease_heartbeat_release(db):
    b1 = await repo.create_batch(db, owner="", input_file_id="f", endpoint="/v1/completions",
                                 completion_window="24h", now_s=NOW, window_s=86400)
    b2 = await repo.create_batch(db, owner="", input_file_id="f", endpoint="/v1/completions",
                                 completion_window="24h", now_s=NOW, window_s=86400)
    claims = await asyncio.gather(*[repo.claim_batch(db, f"w{i}", 30, NOW) for i in range(4)])
    got = [c.id for c in claims if c is not None]
    assert sorted(got) == sorted([b1.id, b2.id])          # each batch claimed exactly once
    holder = next(c for c in claims if c is not None and c.id == b1.id)
    assert holder.lease_expires_at == NOW + 30 and holder.num_claims == 1
    assert await repo.claim_batch(db, "w9", 30, NOW + 10) is None
    assert await repo.heartbeat(db, b1.id, holder.worker_id, 30, NOW + 20)
    assert not await repo.heartbeat(db, b1.id, "intruder", 30, NOW + 20)
    stolen = await repo.claim_batch(db, "w9", 30, NOW + 45)  # b2's lease (NOW+30) expired, b1's not
    assert stolen.id == b2.id and stolen.worker_id == "w9" and stolen.num_claims == 2
    assert await repo.release_claim(db, b1.id, holder.worker_id)
    assert (await repo.claim_batch(db, "w8", 30, NOW + 46)).id == b1.id
    for to in (S.IN_PROGRESS, S.FINALIZING, S.COMPLETED):
        assert await repo.transition_batch(db, b1.id, to, NOW)
    assert await repo.claim_batch(db, "w7", 30, NOW + 1000) is not None   # b2 only
    assert await repo.claim_batch(db, "w6", 30, NOW + 1000) is None       # b1 is terminal, b2 held


async def test_progress_errors_and_result_files(db):
    b = await repo.create_batch(db, owner="", input_file_id="f", endpoint="/v1/chat/completions",
                                completion_window="24h", now_s=NOW, window_s=86400)
    assert await repo.update_progress(db, b.id, repo.RequestCounts(3, 2, 1),
                                      repo.Usage(10, 4, 6, 0, 16))
    assert not await repo.update_progress(db, b.id, repo.RequestCounts(3, 3, 0), repo.Usage(), worker_id="w")
    errors = [{"code": "invalid_json_line", "message": "m", "param": None, "line": 2}]
    await repo.set_validation_errors(db, b.id, errors)
    await repo.set_result_files(db, b.id, "file-o", None, "file-p")
    got = await repo.get_batch(db, b.id, owner="")
    assert (got.request_total, got.request_completed, got.request_failed) == (3, 2, 1)
    assert (got.input_tokens, got.cached_tokens, got.output_tokens, got.total_tokens) == (10, 4, 6, 16)
    assert got.errors[0]["line"] == 2
    assert (got.output_file_id, got.error_file_id, got.output_parquet_file_id) == ("file-o", None, "file-p")


async def test_blob_writer_commit_and_abort(tmp_path):
    store = BlobStore(tmp_path / "files")
    w = store.writer("file-a")
    for _ in range(3):
        await w.write(b"x" * 700_000)
    assert not store.exists("file-a")                     # nothing under the real name yet
    assert await w.commit() == 2_100_000 and store.path("file-a").stat().st_size == 2_100_000
    w = store.writer("file-b")
    await w.write(b"abc")
    await w.abort()
    assert not store.exists("file-b") and not list(store.root.glob("*.tmp")) and not list(store.root.glob(".*.tmp"))
    store.temp_path("file-c").write_bytes(b"half")
    assert store.remove_stale_temps() == 0               # fresh: maybe another process's
    assert store.remove_stale_temps(older_than_s=-1) == 1


def test_temporaries_of_a_dead_process_are_swept_at_once(tmp_path):
    import subprocess
    import sys

    from tokabatch.service.storage import blobs as blobs_module

    store = BlobStore(tmp_path / "files")
    mine = store.temp_path("file-live")                    # this process is alive: kept
    mine.write_bytes(b"writing")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = store.root / f".file-orphan.{blobs_module._HOST}-{int(dead.stdout)}.abcd1234.tmp"
    orphan.write_bytes(b"half")                            # its process has exited: swept now, not in an hour
    other_host = store.root / ".file-far.elsewhere-1.abcd1234.tmp"
    other_host.write_bytes(b"maybe being written")         # another host's: only when old
    assert store.remove_stale_temps() == 1
    assert mine.exists() and not orphan.exists() and other_host.exists()


async def test_a_terminal_status_writes_one_webhook_event_and_one_sender_takes_it(db):
    from tokabatch.service.storage import outbox

    b = await repo.create_batch(db, owner="o", input_file_id="f", endpoint="/v1/completions",
                                completion_window="24h", now_s=NOW, window_s=86400)
    assert await repo.transition_batch(db, b.id, S.IN_PROGRESS, NOW)
    assert not await outbox.list_events(db)                                   # not terminal: no event
    assert await repo.transition_batch(db, b.id, S.EXPIRED, NOW + 1)
    assert not await repo.transition_batch(db, b.id, S.EXPIRED, NOW + 2)      # a lost CAS writes none
    [event] = await outbox.list_events(db, batch_id=b.id)
    payload = json.loads(event.payload)
    assert (event.type, event.owner, payload["type"], payload["data"], payload["id"]) == (
        "batch.expired", "o", "batch.expired", {"id": b.id}, event.id)
    taken = await asyncio.gather(*(outbox.claim_due(db, NOW + 5, 30.0) for _ in range(4)))
    assert sorted(len(t) for t in taken) == [0, 0, 0, 1]                      # one sender, one attempt
    assert await outbox.claim_due(db, NOW + 20, 30.0) == []                   # leased until NOW + 35
    [again] = await outbox.claim_due(db, NOW + 36, 30.0)                      # the lease lapsed
    assert again.attempts == 2
    await outbox.mark_delivered(db, again.id, NOW + 36)
    assert await outbox.claim_due(db, NOW + 999, 30.0) == []
    assert await outbox.sweep_events(db, NOW + 36 + outbox.EVENT_RETENTION_S + 1) == 1
