"""batchserve.backends.registry: backend names → classes, built from the settings."""

from __future__ import annotations

import pytest

from batchserve import Batcher
from batchserve.backends import ProcessBackend, ThreadBackend
from batchserve.backends.base import Backend
from batchserve.backends.redis.front import RedisBackend
from batchserve.backends.registry import BACKENDS, as_backend, backend_class, create_backend
from batchserve.model import ModelSpec
from batchserve.settings import BackendKind, Settings
from tests.fakes import double

CLASSES = {BackendKind.thread: ThreadBackend, BackendKind.process: ProcessBackend, BackendKind.redis: RedisBackend}


@pytest.mark.parametrize("kind", list(BackendKind))
def test_every_backend_kind_resolves_by_enum_and_by_name(kind):
    assert set(BACKENDS) == set(BackendKind)  # one registry line per kind, none missing
    assert backend_class(kind) is backend_class(kind.value) is CLASSES[kind]
    assert issubclass(backend_class(kind), Backend)


@pytest.mark.parametrize("name", ["carrier-pigeon", "", "Thread"])
def test_an_unknown_backend_is_refused_naming_the_choices(name):
    with pytest.raises(ValueError, match=r"unknown backend .*choose one of thread, process, redis"):
        backend_class(name)


def test_create_backend_builds_the_kind_the_settings_name():
    spec = ModelSpec("tests.fakes:double")
    thread = create_backend(spec, Settings(), "double")
    assert isinstance(thread, ThreadBackend) and thread.spec is spec

    process = create_backend(spec, Settings.from_options(backend="process", workers=3, devices=["cuda:0,cuda:1"],
                                                         threads_per_worker=2, max_batches_per_worker=50), "double")
    assert isinstance(process, ProcessBackend)
    described = process.describe()  # nothing started: a description of what would start
    assert (described["workers"], described["workers_up"], described["devices"]) == (3, 0, ["cuda:0", "cuda:1"])

    redis = create_backend(spec, Settings.from_options(backend="redis", redis_url="redis://h:1/0", redis_prefix="blue",
                                                       timeout=7, max_queue_size=99), "double")
    assert isinstance(redis, RedisBackend)
    assert (redis.url, redis.keys.requests, redis.default_timeout, redis.max_inflight) == (
        "redis://h:1/0", "batchserve:blue:double:requests", 7, 99)


def test_a_redis_backend_without_a_url_says_so():
    with pytest.raises(ValueError, match="--redis-url"):
        create_backend(ModelSpec(double), Settings(backend="redis"), "double")


def test_as_backend_wraps_a_model_and_keeps_a_backend():
    wrapped = as_backend(double)
    assert isinstance(wrapped, ThreadBackend) and wrapped.spec.target is double
    spec = ModelSpec("tests.fakes:double")
    assert as_backend(spec).spec is spec
    ready = ThreadBackend(spec)
    assert as_backend(ready) is ready
    with Batcher(double) as batcher:  # the batcher wraps a plain function the same way
        assert isinstance(batcher.backend, ThreadBackend)
        assert batcher.predict([1, 2]) == [2, 4]
