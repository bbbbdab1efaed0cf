"""An agent's desk socket closing: agent.disconnected, the grace period, agent.left or return."""

from __future__ import annotations

import asyncio

from controller.clock import ManualClock
from controller.keys import DESK
from controller.models import Conversation
from controller.testing import AgentClient, Service


def _present(conv: Conversation, agent_id: str) -> bool | None:
    me = conv.find("agent", agent_id)
    return None if me is None else me.present


async def _served_by_alice(service: Service) -> tuple[str, AgentClient]:
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()
    ack = await customer.say("agent")
    conversation_id = str(ack["conversation_id"])
    await alice.take(conversation_id)
    await customer.wait_message("controller", "now chatting with alice")
    return conversation_id, alice


async def test_desk_gone_past_the_grace_reroutes_to_another_agent(
    service: Service, clock: ManualClock
) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    bob = await service.agent("bob")
    await alice.available()
    ack = await customer.say("agent")
    conversation_id = str(ack["conversation_id"])
    await alice.take(conversation_id)
    await customer.wait_message("controller", "now chatting with alice")
    await bob.available()

    await alice.close()  # her only desk socket
    conv = await service.until(conversation_id, lambda c: "agent_grace" in c.timers)
    assert _present(conv, "alice") is False
    assert conv.state == "agent" and conv.attributes["disconnected_agent"] == "alice"

    grace = service.settings.timeouts.agent_grace
    clock.advance(grace - 1)
    await service.settle()
    conv = await service.until(conversation_id, lambda c: True)
    assert conv.state == "agent" and _present(conv, "alice") is False
    assert not [t for t in customer.texts("controller") if "Another agent" in t]

    clock.advance(2)
    await customer.wait_message("controller", "Another agent will be with you shortly")
    await bob.take(conversation_id)
    await customer.wait_message("controller", "now chatting with bob")
    conv = await service.until(conversation_id, lambda c: c.state == "agent")
    assert [(p.role, p.id) for p in conv.participants] == [("agent", "bob")]
    events = [ev for ev, _ in await service.store.events(conversation_id)]
    left = [ev for ev in events if ev.type == "agent.left"]
    assert [(ev.data["agent_id"], ev.data["reason"]) for ev in left] == [("alice", "disconnected")]
    assert [ev.type for ev in events].count("agent.disconnected") == 1
    # Alice's capacity came back.
    assert service.app[DESK].connected("alice") is False
    me = await (await bob.http.get(service.base_url + "/api/v1/agents/me")).json()
    assert me["conversations"] == [conversation_id]
    await customer.close()


async def test_desk_back_within_the_grace_keeps_the_conversation(
    service: Service, clock: ManualClock
) -> None:
    conversation_id, alice = await _served_by_alice(service)
    await alice.close()
    await service.until(conversation_id, lambda c: "agent_grace" in c.timers)
    clock.advance(10)

    again = AgentClient(service, "alice", alice.token)
    try:
        await again.connect()
        conv = await service.until(
            conversation_id,
            lambda c: "agent_grace" not in c.timers and _present(c, "alice") is True,
        )
        clock.advance(service.settings.timeouts.agent_grace * 2)
        await service.settle()
        conv = await service.until(conversation_id, lambda c: True)
        assert conv.state == "agent" and _present(conv, "alice") is True
        types = [ev.type for ev, _ in await service.store.events(conversation_id)]
        assert types.count("agent.disconnected") == 1
        assert types.count("agent.reconnected") == 1
        assert "agent.left" not in types
        # Still hers: she can write to the customer.
        ack = await again.say(conversation_id, "Sorry, my connection dropped.")
        assert ack["type"] == "ack", ack
    finally:
        await again.close()


async def test_only_the_last_socket_disconnects_keyed_by_its_connection(
    service: Service,
) -> None:
    conversation_id, alice = await _served_by_alice(service)
    assert service.http is not None
    url = f"{service.base_url}/api/v1/agents/ws?token={alice.token}"
    second = await service.http.ws_connect(url + "&connection=desk-tab-2")
    assert (await second.receive_json())["type"] == "hello"

    await alice.close()  # another socket is still open: nothing happens
    async with asyncio.timeout(10):
        while True:  # wait for the server to forget the closed socket (a condition)
            if service.app[DESK].count("alice") == 1:
                break
            await asyncio.sleep(0.005)
    await service.settle()
    types = [ev.type for ev, _ in await service.store.events(conversation_id)]
    assert "agent.disconnected" not in types

    await second.close()
    await service.until(conversation_id, lambda c: "agent_grace" in c.timers)
    gone = [
        ev
        for ev, _ in await service.store.events(conversation_id)
        if ev.type == "agent.disconnected"
    ]
    assert [ev.dedupe_key for ev in gone] == [
        f"desk:desk-tab-2:{conversation_id}:agent.disconnected"
    ]

    bad = await service.http.get(url + "&connection=no%20spaces")
    assert bad.status == 400
