"""/dashboard: the stats endpoint counts what happened (in process), and the page draws it in
headless Chromium (a real server: the browser needs a socket); with a generation app, the
engine's charts too."""

from __future__ import annotations

import os
import shutil
import threading
import time

import httpx
import pytest

from batchserve.bench import run_bench
from tests.browser import browser  # noqa: F401  (fixture)
from tests.conftest import ServerProcess

MODEL = "RecordingModel"  # 10 ms per batch
CHARTS = ("rate", "queue", "batch", "sizes", "latency", "errors")
NONZERO_POINTS = {"rate": 3, "queue": 3, "batch": 3, "sizes": 1, "latency": 3, "errors": 2}  # wait for this much

# Counts pixels drawn in a chart's own colours: axes and labels are grey, the legend is
# outside the canvas, so only plotted data is saturated.
COLOURED_PIXELS = """canvas => {
  const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
  let coloured = 0;
  for (let i = 0; i < data.length; i += 4) {
    const high = Math.max(data[i], data[i + 1], data[i + 2]), low = Math.min(data[i], data[i + 1], data[i + 2]);
    if (data[i + 3] > 200 && high - low > 80) coloured++;
  }
  return coloured;
}"""


@pytest.fixture(scope="module")
def server():
    # 16 clients sending 4 items each keep more than max-batch-size items waiting, and more
    # than max-queue-size now and then (503s): every chart has something to show.
    server = ServerProcess("--model", f"tests.fakes:{MODEL}", "--max-batch-size", "8", "--max-queue-size", "40")
    yield server
    server.stop()


class BackgroundLoad:
    """`run_bench` in short rounds from a thread until stopped (at most ``limit`` seconds), then one model error."""

    def __init__(self, url: str, limit: float = 40.0):
        self.url = url
        self.limit = limit
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.drive, daemon=True)
        self.thread.start()

    def drive(self) -> None:
        deadline = time.monotonic() + self.limit
        while not self.stopped.is_set() and time.monotonic() < deadline:
            run_bench(self.url, app="custom", model=MODEL, items=4, concurrency=16, duration=1.5, timeout=10)
        httpx.post(f"{self.url}/models/{MODEL}/predict", json={"inputs": ["poison"]}, timeout=10)  # a model error

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=30)


async def test_stats_endpoint_counts_requests_batches_and_errors(serve_app):
    client = await serve_app(models=[f"tests.fakes:{MODEL}"], max_batch_size=8, max_queue_size=40)  # in process
    before = (await client.get("/dashboard/stats")).json()
    for value in (1, 2, 3):
        assert (await client.post(f"/models/{MODEL}/predict", json={"inputs": [value]})).json() == {"outputs": [2 * value]}
    assert (await client.post(f"/models/{MODEL}/predict", json={"inputs": ["poison"]})).status_code == 500
    after = (await client.get("/dashboard/stats")).json()

    model_before, model_after = before["models"][MODEL], after["models"][MODEL]
    assert model_after["items"] - model_before["items"] == 3  # the poison batch failed: not counted
    assert model_after["queue_depth"] == 0
    assert after["errors"].get("model", 0) - before["errors"].get("model", 0) == 1
    statuses = after["latency"]["by_status"]
    assert statuses["200"] - before["latency"]["by_status"].get("200", 0) == 3
    assert statuses["500"] - before["latency"]["by_status"].get("500", 0) == 1
    bounds, cumulative = after["latency"]["bounds"], after["latency"]["cumulative"]
    assert bounds[-1] is None and cumulative == sorted(cumulative)  # +Inf last, cumulative counts
    assert cumulative[-1] == sum(statuses.values())  # /dashboard/stats itself is not counted
    assert after["generation"] is None  # no generation app: no engine figures


def test_dashboard_page_draws_every_chart_under_load(server, browser, tmp_path):  # noqa: F811
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(f"{server.url}/dashboard")
        assert page.title() == "batchserve dashboard"
        load = BackgroundLoad(server.url)
        try:
            page.wait_for_function(  # a few seconds of data in every chart
                "least => Object.entries(least).every(([id, n]) => Number(document.getElementById(id).dataset.nonzero) >= n)",
                arg=NONZERO_POINTS,
                timeout=45_000,
            )
        finally:
            load.stop()
        page.wait_for_timeout(1200)  # one more poll after the load stopped
        screenshot = tmp_path / "dashboard.png"
        page.screenshot(path=str(screenshot), full_page=True)
        assert screenshot.stat().st_size > 20_000
        if os.environ.get("BATCHSERVE_SCREENSHOTS"):  # keep it for a human to look at
            shutil.copy(screenshot, os.environ["BATCHSERVE_SCREENSHOTS"])

        for chart in CHARTS:
            canvas = page.locator(f"#{chart}")
            assert canvas.element_handle().evaluate(COLOURED_PIXELS) > 30, f"nothing drawn in {chart}"
        assert "live" in page.inner_text("#status")
        legend = lambda chart: page.locator(f"#legend-{chart} span").all_inner_texts()  # noqa: E731
        assert legend("latency") == ["p50", "p95", "p99"]
        assert {"overloaded", "model"} <= set(legend("errors"))
        assert legend("queue") == [MODEL]
        for engine_chart in ("generation", "tokens", "first-token"):  # no generation app: no engine charts
            assert page.locator(f"#section-{engine_chart}").is_hidden()
        batch_means = page.evaluate(f"window.dashboard.history.batch[{MODEL!r}].filter(v => v !== null)")
        assert batch_means and max(batch_means) > 1 and max(batch_means) <= 8  # max-batch-size
    finally:
        page.close()


def test_quantile_interpolates_inside_buckets(server, browser):  # noqa: F811
    page = browser.new_page()
    try:
        page.goto(f"{server.url}/dashboard")
        quantile = lambda q, bounds, counts: page.evaluate(  # noqa: E731
            "([q, b, c]) => window.dashboard.quantile(q, b, c)", [q, bounds, counts])
        bounds = [0.01, 0.1, 1.0, None]
        assert quantile(0.5, bounds, [0, 10, 10, 10]) == pytest.approx(0.055)
        assert quantile(0.99, bounds, [0, 0, 0, 5]) == 1.0  # in +Inf: the last finite bound
        assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
    finally:
        page.close()


class GenerationLoad:
    """Two clients asking /autocomplete for suggestions back to back until stopped (at most ``limit`` seconds)."""

    def __init__(self, url: str, clients: int = 2, limit: float = 90.0):
        self.url = url
        self.stopped = threading.Event()
        self.deadline = time.monotonic() + limit
        self.statuses: list[int] = []
        self.threads = [threading.Thread(target=self.drive, args=(i,), daemon=True) for i in range(clients)]
        for thread in self.threads:
            thread.start()

    def drive(self, client: int) -> None:
        body = {"context": f"Client {client} writes: once upon a time,", "n": 3, "max_tokens": 24, "stop": []}
        while not self.stopped.is_set() and time.monotonic() < self.deadline:
            self.statuses.append(httpx.post(f"{self.url}/autocomplete", json=body, timeout=120).status_code)

    def stop(self) -> None:
        self.stopped.set()
        for thread in self.threads:
            thread.join(timeout=120)


ENGINE_CHARTS = {"generation": 3, "tokens": 3, "first-token": 2}  # nonzero points to wait for


def test_dashboard_charts_the_generation_engine(generation_server, browser):  # noqa: F811
    url = generation_server.url
    stats = httpx.get(f"{url}/dashboard/stats", timeout=30).json()
    engine = stats["generation"]
    assert set(engine) == {
        "active_rows", "waiting_requests", "steps", "tokens_generated", "first_tokens", "first_token_seconds"
    }, engine
    page = browser.new_page(viewport={"width": 1280, "height": 1200})
    try:
        page.goto(f"{url}/dashboard")
        load = GenerationLoad(url)
        try:
            page.wait_for_function(
                "least => Object.entries(least).every(([id, n]) => Number(document.getElementById(id).dataset.nonzero) >= n)",
                arg=ENGINE_CHARTS,
                timeout=120_000,
            )
            during = httpx.get(f"{url}/dashboard/stats", timeout=30).json()["generation"]
        finally:
            load.stop()
        assert load.statuses and set(load.statuses) == {200}, load.statuses
        for chart in ENGINE_CHARTS:
            assert page.locator(f"#section-{chart}").is_visible()
            drawn = page.locator(f"#{chart}").element_handle().evaluate(COLOURED_PIXELS)
            # a point is a 3x3 dot (at least 4 opaque pixels when antialiased), plus the lines
            assert drawn >= 4 * ENGINE_CHARTS[chart], f"nothing drawn in {chart}: {drawn} coloured pixels"
        legend = lambda chart: page.locator(f"#legend-{chart} span").all_inner_texts()  # noqa: E731
        assert legend("generation") == ["active rows", "waiting requests"]
        assert legend("tokens") == ["tokens/s", "steps/s"]
        assert legend("first-token") == ["mean"]
        rows = page.evaluate("window.dashboard.history.generation['active rows'].filter(v => v !== null)")
        max_rows = httpx.get(f"{url}/readyz", timeout=30).json()["services"]["generation"]["engine"]["max_rows"]
        assert rows and 1 <= max(rows) <= max_rows
        tokens_per_second = page.evaluate("window.dashboard.history.tokens['tokens/s'].filter(v => v !== null)")
        assert tokens_per_second and max(tokens_per_second) > 0

        after = httpx.get(f"{url}/dashboard/stats", timeout=30).json()["generation"]
        assert after["tokens_generated"] >= during["tokens_generated"] >= engine["tokens_generated"] + 3
        assert after["steps"] >= during["steps"] > engine["steps"]
        assert after["first_tokens"] >= during["first_tokens"] >= engine["first_tokens"] + 2
        assert after["first_token_seconds"] > engine["first_token_seconds"]
        waits = page.evaluate("window.dashboard.history['first-token'].mean.filter(v => v !== null)")
        assert waits and all(wait > 0 for wait in waits)  # ms from a request's arrival to its first tokens
        assert max(waits) < 120_000  # within the requests' timeout
        readyz = httpx.get(f"{url}/readyz", timeout=30).json()["services"]["generation"]["engine"]
        assert after["tokens_generated"] <= readyz["tokens_generated"]  # the same counter as the engine's describe()
    finally:
        page.close()
