"""The database connection: URL resolution, the async engine with SQLite pragmas, migrations.

Owns `Database` (an AsyncEngine plus a session factory), `database_url(storage_config)` and
`upgrade(db_url)` (Alembic, run programmatically; called by `tokabatch db upgrade` and at server
start). SQLite gets WAL, foreign keys and a busy timeout on every connection; any other URL
(PostgreSQL via asyncpg) is used as given. Must not import torch or aiohttp.
"""

from __future__ import annotations

import contextlib
import errno
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from tokabatch.config import StorageConfig, default_data_dir
from tokabatch.errors import ConfigError

DB_FILENAME = "tokabatch.db"
SQLITE_BUSY_TIMEOUT_MS = 10_000
MIGRATIONS_DIR = Path(__file__).resolve().parents[3] / "migrations"


def data_dir(storage: StorageConfig) -> Path:
    return Path(storage.data_dir) if storage.data_dir else default_data_dir()


def database_url(storage: StorageConfig) -> str:
    """`storage.db_url`, or SQLite at <data_dir>/tokabatch.db (the folder is created)."""
    if storage.db_url:
        return storage.db_url
    folder = data_dir(storage)
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite+aiosqlite:///{folder / DB_FILENAME}"


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
PG_DISK_FULL = "53100"                   # PostgreSQL's SQLSTATE disk_full


def is_storage_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the disk is full: an OSError ENOSPC/EDQUOT from a file
    write, SQLite's SQLITE_FULL ("database or disk is full"), or PostgreSQL's disk_full."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in FULL_ERRNOS:
            return True
        if "database or disk is full" in str(exc) or getattr(exc, "sqlstate", None) == PG_DISK_FULL:
            return True
        exc = getattr(exc, "orig", None) or exc.__cause__ or exc.__context__
    return False


def _set_sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets HTTP readers proceed while the runner writes; busy_timeout makes a writer wait
    # for the lock instead of failing at once; SQLite leaves foreign keys off unless asked.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, **kwargs: Any) -> AsyncEngine:
    """An AsyncEngine for `url`; SQLite connections get the pragmas above."""
    try:
        parsed = make_url(url)
    except Exception as e:  # sqlalchemy raises ArgumentError with a terse message
        raise ConfigError(f"invalid database URL {url!r}: {e}", param="db_url") from e
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_async_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine.sync_engine, "connect", _set_sqlite_pragmas)
    return engine


@dataclass(slots=True)
class Database:
    """An open database: `sessions()` gives an AsyncSession; close() disposes the pool."""

    url: str
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]

    @classmethod
    async def open(cls, url: str) -> "Database":
        engine = make_engine(url, pool_pre_ping=not is_sqlite(url))
        return cls(url=url, engine=engine, sessions=async_sessionmaker(engine, expire_on_commit=False))

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    async def close(self) -> None:
        await self.engine.dispose()


def alembic_config(db_url: str) -> Any:
    """An Alembic Config pointing at migrations/ and `db_url` (no alembic.ini needed)."""
    import sys

    from alembic.config import Config as AlembicConfig

    # Alembic's default `stdout` is bound when alembic is first imported; pass the current one so a
    # stream replaced (and closed) since then is never written to.
    cfg = AlembicConfig(stdout=sys.stdout)
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation: a literal % in a password must be doubled.
    cfg.set_main_option("sqlalchemy.url", db_url.replace("%", "%%"))
    return cfg


def upgrade(db_url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision`. Synchronous: env.py runs its own event loop, so call
    this before starting a loop or through `asyncio.to_thread` from inside one.

    Several processes may start at once on one database: on PostgreSQL env.py holds an advisory
    lock for the migration's transaction, and for a SQLite file this holds an exclusive lock on
    `<file>.migrate-lock` beside it, so the second process finds the first one's tables done."""
    from alembic import command

    with _sqlite_file_lock(db_url):
        command.upgrade(alembic_config(db_url), revision)


@contextlib.contextmanager
def _sqlite_file_lock(db_url: str) -> Iterator[None]:
    url = make_url(db_url)
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        yield
        return
    import fcntl

    lock_path = Path(url.database).with_name(Path(url.database).name + ".migrate-lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)     # released when the file closes
        yield


def downgrade(db_url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(db_url), revision)


def check(db_url: str) -> None:
    """Raise alembic.util.AutogenerateDiffsDetected when the models and migrations differ."""
    from alembic import command

    command.check(alembic_config(db_url))


__all__ = ["Database", "database_url", "data_dir", "is_storage_full", "make_engine", "upgrade", "downgrade", "check",
           "alembic_config"]
