#!/usr/bin/env bash
# Sets up .venv with tokabatch and its test dependencies. Idempotent: a second run only checks a
# stamp (the hash of pyproject.toml) and returns in well under a second.
# Usage: source scripts/setup.sh   (or run it; it exports nothing else)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($python --version)"
  "$python" -m venv .venv
fi
stamp=".venv/.tokabatch-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing tokabatch and its dependencies into .venv (about a minute the first time)"
  # torch is pinned in the same command so pip takes the CPU build, not a multi-GB CUDA one.
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check "torch==${TOKABATCH_TORCH_VERSION:-2.13.0}" -e ".[test,postgres]"
  echo "$want" > "$stamp"
fi
