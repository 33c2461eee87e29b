"""Test databases: a SQLite file per test, and (when TOKABATCH_TEST_DATABASE_URL is set) a fresh
PostgreSQL database per test, created and dropped around it. An unreachable server FAILS the test:
CI sets the variable precisely so that it never goes green without PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

from sqlalchemy.engine import make_url

PG_ENV = "TOKABATCH_TEST_DATABASE_URL"


def backends() -> list[str]:
    return ["sqlite", "postgres"] if os.environ.get(PG_ENV) else ["sqlite"]


async def _pg_admin(server_url: str, sql: str) -> None:
    import asyncpg

    url = make_url(server_url).set(drivername="postgresql")
    conn = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@contextlib.contextmanager
def fresh_database(backend: str, tmp_dir: Path) -> Iterator[str]:
    """Yield the URL of an empty database; PostgreSQL databases are dropped afterwards."""
    if backend == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_dir / 'tokabatch.db'}"
        return
    server_url = os.environ[PG_ENV]
    name = f"tokabatch_test_{secrets.token_hex(6)}"
    # Run in a private loop: the caller may be a sync fixture or already inside pytest's loop.
    _run(_pg_admin(server_url, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        _run(_pg_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _run(coro) -> None:
    import threading

    errors: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if errors:
        raise errors[0]
