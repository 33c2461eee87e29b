"""The service rows of scripts/bench.py: a workload through `tokabatch serve`, as a user sends it.

`Server` starts `python -m tokabatch serve` on the benchmark's model folder in its own process
(default flags, logs included, plus --data-dir, --port and the engine sizes bench.py was given), waits for
/health, and reads the server's and the engine's CPU seconds from /proc and the engine's counters
from /metrics. Two ways in:

  - `run_batch`: the workload written as a batch file (one line per prompt with `n`, or each
    sample its own line, shuffled), uploaded, `POST /v1/batches`, polled until `completed`, the
    output file downloaded. The clock runs from `create` to `completed`; output tokens are
    summed from the output file's usage; the first completed line is the first byte of the
    batch's work-folder output (the server's data dir is ours), polled every 5 ms.
  - `run_online`: every request sent at once as its own `POST /v1/completions`; the clock runs
    from the first send to the last answer.

Both check the answers (every line or request 200, every choice full length), so a fast row
cannot hide failures. Stdlib + aiohttp only (the GPU image has no psutil).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import aiohttp

POLL_S = 0.05                    # batch status polls
FIRST_LINE_POLL_S = 0.005
ENGINE_COUNTERS = ("tokabatch_engine_busy_seconds_total", "tokabatch_engine_idle_seconds_total",
                   "tokabatch_generated_tokens_total", "tokabatch_hydragen_saved_kv_reads_total",
                   "tokabatch_decode_kv_reads_total", "tokabatch_cached_prompt_tokens_total",
                   "tokabatch_prompt_tokens_total", "tokabatch_preemptions_total", "tokabatch_engine_steps_total",
                   "tokabatch_forward_tokens_total")


@dataclass(frozen=True)
class Shape:
    """What one request of the workload asks for (prompts are token ids)."""

    output_len: int
    temperature: float
    n: int


def request_body(model: str, prompt: list[int], shape: Shape, n: int) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": shape.output_len, "temperature": shape.temperature,
            "ignore_eos": True, "n": n}


def write_batch_file(path: Path, model: str, prompts: list[list[int]], shape: Shape, *, one_per_sample: bool,
                     seed: int = 0) -> tuple[int, int]:
    """The workload as a batch input file; returns (lines, samples). `one_per_sample`: each of the n
    samples of a prompt is its own line (n=1) and the lines are shuffled, as a file written without
    regard to sharing would be."""
    if one_per_sample:
        items = [(i, j, p) for i, p in enumerate(prompts) for j in range(shape.n)]
        random.Random(seed).shuffle(items)
        lines = [(f"p{i}-s{j}", request_body(model, p, shape, 1)) for i, j, p in items]
    else:
        lines = [(f"p{i}", request_body(model, p, shape, shape.n)) for i, p in enumerate(prompts)]
    with path.open("w", encoding="utf-8") as f:
        for custom_id, body in lines:
            f.write(json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body},
                               separators=(",", ":")) + "\n")
    return len(lines), len(prompts) * shape.n


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    return out


class Server:
    """`tokabatch serve` in its own process on a fresh data dir; use as a context manager."""

    def __init__(self, model_folder: Path, data_dir: Path, extra_flags: list[str], log_path: Path,
                 start_timeout_s: float = 600.0) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "tokabatch", "serve", "--model", str(model_folder), "--data-dir",
                    str(data_dir), "--port", str(self.port), *extra_flags]
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.startup_s = 0.0
        self.model = ""

    def __enter__(self) -> Server:
        began = time.perf_counter()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT)
        asyncio.run(self._wait_ready())
        self.startup_s = time.perf_counter() - began
        return self

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                if self.proc is not None and self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited with {self.proc.returncode}: "
                                       f"{self.log_path.read_text(errors='replace')[-3000:]}")
                try:
                    async with session.get(self.url + "/health") as r:
                        if r.status == 200:
                            self.model = (await r.json())["models"][0]
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.5)
        raise RuntimeError(f"the server did not answer /health within {self.start_timeout_s:.0f} s")

    def profile(self, py_spy: str, out_path: Path, rate: int = 100) -> None:
        """Sample the server and its engine process with py-spy until the server stops (collapsed
        stacks with idle frames, one root frame per process: `py-spy record --format raw`)."""
        assert self.proc is not None
        self._spy = subprocess.Popen([py_spy, "record", "--pid", str(self.proc.pid), "--subprocesses", "--idle",
                                      "--nonblocking", "--rate", str(rate), "--format", "raw", "-o", str(out_path)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)

    def __exit__(self, *exc: Any) -> None:
        if getattr(self, "_spy", None) is not None:
            self._spy.send_signal(signal.SIGINT)      # py-spy writes its file on SIGINT
            try:
                self._spy.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._spy.kill()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def cpu_seconds(self) -> tuple[float, float]:
        """(server process, its child processes: the engine) CPU seconds so far."""
        assert self.proc is not None
        return _cpu_seconds(self.proc.pid), sum(_cpu_seconds(c) for c in _children(self.proc.pid))


async def read_metrics(session: aiohttp.ClientSession, url: str) -> dict[str, float]:
    async with session.get(url + "/metrics") as r:
        text = await r.text()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class Probe:
    """What the server and engine did during one measured run: CPU seconds and /metrics counters."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def __aenter__(self) -> Probe:
        async with aiohttp.ClientSession() as session:
            self.metrics0 = await read_metrics(session, self.server.url)
        self.cpu0 = self.server.cpu_seconds()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        cpu1 = self.server.cpu_seconds()
        async with aiohttp.ClientSession() as session:
            metrics1 = await read_metrics(session, self.server.url)
        d = {k: metrics1.get(k, 0.0) - self.metrics0.get(k, 0.0) for k in ENGINE_COUNTERS}
        busy, idle = d["tokabatch_engine_busy_seconds_total"], d["tokabatch_engine_idle_seconds_total"]
        self.result = dict(
            server_cpu_s=cpu1[0] - self.cpu0[0], engine_cpu_s=cpu1[1] - self.cpu0[1],
            engine_busy=busy / (busy + idle) if busy + idle > 0 else 0.0,
            hydragen_sharing=round(d["tokabatch_hydragen_saved_kv_reads_total"]
                                   / max(1.0, d["tokabatch_decode_kv_reads_total"]), 3),
            cached_tokens=int(d["tokabatch_cached_prompt_tokens_total"]),
            preemptions=int(d["tokabatch_preemptions_total"]), steps=int(d["tokabatch_engine_steps_total"]),
            forward_tokens=int(d["tokabatch_forward_tokens_total"]))
        # Under --data-parallel: each engine's finished requests and its own Hydragen ratio (since start).
        per_engine = sorted(k for k in metrics1 if k.startswith("tokabatch_engine_requests_finished_total{"))
        if per_engine:
            self.result["engines"] = [
                {"finished": int(metrics1[k] - self.metrics0.get(k, 0.0)),
                 "hydragen_saved_since_start": metrics1.get(k.replace("requests_finished_total",
                                                                      "hydragen_kv_read_saved_ratio"), 0.0)}
                for k in per_engine]


async def run_batch(server: Server, input_path: Path, *, expected_lines: int, expected_tokens: int) -> dict:
    """Upload, create, poll to `completed`, download; the row (see the module doc)."""
    async with aiohttp.ClientSession(server.url) as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", input_path.read_bytes(), filename=input_path.name,
                       content_type="application/jsonl")
        async with session.post("/v1/files", data=form) as r:
            file_id = (await _ok(r))["id"]
        async with Probe(server) as probe:
            began = time.perf_counter()
            async with session.post("/v1/batches", json={"input_file_id": file_id, "endpoint": "/v1/completions",
                                                         "completion_window": "24h"}) as r:
                batch = await _ok(r)
            first = asyncio.create_task(_first_line(server.data_dir / "work" / batch["id"] / "output.jsonl", began))
            while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
                await asyncio.sleep(POLL_S)
                async with session.get(f"/v1/batches/{batch['id']}") as r:
                    batch = await _ok(r)
            wall = time.perf_counter() - began
            first.cancel()
            first_s = first.result() if first.done() and not first.cancelled() else None
        if batch["status"] != "completed" or batch.get("error_file_id"):
            raise RuntimeError(f"batch {batch['id']} ended {batch['status']}: {json.dumps(batch)[:2000]}")
        async with session.get(f"/v1/files/{batch['output_file_id']}/content") as r:
            lines = (await r.read()).splitlines()
    out_tokens = in_tokens = 0
    for raw in lines:
        response = json.loads(raw)["response"]
        if response["status_code"] != 200:
            raise RuntimeError(f"a line failed: {raw[:500]!r}")
        usage = response["body"]["usage"]
        out_tokens += usage["completion_tokens"]
        in_tokens += usage["prompt_tokens"]
    _check_counts("batch", len(lines), expected_lines, out_tokens, expected_tokens)
    return dict(wall_s=wall, out_tokens=out_tokens, in_tokens=in_tokens, first_s=first_s, **probe.result)


async def _first_line(path: Path, began: float) -> float:
    while True:
        try:
            if path.stat().st_size > 0:
                return time.perf_counter() - began
        except OSError:
            pass
        await asyncio.sleep(FIRST_LINE_POLL_S)


async def run_online(server: Server, prompts: list[list[int]], shape: Shape, *, expected_tokens: int) -> dict:
    """Every prompt as its own `POST /v1/completions` (n samples each), all sent at once."""
    firsts: list[float] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(server.url, connector=connector, timeout=timeout) as session:
        async with Probe(server) as probe:
            began = time.perf_counter()

            async def one(prompt: list[int]) -> dict:
                async with session.post("/v1/completions", json=request_body(server.model, prompt, shape,
                                                                              shape.n)) as r:
                    body = await _ok(r)
                firsts.append(time.perf_counter() - began)
                return body

            bodies = await asyncio.gather(*(one(p) for p in prompts))
            wall = time.perf_counter() - began
    out_tokens = sum(b["usage"]["completion_tokens"] for b in bodies)
    in_tokens = sum(b["usage"]["prompt_tokens"] for b in bodies)
    _check_counts("online", len(bodies), len(prompts), out_tokens, expected_tokens)
    return dict(wall_s=wall, out_tokens=out_tokens, in_tokens=in_tokens, first_s=min(firsts), **probe.result)


async def warm_up(server: Server, prompts: list[list[int]], temperature: float) -> None:
    """The engine benchmark's warm-up, online: the prompts with 4 output tokens each."""
    await run_online(server, prompts, Shape(4, temperature, 1), expected_tokens=4 * len(prompts))


@dataclass(frozen=True)
class ServiceRun:
    """One service row to measure: a workload (`prompts(seed)`, n samples of each) through `via`."""

    name: str
    via: str                             # batch, batch-lines or online
    output_len: int
    temperature: float
    n: int
    prompts: Callable[[int], list[list[int]]]


def service_rows(folder: Path, todo: list[ServiceRun], warm: list[list[int]], flags: list[str], out_dir: Path,
                 tmp: Path, *, py_spy: str | None = None) -> dict:
    """Start one server, warm it up (`warm`, 4 tokens each), measure every run: {(name, via): row}."""
    rows = {}
    log_path = out_dir / "bench-server.log"
    with Server(folder, tmp / "data", flags, log_path) as server:
        print(f"server: started in {server.startup_s:.1f} s (log {log_path})", flush=True)
        if py_spy:
            server.profile(py_spy, out_dir / "py-spy-serve.txt")
        asyncio.run(warm_up(server, warm, todo[0].temperature if todo else 0.0))
        for seed, run in enumerate(todo, start=101):
            shape = Shape(run.output_len, run.temperature, run.n)
            prompts = run.prompts(seed)
            want = len(prompts) * run.n * run.output_len
            if run.via == "online":
                row = asyncio.run(run_online(server, prompts, shape, expected_tokens=want))
            else:
                path = tmp / f"{run.name}-{run.via}.jsonl"
                num_lines, _ = write_batch_file(path, server.model, prompts, shape,
                                                one_per_sample=run.via == "batch-lines")
                row = asyncio.run(run_batch(server, path, expected_lines=num_lines, expected_tokens=want))
            row.update(engine=f"serve {run.via}", out_tok_s=row["out_tokens"] / row["wall_s"],
                       total_tok_s=(row["in_tokens"] + row["out_tokens"]) / row["wall_s"],
                       startup_s=server.startup_s, peak_gib=0.0)
            rows[(run.name, run.via)] = row
            print(f"{run.name} {run.via}: {json.dumps(row)}", flush=True)
    return rows


async def _ok(response: aiohttp.ClientResponse) -> dict:
    body = await response.json(content_type=None)
    if response.status != 200:
        raise RuntimeError(f"{response.method} {response.url.path}: {response.status} {json.dumps(body)[:1000]}")
    return body


def _check_counts(path: str, got_lines: int, want_lines: int, got_tokens: int, want_tokens: int) -> None:
    if got_lines != want_lines or got_tokens != want_tokens:
        raise RuntimeError(f"{path}: {got_lines} answers with {got_tokens} output tokens, expected {want_lines} "
                           f"with {want_tokens}")


__all__ = ["Server", "ServiceRun", "Shape", "run_batch", "run_online", "service_rows", "warm_up", "write_batch_file"]
