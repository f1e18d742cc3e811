"""service-streamer compatibility: the same outputs as the model itself, errors reach callers."""

from __future__ import annotations

import concurrent.futures
import os
import time

import numpy as np
import pytest

from batchserve.compat import ManagedModel, Streamer, ThreadedStreamer
from batchserve.errors import ModelError, NotReadyError
from examples.embedding_service import ManagedEmbedder, build_app
from tests.compat_models import EnvReporter, FailsToLoad, square_or_fail

SENTENCES = [
    "The Art of Dog Walking",
    "Learn The Art of Public Speaking",
    "Dog Walking: 10 Simple Steps",
    "Master The Art of Public Speaking",
    "twinkle twinkle little star",
    "a",
    "The quick brown fox jumps over the lazy dog, and then it runs far away into the forest.",
] * 8  # 56 sentences, some repeated, of very different lengths


@pytest.fixture(scope="module")
def direct_embedder() -> ManagedEmbedder:
    """The model called directly, in this process: the reference outputs."""
    model = ManagedEmbedder(None)
    model.init_model()
    return model


@pytest.fixture(scope="module")
def embedding_streamer(direct_embedder):
    """Two worker processes forked after this process loaded a ManagedEmbedder once.

    Forked, not spawned (service-streamer's default, tested with small models below), so
    that the test pays for importing the framework once, not three times.
    """
    streamer = Streamer(
        ManagedEmbedder, batch_size=16, max_latency=0.02, worker_num=2,
        mp_start_method="fork", wait_for_worker_ready=True, worker_timeout=120,
    )
    yield streamer
    streamer.destroy_workers()


def assert_same_vectors(got: list, expected: list) -> None:
    assert len(got) == len(expected)
    np.testing.assert_allclose(np.array(got), np.array(expected), atol=1e-4)


def test_managed_model_through_two_worker_processes(embedding_streamer, direct_embedder):
    expected = direct_embedder.predict(SENTENCES)
    assert_same_vectors(embedding_streamer.predict(SENTENCES), expected)
    # concurrent callers, batched together across both workers
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        parts = list(pool.map(embedding_streamer.predict, [SENTENCES[i::8] for i in range(8)]))
    for index, part in enumerate(parts):
        assert_same_vectors(part, expected[index::8])


def test_fifty_submit_futures(embedding_streamer, direct_embedder):
    expected = direct_embedder.predict(SENTENCES[:50])
    futures = [embedding_streamer.submit([sentence]) for sentence in SENTENCES[:50]]
    results = [future.result(timeout=120) for future in futures]
    assert all(len(result) == 1 for result in results)
    assert_same_vectors([result[0] for result in results], expected)


def test_threaded_streamer_with_a_plain_function(direct_embedder):
    streamer = ThreadedStreamer(direct_embedder.predict, batch_size=8, max_latency=0.02, worker_timeout=120)
    try:
        expected = direct_embedder.predict(SENTENCES)
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            parts = list(pool.map(streamer.predict, [SENTENCES[i::8] for i in range(8)]))
        for index, part in enumerate(parts):
            assert_same_vectors(part, expected[index::8])
        futures = [streamer.submit([sentence]) for sentence in SENTENCES[:50]]
        assert_same_vectors([future.result()[0] for future in futures], expected[:50])
    finally:
        streamer.destroy_workers()


def test_a_string_is_refused_not_split_into_characters():
    streamer = ThreadedStreamer(lambda batch: [len(text) for text in batch], batch_size=4, max_latency=0.0, worker_timeout=10)
    try:
        with pytest.raises(TypeError, match="for one input pass"):
            streamer.predict("abc")  # was [1, 1, 1]: three one-character inputs
        assert streamer.predict(["abc"]) == [3]
        assert streamer.predict(iter(["ab", "c"])) == [2, 1]  # any iterable of inputs still works
    finally:
        streamer.destroy_workers()


def test_example_http_service(embedding_streamer, direct_embedder):
    from fastapi.testclient import TestClient

    with TestClient(build_app(embedding_streamer)) as client:
        response = client.post("/embed", json=SENTENCES[:3])
    assert response.status_code == 200
    assert_same_vectors(response.json(), direct_embedder.predict(SENTENCES[:3]))


@pytest.mark.parametrize("kind", ["threaded", "spawn", "fork"])
def test_an_exception_in_predict_reaches_its_caller(kind):
    if kind == "threaded":
        streamer = ThreadedStreamer(square_or_fail, batch_size=8, max_latency=0.05)
    else:  # not waiting for the workers: the first call waits for them
        streamer = Streamer(square_or_fail, batch_size=8, max_latency=0.05, worker_num=2, mp_start_method=kind)
    try:
        assert streamer.predict([2, 3]) == [4, 9]
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            good = [pool.submit(streamer.predict, [n]) for n in range(5)]
            bad = pool.submit(streamer.predict, ["boom"])
            assert [future.result(timeout=20) for future in good] == [[n * n] for n in range(5)]
            with pytest.raises(ModelError, match="ValueError: boom is not a number"):
                bad.result(timeout=20)
        with pytest.raises(ModelError, match="boom"):
            streamer.submit([1, "boom"]).result()
        assert streamer.predict([5]) == [25]  # still serving
        assert streamer.predict([]) == []
    finally:
        streamer.destroy_workers()
    with pytest.raises(NotReadyError, match="destroy_workers"):
        streamer.predict([1])


def test_four_workers_round_robin_over_gpus_without_needing_one():
    streamer = Streamer(
        EnvReporter, batch_size=2, max_latency=0.01, worker_num=4, cuda_devices=(0, 1),
        model_init_kwargs={"delay": 0.05}, wait_for_worker_ready=True,
    )
    try:
        futures = [streamer.submit([n]) for n in range(40)]
        reports = [future.result(timeout=30)[0] for future in futures]
        pids = {report["pid"] for report in reports}
    finally:
        streamer.destroy_workers()
    assert [report["item"] for report in reports] == list(range(40))
    assert len(pids) == 4, "all four workers served"
    seen = {int(report["slot"]): report["cuda_visible_devices"] for report in reports}
    assert [seen[slot] for slot in range(4)] == ["0", "1", "0", "1"]
    assert all(report["gpu_id"] == int(report["cuda_visible_devices"]) for report in reports)
    for pid in pids:  # destroy_workers stopped and reaped them
        assert not os.path.exists(f"/proc/{pid}")


def test_a_model_that_fails_to_load_fails_every_call_with_its_message():
    with pytest.raises(ModelError, match="RuntimeError: weights not found"):
        Streamer(FailsToLoad, batch_size=4, wait_for_worker_ready=True)
    streamer = Streamer(FailsToLoad, batch_size=4)  # returns at once; the calls get the error
    try:
        with pytest.raises(ModelError, match="weights not found"):
            streamer.predict([1])
    finally:
        streamer.destroy_workers()


def test_no_call_waits_past_worker_timeout():
    model = EnvReporter()
    model.init_model(delay=2.0)
    streamer = ThreadedStreamer(model.predict, batch_size=4, worker_timeout=0.3)
    try:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            streamer.predict([1])
        with pytest.raises(TimeoutError):
            streamer.submit([2]).result(timeout=None)
        assert time.monotonic() - started < 1.5
    finally:
        streamer.destroy_workers()


@pytest.mark.parametrize("kind", ["threaded", "spawn"])
def test_destroy_workers_lets_submitted_work_finish(kind):
    # the README's snippet: submit() ("result() later"), then destroy_workers()
    if kind == "threaded":
        model = EnvReporter()
        model.init_model(delay=0.2)
        streamer = ThreadedStreamer(model.predict, batch_size=2, max_latency=0.01)
    else:
        streamer = Streamer(EnvReporter, batch_size=2, max_latency=0.01, model_init_kwargs={"delay": 0.2},
                            wait_for_worker_ready=True, mp_start_method="spawn")
    futures = [streamer.submit([n]) for n in range(6)]  # three batches of two, one after another
    streamer.destroy_workers()
    assert [future.result(timeout=0)[0]["item"] for future in futures] == list(range(6))
    with pytest.raises(NotReadyError, match="destroy_workers"):
        streamer.submit([1])


def test_destroy_workers_waits_no_longer_than_its_timeout():
    model = EnvReporter()
    model.init_model(delay=2.0)
    streamer = ThreadedStreamer(model.predict, batch_size=1, worker_timeout=30)
    futures = [streamer.submit([n]) for n in range(3)]
    started = time.monotonic()
    streamer.destroy_workers(timeout=0.5)
    assert time.monotonic() - started < 1.8  # the batch that ran is abandoned when the loop stops
    for future in futures:
        with pytest.raises(NotReadyError, match="shut down"):
            future.result(timeout=0)


def test_managed_model_base_and_alias_module():
    import batchserve.service_streamer as service_streamer

    assert service_streamer.Streamer is Streamer and service_streamer.ManagedModel is ManagedModel
    saved = os.environ.get("CUDA_VISIBLE_DEVICES")
    try:
        ManagedModel(0)  # GPU 0 is a GPU
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    finally:
        if saved is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
    with pytest.raises(NotImplementedError):
        ManagedModel().predict([1])
