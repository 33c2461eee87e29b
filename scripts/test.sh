#!/usr/bin/env bash
# Sets up .venv (as scripts/demo.sh does), fetches the demo model once, and runs the whole test suite.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/engine -k pages
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
# The house rules that run: ruff (pyproject.toml [tool.ruff]) and the import contracts
# ([tool.importlinter]: engine/core pure, no torch in the service, storage below jobs, ...).
.venv/bin/ruff check tokabatch scripts benchmarks tests migrations
.venv/bin/lint-imports
# The demo model is converted once into the cache; the suite's demo-model tests need it.
.venv/bin/tokabatch models fetch
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
