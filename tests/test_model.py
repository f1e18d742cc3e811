"""batchserve.model: functions, classes, instances and "module:attr" references as models."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest

from batchserve.errors import ConfigError
from batchserve.model import Model, ModelSpec, as_model, import_object, model_name
from tests.fakes import Greeter, RecordingModel, double


class Counter:
    """Counts its loads; adds ``step`` to each input."""

    loads = 0

    def __init__(self, step: int = 1, *, scale: int = 1):
        self.step, self.scale = step, scale

    def load(self) -> None:
        type(self).loads += 1

    def predict(self, batch: list) -> list:
        return [(x + self.step) * self.scale for x in batch]


class NoLoad:
    def predict(self, batch: list) -> list:
        return list(reversed(batch))


def test_a_function_is_a_model():
    model = as_model(double)
    assert isinstance(model, Model)
    model.load()  # nothing to load
    assert model.predict([1, 2.5]) == [2, 5.0]


def test_a_class_is_built_and_loaded_once_on_load():
    Counter.loads = 0
    model = as_model(Counter, args=(10,), kwargs={"scale": 2})
    assert Counter.loads == 0  # nothing happens before load()
    with pytest.raises(RuntimeError, match="before load"):
        model.predict([1])
    model.load()
    assert Counter.loads == 1 and model.predict([1, 2]) == [22, 24]


def test_an_instance_is_used_as_it_is_and_load_is_optional():
    instance = RecordingModel(cost=0)
    model = as_model(instance)
    model.load()
    assert model.predict([3]) == [6] and instance.batches == [[3]]
    plain = as_model(NoLoad())
    plain.load()  # no load() method: fine
    assert plain.predict([1, 2, 3]) == [3, 2, 1]


def test_module_attr_references():
    function = as_model("tests.fakes:double")
    function.load()
    assert function.predict([4]) == [8]
    greeter = as_model("tests.fakes:Greeter")
    greeter.load()
    assert greeter.predict(["ada"])[0]["text"] == "hello ada"
    assert import_object("tests.fakes:Greeter.predict") is Greeter.predict  # dotted attributes


def test_a_module_in_the_working_directory_can_be_named(tmp_path, monkeypatch):
    (tmp_path / "my_local_model.py").write_text(textwrap.dedent("""
        def predict(batch):
            return [len(text) for text in batch]
    """))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_local_model", raising=False)
    try:
        assert as_model("my_local_model:predict").predict(["abc", "hello"]) == [3, 5]
    finally:
        sys.modules.pop("my_local_model", None)


@pytest.mark.parametrize(
    "reference, error, says",
    [
        ("tests.fakes", ValueError, "expected 'module:attribute'"),
        (":double", ValueError, "expected 'module:attribute'"),
        ("tests.fakes:", ValueError, "expected 'module:attribute'"),
        ("tests.no_such_module:double", ConfigError, "cannot import tests.no_such_module: No module named"),
        ("tests.fakes:no_such_model", ConfigError, "module tests.fakes has no attribute 'no_such_model'"),
        ("tests.fakes:Greeter.no_such_method", ConfigError, "tests.fakes:Greeter has no attribute 'no_such_method'"),
    ],
)
def test_bad_references_say_what_is_wrong(reference, error, says):
    with pytest.raises(error, match=says):
        as_model(reference)


class NoPredict:
    def load(self) -> None:
        pass


@pytest.mark.parametrize(
    "target, says",
    [
        (NoPredict, "NoPredict has no predict"),
        (42, "cannot use 42 as a model"),
        ("tests.fakes:__name__", "cannot use 'tests.fakes' as a model"),  # a reference to a non-model
    ],
)
def test_things_that_are_not_models_are_refused(target, says):
    with pytest.raises(TypeError, match=says):
        as_model(target)


def test_a_spec_builds_a_fresh_model_each_time():
    spec = ModelSpec(Counter, args=(1,))
    first, second = spec.build(), spec.build()
    first.load()
    second.load()
    assert first.instance is not second.instance
    assert first.predict([1]) == second.predict([1]) == [2]


@pytest.mark.parametrize("target", ["tests.fakes:Greeter", Greeter, double])
def test_a_spec_travels_by_reference(target):
    """Worker processes get the spec pickled over their local pipe: a reference, not weights."""
    copy = pickle.loads(pickle.dumps(ModelSpec(target)))
    model = copy.build()
    model.load()
    assert len(model.predict(["x"])) == 1


def test_a_spec_reads_what_the_model_declares_without_loading_it():
    class Declares:
        max_batch_tokens = 512
        loaded = False

        @staticmethod
        def batch_length(item) -> int:
            return len(item)

        def load(self) -> None:
            type(self).loaded = True

        def predict(self, batch):
            return batch

    spec = ModelSpec(Declares)
    assert spec.declared("max_batch_tokens") == 512 and spec.declared("batch_length")("abcd") == 4
    assert spec.declared("nothing_declared") is None and not Declares.loaded
    assert ModelSpec("tests.fakes:double").declared("max_batch_tokens") is None


@pytest.mark.parametrize(
    "target, name",
    [
        ("pkg.module:MyModel", "MyModel"),
        ("pkg:Outer.inner", "inner"),
        ("my_model:predict", "predict"),
        (double, "double"),
        (Greeter, "Greeter"),
        (Greeter(), "Greeter"),
    ],
)
def test_model_name_is_the_short_name_used_in_urls(target, name):
    assert model_name(target) == name
