"""The web chat page in a real browser: bot, queue, agent, reload with history."""

from __future__ import annotations

import re
from typing import Any

from controller.testing import Service


async def test_customer_chats_with_the_bot_and_an_agent_in_the_page(
    service: Service, page: Any
) -> None:
    alice = await service.agent("alice")
    await alice.available()
    await page.goto(service.base_url + "/webchat")
    connected = page.locator("#status", has_text=re.compile(r"^connected$"))
    await connected.wait_for()

    await page.fill("#text", "hi")
    await page.click("button[type=submit]")
    await page.locator("li.bot", has_text="demo bot").wait_for()
    assert await page.locator("li.customer", has_text="hi").count() == 1

    await page.fill("#text", "agent please")
    await page.press("#text", "Enter")
    await page.locator("li.controller", has_text="in the queue").wait_for()
    offer = await alice.wait_offer()
    await alice.take(offer["conversation_id"])
    await page.locator("li.controller", has_text="now chatting with alice").wait_for()
    await alice.say(offer["conversation_id"], "Hello from Alice")
    await page.locator("li.agent", has_text="Hello from Alice").wait_for()

    # Reloading keeps the visitor (the page stores its signed session) and shows the history.
    await page.reload()
    await connected.wait_for()
    await page.locator("li.agent", has_text="Hello from Alice").wait_for()
    texts = await page.locator("#log li").all_inner_texts()
    assert sum("Hello from Alice" in t for t in texts) == 1
    assert sum("demo bot" in t for t in texts) == 1
    conversations = await service.store.count("conversations")
    assert conversations == 1
