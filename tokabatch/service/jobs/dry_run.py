"""A dry run of a batch: what it would cost, without running it (POST /v1/batches with dry_run).

Owns the report a user reads before committing a nightly job: the file validated as the runner
validates it (the same errors, with line numbers), every line prepared as the runner prepares it
(chat template, tokenizer of the served model, the endpoint's checks), so the prompt tokens are
exactly the `usage.input_tokens` the run will report, and the lines the endpoint would reject are
counted (they become error lines, not tokens). Output tokens are expected per line from its
max_tokens and n with the engine's length predictor (EngineStats.expected_output_tokens); the
prefix sharing is the prompt tokens the prefix cache would serve, page by page, as the engine keeps
them; the duration is the expected output tokens at the output rate the recent completed batches
of this model reached (repo.recent_output_rate), or unknown before the server has finished one.
Must not import torch or aiohttp.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokabatch.engine.api import EngineStats, ModelInfo, Priority
from tokabatch.errors import TokabatchError
from tokabatch.service.jobs.parse import BatchError, validate_input_file
from tokabatch.service.jobs.render import prepare_request
from tokabatch.text import Tokenizer

MAX_REJECTIONS_SHOWN = 20


@dataclass(slots=True)
class PrefixSharing:
    """Prompt pages seen before, as the prefix cache keeps them (whole pages of a shared start)."""

    page_size: int
    shared_tokens: int = 0
    _seen: set[int] = field(default_factory=set)

    def add(self, prompt: tuple[int, ...]) -> None:
        chain = 0
        usable = len(prompt) - 1           # the last prompt token is always computed
        for start in range(0, usable - usable % self.page_size, self.page_size):
            chain = hash((chain, prompt[start:start + self.page_size]))
            if chain in self._seen:
                self.shared_tokens += self.page_size
            else:
                self._seen.add(chain)


@dataclass(slots=True)
class DryRun:
    num_lines: int = 0
    errors: list[BatchError] = field(default_factory=list)   # validation: the batch would fail with these
    num_rejected: int = 0                                    # lines the endpoint would answer with a 4xx
    rejections: list[dict[str, Any]] = field(default_factory=list)
    prompt_tokens: int = 0
    max_output_tokens: int = 0
    expected_output_tokens: float = 0.0
    shared_prompt_tokens: int = 0
    estimated_seconds: float | None = None
    throughput_basis: dict[str, Any] | None = None

    def to_dict(self, *, input_file_id: str, endpoint: str, model: str | None) -> dict[str, Any]:
        return {
            "object": "batch.dry_run", "input_file_id": input_file_id, "endpoint": endpoint, "model": model,
            "valid": not self.errors,
            "errors": {"object": "list", "data": [e.to_dict() for e in self.errors]} if self.errors else None,
            "request_counts": {"total": self.num_lines, "rejected": self.num_rejected},
            "rejections": self.rejections,
            "usage": {"input_tokens": self.prompt_tokens, "expected_output_tokens": round(self.expected_output_tokens),
                      "max_output_tokens": self.max_output_tokens},
            "prefix_sharing": {"shared_prompt_tokens": self.shared_prompt_tokens,
                               "fraction": round(self.shared_prompt_tokens / self.prompt_tokens, 4)
                               if self.prompt_tokens else 0.0},
            "estimated_seconds": None if self.estimated_seconds is None else round(self.estimated_seconds, 1),
            "throughput_basis": self.throughput_basis,
        }


def dry_run(path: Path, *, endpoint: str, served_model_names: set[str], max_lines: int, tokenizer: Tokenizer,
            model_info: ModelInfo, stats: EngineStats) -> DryRun:
    """(A worker thread.) Validate and prepare every line of `path`; the estimate is left to the caller."""
    report = DryRun()
    sharing = PrefixSharing(model_info.page_size)
    counter = itertools.count()

    def on_request(line_no: int, _offset: int, _length: int, obj: dict[str, Any]) -> None:
        try:
            prepared = prepare_request(endpoint, obj["body"], tokenizer=tokenizer, model_info=model_info,
                                       served_model_names=served_model_names, request_id=f"dry{next(counter)}",
                                       priority=Priority.BATCH)
        except TokabatchError as err:
            report.num_rejected += 1
            if len(report.rejections) < MAX_REJECTIONS_SHOWN:
                report.rejections.append({"line": line_no, "custom_id": obj["custom_id"], "status_code": err.status,
                                          "message": err.message})
            return
        for request in prepared.requests:
            sampling = request.sampling
            report.prompt_tokens += len(request.prompt_token_ids)
            report.max_output_tokens += request.n * sampling.max_tokens
            report.expected_output_tokens += request.n * stats.expected_output_tokens(
                sampling.max_tokens, runs_to_max_tokens=sampling.runs_to_max_tokens)
            sharing.add(request.prompt_token_ids)

    validation = validate_input_file(path, endpoint=endpoint, served_model_names=served_model_names,
                                     max_lines=max_lines, on_request=on_request)
    report.num_lines, report.errors = validation.num_requests, list(validation.errors)
    report.shared_prompt_tokens = sharing.shared_tokens
    return report


def estimate(report: DryRun, rate: tuple[int, float, int] | None) -> None:
    """Fill the duration from (output tokens, seconds, batches) of recent completed batches."""
    if rate is None or report.errors:
        return
    tokens, seconds, num_batches = rate
    throughput = tokens / seconds
    report.estimated_seconds = report.expected_output_tokens / throughput
    report.throughput_basis = {"output_tokens_per_second": round(throughput, 1), "batches": num_batches,
                               "output_tokens": tokens, "seconds": seconds}


__all__ = ["DryRun", "PrefixSharing", "dry_run", "estimate"]
