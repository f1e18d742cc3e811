"""The rendered cpu overlay, run as pods on this machine with `podman kube play` (`make k8s-test`).

podman 4.3 plays Pods and Deployments (one replica), ConfigMaps (as volumes) and Secrets, not
a cluster: what the test adapts from `kubectl kustomize deploy/k8s/overlays/cpu`, exactly:

* kept: the front and worker Deployments as rendered (image, command, args, env from the
  Secret, the ConfigMap mounted at /etc/batchserve, probes, grace periods) and the ConfigMap,
  played with them;
* the Secret is created with ``podman secret create`` as a JSON object of its keys and base64
  values: podman 4.3 stores a Secret played from YAML as YAML, and a ``secretKeyRef`` to it
  then fails ("not valid JSON");
* podman 4.3 passes ``$(VAR)`` in ``args`` on as it is (Kubernetes replaces it with the
  container's variable): the test replaces them, as Kubernetes would (the Redis URL's password
  and host);
* the Namespace, Services, PodDisruptionBudgets and the Redis StatefulSet are left out: there
  is no cluster DNS, no scheduler and no ``redis:7.2`` image offline.  Redis is a
  ``redis-server`` on this host with the Secret's password (the base's "external Redis" case),
  and ``REDIS_HOST`` points at it;
* every pod shares the host's network (``--network host``: no pod network here), so the
  ConfigMap's ``port`` and the Redis URL's port become free ports, and the front's
  ``containerPort`` goes (podman refuses port mappings on the host's network): its probes get
  the port's number instead of its name;
* ``replicas: 1`` (podman starts one pod per Deployment) and the objects' names get a unique
  suffix, so nothing collides with other pods; a second worker is the worker Deployment under
  another name, played and stopped on its own;
* ``resources`` are dropped: the worker asks for 2 cores, this whole machine's; podman is not
  asked to enforce requests or limits here.

podman runs with a containers.conf of its own (``CONTAINERS_CONF``: cgroupfs, runc and the
nofile/nproc limits, see issue 19); nothing global is changed.  Every pod it played, and the
secret and volumes (podman makes one of a ConfigMap) named with the test's suffix, are removed
at the end, pass or fail.
"""

from __future__ import annotations

import base64
import concurrent.futures
import copy
import json
import os
import re
import shutil
import subprocess
import threading
import time
import uuid

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port

IMAGE = "localhost/batchserve:latest"
READY_TIMEOUT = 300.0  # a loaded 2-core machine: podman start + the model's load
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
"""


def _image_present() -> bool:
    if not shutil.which("podman"):
        return False
    return subprocess.run(["podman", "image", "exists", IMAGE], capture_output=True).returncode == 0


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl renders the overlay (make system-deps)"),
]


def render(overlay: str = "cpu") -> list[dict]:
    text = subprocess.run(["kubectl", "kustomize", str(ROOT / "deploy" / "k8s" / "overlays" / overlay)],
                          check=True, capture_output=True, text=True).stdout
    return [doc for doc in yaml.safe_load_all(text) if doc]


def expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` references to the container's environment, replaced (``$$`` is a ``$``)."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)",
                  lambda match: "$" if match.group(0) == "$$" else values.get(match.group(1), match.group(0)), text)


def adapt(objects: list[dict], suffix: str, front_port: int, redis_port: int) -> dict[str, list[dict]]:
    """The playable objects (see the module docstring): {"front": [...], "worker": [...]}, each
    list the ConfigMap and one Deployment, and "secret": the Secret, renamed."""
    by_kind: dict[str, dict[str, dict]] = {}
    for obj in objects:
        by_kind.setdefault(obj["kind"], {})[obj["metadata"]["name"]] = copy.deepcopy(obj)
    config = by_kind["ConfigMap"]["batchserve-config"]
    secret = by_kind["Secret"]["batchserve-secrets"]
    text = config["data"]["batchserve.yaml"]
    assert "port: 8000" in text
    config["data"]["batchserve.yaml"] = text.replace("port: 8000", f"port: {front_port}")
    renamed = {"batchserve-config": f"batchserve-config-{suffix}", "batchserve-secrets": f"batchserve-secrets-{suffix}"}
    config["metadata"]["name"] = renamed["batchserve-config"]
    secret["metadata"]["name"] = renamed["batchserve-secrets"]
    for obj in (config, secret):
        obj["metadata"].pop("namespace", None)
    shared = [config]  # the Secret is created apart (Podman.create_secret)
    played = {}
    for role in ("front", "worker"):
        deployment = by_kind["Deployment"][f"batchserve-{role}"]
        deployment["metadata"]["name"] = f"bs-{role}-{suffix}"
        deployment["metadata"].pop("namespace", None)
        deployment["spec"]["replicas"] = 1
        spec = deployment["spec"]["template"]["spec"]
        for container in spec["containers"]:
            container.pop("resources", None)
            ports = {port["name"]: port["containerPort"] for port in container.pop("ports", [])}
            for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
                action = container.get(probe, {}).get("httpGet")
                if action and action["port"] in ports:  # the named port, on the host's network
                    action["port"] = front_port
            values = {}
            for env in container.get("env", []):
                if env["name"] == "REDIS_HOST":
                    env["value"] = "127.0.0.1"
                reference = env.get("valueFrom", {}).get("secretKeyRef")
                if reference:
                    values[env["name"]] = secret["stringData"][reference["key"]]
                    reference["name"] = renamed[reference["name"]]
                else:
                    values[env["name"]] = env["value"]
            container["args"] = [expand(arg, values).replace(":6379/", f":{redis_port}/") for arg in container["args"]]
        for volume in spec.get("volumes", []):
            if "configMap" in volume:
                volume["configMap"]["name"] = renamed[volume["configMap"]["name"]]
        played[role] = [*shared, deployment]
    played["secret"] = secret
    return played


class Podman:
    """`podman kube play` with this test's containers.conf; remembers every pod it played."""

    def __init__(self, workdir):
        self.workdir = workdir
        conf = workdir / "containers.conf"
        conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(conf)}

    def run(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        done = subprocess.run(["podman", *args], capture_output=True, text=True, env=self.env, timeout=timeout)
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        return done

    def create_secret(self, secret: dict) -> None:
        """The Secret as a podman secret: a JSON object of its keys and base64 values, what podman 4.3
        reads behind a ``secretKeyRef`` (a Secret played from YAML is stored as YAML, and a
        Secret object as JSON is refused too: "secret ... is not valid JSON")."""
        data = {key: base64.b64encode(value.encode()).decode() for key, value in secret["stringData"].items()}
        path = self.workdir / "secret.json"
        path.write_text(json.dumps(data))
        self.run("secret", "create", secret["metadata"]["name"], str(path))
        path.unlink()

    def play(self, name: str, objects: list[dict]) -> None:
        path = self.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        self.run("kube", "play", "--network", "host", str(path))

    def pod(self, deployment: str) -> str:
        """The pod podman made of a Deployment (``NAME-pod-0`` in 4.3)."""
        names = self.run("pod", "ps", "--format", "{{.Name}}", "--filter", f"name={deployment}-pod").stdout.split()
        assert len(names) == 1, f"pods of {deployment}: {names}"
        return names[0]

    def stop(self, pod: str, timeout: int) -> float:
        """`podman pod stop` (SIGTERM, then SIGKILL after ``timeout``); seconds it took."""
        started = time.monotonic()
        self.run("pod", "stop", "-t", str(timeout), pod, timeout=timeout + 60)
        return time.monotonic() - started

    def logs(self, pod: str) -> str:
        done = self.run("pod", "logs", pod, check=False)
        return done.stdout + done.stderr

    def remove_all(self, suffix: str) -> None:
        """Every pod, secret and volume (podman makes one of each ConfigMap) named with this test's suffix."""
        for kind, listing in (("pod", ["pod", "ps", "--format", "{{.Name}}"]), ("secret", ["secret", "ls", "--format", "{{.Name}}"]),
                              ("volume", ["volume", "ls", "--format", "{{.Name}}"])):
            for name in self.run(*listing, check=False).stdout.split():
                if suffix in name:
                    self.run(kind, "rm", *({"pod": ["-f", "-t", "0"], "volume": ["-f"]}.get(kind, [])), name, check=False)

    def leftovers(self, suffix: str) -> list[str]:
        found = []
        for listing in (["pod", "ps"], ["secret", "ls"], ["volume", "ls"]):
            found += [name for name in self.run(*listing, "--format", "{{.Name}}", check=False).stdout.split() if suffix in name]
        return found


@pytest.fixture
def redis_host(tmp_path):
    """A redis-server on this host (the overlay's Redis, external): its port and password."""
    port, password = free_port(), "pw-" + uuid.uuid4().hex
    process = subprocess.Popen(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(0.3)
    yield port, password
    process.kill()
    process.wait()


def _wait(condition, timeout: float, what: str, logs=lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(1)
    raise AssertionError(f"{what} not within {timeout:g} s\n{logs()}")


def _readyz(url: str) -> dict | None:
    try:
        response = httpx.get(f"{url}/readyz", timeout=5)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _workers(url: str) -> int:
    ready = _readyz(url) or {}
    found = [value for value in _walk(ready) if isinstance(value, dict) and "workers" in value]
    return max((entry["workers"] for entry in found if isinstance(entry["workers"], int)), default=0)


def _items_per_worker(redis_port: int, password: str) -> dict[str, int]:
    """Items each worker computed, from the counters every worker keeps in Redis."""
    import redis

    client = redis.Redis(port=redis_port, password=password)
    try:
        return {key.decode().rpartition(":")[2]: int(client.hget(key, "items") or 0)
                for key in client.scan_iter("batchserve::all-MiniLM-L6-v2:workers:*")}
    finally:
        client.close()


def _walk(value):
    yield value
    if isinstance(value, dict):
        for item in value.values():
            yield from _walk(item)
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item)


def test_cpu_overlay_plays_answers_and_scales_a_worker_under_load(tmp_path, redis_host):
    if not _image_present():  # asked here, not at collection: `make test` collects this module too
        pytest.skip(f"podman and the image {IMAGE} (make image) are needed")
    redis_port, password = redis_host
    suffix = uuid.uuid4().hex[:6]
    front_port = free_port()
    objects = render("cpu")
    for obj in objects:  # the Secret's values, as a user sets them before applying
        if obj["kind"] == "Secret":
            obj["stringData"]["redis-password"] = password
            api_key = obj["stringData"]["api-key"] = "key-" + uuid.uuid4().hex
    played = adapt(objects, suffix, front_port, redis_port)
    secret = played.pop("secret")
    second = copy.deepcopy(played["worker"])
    second[-1]["metadata"]["name"] = f"bs-worker2-{suffix}"
    url = f"http://127.0.0.1:{front_port}"
    headers = {"Authorization": f"Bearer {api_key}"}
    podman = Podman(tmp_path)
    try:
        podman.create_secret(secret)
        podman.play("worker", played["worker"])
        podman.play("front", played["front"])
        front_pod, worker_pod = podman.pod(f"bs-front-{suffix}"), podman.pod(f"bs-worker-{suffix}")
        _wait(lambda: _workers(url) >= 1, READY_TIMEOUT, "the front ready with a worker",
              lambda: podman.logs(front_pod)[-3000:] + podman.logs(worker_pod)[-3000:])

        # an embeddings request through the front, with the Secret's API key (and refused without it)
        response = httpx.post(f"{url}/v1/embeddings", json={"input": ["hello from a pod"]}, headers=headers, timeout=60)
        assert response.status_code == 200, response.text
        assert len(response.json()["data"][0]["embedding"]) == 384
        assert httpx.post(f"{url}/v1/embeddings", json={"input": "x"}, timeout=30).status_code == 401

        # steady load; a second worker pod added, serving, then stopped: no request fails
        stop = threading.Event()
        statuses: dict[int | str, int] = {}
        lock = threading.Lock()

        def client(index: int) -> None:
            with httpx.Client(timeout=60) as http:
                while not stop.is_set():
                    try:
                        status = http.post(f"{url}/v1/embeddings", json={"input": [f"load {index} {time.time()}"]},
                                           headers=headers).status_code
                    except httpx.HTTPError as error:
                        status = type(error).__name__
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            clients = [pool.submit(client, index) for index in range(8)]
            try:
                time.sleep(5)
                podman.play("worker2", second)
                worker2_pod = podman.pod(f"bs-worker2-{suffix}")
                _wait(lambda: _workers(url) >= 2, READY_TIMEOUT, "the second worker's lease",
                      lambda: podman.logs(worker2_pod)[-3000:])
                time.sleep(10)  # both serve
                computed = _items_per_worker(redis_port, password)
                grace = second[-1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                stopped_in = podman.stop(worker2_pod, grace)
                _wait(lambda: _workers(url) == 1, 30, "the second worker's lease gone")
                time.sleep(5)  # the first worker alone again
            finally:
                stop.set()
                for future in clients:
                    future.result()
        worker2_logs = podman.logs(worker2_pod)
        exit_code = podman.run("inspect", "--format", "{{.State.ExitCode}}", f"{worker2_pod}-worker").stdout.strip()
        print(f"under load: {statuses}; items computed per worker: {computed}; the second worker pod stopped "
              f"in {stopped_in:.1f} s (grace {grace} s), exit {exit_code}")
        assert len(computed) == 2 and all(items > 0 for items in computed.values()), f"both worker pods computed: {computed}"
        assert exit_code == "0", f"the stopped worker exited with {exit_code}\n{worker2_logs[-3000:]}"
        assert stopped_in < grace, f"the worker pod took {stopped_in:.0f} s to stop (grace {grace} s): it was killed"
        assert "Traceback" not in worker2_logs, worker2_logs[-3000:]
        assert set(statuses) == {200}, f"every request under load answered 200: {statuses}"
        assert statuses[200] > 50, statuses
    finally:
        podman.remove_all(suffix)
        leftover = podman.leftovers(suffix)
        assert not leftover, f"left behind: {leftover}"
