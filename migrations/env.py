"""Alembic environment (async): runs migrations for tokabatch's tables on SQLite or PostgreSQL.

The URL comes from the Alembic config (set by tokabatch.service.storage.db.alembic_config) or,
for the `alembic` command line, from $TOKABATCH_DB_URL. render_as_batch=True so that ALTERs work
on SQLite (which rebuilds the table). Must not import torch.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection

from tokabatch.service.storage.db import make_engine
from tokabatch.service.storage.models import Base

config = context.config
if config.config_file_name is not None and config.get_section("loggers") is not None:
    fileConfig(config.config_file_name, disable_existing_loggers=False)

target_metadata = Base.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url") or os.environ.get("TOKABATCH_DB_URL")
    if not url:
        raise RuntimeError("no database URL: set sqlalchemy.url or TOKABATCH_DB_URL")
    return url


def _configure(connection: Connection | None = None, url: str | None = None) -> None:
    context.configure(
        connection=connection,
        url=url,
        target_metadata=target_metadata,
        render_as_batch=True,
        compare_type=True,
        literal_binds=connection is None,
    )


def run_migrations_offline() -> None:
    _configure(url=_url())
    with context.begin_transaction():
        context.run_migrations()


# Servers started together on one PostgreSQL database take turns: the first migrates, the next find
# the tables made (a SQLite file is locked the same way by tokabatch.service.storage.db.upgrade).
PG_MIGRATION_LOCK = 7_401_042_026


def _run_sync(connection: Connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({PG_MIGRATION_LOCK})")
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = make_engine(_url())
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run_sync)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    asyncio.run(run_migrations_online())
