"""The web chat page in a real browser: bot, queue, agent, reload with history."""

from __future__ import annotations

import re
from typing import Any

from connectors.base import BotButton, BotMessage, BotReply, BotRequest
from controller.keys import BOTS
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


async def test_bot_buttons_and_images_show_and_a_tap_sends_the_payload(
    service: Service, page: Any, monkeypatch: Any
) -> None:
    bot = service.app[BOTS]["demo"]
    asked: list[str] = []

    async def ask(request: BotRequest) -> BotReply:
        asked.append(request.text)
        if request.text == "/opening_hours":
            return BotReply(messages=(BotMessage("Monday to Friday, 9 to 17."),))
        return BotReply(
            messages=(
                BotMessage(
                    "What do you need?",
                    buttons=(
                        BotButton("Opening hours", "/opening_hours"),
                        BotButton("Prices", "/prices"),
                    ),
                    image="https://example.com/help.png",
                ),
            )
        )

    monkeypatch.setattr(bot, "ask", ask)
    await page.goto(service.base_url + "/webchat")
    await page.locator("#status", has_text=re.compile(r"^connected$")).wait_for()
    await page.fill("#text", "hi")
    await page.press("#text", "Enter")
    question = page.locator("li.bot", has_text="What do you need?")
    await question.wait_for()
    assert await question.locator("img").get_attribute("src") == "https://example.com/help.png"

    await page.get_by_role("button", name="Opening hours").click()
    await page.locator("li.bot", has_text="Monday to Friday").wait_for()
    # The customer's line shows the title; the bot was asked with the payload.
    assert await page.locator("li.customer", has_text="Opening hours").count() == 1
    assert asked == ["hi", "/opening_hours"]
    assert await page.locator(".choices").count() == 0
