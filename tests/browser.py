"""Headless Chromium for page tests: Debian's /usr/bin/chromium driven by the playwright
library (no browser download; `playwright install` is never run).

Use the ``browser`` fixture (import it into the test module: ``from tests.browser import
browser``) and open pages with ``browser.new_page()``; the browser is closed after the module.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = os.environ.get("BATCHSERVE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium shared by a test module, closed after it."""
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no Chromium at {CHROMIUM}: run `make system-deps` (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()
