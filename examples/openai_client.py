"""Run a batch on tokabatch with the official openai client, exactly as against api.openai.com.

    tokabatch serve --model demo &            # or scripts/demo.sh, which does it all
    python examples/openai_client.py examples/chat.jsonl

The server URL and key come from OPENAI_BASE_URL / OPENAI_API_KEY (default: the local server and a
dummy key: tokabatch accepts any key unless started with --api-key). Prints each custom_id with
its answer and writes the raw output lines next to the input as <input>.output.jsonl.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from openai import OpenAI

TERMINAL = {"completed", "failed", "expired", "cancelled"}


def main(input_path: Path) -> int:
    client = OpenAI(base_url=os.environ.get("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1"),
                    api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"))
    endpoint = json.loads(input_path.read_text(encoding="utf-8").splitlines()[0])["url"]

    uploaded = client.files.create(file=input_path, purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h",
                                  metadata={"source": "examples/openai_client.py"})
    print(f"created {batch.id} ({batch.status})")

    while batch.status not in TERMINAL:          # OpenAI users poll every 5-60 s; locally 1 s is fine
        time.sleep(1.0)
        batch = client.batches.retrieve(batch.id)
        counts = batch.request_counts
        print(f"  {batch.status}: {counts.completed} ok, {counts.failed} failed of {counts.total}")

    if batch.status == "failed":
        for err in batch.errors.data if batch.errors else []:
            print(f"  line {err.line}: {err.code}: {err.message}", file=sys.stderr)
        return 1

    if batch.output_file_id:
        text = client.files.content(batch.output_file_id).text
        out_path = input_path.with_suffix(".output.jsonl")
        out_path.write_text(text, encoding="utf-8")
        for line in text.splitlines():
            result = json.loads(line)
            body = result["response"]["body"]       # decide success by status_code, not by error == None
            choice = body["choices"][0]
            answer = choice["message"]["content"] if "message" in choice else choice["text"]
            print(f"{result['custom_id']:>16}: {' '.join(answer.split())}")
        print(f"output lines written to {out_path}")
    if batch.error_file_id:                         # failed lines, with their HTTP-style error bodies
        for line in client.files.content(batch.error_file_id).text.splitlines():
            result = json.loads(line)
            reason = result["error"] or result["response"]["body"]["error"]
            print(f"{result['custom_id']:>16}: FAILED {reason['message']}", file=sys.stderr)
    return 0 if batch.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "examples/chat.jsonl")))
