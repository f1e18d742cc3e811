"""The editor page in headless Chromium: Tab shows 3 suggestions; a key or a click inserts one;
a second Tab aborts the request still on its way (the server frees its rows, answers 499)."""

from __future__ import annotations

import json
import re
import time

import httpx

from tests.browser import browser  # noqa: F401  (the module-scoped Chromium fixture)

SENTENCE = "The old lighthouse keeper climbed the stairs and"
WAIT_MS = 120_000


def test_tab_shows_three_suggestions_and_picking_one_inserts_it(generation_server, browser):  # noqa: F811
    page = browser.new_page()
    try:
        page.goto(generation_server.url + "/")
        editor = page.locator("#editor")
        editor.click()
        page.keyboard.type(SENTENCE)
        page.keyboard.press("Tab")

        items = page.locator("#suggestions li")
        items.nth(2).wait_for(timeout=WAIT_MS)
        assert items.count() == 3
        assert page.locator("#suggestions").is_visible()
        suggestions = items.all_inner_texts()
        assert all(text.strip() for text in suggestions)
        assert "active" in (items.nth(0).get_attribute("class") or "")

        # arrow down to the second suggestion, Enter inserts it at the cursor
        page.keyboard.press("ArrowDown")
        assert "active" in (items.nth(1).get_attribute("class") or "")
        chosen = page.evaluate("() => document.querySelectorAll('#suggestions li')[1].textContent")
        page.keyboard.press("Enter")
        assert page.locator("#suggestions").is_hidden()
        assert editor.input_value() == SENTENCE + chosen
        assert editor.evaluate("e => e.selectionStart") == len(SENTENCE + chosen)

        # again, and this time a click picks the third
        before = editor.input_value()
        page.keyboard.press("Tab")
        items.nth(2).wait_for(timeout=WAIT_MS)
        third = page.evaluate("() => document.querySelectorAll('#suggestions li')[2].textContent")
        items.nth(2).click()
        assert editor.input_value() == before + third
        assert page.locator("#suggestions").is_hidden()
    finally:
        page.close()


def _active_rows(server) -> int:
    return httpx.get(f"{server.url}/readyz", timeout=30).json()["services"]["generation"]["engine"]["active_rows"]


def _autocomplete_status_counts(server) -> dict[str, float]:
    pattern = re.compile(r'^batchserve_request_duration_seconds_count\{(.*)\} (\S+)$')
    counts: dict[str, float] = {}
    for line in httpx.get(f"{server.url}/metrics", timeout=30).text.splitlines():
        match = pattern.match(line)
        if match and 'route="/autocomplete"' in match.group(1):
            status = re.search(r'status="(\d+)"', match.group(1)).group(1)
            counts[status] = counts.get(status, 0) + float(match.group(2))
    return counts


def test_a_second_tab_aborts_the_first_request_and_only_its_reply_shows(generation_server, browser):  # noqa: F811
    before = _autocomplete_status_counts(generation_server)
    page = browser.new_page()
    sent: list = []
    failed: list = []
    answered: list = []
    page.on("request", lambda request: sent.append(request) if request.url.endswith("/autocomplete") else None)
    page.on("requestfailed", lambda request: failed.append(request) if request.url.endswith("/autocomplete") else None)
    page.on("response", lambda response: answered.append(response) if response.url.endswith("/autocomplete") else None)
    try:
        page.goto(generation_server.url + "/")
        page.fill("#max-tokens", "64")  # the first request is long: still decoding when the second Tab comes
        page.locator("#editor").click()
        page.keyboard.type(SENTENCE)
        page.keyboard.press("Tab")
        deadline = time.monotonic() + 60
        while _active_rows(generation_server) == 0:  # its rows are in the running batch
            assert time.monotonic() < deadline, "the first request never started decoding"
            time.sleep(0.02)
        assert page.locator("#suggestions").is_hidden()
        page.evaluate("() => { document.getElementById('max-tokens').value = '4'; }")  # set without moving the focus
        page.keyboard.press("Tab")

        items = page.locator("#suggestions li")
        items.nth(2).wait_for(timeout=WAIT_MS)
        shown = items.all_inner_texts()
        assert len(sent) == 2, [request.post_data for request in sent]
        assert json.loads(sent[0].post_data)["max_tokens"] == 64 and json.loads(sent[1].post_data)["max_tokens"] == 4
        assert failed == [sent[0]], "the first request was not aborted"
        assert [response.request for response in answered] == [sent[1]], "only the second request gets a reply"
        assert [text.strip() for text in shown] == [text.strip() for text in answered[0].json()["suggestions"]]
        page.wait_for_timeout(1000)  # nothing late replaces them
        assert items.all_inner_texts() == shown

        # the server freed the aborted request's rows and counted it as a client that went away, never a 5xx
        deadline = time.monotonic() + 60
        while _active_rows(generation_server) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _active_rows(generation_server) == 0
        deadline = time.monotonic() + 10
        while True:
            counts = _autocomplete_status_counts(generation_server)
            if counts.get("499", 0) > before.get("499", 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not [status for status in counts if status.startswith("5")], counts
        assert counts.get("499", 0) == before.get("499", 0) + 1, (before, counts)
        assert counts.get("200", 0) == before.get("200", 0) + 1, (before, counts)
    finally:
        page.close()
