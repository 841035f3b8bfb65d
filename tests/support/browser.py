"""A real browser for the UI tests: Debian's chromium, driven by Playwright's Python API.

Playwright's own browser download is not reachable from CI, so the browser is the system's
(``make test`` installs Debian's ``chromium`` where it is missing); ``CHROMIUM`` names another.
Screenshots are kept under ``.data/test-artifacts/`` as the tests' artifacts.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Page

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".data" / "test-artifacts"


def chromium_path() -> str:
    """The system's chromium; the test fails (it does not skip) where there is none."""
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        found = candidate and shutil.which(candidate)
        if found:
            return found
    pytest.fail(
        "no chromium on PATH: `make test` installs Debian's (apt-get install chromium), or set CHROMIUM"
    )


@contextmanager
def browser_page(width: int = 1400, height: int = 900) -> Iterator[Page]:
    """A page of a headless chromium (no sandbox: CI runs as root)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=chromium_path(), headless=True, args=["--no-sandbox"]
        )
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(30_000)
            yield page
        finally:
            browser.close()


def log_in(page: Page, base_url: str, user: str, password: str) -> None:
    """Log in through Airflow's own login page (the simple auth manager's)."""
    page.goto(f"{base_url}/")
    page.get_by_label("Username").fill(user)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{base_url}/")


def keep_screenshot(page: Page, folder: str, name: str) -> Path:
    """Save what the page shows now as ``.data/test-artifacts/<folder>/<name>.png``."""
    path = ARTIFACTS / folder / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(path))
    return path
