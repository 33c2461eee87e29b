"""One batch runner in a process of its own, for the fencing test (tests/service/test_runner_fencing.py):

    python -m tests.service.runner_process DB_URL DATA_DIR WORKER_ID

A BatchRunner on the real clock with a short lease (1.5 s, heartbeat 0.2 s) over a slow FakeEngine
(~0.1 s a line, two at a time), on the database and data dir given; it runs until killed. The work
folder is DATA_DIR/work, as under `tokabatch serve`."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from tests.service.jobsutil import tiny_tokenizer
from tokabatch.config import RunnerConfig
from tokabatch.engine.testing import FakeEngine, FakeLoop
from tokabatch.service.jobs.runner import BatchRunner
from tokabatch.service.storage.blobs import BlobStore
from tokabatch.service.storage.db import Database

LEASE = RunnerConfig(lease_s=1.5, heartbeat_s=0.2, progress_interval_s=0.1, poll_interval_s=0.05,
                     retry_after_s=0.2, max_retry_after_s=1.0)


async def main(db_url: str, data_dir: Path, worker_id: str) -> None:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=f"{worker_id} %(message)s")
    db = await Database.open(db_url)
    engine = await FakeEngine.launch(FakeLoop(token_interval_s=0.01, max_running=2, max_waiting=0, model_id="fake"))
    tokenizer = tiny_tokenizer(data_dir / worker_id)
    runner = BatchRunner(LEASE, db, BlobStore(data_dir / "files"), engine, tokenizer, {"fake"},
                         work_root=data_dir / "work", worker_id=worker_id)
    await runner.run_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
