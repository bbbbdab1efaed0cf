"""The core user journey end to end, over real HTTP and WebSockets against a running app."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.settings import TimeoutSettings
from controller.testing import Service


async def test_hi_gets_a_bot_answer_and_agent_gets_the_conversation(service: Service) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()

    ack = await customer.say("hi")
    assert ack["type"] == "ack" and not ack["duplicate"]
    conversation_id = ack["conversation_id"]
    reply = await customer.wait_message("bot", "demo bot")
    assert reply["conversation_id"] == conversation_id

    await customer.say("I want an agent")
    await customer.wait_message("controller", "queue")
    offer = await alice.wait_offer(conversation_id)
    accepted = await alice.accept(offer["offer_id"])
    assert accepted["type"] == "ack", accepted
    await customer.wait_message("controller", "now chatting with alice")

    await alice.say(conversation_id, "Hello, I am Alice. How can I help?")
    await customer.wait_message("agent", "I am Alice")
    await customer.say("My order is late")
    got = await alice.wait_for(
        lambda f: f["type"] == "message" and f["message"]["text"] == "My order is late"
    )
    assert got["conversation_id"] == conversation_id

    # The bot is gone after the handoff: the customer's message reached no bot.
    await service.settle()
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and conv.state == "agent"
    assert [p.role for p in conv.participants] == ["agent"]
    bot_texts = customer.texts("bot")
    assert len(bot_texts) == 2  # the greeting and "Let me find an agent"
    await customer.close()


async def test_agent_leaves_and_another_agent_gets_it_with_raised_priority(
    service: Service,
) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    bob = await service.agent("bob")
    await alice.available()
    ack = await customer.say("agent")
    conversation_id = ack["conversation_id"]
    await alice.take(conversation_id)
    await customer.wait_message("controller", "now chatting with alice")
    await bob.available()

    left = await alice.command({"type": "leave", "conversation_id": conversation_id})
    assert left["type"] == "ack", left
    await customer.wait_message("controller", "Another agent will be with you shortly")
    await bob.take(conversation_id)
    await customer.wait_message("controller", "now chatting with bob")

    await service.settle()
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None
    assert conv.state == "agent"
    assert conv.priority == 10  # "high"
    assert [(p.role, p.id) for p in conv.participants] == [("agent", "bob")]
    # Alice's capacity came back: she is in no conversation.
    me = await (await alice.http.get(service.base_url + "/api/v1/agents/me")).json()
    assert me["conversations"] == []
    await customer.close()


async def test_offer_not_answered_moves_to_the_next_agent(
    service: Service, clock: ManualClock
) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    bob = await service.agent("bob")
    await alice.available()
    clock.advance(5)  # bob becomes available later, so alice is the longest idle
    await bob.available()
    ack = await customer.say("agent")
    conversation_id = ack["conversation_id"]
    await alice.wait_offer(conversation_id)

    clock.advance(service.settings.timeouts.offer + 1)
    closed = await alice.wait_for(lambda f: f["type"] == "offer_closed")
    assert (closed["conversation_id"], closed["outcome"]) == (conversation_id, "expired")
    await customer.wait_message("controller", "Thank you for waiting")
    await bob.take(conversation_id)
    await customer.wait_message("controller", "now chatting with bob")
    await service.settle()
    events = [ev.type for ev, _ in await service.store.events(conversation_id)]
    # Exactly two offers: the re-queue decided after bob's acceptance must not offer it again.
    assert events.count("agent.offered") == 2, events
    assert events.count("agent.offer_expired") == 1


async def test_customer_closes_page_and_does_not_return(
    service: Service, clock: ManualClock
) -> None:
    customer = await service.customer()
    conversation_id = await customer.start_with_bot()
    await customer.close()
    await service.until(conversation_id, lambda c: "customer_grace" in c.timers)
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and not conv.customer_present

    clock.advance(service.settings.timeouts.customer_grace - 1)
    await service.settle()
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and conv.state == "bot"

    clock.advance(2)
    await _until_state(service, conversation_id, "closed")
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and conv.close_reason == "customer_left"
    assert conv.timers == {}


async def test_customer_who_returns_in_time_keeps_the_conversation(
    service: Service, clock: ManualClock
) -> None:
    customer = await service.customer()
    conversation_id = await customer.start_with_bot()
    token = customer.token
    await customer.close()
    await service.until(conversation_id, lambda c: "customer_grace" in c.timers)
    clock.advance(10)

    again = await service.customer(token)
    history = again.frames[0]
    assert history["conversation_id"] == conversation_id
    assert [m["from"] for m in history["messages"]] == ["customer", "bot"]
    await service.until(
        conversation_id, lambda c: c.customer_present and not c.timers.get("customer_grace")
    )
    clock.advance(service.settings.timeouts.customer_grace * 2)
    await service.settle()
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and conv.state == "bot" and conv.customer_present
    await again.close()


async def test_idle_customer_gets_a_reminder_then_the_conversation_closes(
    service: Service, clock: ManualClock
) -> None:
    customer = await service.customer()
    conversation_id = await customer.start_with_bot()
    await service.settle()

    clock.advance(service.settings.timeouts.idle_reminder + 1)
    await customer.wait_message("controller", "Are you still there?")
    clock.advance(service.settings.timeouts.idle_close + 1)
    await customer.wait_message("controller", "We closed this conversation")
    await _until_state(service, conversation_id, "closed")
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and conv.close_reason == "idle"

    # After the close, writing again starts a new conversation linked to the old one.
    ack2 = await customer.say("hello again")
    assert ack2["conversation_id"] != conversation_id
    await service.settle()
    new = await service.store.load_conversation(ack2["conversation_id"])
    assert new is not None and new.previous_conversation_id == conversation_id
    await customer.close()


async def test_customer_reply_resets_the_idle_timer(service: Service, clock: ManualClock) -> None:
    customer = await service.customer()
    ack = await customer.say("hi")
    await customer.wait_message("bot")
    clock.advance(service.settings.timeouts.idle_reminder - 5)
    await customer.say("hours")
    await customer.wait_message("bot", "Monday")
    clock.advance(10)
    await service.settle()
    assert not [t for t in customer.texts("controller") if "still there" in t]
    conv = await service.store.load_conversation(ack["conversation_id"])
    assert conv is not None and conv.state == "bot"
    await customer.close()


@pytest.mark.parametrize("disposition", ["solved"])
async def test_agent_close_goes_through_wrap_up(
    service: Service, clock: ManualClock, disposition: str
) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()
    ack = await customer.say("agent")
    conversation_id = ack["conversation_id"]
    await alice.take(conversation_id)
    await customer.wait_message("controller", "alice")
    await customer.close()  # the customer leaves; the agent is alone
    await service.until(conversation_id, lambda c: "customer_grace" in c.timers)
    clock.advance(service.settings.timeouts.customer_grace + 1)
    await _until_state(service, conversation_id, "wrap_up")
    done = await alice.command(
        {"type": "wrap_up", "conversation_id": conversation_id, "disposition": disposition}
    )
    assert done["type"] == "ack", done
    await _until_state(service, conversation_id, "closed")
    conv = await service.store.load_conversation(conversation_id)
    assert conv is not None and conv.attributes["disposition"] == disposition
    me = await (await alice.http.get(service.base_url + "/api/v1/agents/me")).json()
    assert me["conversations"] == []


async def _until_state(service: Service, conversation_id: str, state: str) -> None:
    await service.until(conversation_id, lambda c: c.state == state)


async def test_an_offer_is_withdrawn_when_the_customer_leaves_the_queue(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    # The offer lasts longer than the customer's grace period, so it is withdrawn, not expired.
    service: Service = await make_service(
        clock=clock, timeouts=TimeoutSettings(offer=600, customer_grace=60)
    )
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()
    conversation_id = (await customer.say("agent"))["conversation_id"]
    offer = await alice.wait_offer(conversation_id)
    await customer.close()
    await service.until(conversation_id, lambda c: "customer_grace" in c.timers)
    clock.advance(service.settings.timeouts.customer_grace + 1)
    closed = await alice.wait_for(lambda f: f["type"] == "offer_closed")
    assert (closed["offer_id"], closed["outcome"]) == (offer["offer_id"], "cancelled")
    refused = await alice.accept(offer["offer_id"])
    assert refused["type"] == "error" and refused["code"] == "offer_closed"
    me = await (await alice.http.get(service.base_url + "/api/v1/agents/me")).json()
    assert me["offers"] == [] and me["conversations"] == []
