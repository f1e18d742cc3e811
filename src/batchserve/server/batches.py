"""OpenAI's Batch API: ``/v1/files`` and ``/v1/batches`` (docs/batch.md).

A client uploads a file of requests in the batch format (``POST /v1/files``, multipart, purpose
``batch``), creates a batch on it (``POST /v1/batches``), polls it (``GET /v1/batches/ID``) and
reads its results (``GET /v1/files/ID/content``).  Files and batches are kept on disk
(:class:`~batchserve.batchjob.store.Store`, ``--batch-dir``), so a restart loses nothing; the
batches run in this process (:class:`~batchserve.batchjob.online.BatchQueue`) through the
same routes as online requests, after them.  Limits (``--batch-max-*``) answer 413, 400 or
429 with OpenAI's error shape, so the official client raises its typed errors.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import FileResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from batchserve.apps.base import Service
from batchserve.apps.routes import matches, who_serves
from batchserve.batchjob.lines import MODEL_URL, URLS
from batchserve.batchjob.online import BatchQueue
from batchserve.batchjob.store import COMPLETION_WINDOWS, ENDED, Store, StoreLimitError, StoreLimits
from batchserve.cache import default_cache_dir
from batchserve.server.errors import error_response
from batchserve.settings import Settings

log = logging.getLogger("batchserve.server")

#: the path whose bodies may be as large as --batch-max-file-bytes (and the multipart's own lines)
UPLOAD_PATH = "/v1/files"
MULTIPART_OVERHEAD = 64 * 1024


class BatchCreate(BaseModel):
    """``POST /v1/batches``."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(description="a file uploaded with purpose batch")
    endpoint: str = Field(description="the route every line calls: /v1/embeddings, /v1/chat/completions, /v1/completions "
                                      "or /models/NAME/predict")
    completion_window: Literal["24h"] = Field(description="how long the batch may take")
    metadata: dict[str, str] | None = Field(None, max_length=16, description="up to 16 pairs, kept with the batch")


def store_of(settings: Settings) -> Store:
    server = settings.server
    root = Path(server.batch_dir) if server.batch_dir else default_cache_dir() / "batches"
    limits = StoreLimits(server.batch_max_file_bytes, server.batch_max_files, server.batch_max_lines, server.batch_max_pending)
    return Store(root, limits)


def upload_limit(settings: Settings) -> int:
    """The body limit of ``POST /v1/files``."""
    return settings.server.batch_max_file_bytes + MULTIPART_OVERHEAD


def add_batch_api(app: FastAPI, settings: Settings, services: list[Service], ready: Any) -> BatchQueue | None:
    """The routes, on ``app``; the queue that runs the batches (started and closed by the app's
    lifespan).  None, with a warning, when the batch directory cannot be written: the server
    serves the rest (a read-only file system)."""
    try:
        store = store_of(settings)
    except OSError as error:
        log.warning("the Batch API is off: %s (--batch-dir names where it keeps its files)", error)
        return None
    queue = BatchQueue(store, app, in_flight=settings.server.batch_in_flight, deadline=settings.batching.max_timeout, ready=ready,
                       max_body_bytes=settings.server.max_body_bytes)
    served = [route.path for service in services for route in service.router.routes if isinstance(route, APIRoute)]
    app.include_router(_router(store, queue, served))
    return queue


def _router(store: Store, queue: BatchQueue, served: list[str]) -> APIRouter:
    """``served``: the routes of this server's apps, which a batch's endpoint must be one of."""
    router = APIRouter(tags=["batch"])

    def not_found(request: Request, kind: str, given: str):
        return error_response(request, 404, "not_found", f"no such {kind}: {given}", param=None)

    def refused(request: Request, error: StoreLimitError):
        return error_response(request, error.status, error.code, str(error))

    @router.post("/v1/files", summary="Upload a file of batch requests (multipart: file, purpose=batch)")
    async def upload(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return error_response(request, 400, "invalid_request", "send the file as multipart/form-data (fields: file, purpose)")
        form = await request.form(max_files=1, max_fields=8)
        try:
            file, purpose = form.get("file"), form.get("purpose")
            if not isinstance(file, UploadFile):
                return error_response(request, 400, "invalid_request", "the form has no file (field: file)", param="file")
            if purpose != "batch":
                return error_response(request, 400, "invalid_request",
                                      f"purpose must be batch (got {purpose!r}): this server keeps files for batches only",
                                      param="purpose")
            try:
                return await asyncio.to_thread(store.add_file, file.file, file.filename or "upload.jsonl", "batch")
            except StoreLimitError as error:
                return refused(request, error)
        finally:
            await form.close()

    @router.get("/v1/files", summary="The files kept")
    async def list_files(purpose: str | None = None):
        return _page(await asyncio.to_thread(store.files, purpose), has_more=False)

    @router.get("/v1/files/{file_id}", summary="A file's object")
    async def get_file(request: Request, file_id: str):
        found = store.file(file_id)
        return found if found is not None else not_found(request, "file", file_id)

    @router.get("/v1/files/{file_id}/content", summary="A file's bytes (a batch's results)")
    async def file_content(request: Request, file_id: str):
        path = store.file_path(file_id)
        if path is None or not path.exists():
            return not_found(request, "file", file_id)
        return FileResponse(path, media_type="application/jsonl", filename=path.name)

    @router.delete("/v1/files/{file_id}", summary="Delete a file")
    async def delete_file(request: Request, file_id: str):
        try:
            deleted = await asyncio.to_thread(store.delete_file, file_id)
        except StoreLimitError as error:
            return refused(request, error)
        return {"id": file_id, "object": "file", "deleted": True} if deleted else not_found(request, "file", file_id)

    @router.post("/v1/batches", summary="Run a file of requests as a batch")
    async def create_batch(request: Request, body: BatchCreate):
        found = store.file(body.input_file_id)
        if found is None:
            return not_found(request, "file", body.input_file_id)
        if found["purpose"] != "batch":
            return error_response(request, 400, "invalid_request", f"{body.input_file_id} is not a file of purpose batch",
                                  param="input_file_id")
        if not (body.endpoint in URLS or MODEL_URL.fullmatch(body.endpoint)):
            return error_response(request, 400, "invalid_request",
                                  f"endpoint must be one of {', '.join(URLS)} or /models/NAME/predict (got {body.endpoint!r})",
                                  param="endpoint")
        if not any(matches(path, body.endpoint) for path in served):
            serving = who_serves(body.endpoint)
            why = f": it is served by {serving}, which this server was not started with" if serving else ""
            return error_response(request, 400, "invalid_request", f"this server does not serve {body.endpoint}{why}", param="endpoint")
        assert body.completion_window in COMPLETION_WINDOWS
        try:
            batch = await asyncio.to_thread(store.add_batch, body.input_file_id, body.endpoint, body.completion_window, body.metadata)
        except StoreLimitError as error:
            return refused(request, error)
        queue.submit(batch["id"])
        return batch

    @router.get("/v1/batches", summary="The batches, newest first")
    async def list_batches(limit: int = Query(20, ge=1, le=100), after: str | None = None):
        batches = await asyncio.to_thread(store.batches)
        if after is not None:
            ids = [b["id"] for b in batches]
            batches = batches[ids.index(after) + 1:] if after in ids else []
        return _page(batches[:limit], has_more=len(batches) > limit)

    @router.get("/v1/batches/{batch_id}", summary="A batch: its status, counts and result files")
    async def get_batch(request: Request, batch_id: str):
        batch = store.batch(batch_id)
        return batch if batch is not None else not_found(request, "batch", batch_id)

    @router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch: what is done is kept")
    async def cancel_batch(request: Request, batch_id: str):
        batch = store.batch(batch_id)
        if batch is None:
            return not_found(request, "batch", batch_id)
        if batch["status"] in ENDED:
            return error_response(request, 409, "invalid_state", f"cannot cancel a batch with status {batch['status']!r}")
        store.cancel_path(batch_id).touch()
        if batch["status"] == "validating":
            await queue.cancel_waiting(batch_id)
        return store.batch(batch_id)

    return router


def _page(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """OpenAI's list page (the client's cursor pages read ``has_more`` and ``last_id``)."""
    return {"object": "list", "data": data, "has_more": has_more,
            "first_id": data[0]["id"] if data else None, "last_id": data[-1]["id"] if data else None}
