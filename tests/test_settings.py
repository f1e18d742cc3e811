"""batchserve.settings: one source of every setting, grouped by the layer that reads it."""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from batchserve.settings import (
    GROUPS,
    SETTINGS_ENV,
    AppName,
    BackendKind,
    BatchingSettings,
    LogLevel,
    Settings,
    SettingsError,
    field_info,
    group_of,
)

TOP_LEVEL = [name for name in Settings.model_fields if name not in GROUPS]


def test_every_field_name_belongs_to_one_group_and_has_help():
    seen: dict[str, str] = {}
    for group, model in GROUPS.items():
        for name in model.model_fields:
            assert name not in seen, f"{name} is in both {seen[name]} and {group}"
            seen[name] = group
            assert group_of(name) == group
            assert field_info(name).description, f"{name} has no help text"  # the CLI shows it
    for name in TOP_LEVEL:
        assert name not in seen and group_of(name) is None and field_info(name).description


def test_from_options_routes_each_option_to_its_group():
    settings = Settings.from_options(
        apps=["generation"], models=("m=tests.fakes:echo",), backend="process",
        max_batch_size=8, timeout=5.0, workers=3, devices=("cuda:0", "cuda:1"), redis_url="redis://h/1",
        redis_prefix="blue", generation_max_rows=4, port=9000, docs=False, log_level="debug",
    )
    assert settings.apps == [AppName.generation] and settings.models == ["m=tests.fakes:echo"]
    assert settings.backend is BackendKind.process
    assert (settings.batching.max_batch_size, settings.batching.timeout) == (8, 5.0)
    assert (settings.process.workers, settings.process.devices) == (3, ["cuda:0", "cuda:1"])  # tuples become lists
    assert (settings.redis.redis_url, settings.redis.redis_prefix) == ("redis://h/1", "blue")
    assert settings.generation.generation_max_rows == 4
    assert (settings.server.port, settings.server.docs, settings.server.log_level) == (9000, False, LogLevel.debug)
    untouched = Settings()
    assert settings.batching.max_latency == untouched.batching.max_latency  # the rest keep their defaults
    assert settings.server.host == untouched.server.host


def test_none_and_empty_mean_the_default():
    every_option_unset = {name: None for model in GROUPS.values() for name in model.model_fields}
    every_option_unset.update(apps=[], models=(), backend=None)
    assert Settings.from_options(**every_option_unset) == Settings()
    assert Settings.from_options(devices=[]).process.devices == ["cpu"]
    assert Settings.from_options(docs=False).server.docs is False  # False is a value, not "unset"
    assert Settings.from_options(max_latency=0).batching.max_latency == 0


def test_unknown_options_are_refused_by_name():
    with pytest.raises(ValueError, match="unknown setting 'max_batch'"):
        Settings.from_options(max_batch=8)
    with pytest.raises(ValidationError):
        BatchingSettings(max_batch=8)  # the groups take no stray fields either
    with pytest.raises(ValidationError):
        Settings(batching={"max_batch_size": 8, "stray": 1})


@pytest.mark.parametrize(
    "options, field",
    [
        ({"backend": "carrier-pigeon"}, "backend"),
        ({"apps": ["nope"]}, "apps"),
        ({"log_level": "loud"}, "log_level"),
        ({"max_batch_size": 0}, "max_batch_size"),
        ({"timeout": 0}, "timeout"),
        ({"port": 70000}, "port"),
        ({"visibility_timeout": 0.01}, "visibility_timeout"),
    ],
)
def test_bad_values_and_names_outside_the_enumerations_are_refused(options, field):
    with pytest.raises(SettingsError, match=rf"^{field}(\.\d+)?: "):  # a list item by its index
        Settings.from_options(**options)


def test_enumerations_are_typed():
    settings = Settings.from_options(backend="redis", apps=["infill"], log_level="error")
    assert settings.backend is BackendKind.redis and settings.backend == "redis"
    assert settings.apps == [AppName.infill] and settings.server.log_level is LogLevel.error
    assert {kind.value for kind in BackendKind} == {"thread", "process", "redis"}


@pytest.mark.parametrize(
    "apps, models, names",
    [
        ([], [], [AppName.embeddings]),  # nothing asked for: the default app
        ([], ["tests.fakes:echo"], []),  # only user models
        (["infill", "generation", "infill"], [], [AppName.infill, AppName.generation]),  # once each, in order
        (["all"], [], [name for name in AppName if name is not AppName.all]),
        (["generation", "all"], ["tests.fakes:echo"], [name for name in AppName if name is not AppName.all]),
    ],
)
def test_app_names(apps, models, names):
    assert Settings(apps=apps, models=models).app_names == names


def test_all_means_every_built_in_app():
    every = Settings(apps=["all"]).app_names
    assert AppName.all not in every and set(every) == set(AppName) - {AppName.all}


def test_settings_travel_as_json_through_the_environment(monkeypatch):
    monkeypatch.setenv(SETTINGS_ENV, "")  # and restored after the test, whatever to_env() sets
    assert Settings.from_env() == Settings()  # nothing in the environment: the defaults
    settings = Settings.from_options(
        apps=["all"], models=["a=tests.fakes:echo"], backend="process", workers=2, devices=["cuda:1"],
        max_batch_size=7, max_latency=0.5, redis_url="rediss://:pw@h:6380/2", generation_threads=3,
        http_workers=2, metrics=False, log_level="info",
    )
    settings.to_env()
    assert os.environ[SETTINGS_ENV]
    back = Settings.from_env()
    assert back == settings
    assert back.backend is BackendKind.process and back.server.log_level is LogLevel.info and back.apps == [AppName.all]


def test_a_corrupt_environment_value_is_refused(monkeypatch):
    monkeypatch.setenv(SETTINGS_ENV, '{"backend": "carrier-pigeon"}')
    with pytest.raises(SettingsError, match="^backend: Input should be 'thread', 'process' or 'redis'"):
        Settings.from_env()
