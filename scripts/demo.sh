#!/usr/bin/env bash
# The main job on the demo model, end to end: set up .venv, fetch the demo model (once), start
# `tokabatch serve` on a free port with a throw-away data dir, submit examples/chat.jsonl through
# the CLI, wait for it, print every answer, and say where the Parquet file is. The server is
# stopped on exit, whatever happens. Fast the second time: setup and the model are cached.
# Usage: scripts/demo.sh [INPUT.jsonl]     (results go to $TOKABATCH_DEMO_DIR, default the demo/ folder
#                                           of the data dir: $TOKABATCH_DATA_DIR or ~/.local/share/tokabatch)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
input="${1:-examples/chat.jsonl}"
out_dir="${TOKABATCH_DEMO_DIR:-${TOKABATCH_DATA_DIR:-$HOME/.local/share/tokabatch}/demo}"

scripts/setup.sh
export HF_HUB_OFFLINE=1
py=.venv/bin/python
tokabatch=".venv/bin/python -m tokabatch"   # works before and after `pip install -e`

echo "demo: model folder $($tokabatch models fetch demo)"

mkdir -p "$out_dir"
data_dir="$(mktemp -d "$out_dir/server-data.XXXXXX")"
log="$out_dir/server.log"
port="$($py -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
server_pid=""
cleanup() {
  if [ -n "$server_pid" ] && kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$data_dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "demo: starting tokabatch serve on 127.0.0.1:$port (log: $log)"
$tokabatch serve --model demo --host 127.0.0.1 --port "$port" --data-dir "$data_dir" >"$log" 2>&1 &
server_pid=$!
export OPENAI_BASE_URL="http://127.0.0.1:$port/v1" OPENAI_API_KEY=EMPTY

# /health answers once migrations ran and the engine loaded the model.
if ! $py - "$port" "$server_pid" <<'PY'
import os, sys, time, urllib.request
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 600
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("the server exited during start-up")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.2)
sys.exit("the server did not become healthy within 600 s")
PY
then
  echo "demo: the server did not start; the end of its log:" >&2
  tail -n 20 "$log" >&2
  exit 1
fi

parquet="$out_dir/results.parquet"
jsonl="$out_dir/results.jsonl"
echo "demo: submitting $input"
set +e
batch_id="$($tokabatch submit "$input" --wait --output "$parquet")"
code=$?
set -e
if [ -z "$batch_id" ]; then
  exit "$code"
fi
$tokabatch download "$batch_id" -o "$jsonl" 2>/dev/null || true

echo
echo "demo: answers of $batch_id"
$py - "$jsonl" "$(dirname "$jsonl")/results.errors.jsonl" <<'PY'
import json, sys
from pathlib import Path
for path in sys.argv[1:]:
    if not Path(path).is_file():
        continue
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        response = row.get("response") or {}
        body = response.get("body") or {}
        if response.get("status_code") == 200:
            choice = body["choices"][0]
            text = choice["message"]["content"] if "message" in choice else choice["text"]
        else:
            text = "FAILED: " + ((row.get("error") or body.get("error") or {}).get("message") or "?")
        print(f"  {row['custom_id']:>14} | {' '.join((text or '').split())}")
PY
echo
echo "demo: Parquet results: $parquet"
echo "demo: JSONL results:   $jsonl"
exit "$code"
