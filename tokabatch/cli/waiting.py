"""`submit --wait`: poll a batch until it is terminal, with a live progress bar on stderr.

Owns the progress display that `submit --wait` and `run` share (completed/failed/total, tokens/s,
an ETA from measured progress only: the server's live `throughput` and `eta_seconds` when it sends
them, else the poller's own): a live bar on a terminal, else one plain line every
`--progress-every` seconds (cron logs); and the mapping from a terminal batch to the documented
exit code and its one-line reason. Talks to the server only through `ApiClient`; must not import
the service or torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text

from tokabatch.cli.client import ApiClient
from tokabatch.cli.common import (
    CliError, EXIT_BATCH_FAILED, EXIT_CANCELLED, EXIT_ERROR, EXIT_EXPIRED, EXIT_LINES_FAILED, EXIT_OK,
)

TERMINAL = ("completed", "failed", "expired", "cancelled")
PROGRESS_EVERY_S = 30.0              # without a terminal: a plain progress line this often
MIN_POLL_S = 0.01                    # --poll-interval's floor (a negative one crashed after the batch was made)
PollOpt = typer.Option(1.0, "--poll-interval", min=MIN_POLL_S, help="Seconds between status checks.")
MAX_ERRORS_SHOWN = 3
UNREACHABLE_GRACE_S = 60.0           # --wait keeps polling this long while the server is away


@dataclass
class Rates:
    """Tokens/s and lines/s over the time the batch has been observed running."""

    first_s: float | None = None
    first_tokens: int = 0
    first_lines: int = 0
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def update(self, now_s: float, output_tokens: int, done_lines: int) -> None:
        if self.first_s is None:
            self.first_s, self.first_tokens, self.first_lines = now_s, output_tokens, done_lines
        self.samples.append((now_s, output_tokens, done_lines))
        del self.samples[:-30]               # a sliding window keeps the rate current

    def tokens_per_s(self) -> float | None:
        if len(self.samples) < 2:
            return None
        (t0, k0, _), (t1, k1, _) = self.samples[0], self.samples[-1]
        return (k1 - k0) / (t1 - t0) if t1 > t0 else None

    def eta_s(self, remaining_lines: int) -> float | None:
        """Seconds left at the line rate measured so far; None until lines have finished over a
        measurable time (an estimate before any progress would be a guess)."""
        if len(self.samples) < 2 or remaining_lines <= 0:
            return None
        (t0, _, n0), (t1, _, n1) = self.samples[0], self.samples[-1]
        if n1 <= self.first_lines or t1 - t0 < MIN_ETA_BASIS_S:
            return None
        rate = (n1 - n0) / (t1 - t0)
        return remaining_lines / rate if rate > 0 else None


MIN_ETA_BASIS_S = 1.0                # seconds of measured progress an ETA needs


def format_eta(eta_s: float) -> str:
    eta = int(eta_s)
    return f"{eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}"


def progress_text(ok: int, failed: int, total: int, tok_s: float | None, eta_s: float | None) -> str:
    """'5 ok, 1 failed / 8  123.4 tok/s  ETA 0:01:02' (what the bar and the plain lines show)."""
    parts = [f"{ok} ok, {failed} failed / {total}"]
    if tok_s is not None:
        parts.append(f"{tok_s:.1f} tok/s")
    if eta_s is not None:
        parts.append(f"ETA {format_eta(eta_s)}")
    return "  ".join(parts)


class ProgressLines:
    """Without a terminal (cron, a pipe): one plain line on stderr every `every_s` seconds."""

    def __init__(self, console: Console, label: str, every_s: float = PROGRESS_EVERY_S) -> None:
        self.console, self.label, self.every_s = console, label, every_s
        self._next_s = time.monotonic() + every_s

    def update(self, status: str, text: str, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.console.is_terminal or (now < self._next_s and not force) or self.every_s <= 0:
            return
        self._next_s = now + self.every_s
        self.console.print(f"{self.label}: {status}: {text}", highlight=False, soft_wrap=True)


class StatsColumn(ProgressColumn):
    """'5 ok, 1 failed / 8  123.4 tok/s  ETA 0:01:02' from fields the poller stores on the task."""

    def render(self, task: Task) -> Text:
        f = task.fields
        return Text(progress_text(f.get("ok_lines", 0), f.get("failed_lines", 0), f.get("total_lines", 0),
                                  f.get("tok_s"), f.get("eta_s")))


def wait_for_batch(client: ApiClient, batch_id: str, *, poll_s: float = 1.0,
                   console: Console | None = None, progress_every_s: float = PROGRESS_EVERY_S) -> dict:
    """Poll until the batch is terminal; returns the final Batch object."""
    console = console or Console(stderr=True, soft_wrap=True)
    rates = Rates()
    lines = ProgressLines(console, batch_id, progress_every_s)
    progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), StatsColumn(), TimeElapsedColumn(),
                        console=console, transient=False, disable=not console.is_terminal)
    with progress:
        task = progress.add_task("validating", total=None)
        while True:
            batch = _retrieve_patiently(client, batch_id, poll_s)
            counts = batch.get("request_counts") or {}
            total = int(counts.get("total") or 0)
            completed, failed = int(counts.get("completed") or 0), int(counts.get("failed") or 0)
            output_tokens = int((batch.get("usage") or {}).get("output_tokens") or 0)
            if batch.get("status") == "in_progress":
                rates.update(time.monotonic(), output_tokens, completed + failed)
            # The server's own pace (its `throughput` and `eta_seconds` over the last minute of
            # written lines) when it gives one; else what this poller measured.
            tok_s = _first_known(batch.get("throughput"), rates.tokens_per_s())
            eta_s = _first_known(batch.get("eta_seconds"), rates.eta_s(total - completed - failed))
            progress.update(task, description=str(batch.get("status")), total=total or None,
                            completed=completed + failed, ok_lines=completed, failed_lines=failed,
                            total_lines=total, tok_s=tok_s, eta_s=eta_s)
            lines.update(str(batch.get("status")), progress_text(completed, failed, total, tok_s, eta_s))
            if batch.get("status") in TERMINAL:
                progress.refresh()
                return batch
            time.sleep(poll_s)


def _first_known(*values: float | None) -> float | None:
    return next((float(v) for v in values if v is not None), None)


def _retrieve_patiently(client: ApiClient, batch_id: str, poll_s: float) -> dict:
    """retrieve_batch, riding out a server restart of up to UNREACHABLE_GRACE_S (batches resume)."""
    deadline = time.monotonic() + UNREACHABLE_GRACE_S
    while True:
        try:
            return client.retrieve_batch(batch_id)
        except CliError as e:
            if e.code != EXIT_ERROR or time.monotonic() >= deadline:
                raise
        time.sleep(max(poll_s, 1.0))


def exit_code_for(batch: dict) -> tuple[int, str]:
    """The documented exit code of a terminal batch and a one-line reason."""
    status = batch.get("status")
    counts = batch.get("request_counts") or {}
    total, completed, failed = counts.get("total", 0), counts.get("completed", 0), counts.get("failed", 0)
    bid = batch.get("id")
    if status == "completed":
        if failed:
            return EXIT_LINES_FAILED, f"batch {bid} completed with {failed} of {total} lines failed"
        return EXIT_OK, f"batch {bid} completed: {completed} of {total} lines succeeded"
    if status == "failed":
        return EXIT_BATCH_FAILED, f"batch {bid} failed: {format_batch_errors(batch)}"
    # The error file holds the lines that failed and the lines that never ran (batch_expired,
    # batch_cancelled): `failed` counts both, so only `completed` says how far the batch got.
    if status == "expired":
        return EXIT_EXPIRED, (f"batch {bid} expired ({batch.get('completion_window')} window) with {completed} of "
                              f"{total} lines completed; the other {failed} (failed or not run) are in the error file")
    if status == "cancelled":
        return EXIT_CANCELLED, (f"batch {bid} was cancelled with {completed} of {total} lines completed; the other "
                                f"{failed} (failed or not run) are in the error file")
    return EXIT_ERROR, f"batch {bid} is {status}, not a terminal state"


def exit_with(batch: dict, console: Console) -> None:
    """End the command with the terminal batch's exit code, its reason on stderr (a warning when
    the results exist but some lines failed, an error when the batch did not complete)."""
    code, reason = exit_code_for(batch)
    if code == EXIT_OK:
        console.print(reason, highlight=False)
        return
    if code == EXIT_LINES_FAILED:
        console.print(f"warning: {reason}", style="yellow", highlight=False)
        raise typer.Exit(code)
    raise CliError(reason, code)


def format_batch_errors(batch: dict) -> str:
    """The first validation errors with their line numbers, on one line."""
    data = (batch.get("errors") or {}).get("data") or []
    if not data:
        return "no error details"
    shown = []
    for err in data[:MAX_ERRORS_SHOWN]:
        where = f"line {err['line']}" if err.get("line") is not None else "file"
        param = f" [{err['param']}]" if err.get("param") else ""
        shown.append(f"{where}: {err.get('code')}{param}: {err.get('message')}")
    more = f" (and {len(data) - MAX_ERRORS_SHOWN} more)" if len(data) > MAX_ERRORS_SHOWN else ""
    return "; ".join(shown) + more
