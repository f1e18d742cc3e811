"""deploy/k8s: every overlay renders (``kubectl kustomize``), every object validates against
Kubernetes' own schemas offline (kubernetes-validate, strict: an unknown field is an error),
and what the manifests run is batchserve's own: each container's command line goes through
batchserve's CLI with the ConfigMap's file at its mount path; the grace periods cover the
drain; KEDA's ScaledObject (a CRD: no schema here) is checked by hand, its stream being the
key the workers read.  Fast: nothing is started (the podman run is another test).
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from typer.testing import CliRunner

import batchserve.backends.redis.worker as redis_worker
from batchserve import cli
from batchserve.apps import batched_models
from batchserve.backends import process
from batchserve.backends.redis.protocol import StreamKeys
from batchserve.settings import BackendKind, Settings
from tests.conftest import ROOT

K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(path.name for path in (K8S / "overlays").iterdir())
KUBECTL = shutil.which("kubectl")
#: the oldest Kubernetes these manifests are for, and the newest kubernetes-validate knows
VERSIONS = ("1.29.0", "latest")
#: the API groups of CRDs, checked by hand below
CRD_GROUPS = ("keda.sh/",)

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl is not installed (make system-deps)")


@functools.cache
def rendered(overlay: str) -> tuple[dict, ...]:
    done = subprocess.run([KUBECTL, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return tuple(document for document in yaml.safe_load_all(done.stdout) if document)


def find(objects, kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects, kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_there_are_the_three_overlays():
    assert OVERLAYS == ["cpu", "gpu", "keda"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_kubernetes_schemas(overlay):
    import kubernetes_validate

    objects = rendered(overlay)
    kinds = {o["kind"] for o in objects}
    assert {"Deployment", "Service", "StatefulSet", "ConfigMap", "Secret", "PodDisruptionBudget"} <= kinds, kinds
    for version in VERSIONS:
        version = kubernetes_validate.latest_version() if version == "latest" else version
        for obj in objects:
            if obj["apiVersion"].startswith(CRD_GROUPS):
                continue
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                where = ".".join(map(str, error.absolute_path)) or "top level"
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version} "
                            f"at {where}: {error.message}")


# --------------------------------------------------------------------------- the command lines


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def command_line(objects, deployment: dict, tmp_path: Path) -> list[str]:
    """The container's batchserve arguments, as the kubelet would run them: ``$(VAR)`` from its
    env (a Secret's value from the rendered Secret), each mounted ConfigMap's files under ``tmp_path``."""
    spec = deployment["spec"]["template"]["spec"]
    box = container(deployment)
    assert box["command"] == ["/opt/venv/bin/batchserve"], "absolute: an image imported from a tar has no PATH"
    env: dict[str, str] = {}
    for variable in box.get("env", []):
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            secret = one(objects, "Secret", ref["name"])
            env[variable["name"]] = secret["stringData"][ref["key"]]
    mounts = {}
    for volume in spec.get("volumes", []):
        if "configMap" in volume:
            config_map = one(objects, "ConfigMap", volume["configMap"]["name"])
            directory = tmp_path / volume["name"]
            directory.mkdir(exist_ok=True)
            for name, text in config_map["data"].items():
                (directory / name).write_text(text)
            mounts[volume["name"]] = directory
    paths = {m["mountPath"]: mounts[m["name"]] for m in box.get("volumeMounts", []) if m["name"] in mounts}

    def local(arg: str) -> str:
        arg = re.sub(r"\$\((\w+)\)", lambda match: env[match.group(1)], arg)
        for mount, directory in paths.items():
            if arg.startswith(mount + "/"):
                return str(directory / arg[len(mount) + 1:])
        return arg

    return [local(arg) for arg in box["args"]]


def run_cli(argv: list[str], monkeypatch) -> tuple[Settings, dict]:
    """``batchserve ARGV`` with nothing started: the settings serve or worker would run with."""
    seen: dict = {}
    monkeypatch.setattr(cli, "run_server", lambda settings: seen.update(settings=settings))
    monkeypatch.setattr(redis_worker, "run_worker", lambda settings, models: seen.update(settings=settings, models=models))
    monkeypatch.setattr(cli, "check_devices", lambda settings: None)  # the gpu overlay names a GPU
    result = CliRunner().invoke(cli.app, argv)
    assert result.exit_code == 0, f"batchserve {' '.join(argv)}\n{result.output}"
    return seen["settings"], seen.get("models", {})


def prestop_seconds(box: dict) -> float:
    command = box["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "/bin/sleep", command
    return float(command[1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_fronts_run_batchserve_serve_and_drain_within_their_grace(overlay, monkeypatch, tmp_path):
    objects = rendered(overlay)
    front = one(objects, "Deployment", "batchserve-front")
    args = command_line(objects, front, tmp_path)
    assert args[0] == "serve"
    settings, _ = run_cli(args, monkeypatch)
    assert settings.backend is BackendKind.redis
    url = urlparse(settings.redis.redis_url)
    redis_service = one(objects, "Service", url.hostname)
    assert url.port == redis_service["spec"]["ports"][0]["port"]
    assert url.password == one(objects, "Secret", "batchserve-secrets")["stringData"]["redis-password"]
    assert settings.redis.wait_for_workers is (overlay == "keda"), "the fronts queue while KEDA has no worker up"

    box = container(front)
    assert box["ports"][0]["containerPort"] == settings.server.port and settings.server.host == "0.0.0.0"
    assert box["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert box["livenessProbe"]["httpGet"]["path"] == "/healthz"
    keys = [v for v in box["env"] if v["name"] == "BATCHSERVE_API_KEY"]
    assert keys and keys[0]["valueFrom"]["secretKeyRef"]["name"] == "batchserve-secrets", "the API key from the Secret"
    assert settings.server.public_metrics, "Prometheus scrapes /metrics without the key"
    # SIGTERM comes after preStop; then /readyz is 503 for drain_seconds, in-flight requests get grace
    needed = prestop_seconds(box) + settings.server.drain_seconds + settings.server.grace
    grace = front["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert needed + 5 <= grace, f"terminationGracePeriodSeconds {grace} < preStop + drain + grace ({needed}) + 5"
    service = one(objects, "Service", "batchserve")
    assert service["spec"]["selector"] == front["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_workers_run_batchserve_worker_and_finish_what_they_hold_within_their_grace(overlay, monkeypatch, tmp_path):
    objects = rendered(overlay)
    worker = one(objects, "Deployment", "batchserve-worker")
    args = command_line(objects, worker, tmp_path)
    assert args[0] == "worker"
    settings, models = run_cli(args, monkeypatch)
    assert set(models) == set(batched_models(Settings(apps=settings.apps))), "the fronts' models"
    box = container(worker)
    if overlay == "gpu":
        assert settings.process.devices == ["cuda:0"]
        assert box["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert box["image"].rsplit("/", 1)[-1].startswith("batchserve-cuda"), "a CUDA build of torch"
    else:
        assert settings.process.devices == ["cpu"]
    if overlay == "cpu":
        cores = float(box["resources"]["requests"]["cpu"])
        assert settings.process.threads_per_worker * settings.process.workers == cores, "threads follow the cores asked for"
    # SIGTERM: stop reading, finish what it holds, end its loops, stop its model processes
    needed = 3 * redis_worker.LOOP_GRACE + redis_worker.HELD_GRACE + process.STOP_GRACE
    grace = worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert needed + 5 <= grace, f"terminationGracePeriodSeconds {grace} < {needed} + 5"


def test_keda_scales_the_workers_from_zero_on_the_streams_they_read(monkeypatch, tmp_path):
    objects = rendered("keda")
    scaled = one(objects, "ScaledObject", "batchserve-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    spec = scaled["spec"]
    assert find(objects, "Deployment", spec["scaleTargetRef"]["name"]), "the target is the workers' Deployment"
    assert spec["scaleTargetRef"]["name"] == "batchserve-worker"
    assert spec["minReplicaCount"] == 0 and spec["maxReplicaCount"] >= 1
    assert "replicas" not in one(objects, "Deployment", "batchserve-worker")["spec"], "KEDA owns the replica count"
    triggers = spec["triggers"]
    worker = one(objects, "Deployment", "batchserve-worker")
    settings, models = run_cli(command_line(objects, worker, tmp_path), monkeypatch)
    keys = [StreamKeys(settings.redis.redis_prefix, name) for name in models]
    # the request streams and the offline ones (batch jobs'): a job alone starts a worker too
    assert {trigger["metadata"]["stream"] for trigger in triggers} == {
        stream for key in keys for stream in (key.requests, key.offline_requests)
    }, "one trigger per stream the workers read"
    for trigger in triggers:
        assert trigger["type"] == "redis-streams"
        metadata = trigger["metadata"]
        assert all(isinstance(value, str) for value in metadata.values()), "KEDA's metadata values are strings"
        assert "consumerGroup" not in metadata, "without a group KEDA reads XLEN: the stream's length"
        assert int(metadata["streamLength"]) >= 1 and not {"lagCount", "pendingEntriesCount"} & set(metadata)
    trigger = triggers[0]
    metadata = trigger["metadata"]
    assert all(other["metadata"]["address"] == metadata["address"] for other in triggers)

    host, _, port = metadata["address"].rpartition(":")
    namespace = scaled["metadata"]["namespace"]
    redis_service = one(objects, "Service", "batchserve-redis")
    assert host == f"{redis_service['metadata']['name']}.{namespace}.svc.cluster.local", "KEDA runs in its own namespace"
    assert int(port) == redis_service["spec"]["ports"][0]["port"]
    assert int(metadata.get("databaseIndex", "0")) == int(urlparse(settings.redis.redis_url).path.strip("/") or 0)

    auth = one(objects, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    assert ref["key"] in one(objects, "Secret", ref["name"])["stringData"]

    hpa = one(objects, "HorizontalPodAutoscaler", "batchserve-front")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "batchserve-front"
    assert "replicas" not in one(objects, "Deployment", "batchserve-front")["spec"], "the HPA owns the replica count"


def test_the_redis_statefulset_keeps_its_data_and_asks_for_the_password():
    objects = rendered("cpu")
    redis = one(objects, "StatefulSet", "batchserve-redis")
    box = redis["spec"]["template"]["spec"]["containers"][0]
    args = box["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    mount = box["volumeMounts"][0]
    assert args[args.index("--dir") + 1] == mount["mountPath"]
    assert redis["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == mount["name"]
