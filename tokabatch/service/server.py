"""`tokabatch serve`: migrations, store, engine process, batch runner and HTTP, with a clean stop.

Owns the process's lifetimes and their order: start database -> engine -> runner -> HTTP, stop in
reverse on SIGINT/SIGTERM (HTTP first so no request lands on a closed store). The stop is graceful:
the runner stops feeding at once and lets the lines in flight finish while HTTP lets the requests in
flight finish, each for up to `shutdown_grace_s`; then claims are released, the engine process is
closed, and the process exits 0. A second signal exits at once (the written lines are kept, the
lease lapses). `config.server.role` picks what this process runs over the shared database: all of
it, the API alone (`api`: no engine; the model folder's config and tokenizer serve dry runs), or a
worker (`worker`: engine, batch runner and online endpoints, no Files or Batch API). The engine runs in
its own process (engine/supervisor.start_engine); this module never imports torch. `engine_factory` and
`runner_factory` let tests swap either part.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from typing import Any, Awaitable, Callable, Protocol

from aiohttp import web

from tokabatch.config import Config
from tokabatch.engine.api import Engine, ModelInfo
from tokabatch.engine.supervisor import start_engine
from tokabatch.model_store import read_eos_token_ids, served_model_name
from tokabatch.text import Tokenizer
from tokabatch.service.app import make_app
from tokabatch.service.http.context import BATCH_CREATED, BLOBS, CLOCK, DB, MODELS, PROBLEMS, ServedModels
from tokabatch.service.http import metrics, online
from tokabatch.service.jobs.webhooks import WebhookSender
from tokabatch.service.storage import db as dbmod
from tokabatch.service.storage.blobs import BlobStore

log = logging.getLogger(__name__)
ROLE_NAMES = {"all": "API, engine and batch runner", "api": "API only: workers run the batches",
              "worker": "worker: engine, batch runner and online endpoints"}


class Runner(Protocol):
    """What serve() needs from the batch runner: start claiming work, look now, and stop cleanly."""

    async def start(self) -> None: ...

    def wake(self) -> None:
        """A batch was created: look for work now."""
        ...

    def health(self) -> str | None:
        """None while it works; else why it does not."""
        ...

    def begin_stop(self) -> None:
        """Claim nothing more and start draining the work in flight (stop() then waits for it)."""
        ...

    async def stop(self) -> None: ...


EngineFactory = Callable[[Config], Awaitable[Engine]]
RunnerFactory = Callable[[Config, dbmod.Database, BlobStore, Engine], Runner]


async def default_engine_factory(config: Config) -> Engine:
    """The real engine in its own process, started again whenever it dies."""
    return await start_engine(config.engine)


class _RunnerTask:
    """Adapts BatchRunner (run_forever/stop) to start/stop: run_forever runs as a task whose
    failure is re-raised at stop (never a background exception nobody awaits)."""

    def __init__(self, runner: Any) -> None:
        self.runner = runner
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.task = asyncio.create_task(self.runner.run_forever(), name="batch-runner")

    def wake(self) -> None:
        self.runner.wake()

    def health(self) -> str | None:
        if self.task is not None and self.task.done():
            return "the batch runner stopped"
        return self.runner.health()

    def begin_stop(self) -> None:
        self.runner.begin_stop()

    async def stop(self) -> None:
        if self.task is None:
            return
        if not self.task.done():
            await self.runner.stop()
        await self.task


def load_tokenizer(config: Config) -> Tokenizer:
    """The served model's tokenizer (torch-free): the service tokenizes, the engine gets token ids."""
    from tokabatch.model_store import resolve_model_path

    return Tokenizer.from_folder(resolve_model_path(config.engine.model.path))


def default_runner_factory(config: Config, db: dbmod.Database, blobs: BlobStore, engine: Engine) -> Runner:
    """The BatchRunner of service/jobs/runner.py with the model's tokenizer (torch-free)."""
    from tokabatch.service.jobs.runner import BatchRunner

    tokenizer = load_tokenizer(config)
    runner = BatchRunner(config.runner, db, blobs, engine, tokenizer, set(served_model_names(config, engine)),
                         max_batch_lines=config.server.max_batch_lines)
    return _RunnerTask(runner)


def folder_model(config: Config) -> tuple[ModelInfo, Tokenizer]:
    """The served model as an API node sees it, without an engine or weights: its name, its limits
    from config.json and its tokenizer (what dry runs need; their output estimate has no length
    history here, so it counts every line's max_tokens)."""
    from tokabatch.model_store import resolve_model_path

    model = config.engine.model
    folder = resolve_model_path(model.path)
    spec = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    tokenizer = Tokenizer.from_folder(folder)
    info = ModelInfo(model_id=served_model_name(model.path, model.served_model_name),
                     context_length=int(spec["max_position_embeddings"]), vocab_size=int(spec["vocab_size"]),
                     eos_token_ids=read_eos_token_ids(folder, spec) or tokenizer.eos_token_ids,
                     page_size=config.engine.scheduler.page_size, device="none (API node)", dtype=model.dtype)
    return info, tokenizer


def served_model_names(config: Config, engine: Engine) -> tuple[str, ...]:
    """The one name clients use: the engine's (`--served-model-name`, else the folder's name, or
    `demo` for the demo model). /v1/models lists it and request bodies must name it."""
    return (engine.info.model_id,)


def _install_stop_signals(stop: asyncio.Event) -> Callable[[], None]:
    """The first SIGINT/SIGTERM sets `stop` (a graceful stop); a second one exits at once."""
    loop = asyncio.get_running_loop()
    installed = []

    def on_signal(sig: signal.Signals) -> None:
        if not stop.is_set():
            stop.set()
            return
        log.warning("tokabatch: %s again, exiting now; written lines are kept and the claim's lease "
                    "lapses for the next start", sig.name)
        logging.shutdown()
        os._exit(128 + sig.value)

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)

    def remove() -> None:
        for sig in installed:
            loop.remove_signal_handler(sig)

    return remove


async def serve_async(
    config: Config,
    *,
    engine_factory: EngineFactory | None = None,
    runner_factory: RunnerFactory | None = None,
    stop: asyncio.Event | None = None,
    on_started: Callable[[int], Any] | None = None,
) -> None:
    """Run until `stop` is set (or SIGINT/SIGTERM). `on_started(port)` is called once HTTP listens.

    Everything the app owns lives in its cleanup contexts, entered in order at start (the database
    and the expiry sweep of make_app, then the engine, the batch runner and the webhook sender) and
    left in reverse after the HTTP site has stopped, so no request lands on a closed store."""
    stop = stop or asyncio.Event()
    remove_signals = _install_stop_signals(stop)
    role = config.server.role
    runners: list[Runner] = []
    if role == "api":         # no engine here: the model's folder gives its name, tokenizer and limits
        info, tokenizer = folder_model(config)
        app = make_app(config, engine_info=info)
        app[online.TOKENIZER] = tokenizer        # dry runs prepare every line with it
    else:
        app = make_app(config, api_routes=role == "all")
        app.cleanup_ctx.append(_engine_context(config, engine_factory or default_engine_factory))
        app.cleanup_ctx.append(_runner_context(config, runner_factory or default_runner_factory, runners))
        app.add_routes(online.routes)
    app.cleanup_ctx.append(_webhook_context(config))
    metrics.install(app)
    # Online requests in flight at the stop may finish within the same grace as batch lines.
    # handler_cancellation stays off (aiohttp's default): an upload must not stop between its blob and
    # its row; the online endpoints watch their clients themselves (http/online.py).
    app_runner = web.AppRunner(app, handle_signals=False, access_log=None,   # middleware logs requests
                               shutdown_timeout=config.runner.shutdown_grace_s, handler_cancellation=False)
    try:
        await asyncio.to_thread(app[BLOBS].check)     # a bucket that cannot be used fails the start, in one line
        await app_runner.setup()
        site = web.TCPSite(app_runner, config.server.host, config.server.port)
        await site.start()
        port = app_runner.addresses[0][1]
        log.info("tokabatch listening on http://%s:%s/v1 (%s)", config.server.host, port, ROLE_NAMES[role])
        if on_started is not None:
            on_started(port)
        await stop.wait()
        log.info("tokabatch shutting down (in-flight work may finish for %.0f s; a second signal exits now)",
                 config.runner.shutdown_grace_s)
        for runner in runners:
            runner.begin_stop()      # batch lines drain while HTTP stops
    finally:
        await app_runner.cleanup()
        remove_signals()


def _engine_context(config: Config, factory: EngineFactory):
    """The engine (a process of its own, started again when it dies), the names it serves under and
    the tokenizer the online endpoints prepare requests with."""

    async def engine_context(app: web.Application):
        engine = await factory(config)
        try:
            app[MODELS] = ServedModels(names=served_model_names(config, engine), info=engine.info,
                                       created_at=int(app[CLOCK]()))
            # Online completions share the engine with batch work (at ONLINE priority); /metrics reads both.
            app[online.ENGINE] = engine
            app[online.TOKENIZER] = await asyncio.to_thread(load_tokenizer, config)
            yield
        finally:
            await engine.close()

    return engine_context


def _runner_context(config: Config, factory: RunnerFactory, runners: list[Runner]):
    """The batch runner over the app's database, files and engine (also put in `runners`, for the
    stop to reach it first); /health reports it and the engine."""

    async def runner_context(app: web.Application):
        engine = app[online.ENGINE]
        runner = factory(config, app[DB], app[BLOBS], engine)
        runners.append(runner)
        await runner.start()
        try:
            app[BATCH_CREATED] = runner.wake
            app[PROBLEMS] = lambda: [p for p in (engine.health(), runner.health()) if p is not None]
            yield
        finally:
            await runner.stop()

    return runner_context


def _webhook_context(config: Config):
    """The webhook sender (jobs/webhooks.py) over the app's database. Entered last, it stops first:
    an attempt in flight may finish within its timeout, else it is cut and its event is due again
    when the lease lapses; events of batches the runner ends while stopping wait in the outbox for
    the next start (or another server on the same database)."""

    async def webhook_context(app: web.Application):
        sender = WebhookSender(config.webhooks, app[DB], clock=app[CLOCK])
        task = asyncio.create_task(sender.run_forever(), name="webhooks")
        try:
            yield
        finally:
            sender.stop()
            try:
                await asyncio.wait_for(task, config.webhooks.timeout_s + 1.0)
            except asyncio.TimeoutError:      # an attempt cut short stays due: its lease lapses
                pass

    return webhook_context


def serve(config: Config, *, engine_factory: EngineFactory | None = None,
          runner_factory: RunnerFactory | None = None) -> None:
    """Blocking entry point of `tokabatch serve`: returns after SIGINT/SIGTERM and a clean stop."""
    asyncio.run(serve_async(config, engine_factory=engine_factory, runner_factory=runner_factory))


__all__ = ["serve", "serve_async", "served_model_names", "default_engine_factory", "default_runner_factory",
           "EngineFactory", "RunnerFactory", "Runner"]
