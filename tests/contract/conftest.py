"""Fixtures for the openai-client conformance tests: a live tokabatch server on loopback (no
engine) and an official `openai.OpenAI` client pointed at it."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.service.live_server import LiveServer, server_config
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage import repo


@pytest.fixture
def server_factory(tmp_path):
    """start(**server_settings) -> a started LiveServer with its own data dir; all stopped after."""
    servers: list[LiveServer] = []

    def start(**server_settings) -> LiveServer:
        data_dir = tmp_path / f"data{len(servers)}"
        server = LiveServer(server_config(data_dir, **server_settings)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def live_server(server_factory) -> LiveServer:
    return server_factory()


@pytest.fixture
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url, api_key="EMPTY", max_retries=2)


def drive_batch(server: LiveServer, batch_id: str, *statuses: str) -> None:
    """Move a batch through `statuses` directly in the database (what the runner would do)."""

    async def go() -> None:
        database = await dbmod.Database.open(dbmod.database_url(server.config.storage))
        try:
            for i, status in enumerate(statuses):
                assert await repo.transition_batch(database, batch_id, status, 1_800_000_000 + i), status
        finally:
            await database.close()

    asyncio.run(go())
