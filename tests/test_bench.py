"""scripts/bench.py's service rows stay runnable: the simulated engine (engine/simulated.py) over the
demo model's folder, through `tokabatch serve` as bench.py starts it (batch API, shuffled lines,
online) beside the in-process engine, every answer checked by the benchmark itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_service_rows_on_the_simulated_engine(tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "--engine", "simulated", "--workload", "TA-cpu,TB-cpu",
         "--via", "engine,batch,batch-lines,online", "--out-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in done.stdout.splitlines() if line.startswith("| T")]
    paths = [(name.strip(), path.strip()) for name, path, *_ in rows]
    assert paths == [("TA-cpu", "tokabatch"), ("TA-cpu", "serve batch"), ("TA-cpu", "serve online"),
                     ("TB-cpu", "tokabatch"), ("TB-cpu", "serve batch"), ("TB-cpu", "serve batch-lines"),
                     ("TB-cpu", "serve online")]
    for row in rows:
        assert float(row[3].replace(",", "")) > 0 and float(row[4]) > 0          # output tok/s, of engine
    assert (tmp_path / "bench-server.log").stat().st_size > 0


@pytest.mark.parametrize("flag", [["--phase-detail"], ["--profile", "5"], ["--profile-prefill", "3"]])
def test_cuda_timers_are_refused_on_the_simulated_engine(flag, tmp_path):
    done = subprocess.run(
        [sys.executable, "scripts/bench.py", "--engine", "simulated", "--workload", "TA-cpu", *flag,
         "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "not with --engine simulated" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--profile", "--profile-prefill"])
def test_a_profile_of_no_steps_is_refused(flag, tmp_path):
    done = subprocess.run([sys.executable, "scripts/bench.py", "--workload", "TA-cpu", flag, "-2",
                           "--out-dir", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "must be a positive integer" in done.stderr and "Traceback" not in done.stderr
