"""Conference and whispers: a second agent joins, agents whisper, the first agent leaves."""

from __future__ import annotations

from controller.keys import ROUTER
from controller.testing import Service


async def test_a_second_agent_joins_whispers_stay_among_agents_and_the_stayer_serves_on(
    service: Service,
) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    bob = await service.agent("bob")
    await alice.available()
    ack = await customer.say("agent please")
    cid = str(ack["conversation_id"])
    await alice.take(cid)
    await customer.wait_message("controller", "now chatting with alice")

    invited = await alice.command({"type": "invite", "conversation_id": cid, "agent": "bob"})
    assert invited["type"] == "ack", invited
    await bob.wait_for(lambda f: f["type"] == "system" and "invited bob" in f["message"]["text"])
    conv = await service.until(cid, lambda c: c.find("agent", "bob") is not None)
    assert [(p.id, p.primary) for p in conv.participants if p.role == "agent"] == [
        ("alice", True),
        ("bob", False),
    ]
    assert service.app[ROUTER].agent_view("bob")["conversations"] == [cid]  # counts on capacity

    # A whisper reaches both desks and never the customer.
    whisper = await alice.command(
        {"type": "message", "conversation_id": cid, "text": "VIP, be nice", "to": "agents"}
    )
    assert whisper["type"] == "ack", whisper
    await bob.wait_for(lambda f: f["type"] == "whisper" and f["message"]["text"] == "VIP, be nice")
    await customer.say("hello both")
    await bob.wait_for(lambda f: f["type"] == "message" and f["message"]["text"] == "hello both")
    await bob.say(cid, "Bob here, I can help with billing.")
    await customer.wait_message("agent", "Bob here")

    # Alice leaves: Bob stays and serves; nobody is re-routed.
    left = await alice.command({"type": "leave", "conversation_id": cid})
    assert left["type"] == "ack", left
    conv = await service.until(cid, lambda c: c.find("agent", "alice") is None)
    assert conv.state == "agent"
    assert [(p.id, p.primary) for p in conv.participants if p.role == "agent"] == [("bob", True)]
    await service.settle()
    assert "VIP, be nice" not in customer.texts()
    assert not [t for t in customer.texts("controller") if "Another agent" in t]

    # Inviting someone already in it, or an unknown agent, is refused.
    again = await bob.command({"type": "invite", "conversation_id": cid, "agent": "bob"})
    assert again["type"] == "error" and again["code"] == "already_in"
    nobody = await bob.command({"type": "invite", "conversation_id": cid, "agent": "zed"})
    assert nobody["type"] == "error" and nobody["code"] == "unknown_agent"
