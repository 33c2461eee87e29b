"""The one configuration: frozen dataclasses, one per subsystem, each part gets only its own slice.

Facts learned at run time (free GPU memory, the number of KV pages) are returned as new values by
whoever measures them, never written back here. `load_config` merges defaults, environment
variables and flags (flags win) and raises `ConfigError` for bad values. Stdlib only.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit

from tokabatch.errors import ConfigError

DEMO_MODEL_NAME = "demo"
DTYPES = ("auto", "float32", "bfloat16")


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Where fetched and converted models live: `$TOKABATCH_CACHE` or `~/.cache/tokabatch`."""
    env = os.environ if env is None else env
    return Path(env.get("TOKABATCH_CACHE") or Path.home() / ".cache" / "tokabatch")


def default_data_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get("TOKABATCH_DATA_DIR") or Path.home() / ".local" / "share" / "tokabatch")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    path: str = DEMO_MODEL_NAME          # "demo" or an HF folder (config.json + *.safetensors)
    dtype: str = "auto"                  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"                 # auto: cuda when available, else cpu
    served_model_name: str | None = None  # default: the folder's name, "demo" for the demo model


# The scheduler's sizes when none is given, by the engine's device type: on a GPU the throughput
# configuration that scripts/bench.py measures the engine with (docs/benchmarks.md), on the CPU
# small steps, so an online request or a cancel never waits behind a long forward pass.
DEVICE_STEP_SIZES = {"cuda": (2048, 16384), "cpu": (256, 2048)}   # (max_seqs, max_tokens_per_step)
# A GPU that leaves an engine at least LARGE_STEP_MEMORY_BYTES beyond its KV cache (its share of
# what kv_memory_fraction keeps back) runs twice the sequences: faster on shared prompts, but an
# 80 GB H100 at the default fraction ran out of memory on W2 with them, while an H200 keeps back
# enough (docs/benchmarks.md, "max_seqs 4096, the FA2 group call's hang, the JSON row on an H100").
LARGE_STEP_MEMORY_BYTES = 16 * 2**30
LARGE_STEP_SIZES = {"cuda": (4096, 16384)}


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    page_size: int = 16
    max_seqs: int | None = None          # an upper bound; KV memory decides the real batch. None: by device
    max_tokens_per_step: int | None = None   # prefill + decode tokens in one forward pass. None: by device
    enable_prefix_cache: bool = True
    admission_margin: float = 0.1        # predicted lengths are inflated by this fraction

    def for_device(self, device_type: str, step_memory_bytes: int = 0) -> SchedulerConfig:
        """This config with the unset sizes filled in for `device_type` ("cuda", "cpu", ...), and
        `step_memory_bytes`: the device memory the engine's steps may use beyond weights and KV cache."""
        max_seqs, max_tokens = DEVICE_STEP_SIZES.get(device_type, DEVICE_STEP_SIZES["cpu"])
        if step_memory_bytes >= LARGE_STEP_MEMORY_BYTES and device_type in LARGE_STEP_SIZES:
            max_seqs, max_tokens = LARGE_STEP_SIZES[device_type]
        return dataclasses.replace(
            self, max_seqs=self.max_seqs if self.max_seqs is not None else max_seqs,
            max_tokens_per_step=self.max_tokens_per_step if self.max_tokens_per_step is not None else max_tokens)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: ModelConfig = ModelConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    kv_cache_tokens: int | None = None   # None: sized from free memory (GPU) or 65,536 tokens (CPU)
    kv_memory_fraction: float = 0.85     # of the free GPU memory after loading (the rest: CUDA graphs, activations)
    enable_cuda_graphs: bool = True
    # CUDA with flashinfer: its fused rotary, residual + RMSNorm, SwiGLU and sampler draw instead of
    # torch's elementwise kernels (runtime/flashinfer_kernels.py): faster, greedy outputs the same
    # (docs/benchmarks.md). Off: torch's kernels, the reference the GPU tests compare against.
    fused_kernels: bool = True
    pipelined: bool = True               # CUDA: two engine loops in turn, so CPU work overlaps GPU work
    # Hydragen prefix groups: on by default (None is the same as True). On CUDA with graphs the grouped
    # decode steps replay their own graphs (hydragen_graphs.py). Shared prompts decode much faster with
    # it (docs/benchmarks.md, on and off); off skips group detection on every step and the grouped
    # graphs' capture at start-up, for workloads that share nothing.
    enable_hydragen: bool | None = None
    hydragen_min_prefix_tokens: int = 256   # a Hydragen group shares at least this many tokens...
    hydragen_min_group: int = 16            # ... among at least this many decoding sequences
    seed: int = 0
    # Engines under one server (DataParallelEngine): one process each, on `devices` in turn (e.g.
    # ("cuda:0", "cuda:1")); without devices they share the model's device, each with its share of
    # kv_memory_fraction.
    data_parallel: int = 1
    devices: tuple[str, ...] = ()
    engines_on_device: int = 1           # engines sharing this one's device (set by supervisor.engine_configs)
    # "package.module:function" building the engine's StepLoop from `engine_config=`: None is the real
    # engine (engine/runtime/factory.py); tests and benchmarks name doubles (engine/simulated.py).
    loop_factory: str | None = None


@dataclass(frozen=True, slots=True)
class StorageConfig:
    data_dir: str = ""                   # "" means default_data_dir()
    db_url: str | None = None            # None: SQLite in data_dir
    blobs_url: str | None = None         # s3://bucket/prefix: file bytes in a bucket (AWS_* credentials), data_dir
                                         # keeps a cache; None: in data_dir/files


WORKER_SHARD_LINES = 4096               # RunnerConfig.shard_lines of `tokabatch worker` (serve --role worker)
ROLES = ("all", "api", "worker")         # what one `tokabatch serve` process runs (ServerConfig.role)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()       # empty: any bearer is accepted
    max_upload_bytes: int = 200 * 1024 * 1024
    max_batch_lines: int = 50_000
    allow_custom_windows: bool = False
    role: str = "all"                    # all: API + engine + runner; api: the API alone; worker: engine + runner


@dataclass(frozen=True, slots=True)
class RunnerConfig:
    lease_s: float = 30.0                # a claim expires this long after the last heartbeat
    heartbeat_s: float = 5.0
    progress_interval_s: float = 2.0     # request_counts and usage are written at least this often
    poll_interval_s: float = 0.5         # how often an idle runner looks for work
    order_window: int = 2048             # lines read ahead and fed sorted by prompt, after the whole file is
                                         # clustered by prompt start (ordering.py); 1: file order, no clustering
    retry_after_s: float = 5.0           # a batch whose claim ended badly waits this long, doubling per failure,
    max_retry_after_s: float = 300.0     # up to this
    max_failures: int = 3                # unexpected failures of one batch before it ends `failed` with the error
    shutdown_grace_s: float = 20.0       # on SIGTERM/SIGINT: lines in flight may finish this long (fed no new ones)
    shard_lines: int = 0                 # a batch of more lines is cut into shards of about this many, which workers
                                         # claim on their own (jobs/shards.py); 0: every batch runs whole


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    url: str | None = None               # where batch events go (a batch's metadata.webhook_url wins)
    secret: str | None = None            # whsec_<base64>: events are signed the Standard Webhooks way
    retry_s: float = 5.0                 # the first retry's delay; each next one 4x longer, up to 6 h
    max_attempts: int = 8                # then the event is abandoned (its last error kept)
    timeout_s: float = 10.0              # one delivery attempt
    poll_interval_s: float = 1.0         # how often the sender looks for due events
    allowed_hosts: tuple[str, ...] = ()  # hosts a batch's metadata.webhook_url may name ("x.com", or ".x.com" for
                                         # its subdomains too); empty: any (servers that callers can trust)


@dataclass(frozen=True, slots=True)
class Config:
    engine: EngineConfig = EngineConfig()
    storage: StorageConfig = StorageConfig()
    server: ServerConfig = ServerConfig()
    runner: RunnerConfig = RunnerConfig()
    webhooks: WebhookConfig = WebhookConfig()


def _replace(obj: Any, **changes: Any) -> Any:
    unknown = set(changes) - {f.name for f in dataclasses.fields(obj)}
    if unknown:
        raise ConfigError(f"unknown setting(s) for {type(obj).__name__}: {', '.join(sorted(unknown))}")
    return dataclasses.replace(obj, **changes)


def load_config(
    *,
    env: Mapping[str, str] | None = None,
    model: Mapping[str, Any] | None = None,
    scheduler: Mapping[str, Any] | None = None,
    engine: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    runner: Mapping[str, Any] | None = None,
    webhooks: Mapping[str, Any] | None = None,
) -> Config:
    """Defaults, then environment variables, then the given flag values (None values are ignored)."""
    env = os.environ if env is None else env

    def given(d: Mapping[str, Any] | None) -> dict[str, Any]:
        return {k: v for k, v in (d or {}).items() if v is not None}

    server_values = given(server)
    if not server_values.get("api_keys") and env.get("TOKABATCH_API_KEYS"):
        server_values["api_keys"] = tuple(k.strip() for k in env["TOKABATCH_API_KEYS"].split(",") if k.strip())
    if "api_keys" in server_values:
        server_values["api_keys"] = tuple(server_values["api_keys"])
    storage_cfg = _storage_config(given(storage), env)
    model_cfg = _replace(ModelConfig(), **given(model))
    if model_cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, not {model_cfg.dtype!r}", param="dtype")
    scheduler_cfg = _replace(SchedulerConfig(), **given(scheduler))
    sizes = (scheduler_cfg.page_size, scheduler_cfg.max_seqs, scheduler_cfg.max_tokens_per_step)
    if any(size is not None and size < 1 for size in sizes):
        raise ConfigError("page_size, max_seqs and max_tokens_per_step must be positive")
    engine_cfg = _checked_engine(_replace(EngineConfig(model=model_cfg, scheduler=scheduler_cfg), **given(engine)))
    server_cfg = _replace(ServerConfig(), **server_values)
    if server_cfg.role not in ROLES:
        raise ConfigError(f"the role must be one of {', '.join(ROLES)}, not {server_cfg.role!r}", param="role")
    if server_cfg.max_upload_bytes < 1 or server_cfg.max_batch_lines < 1:
        raise ConfigError("--max-upload-bytes and --max-batch-lines must be positive")
    runner_values = given(runner)
    if server_cfg.role == "worker":      # workers exist to share batches: they cut big ones unless told otherwise
        runner_values.setdefault("shard_lines", WORKER_SHARD_LINES)
    return Config(
        engine=engine_cfg,
        storage=storage_cfg,
        server=server_cfg,
        runner=_checked_runner(_replace(RunnerConfig(), **runner_values)),
        webhooks=_webhook_config(given(webhooks), env),
    )


def _storage_config(values: dict[str, Any], env: Mapping[str, str]) -> StorageConfig:
    if "db_url" not in values and env.get("TOKABATCH_DB_URL"):
        values["db_url"] = env["TOKABATCH_DB_URL"]
    if "blobs_url" not in values and env.get("TOKABATCH_BLOBS_URL"):
        values["blobs_url"] = env["TOKABATCH_BLOBS_URL"]
    blobs_url = values.get("blobs_url")
    if blobs_url is not None and not blobs_url.startswith("s3://"):
        raise ConfigError(f"--blobs must be an s3://bucket/prefix URL, not {blobs_url!r}", param="blobs")
    if not values.get("data_dir"):
        values["data_dir"] = str(default_data_dir(env))
    return _replace(StorageConfig(), **values)


def _checked_runner(cfg: RunnerConfig) -> RunnerConfig:
    if cfg.lease_s < 1:
        raise ConfigError("--lease must be at least 1 second", param="lease")
    if cfg.shutdown_grace_s < 0:
        raise ConfigError("--shutdown-grace must not be negative", param="shutdown_grace")
    if cfg.order_window < 1:
        raise ConfigError("order_window must be at least 1 (1 feeds a batch in file order)")
    if cfg.shard_lines < 0:
        raise ConfigError("--shard-lines must not be negative (0: batches are not sharded)", param="shard_lines")
    if cfg.heartbeat_s > cfg.lease_s / 3:         # three heartbeats a lease: one late write is no lapse
        cfg = _replace(cfg, heartbeat_s=cfg.lease_s / 3)
    return cfg


def _checked_engine(cfg: EngineConfig) -> EngineConfig:
    if not 0.0 < cfg.kv_memory_fraction <= 1.0:
        raise ConfigError("--kv-memory-fraction must be above 0 and at most 1", param="kv_memory_fraction")
    if cfg.data_parallel < 1:
        raise ConfigError("--data-parallel must be at least 1", param="data_parallel")
    if cfg.hydragen_min_prefix_tokens < 1 or cfg.hydragen_min_group < 1:
        raise ConfigError("hydragen_min_prefix_tokens and hydragen_min_group must be positive")
    return dataclasses.replace(cfg, devices=tuple(cfg.devices))


def _webhook_config(values: dict[str, Any], env: Mapping[str, str]) -> WebhookConfig:
    """--webhook-url/--webhook-secret, else TOKABATCH_WEBHOOK_URL/_SECRET; a URL needs a secret."""
    for name in ("url", "secret"):
        if not values.get(name) and env.get(f"TOKABATCH_WEBHOOK_{name.upper()}"):
            values[name] = env[f"TOKABATCH_WEBHOOK_{name.upper()}"]
    cfg = _replace(WebhookConfig(), **values)
    if cfg.url is not None:
        parts = urlsplit(cfg.url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"--webhook-url must be an absolute http(s) URL, not {cfg.url!r}", param="webhook_url")
        if cfg.secret is None:
            raise ConfigError("--webhook-url needs --webhook-secret (events are signed)", param="webhook_secret")
    if cfg.secret is not None and not _is_webhook_secret(cfg.secret):
        raise ConfigError("--webhook-secret must be whsec_ followed by base64 of at least 16 bytes "
                          "(docs/cli.md shows how to make one)", param="webhook_secret")
    durations_s = (cfg.retry_s, cfg.timeout_s, cfg.poll_interval_s)
    if not all(math.isfinite(s) and s > 0 for s in durations_s) \
            or not (isinstance(cfg.max_attempts, int) and cfg.max_attempts >= 1):
        raise ConfigError("webhook retry_s, timeout_s and poll_interval_s must be positive numbers and "
                          "max_attempts a positive integer")
    return cfg


def _is_webhook_secret(secret: str) -> bool:
    """The Standard Webhooks form, as standardwebhooks and openai's webhooks.unwrap decode it."""
    if not secret.startswith("whsec_"):
        return False
    try:
        return len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) >= 16
    except (binascii.Error, ValueError):
        return False


__all__ = [
    "Config", "EngineConfig", "ModelConfig", "RunnerConfig", "SchedulerConfig", "ServerConfig",
    "StorageConfig", "WebhookConfig", "DEMO_MODEL_NAME", "DEVICE_STEP_SIZES", "LARGE_STEP_MEMORY_BYTES",
    "LARGE_STEP_SIZES", "cache_dir", "default_data_dir",
    "load_config",
]
