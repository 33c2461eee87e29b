"""An online request is answered while a large batch runs, long before the batch ends (issue 4).

The full server (serve_async: runner + HTTP) on the fake engine, whose batch lines are slow
(token_interval_s); tests/cli/conftest.FakeServer adds the online routes to serve_async's app. The
fake engine, like the real scheduler, admits Priority.ONLINE requests ahead of waiting batch work.
"""

from __future__ import annotations

import json
import time
import urllib.request

import openai

from tests.cli.conftest import fake_server_factory, needs_demo_tokenizer  # noqa: F401  (fixture)

pytestmark = needs_demo_tokenizer


def test_online_request_finishes_while_a_big_batch_runs(fake_server_factory, tmp_path):
    server = fake_server_factory(loop_kwargs={"token_interval_s": 0.05, "max_running": 4, "max_waiting": 4})

    src = tmp_path / "big.jsonl"
    with src.open("w") as f:
        for i in range(400):     # 400 lines x 16 tokens x 50 ms, 4 at a time: about 80 s of batch work
            f.write(json.dumps({"custom_id": f"b{i}", "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": "demo", "messages": [{"role": "user", "content": f"q{i}"}],
                                         "max_tokens": 16}}) + "\n")
    client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY", max_retries=0)
    batch = client.batches.create(input_file_id=client.files.create(file=src, purpose="batch").id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.monotonic() + 30
    while client.batches.retrieve(batch.id).request_counts.completed < 4:
        assert time.monotonic() < deadline, "the batch did not start"
        time.sleep(0.1)

    started = time.monotonic()
    answer = client.chat.completions.create(model="demo", messages=[{"role": "user", "content": "now"}],
                                            max_tokens=4, timeout=10)
    online_s = time.monotonic() - started
    state = client.batches.retrieve(batch.id)
    assert answer.choices[0].message.content
    assert state.status == "in_progress", state.status
    assert online_s < 10.0, online_s
    print(f"online request answered in {online_s:.2f} s while the batch was at "
          f"{state.request_counts.completed}/{state.request_counts.total}")
    with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=10) as resp:
        assert 'tokabatch_batches{status="in_progress"} 1' in resp.read().decode()
    client.batches.cancel(batch.id)
