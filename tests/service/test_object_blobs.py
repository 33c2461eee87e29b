"""Blobs in an S3-compatible bucket (storage/object_blobs.py) against moto's server: what one host
commits another reads (its cache filled chunk by chunk), deletes reach the bucket, a bucket that
cannot be used fails the start, and a sharded batch run by two runners that share nothing but the
database and the bucket (each its own cache and work folders: two hosts)."""

from __future__ import annotations

import asyncio
import dataclasses
import os

import pytest

from tests.service.jobsutil import tiny_tokenizer
from tests.service.runnerutil import (
    FAST, assert_exactly_once, chat_line, executed_lines, fake_engine, make_runner, new_batch, wait_for,
)
from tokabatch.errors import ConfigError
from tokabatch.service.storage.object_blobs import CHUNK_BYTES, ObjectStoreBlobs

pytestmark = pytest.mark.timeout(120)


def test_what_one_host_commits_another_reads(s3_blobs, tmp_path):
    data = os.urandom(CHUNK_BYTES + 12345)           # more than one part and one download chunk
    temp = s3_blobs.temp_path("file-a")
    temp.write_bytes(data)
    assert s3_blobs.commit(temp, "file-a") == len(data)
    other = ObjectStoreBlobs(s3_blobs.url, tmp_path / "other-cache")
    assert other.exists("file-a") and not other.path("file-a").exists()
    assert other.local("file-a").read_bytes() == data and other.path("file-a").exists()
    assert not list(other.root.glob(".*.tmp"))
    with pytest.raises(FileNotFoundError):
        other.local("file-missing")
    s3_blobs.delete("file-a")
    fresh = ObjectStoreBlobs(s3_blobs.url, tmp_path / "third-cache")
    assert not fresh.exists("file-a")
    s3_blobs.delete("file-a")                         # deleting twice is fine


def test_a_bucket_that_cannot_be_used_fails_the_start(s3_server, tmp_path):
    ObjectStoreBlobs(s3_server.new_bucket(), tmp_path / "ok").check()
    with pytest.raises(ConfigError, match="cannot be used"):
        ObjectStoreBlobs("s3://no-such-bucket-here/x", tmp_path / "bad").check()


async def test_two_hosts_share_a_sharded_batch_through_the_bucket(db, s3_server, clock, tmp_path):
    tok = tiny_tokenizer(tmp_path)
    url = s3_server.new_bucket()
    hosts = [ObjectStoreBlobs(url, tmp_path / f"host{i}" / "cache") for i in range(2)]
    lines = [chat_line(i, max_tokens=6, ignore_eos=True) for i in range(30)]
    batch_id = await new_batch(db, hosts[0], lines, clock)      # uploaded on host 0 only
    engines = [await fake_engine(token_interval_s=0.005, max_running=2, max_waiting=0) for _ in range(2)]
    config = dataclasses.replace(FAST, shard_lines=5)
    runners = [make_runner(db, blobs, e, tok, clock, tmp_path / f"host{i}", worker_id=f"h{i}", config=config)
               for i, (blobs, e) in enumerate(zip(hosts, engines))]
    tasks = [asyncio.create_task(r.run_forever()) for r in runners]
    try:
        row = await wait_for(db, batch_id, lambda r: r.status == "completed", timeout_s=60)
    finally:
        for r in runners:
            await r.stop()
        await asyncio.gather(*tasks)
        for e in engines:
            await e.close()
    reader = ObjectStoreBlobs(url, tmp_path / "reader-cache")        # a third host: only the bucket
    for file_id in (row.output_file_id, row.output_parquet_file_id):
        reader.local(file_id)
    assert_exactly_once(reader, row, [x["custom_id"] for x in lines])
    counts = [len(executed_lines(e)) for e in engines]
    assert sum(counts) == 30 and min(counts) > 0, counts
    # The shards' published parts are gone from the bucket once the batch is sealed.
    import obstore

    names = [meta["path"] for batch in obstore.list(reader.store) for meta in batch]
    assert sorted(names) == sorted([row.input_file_id, row.output_file_id, row.output_parquet_file_id])
