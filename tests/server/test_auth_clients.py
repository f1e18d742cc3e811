"""A real `batchserve serve --app generation --app embeddings --api-key KEY` and its clients: the
official openai client (right, wrong and missing key), probes without a key, the editor and the
dashboard in headless Chromium (they ask for the key once; a reload in the same tab does not
ask again), and the server's own output at debug level, where no key may appear.

One server for the module (the bundled SmolLM2 and MiniLM); generations of 2 tokens."""

from __future__ import annotations

import re

import httpx
import openai
import pytest

from tests.browser import browser  # noqa: F401  (fixture)
from tests.conftest import ServerProcess

KEY = "clients-key-5f2c9a7e41d8b3"
WRONG = "wrong-key-0c1d2e3f4a5b6c"
LLM = "SmolLM2-135M-Instruct"
EMBEDDER = "all-MiniLM-L6-v2"
WAIT_MS = 120_000


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = ServerProcess(
        "--app", "generation", "--app", "embeddings", "--generation-threads", "1", "--timeout", "120",
        "--api-key", KEY, "--log-level", "debug", ready_timeout=300, output=tmp_path_factory.mktemp("server") / "output",
    )
    yield server
    server.stop()


def openai_client(server, key: str | None) -> openai.OpenAI:
    if key is None:  # no Authorization header at all: the client insists on one, its HTTP client drops it
        drop = httpx.Client(event_hooks={"request": [lambda request: request.headers.pop("Authorization", None)]})
        return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", http_client=drop, timeout=120, max_retries=0)
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, timeout=120, max_retries=0)


def refused(server) -> dict[str, float]:
    text = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).text
    return {reason: float(value) for reason, value in re.findall(r'batchserve_auth_refused_total\{reason="(\w+)"\} (\S+)', text)}


CALLS = {
    "models": lambda client: client.models.list(),
    "chat": lambda client: client.chat.completions.create(
        model=LLM, messages=[{"role": "user", "content": "Hi"}], max_tokens=2, temperature=0
    ),
    "completions": lambda client: client.completions.create(model=LLM, prompt="Once upon a", max_tokens=2, temperature=0),
    "embeddings": lambda client: client.embeddings.create(model=EMBEDDER, input=["a key", "a lock"]),
}


def test_probes_answer_without_a_key(server):
    assert httpx.get(f"{server.url}/healthz", timeout=30).json() == {"status": "ok"}
    ready = httpx.get(f"{server.url}/readyz", timeout=30)
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert KEY not in ready.text


def test_openai_client_with_the_key(server):
    with openai_client(server, KEY) as client:
        assert sorted(model.id for model in CALLS["models"](client)) == sorted([LLM, EMBEDDER])
        chat = CALLS["chat"](client)
        assert chat.choices[0].message.role == "assistant" and chat.usage.completion_tokens <= 2
        completion = CALLS["completions"](client)
        assert completion.choices[0].text and completion.usage.completion_tokens <= 2
        embeddings = CALLS["embeddings"](client)
        assert [len(item.embedding) for item in embeddings.data] == [384, 384]


@pytest.mark.parametrize("key", [WRONG, None], ids=["wrong key", "no key"])
def test_openai_client_raises_authentication_error(server, key):
    before = refused(server)
    with openai_client(server, key) as client:
        for name, call in CALLS.items():
            with pytest.raises(openai.AuthenticationError) as raised:
                call(client)
            assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key", name
            assert raised.value.type == "invalid_request_error"
    after = refused(server)
    reason = "invalid" if key else "missing"
    assert after[reason] - before[reason] == len(CALLS)


def test_tokenize_needs_the_key_and_names_the_model_when_two_are_served(server):
    for key in (None, WRONG):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        for path, body in (("/tokenize", {"content": "a key"}), ("/detokenize", {"tokens": [1]})):
            assert httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30).status_code == 401, path
    headers = {"Authorization": f"Bearer {KEY}"}
    unnamed = httpx.post(f"{server.url}/tokenize", json={"content": "a key"}, headers=headers, timeout=30)
    assert unnamed.status_code == 422
    assert unnamed.json()["error"]["message"] == f"this server serves several models ({LLM}, {EMBEDDER}): name one in 'model'"
    for model, expected in ((LLM, ["a", " key"]), (EMBEDDER, ["[CLS]", "a", "key", "[SEP]"])):
        body = {"content": "a key", "model": model, "with_pieces": True, "add_special": model == EMBEDDER}
        tokens = httpx.post(f"{server.url}/tokenize", json=body, headers=headers, timeout=30).json()["tokens"]
        assert [token["piece"] for token in tokens] == expected, model


def test_editor_asks_for_the_key_once_per_tab(server, browser):  # noqa: F811
    page = browser.new_page()
    try:
        page.goto(f"{server.url}/")
        dialog = page.locator("#api-key-dialog")
        assert dialog.count() == 0  # nothing asked before a request is refused
        suggest(page)
        dialog.wait_for(timeout=30_000)  # /autocomplete answered 401: the page asks
        assert "needs an API key" in dialog.inner_text()
        dialog.locator("input[type=password]").fill(WRONG)
        dialog.get_by_text("Use this key").click()
        page.locator("#api-key-dialog").wait_for(timeout=30_000)  # refused: asked again, saying so
        assert "was refused" in page.locator("#api-key-dialog").inner_text()
        page.locator("#api-key-dialog input[type=password]").fill(KEY)
        page.locator("#api-key-dialog").get_by_text("Use this key").click()
        page.locator("#suggestions li").nth(2).wait_for(timeout=WAIT_MS)  # the same request, sent again with the key
        assert page.evaluate("sessionStorage.getItem('batchserve.apiKey')") == KEY

        page.reload()
        suggest(page)
        page.locator("#suggestions li").nth(2).wait_for(timeout=WAIT_MS)
        assert dialog.count() == 0  # the same tab: the key kept, not asked again
    finally:
        page.close()


def suggest(page) -> None:
    page.locator("#max-tokens").fill("2")
    page.locator("#editor").click()
    page.keyboard.type("The key to the old door")
    page.keyboard.press("Tab")


def test_dashboard_asks_for_the_key_once_per_tab(server, browser):  # noqa: F811
    page = browser.new_page()
    try:
        page.goto(f"{server.url}/dashboard")
        dialog = page.locator("#api-key-dialog")
        dialog.wait_for(timeout=30_000)
        dialog.locator("input[type=password]").fill(KEY)
        dialog.get_by_text("Use this key").click()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('live')", timeout=30_000)
        assert dialog.count() == 0

        page.reload()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('live')", timeout=30_000)
        page.wait_for_timeout(1500)  # more polls: still no question
        assert dialog.count() == 0
    finally:
        page.close()


def test_dashboard_without_the_key_says_so_and_stops_asking(server, browser):  # noqa: F811
    page = browser.new_page()  # a new tab: no key kept
    try:
        page.goto(f"{server.url}/dashboard")
        page.locator("#api-key-dialog").wait_for(timeout=30_000)
        page.locator("#api-key-dialog").get_by_text("Cancel").click()
        page.wait_for_function("document.getElementById('status').textContent.includes('needs an API key')", timeout=30_000)
        page.wait_for_timeout(2500)  # two more polls
        assert page.locator("#api-key-dialog").count() == 0
        assert "needs an API key" in page.inner_text("#status")
    finally:
        page.close()


def test_no_key_in_the_servers_output(server):
    # last in the module: stops the server to read everything it wrote
    httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {WRONG}"}, timeout=30)
    server.stop()
    output = server.output.read_text(errors="replace")
    assert "refused /v1/models: invalid API key" in output  # debug lines were written, and name no key
    assert KEY not in output and WRONG not in output
