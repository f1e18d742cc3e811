"""The errors a caller can get back, each mapped to one HTTP status by the server."""

from __future__ import annotations


class BatchserveError(Exception):
    """Base class of every error batchserve raises on purpose."""

    status_code = 500
    kind = "internal"
    #: the request field at fault, when there is one (OpenAI's ``error.param``)
    param: str | None = None

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.__class__.__name__


class OverloadedError(BatchserveError):
    """The queue is full: the request was refused at once (HTTP 503 + Retry-After)."""

    status_code = 503
    kind = "overloaded"

    def __init__(self, message: str = "server overloaded, retry later", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class NotReadyError(BatchserveError):
    """The model is not loaded yet, or no worker is up (HTTP 503)."""

    status_code = 503
    kind = "not_ready"

    def __init__(self, message: str = "model not ready", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class DeadlineExceededError(BatchserveError, TimeoutError):
    """The request's deadline passed before its results were ready (HTTP 504)."""

    status_code = 504
    kind = "deadline"


class ModelError(BatchserveError):
    """`predict` raised, or returned a wrong number of outputs (HTTP 500, message kept)."""

    status_code = 500
    kind = "model"


class WorkerDiedError(BatchserveError):
    """The worker running a batch died; the batch may be retried once elsewhere."""

    status_code = 500
    kind = "worker_died"


class InputError(BatchserveError, ValueError):
    """The request itself is not acceptable (HTTP 422); ``param`` names the field at fault."""

    status_code = 422
    kind = "invalid_request"

    def __init__(self, message: str = "invalid request", param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InputError):
    """The prompt, plus the tokens asked for, does not fit in the model's context (HTTP 422)."""

    kind = "context_length_exceeded"


class ModelNotFoundError(BatchserveError):
    """The request names a model this server does not serve there (HTTP 404)."""

    status_code = 404
    kind = "model_not_found"
    param = "model"


class ConfigError(BatchserveError, ValueError):
    """What the user gave cannot be used: a setting, a file, a ``module:attr`` model reference
    (its module missing or failing to import, the attribute absent, not a model).

    The command line reports it as one line and exit status 2; an error of any other kind
    is a bug and keeps its traceback.
    """

    kind = "config"


class ClientDisconnectedError(BatchserveError):
    """The HTTP client went away before its answer was ready; its work was dropped.

    Nobody reads the answer: the server logs one info line and counts it (status 499,
    nginx's "client closed request"), never as a server error.
    """

    status_code = 499
    kind = "client_disconnected"
