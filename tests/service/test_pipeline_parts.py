"""The parts of the nightly-pipeline features that need no server: a running batch's pace and ETA,
which error lines a retry takes, the child's input, and the prefix sharing a dry run reports."""

from __future__ import annotations

import json

import pytest

from tokabatch.service.jobs.dry_run import PrefixSharing
from tokabatch.service.jobs.pace import Pace
from tokabatch.service.jobs.retry import custom_ids_to_retry, is_retryable, write_retry_input


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pace_is_the_last_minutes_output_rate_and_the_eta_follows_from_it():
    clock = Clock()
    pace = Pace(clock=clock)
    pace.sample(0)
    assert pace.throughput() is None and pace.eta_seconds(lines_left=10, lines_completed=0, output_tokens=0) is None
    for second in range(1, 121):                  # 100 tokens/s for a minute, then 300 tokens/s
        clock.now += 1.0
        pace.sample(second * 100 if second <= 60 else 6000 + (second - 60) * 300)
    assert pace.throughput() == pytest.approx(300.0)                # the first minute has left the window
    # 50 lines left at 30 tokens a line so far, at 300 tokens/s: 5 s.
    assert pace.eta_seconds(lines_left=50, lines_completed=800, output_tokens=24_000) == pytest.approx(5.0)
    assert pace.eta_seconds(lines_left=0, lines_completed=800, output_tokens=24_000) == 0.0


def test_pace_waits_for_tokens_over_a_measurable_time():
    clock = Clock()
    pace = Pace(clock=clock)
    pace.sample(0)
    clock.now += 0.5
    pace.sample(500)
    assert pace.throughput() is None                               # half a second says little
    clock.now += 10.0
    pace.sample(500)
    assert pace.throughput() == pytest.approx(500 / 10.5)


@pytest.mark.parametrize("line, retryable", [
    ({"response": {"status_code": 500, "body": {}}, "error": None}, True),         # the engine failed it
    ({"response": {"status_code": 503, "body": {}}, "error": None}, True),
    ({"response": {"status_code": 429, "body": {}}, "error": None}, True),
    ({"response": {"status_code": 400, "body": {}}, "error": None}, False),        # the line's own fault
    ({"response": {"status_code": 404, "body": {}}, "error": None}, False),
    ({"response": None, "error": {"code": "batch_expired", "message": ""}}, True),
    ({"response": None, "error": {"code": "batch_cancelled", "message": ""}}, True),
    ({"response": None, "error": {"code": "batch_failed", "message": ""}}, True),
    ({"response": None, "error": {"code": "engine_error", "message": ""}}, True),
    ({"response": None, "error": {"code": "something_else", "message": ""}}, False),
])
def test_which_error_lines_a_retry_takes(line, retryable):
    assert is_retryable({"custom_id": "a", **line}) is retryable


def test_the_child_input_is_the_parents_lines_byte_for_byte(tmp_path):
    raw = [b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "\\u00e9"}}',
           b'{"custom_id":"b","method":"POST","url":"/v1/completions","body":{"prompt":"x"}}',
           b'{"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"prompt": "y"}}']
    parent = tmp_path / "in.jsonl"
    parent.write_bytes(b"\xef\xbb\xbf" + raw[0] + b"\r\n\n" + raw[1] + b"\n" + raw[2])   # BOM, CRLF, blank, no EOL
    errors = tmp_path / "errors.jsonl"
    errors.write_text("\n".join(json.dumps(x) for x in [
        {"custom_id": "c", "response": {"status_code": 500, "body": {}}, "error": None},
        {"custom_id": "b", "response": {"status_code": 400, "body": {}}, "error": None},
        {"custom_id": "a", "response": None, "error": {"code": "batch_expired", "message": ""}}]) + "\n")
    wanted = custom_ids_to_retry(errors, include_all=False)
    assert wanted == {"a", "c"}
    child = tmp_path / "child.jsonl"
    assert write_retry_input(parent, wanted, child) == 2
    assert child.read_bytes() == raw[0] + b"\n" + raw[2] + b"\n"                      # input order
    assert custom_ids_to_retry(errors, include_all=True) == {"a", "b", "c"}


def test_prefix_sharing_counts_whole_pages_seen_before():
    sharing = PrefixSharing(page_size=4)
    system = tuple(range(100, 110))                 # 10 shared tokens: two whole pages
    sharing.add(system + (1, 2, 3))
    assert sharing.shared_tokens == 0
    sharing.add(system + (4, 5, 6))
    assert sharing.shared_tokens == 8
    sharing.add(system + (1, 2, 3))                  # the same prompt again: all but the last token's page
    assert sharing.shared_tokens == 8 + 12
    sharing.add((7,) + system)                       # shifted: nothing lines up with what was seen
    assert sharing.shared_tokens == 20
