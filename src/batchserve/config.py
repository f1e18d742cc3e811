"""The config file (``--config FILE``, YAML), and where each effective setting came from.

A config file is another way in to :mod:`batchserve.settings`, not a second schema: it holds
the same settings by the same names, with the same bounds (:func:`~batchserve.settings.read_mapping`
says which shapes it takes), plus each built-in app's and user model's own batching and
layout (:data:`~batchserve.settings.PER_MODEL`)::

    server: {port: 8000}
    apps:
      embeddings: {max_batch_size: 64, workers: 2}
    models:
      small: {model: my_model:predict, max_batch_size: 2}
      big:   {model: my_model:Big, max_batch_size: 32, max_latency: 0.05, timeout: 30}

Precedence, highest first: a flag, an option's environment variable, the file, the default.
Every problem (an unknown key, a bad value, bad YAML, a missing file) is a
:class:`~batchserve.settings.SettingsError` naming the key's path, which the command line
prints on one line before exiting with status 2.

Processes started without the command line (gunicorn run by hand) read the file named by
``BATCHSERVE_CONFIG`` and the JSON in ``BATCHSERVE_SETTINGS`` over it (:func:`from_environment`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from batchserve.settings import (
    GROUPS,
    PER_MODEL,
    SETTINGS_ENV,
    Layer,
    Settings,
    SettingsError,
    group_of,
    json_mapping,
    options_layer,
    read_mapping,
)

#: a config file for processes started without the command line (and ``--config``'s default)
CONFIG_ENV = "BATCHSERVE_CONFIG"

#: where a setting came from, highest precedence first
FLAG, ENV, FILE, DEFAULT = "flag", "env", "file", "default"


def read_file(path: str) -> Layer:
    """The settings of the YAML file ``path``; :class:`SettingsError` when it cannot be read or parsed."""
    where = f"config file {path}"
    try:
        import yaml
    except ModuleNotFoundError:  # the server extra brings it
        raise SettingsError([(where, "reading it needs PyYAML: pip install 'batchserve[server]'")]) from None
    try:
        with open(path, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except FileNotFoundError:
        raise SettingsError([(where, "not found")]) from None
    except IsADirectoryError:
        raise SettingsError([(where, "is a directory, not a file")]) from None
    except OSError as error:
        raise SettingsError([(where, error.strerror or str(error))]) from None
    except UnicodeDecodeError as error:
        raise SettingsError([(where, f"not UTF-8 text ({error.reason} at byte {error.start})")]) from None
    except yaml.YAMLError as error:
        raise SettingsError([(where, _yaml_problem(error))]) from None
    return read_mapping({} if data is None else data)


def _yaml_problem(error: Any) -> str:
    """A YAML error on one line: what, and where (line and column, counted from 1)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    place = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"not valid YAML: {place}{problem}"


@dataclass
class Effective:
    """The settings a command runs with, and where each came from (:meth:`source`)."""

    settings: Settings
    sources: dict[str, str]  # flat name or own-settings path -> FLAG, ENV, FILE (absent: DEFAULT)
    given_as: dict[str, str]  # flat name or own-settings path -> the flag, variable or file key

    def source(self, name: str) -> str:
        return self.sources.get(name, DEFAULT)

    def rows(self) -> list[tuple[str, Any, str]]:
        """``(path, value, where from)`` for every setting, then each app's and model's own
        settings; a value is as JSON shows it (API keys masked)."""
        dump = self.settings.model_dump(mode="json")
        rows = []
        for name in ("apps", "models", "backend"):
            rows.append((name, dump[name], self._from(name)))
        for group, model in GROUPS.items():
            for name in model.model_fields:
                rows.append((f"{group}.{name}", dump[group][name], self._from(name)))
        for section, entries in (("apps", self.settings.app_settings), ("models", self.settings.model_settings)):
            for key, own in entries.items():
                key = getattr(key, "value", key)
                for name in PER_MODEL:
                    value = getattr(own, name)
                    path = f"{section}.{key}.{name}"
                    if value is not None:
                        rows.append((path, own.model_dump(mode="json")[name], self._from(path)))
                    else:  # the server-wide setting
                        group = group_of(name)
                        shown = dump[group][name] if group else dump[name]
                        where = f"{group}.{name}" if group else name
                        rows.append((path, shown, f"server-wide ({where}: {self.source(name)})"))
        return rows

    def _from(self, name: str) -> str:
        source = self.source(name)
        given = self.given_as.get(name)
        return f"{source} ({given})" if given and source != DEFAULT else source


def effective(
    config: str | None, options: Mapping[str, Any], sources: Mapping[str, str], flags: Mapping[str, str] | None = None
) -> Effective:
    """The settings of the file ``config`` (None: no file) with ``options`` over it.

    ``options`` holds only what was given on the command line or by an option's environment
    variable (name → value); ``sources`` says which (:data:`FLAG` or :data:`ENV`), and
    ``flags`` how each was spelled (``--port``, ``BATCHSERVE_API_KEY``), for messages."""
    base = read_file(config) if config else Layer()
    spelled = dict(flags or {})
    given = options_layer(options, spelled)
    layer = given.over(base)
    settings = layer.settings()
    where: dict[str, str] = {}
    given_as: dict[str, str] = {}
    for name in base.values:
        where[name], given_as[name] = FILE, f"{config}: {base.paths[name]}"
    for section, entries in (("apps", base.apps), ("models", base.models)):
        for key, (path, own) in entries.items():
            for name in own or {}:
                where[f"{section}.{key}.{name}"] = FILE
                given_as[f"{section}.{key}.{name}"] = f"{config}: {path}.{name}"
    for name in given.values:
        where[name] = sources.get(name, FLAG)
        given_as[name] = spelled.get(name, name)
    return Effective(settings, where, given_as)


def from_environment() -> Settings:
    """Settings of a process started without the command line (gunicorn run by hand, its
    workers): the file ``BATCHSERVE_CONFIG`` names, then ``BATCHSERVE_SETTINGS``'s JSON over it
    (flat names or groups, as in a file), then the API keys of ``BATCHSERVE_API_KEY``."""
    path = os.environ.get(CONFIG_ENV)
    layer = read_file(path) if path else Layer()
    raw = os.environ.get(SETTINGS_ENV)
    if raw:
        layer = read_mapping(json_mapping(raw, SETTINGS_ENV), prefix=SETTINGS_ENV).over(layer)
    return layer.settings().with_env_keys()


def from_environment_or_exit() -> Settings:
    """:func:`from_environment`, or one line on stderr and exit status 2 when the settings are
    refused (gunicorn run by hand with a bad file or JSON: no traceback)."""
    import sys

    try:
        return from_environment()
    except SettingsError as error:
        print(f"batchserve: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
