#!/usr/bin/env bash
# On the GPU machine (../shared/gpu/README.md): one call that installs the sent wheels, restores the
# compiled flashinfer kernels, runs the GPU tests and then each benchmark given, and packs the
# kernels back into $OUT. Each part has its own time limit so a slow one cannot eat the rest.
#
#   scripts/gpu_run.sh                                  # GPU tests only
#   scripts/gpu_run.sh "TA --vs-hf" "TB-quick --hydragen on" "TB-quick --hydragen off"
#
# The packed archive holds only the kernels this call compiled (scripts/kernel_cache.py): keep each
# call's archive in .fi-cache/ under its own name; every *.tar.xz there is restored.
#
# Environment: GPU_TESTS (pytest paths, default tests/engine/runtime), GPU_TEST_TIMEOUT (s, default
# 240; 0 skips the tests), BENCH_TIMEOUT (s per benchmark, default 120). Logs go to $OUT (default ./gpu-out).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "gpu_run: installing .whl/*.whl failed (send .whl along: ../shared/gpu/README.md)"; exit 1; }
export PYTHONPATH=$PWD:/tmp/site PYTHONUNBUFFERED=1
archives=(.fi-cache/*.tar.xz)
[ -f "${archives[0]}" ] && python3 scripts/kernel_cache.py restore "${archives[@]}"
if [ "${GPU_TEST_TIMEOUT:-240}" != 0 ]; then
  timeout "${GPU_TEST_TIMEOUT:-240}" python3 -m pytest -q -s -m gpu ${GPU_TESTS:-tests/engine/runtime} -p no:cacheprovider --durations=8 \
    > "$OUT/pytest.txt" 2>&1
  rc=$?
  grep -iE "relative error|agree|replays|saved|passed|failed|^E |^[0-9.]+s (call|setup)" "$OUT/pytest.txt" | head -48
  # Cut by the limit, pytest prints no summary: say so (docs/benchmarks.md, stop 36: the whole set may not fit).
  [ "$rc" = 124 ] && echo "gpu_run: the GPU tests were stopped at GPU_TEST_TIMEOUT=${GPU_TEST_TIMEOUT:-240} s" \
    "(no summary; see $OUT/pytest.txt): run the rest with GPU_TESTS=<files>"
fi
for spec in "$@"; do
  name=$(echo "$spec" | tr ' /' '__' | tr -d '-')
  # shellcheck disable=SC2086  # the spec is a workload plus flags
  timeout "${BENCH_TIMEOUT:-120}" python3 scripts/bench.py --workload $spec > "$OUT/bench-$name.txt" 2>&1
  echo "== $spec (rc $?)"
  grep -vE "^\|---|^\| workload|^built" "$OUT/bench-$name.txt" | tail -6
done
timeout 60 python3 scripts/kernel_cache.py pack "$OUT/fi-cache.tar.xz"
exit 0
