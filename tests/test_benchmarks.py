"""The development harnesses stay runnable as modules from the repo root (benchmarks/), and the GPU
call's kernel cache (scripts/kernel_cache.py) packs and restores what flashinfer would load."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import demo_model_ready

REPO = Path(__file__).resolve().parents[1]


def _run(*args: str, env: dict | None = None, timeout: int = 120) -> str:
    done = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


@pytest.mark.timeout(150)
def test_admission_harness_plans_without_recomputation():
    out = _run("-m", "benchmarks.admission", "--workload", "W6-quick", "--warm-up", "0")
    found = re.search(r"forward tokens ([\d,]+) for ([\d,]+) of work .* preemptions (\d+)", out)
    assert found, out
    forward, work, preemptions = found.groups()
    assert forward == work == f"{512 * (1024 + 511):,}" and preemptions == "0"


@pytest.mark.timeout(150)
def test_step_overhead_digest_is_repeatable():
    """--digest is how a refactor shows it left every plan and output alone: two runs must agree."""
    args = ("-m", "benchmarks.step_overhead", "--workload", "TA", "--num-pages", "50000", "--digest")
    digests = [re.search(r"digest of every plan and output: (\w+)", _run(*args)) for _ in range(2)]
    assert all(digests) and digests[0].group(1) == digests[1].group(1)


@pytest.mark.timeout(150)
def test_sampler_rows_times_every_kind_of_row():
    out = _run("-m", "benchmarks.sampler_rows", "--rows", "8", "--vocab", "300", "--steps", "2")
    medians = dict(re.findall(r"^(\w+)\s+median\s+([\d.]+) ms/step", out, re.MULTILINE))
    assert set(medians) == {"shared", "top_p", "seeded", "greedy"} and all(float(v) > 0 for v in medians.values()), out


def test_kernel_cache_round_trip(tmp_path):
    home, site = tmp_path / "home", tmp_path / "site"
    jit = home / ".cache" / "flashinfer" / "0.6" / "90a" / "cached_ops"
    for name in ("batch_decode_a", "batch_prefill_b"):
        (jit / name).mkdir(parents=True)
        (jit / name / f"{name}.so").write_bytes(name.encode() * 100)
    (site / "flashinfer").mkdir(parents=True)        # where restore looks: <package>/data/aot
    (site / "flashinfer" / "__init__.py").write_text("")
    env = {**os.environ, "FLASHINFER_WORKSPACE_BASE": str(home), "PYTHONPATH": str(site)}
    archive = tmp_path / "call.tar.xz"

    assert "packed 2 kernels" in _run("scripts/kernel_cache.py", "pack", str(archive), env=env)
    with tarfile.open(archive, "r:xz") as packed:
        assert sorted(packed.getnames()) == ["batch_decode_a/batch_decode_a.so", "batch_prefill_b/batch_prefill_b.so"]
    with tarfile.open(tmp_path / "hostile.tar.xz", "w:xz") as hostile:     # only <name>/<name>.so is taken
        hostile.add(archive, arcname="../escape.so")
    assert "restored 2 kernels" in _run("scripts/kernel_cache.py", "restore", str(archive),
                                        str(tmp_path / "hostile.tar.xz"), env=env)
    aot = site / "flashinfer" / "data" / "aot"
    assert (aot / "batch_decode_a" / "batch_decode_a.so").read_bytes() == b"batch_decode_a" * 100
    assert not (site / "flashinfer" / "data" / "escape.so").exists()


@pytest.mark.timeout(300)
@pytest.mark.skipif(not demo_model_ready(), reason="needs the demo model")
def test_structured_harness_compares_equal_output_lengths():
    report = json.loads(_run("-m", "benchmarks.structured", "--prompts", "3", "--prompt-len", "16",
                              "--max-tokens", "12", timeout=280).strip().splitlines()[-1])
    assert report["prompts"] == 3 and 0 < report["output_tokens"] <= 36 and report["ratio_per_token"] > 0
