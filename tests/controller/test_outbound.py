"""Outbound conversations: an agent writes first (a WhatsApp template), the reply comes back."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from controller.clock import ManualClock
from controller.keys import WORKERS
from controller.models import NewEvent
from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing_graph import FakeGraph, MetaSender, change, envelope, text_message

SECRET = "outbound-app-secret"
NUMBER = "106540352242922"
USER = "351910000077"


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    fake = await FakeGraph(tokens={NUMBER: "token-outbound"}).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def svc(graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock) -> Service:
    service: Service = await make_service(
        clock=clock,
        connectors=[
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(name="demo", type="demo_bot"),
            ConnectorInstance(
                name="whatsapp",
                type="whatsapp",
                settings={
                    "graph_base_url": graph.base_url,
                    "graph_api_version": graph.version,
                    "app_secret": SECRET,
                    "verify_token": "outbound-verify",
                    "endpoints": [{"phone_number_id": NUMBER, "access_token": "token-outbound"}],
                },
            ),
        ],
    )
    return service


async def _post(svc: Service, token: str, body: dict[str, Any], key: str | None = None) -> Any:
    assert svc.http is not None
    headers = {"Authorization": f"Bearer {token}"}
    if key:
        headers["Idempotency-Key"] = key
    async with svc.http.post(
        svc.base_url + "/api/v1/conversations", json=body, headers=headers
    ) as r:
        return r.status, await r.json()


async def test_agent_starts_a_whatsapp_conversation_with_a_template_and_the_reply_returns(
    svc: Service, graph: FakeGraph
) -> None:
    alice = await svc.agent("alice")
    body = {
        "channel": "whatsapp",
        "endpoint": NUMBER,
        "to": USER,
        "text": "Hello, your order A-17 has shipped.",
        "template": {"name": "order_shipped", "parameters": ["A-17"]},
    }
    status, ack = await _post(svc, alice.token, body, key="first-contact")
    assert status == 202, ack
    cid = ack["conversation_id"]
    [sent] = await graph.wait_sent(1, lambda r: r.json["type"] == "template")
    assert sent.json["to"] == USER
    assert sent.json["template"]["name"] == "order_shipped"
    conv = await svc.until(cid, lambda c: c.state == "agent")
    assert [(p.role, p.id, p.primary) for p in conv.participants] == [("agent", "alice", True)]
    assert conv.attributes["direction"] == "outbound"
    created = [ev for ev, _ in await svc.store.events(cid) if ev.type == "conversation.created"]
    assert created[0].data["direction"] == "outbound"

    # Retried with the same key: the same conversation, nothing sent twice.
    status, again = await _post(svc, alice.token, body, key="first-contact")
    assert status == 200 and again["conversation_id"] == cid and again["duplicate"]

    # The customer answers on WhatsApp: the same conversation, the agent sees it, no bot.
    assert svc.http is not None
    sender = MetaSender(svc.http, svc.base_url + "/webhooks/whatsapp", SECRET)
    code, _ = await sender.post(
        envelope([change(NUMBER, messages=[text_message(USER, "Thanks! When?", "wamid.R1")])])
    )
    assert code == 200
    frame = await alice.wait_for(
        lambda f: f["type"] == "message" and f["message"]["text"] == "Thanks! When?"
    )
    assert frame["conversation_id"] == cid
    await alice.say(cid, "Tomorrow before noon.")
    await graph.wait_sent(
        1, lambda r: r.json.get("text", {}).get("body") == "Tomorrow before noon."
    )
    conv = await svc.until(cid, lambda c: c.state == "agent")
    assert not [p for p in conv.participants if p.role == "bot"]
    assert len(graph.sent(lambda r: r.json["type"] == "template")) == 1


async def test_outbound_refusals_are_clear(svc: Service, graph: FakeGraph) -> None:
    alice = await svc.agent("alice")
    bob = await svc.agent("bob")
    base = {"channel": "whatsapp", "endpoint": NUMBER, "to": USER, "text": "Hi"}
    status, err = await _post(svc, alice.token, {**base, "channel": "telex"})
    assert status == 404 and err["error"]["code"] == "unknown_channel"
    status, err = await _post(svc, alice.token, {k: v for k, v in base.items() if k != "to"})
    assert status == 422 and "either 'to'" in err["error"]["message"]
    status, err = await _post(svc, alice.token, {**base, "endpoint": None})
    assert status == 422 and err["error"]["code"] == "endpoint_required"
    status, err = await _post(svc, alice.token, {**base, "customer_id": "cu_nobody", "to": None})
    assert status == 404 and err["error"]["code"] == "unknown_customer"

    status, ack = await _post(svc, alice.token, base)
    assert status == 202
    # The answer comes once the message is accepted; Alice serves once it is decided.
    await svc.until(ack["conversation_id"], lambda c: c.find("agent", "alice") is not None)
    # Bob cannot barge into Alice's open conversation with the same customer.
    status, err = await _post(svc, bob.token, {**base, "text": "Hello from Bob"})
    assert status == 409 and err["error"]["code"] == "conversation_open"
    assert ack["conversation_id"] in err["error"]["message"]
    # Alice writing again continues her conversation; later, the customer's id works too
    # (the endpoint is the one of the customer's earlier conversation).
    status, again = await _post(svc, alice.token, {**base, "text": "One more thing"})
    assert status == 202 and again["conversation_id"] == ack["conversation_id"]
    conv = await svc.until(again["conversation_id"], lambda c: c.version >= 2)
    by_id = {"channel": "whatsapp", "customer_id": conv.customer_id, "text": "And another"}
    status, third = await _post(svc, alice.token, by_id)
    assert status == 202 and third["conversation_id"] == ack["conversation_id"]
    await graph.wait_sent(3)


async def test_a_second_message_before_the_first_is_decided_continues_the_conversation(
    svc: Service, graph: FakeGraph, clock: ManualClock
) -> None:
    """Alice's first outbound message is accepted but not decided yet (she is no participant
    yet): her second one goes into the same conversation, not a 409; Bob still gets the 409."""
    alice = await svc.agent("alice")
    bob = await svc.agent("bob")
    base = {"channel": "whatsapp", "endpoint": NUMBER, "to": USER}
    # As the handler stores it, but the workers are not told: the decision is still to come.
    [first] = await svc.store.accept(
        [
            NewEvent(
                type="agent.outbound",
                source="agent:alice",
                dedupe_key="race-first",
                channel="whatsapp",
                instance="whatsapp",
                endpoint=NUMBER,
                identity=USER,
                data={"agent_id": "alice", "text": "First"},
            )
        ],
        clock.now(),
    )
    cid = first.conversation_id
    status, err = await _post(svc, bob.token, {**base, "text": "Bob here"})
    assert status == 409 and err["error"]["code"] == "conversation_open"
    status, second = await _post(svc, alice.token, {**base, "text": "Second"})
    assert status == 202 and second["conversation_id"] == cid
    svc.app[WORKERS].notify([cid])
    conv = await svc.until(cid, lambda c: c.version >= 2)
    assert [(p.role, p.id, p.primary) for p in conv.participants] == [("agent", "alice", True)]
    sent = await graph.wait_sent(2)
    assert [r.json["text"]["body"] for r in sent] == ["First", "Second"]
    decided = [(e.type, s) for e, s in await svc.store.events(cid) if e.type == "agent.outbound"]
    assert decided == [("agent.outbound", "decided"), ("agent.outbound", "decided")]
