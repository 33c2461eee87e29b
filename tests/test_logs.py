"""Structured logs: JSON lines with context fields, and one access record per HTTP request."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from tokabatch.logs import JsonFormatter, TextFormatter
from tokabatch.service.http.context import KEY_HASHES
from tokabatch.service.http.middleware import auth, request_id_and_errors


def record(msg: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("tokabatch.test", logging.INFO, __file__, 1, msg, None, None)
    for k, v in extra.items():
        setattr(rec, k, v)
    return rec


def test_json_lines_carry_context_fields():
    entry = json.loads(JsonFormatter().format(record("batch done", batch_id="batch_1", completed=3)))
    assert entry["msg"] == "batch done" and entry["level"] == "info" and entry["logger"] == "tokabatch.test"
    assert entry["batch_id"] == "batch_1" and entry["completed"] == 3 and entry["ts"].endswith("Z")


def test_text_lines_are_key_value():
    line = TextFormatter().format(record("GET /health 200", request_id="req_1", status=200))
    assert line.endswith("info tokabatch.test GET /health 200 request_id=req_1 status=200")


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, rec: logging.LogRecord) -> None:
        self.records.append(rec)


async def test_every_request_is_logged_with_its_request_id():
    app = web.Application(middlewares=[request_id_and_errors, auth])
    app[KEY_HASHES] = frozenset()

    async def ok(_request):
        return web.json_response({"ok": True})

    app.router.add_get("/ok", ok)
    capture = Capture()
    logger = logging.getLogger("tokabatch.access")
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        async with TestClient(TestServer(app)) as client:
            ok_response = await client.get("/ok")
            missing = await client.get("/nope")
    finally:
        logger.removeHandler(capture)
    by_id = {r.request_id: r for r in capture.records}
    assert by_id[ok_response.headers["x-request-id"]].status == 200
    miss = by_id[missing.headers["x-request-id"]]
    assert (miss.method, miss.path, miss.status) == ("GET", "/nope", 404) and miss.duration_ms >= 0


def test_a_start_logs_the_migrations_not_alembic_s_plugins(tmp_path, capsys):
    from tokabatch.logs import configure_logging
    from tokabatch.service.storage import db as dbmod

    configure_logging("info", "text")
    try:
        dbmod.upgrade(f"sqlite+aiosqlite:///{tmp_path / 'tokabatch.db'}")
    finally:
        logging.getLogger().handlers[:] = []
    err = capsys.readouterr().err
    assert "Running upgrade" in err and "setup plugin" not in err
