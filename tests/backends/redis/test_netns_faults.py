"""Redis mode across hosts that fail: Redis, a front and two workers, each in its own network
namespace (`ip netns`, a veth pair each on one bridge, an address each), under steady load
(`make soak`; needs root for `ip netns`).

This kernel has no netem: a cut is the host's bridge-side link set down (its packets are
dropped, no connection is reset).  Covered here, in one run (issue 19, item 5):

* (d) scale from zero: a `--wait-for-workers` front under load with no worker for 5 s, then a
  first worker: every request answered within its deadline;
* (a) one worker host cut off for 10 s: every request answered once, with the right vector,
  none slower than the visibility timeout plus 5 s, and throughput back within 5 s of it.

and, in a second run, the front reachable by its clients on a link of its own:

* (b) the front cut off from Redis for 5 s: 503s or answers, fast (none over 5 s), and service
  back within 3 s of the link;
* (c) Redis restarted (appendonly on): every request answered, or failed with a clear 503
  naming Redis; none hangs; service back within 5 s of the restart.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
import uuid

import httpx
import numpy as np
import pytest

from tests.conftest import PYTHONPATH, ROOT

VISIBILITY = 5.0  # the workers' --visibility-timeout: a cut worker's entries are taken over after it
TIMEOUT = 60.0  # each request's deadline (the front's --timeout)
TEXTS = [f"sentence number {index} about hosts that fail" for index in range(16)]


def _can_netns() -> bool:
    if not shutil.which("ip") or not shutil.which("redis-server"):
        return False
    name = f"bsprobe{uuid.uuid4().hex[:6]}"
    made = subprocess.run(["ip", "netns", "add", name], capture_output=True).returncode == 0
    if made:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return made


pytestmark = pytest.mark.slow


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class Hosts:
    """A bridge in this namespace (the test's client reaches every host through it) and hosts,
    each a network namespace with one veth pair to the bridge and its own address."""

    def __init__(self):
        self.tag = uuid.uuid4().hex[:4]
        self.subnet = f"10.{200 + int(self.tag[:2], 16) % 50}.{int(self.tag[2:], 16)}"
        self.bridge = f"bsb{self.tag}"
        self.hosts: dict[str, tuple[str, str, str]] = {}  # name -> (namespace, bridge-side link, address)
        self.processes: list[subprocess.Popen] = []
        self.public: list[str] = []
        ip("link", "add", self.bridge, "type", "bridge")
        ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        ip("link", "set", self.bridge, "up")

    def add(self, name: str, public: bool = False) -> str:
        """A host on the bridge; ``public``: also a point-to-point link from this namespace, for
        clients that must reach it while its bridge link is cut; its address there is returned."""
        index = len(self.hosts) + 2
        namespace, outside, inside = f"bs{self.tag}{name}", f"bs{self.tag}o{index}", f"bs{self.tag}i{index}"
        address = f"{self.subnet}.{index}"
        ip("netns", "add", namespace)
        ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        ip("link", "set", inside, "netns", namespace)
        ip("link", "set", outside, "master", self.bridge)
        ip("link", "set", outside, "up")
        ip("-n", namespace, "addr", "add", f"{address}/24", "dev", inside)
        ip("-n", namespace, "link", "set", inside, "up")
        ip("-n", namespace, "link", "set", "lo", "up")
        self.hosts[name] = (namespace, outside, address)
        if public:
            near, far = f"bs{self.tag}p{index}", f"bs{self.tag}q{index}"
            network = f"172.31.{int(self.tag[:2], 16)}.{4 * (int(self.tag[2:], 16) % 64)}"
            base = int(network.rsplit(".", 1)[1])
            prefix = network.rsplit(".", 1)[0]
            ip("link", "add", near, "type", "veth", "peer", "name", far)
            ip("link", "set", far, "netns", namespace)
            ip("addr", "add", f"{prefix}.{base + 1}/30", "dev", near)
            ip("link", "set", near, "up")
            ip("-n", namespace, "addr", "add", f"{prefix}.{base + 2}/30", "dev", far)
            ip("-n", namespace, "link", "set", far, "up")
            self.public.append(near)
            return f"{prefix}.{base + 2}"
        return address

    def run(self, name: str, *command: str, log=None) -> subprocess.Popen:
        env = {"PYTHONPATH": PYTHONPATH, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
        process = subprocess.Popen(["ip", "netns", "exec", self.hosts[name][0], *command], cwd=ROOT, env=env,
                                   stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def cut(self, name: str) -> None:
        ip("link", "set", self.hosts[name][1], "down")

    def heal(self, name: str) -> None:
        ip("link", "set", self.hosts[name][1], "up")

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for namespace, outside, _ in self.hosts.values():
            subprocess.run(["ip", "link", "del", outside], capture_output=True)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        for near in self.public:
            subprocess.run(["ip", "link", "del", near], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)


@pytest.fixture
def hosts():
    if not _can_netns():  # asked here, not at collection: `make test` collects this module too
        pytest.skip("needs ip netns (root) and redis-server")
    made = Hosts()
    try:
        yield made
    finally:
        made.close()


class Load:
    """Closed-loop clients on /v1/embeddings, one text a request; each request's (start, end,
    status, text, vector, or the response's text when not 200)."""

    def __init__(self, url: str, clients: int = 8):
        self.url, self.clients = url, clients
        self.stop = threading.Event()
        self.records: list[tuple[float, float, object, str, list | None]] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(index,)) for index in range(clients)]

    def __enter__(self) -> "Load":
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join()

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=TIMEOUT + 10) as http:
            count = 0
            while not self.stop.is_set():
                text = TEXTS[(index + count) % len(TEXTS)]
                count += 1
                started = time.monotonic()
                vector = None
                try:
                    response = http.post(f"{self.url}/v1/embeddings", json={"input": [text]})
                    status: object = response.status_code
                    if status == 200:
                        vector = response.json()["data"][0]["embedding"]
                    else:
                        vector = response.text[:300]  # the error, kept for the checks
                except httpx.HTTPError as error:
                    status = type(error).__name__
                with self.lock:
                    self.records.append((started, time.monotonic(), status, text, vector))


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:g} s")


def _workers(url: str) -> int:
    """Live workers the front's /readyz reports (0 while it does not answer)."""
    try:
        ready = httpx.get(f"{url}/readyz", timeout=5).json()
    except (httpx.HTTPError, ValueError):
        return 0
    found, todo = [], [ready]
    while todo:
        value = todo.pop()
        if isinstance(value, dict):
            if isinstance(value.get("workers"), int) and value.get("backend") == "redis":
                found.append(value["workers"])
            todo.extend(value.values())
        elif isinstance(value, list):
            todo.extend(value)
    return max(found, default=0)


def _completions(records, start: float, end: float) -> int:
    return sum(1 for _, finished, status, _, _ in records if start <= finished < end and status == 200)


def test_scale_from_zero_then_a_worker_host_cut_off_across_namespaces(hosts, tmp_path):
    redis_address = hosts.add("redis")
    front_address = hosts.add("front")
    hosts.add("w1")
    hosts.add("w2")
    password = "pw-" + uuid.uuid4().hex  # Redis on a network: a password (or protected mode refuses other hosts)
    url = f"redis://:{password}@{redis_address}:6379/0"
    hosts.run("redis", shutil.which("redis-server"), "--bind", redis_address, "--port", "6379", "--save", "", "--appendonly", "no",
              "--requirepass", password)
    front_log = open(tmp_path / "front.log", "wb")
    front_process = hosts.run("front", sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--backend", "redis",
              "--redis-url", url, "--wait-for-workers", "--timeout", str(TIMEOUT), "--host", front_address, "--port", "8000",
              "--drain-seconds", "0", log=front_log)
    front = f"http://{front_address}:8000"
    _wait_for(lambda: _ready(front, front_process, tmp_path / "front.log"), 180, "the front")

    def worker(name: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "wb")
        return hosts.run(name, sys.executable, "-m", "batchserve.cli", "worker", "--app", "embeddings", "--redis-url", url,
                         "--threads-per-worker", "1", "--visibility-timeout", str(VISIBILITY), log=log)

    reference: dict[str, np.ndarray] = {}
    with Load(front) as load:
        # (d) scale from zero: 5 s of load with no worker, then a first worker
        time.sleep(5)
        first_started = time.monotonic()
        worker("w1")
        _wait_for(lambda: _workers(front) >= 1, 180, "the first worker")
        worker("w2")
        _wait_for(lambda: _workers(front) >= 2, 180, "the second worker")
        time.sleep(10)  # both serve: the steady rate before the cut
        before_cut = time.monotonic()
        # (a) the first worker's host cut off for 10 s
        hosts.cut("w1")
        cut_at = time.monotonic()
        time.sleep(10)
        hosts.heal("w1")
        time.sleep(max(0.0, cut_at + VISIBILITY + 15 - time.monotonic()))
        ended = time.monotonic()
    records = list(load.records)

    statuses: dict[object, int] = {}
    for _, _, status, _, _ in records:
        statuses[status] = statuses.get(status, 0) + 1
    for _, _, status, text, vector in records:
        if status == 200:
            reference.setdefault(text, np.asarray(vector))
    wrong = [text for _, _, status, text, vector in records
             if status == 200 and not np.allclose(np.asarray(vector), reference[text], atol=1e-5)]
    waited_from_zero = [finished - started for started, finished, status, _, _ in records if started < first_started]
    steady = _completions(records, before_cut - 10, before_cut) / 10
    in_flight_at_cut = [finished - started for started, finished, _, _, _ in records if started < cut_at < finished]
    back = next((second for second in range(0, int(ended - cut_at) - 1)
                 if _completions(records, cut_at + second, cut_at + second + 1) >= 0.5 * steady), None)
    late_rate = _completions(records, cut_at + VISIBILITY + 5, ended) / (ended - cut_at - VISIBILITY - 5)
    print(f"\nrequests {len(records)}, by status {statuses}; from zero: {len(waited_from_zero)} waited up to "
          f"{max(waited_from_zero, default=0):.1f} s; steady {steady:.1f} req/s; at the cut {len(in_flight_at_cut)} in flight, "
          f"the slowest answered in {max(in_flight_at_cut, default=0):.1f} s; throughput at half the steady rate "
          f"{back} s after the cut; {late_rate:.1f} req/s from visibility + 5 s on")

    assert set(statuses) == {200}, f"every request answered 200: {statuses}"
    assert not wrong, f"answers with another text's vector: {wrong[:3]}"
    assert waited_from_zero and max(waited_from_zero) < TIMEOUT, "requests sent with no worker up answered within their deadline"
    assert max(in_flight_at_cut, default=0) <= VISIBILITY + 5 + 5, "a request held by the cut worker waited too long"
    assert late_rate >= 0.5 * steady, f"throughput back within 5 s of the visibility timeout: {late_rate:.1f} vs {steady:.1f} req/s"


def _ready(url: str, process: subprocess.Popen, log) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the front exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _serve(hosts: Hosts, tmp_path, redis_name: str, front_name: str, front_host: str, url: str, *extra: str):
    log = tmp_path / "front.log"
    process = hosts.run(front_name, sys.executable, "-m", "batchserve.cli", "serve", "--app", "embeddings", "--backend", "redis",
                        "--redis-url", url, "--timeout", str(TIMEOUT), "--host", "0.0.0.0", "--port", "8000", "--drain-seconds", "0",
                        *extra, log=open(log, "wb"))
    front = f"http://{front_host}:8000"
    _wait_for(lambda: _ready(front, process, log), 180, "the front")
    return front


def _window(records, start: float, end: float):
    """Records of the requests started in [start, end)."""
    return [record for record in records if start <= record[0] < end]


def test_the_front_cut_off_from_redis_then_redis_restarted(hosts, tmp_path):
    redis_address = hosts.add("redis")
    front_host = hosts.add("front", public=True)  # clients reach the front on its own link
    hosts.add("w1")
    password = "pw-" + uuid.uuid4().hex
    url = f"redis://:{password}@{redis_address}:6379/0"
    data = tmp_path / "redis"
    data.mkdir()
    redis_command = [shutil.which("redis-server"), "--bind", redis_address, "--port", "6379", "--save", "", "--appendonly", "yes",
                     "--dir", str(data), "--requirepass", password]
    redis = hosts.run("redis", *redis_command)
    worker_log = open(tmp_path / "w1.log", "wb")
    hosts.run("w1", sys.executable, "-m", "batchserve.cli", "worker", "--app", "embeddings", "--redis-url", url,
              "--threads-per-worker", "1", "--visibility-timeout", str(VISIBILITY), log=worker_log)
    front = _serve(hosts, tmp_path, "redis", "front", front_host, url)
    _wait_for(lambda: _workers(front) >= 1, 180, "the worker")

    with Load(front) as load:
        time.sleep(5)
        # (b) the front's link to Redis (its bridge link) down for 5 s; its clients still reach it
        hosts.cut("front")
        cut_at = time.monotonic()
        time.sleep(5)
        hosts.heal("front")
        healed_at = time.monotonic()
        time.sleep(10)
        # (c) Redis restarted: stopped (it writes its append-only file), started again on the same files
        redis.terminate()
        redis.wait(timeout=30)
        stopped_at = time.monotonic()
        time.sleep(1)
        hosts.run("redis", *redis_command)
        restarted_at = time.monotonic()
        time.sleep(15)
        ended = time.monotonic()
    records = list(load.records)

    statuses: dict[object, int] = {}
    for _, _, status, _, _ in records:
        statuses[status] = statuses.get(status, 0) + 1
    during_cut = [record for record in records if record[1] > cut_at and record[0] < healed_at]  # in flight or sent
    slowest_in_cut = max((finished - started for started, finished, *_ in during_cut), default=0)
    back_after_link = min((finished for started, finished, status, *_ in records if started >= healed_at and status == 200),
                          default=ended) - healed_at
    around_restart = _window(records, stopped_at - 1, restarted_at + 5)
    slowest_at_restart = max((finished - started for started, finished, *_ in around_restart), default=0)
    back_after_restart = min((finished for started, finished, status, *_ in records if started >= restarted_at and status == 200),
                             default=ended) - restarted_at
    print(f"\nrequests {len(records)}, by status {statuses}; front cut 5 s: {len(during_cut)} requests in flight or sent, "
          f"by status {_count(during_cut)}, the slowest {slowest_in_cut:.1f} s, service back {back_after_link:.1f} s after the link; "
          f"redis restart: {len(around_restart)} requests around it, by status {_count(around_restart)}, the slowest "
          f"{slowest_at_restart:.1f} s, service back {back_after_restart:.1f} s after the start")

    assert set(statuses) <= {200, 503}, f"answers or clear 503s only: {statuses}"
    unclear = {body for _, _, status, _, body in records if status == 503 and "redis" not in body.lower()}
    assert not unclear, f"503s that do not name Redis: {list(unclear)[:3]}"
    print("503 messages:", sorted({body for _, _, status, _, body in records if status == 503})[:4])
    assert all(finished - started < TIMEOUT for started, finished, *_ in records), "no request hung to its deadline"
    assert 503 in _count(during_cut), "the cut front answered 503 (Redis unreachable)"
    assert slowest_in_cut <= 5.0, f"fast 503s while cut off, not hangs: the slowest took {slowest_in_cut:.1f} s"
    assert back_after_link <= 3.0, f"service back {back_after_link:.1f} s after the link"
    assert slowest_at_restart <= 10.0, f"no hang around the restart: {slowest_at_restart:.1f} s"
    assert back_after_restart <= 5.0, f"service back {back_after_restart:.1f} s after Redis restarted"
    assert _completions(records, ended - 5, ended) > 0, "answers at the end"


def _count(records) -> dict[object, int]:
    found: dict[object, int] = {}
    for _, _, status, _, _ in records:
        found[status] = found.get(status, 0) + 1
    return found
