"""`tokabatch serve` as a user runs it, in a process group of its own, over the fake engine: for the
tests of signals, a full disk and load. `ServeProcess(data, log, *flags)` starts it; `.port` once
it listens; `.client()` an official openai client; `.rss_mb()` and `.open_fds()` from /proc;
`read_batch(db_url, id)` the batch's row as the runner sees it (lease holder, failures)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SLOW_ENGINE = "tests.cli.fake_loops:slow"        # two lines at a time, ~0.25 s each


def read_batch(db_url: str, batch_id: str):
    """The batch's database row (a Batch), read in a private event loop."""
    from tokabatch.service.storage import repo
    from tokabatch.service.storage.db import Database

    async def read():
        db = await Database.open(db_url)
        try:
            return await repo.get_batch(db, batch_id, owner=None)
        finally:
            await db.close()

    return asyncio.run(read())


class ServeProcess:
    def __init__(self, data: Path, log: Path, *flags: str, engine: str = SLOW_ENGINE,
                 db_url: str | None = None, wait: bool = True) -> None:
        """`wait`: return once it listens (`.port` set); else at once (`.port` is None)."""
        self.log = log
        self.db_url = db_url or f"sqlite+aiosqlite:///{data / 'tokabatch.db'}"
        db_flags = ["--db", db_url] if db_url else []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokabatch", "serve", "--model", "demo", "--port", "0", "--data-dir", str(data),
             "--log-format", "text", "--engine-factory", engine, *db_flags, *flags],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)         # its own process group, as under a service manager
        self.port = self._wait_for_port() if wait else None

    def _wait_for_port(self, timeout_s: float = 120.0) -> int:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            for line in self.log.read_text().splitlines():
                if "listening on http://" in line:
                    return int(line.split("listening on http://")[1].split("/")[0].rsplit(":", 1)[1])
            time.sleep(0.1)
        raise AssertionError("the server did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="EMPTY", max_retries=0)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def open_fds(self) -> list[str]:
        """What each open file descriptor points at (a file, socket:[...], pipe:[...], ...)."""
        folder = Path(f"/proc/{self.proc.pid}/fd")
        targets = []
        for fd in folder.iterdir():
            try:
                targets.append(os.readlink(fd))
            except OSError:
                continue
        return sorted(targets)

    def signal_group(self, sig: int) -> None:
        os.killpg(self.proc.pid, sig)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM to the group, then its exit code (SIGKILL if it does not stop in time)."""
        if self.proc.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.signal_group(signal.SIGKILL)
                self.proc.wait(timeout=30)
        return self.proc.returncode
