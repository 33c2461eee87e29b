"""The aiohttp application factory: routes, middlewares, and resource lifetimes (cleanup_ctx).

`make_app` builds an app that needs no engine (tests build one with a fake clock and their own
database); it also runs the expiry sweep (storage/sweeper.py) while it is up. server.py starts the
engine and the batch runner around it and adds the online routes. Must not import torch (the
engine lives in another process; here only its ModelInfo, a plain dataclass, is seen).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Callable, Sequence

from aiohttp import web

from tokabatch.config import Config
from tokabatch.engine.api import ModelInfo
from tokabatch.service.http import batches, files, models, openapi
from tokabatch.service.http.context import (
    BATCH_CREATED, BLOBS, CLOCK, CONFIG, DB, KEY_HASHES, MODELS, PROBLEMS, ServedModels,
)
from tokabatch.service.http.middleware import auth, hash_key, request_id_and_errors
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.sweeper import SWEEP_INTERVAL_S, sweep_forever

JSON_BODY_LIMIT_BYTES = 4 << 20   # POST /v1/batches bodies; uploads stream and are not limited by it


def blobs_dir(config: Config) -> Path:
    return dbmod.data_dir(config.storage) / "files"


def open_blobs(config: Config) -> BlobStore:
    """The configured blob store: the data dir's files/ folder, or a bucket (--blobs) with the data
    dir's blob-cache/ folder as this host's copy."""
    if config.storage.blobs_url:
        from tokabatch.service.storage.object_blobs import ObjectStoreBlobs

        return ObjectStoreBlobs(config.storage.blobs_url, dbmod.data_dir(config.storage) / "blob-cache")
    return BlobStore(blobs_dir(config))


async def _database(app: web.Application):
    """Open (and migrate) the database from the config, unless the caller passed one in."""
    if DB in app:
        yield
        return
    url = dbmod.database_url(app[CONFIG].storage)
    await asyncio.to_thread(dbmod.upgrade, url)
    app[DB] = await dbmod.Database.open(url)
    try:
        yield
    finally:
        await app[DB].close()


def _sweeper(interval_s: float | None):
    """A cleanup context running sweep_forever (after _database: it needs the open store)."""

    async def run(app: web.Application):
        if interval_s is None:
            yield
            return
        task = asyncio.create_task(sweep_forever(app[DB], app[BLOBS], app[CLOCK], interval_s),
                                   name="expiry-sweep")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    return run


def make_app(
    config: Config,
    *,
    db: dbmod.Database | None = None,
    blobs: BlobStore | None = None,
    engine_info: ModelInfo | None = None,
    served_model_names: Sequence[str] = (),
    clock: Callable[[], float] = time.time,
    sweep_interval_s: float | None = SWEEP_INTERVAL_S,
    api_routes: bool = True,
) -> web.Application:
    """The HTTP app. `db`/`blobs` given: used as is and not closed here (the caller owns them);
    omitted: opened from `config.storage` (migrations applied) for the app's lifetime.
    `served_model_names[0]` is the name written on batches; the rest are aliases (e.g. "demo").
    `sweep_interval_s`: how often expired files and idempotency keys are removed (None: never).
    Without `api_routes` (a worker) only the models, health and document routes are served."""
    app = web.Application(middlewares=[request_id_and_errors, auth], client_max_size=JSON_BODY_LIMIT_BYTES)
    app[CONFIG] = config
    app[CLOCK] = clock
    app[KEY_HASHES] = frozenset(hash_key(k) for k in config.server.api_keys)
    app[BATCH_CREATED] = _nothing
    app[PROBLEMS] = list
    names = tuple(dict.fromkeys(served_model_names or ((engine_info.model_id,) if engine_info else ())))
    app[MODELS] = ServedModels(names=names, info=engine_info, created_at=int(clock()))
    if db is not None:
        app[DB] = db
    store = blobs if blobs is not None else open_blobs(config)
    store.remove_stale_temps()
    app[BLOBS] = store
    app.cleanup_ctx.append(_database)
    app.cleanup_ctx.append(_sweeper(sweep_interval_s))
    if api_routes:
        app.add_routes(files.routes)
        app.add_routes(batches.routes)
    app.add_routes(models.routes)
    app.add_routes(openapi.routes)
    return app


def _nothing() -> None:
    """BATCH_CREATED without a runner in this process."""


__all__ = ["make_app", "blobs_dir", "open_blobs"]
