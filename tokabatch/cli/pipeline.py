"""For the nightly pipeline: `retry`, `download --merge` and `submit --dry-run`'s report.

Owns how a batch's family (the batch and the retries of its failed lines, and theirs) becomes one
result with each custom_id once: a line's answer is its first success in the family, else its
newest error, at the place the first batch put it. JSONL merges the families' output and error
files; Parquet merges their Parquet files (pyarrow), each row keeping the first batch's `line`.
Talks to a server over HTTP only (tokabatch.cli.client); must not import the service or torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from tokabatch.cli.client import ApiClient
from tokabatch.cli.common import EXIT_CODES_HELP, EXIT_USAGE, CliError, check_results_path, one_line_errors
from tokabatch.cli.waiting import PROGRESS_EVERY_S, PollOpt, exit_with, format_eta, wait_for_batch

ENDED_WITH_RESULTS = ("completed", "expired", "cancelled")


def family(client: ApiClient, batch_id: str) -> list[dict]:
    """The batch, then its retries and theirs, oldest first within each generation."""
    batches = [client.retrieve_batch(batch_id)]
    i = 0
    while i < len(batches):
        batches += sorted(client.list_retries(batches[i]["id"]), key=lambda b: (b["created_at"], b["id"]))
        i += 1
    return batches


def _succeeded(line: dict) -> bool:
    return line.get("error") is None and 200 <= ((line.get("response") or {}).get("status_code") or 0) < 300


def merge_jsonl(client: ApiClient, batches: list[dict], out: Path) -> tuple[int, int]:
    """Write the family's lines to `out`, each custom_id once; returns (succeeded, failed)."""
    chosen: dict[str, tuple[bool, bytes]] = {}
    with tempfile.TemporaryDirectory(prefix="tokabatch-merge-") as tmp:
        for batch in batches:
            for key in ("output_file_id", "error_file_id"):
                if not batch.get(key):
                    continue
                path = Path(tmp) / batch[key]
                client.download_file_to(batch[key], path)
                with path.open("rb") as f:
                    for raw in f:
                        if not raw.strip():
                            continue
                        line = json.loads(raw)
                        ok = _succeeded(line)
                        earlier = chosen.get(line["custom_id"])
                        if earlier is None or not earlier[0]:     # a success stays; an error gives way
                            chosen[line["custom_id"]] = (ok, raw.rstrip(b"\r\n") + b"\n")
    _write_atomically(out, b"".join(raw for _, raw in chosen.values()))
    succeeded = sum(ok for ok, _ in chosen.values())
    return succeeded, len(chosen) - succeeded


def merge_parquet(client: ApiClient, batches: list[dict], out: Path) -> tuple[int, int]:
    """The Parquet form of merge_jsonl: one row per custom_id, with the first batch's line number."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="tokabatch-merge-") as tmp:
        tables = []
        for batch in batches:
            if not batch.get("output_parquet_file_id"):
                continue
            path = Path(tmp) / f"{batch['id']}.parquet"
            client.download_file_to(batch["output_parquet_file_id"], path)
            tables.append(pq.read_table(path))
    if not tables:
        raise CliError(f"batch {batches[0]['id']} has no Parquet output to merge", EXIT_USAGE)
    chosen: dict[str, tuple[bool, int]] = {}      # custom_id -> (succeeded, row in the concatenated table)
    first_line: dict[str, int] = {}
    offset = 0
    for table in tables:
        ids, codes, lines = (table.column(n).to_pylist() for n in ("custom_id", "status_code", "line"))
        for row, (custom_id, code, line_no) in enumerate(zip(ids, codes, lines)):
            first_line.setdefault(custom_id, line_no)
            ok = code is not None and 200 <= code < 300
            earlier = chosen.get(custom_id)
            if earlier is None or not earlier[0]:
                chosen[custom_id] = (ok, offset + row)
        offset += table.num_rows
    merged = pa.concat_tables(tables, promote_options="default").take([row for _, row in chosen.values()])
    merged = merged.set_column(merged.schema.get_field_index("line"), "line",
                               pa.array([first_line[c] for c in chosen], pa.int64()))
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.part")
    pq.write_table(merged, temp)
    os.replace(temp, out)
    succeeded = sum(ok for ok, _ in chosen.values())
    return succeeded, len(chosen) - succeeded


def merge_results(client: ApiClient, batch_id: str, out: Path) -> list[str]:
    """`download --merge`: the family's results in `out` (.jsonl or .parquet); returns notes."""
    batches = family(client, batch_id)
    running = [b for b in batches if b.get("status") not in (*ENDED_WITH_RESULTS, "failed")]
    if running:
        raise CliError(f"batch {running[0]['id']} is still {running[0]['status']}; merge once it has ended",
                       EXIT_USAGE)
    merge = merge_parquet if out.suffix == ".parquet" else merge_jsonl
    succeeded, failed = merge(client, batches, out)
    return [f"merged {len(batches)} batch(es) into {out}: {succeeded} lines succeeded, {failed} failed"]


def _write_atomically(out: Path, data: bytes) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    temp = out.with_name(f".{out.name}.part")
    temp.write_bytes(data)
    os.replace(temp, out)


def dry_run_lines(report: dict) -> list[str]:
    """What `submit --dry-run` prints about the server's report."""
    counts, usage, sharing = report["request_counts"], report["usage"], report["prefix_sharing"]
    lines = [f"lines: {counts['total']}" + (f" ({counts['rejected']} would be rejected by the endpoint)"
                                             if counts["rejected"] else ""),
             f"prompt tokens: {usage['input_tokens']} ({sharing['shared_prompt_tokens']} shared by prompt prefixes, "
             f"{sharing['fraction']:.0%})",
             f"output tokens: about {usage['expected_output_tokens']} expected, at most {usage['max_output_tokens']}"]
    basis = report.get("throughput_basis")
    if report.get("estimated_seconds") is not None and basis:
        lines.append(f"estimated duration: {format_eta(report['estimated_seconds'])} at "
                     f"{basis['output_tokens_per_second']:.0f} output tok/s (the last {basis['batches']} completed "
                     "batch(es) of this model)")
    elif report.get("valid"):
        lines.append("estimated duration: unknown until this server has completed a batch of this model")
    for rejection in report.get("rejections") or []:
        lines.append(f"line {rejection['line']} would fail ({rejection['status_code']}): {rejection['message']}")
    return lines


@one_line_errors
def retry(
    batch_id: str = typer.Argument(..., help="A finished batch whose failed lines to run again."),
    include_all: bool = typer.Option(False, "--all", help="Also the lines rejected for what they ask (4xx)."),
    wait: bool = typer.Option(False, "--wait", help="Follow the retry to its end; exit with its code."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="When it ends, write the merged results "
                                          "of BATCH_ID and its retries here (.jsonl or .parquet); implies --wait."),
    poll_s: float = PollOpt,
    progress_every_s: float = typer.Option(PROGRESS_EVERY_S, "--progress-every", metavar="SECONDS",
                                           help="With --wait and no terminal: a plain progress line this often."),
    base_url: Optional[str] = typer.Option(None, "--base-url", help="Server URL including /v1 (env OPENAI_BASE_URL)."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Bearer key (env OPENAI_API_KEY)."),
) -> None:
    """Run a finished batch's failed lines again as a new batch (engine errors, expired and cancelled
    lines; with --all every failed line) and print its id."""
    from tokabatch.cli.client import resolve_connection

    check_results_path(output)
    client = ApiClient(*resolve_connection(base_url, api_key))
    child = client.retry_batch(batch_id, include_all=include_all)
    typer.echo(child["id"])
    if not (wait or output is not None):
        return
    err = Console(stderr=True, soft_wrap=True)
    child = wait_for_batch(client, child["id"], poll_s=poll_s, console=err, progress_every_s=progress_every_s)
    if output is not None:
        for note in merge_results(client, batch_id, output):
            err.print(note, highlight=False)
    exit_with(child, err)


def register(app: typer.Typer) -> None:
    app.command("retry", epilog=EXIT_CODES_HELP)(retry)


__all__ = ["dry_run_lines", "family", "merge_jsonl", "merge_parquet", "merge_results", "register", "retry"]
