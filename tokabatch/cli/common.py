"""What every command shares: exit codes, the one-line error decorator, and the stderr console.

Owns the mapping from an exception to one line on stderr and an exit code. Stdlib, typer and
rich only: it must not import torch, the service or the engine (the client commands run on
machines that have neither a GPU nor a database).
"""

from __future__ import annotations

import functools
import os
import sys
import urllib.error
from pathlib import Path
from typing import Callable, TypeVar

import typer

from tokabatch.errors import TokabatchError

# Exit codes, documented in `tokabatch submit --help` and the README; cron lines rely on them.
EXIT_OK = 0                  # the batch completed and no line failed
EXIT_ERROR = 1               # anything else: server unreachable, server error, internal error
EXIT_USAGE = 2               # bad flags or bad input (missing file, rejected by the server with a 4xx)
EXIT_LINES_FAILED = 3        # the batch completed but some lines failed (see the error file)
EXIT_BATCH_FAILED = 4        # the batch failed (validation errors are printed with line numbers)
EXIT_EXPIRED = 5             # the batch expired before every line ran
EXIT_CANCELLED = 6           # the batch was cancelled
EXIT_INTERRUPTED = 130       # Ctrl-C

EXIT_CODES_HELP = (
    "Exit codes: 0 completed with no failed line; 3 completed with failed lines; 4 failed "
    "(validation errors are printed with their line numbers); 5 expired; 6 cancelled; "
    "2 usage error or bad input; 1 other errors (server unreachable, server error)."
)

F = TypeVar("F", bound=Callable)


class CliError(Exception):
    """A failure the CLI reports as one line with a chosen exit code."""

    def __init__(self, message: str, code: int = EXIT_ERROR) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def check_results_path(output: Path | None) -> None:
    """Results are written as JSONL or Parquet, chosen by the extension: anything else is a usage error."""
    if output is not None and output.suffix not in (".jsonl", ".parquet"):
        raise CliError(f"--output must end in .jsonl or .parquet, not {output.name!r}", EXIT_USAGE)


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print `error: message` on stderr (one line) and return the Exit to raise."""
    one_line = " ".join(str(message).split())
    typer.secho(f"error: {one_line}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def _connection_message(e: BaseException) -> str | None:
    """A one-line reason for a network failure, or None if `e` is not one."""
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return f"cannot reach the server: {getattr(e, 'reason', e)}"
    if isinstance(e, (ConnectionError, TimeoutError)):
        return f"cannot reach the server: {e}"
    # httpx / openai connection errors, recognised by module and name so they need not be imported
    module = type(e).__module__ or ""
    name = type(e).__name__
    if module.split(".")[0] in ("httpx", "httpx2", "httpcore", "openai") and (
        "Connect" in name or "Timeout" in name or "Network" in name
    ):
        return f"cannot reach the server: {e}"
    return None


def _exit_code_of(error: TokabatchError) -> int:
    """A 4xx-like error is the user's input (exit 2); model errors (a folder that cannot be served, a
    fetch that failed) are 1, as `tokabatch models` has always reported them."""
    return EXIT_USAGE if error.status < 500 and error.type != "model_error" else EXIT_ERROR


def _failure(e: Exception) -> typer.Exit | None:
    """The exit for an expected failure (printed as one line), or None for an unexpected one."""
    if isinstance(e, CliError):
        return fail(e.message, e.code)
    if isinstance(e, TokabatchError):
        return fail(e.message, _exit_code_of(e))
    if isinstance(e, BrokenPipeError):
        # The reader of stdout went away (`| head`): stop quietly, as other tools do. (urllib wraps
        # a broken connection to the server in URLError, so this is not the server.)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return typer.Exit(EXIT_ERROR)
    for kind, what in ((FileNotFoundError, "no such file"), (IsADirectoryError, "is a directory, not a file"),
                       (PermissionError, "permission denied")):
        if isinstance(e, kind):
            return fail(f"{what}: {e.filename or e}", EXIT_USAGE)
    reason = _connection_message(e)
    return fail(reason, EXIT_ERROR) if reason is not None else None


def one_line_errors(func: F) -> F:
    """Turn expected failures into one line on stderr and a non-zero exit code, never a traceback.

    TOKABATCH_DEBUG=1 re-raises unexpected exceptions so developers still get the traceback.
    """

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except KeyboardInterrupt:
            raise fail("interrupted", EXIT_INTERRUPTED) from None
        except Exception as e:  # the last line of defence: still one line, never a traceback
            expected = _failure(e)          # printed, when it is one
            if expected is None and os.environ.get("TOKABATCH_DEBUG"):
                raise
            raise (expected or fail(f"{type(e).__name__}: {e} (set TOKABATCH_DEBUG=1 for the traceback)",
                                    EXIT_ERROR)) from None

    return wrapper  # type: ignore[return-value]

