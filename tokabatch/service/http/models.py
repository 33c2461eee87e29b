"""GET /v1/models (the served model and any aliases), GET /v1/models/{id}, GET /health and /ready.

Reads only the ServedModels value the app was built with and the app's PROBLEMS callable (the
engine's and the runner's health, no I/O), so it answers at once while a batch runs. Must not
import torch.
"""

from __future__ import annotations

from aiohttp import web

from tokabatch.errors import NotFound
from tokabatch.service.http.context import MODELS, PROBLEMS, ServedModels

routes = web.RouteTableDef()


def model_object(models: ServedModels, name: str) -> dict:
    return {"id": name, "object": "model", "created": models.created_at, "owned_by": "tokabatch"}


@routes.get("/v1/models")
async def list_models(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    return web.json_response({"object": "list", "data": [model_object(models, n) for n in models.names]})


@routes.get("/v1/models/{model:.+}")
async def retrieve_model(request: web.Request) -> web.Response:
    models, name = request.app[MODELS], request.match_info["model"]
    if name not in models.names:
        raise NotFound(f"The model '{name}' does not exist.", param="model", code="model_not_found")
    return web.json_response(model_object(models, name))


@routes.get("/health")
@routes.get("/ready")
async def health(request: web.Request) -> web.Response:
    """200 while the server works; 503 with the reasons while its engine or batch runner is down
    (both keep trying to recover: the engine is started again, the runner retries)."""
    models = request.app[MODELS]
    problems = request.app[PROBLEMS]()
    body: dict = {"status": "unavailable" if problems else "ok", "models": list(models.names)}
    if problems:
        body["problems"] = problems
    if models.info is not None:
        body["context_length"] = models.info.context_length
        body["device"] = models.info.device
    return web.json_response(body, status=503 if problems else 200)
