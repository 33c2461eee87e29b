"""Servers started at the same instant on a fresh database take turns at the migrations: both come up
every time, on a SQLite file (a lock file beside it) and on PostgreSQL (an advisory lock)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.service.dbutil import backends, fresh_database
from tests.service.live_server import raw_request

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
MIGRATE = "import sys; from tokabatch.service.storage import db; db.upgrade(sys.argv[1]); print('ok')"


@pytest.mark.parametrize("backend", backends())
def test_two_processes_migrating_one_fresh_database_at_once_both_succeed(backend, tmp_path):
    for trial in range(10):
        folder = tmp_path / f"t{trial}"
        folder.mkdir()
        with fresh_database(backend, folder) as url:
            procs = [subprocess.Popen([sys.executable, "-c", MIGRATE, url], env=ENV, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
            results = [p.communicate(timeout=120) for p in procs]
            for proc, (out, err) in zip(procs, results):
                assert proc.returncode == 0 and out.strip() == "ok", f"trial {trial}: {err[-2000:]}"


def test_two_servers_started_at_once_on_one_data_dir_both_come_up(tmp_path):
    for trial in range(3):
        data = tmp_path / f"data{trial}"
        procs, logs = [], []
        for i in range(2):
            log = (tmp_path / f"server{trial}-{i}.log").open("w")
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "tokabatch", "serve", "--model", "demo", "--port", "0", "--data-dir", str(data),
                 "--log-format", "text", "--engine-factory", "tests.cli.fake_loops:healthy"],
                env=ENV, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
        try:
            for i, proc in enumerate(procs):
                port = _wait_for_port(tmp_path / f"server{trial}-{i}.log", proc)
                status, _, body = raw_request(f"http://127.0.0.1:{port}/health")
                assert status == 200 and json.loads(body)["status"] == "ok"
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(timeout=60)
            for log in logs:
                log.close()


def _wait_for_port(log_path: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        text = log_path.read_text()
        if "listening on http://" in text:
            return int(text.split("listening on http://127.0.0.1:")[1].split("/")[0])
        assert proc.poll() is None, text[-3000:]
        time.sleep(0.1)
    raise AssertionError(log_path.read_text()[-3000:])
