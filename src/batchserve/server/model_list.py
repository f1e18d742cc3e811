"""OpenAI's ``GET /v1/models`` and ``GET /v1/models/{id}``: every model the services serve.

The list is read from each service's ``models`` at request time, so a model appears once
it is loaded (the generation model's name is known when it is); ``created`` is when this
server started, ``owned_by`` is ``batchserve``.
"""

from __future__ import annotations

import time
from typing import Literal

from fastapi import APIRouter
from pydantic import BaseModel

from batchserve.apps.base import Service
from batchserve.errors import ModelNotFoundError
from batchserve.server.openai_errors import MODEL_NOT_FOUND

OWNER = "batchserve"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def build_router(services: list[Service]) -> APIRouter:
    router = APIRouter(tags=["models"])
    created = int(time.time())

    def cards() -> dict[str, ModelCard]:
        names = dict.fromkeys(name for service in services for name in service.models)  # first seen, once
        return {name: ModelCard(id=name, created=created, owned_by=OWNER) for name in names}

    @router.get("/v1/models", response_model=ModelList, summary="OpenAI-compatible list of the served models")
    async def list_models() -> ModelList:
        return ModelList(data=list(cards().values()))

    @router.get(
        "/v1/models/{model_id:path}",
        response_model=ModelCard,
        summary="One served model",
        responses=MODEL_NOT_FOUND,
    )
    async def retrieve_model(model_id: str) -> ModelCard:
        card = cards().get(model_id)
        if card is None:
            served = ", ".join(cards()) or "none yet"
            raise ModelNotFoundError(f"the model {model_id!r} is not served here (served: {served})")
        return card

    return router
