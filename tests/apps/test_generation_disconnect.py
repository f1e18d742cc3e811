"""A client going away mid-generation is not an error (the editor's pattern: Tab pressed again
while suggestions are on their way).  A real server on loopback, bundled SmolLM2: the request's
connection is closed while its rows decode; the rows are freed, the server logs no error or
traceback, ``/metrics`` counts no 5xx for the route, and the next request is answered.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time

import httpx
import pytest

COUNTING = "Count from one to a thousand: one, two, three,"
ENDPOINTS = [
    ("/autocomplete", {"context": COUNTING, "n": 3, "max_tokens": 128, "temperature": 0.8, "stop": []}),
    ("/v1/completions", {"prompt": COUNTING, "n": 3, "max_tokens": 200, "temperature": 0}),
    ("/v1/completions", {"prompt": COUNTING, "n": 2, "max_tokens": 200, "temperature": 0, "stream": True}),
    ("/infill", {"text": " ".join(f"Word number {i} is [MASK]." for i in range(6))}),
]


@pytest.fixture(scope="module")
def server():
    from tests.conftest import ServerProcess

    server = ServerProcess(
        "--app", "generation", "--app", "infill", "--timeout", "120", "--generation-threads", "1",
        "--log-level", "info", ready_timeout=300,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode(errors="replace") for line in server.process.stdout), daemon=True)
    reader.start()
    server.log = lines
    yield server
    server.stop()


def active_rows(server) -> int:
    return httpx.get(f"{server.url}/readyz", timeout=30).json()["services"]["generation"]["engine"]["active_rows"]


def hang_up_while_decoding(server, path: str, body: dict) -> None:
    """Send the request on a raw socket, wait until its rows decode, then close the connection."""
    payload = json.dumps(body).encode()
    head = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(head.encode() + payload)
        deadline = time.monotonic() + 60
        while active_rows(server) == 0:
            assert time.monotonic() < deadline, f"{path}: the generation never started"
            time.sleep(0.02)
    # closed: the server notices within its poll interval and cancels the generation


def wait_rows_freed(server, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while active_rows(server) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert active_rows(server) == 0


def status_counts(server, route: str) -> dict[str, float]:
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    pattern = re.compile(r'^batchserve_request_duration_seconds_count\{(.*)\} (\S+)$')
    counts = {}
    for line in metrics.splitlines():
        match = pattern.match(line)
        if match and f'route="{route}"' in match.group(1):
            status = re.search(r'status="(\d+)"', match.group(1)).group(1)
            counts[status] = counts.get(status, 0) + float(match.group(2))
    return counts


@pytest.mark.parametrize("path, body", ENDPOINTS, ids=["autocomplete", "completions", "completions-stream", "infill"])
def test_hanging_up_mid_generation_frees_the_rows_and_is_no_error(server, path, body):
    logged = len(server.log)
    hang_up_while_decoding(server, path, body)
    wait_rows_freed(server)
    # the next request on the same route is answered
    if path == "/infill":
        reply = httpx.post(f"{server.url}/infill", json={"text": "twinkle twinkle [MASK] star."}, timeout=120)
    else:
        small = {**body, "max_tokens": 2, "n": 1, **({"stream": False} if "stream" in body else {})}  # /autocomplete has none
        reply = httpx.post(f"{server.url}{path}", json=small, timeout=120)
    assert reply.status_code == 200, reply.text
    time.sleep(0.5)  # the disconnect's log line and metrics are written by now
    counts = status_counts(server, path)
    assert not [status for status in counts if status.startswith("5")], counts
    new_lines = server.log[logged:]
    bad = [line for line in new_lines if '"level":"error"' in line or '"level":"critical"' in line or "Traceback" in line]
    assert not bad, "".join(bad)
    if not body.get("stream"):  # a plain request's disconnect is answered 499 and logged at info
        assert counts.get("499", 0) >= 1, counts
        assert any("client went away" in line and '"level":"info"' in line for line in new_lines), "".join(new_lines)
