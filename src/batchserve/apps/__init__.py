"""Built-in applications; each module's ``build(settings)`` returns a :class:`Service`."""

from __future__ import annotations

import importlib

from batchserve.apps.base import Service
from batchserve.server.settings import Settings

#: app name → module holding ``build(settings) -> Service``
BUILT_IN = {
    "embeddings": "batchserve.apps.embeddings",
    "generation": "batchserve.apps.generation",
    "infill": "batchserve.apps.infill",
}


def build_services(settings: Settings) -> list[Service]:
    """The services the settings ask for: built-in apps (``all`` = every one) and user models."""
    names = list(BUILT_IN) if "all" in settings.apps else list(dict.fromkeys(settings.apps))
    unknown = [name for name in names if name not in BUILT_IN]
    if unknown:
        raise ValueError(f"unknown app {unknown[0]!r}; choose from {', '.join([*BUILT_IN, 'all'])}")
    services = [importlib.import_module(BUILT_IN[name]).build(settings) for name in names]
    if settings.models:
        services.append(importlib.import_module("batchserve.apps.custom").build(settings))
    return services
