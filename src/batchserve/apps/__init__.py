"""Built-in applications; each module's ``build(settings)`` returns a :class:`Service`.

Adding an app is one module with ``build(settings) -> Service`` plus one line in
:data:`BUILT_IN` (and its name in :class:`~batchserve.settings.AppName`).
"""

from __future__ import annotations

import importlib

from batchserve.apps.base import Service
from batchserve.settings import AppName, Settings

#: app name → module holding ``build(settings) -> Service``
BUILT_IN: dict[AppName, str] = {
    AppName.embeddings: "batchserve.apps.embeddings",
    AppName.generation: "batchserve.apps.generation",
    AppName.infill: "batchserve.apps.infill",
}
USER_MODELS = "batchserve.apps.custom"


def build_services(settings: Settings) -> list[Service]:
    """The services the settings ask for: built-in apps (``all`` = every one) and user models."""
    services = [importlib.import_module(BUILT_IN[name]).build(settings) for name in settings.app_names]
    if settings.models:
        services.append(importlib.import_module(USER_MODELS).build(settings))
    return services
