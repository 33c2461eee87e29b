"""Fixtures for the service tests: a migrated database on every backend, a blob store, a clock."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.service.dbutil import backends, fresh_database
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage.blobs import BlobStore


@pytest.fixture(params=backends())
def db_url(request, tmp_path):
    """An empty database URL: SQLite always, PostgreSQL too when TOKABATCH_TEST_DATABASE_URL is set."""
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture(params=backends())
def serve_db(request, tmp_path):
    """For a `tokabatch serve` process (serve_process.py): None, SQLite in its data dir, or a fresh
    PostgreSQL database's URL when TOKABATCH_TEST_DATABASE_URL is set."""
    if request.param == "sqlite":
        yield None
        return
    with fresh_database(request.param, tmp_path) as url:
        yield url


@pytest.fixture
async def db(db_url):
    """An open Database migrated to head."""
    await asyncio.to_thread(dbmod.upgrade, db_url)
    database = await dbmod.Database.open(db_url)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
def blobs(tmp_path):
    return BlobStore(tmp_path / "files")


class FakeClock:
    """An injectable clock: `clock()` returns the current fake Unix time in seconds."""

    def __init__(self, now_s: float = 1_700_000_000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s

    def advance(self, seconds: float) -> None:
        self.now_s += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server for the session (tests/service/s3util.py); its AWS_* variables are set for
    the whole session, so servers started by a test find it."""
    from tests.service.s3util import start_or_skip

    server = start_or_skip()
    saved = {name: os.environ.get(name) for name in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        server.stop()


@pytest.fixture
def s3_blobs(s3_server, tmp_path):
    """An ObjectStoreBlobs over a fresh bucket, its cache in tmp_path/cache."""
    from tokabatch.service.storage.object_blobs import ObjectStoreBlobs

    return ObjectStoreBlobs(s3_server.new_bucket(), tmp_path / "cache")
