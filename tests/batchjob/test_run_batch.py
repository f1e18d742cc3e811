"""`batchserve run-batch`: real processes on real files, the bundled embeddings model where the
answers matter, users' models from tests/fakes.py where the test is about the job itself
(resume, duplicates, bad lines, streaming)."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import orjson
import pytest
from pydantic import BaseModel, Field

from batchserve.batchjob.lines import Done, input_lines, read_done, scan_input
from batchserve.batchjob.progress import Counts, Progress
from batchserve.batchjob.runner import Job, JobOptions, LocalApp, job_settings
from batchserve.priority import is_offline
from batchserve.settings import BackendKind, Settings
from tests.conftest import ROOT
from tests.redis_fixtures import redis_server, start_worker, wait_for_workers  # noqa: F401  (fixtures)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchserve.cli", "run-batch", *args]


def run_batch(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def write_lines(path: Path, entries: list) -> Path:
    with open(path, "wb") as file:
        for entry in entries:
            file.write((entry if isinstance(entry, bytes) else orjson.dumps(entry)) + b"\n")
    return path


def line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def read(path: Path) -> list[dict]:
    return [orjson.loads(raw) for raw in path.read_bytes().splitlines()] if path.exists() else []


def ids(path: Path) -> list:
    return [entry["custom_id"] for entry in read(path)]


# --------------------------------------------------------------------------- the real model


def test_embeddings_lines_answered_in_openai_format_bad_lines_reported(tmp_path):
    sentences = [f"sentence number {i} about {'cats ' * (i % 7)}and dogs" for i in range(40)]
    entries = [line(f"s{i}", "/v1/embeddings", {"input": text}) for i, text in enumerate(sentences)]
    entries.insert(5, b"this is not json")
    entries.insert(9, line("two", "/v1/embeddings", {"input": ["first text", "second text"], "encoding_format": "float"}))
    entries.append(line("empty", "/v1/embeddings", {"input": ""}))
    entries.append(line("wrong-model", "/v1/embeddings", {"input": "x", "model": "gpt-4"}))
    entries.append(line("no-app", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
    entries.append(line("bad-url", "/v1/images", {"prompt": "x"}))
    entries.append({"custom_id": "get", "method": "GET", "url": "/v1/embeddings", "body": {}})
    entries.append({"method": "POST", "url": "/v1/embeddings", "body": {"input": "no custom id"}})
    source = write_lines(tmp_path / "in.jsonl", entries)
    output = tmp_path / "out.jsonl"

    result = run_batch("-i", str(source), "-o", str(output), "--backend", "process")  # serve's layout: a worker per core

    assert result.returncode == 0, result.stderr
    answered = {entry["custom_id"]: entry for entry in read(output)}
    assert sorted(answered) == sorted([f"s{i}" for i in range(40)] + ["two"])
    for entry in answered.values():
        assert entry["id"].startswith("batch_req_") and entry["error"] is None
        assert entry["response"]["status_code"] == 200 and entry["response"]["request_id"].startswith("req_")
        body = entry["response"]["body"]
        assert body["object"] == "list" and body["model"] == "all-MiniLM-L6-v2" and body["usage"]["prompt_tokens"] > 0
    vectors = {cid: np.array(answered[cid]["response"]["body"]["data"][0]["embedding"]) for cid in answered}
    assert all(vector.shape == (384,) and abs(np.linalg.norm(vector) - 1) < 1e-3 for vector in vectors.values())
    assert len(answered["two"]["response"]["body"]["data"]) == 2
    assert float(vectors["s1"] @ vectors["s8"]) > float(vectors["s1"] @ vectors["two"])  # similar sentences are near

    assert len(read(tmp_path / "out.errors.jsonl")) == 7
    errors = {entry["custom_id"]: entry for entry in read(tmp_path / "out.errors.jsonl")}
    assert errors["empty"]["response"]["status_code"] == 422
    assert "input texts must not be empty strings" in errors["empty"]["response"]["body"]["error"]["message"]
    assert errors["wrong-model"]["response"]["status_code"] == 404
    assert errors["wrong-model"]["response"]["body"]["error"]["code"] == "model_not_found"
    assert "--app generation" in errors["no-app"]["response"]["body"]["error"]["message"]
    assert errors["bad-url"]["response"] is None and errors["bad-url"]["error"]["code"] == "invalid_url"
    assert errors["get"]["error"]["code"] == "invalid_method"
    unnamed = [entry for entry in read(tmp_path / "out.errors.jsonl") if entry["custom_id"] is None]
    assert {entry["error"]["code"]: entry["error"]["line"] for entry in unnamed} == {"invalid_json_line": 6, "missing_custom_id": 48}
    assert "48 lines in" in result.stderr and "41 answered" in result.stderr and "7 errors" in result.stderr


# --------------------------------------------------------------------------- users' models


def test_user_model_lines_and_its_failures(tmp_path):
    entries = [line(f"n{i}", "/models/fragile/predict", {"inputs": [f"word{i}"]}) for i in range(30)]
    entries.append(line("boom", "/models/fragile/predict", {"inputs": ["boom"]}))
    entries.append(line("nobody", "/models/nobody/predict", {"inputs": [1]}))
    entries.append(line("no-inputs", "/models/fragile/predict", {"inputs": []}))
    source = write_lines(tmp_path / "in.jsonl", entries)
    output = tmp_path / "out.jsonl"

    result = run_batch("-i", str(source), "-o", str(output), "--model", "tests.fakes:fragile", "--quiet")

    assert result.returncode == 0, result.stderr
    assert "run-batch" not in result.stderr  # --quiet: the server's log of the model's error only
    assert {entry["custom_id"]: entry["response"]["body"]["outputs"] for entry in read(output)} == {
        f"n{i}": [f"WORD{i}"] for i in range(30)
    }
    errors = {entry["custom_id"]: entry["response"] for entry in read(tmp_path / "out.errors.jsonl")}
    assert errors["boom"]["status_code"] == 500 and "cannot handle boom" in orjson.dumps(errors["boom"]["body"]).decode()
    assert errors["nobody"]["status_code"] == 404 and "no model named 'nobody'" in orjson.dumps(errors["nobody"]).decode()
    assert errors["no-inputs"]["status_code"] == 422


def test_config_file_of_serve_is_read(tmp_path):
    config = tmp_path / "batchserve.yaml"
    config.write_text("models:\n  sizes:\n    model: tests.fakes:batch_sizes\n    max_batch_size: 3\n")
    source = write_lines(tmp_path / "in.jsonl", [line(f"b{i}", "/models/sizes/predict", {"inputs": [i]}) for i in range(24)])
    output = tmp_path / "out.jsonl"

    result = run_batch("-i", str(source), "-o", str(output), "--config", str(config), "--backend", "thread")

    assert result.returncode == 0, result.stderr
    sizes = [entry["response"]["body"]["outputs"][0] for entry in read(output)]
    assert len(sizes) == 24 and max(sizes) == 3  # the file's own max_batch_size, and batches did form


def test_duplicate_custom_ids_refused_before_anything_runs(tmp_path):
    entries = [line(f"d{i % 7}" if i in (3, 10, 12) else f"u{i}", "/models/echo/predict", {"inputs": [i]}) for i in range(20)]
    source = write_lines(tmp_path / "in.jsonl", entries)
    output = tmp_path / "out.jsonl"

    result = run_batch("-i", str(source), "-o", str(output), "--model", "tests.fakes:echo")

    assert result.returncode == 2
    assert "custom_id(s) given more than once" in result.stderr
    assert '"d3" on lines 4, 11' in result.stderr  # i=3 and i=10 are d3; line numbers from 1
    assert "nothing was run" in result.stderr
    assert not output.exists() or output.read_bytes() == b""


@pytest.mark.parametrize("problem, args, message", [
    ("missing input", ["-i", "nowhere.jsonl"], "no input file"),
    ("same file", ["-o", "{input}"], "three different files"),
])
def test_refused_jobs_exit_2(tmp_path, problem, args, message):
    source = write_lines(tmp_path / "in.jsonl", [line("a", "/models/echo/predict", {"inputs": [1]})])
    given = {"-i": str(source), "-o": str(tmp_path / "out.jsonl")}
    for flag, value in zip(args[::2], args[1::2]):
        given[flag] = value.format(input=source)
    result = run_batch(*[part for pair in given.items() for part in pair], "--model", "tests.fakes:echo")
    assert result.returncode == 2, problem
    assert message in result.stderr


@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_job_rerun_writes_every_line_once(tmp_path, sent):
    """A job stopped mid-way (Ctrl-C, SIGTERM, or killed outright) and run again: every
    custom_id once in the output, none twice, none lost."""
    count = 120
    source = write_lines(tmp_path / "in.jsonl", [line(f"k{i}", "/models/fixed_cost/predict", {"inputs": [i]}) for i in range(count)])
    output = tmp_path / "out.jsonl"
    args = ("-i", str(source), "-o", str(output), "--model", "tests.fakes:fixed_cost", "--backend", "thread",
            "--max-batch-size", "4", "--in-flight", "4", "--window", "16")
    process = subprocess.Popen(command(*args), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(ids(output)) < 20:
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read() if process.stderr else ""
            time.sleep(0.05)
        process.send_signal(sent)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    first = ids(output) if sent != signal.SIGKILL else None
    if sent == signal.SIGKILL:
        assert process.returncode == -signal.SIGKILL
    else:
        assert process.returncode == 128 + sent, stderr
        assert "run the same command again to finish" in stderr
        assert len(first) < count and len(set(first)) == len(first)

    result = run_batch(*args)

    assert result.returncode == 0, result.stderr
    answered = ids(output)
    assert sorted(answered) == sorted(f"k{i}" for i in range(count))  # each once
    assert all(entry["response"]["body"]["outputs"] == [int(entry["custom_id"][1:])] for entry in read(output))
    assert "done by an earlier run" in result.stderr
    if first is not None:
        assert answered[: len(first)] == first  # the first run's lines kept as they were

    again = run_batch(*args)
    assert again.returncode == 0 and "nothing to run" in again.stderr
    assert ids(output) == answered


def test_a_job_runs_its_models_here_unless_told_where():
    """No --backend: the models on a thread of the job (its front has little to do); one given,
    from a flag or the config file, is kept; the server's network settings never apply."""
    assert job_settings(Settings()).backend is BackendKind.thread
    assert job_settings(Settings(backend=BackendKind.process)).backend is BackendKind.process
    given = Settings.from_mapping({"backend": "redis", "redis_url": "redis://h:1", "http_workers": 4, "api_keys": ["k1"]})
    settings = job_settings(given)
    assert settings.backend is BackendKind.redis and settings.redis.redis_url == "redis://h:1"
    assert settings.server.http_workers == 1 and settings.server.api_keys == [] and not settings.server.metrics


def test_cut_last_line_is_removed_and_its_request_rerun(tmp_path):
    output = tmp_path / "out.jsonl"
    whole = b'{"id":"batch_req_1","custom_id":"a","response":{"status_code":200,"request_id":"req_1","body":{}},"error":null}\n'
    output.write_bytes(whole + b'{"id":"batch_req_2","custom_id":"b","respo')
    done = Done()
    read_done(output, done)
    assert done.ids == {"a"} and output.read_bytes() == whole
    errors = tmp_path / "out.errors.jsonl"
    errors.write_bytes(b'{"id":"x","custom_id":null,"response":null,"error":{"code":"invalid_json_line","message":"m","line":7}}\n')
    read_done(errors, done)
    assert done.lines == {7} and done.has(None, 7) and not done.has(None, 8) and done.has("a", 1)
    source = write_lines(tmp_path / "in.jsonl", [line("a", "/x", {}), line("b", "/x", {})] + [b"junk"] * 5 + [b"junk"])
    scan = scan_input(source, done)
    assert (scan.lines, scan.to_run) == (8, 6)  # a and line 7 done


def test_not_an_output_file_refused(tmp_path):
    output = tmp_path / "notes.jsonl"
    output.write_text("my precious notes\nmore\n")
    source = write_lines(tmp_path / "in.jsonl", [line("a", "/models/echo/predict", {"inputs": [1]})])
    result = run_batch("-i", str(source), "-o", str(output), "--model", "tests.fakes:echo")
    assert result.returncode == 2 and "is not a batch output line" in result.stderr
    assert output.read_text() == "my precious notes\nmore\n"


# --------------------------------------------------------------------------- progress


def test_plain_progress_lines_when_not_a_terminal(tmp_path):
    source = write_lines(tmp_path / "in.jsonl", [line(f"p{i}", "/models/fixed_cost/predict", {"inputs": [i]}) for i in range(40)])
    result = run_batch(
        "-i", str(source), "-o", str(tmp_path / "out.jsonl"), "--model", "tests.fakes:fixed_cost",
        "--backend", "thread", "--max-batch-size", "4", "--in-flight", "4", "--log-every", "0.2",
    )
    assert result.returncode == 0, result.stderr
    progress = [text for text in result.stderr.splitlines() if text.startswith("run-batch: ") and "/40 lines" in text]
    assert len(progress) >= 3, result.stderr
    assert "lines/s" in progress[-1] and "errors" in progress[-1]
    assert "\x1b[" not in result.stderr  # no terminal codes in a log
    assert result.stderr.splitlines()[-1].startswith("run-batch: 40 lines in ")


def test_progress_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Terminal()
    counts = Counts(total=10)
    progress = Progress(counts, stream=stream)
    progress.start()
    counts.answered, counts.errors = 6, 1
    progress.advance()
    progress.stop()
    shown = stream.getvalue()
    assert "7/10" in shown and "1 errors" in shown and "lines/s" in shown


# --------------------------------------------------------------------------- streaming


def _peak_rss_kib(args: tuple[str, ...]) -> int:
    process = subprocess.Popen(command(*args), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    stderr = process.stderr.read().decode() if process.stderr else ""
    process.stderr.close() if process.stderr else None
    assert process.returncode == 0, stderr
    return usage.ru_maxrss


def test_input_is_streamed_memory_stays_flat(tmp_path):
    """Four times the lines (60 MB of input more than the small job) and the peak memory
    hardly moves: the file is never held whole, nor the answers."""
    padding = "x" * 4000

    def job(count: int, name: str) -> tuple[str, ...]:
        source = tmp_path / f"{name}.jsonl"
        with open(source, "wb") as file:
            for i in range(count):
                file.write(orjson.dumps(line(f"{name}{i}", "/models/echo/predict", {"inputs": [padding + str(i)]})) + b"\n")
        return ("-i", str(source), "-o", str(tmp_path / f"{name}.out.jsonl"), "--model", "tests.fakes:echo",
                "--backend", "thread", "--quiet")

    small, large = job(5_000, "small"), job(20_000, "large")
    small_rss, large_rss = _peak_rss_kib(small), _peak_rss_kib(large)
    assert len(ids(tmp_path / "large.out.jsonl")) == 20_000
    assert large_rss < small_rss * 1.1, (small_rss, large_rss)


def test_generation_lines_get_what_the_server_answers(tmp_path, generation_server):
    """Chat and completions lines, greedy: the same text as the online server's routes give."""
    import httpx

    bodies = {
        "chat": ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 6, "temperature": 0}),
        "completion": ("/v1/completions", {"prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}),
        "streamed": ("/v1/completions", {"prompt": "x", "max_tokens": 2, "stream": True}),
        "bad": ("/v1/chat/completions", {"messages": "hi"}),
    }
    source = write_lines(tmp_path / "in.jsonl", [line(name, url, body) for name, (url, body) in bodies.items()])
    output = tmp_path / "out.jsonl"

    result = run_batch("-i", str(source), "-o", str(output), "--app", "generation", "--generation-threads", "1", timeout=300)

    assert result.returncode == 0, result.stderr
    answered = {entry["custom_id"]: entry["response"]["body"] for entry in read(output)}
    assert sorted(answered) == ["chat", "completion"]
    online = {name: httpx.post(generation_server.url + bodies[name][0], json=bodies[name][1], timeout=120).json()
              for name in answered}
    assert answered["chat"]["choices"][0]["message"]["content"] == online["chat"]["choices"][0]["message"]["content"]
    assert answered["completion"]["choices"][0]["text"] == online["completion"]["choices"][0]["text"]
    assert answered["chat"]["usage"] == online["chat"]["usage"]
    errors = {entry["custom_id"]: entry for entry in read(tmp_path / "out.errors.jsonl")}
    assert errors["streamed"]["error"]["code"] == "invalid_body" and "stream" in errors["streamed"]["error"]["message"]
    assert errors["bad"]["response"]["status_code"] == 422
    assert errors["bad"]["response"]["body"]["error"]["param"] == "messages"


def test_redis_backend_sends_the_batches_to_the_worker_fleet(tmp_path, redis_server, start_worker):
    """With serve's --backend redis the job is one more front: its batches go to the workers
    on the same stream as online traffic."""
    url = redis_server.url()
    start_worker("--redis-url", url, "--model", "tests.fakes:batch_sizes")
    client = redis_server.client()
    wait_for_workers(client, "batch_sizes", 1)
    source = write_lines(tmp_path / "in.jsonl", [line(f"r{i}", "/models/batch_sizes/predict", {"inputs": [i]}) for i in range(200)])
    output = tmp_path / "out.jsonl"

    result = run_batch("-i", str(source), "-o", str(output), "--model", "tests.fakes:batch_sizes",
                       "--backend", "redis", "--redis-url", url)

    assert result.returncode == 0, result.stderr
    assert sorted(ids(output)) == sorted(f"r{i}" for i in range(200))
    consumers = [key for key in client.keys("batchserve::batch_sizes:workers:*")]
    assert len(consumers) == 1
    deadline = time.monotonic() + 30  # the worker writes its counters with its lease, every few seconds
    while int(client.hget(consumers[0], "batches") or 0) == 0 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert int(client.hget(consumers[0], "batches")) >= 200 // 64  # the worker ran them
    assert max(entry["response"]["body"]["outputs"][0] for entry in read(output)) > 1  # in batches


def test_a_jobs_requests_are_offline_work(tmp_path):
    """Everything a job submits is marked offline (batchserve.priority), so the batchers, the engine
    and the Redis streams serve online requests first; the app called sees the mark."""
    seen: list[bool] = []

    async def app(scope, receive, send):
        await receive()
        seen.append(is_offline())
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": b"{}"})

    source = write_lines(tmp_path / "in.jsonl", [
        {"custom_id": f"r{i}", "method": "POST", "url": "/v1/embeddings", "body": {"input": "x"}} for i in range(5)
    ])
    options = JobOptions(input=source, output=tmp_path / "out.jsonl", errors=tmp_path / "err.jsonl", quiet=True)
    counts = Counts(total=5)
    asyncio.run(Job(LocalApp(app), options, counts, Progress(counts, quiet=True), deadline=5).run(input_lines(source), Done()))
    assert seen == [True] * 5 and not is_offline()


# --------------------------------------------------------------------------- the direct call


class Texts(BaseModel):
    texts: list[str] = Field(min_length=1)


def direct_app():
    """An app as create_app builds one (error handlers, body limit): a JSON route of the apps'
    kind that raises each kind of error on demand, and a route of another kind."""
    from fastapi import APIRouter, Depends, FastAPI

    from batchserve.apps.base import deadline_dependency
    from batchserve.errors import InputError, OverloadedError
    from batchserve.server.errors import install_error_handlers
    from batchserve.server.json_response import FastJSONResponse
    from batchserve.server.json_route import JSONBodyRoute
    from batchserve.server.limits import BodyLimitMiddleware

    app = FastAPI()
    install_error_handlers(app)
    router = APIRouter(route_class=JSONBodyRoute)
    timeout = deadline_dependency(Settings())

    @router.post("/items/{name}")
    async def items(name: str, body: Texts, seconds: float = Depends(timeout)):
        if body.texts[0] == "refuse":
            raise InputError("the first text says refuse", param="texts")
        if body.texts[0] == "full":
            raise OverloadedError(retry_after=2.5)
        if body.texts[0] == "crash":
            raise RuntimeError("secret detail")
        return FastJSONResponse({"name": name, "texts": body.texts, "seconds": seconds})

    @app.post("/other")
    async def other(body: Texts):
        return {"other": body.texts}

    app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, max_bytes=200)
    return app


JSON = [(b"content-type", b"application/json")]
DIRECT_REQUESTS = [  # (path, body, headers, whether the route is called directly)
    ("/items/a", b'{"texts": ["x", "y"]}', JSON, True),
    ("/items/b", b'{"texts": ["x"]}', [*JSON, (b"x-request-timeout", b"2.5")], True),
    ("/items/c", b'{"texts": ["refuse"]}', JSON, True),
    ("/items/d", b'{"texts": ["full"]}', JSON, True),
    ("/items/e", b'{"texts": ["crash"]}', JSON, True),
    ("/items/f", b'{"texts": []}', JSON, False),  # does not validate: the whole app answers 422
    ("/items/g", b"{not json", JSON, False),
    ("/items/h", b'{"texts": ["' + b"x" * 300 + b'"]}', JSON, False),  # over the body limit: 413
    ("/items/i", b'{"texts": ["x"]}', [(b"content-type", b"text/plain")], False),
    ("/other", b'{"texts": ["x"]}', JSON, False),
    ("/nowhere", b'{"texts": ["x"]}', JSON, False),
]


@pytest.mark.parametrize("path, body, headers, direct", DIRECT_REQUESTS, ids=[r[0] for r in DIRECT_REQUESTS])
def test_local_app_calls_json_routes_directly_and_answers_as_the_app_does(path, body, headers, direct, monkeypatch):
    """A job's line skips the middleware and the router when its route can be called directly
    (the job's CPU is the model's on a small machine: docs/batch.md); every answer, errors
    included, is the one a client gets from the whole app over HTTP."""
    import httpx

    async def both():
        app = direct_app()
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://run-batch") as client:
            reply = await client.post(path, content=body, headers=[(k.decode(), v.decode()) for k, v in headers])
        whole = (reply.status_code, reply.headers.get("content-type", ""), orjson.loads(reply.content))
        through_app = []
        original = app.__call__

        async def counting(scope, receive, send):
            through_app.append(scope["path"])
            await original(scope, receive, send)

        monkeypatch.setattr(type(app), "__call__", lambda self, *args: counting(*args))
        local = LocalApp(app, max_body_bytes=200)
        status, content_type, answer = await local.post(path, body, headers)
        return whole, (status, content_type, orjson.loads(answer)), through_app

    whole, local, through_app = asyncio.run(both())
    assert local == whole
    assert through_app == ([] if direct else [path])


def test_a_window_is_sorted_by_length_except_for_models_that_do_not_pad_rows(tmp_path):
    """Embeddings lines go shortest first (less padding); generation lines on llama.cpp, which
    pads nothing, keep the file's order (sorting them cost about 5 %: docs/batch.md)."""
    from batchserve.server.app import create_app

    app = create_app(job_settings(Settings.from_options(apps=["embeddings", "generation"], generation_runtime="llama.cpp")))
    local = LocalApp(app)
    assert {"/v1/chat/completions", "/v1/completions", "/autocomplete"} <= local.in_file_order
    assert "/v1/embeddings" not in local.in_file_order
    torch = create_app(job_settings(Settings.from_options(apps=["generation"], generation_runtime="torch")))
    assert not LocalApp(torch).in_file_order  # the torch runtime left-pads its rows: sorted

    texts = ["a much longer text than the others", "short", "a medium text"]
    entries = [line(f"e{i}", "/v1/embeddings", {"input": text}) for i, text in enumerate(texts)]
    entries += [line(f"g{i}", "/v1/completions", {"prompt": text}) for i, text in enumerate(texts)]
    source = write_lines(tmp_path / "in.jsonl", entries)
    options = JobOptions(input=source, output=tmp_path / "out.jsonl", errors=tmp_path / "err.jsonl", window=6)
    job = Job(local, options, Counts(total=6), Progress(Counts(total=6), quiet=True), deadline=5)
    (window,) = job._windows(input_lines(source), Done())
    assert [request.custom_id for request in window] == ["g0", "g1", "g2", "e1", "e2", "e0"]
