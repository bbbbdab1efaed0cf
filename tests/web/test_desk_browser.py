"""The agent desk page in a real browser, with the web chat page as the customer."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from controller.clock import ManualClock
from controller.models import Conversation
from controller.testing import Service, WebChatClient, rules_with_assisting_bot
from tests.web.conftest import Pages


async def _agent_token(service: Service, agent_id: str) -> str:
    """Create the agent through the admin API and return a new token for it."""
    assert service.http is not None
    r = await service.http.post(
        service.base_url + "/api/v1/agents",
        json={"id": agent_id, "name": agent_id.title(), "capacity": 3},
        headers=service.admin_headers(),
    )
    assert r.status == 200, await r.text()
    r = await service.http.post(
        service.base_url + "/api/v1/tokens",
        json={"role": "agent", "subject": agent_id},
        headers=service.admin_headers(),
    )
    assert r.status == 201, await r.text()
    return str((await r.json())["token"])


async def _sign_in(page: Any, service: Service, token: str) -> None:
    await page.goto(service.base_url + "/desk")
    await page.get_by_label("Agent token").fill(token)
    await page.get_by_role("button", name="Sign in").click()
    await page.locator("#status", has_text=re.compile(r"^connected$")).wait_for()
    await page.get_by_label("Presence").select_option("available")
    await page.locator("#presence[data-confirmed=available]").wait_for(state="attached")


async def _accept_and_reply(desk: Any, text: str) -> None:
    accept = desk.get_by_role("button", name=re.compile(r"^Accept conversation"))
    await accept.click()
    await desk.locator("#transcript li.customer", has_text="agent").wait_for()
    await desk.get_by_label("Reply").fill(text)
    await desk.get_by_label("Reply").press("Enter")
    await desk.locator("#transcript li.agent:not(.pending)", has_text=text).wait_for()


async def test_agents_serve_the_web_chat_customer_from_the_desk(
    service: Service, pages: Pages
) -> None:
    alice_token = await _agent_token(service, "alice")
    bob_token = await _agent_token(service, "bob")
    customer = await pages.new("customer")
    alice = await pages.new("alice")
    bob = await pages.new("bob")

    await customer.goto(service.base_url + "/webchat")
    await customer.locator("#status", has_text=re.compile(r"^connected$")).wait_for()
    await customer.fill("#text", "agent")
    await customer.press("#text", "Enter")
    await customer.locator("li.controller", has_text="in the queue").wait_for()

    await _sign_in(alice, service, alice_token)
    await _accept_and_reply(alice, "Hello from Alice")
    await customer.locator("li.agent", has_text="Hello from Alice").wait_for()
    # The profile beside the chat: a web chat visitor is anonymous.
    await alice.locator("#profile", has_text="Anonymous").wait_for()

    # Bob is available before Alice leaves, so the conversation is rerouted to him.
    await _sign_in(bob, service, bob_token)
    await alice.get_by_role("button", name="Leave").click()
    await alice.locator("#status", has_text="You left conversation").wait_for()
    assert await alice.locator("#convs li").count() == 0

    await _accept_and_reply(bob, "Bob here")
    await customer.locator("li.agent", has_text="Bob here").wait_for()
    # Bob's desk shows the history, Alice's reply included.
    await bob.locator("#transcript li.agent", has_text="Hello from Alice").wait_for()
    texts = await customer.locator("#log li.agent").all_inner_texts()
    assert [t.split("\n")[-1] for t in texts] == ["Hello from Alice", "Bob here"]


async def test_desk_sends_and_edits_suggestions_and_wraps_up(
    make_service: Callable[..., Any], clock: ManualClock, pages: Pages, tmp_path: Path
) -> None:
    rules = rules_with_assisting_bot(tmp_path / "rules")
    service: Service = await make_service(clock=clock, rules_dir=rules)
    token = await _agent_token(service, "alice")
    customer = await pages.new("customer")
    desk = await pages.new("alice")

    await customer.goto(service.base_url + "/webchat")
    await customer.locator("#status", has_text=re.compile(r"^connected$")).wait_for()
    await customer.fill("#text", "agent")
    await customer.press("#text", "Enter")
    await customer.locator("li.controller", has_text="in the queue").wait_for()
    await _sign_in(desk, service, token)
    await _accept_and_reply(desk, "Hi, Alice here")

    # One click sends the bot's suggestion as the agent's message.
    await customer.fill("#text", "hello")
    await customer.press("#text", "Enter")
    send = desk.get_by_role("button", name=re.compile(r"^Send suggestion: Hello!"))
    await send.click()
    await customer.locator("li.agent", has_text="Write 'agent' to talk to a person").wait_for()
    assert await customer.locator("li.bot", has_text="Write 'agent'").count() == 0

    # "Edit" puts the suggestion into the reply box first.
    await customer.fill("#text", "what now")
    await customer.press("#text", "Enter")
    await desk.get_by_role("button", name=re.compile(r"^Edit suggestion: Sorry")).click()
    reply = desk.get_by_label("Reply")
    assert (await reply.input_value()).startswith("Sorry")
    await reply.fill("Let me check that for you")
    await reply.press("Enter")
    await customer.locator("li.agent", has_text="Let me check that for you").wait_for()

    # The customer goes away; the conversation is closed into wrap-up; the agent closes it.
    conversation_id = await desk.locator("#convs button").first.get_attribute("data-conversation")
    assert conversation_id
    await customer.close()
    await service.until(conversation_id, lambda c: "customer_grace" in c.timers)
    clock.advance(service.settings.timeouts.customer_grace + 1)
    await service.until(conversation_id, lambda c: c.state == "wrap_up")
    await desk.locator("#convs button").first.click()  # selecting looks at the state again
    await desk.locator("#state", has_text="wrap_up").wait_for()
    await desk.get_by_label("Disposition").select_option("solved")
    await desk.get_by_role("button", name="Finish wrap-up").click()
    await desk.locator("#status", has_text="Closed conversation").wait_for()
    await service.until(conversation_id, lambda c: c.state == "closed")
    done = [
        ev.data
        for ev, _ in await service.store.events(conversation_id)
        if ev.type == "agent.wrap_up_done"
    ]
    assert [d["disposition"] for d in done] == ["solved"]


async def _customer_in_queue(service: Service) -> tuple[WebChatClient, str]:
    """A web chat customer who asked for a person: the conversation waits in ``support``."""
    customer = await service.customer()
    ack = await customer.say("agent please")
    assert ack["type"] == "ack", ack
    await customer.wait_message("controller", "in the queue")
    return customer, str(ack["conversation_id"])


def _agents(conv: Conversation) -> list[tuple[str, bool]]:
    return [(p.id, p.primary) for p in conv.participants if p.role == "agent"]


async def test_conference_invite_whisper_and_the_invited_agent_serves_on(
    service: Service, pages: Pages
) -> None:
    alice_token = await _agent_token(service, "alice")
    bob_token = await _agent_token(service, "bob")
    customer, cid = await _customer_in_queue(service)
    alice = await pages.new("alice")
    bob = await pages.new("bob")

    await _sign_in(alice, service, alice_token)
    await _accept_and_reply(alice, "Hello, Alice here")
    await customer.wait_message("agent", "Alice here")
    await _sign_in(bob, service, bob_token)  # after Alice took it: nothing is offered to Bob

    # An unknown agent is refused; the page says why in its status line.
    await alice.get_by_label("Invite agent").fill("zed")
    await alice.get_by_role("button", name="Invite").click()
    await alice.locator("#status", has_text="unknown_agent").wait_for()

    await alice.get_by_label("Invite agent").fill("bob")
    await alice.get_by_label("Invite agent").press("Enter")
    await service.until(cid, lambda c: _agents(c) == [("alice", True), ("bob", False)])
    # The system frame brings the conversation onto Bob's desk, history included.
    await bob.locator(f'#convs button[data-conversation="{cid}"]').wait_for()
    await bob.locator("#transcript li.system", has_text="alice invited bob").wait_for()
    await bob.locator("#transcript li.agent", has_text="Hello, Alice here").wait_for()
    await bob.locator("#agents", has_text="alice (serving), bob").wait_for()

    # A whisper: both desks show it as such, the customer never gets it.
    await alice.get_by_label("Reply").fill("VIP customer, be nice")
    await alice.get_by_role("button", name="Whisper to agents").click()
    await bob.locator("#transcript li.whisper", has_text="VIP customer, be nice").wait_for()
    await bob.locator("#transcript li.whisper", has_text="Whisper from Agent alice").wait_for()
    mine = alice.locator("#transcript li.whisper:not(.pending)", has_text="VIP customer")
    await mine.wait_for()
    assert await alice.locator("#transcript li.whisper").count() == 1  # not twice

    await bob.get_by_label("Reply").fill("Bob here, I can help with billing")
    await bob.get_by_label("Reply").press("Enter")
    await customer.wait_message("agent", "Bob here")
    await alice.locator("#transcript li.agent", has_text="Bob here").wait_for()
    await service.settle()
    assert not [t for t in customer.texts() if "VIP" in t]

    # Alice leaves: the conversation leaves her desk; Bob serves on, nobody is re-routed.
    await alice.get_by_role("button", name="Leave").click()
    await alice.locator("#status", has_text="You left conversation").wait_for()
    assert await alice.locator("#convs li").count() == 0
    conv = await service.until(cid, lambda c: c.find("agent", "alice") is None)
    assert conv.state == "agent" and _agents(conv) == [("bob", True)]
    assert (await customer.say("are you still there?"))["type"] == "ack"
    await bob.locator("#transcript li.customer", has_text="still there").wait_for()
    await bob.get_by_label("Reply").fill("Yes, still here")
    await bob.get_by_label("Reply").press("Enter")
    await customer.wait_message("agent", "Yes, still here")
    assert not [t for t in customer.texts() if "VIP" in t]


async def test_transfer_to_a_queue_from_the_desk(service: Service, pages: Pages) -> None:
    alice_token = await _agent_token(service, "alice")
    bob_token = await _agent_token(service, "bob")
    customer, cid = await _customer_in_queue(service)
    alice = await pages.new("alice")
    bob = await pages.new("bob")

    await _sign_in(alice, service, alice_token)
    await _accept_and_reply(alice, "Alice here, let me pass you on")
    await _sign_in(bob, service, bob_token)

    await alice.get_by_label("Transfer to").select_option("queue")
    await alice.get_by_label("Queue name").fill("support")
    await alice.get_by_role("button", name="Transfer", exact=True).click()
    await alice.locator(
        "#status", has_text=f"Transferred conversation {cid} to queue support"
    ).wait_for()
    assert await alice.locator("#convs li").count() == 0

    # The router offers it to Bob (Alice, who just left it, is not offered it again).
    await bob.get_by_role("button", name=f"Accept conversation {cid}").click()
    await bob.locator("#transcript li.agent", has_text="Alice here").wait_for()
    await bob.get_by_label("Reply").fill("Bob from support")
    await bob.get_by_label("Reply").press("Enter")
    await customer.wait_message("agent", "Bob from support")
    conv = await service.until(cid, lambda c: _agents(c) == [("bob", True)])
    assert conv.state == "agent" and conv.queue == "support"
    assert await alice.locator("#convs li").count() == 0


async def test_transfer_to_an_agent_from_the_desk(service: Service, pages: Pages) -> None:
    alice_token = await _agent_token(service, "alice")
    bob_token = await _agent_token(service, "bob")
    customer, cid = await _customer_in_queue(service)
    alice = await pages.new("alice")
    bob = await pages.new("bob")

    await _sign_in(alice, service, alice_token)
    await _accept_and_reply(alice, "Alice here")
    await _sign_in(bob, service, bob_token)

    await alice.get_by_label("Transfer to").select_option("agent")
    await alice.get_by_label("Agent id").fill("bob")
    await alice.get_by_label("Agent id").press("Enter")
    await alice.locator(
        "#status", has_text=f"Transferred conversation {cid} to agent bob"
    ).wait_for()
    assert await alice.locator("#convs li").count() == 0
    await service.until(cid, lambda c: _agents(c) == [("bob", True)])

    # The next frame of the conversation brings it onto Bob's desk.
    assert (await customer.say("hello?"))["type"] == "ack"
    await bob.locator("#transcript li.customer", has_text="hello?").wait_for()
    await bob.get_by_label("Reply").fill("Bob now")
    await bob.get_by_label("Reply").press("Enter")
    await customer.wait_message("agent", "Bob now")


async def test_close_and_wrap_up_from_the_desk(service: Service, pages: Pages) -> None:
    token = await _agent_token(service, "alice")
    customer, cid = await _customer_in_queue(service)
    desk = await pages.new("alice")
    await _sign_in(desk, service, token)
    await _accept_and_reply(desk, "Hi, anything else?")
    await customer.wait_message("agent", "anything else")

    finish = desk.get_by_role("button", name="Finish wrap-up")
    assert await finish.is_disabled()  # no wrap-up before the conversation is closed
    await desk.get_by_role("button", name="Close conversation").click()
    await desk.locator("#state", has_text="wrap_up").wait_for()
    await desk.locator("#status", has_text="choose a disposition").wait_for()
    assert await desk.get_by_label("Reply").is_disabled()
    await service.until(cid, lambda c: c.state == "wrap_up")

    await desk.get_by_label("Disposition").select_option("follow_up")
    await finish.click()
    await desk.locator("#status", has_text=f"Closed conversation {cid} (follow_up)").wait_for()
    assert await desk.locator("#convs li").count() == 0
    conv = await service.until(cid, lambda c: c.state == "closed")
    assert conv.attributes["disposition"] == "follow_up"
    assert conv.close_reason == "agent_closed"
