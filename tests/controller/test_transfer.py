"""Transfers: an agent hands a conversation to a queue or to another agent, and leaves it."""

from __future__ import annotations

from controller.testing import AgentClient, Service, WebChatClient


async def _alice_serving(service: Service) -> tuple[WebChatClient, AgentClient, str]:
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()
    conversation_id = (await customer.say("agent"))["conversation_id"]
    await alice.take(conversation_id)
    await customer.wait_message("controller", "now chatting with alice")
    return customer, alice, conversation_id


async def _conversations_of(agent: AgentClient, service: Service) -> list[str]:
    me = await (await agent.http.get(service.base_url + "/api/v1/agents/me")).json()
    return list(me["conversations"])


async def test_transfer_to_a_queue_offers_it_to_the_next_agent(service: Service) -> None:
    customer, alice, conversation_id = await _alice_serving(service)
    bob = await service.agent("bob")
    await bob.available()
    ack = await alice.command(
        {"type": "transfer", "conversation_id": conversation_id, "queue": "billing"}
    )
    assert ack["type"] == "ack", ack
    await bob.take(conversation_id)
    await customer.wait_message("controller", "now chatting with bob")
    conv = await service.until(conversation_id, lambda c: c.state == "agent")
    assert [(p.role, p.id) for p in conv.participants] == [("agent", "bob")]
    assert conv.queue == "billing"
    assert await _conversations_of(alice, service) == []
    # A transfer is not an agent walking away: the customer is not told to wait again.
    assert not [t for t in customer.texts("controller") if "Another agent" in t]


async def test_transfer_to_an_agent_hands_over_at_once(service: Service) -> None:
    customer, alice, conversation_id = await _alice_serving(service)
    bob = await service.agent("bob")
    assert service.http is not None
    r = await alice.http.post(
        f"{service.base_url}/api/v1/conversations/{conversation_id}/transfer",
        json={"agent": "bob"},
    )
    assert r.status == 202, await r.text()
    conv = await service.until(conversation_id, lambda c: c.find("agent", "bob") is not None)
    assert conv.state == "agent" and [p.id for p in conv.participants] == ["bob"]
    assert conv.primary is not None and conv.primary.id == "bob"
    assert await _conversations_of(alice, service) == []
    assert await _conversations_of(bob, service) == [conversation_id]
    await customer.say("are you there?")
    got = await bob.wait_for(
        lambda f: f["type"] == "message" and f["message"]["text"] == "are you there?"
    )
    assert got["conversation_id"] == conversation_id
    await bob.say(conversation_id, "Bob here")
    await customer.wait_message("agent", "Bob here")
    assert not [t for t in customer.texts("controller") if "Another agent" in t]


async def test_bad_transfers_are_refused(service: Service) -> None:
    _, alice, conversation_id = await _alice_serving(service)
    url = f"{service.base_url}/api/v1/conversations/{conversation_id}/transfer"
    for body, status, code in (
        ({}, 422, "invalid_body"),
        ({"queue": "support", "agent": "bob"}, 422, "invalid_body"),
        ({"agent": "nobody"}, 404, "unknown_agent"),
    ):
        r = await alice.http.post(url, json=body)
        assert r.status == status, (body, await r.text())
        assert (await r.json())["error"]["code"] == code
    bob = await service.agent("bob")
    r = await bob.http.post(url, json={"queue": "support"})
    assert r.status == 403
    assert (await r.json())["error"]["code"] == "not_a_participant"
