"""Fast JSON responses that also understand numpy arrays and scalars."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse

from batchserve.errors import ModelError

OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS


def dumps(content: Any) -> bytes:
    try:
        return orjson.dumps(content, option=OPTIONS)
    except orjson.JSONEncodeError as error:
        raise ModelError(f"output is not JSON-serializable: {error}") from None


class FastJSONResponse(JSONResponse):
    def render(self, content: Any) -> bytes:
        return dumps(content)
