"""GET /v1/models (the served model and its aliases, e.g. `demo`), GET /v1/models/{id}, GET /health.

Reads only the ServedModels value the app was built with; never talks to the engine, so it answers
while a batch runs. Must not import torch.
"""

from __future__ import annotations

from aiohttp import web

from tokabatch.errors import NotFound
from tokabatch.service.http.context import MODELS, ServedModels

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
async def health(request: web.Request) -> web.Response:
    models = request.app[MODELS]
    body: dict = {"status": "ok", "models": list(models.names)}
    if models.info is not None:
        body["context_length"] = models.info.context_length
        body["device"] = models.info.device
    return web.json_response(body)
