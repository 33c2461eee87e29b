"""`tokabatch run FILE -o OUT`: a whole batch job in this process, no server, resumable.

Owns the command: it resolves the model, starts the engine in-process (EngineClient in-process
mode: the model loads in this process, so this command imports torch through the engine factory),
shows a progress bar, and maps the outcome to the same exit codes as `submit --wait`. The job
itself (validation, execution, resume, writing) is run_job.py.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tokabatch.cli.batches import infer_endpoint
from tokabatch.cli.common import (
    EXIT_BATCH_FAILED, EXIT_CODES_HELP, EXIT_ERROR, EXIT_LINES_FAILED, EXIT_USAGE, CliError, one_line_errors,
)
from tokabatch.cli.waiting import format_batch_errors


def register(app: typer.Typer) -> None:
    app.command("run", epilog=EXIT_CODES_HELP)(run)


@one_line_errors
def run(
    file: Path = typer.Argument(..., help="Input JSONL: one OpenAI request per line."),
    output: Path = typer.Option(..., "--output", "-o", help="out.jsonl or out.parquet; failed lines go to "
                                "<out stem>.errors.jsonl. Re-run with the same path to resume."),
    model: str = typer.Option("demo", "--model", help="An HF model folder, or 'demo'."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model name the lines must use (default: the folder's name)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32 or bfloat16."),
    endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Default: the lines' url."),
    max_batch_lines: int = typer.Option(50_000, "--max-batch-lines"),
    engine_factory: Optional[str] = typer.Option(None, "--engine-factory", hidden=True,
                                                 help="module:function building the StepLoop from engine_config= (tests, benchmarks)."),
) -> None:
    """Run every line of FILE on the model in this process (no server) and write OpenAI result lines."""
    if not file.is_file():
        raise CliError(f"no such file: {file}", EXIT_USAGE)
    if output.suffix not in (".jsonl", ".parquet"):
        raise CliError(f"--output must end in .jsonl or .parquet, not {output.name!r}", EXIT_USAGE)
    from tokabatch import model_store
    from tokabatch.cli import run_job
    from tokabatch.config import load_config

    endpoint = endpoint or infer_endpoint(file)
    served = model_store.served_model_name(model, served_model_name)
    report, spans = run_job.validate(file, endpoint=endpoint, served_model_names={served},
                                     max_lines=max_batch_lines)
    if not report.ok:
        batch = {"errors": {"data": [e.to_dict() for e in report.errors]}}
        raise CliError(f"{file} failed validation: {format_batch_errors(batch)}", EXIT_BATCH_FAILED)
    config = load_config(model={"path": model, "dtype": dtype, "served_model_name": served_model_name})
    model_path = model_store.resolve_model_path(model)
    err = Console(stderr=True, soft_wrap=True)
    started = time.monotonic()
    try:
        progress = asyncio.run(_run_async(file, output, config=config, model_path=model_path, endpoint=endpoint,
                                          served=served, total=report.num_requests, engine_factory=engine_factory,
                                          console=err, spans=spans))
    except KeyboardInterrupt:
        raise CliError("interrupted; the lines written so far are kept: re-run the same command to resume",
                       130) from None
    errors = run_job.finalize(output)
    elapsed = time.monotonic() - started
    summary = (f"{progress.completed} succeeded, {progress.failed} failed, {progress.skipped} already done "
               f"of {progress.total} in {elapsed:.1f} s ({progress.output_tokens / max(elapsed, 1e-9):.1f} tok/s); "
               f"results: {output}" + (f"; failed lines: {errors}" if errors else ""))
    if errors:
        err.print(f"warning: {summary}", style="yellow", highlight=False)
        raise typer.Exit(EXIT_LINES_FAILED)
    err.print(summary, highlight=False)


async def _run_async(file: Path, output: Path, *, config, model_path: Path, endpoint: str, served: str,
                     total: int, engine_factory: Optional[str], console: Console, spans: list):
    from tokabatch.cli import run_job
    from tokabatch.engine.client import EngineClient
    from tokabatch.service.jobs.feed import EngineFailed
    from tokabatch.text import Tokenizer

    tokenizer = Tokenizer.from_folder(model_path)
    import dataclasses

    engine_config = dataclasses.replace(config.engine, loop_factory=engine_factory,
                                        model=dataclasses.replace(config.engine.model, path=str(model_path)))
    engine = await EngineClient.from_config(engine_config, in_process=True)
    bar = Progress(TextColumn("run"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[detail]}"),
                   TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not console.is_terminal)
    started = time.monotonic()

    def show(p: "run_job.JobProgress") -> None:
        rate = p.output_tokens / max(time.monotonic() - started, 1e-9)
        bar.update(task, completed=p.skipped + p.completed + p.failed,
                   detail=f"{p.failed} failed  {rate:.1f} tok/s")

    progress = run_job.JobProgress(total=total, on_change=show)
    try:
        with bar:
            task = bar.add_task("run", total=total, detail="")
            return await run_job.execute(file, output, engine=engine, tokenizer=tokenizer, endpoint=endpoint,
                                         served_model_names={served}, progress=progress, spans=spans)
    except EngineFailed as e:
        raise CliError(f"{e}; {progress.completed + progress.failed} lines were written to {output.name} "
                       "and its error file: re-run the same command to resume", EXIT_ERROR) from None
    finally:
        await engine.close()
