"""Built-in applications; each module's ``build(settings)`` returns a :class:`Service`.

Adding an app is one module with ``build(settings) -> Service`` plus one line in
:data:`BUILT_IN` (and its name in :class:`~batchserve.settings.AppName`).  An app whose
models run on batchers also has ``models(settings) -> {name: ModelSpec}``, which its
``build`` uses: :func:`batched_models` collects them for ``batchserve worker``, which
serves the same models through Redis without building any HTTP service.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from batchserve.apps.base import Service
from batchserve.extras import EXTRAS, require_extra
from batchserve.model import ModelSpec
from batchserve.settings import AppName, ModelSettings, Settings

#: app name → module holding ``build(settings) -> Service``
BUILT_IN: dict[AppName, str] = {
    AppName.embeddings: "batchserve.apps.embeddings",
    AppName.generation: "batchserve.apps.generation",
    AppName.infill: "batchserve.apps.infill",
}
USER_MODELS = "batchserve.apps.custom"
#: app name → the extra its models need, and the modules checked before it is built (its models
#: import them later, in a worker, on their first load); llama.cpp is optional: without it
#: generation runs on torch
EXTRA_OF: dict[AppName, tuple[str, tuple[str, ...]]] = {
    AppName.embeddings: ("embeddings", tuple(EXTRAS["embeddings"])),
    AppName.generation: ("generation", ("numpy", "torch", "transformers", "gguf")),
    AppName.infill: ("generation", ("numpy", "torch", "transformers", "gguf")),
}


def app_module(name: AppName) -> ModuleType:
    """The module of built-in app ``name``; an app whose extra is not installed raises
    :class:`~batchserve.extras.MissingExtraError` naming it."""
    extra, modules = EXTRA_OF[name]
    require_extra(extra, f"the {name.value} app", modules)
    return importlib.import_module(BUILT_IN[name])


def build_services(settings: Settings) -> list[Service]:
    """The services the settings ask for: built-in apps (``all`` = every one) and user models."""
    settings = with_app_settings(settings)
    services = [app_module(name).build(settings) for name in settings.app_names]
    if settings.models:
        services.append(importlib.import_module(USER_MODELS).build(settings))
    return services


def batched_models(settings: Settings) -> dict[str, ModelSpec]:
    """The batched models of the apps and user models the settings ask for, by name (the
    names ``serve`` gives their batchers); apps without batchers (generation) add none."""
    modules = [app_module(name) for name in settings.app_names]
    if settings.models:
        modules.append(importlib.import_module(USER_MODELS))
    models: dict[str, ModelSpec] = {}
    for module in modules:
        models.update(getattr(module, "models", lambda settings: {})(settings))
    return models


def with_app_settings(settings: Settings) -> Settings:
    """The settings with each served app's own settings (a config file's ``apps: {embeddings:
    {...}}``) given to its batched models, by the names their batchers have, under what a
    model's own entry says.  An app whose models have no batcher (generation, infill: their
    engine has the ``generation_*`` settings) refuses settings of its own."""
    merged = dict(settings.model_settings)
    for app, own in settings.app_settings.items():
        given = own.model_dump(exclude_none=True)
        if not given or app not in settings.app_names:
            continue
        names = list(getattr(app_module(app), "models", lambda settings: {})(settings))
        if not names:
            raise ValueError(
                f"apps.{app.value}: the {app.value} app has no batcher to take {', '.join(given)}; "
                "its engine has the generation_* settings"
            )
        for name in names:
            mine = merged.get(name)
            merged[name] = ModelSettings(**{**given, **(mine.model_dump(exclude_none=True) if mine else {})})
    return settings.model_copy(update={"model_settings": merged}) if merged != settings.model_settings else settings
