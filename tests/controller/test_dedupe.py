"""The same inbound event delivered twice, or 50 times at once, has one effect."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from controller.clock import ManualClock
from controller.settings import ConnectorInstance
from controller.testing import Service

# 50 sockets of one visitor at once are beyond the per-visitor rate limit on purpose here.
UNLIMITED = [
    ConnectorInstance(name="webchat", type="webchat", settings={"messages_per_window": 1000}),
    ConnectorInstance(name="demo", type="demo_bot"),
]


async def _count_events(service: Service, conversation_id: str, kind: str) -> int:
    return sum(1 for ev, _ in await service.store.events(conversation_id) if ev.type == kind)


async def test_web_chat_frame_sent_twice_is_one_message(service: Service) -> None:
    customer = await service.customer()
    first = await customer.say("hi", client_id="same-id")
    await customer.wait_message("bot")
    second = await customer.say("hi", client_id="same-id")
    assert not first["duplicate"] and second["duplicate"]
    assert second["event_id"] == first["event_id"]
    await service.settle()
    cid = first["conversation_id"]
    assert await _count_events(service, cid, "customer.message") == 1
    assert await _count_events(service, cid, "bot.message") == 1
    transcript = await service.store.messages(cid, include_agent_only=True)
    assert [m.sender_role for m in transcript] == ["customer", "bot"]


async def test_fifty_concurrent_deliveries_of_one_frame(
    make_service: Callable[..., Any], clock: ManualClock
) -> None:
    service: Service = await make_service(clock=clock, connectors=UNLIMITED)
    first = await service.customer()
    sockets = [first] + [await service.customer(first.token) for _ in range(49)]
    acks = await asyncio.gather(*(s.say("hours", client_id="burst-1") for s in sockets))
    assert {a["type"] for a in acks} == {"ack"}
    assert sum(1 for a in acks if not a["duplicate"]) == 1
    assert len({a["event_id"] for a in acks}) == 1
    await service.settle()
    cid = acks[0]["conversation_id"]
    assert await _count_events(service, cid, "customer.message") == 1
    assert await _count_events(service, cid, "bot.message") == 1
    assert await service.store.count("conversations") == 1


async def test_first_messages_of_a_new_visitor_arriving_together_open_one_conversation(
    service: Service,
) -> None:
    first = await service.customer()
    other = await service.customer(first.token)
    acks = await asyncio.gather(first.say("hi"), other.say("hours"), first.say("prices"))
    assert len({a["conversation_id"] for a in acks}) == 1
    await service.settle()
    events = await service.store.events(acks[0]["conversation_id"])
    assert [ev.seq for ev, _ in events] == list(range(1, len(events) + 1))
    assert await service.store.count("conversations") == 1


async def _agent_in_conversation(service: Service) -> tuple[str, object]:
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()
    ack = await customer.say("agent")
    await alice.take(ack["conversation_id"])
    await customer.wait_message("controller", "alice")
    return ack["conversation_id"], alice


async def test_agent_message_with_the_same_idempotency_key(service: Service) -> None:
    cid, alice = await _agent_in_conversation(service)
    url = f"{service.base_url}/api/v1/conversations/{cid}/messages"
    headers = {"Idempotency-Key": "k-1"}
    http = alice.http  # type: ignore[attr-defined]
    responses = await asyncio.gather(
        *(http.post(url, json={"text": "one moment"}, headers=headers) for _ in range(50))
    )
    bodies = [await r.json() for r in responses]
    assert sorted(r.status for r in responses) == [200] * 49 + [202]
    assert len({b["event_id"] for b in bodies}) == 1
    other = await http.post(url, json={"text": "something else"}, headers=headers)
    assert other.status == 422
    assert (await other.json())["error"]["code"] == "idempotency_key_reused"
    await service.settle()
    assert await _count_events(service, cid, "agent.message") == 1
    transcript = await service.store.messages(cid, include_agent_only=False)
    assert [m.text for m in transcript].count("one moment") == 1


async def test_accepting_an_offer_twice(service: Service) -> None:
    customer = await service.customer()
    alice = await service.agent("alice")
    await alice.available()
    ack = await customer.say("agent")
    offer = await alice.wait_offer(ack["conversation_id"])
    results = await asyncio.gather(*(alice.accept(offer["offer_id"]) for _ in range(10)))
    assert sorted(r["type"] for r in results) == ["ack"] + ["error"] * 9
    assert {r["code"] for r in results if r["type"] == "error"} == {"offer_closed"}
    await service.settle()
    assert await _count_events(service, ack["conversation_id"], "agent.accepted") == 1
