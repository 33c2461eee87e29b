"""`tokabatch run FILE -o OUT`: a whole batch job in this process, no server, resumable.

Owns the command: it resolves the model (a bad --model is named first), starts the engine
in-process (EngineClient in-process mode: the model loads in this process, so this command imports
torch through the engine factory) unless every line is already written, shows progress (a bar on
a terminal, plain lines for cron), stops cleanly on SIGINT/SIGTERM (exit 130/143), and maps the
outcome to the same exit codes as `submit --wait`. The job itself (validation, execution, resume,
writing) is run_job.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from tokabatch.cli.batches import infer_endpoint
from tokabatch.cli.common import (
    EXIT_BATCH_FAILED, EXIT_CODES_HELP, EXIT_ERROR, EXIT_INTERRUPTED, EXIT_LINES_FAILED, EXIT_USAGE, CliError,
    check_results_path, one_line_errors,
)
from tokabatch.cli.waiting import (
    PROGRESS_EVERY_S, ProgressLines, Rates, StatsColumn, format_batch_errors, progress_text,
)


if TYPE_CHECKING:
    from tokabatch.cli import run_job


def register(app: typer.Typer) -> None:
    app.command("run", epilog=EXIT_CODES_HELP)(run)


@one_line_errors
def run(
    file: Path = typer.Argument(..., help="Input JSONL: one OpenAI request per line."),
    output: Path = typer.Option(..., "--output", "-o", help="out.jsonl or out.parquet; failed lines go to "
                                "<out stem>.errors.jsonl. Re-run with the same path to resume."),
    model: str = typer.Option("demo", "--model", help="An HF model folder, or 'demo'."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model name the lines must use "
                                                         "(default: the folder's name)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32 or bfloat16."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Default: the lines' url."),
    max_batch_lines: int = typer.Option(50_000, "--max-batch-lines"),
    progress_every_s: float = typer.Option(PROGRESS_EVERY_S, "--progress-every", metavar="SECONDS",
                                           help="Without a terminal: a plain progress line this often (0: none)."),
    engine_factory: Optional[str] = typer.Option(None, "--engine-factory", hidden=True,
                                                 help="module:function building the StepLoop from "
                                                      "engine_config= (tests, benchmarks)."),
) -> None:
    """Run every line of FILE on the model in this process (no server) and write OpenAI result lines."""
    if not file.is_file():
        raise CliError(f"no such file: {file}", EXIT_USAGE)
    check_results_path(output)
    from tokabatch import model_store
    from tokabatch.cli import run_job
    from tokabatch.config import load_config

    from tokabatch.service.jobs.parse import file_problem

    model_path = model_store.resolve_model_path(model)     # a bad --model is named before the file is read
    problem = file_problem(file)                           # what an upload of the file would be refused for
    if problem is not None:
        raise CliError(f"{file}: {problem}", EXIT_USAGE)
    endpoint = endpoint or infer_endpoint(file)
    served = model_store.served_model_name(model, served_model_name)
    report, spans = run_job.validate(file, endpoint=endpoint, served_model_names={served},
                                     max_lines=max_batch_lines)
    if not report.ok:
        batch = {"errors": {"data": [e.to_dict() for e in report.errors]}}
        raise CliError(f"{file} failed validation: {format_batch_errors(batch)}", EXIT_BATCH_FAILED)
    config = load_config(model={"path": model, "dtype": dtype, "served_model_name": served_model_name})
    err = Console(stderr=True, soft_wrap=True)
    started = time.monotonic()
    done = run_job.count_done(file, output)
    if done >= report.num_requests:        # a finished job run again: no engine, only the final files
        progress = run_job.JobProgress(total=report.num_requests, skipped=done)
    else:
        progress = _run_engine(file, output, config=config, model_path=model_path, endpoint=endpoint,
                               served=served, total=report.num_requests, engine_factory=engine_factory,
                               console=err, spans=spans, progress_every_s=progress_every_s)
    errors = run_job.finalize(output)
    elapsed = time.monotonic() - started
    summary = (f"{progress.completed} succeeded, {progress.failed} failed, {progress.skipped} already done "
               f"of {progress.total} in {elapsed:.1f} s ({progress.output_tokens / max(elapsed, 1e-9):.1f} tok/s); "
               f"results: {output}" + (f"; failed lines: {errors}" if errors else ""))
    if errors:
        err.print(f"warning: {summary}", style="yellow", highlight=False)
        raise typer.Exit(EXIT_LINES_FAILED)
    err.print(summary, highlight=False)


class _Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _run_engine(file: Path, output: Path, **kwargs) -> "run_job.JobProgress":
    """The job on an engine in this process. Ctrl-C (SIGINT) or SIGTERM stops feeding, lets the
    engine finish its step and close, and exits 130 or 143; a second signal exits at once."""
    try:
        return asyncio.run(_run_async(file, output, **kwargs))
    except _Interrupted as e:
        raise CliError("interrupted; the lines written so far are kept: re-run the same command to resume",
                       128 + e.signum) from None
    except KeyboardInterrupt:            # before the signal handlers were in place
        raise CliError("interrupted; the lines written so far are kept: re-run the same command to resume",
                       EXIT_INTERRUPTED) from None


def _on_stop_signals(task: asyncio.Task) -> list[int]:
    """SIGINT/SIGTERM cancel `task` (the signal is recorded in the returned list); a second one exits now."""
    received: list[int] = []

    def handle(signum: int) -> None:
        if received:
            os._exit(128 + signum)       # asked twice: the lines written so far are on disk already
        received.append(signum)
        task.cancel()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, handle, signum)
    return received


async def _run_async(file: Path, output: Path, *, config, model_path: Path, endpoint: str, served: str,
                     total: int, engine_factory: Optional[str], console: Console, spans: list,
                     progress_every_s: float) -> "run_job.JobProgress":
    import dataclasses

    from tokabatch.cli import run_job
    from tokabatch.engine.client import EngineClient
    from tokabatch.service.jobs.feed import EngineFailed
    from tokabatch.text import Tokenizer

    task = asyncio.current_task()
    assert task is not None
    received = _on_stop_signals(task)
    tokenizer = Tokenizer.from_folder(model_path)
    engine_config = dataclasses.replace(config.engine, loop_factory=engine_factory,
                                        model=dataclasses.replace(config.engine.model, path=str(model_path)))
    engine = None
    progress = run_job.JobProgress(total=total)
    try:
        engine = await EngineClient.from_config(engine_config, in_process=True)
        bar = Progress(TextColumn("run"), BarColumn(), StatsColumn(), TimeElapsedColumn(), console=console,
                       disable=not console.is_terminal)
        lines = ProgressLines(console, "run", progress_every_s)
        rates = Rates()

        def show(p: "run_job.JobProgress") -> None:
            done = p.completed + p.failed
            rates.update(time.monotonic(), p.output_tokens, done)
            tok_s, eta_s = rates.tokens_per_s(), rates.eta_s(p.total - p.skipped - done)
            bar.update(task_id, completed=p.skipped + done, ok_lines=p.skipped + p.completed, failed_lines=p.failed,
                       total_lines=p.total, tok_s=tok_s, eta_s=eta_s)
            lines.update("running", progress_text(p.skipped + p.completed, p.failed, p.total, tok_s, eta_s))

        progress.on_change = show
        with bar:
            task_id = bar.add_task("run", total=total)
            return await run_job.execute(file, output, engine=engine, tokenizer=tokenizer, endpoint=endpoint,
                                         served_model_names={served}, progress=progress, spans=spans)
    except EngineFailed as e:
        raise CliError(f"{e}; {progress.completed + progress.failed} lines were written to {output.name} "
                       "and its error file: re-run the same command to resume", EXIT_ERROR) from None
    except asyncio.CancelledError:
        if received:
            raise _Interrupted(received[0]) from None
        raise
    finally:
        if engine is not None:
            await engine.close()
