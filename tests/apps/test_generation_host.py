"""The generation host's lifecycle: started, closed and started again in one process, it serves again."""

from __future__ import annotations

import httpx

from batchserve.server.app import create_app
from batchserve.settings import Settings
from tests.conftest import in_process, wait_ready

SETTINGS = {"apps": ["generation", "infill"], "generation_threads": 1, "timeout": 120}


async def complete(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]


async def test_an_app_started_closed_and_started_again_serves_again():
    app = create_app(Settings.from_options(**SETTINGS))
    for _ in range(2):  # as a test client, or a server started twice in one process, does
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                await wait_ready(client, 60)
                await complete(client)
    host = app.state.services[0].host
    assert host.engine is None and not host.ready()  # closed: its engine stopped

    async with in_process(Settings.from_options(**SETTINGS), ready_timeout=60) as client:  # a new app alike
        await complete(client)
