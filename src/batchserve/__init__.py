"""batchserve: dynamic batching for deep-learning models, as a library and a server.

``pip install batchserve`` is the library imported here (no torch, no web framework); the
server, the built-in apps, Redis and the load generator are extras (:mod:`batchserve.extras`).
"""

from batchserve.batching import Batcher
from batchserve.decorator import batch
from batchserve.errors import (
    BatchserveError,
    DeadlineExceededError,
    InputError,
    ModelError,
    NotReadyError,
    OverloadedError,
    WorkerDiedError,
)
from batchserve.extras import MissingExtraError
from batchserve.model import Model, ModelSpec, as_model

__version__ = "0.1.0"

__all__ = [
    "Batcher",
    "BatchserveError",
    "DeadlineExceededError",
    "InputError",
    "MissingExtraError",
    "Model",
    "ModelError",
    "ModelSpec",
    "NotReadyError",
    "OverloadedError",
    "WorkerDiedError",
    "as_model",
    "batch",
]
