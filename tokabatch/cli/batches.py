"""Client commands: submit, status, list, cancel, download, files list|rm (retry: cli/pipeline.py).

Owns how batches and files are shown (rich tables by default, `--json` for scripts) and how
results are downloaded (JSONL, or Parquet by the output path's extension). Talks to a server over
HTTP only (tokabatch.cli.client); must not import the service, the engine or torch.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Column, Table

from tokabatch.cli.client import ApiClient, resolve_connection
from tokabatch.cli.common import (
    EXIT_BATCH_FAILED, EXIT_CODES_HELP, EXIT_USAGE, CliError, check_results_path, one_line_errors,
)
from tokabatch.cli.pipeline import dry_run_lines, merge_results
from tokabatch.cli.waiting import PROGRESS_EVERY_S, PollOpt, exit_with, format_batch_errors, wait_for_batch

SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_INFER_SCAN_LINES = 1000

BaseUrlOpt = typer.Option(None, "--base-url", help="Server URL including /v1 (env OPENAI_BASE_URL; "
                          "default http://127.0.0.1:8000/v1).")
ApiKeyOpt = typer.Option(None, "--api-key", help="Bearer key (env OPENAI_API_KEY).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts instead of a table.")


def _client(base_url: Optional[str], api_key: Optional[str]) -> ApiClient:
    url, key = resolve_connection(base_url, api_key)
    return ApiClient(url, key)


def errors_path_for(out: Path) -> Path:
    """Where the error lines go beside an output file: results.parquet -> results.errors.jsonl."""
    return out.with_name(out.stem + ".errors.jsonl")


def infer_endpoint(path: Path) -> str:
    """The `url` of the input's first parseable request line (the server checks the rest). The callers
    have checked the file as an upload is (`file_problem`: not empty, UTF-8, a JSON object first)."""
    with path.open("r", encoding="utf-8", errors="replace") as f:
        for i, raw in enumerate(f):
            if i >= _INFER_SCAN_LINES:
                break
            if not raw.strip():
                continue
            try:
                url = json.loads(raw).get("url")
            except (ValueError, AttributeError, RecursionError):   # RecursionError: nested too deeply
                continue
            if isinstance(url, str) and url:
                return url
    raise CliError(f"cannot infer the endpoint: no line of {path} has a \"url\"; pass --endpoint", EXIT_USAGE)


def parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--metadata takes key=value, not {pair!r}", EXIT_USAGE)
        metadata[key] = value
    return metadata


def download_results(client: ApiClient, batch: dict, out: Path) -> list[str]:
    """Write the batch's results to `out` (JSONL, or Parquet by extension) and its error lines beside it.

    Returns human notes about what was written. An all-failed batch still gets an (empty) JSONL
    output file so that pipelines find the path they asked for.
    """
    notes = []
    if out.suffix == ".parquet":
        file_id = batch.get("output_parquet_file_id")
        if not file_id and (batch.get("request_counts") or {}).get("completed"):
            raise CliError(f"batch {batch['id']} has no Parquet output (output_parquet_file_id is not set); "
                           "ask for a .jsonl output instead", EXIT_USAGE)
    else:
        file_id = batch.get("output_file_id")
    if file_id:
        client.download_file_to(file_id, out)
        notes.append(f"results: {out}")
    elif out.suffix != ".parquet":
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"")
        notes.append(f"results: {out} (empty: no line succeeded)")
    errors_out = errors_path_for(out)
    if batch.get("error_file_id"):
        client.download_file_to(batch["error_file_id"], errors_out)
        notes.append(f"failed lines: {errors_out}")
    return notes


def register(app: typer.Typer, files_app: typer.Typer) -> None:
    app.command("submit", epilog=EXIT_CODES_HELP)(submit)
    app.command("status")(status)
    app.command("list")(list_batches)
    app.command("cancel")(cancel)
    app.command("download")(download)
    files_app.command("list")(files_list)
    files_app.command("rm")(files_rm)


@one_line_errors
def submit(
    file: Path = typer.Argument(..., help="Input JSONL: one OpenAI request per line."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Default: the lines' url."),
    completion_window: str = typer.Option("24h", "--completion-window"),
    metadata: list[str] = typer.Option([], "--metadata", help="key=value, repeatable."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and price FILE on the server without running "
                                 "it: lines, prompt tokens, expected output tokens, prefix sharing, duration."),
    wait: bool = typer.Option(False, "--wait", help="Show progress until the batch ends; exit with its code."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Download results here when done (.jsonl or .parquet); implies --wait."),
    poll_s: float = PollOpt,
    progress_every_s: float = typer.Option(PROGRESS_EVERY_S, "--progress-every", metavar="SECONDS",
                                           help="With --wait and no terminal: a plain progress line this often "
                                                "(0: none)."),
    base_url: Optional[str] = BaseUrlOpt,
    api_key: Optional[str] = ApiKeyOpt,
) -> None:
    """Upload FILE, create a batch and print its id; with --wait follow it to the end (see exit codes below)."""
    if not file.is_file():
        raise CliError(f"no such file: {file}", EXIT_USAGE)
    check_results_path(output)
    from tokabatch.service.jobs.parse import file_problem

    problem = file_problem(file)                           # what the upload would be refused for, before it
    if problem is not None:
        raise CliError(f"{file}: {problem}", EXIT_USAGE)
    endpoint = endpoint or infer_endpoint(file)
    meta = parse_metadata(metadata)
    client = _client(base_url, api_key)
    uploaded = client.upload_file(file)
    if dry_run:
        _report_dry_run(client, uploaded["id"], endpoint, completion_window, meta)
        return
    batch = client.create_batch(uploaded["id"], endpoint, completion_window, meta or None)
    typer.echo(batch["id"])
    if not (wait or output is not None):
        return
    err = Console(stderr=True, soft_wrap=True)
    try:
        batch = wait_for_batch(client, batch["id"], poll_s=poll_s, console=err, progress_every_s=progress_every_s)
    except KeyboardInterrupt:
        raise CliError(f"stopped waiting; batch {batch['id']} keeps running (tokabatch status {batch['id']})",
                       130) from None
    if output is not None and batch["status"] != "failed":
        for note in download_results(client, batch, output):
            err.print(note, highlight=False)
    exit_with(batch, err)


def _report_dry_run(client: ApiClient, file_id: str, endpoint: str, completion_window: str,
                    metadata: dict[str, str]) -> None:
    """Print the server's dry-run report (the uploaded copy is deleted after); exit 4 when the file
    would fail validation, as the batch would."""
    try:
        report = client.create_batch(file_id, endpoint, completion_window, metadata or None, dry_run=True)
    finally:
        client.delete_file(file_id)
    for line in dry_run_lines(report):
        typer.echo(line)
    if not report.get("valid"):
        raise CliError(f"the batch would fail validation: {format_batch_errors(report)}", EXIT_BATCH_FAILED)


@one_line_errors
def status(batch_id: str = typer.Argument(...), as_json: bool = JsonOpt,
           base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt) -> None:
    """Show one batch."""
    batch = _client(base_url, api_key).retrieve_batch(batch_id)
    if as_json:
        typer.echo(json.dumps(batch, indent=2))
        return
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    counts = batch.get("request_counts") or {}
    usage = batch.get("usage") or {}
    rows = [("id", batch.get("id")), ("status", batch.get("status")), ("endpoint", batch.get("endpoint")),
            ("model", batch.get("model")), ("lines", _counts(counts)),
            ("tokens", _tokens(usage)),
            ("window", batch.get("completion_window")), ("created", _when(batch.get("created_at"))),
            ("expires", _when(batch.get("expires_at"))), ("input file", batch.get("input_file_id")),
            ("output file", batch.get("output_file_id")), ("error file", batch.get("error_file_id"))]
    if batch.get("output_parquet_file_id"):
        rows.append(("parquet file", batch["output_parquet_file_id"]))
    for state in ("in_progress", "finalizing", "completed", "failed", "expired", "cancelling", "cancelled"):
        if batch.get(f"{state}_at"):
            rows.append((f"{state.replace('_', ' ')}", _when(batch[f"{state}_at"])))
    if batch.get("metadata"):
        rows.append(("metadata", ", ".join(f"{k}={v}" for k, v in batch["metadata"].items())))
    for err in ((batch.get("errors") or {}).get("data") or [])[:20]:
        where = f"line {err['line']}" if err.get("line") is not None else "file"
        rows.append(("error", f"{where}: {err.get('code')}: {err.get('message')}"))
    for key, value in rows:
        table.add_row(key, "-" if value is None else str(value))
    _stdout().print(table)


@one_line_errors
def list_batches(limit: int = typer.Option(20, "--limit", min=1), as_json: bool = JsonOpt,
                 base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt) -> None:
    """List batches, newest first."""
    batches = _client(base_url, api_key).list_batches(limit)
    if as_json:
        typer.echo(json.dumps(batches, indent=2))
        return
    table = Table(Column("id", no_wrap=True), "status", "endpoint", "lines", "created")
    for b in batches:
        table.add_row(b["id"], b.get("status"), b.get("endpoint"), _counts(b.get("request_counts") or {}),
                      _when(b.get("created_at")))
    _stdout().print(table) if batches else typer.echo("no batches")


@one_line_errors
def cancel(batch_id: str = typer.Argument(...), as_json: bool = JsonOpt,
           base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt) -> None:
    """Cancel a batch (finished lines are kept; the rest go to the error file as batch_cancelled)."""
    batch = _client(base_url, api_key).cancel_batch(batch_id)
    typer.echo(json.dumps(batch, indent=2) if as_json else f"{batch['id']} {batch.get('status')}")


@one_line_errors
def download(
    object_id: str = typer.Argument(..., metavar="ID", help="A batch id (its results) or a file id (its bytes)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="Default: stdout. For a batch: .jsonl or .parquet; "
                                               "errors go beside it."),
    merge: bool = typer.Option(False, "--merge", help="With a batch and -o: its results and its retries' in one "
                               "file, each custom_id once (a retry's answer replaces the error)."),
    base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt,
) -> None:
    """Download a batch's results, or one file's content."""
    client = _client(base_url, api_key)
    if object_id.startswith("batch_"):
        check_results_path(output)      # (a file's bytes go wherever they are asked to)
    if merge:
        if output is None or not object_id.startswith("batch_"):
            raise CliError("--merge takes a batch id and -o FILE (.jsonl or .parquet)", EXIT_USAGE)
        for note in merge_results(client, object_id, output):
            typer.echo(note, err=True)
        return
    if not object_id.startswith("batch_"):
        if output is None:
            client.download_file(object_id, sys.stdout.buffer)
        else:
            client.download_file_to(object_id, output)
        return
    batch = client.retrieve_batch(object_id)
    if batch.get("status") not in ("completed", "expired", "cancelled"):
        raise CliError(f"batch {object_id} is {batch.get('status')}: it has no results to download", EXIT_USAGE)
    if output is None:
        if batch.get("output_file_id"):
            client.download_file(batch["output_file_id"], sys.stdout.buffer)
        if batch.get("error_file_id"):
            typer.echo(f"note: failed lines are in file {batch['error_file_id']} "
                       f"(tokabatch download {batch['error_file_id']})", err=True)
        return
    for note in download_results(client, batch, output):
        typer.echo(note, err=True)


@one_line_errors
def files_list(purpose: Optional[str] = typer.Option(None, "--purpose"), as_json: bool = JsonOpt,
               base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt) -> None:
    """List files, newest first."""
    files = _client(base_url, api_key).list_files(purpose)
    if as_json:
        typer.echo(json.dumps(files, indent=2))
        return
    table = Table(Column("id", no_wrap=True), "filename", "purpose", "bytes", "created")
    for f in files:
        table.add_row(f["id"], f.get("filename"), f.get("purpose"), str(f.get("bytes")), _when(f.get("created_at")))
    _stdout().print(table) if files else typer.echo("no files")


@one_line_errors
def files_rm(file_ids: list[str] = typer.Argument(..., metavar="ID..."), as_json: bool = JsonOpt,
             base_url: Optional[str] = BaseUrlOpt, api_key: Optional[str] = ApiKeyOpt) -> None:
    """Delete files."""
    client = _client(base_url, api_key)
    for file_id in file_ids:
        result = client.delete_file(file_id)
        typer.echo(json.dumps(result) if as_json else f"deleted {result.get('id', file_id)}")


def _stdout() -> Console:
    """Tables for people; piped into a file or another program they must not wrap ids at 80 columns."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _tokens(usage: dict) -> str:
    cached = (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
    return f"{usage.get('input_tokens', 0)} in ({cached} cached), {usage.get('output_tokens', 0)} out"


def _counts(counts: dict) -> str:
    return f"{counts.get('completed', 0)} ok, {counts.get('failed', 0)} failed / {counts.get('total', 0)}"


def _when(ts: Optional[int]) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(int(ts)).strftime("%Y-%m-%d %H:%M:%S")
