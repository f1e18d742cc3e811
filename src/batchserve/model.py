"""The model interface, and adapters so a user's model needs no batchserve import.

A model is either

* a plain function ``predict(batch: list) -> list``, or
* a class (or an instance of one) with ``predict(batch)`` and, optionally, ``load()``
  that loads weights once before the first batch.

``predict`` returns exactly one output per input, in order.  A :class:`ModelSpec`
names a model by reference (an object, or ``"module:attr"``) so worker processes
can build their own copy.

A model may also declare, on its class, ``batch_length(item) -> int`` (a static method:
the item's cost in tokens) and ``max_batch_tokens`` (an int): its batches then run as
length-grouped passes within that token budget (see :mod:`batchserve.batching`).
"""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol, runtime_checkable

from batchserve.errors import ConfigError


@runtime_checkable
class Model(Protocol):
    def load(self) -> None: ...

    def predict(self, batch: list[Any]) -> list[Any]: ...


class FunctionModel:
    """A plain ``predict(batch) -> list`` function as a :class:`Model`."""

    def __init__(self, function: Callable[[list[Any]], list[Any]]):
        self.function = function

    def load(self) -> None:
        pass

    def predict(self, batch: list[Any]) -> list[Any]:
        return self.function(batch)


class ObjectModel:
    """An instance with ``predict`` (and maybe ``load``), or a class built on ``load()``."""

    def __init__(self, target: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None):
        self.target = target
        self.args = args
        self.kwargs = kwargs or {}
        self.instance = None if inspect.isclass(target) else target

    def load(self) -> None:
        if self.instance is None:
            self.instance = self.target(*self.args, **self.kwargs)
        load = getattr(self.instance, "load", None)
        if callable(load):
            load()

    def predict(self, batch: list[Any]) -> list[Any]:
        if self.instance is None:
            raise RuntimeError("model used before load()")
        outputs: list[Any] = self.instance.predict(batch)
        return outputs


def import_object(reference: str) -> Any:
    """Import ``"package.module:attribute"``, looking in the working directory too.

    A reference that cannot be followed (its form, a module that is missing or whose own
    imports fail, an attribute it lacks) is the caller's :class:`ConfigError`; any other
    exception the module raises while it is imported is a bug in it, and goes through."""
    module_name, sep, attribute = reference.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"expected 'module:attribute', got {reference!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise ConfigError(f"cannot import {module_name}: {error}") from error
    for depth, part in enumerate(attribute.split(".")):
        try:
            target = getattr(target, part)
        except AttributeError:
            owner = module_name if depth == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:depth])}"
            raise ConfigError(f"{'module ' if depth == 0 else ''}{owner} has no attribute {part!r}") from None
    return target


def as_model(target: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None) -> Model:
    """Adapt a function, a class, an instance or a ``"module:attr"`` string to a Model."""
    if isinstance(target, str):
        target = import_object(target)
    if inspect.isclass(target):
        if not callable(getattr(target, "predict", None)):
            raise TypeError(f"{target.__name__} has no predict(batch) method")
        return ObjectModel(target, args, kwargs)
    if callable(getattr(target, "predict", None)):
        return ObjectModel(target)
    if callable(target):
        return FunctionModel(target)
    raise TypeError(f"cannot use {target!r} as a model: give a function or an object with predict()")


@dataclass
class ModelSpec:
    """How to build a model, picklable by reference so another process can build it."""

    target: Any
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def build(self) -> Model:
        return as_model(self.target, self.args, self.kwargs)

    def declared(self, name: str) -> Any:
        """The attribute ``name`` that the model declares on its class or object, or None.

        Read in the front process, before any worker loads the model: this is how a model
        declares batching hints (``batch_length(item) -> int`` as a static method, and
        ``max_batch_tokens``) without being loaded.
        """
        target = import_object(self.target) if isinstance(self.target, str) else self.target
        return getattr(target, name, None)


def model_name(target: Any) -> str:
    """A short name for URLs: ``"pkg.mod:MyModel"`` → ``"MyModel"``."""
    if isinstance(target, str):
        return target.rpartition(":")[2].rpartition(".")[2]
    return getattr(target, "__name__", type(target).__name__)
