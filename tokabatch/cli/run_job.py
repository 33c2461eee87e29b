"""`tokabatch run` without a server: validate, execute every line on an engine, write OpenAI lines.

Owns the one-process job around the batch runner's own feeding core (jobs/feed.py: prepare, order,
generate, gather, write): the same validation and prompt order (jobs/parse, jobs/ordering), the
same request preparation and response bodies (jobs/render), and the same writer
(jobs/outputs.ResultWriter), so the output lines, the error lines and the Parquet rows are exactly a
batch's. The writer's work folder `.<out name>.tokabatch/` beside the output is the checkpoint: a
re-run with the same output path skips every custom_id already written (each appears exactly once),
and a finished job re-run is a no-op that rewrites the final files. The folder records the input's
sha256, so results of a different input are never mixed in.

An engine failure (the engine died, 5xx engine_error) stops the job WITHOUT writing the affected
lines, so the next run retries them. Requests the endpoint rejects (a 4xx) are results: they go to
the error file, as in a batch. Must not import torch itself (the engine is passed in).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from tokabatch.config import RunnerConfig
from tokabatch.engine.api import Engine
from tokabatch.errors import TokabatchError
from tokabatch.service.jobs import ordering, outputs, parse
from tokabatch.service.jobs.feed import Feed, OnEngineFailure, Span

if TYPE_CHECKING:
    from tokabatch.text import Tokenizer

INPUT_MARKER = "input.json"


class InputChanged(TokabatchError):
    """The output path holds results of another input file."""


def errors_path_for(out: Path) -> Path:
    """Failed lines beside the output: results.parquet -> results.errors.jsonl."""
    return out.with_name(out.stem + ".errors.jsonl")


def work_dir_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.tokabatch")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def open_writer(input_path: Path, out: Path) -> tuple[outputs.ResultWriter, outputs.ResumeState]:
    """The checkpointed writer for `out`, refusing a work folder that belongs to another input."""
    work = work_dir_for(out)
    marker = {"input": str(input_path.resolve()), "sha256": _sha256(input_path)}
    marker_path = work / INPUT_MARKER
    if marker_path.is_file():
        previous = json.loads(marker_path.read_text(encoding="utf-8"))
        if previous.get("sha256") != marker["sha256"]:
            raise InputChanged(f"{out} holds results of another input ({previous.get('input')}); "
                               f"delete {work} to start over or choose another --output", param="output")
    work.mkdir(parents=True, exist_ok=True)
    marker_path.write_text(json.dumps(marker) + "\n", encoding="utf-8")
    writer = outputs.ResultWriter(work)
    return writer, writer.open()


def count_done(input_path: Path, out: Path) -> int:
    """How many lines of `input_path` the checkpoint of `out` already holds (0 without one)."""
    if not (work_dir_for(out) / INPUT_MARKER).is_file():
        return 0
    writer, resumed = open_writer(input_path, out)
    writer.close()
    return len(resumed.done_custom_ids)


@dataclass
class JobProgress:
    """What the progress bar shows; `on_change` is called after every written line."""

    total: int = 0
    skipped: int = 0
    completed: int = 0
    failed: int = 0
    output_tokens: int = 0
    on_change: Callable[["JobProgress"], None] = field(default=lambda p: None, repr=False)


def validate(input_path: Path, *, endpoint: str, served_model_names: set[str],
             max_lines: int) -> tuple[parse.ValidationReport, list[Span]]:
    """The batch's validation, and the file-level prompt order built in the same pass (ordering.py)."""
    collector = ordering.SpanCollector()
    report = parse.validate_input_file(input_path, endpoint=endpoint, served_model_names=served_model_names,
                                       max_lines=max_lines, on_request=collector.add)
    return report, (collector.spans() if report.ok else [])


async def execute(input_path: Path, out: Path, *, engine: Engine, tokenizer: Tokenizer, endpoint: str,
                  served_model_names: set[str], progress: JobProgress, spans: list[Span] | None = None,
                  order_window: int = RunnerConfig().order_window) -> JobProgress:
    """Run every not-yet-written line of an already validated file (in `spans` order, as the batch
    runner feeds it); append results as they finish. Raises EngineFailed when the engine fails a line."""
    writer, resumed = open_writer(input_path, out)
    try:
        progress.skipped = len(resumed.done_custom_ids)
        progress.on_change(progress)

        def count(ok: bool, tokens: int) -> None:
            progress.completed += ok
            progress.failed += not ok
            progress.output_tokens += tokens
            progress.on_change(progress)

        feed = Feed(engine, tokenizer, endpoint=endpoint, served_model_names=served_model_names, writer=writer,
                    order_window=order_window, on_engine_failure=OnEngineFailure.STOP, on_written=count)
        await feed.run(input_path, spans)
        return progress
    finally:
        writer.close()


def finalize(out: Path) -> Path | None:
    """Write the final files from the checkpoint: `out` (JSONL copy or Parquet) and the error file.

    Returns the error file's path, or None when no line failed (a stale one is removed)."""
    work = work_dir_for(out)
    src_output, src_errors = work / outputs.OUTPUT_NAME, work / outputs.ERROR_NAME
    tmp = out.with_name(f".{out.name}.tmp")
    if out.suffix == ".parquet":
        outputs.write_parquet(work / outputs.ROWS_NAME, tmp)
    else:
        shutil.copyfile(src_output, tmp) if src_output.is_file() else tmp.write_bytes(b"")
    os.replace(tmp, out)
    errors = errors_path_for(out)
    if src_errors.is_file() and src_errors.stat().st_size > 0:
        shutil.copyfile(src_errors, errors)
        return errors
    errors.unlink(missing_ok=True)
    return None
