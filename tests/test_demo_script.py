"""scripts/demo.sh, the README's first command, end to end on the demo model: the answers are printed
and the results are written under the data dir (not a fixed folder in the system temp dir)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_writes_its_results_under_the_data_dir(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TOKABATCH_DEMO_DIR", "OPENAI_BASE_URL")}
    env["TOKABATCH_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(["scripts/demo.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "data" / "demo"
    assert f"demo: Parquet results: {out / 'results.parquet'}" in done.stdout
    assert pq.read_table(out / "results.parquet").num_rows == sum(1 for _ in (REPO / "examples/chat.jsonl").open())
    assert "capital-fr |" in done.stdout
