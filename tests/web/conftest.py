"""Browser fixtures: Debian's chromium driven by Playwright (never a downloaded browser).

Screenshots of failures are kept in ``$CONVCTL_TEST_ARTIFACTS`` (default ``test-artifacts/``).
Without chromium, browser tests are skipped on a developer machine and fail in CI
(``CI=true``); ``scripts/test`` installs chromium when it can.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("CONVCTL_TEST_ARTIFACTS", "test-artifacts"))
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
]


def _browser_missing() -> str | None:
    try:
        import playwright  # noqa: F401
    except ImportError:
        return "playwright is not installed"
    if not Path(CHROMIUM).exists():
        return "chromium is not installed (apt-get install chromium)"
    return None


class Pages:
    """Pages of one browser, each in its own context (own storage), screenshot on failure."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.pages: list[tuple[str, Any]] = []

    async def new(self, name: str = "page") -> Any:
        context = await self.browser.new_context()
        page = await context.new_page()
        self.pages.append((name, page))
        return page


@pytest.fixture
async def pages(request: pytest.FixtureRequest) -> AsyncIterator[Pages]:
    missing = _browser_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"browser tests need a browser in CI: {missing}")
        pytest.skip(missing)
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        made = Pages(browser)
        try:
            yield made
        finally:
            failed = getattr(request.node, "rep_call", None)
            if failed is not None and failed.failed:
                await asyncio.to_thread(ARTIFACTS.mkdir, parents=True, exist_ok=True)
                for name, page in made.pages:
                    suffix = "" if name == "page" else f"-{name}"
                    await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}{suffix}.png"))
            await browser.close()


@pytest.fixture
async def page(pages: Pages) -> Any:
    return await pages.new()
