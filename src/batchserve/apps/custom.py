"""Users' own models: ``--model [name=]module:attr`` served at ``POST /models/{name}/predict``.

Body ``{"inputs": [...]}`` (any JSON values), answer ``{"outputs": [...]}``, one output per
input, batched with every other concurrent caller of the same model.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import APIRouter, Depends, HTTPException
from pydantic import BaseModel, Field

from batchserve.apps.base import Service, deadline_dependency, make_batcher
from batchserve.batching import Batcher
from batchserve.errors import ConfigError
from batchserve.model import ModelSpec, as_model, import_object, model_name
from batchserve.server.json_response import FastJSONResponse
from batchserve.server.json_route import JSONBodyRoute
from batchserve.server.openai_errors import ErrorBody
from batchserve.settings import Settings

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


class PredictRequest(BaseModel):
    inputs: list[Any] = Field(min_length=1, description="one JSON value per input")


class PredictResponse(BaseModel):
    outputs: list[Any]


def parse_model_option(option: str) -> tuple[str, str]:
    """``"name=module:attr"`` or ``"module:attr"`` → ``(name, "module:attr")``."""
    name, sep, reference = option.partition("=")
    if not sep:
        name, reference = model_name(option), option
    if not NAME_PATTERN.match(name):
        raise ValueError(f"model name {name!r} may hold only letters, digits, '_', '-' and '.'")
    return name, reference


def build_router(batchers: dict[str, Batcher], settings: Settings) -> APIRouter:
    router = APIRouter(tags=["models"], route_class=JSONBodyRoute)
    request_timeout = deadline_dependency(settings, per_model=True)

    @router.post(
        "/models/{name}/predict",
        response_model=PredictResponse,
        summary="Run a served model",
        responses={404: {"model": ErrorBody, "description": "no model of that name is served"}},
    )
    async def predict(name: str, body: PredictRequest, timeout: float | None = Depends(request_timeout)):
        batcher = batchers.get(name)
        if batcher is None:
            raise HTTPException(404, f"no model named {name!r}; served: {', '.join(sorted(batchers))}")
        outputs = await batcher.submit(body.inputs, timeout=timeout)
        return FastJSONResponse({"outputs": outputs})  # orjson: numpy arrays and scalars too

    @router.get("/models", summary="List served models")
    async def list_models():
        return {"models": sorted(batchers)}

    return router


def models(settings: Settings) -> dict[str, ModelSpec]:
    """The user's models (``--model``) by name, each checked now: importable, and a model."""
    specs: dict[str, ModelSpec] = {}
    for option in settings.models:
        name, reference = parse_model_option(option)
        if name in specs:
            raise ValueError(f"two models are named {name!r}; name them with name=module:attr")
        try:  # fail fast, before the server starts
            target = import_object(reference)
            if isinstance(target, str):  # as_model would read it as another reference
                raise TypeError(f"cannot use {target!r} as a model: give a function or an object with predict()")
            as_model(target)
        except (ConfigError, TypeError) as error:
            raise ConfigError(f"--model {option}: {error}") from None
        specs[name] = ModelSpec(reference)
    return specs


def build(settings: Settings) -> Service:
    batchers = {name: make_batcher(spec, settings, name=name) for name, spec in models(settings).items()}
    return Service("models", build_router(batchers, settings), batchers)
