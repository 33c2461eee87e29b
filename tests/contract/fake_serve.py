"""`python -m tests.contract.fake_serve DATA_DIR PORT_FILE`: the real `serve_async` (migrations,
store, BatchRunner, HTTP) with a FakeEngine and a tiny tokenizer, for tests that kill -9 a server.
Short leases so that a restarted server reclaims the dead one's batch within seconds."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from tests.service.jobsutil import build_tokenizer_folder
from tokabatch.config import load_config
from tokabatch.engine.testing import FakeEngine, FakeLoop
from tokabatch.service.server import serve_async


def main() -> None:
    data_dir, port_file = Path(sys.argv[1]), Path(sys.argv[2])
    model_dir = build_tokenizer_folder(data_dir.parent / "tiny-model")
    (model_dir / "config.json").write_text("{}")
    config = load_config(
        env={}, model={"path": str(model_dir)}, storage={"data_dir": str(data_dir)}, server={"port": 0},
        runner={"lease_s": 2.0, "heartbeat_s": 0.2, "progress_interval_s": 0.2, "poll_interval_s": 0.1})

    async def engine_factory(_config):
        return await FakeEngine.launch(FakeLoop(model_id="fake", token_interval_s=0.03, max_running=2, max_waiting=0))

    asyncio.run(serve_async(config, engine_factory=engine_factory,
                            on_started=lambda port: port_file.write_text(str(port))))


if __name__ == "__main__":
    main()
