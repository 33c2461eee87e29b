"""Typed application keys and per-request keys shared by the HTTP modules and app.py.

Kept apart from app.py so that handlers can read `request.app[DB]` without importing the app
factory (which imports them). Must not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from aiohttp import web

from tokabatch.config import Config
from tokabatch.engine.api import ModelInfo
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database


@dataclass(frozen=True, slots=True)
class ServedModels:
    """What GET /v1/models lists; `names[0]` is the primary name, written on every batch."""

    names: tuple[str, ...] = ()
    info: ModelInfo | None = None
    created_at: int = 0

    @property
    def primary(self) -> str | None:
        return self.names[0] if self.names else None


CONFIG = web.AppKey("config", Config)
DB = web.AppKey("db", Database)
BLOBS = web.AppKey("blobs", BlobStore)
CLOCK = web.AppKey("clock", Callable[[], float])
MODELS = web.AppKey("models", ServedModels)
# sha256 hex of each configured API key; empty means any bearer is accepted.
KEY_HASHES = web.AppKey("key_hashes", frozenset)
# Called after a batch is created: server.py wakes the batch runner with it, so an idle runner
# claims the batch at once instead of at its next poll.
BATCH_CREATED = web.AppKey("batch_created", Callable[[], None])
# What keeps the server from working right now (the engine or the runner down, with the reason):
# /health and /ready answer 503 while it is not empty. server.py wires the engine's and runner's.
PROBLEMS = web.AppKey("problems", Callable[[], list[str]])

# Per-request values (set by middleware.py).
REQUEST_ID = web.RequestKey("request_id", str)
OWNER = web.RequestKey("owner", str)
CLIENT_CLOSED_REQUEST = 499    # the status logged for a request whose client left (nobody reads it)


def owner_of(request: web.Request) -> str:
    return request[OWNER]


def now_s(request: web.Request) -> int:
    return int(request.app[CLOCK]())


def client_gone(request: web.Request) -> bool:
    """Whether the client has closed its connection (aiohttp cancels no handler when it does)."""
    transport = request.transport
    return transport is None or transport.is_closing()
