"""The editor page in headless Chromium: Tab shows 3 suggestions; a key or a click inserts one."""

from __future__ import annotations

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
