"""The one Config: the scheduler's sizes by device when none is given, and the engine flags' checks."""

from __future__ import annotations

import pytest

from tokabatch.config import DEVICE_STEP_SIZES, LARGE_STEP_MEMORY_BYTES, LARGE_STEP_SIZES, SchedulerConfig, load_config
from tokabatch.errors import ConfigError


def test_unset_scheduler_sizes_are_the_devices():
    cuda = SchedulerConfig().for_device("cuda")
    cpu = SchedulerConfig().for_device("cpu")
    assert (cuda.max_seqs, cuda.max_tokens_per_step) == DEVICE_STEP_SIZES["cuda"] == (2048, 16384)
    assert (cpu.max_seqs, cpu.max_tokens_per_step) == DEVICE_STEP_SIZES["cpu"] == (256, 2048)
    assert SchedulerConfig().for_device("mps") == cpu            # any other device: the small steps
    given = SchedulerConfig(max_seqs=64).for_device("cuda")
    assert (given.max_seqs, given.max_tokens_per_step) == (64, 16384)


def test_a_gpu_with_memory_to_spare_runs_larger_steps():
    roomy = SchedulerConfig().for_device("cuda", step_memory_bytes=LARGE_STEP_MEMORY_BYTES)
    assert (roomy.max_seqs, roomy.max_tokens_per_step) == LARGE_STEP_SIZES["cuda"] == (4096, 16384)
    tight = SchedulerConfig().for_device("cuda", step_memory_bytes=LARGE_STEP_MEMORY_BYTES - 1)
    assert tight == SchedulerConfig().for_device("cuda")
    assert SchedulerConfig().for_device("cpu", step_memory_bytes=2**40) == SchedulerConfig().for_device("cpu")
    assert SchedulerConfig(max_seqs=64).for_device("cuda", step_memory_bytes=2**40).max_seqs == 64


def test_serve_flags_reach_the_engine_config():
    config = load_config(env={}, scheduler={"max_seqs": 512, "max_tokens_per_step": None},
                         engine={"kv_memory_fraction": 0.5, "loop_factory": "pkg.mod:fn"})
    assert config.engine.scheduler.max_seqs == 512 and config.engine.scheduler.max_tokens_per_step is None
    assert config.engine.kv_memory_fraction == 0.5 and config.engine.loop_factory == "pkg.mod:fn"


@pytest.mark.parametrize("bad", [{"scheduler": {"max_seqs": 0}}, {"scheduler": {"max_tokens_per_step": -1}},
                                 {"engine": {"kv_memory_fraction": 0.0}}, {"engine": {"kv_memory_fraction": 1.5}}])
def test_bad_engine_sizes_are_config_errors(bad):
    with pytest.raises(ConfigError):
        load_config(env={}, **bad)


WHSEC = "whsec_" + "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="      # base64 of 32 bytes


def test_webhook_settings_come_from_flags_else_the_environment():
    assert load_config(env={}).webhooks.url is None
    config = load_config(env={"TOKABATCH_WEBHOOK_SECRET": WHSEC, "TOKABATCH_WEBHOOK_URL": "https://a/h"},
                         webhooks={"url": "http://127.0.0.1:9/h", "secret": None, "retry_s": 0.5})
    hooks = config.webhooks
    assert (hooks.url, hooks.secret, hooks.retry_s) == ("http://127.0.0.1:9/h", WHSEC, 0.5)


@pytest.mark.parametrize("webhooks", [
    {"url": "https://h/"},                               # a URL needs a secret: events are signed
    {"secret": "c2VjcmV0c2VjcmV0c2VjcmV0"},              # no whsec_ prefix
    {"secret": "whsec_!!not base64!!"}, {"secret": "whsec_"}, {"secret": "whsec_c2hvcnQ="},  # or too short
    {"url": "h.example/x", "secret": WHSEC}, {"url": "ftp://h/x", "secret": WHSEC},
    {"url": "https://", "secret": WHSEC},
    {"secret": WHSEC, "max_attempts": 0}, {"secret": WHSEC, "retry_s": -1.0}, {"secret": WHSEC, "timeout_s": 0.0},
    {"secret": WHSEC, "poll_interval_s": float("nan")}, {"secret": WHSEC, "max_attempts": 2.5},
])
def test_bad_webhook_settings_are_config_errors(webhooks):
    with pytest.raises(ConfigError):
        load_config(env={}, webhooks=webhooks)


def test_workers_cut_big_batches_into_shards_unless_told_otherwise():
    from tokabatch.config import WORKER_SHARD_LINES

    assert load_config(env={}).runner.shard_lines == 0                    # one process: batches run whole
    assert load_config(env={}, server={"role": "worker"}).runner.shard_lines == WORKER_SHARD_LINES
    assert load_config(env={}, server={"role": "worker"}, runner={"shard_lines": 0}).runner.shard_lines == 0
    with pytest.raises(ConfigError, match="shard-lines"):
        load_config(env={}, runner={"shard_lines": -1})


def test_the_blob_store_is_a_bucket_url_from_the_flag_else_the_environment():
    assert load_config(env={}).storage.blobs_url is None
    assert load_config(env={"TOKABATCH_BLOBS_URL": "s3://b/p"}).storage.blobs_url == "s3://b/p"
    assert load_config(env={"TOKABATCH_BLOBS_URL": "s3://b/p"}, storage={"blobs_url": "s3://c"}).storage.blobs_url \
        == "s3://c"
    with pytest.raises(ConfigError, match="s3://"):
        load_config(env={}, storage={"blobs_url": "/var/lib/files"})
