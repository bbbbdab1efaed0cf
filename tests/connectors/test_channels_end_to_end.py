"""A whole conversation on each Meta channel, through the real service and the fake Graph API:
the customer writes, the demo bot answers, the customer asks for a person, an agent takes the
conversation and chats, the customer goes quiet, the conversation closes and the agent wraps
up. At each step the test checks what Graph received (and delivery statuses name our
messages)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from connectors.whatsapp import WhatsAppChannel
from controller.clock import ManualClock
from controller.keys import CHANNELS, CONNECTOR_CONTEXT
from controller.settings import ConnectorInstance
from controller.testing import AgentClient, Service
from controller.testing_graph import (
    FakeGraph,
    GraphRequest,
    MetaSender,
    change,
    envelope,
    messaging_item,
    messenger_text,
    page_envelope,
    status,
    text_message,
)

SECRET = "test-app-secret"
VERIFY = "test-verify"
NUMBER = "106540352242922"
WA_TOKEN = "test-token-e2e"
WA_USER = "351910000042"
PAGE = "108011112222333"
PAGE_TOKEN = "test-page-token-e2e"
PSID = "6543210987654321"

GREETING = "Hello! I am the demo bot."
HANDOFF = "Let me find an agent for you."
QUEUED = "You are in the queue. An agent will be with you shortly."
JOINED = "You are now chatting with alice."
ANSWER = "It ships tomorrow; here is the tracking link."
REMINDER = "Are you still there?"
CLOSING = "We closed this conversation because we did not hear from you."


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    fake = await FakeGraph(tokens={NUMBER: WA_TOKEN}, page_tokens={PAGE: PAGE_TOKEN}).start()
    yield fake
    await fake.stop()


async def start_service(
    make_service: Callable[..., Any], clock: ManualClock, channel: ConnectorInstance
) -> Service:
    svc: Service = await make_service(
        connectors=[channel, ConnectorInstance(name="demo", type="demo_bot")],
        clock=clock,
        outbox_backoff_base=0.01,
        outbox_backoff_max=0.05,
    )
    # The lookup statuses use to name our messages (kept if the service already gives it).
    svc.app[CONNECTOR_CONTEXT].service.setdefault(
        "provider_message", lambda instance, pid: svc.store.provider_message(instance, pid)
    )
    return svc


def meta_app(graph: FakeGraph) -> dict[str, Any]:
    return {
        "graph_base_url": graph.base_url,
        "graph_api_version": graph.version,
        "app_secret": SECRET,
        "verify_token": VERIFY,
    }


async def conversation_id(svc: Service, instance: str, endpoint: str, identity: str) -> str:
    # The webhook answers after the commit: the conversation exists once the POST returned.
    cid = await svc.store.latest_conversation_id(instance, endpoint, identity)
    assert cid is not None
    return cid


async def events_of(svc: Service, cid: str, kind: str) -> list[Any]:
    return [ev for ev, _ in await svc.store.events(cid) if ev.type == kind]


async def agent_takes(svc: Service, cid: str) -> AgentClient:
    alice = await svc.agent("alice")
    await alice.available()
    await alice.take(cid)
    return alice


async def customer_goes_quiet_and_agent_wraps_up(
    svc: Service, clock: ManualClock, alice: AgentClient, cid: str
) -> None:
    """No reply after the agent's message: the reminder, then the idle close; the agent
    handled the conversation, so it waits in wrap-up until the agent wraps up."""
    timeouts = svc.settings.timeouts
    await svc.until(cid, lambda c: "idle_reminder" in c.timers)
    clock.advance(timeouts.idle_reminder + 1)
    await svc.until(cid, lambda c: "idle_close" in c.timers)
    clock.advance(timeouts.idle_close + 1)
    conv = await svc.until(cid, lambda c: c.state == "wrap_up")
    assert conv.close_reason == "idle"
    done = await alice.command({"type": "wrap_up", "conversation_id": cid, "disposition": "solved"})
    assert done["type"] == "ack", done
    conv = await svc.until(cid, lambda c: c.state == "closed")
    assert conv.attributes["disposition"] == "solved"


def starts(*texts: str) -> Callable[[list[str]], bool]:
    """Whether the texts sent so far begin with these, in order."""
    return lambda sent: (
        len(sent) >= len(texts) and all(s.startswith(t) for s, t in zip(sent, texts, strict=False))
    )


async def test_whatsapp_conversation_end_to_end(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    settings = {
        **meta_app(graph),
        "endpoints": [{"phone_number_id": NUMBER, "access_token": WA_TOKEN}],
    }
    svc = await start_service(
        make_service, clock, ConnectorInstance(name="whatsapp", type="whatsapp", settings=settings)
    )
    assert svc.http is not None
    meta = MetaSender(svc.http, svc.base_url + "/webhooks/whatsapp", SECRET)
    channel = svc.app[CHANNELS]["whatsapp"]
    assert isinstance(channel, WhatsAppChannel)

    def texts() -> list[str]:
        return [r.json["text"]["body"] for r in graph.sent()]

    async def until_sent(*expected: str) -> list[GraphRequest]:
        await graph.wait_for(lambda _: starts(*expected)(texts()))
        return graph.sent()

    async def customer(text: str, wamid: str) -> None:
        body = envelope(
            [change(NUMBER, messages=[text_message(WA_USER, text, wamid)], names={WA_USER: "Ana"})]
        )
        assert (await meta.post(body))[0] == 200

    # The customer writes; the demo bot answers through the number, with its token.
    await customer("hi", "wamid.E2E1")
    [greeting] = await until_sent(GREETING)
    cid = await conversation_id(svc, "whatsapp", NUMBER, WA_USER)
    assert greeting.path == f"/{graph.version}/{NUMBER}/messages"
    assert greeting.token == WA_TOKEN
    assert greeting.json["to"] == WA_USER and greeting.json["type"] == "text"

    # The customer asks for a person: the bot hands over and the customer is queued.
    await customer("I want an agent", "wamid.E2E2")
    await until_sent(GREETING, HANDOFF, QUEUED)
    await svc.until(cid, lambda c: c.state == "queued")

    # Alice takes it; the customer is told, and what the customer writes reaches her desk.
    alice = await agent_takes(svc, cid)
    await until_sent(GREETING, HANDOFF, QUEUED, JOINED)
    await customer("Where is my order?", "wamid.E2E3")
    frame = await alice.wait_for(
        lambda f: f["type"] == "message" and f["message"]["text"] == "Where is my order?"
    )
    assert frame["conversation_id"] == cid and frame["message"]["from"] == "customer"
    assert (await alice.say(cid, ANSWER))["type"] == "ack"
    sent = await until_sent(GREETING, HANDOFF, QUEUED, JOINED, ANSWER)
    answer = sent[4]

    # Meta reports the answer delivered and read: the statuses name alice's message.
    await svc.settle()
    assert answer.provider_id is not None
    statuses = [
        status(answer.provider_id, "delivered", WA_USER),
        status(answer.provider_id, "read", WA_USER),
    ]
    assert (await meta.post(envelope([change(NUMBER, statuses=statuses)])))[0] == 200
    [line] = [
        m for m in await svc.store.messages(cid, include_agent_only=False) if m.text == ANSWER
    ]
    found = await events_of(svc, cid, "delivery.status")
    assert [(e.data["status"], e.data["message_id"]) for e in found] == [
        ("delivered", line.id),
        ("read", line.id),
    ]

    # The customer goes quiet: reminder, closing message, wrap-up by alice, closed.
    await customer_goes_quiet_and_agent_wraps_up(svc, clock, alice, cid)
    sent = await until_sent(GREETING, HANDOFF, QUEUED, JOINED, ANSWER, REMINDER, CLOSING)
    assert len(sent) == 7
    assert all(r.json["to"] == WA_USER and r.token == WA_TOKEN for r in sent)
    assert len({r.json["biz_opaque_callback_data"] for r in sent}) == 7  # one key each
    assert [r.status for r in graph.requests if r.status != 200] == []
    # Every customer message was marked read, through the same number.
    await channel.idle()
    assert [r.json["message_id"] for r in graph.reads()] == [
        "wamid.E2E1",
        "wamid.E2E2",
        "wamid.E2E3",
    ]


async def test_messenger_conversation_end_to_end(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    settings = {**meta_app(graph), "pages": [{"page_id": PAGE, "access_token": PAGE_TOKEN}]}
    svc = await start_service(
        make_service,
        clock,
        ConnectorInstance(name="messenger", type="messenger", settings=settings),
    )
    assert svc.http is not None
    meta = MetaSender(svc.http, svc.base_url + "/webhooks/messenger", SECRET)

    def texts() -> list[str]:
        return [str(r.json["message"].get("text", "")) for r in graph.sent()]

    async def until_sent(*expected: str) -> list[GraphRequest]:
        await graph.wait_for(lambda _: starts(*expected)(texts()))
        return graph.sent()

    async def customer(text: str, mid: str) -> None:
        body = page_envelope((PAGE, [messenger_text(PSID, PAGE, text, mid)]))
        assert (await meta.post(body))[0] == 200

    await customer("hi", "m_E2E1")
    [greeting] = await until_sent(GREETING)
    cid = await conversation_id(svc, "messenger", PAGE, PSID)
    assert greeting.path == f"/{graph.version}/me/messages"
    assert greeting.access_token == PAGE_TOKEN and greeting.page_id == PAGE
    assert greeting.json["recipient"] == {"id": PSID}

    await customer("Can I talk to a person?", "m_E2E2")
    await until_sent(GREETING, HANDOFF, QUEUED)
    await svc.until(cid, lambda c: c.state == "queued")

    alice = await agent_takes(svc, cid)
    await until_sent(GREETING, HANDOFF, QUEUED, JOINED)
    await customer("Where is my order?", "m_E2E3")
    await alice.wait_for(
        lambda f: f["type"] == "message" and f["message"]["text"] == "Where is my order?"
    )
    assert (await alice.say(cid, ANSWER))["type"] == "ack"
    sent = await until_sent(GREETING, HANDOFF, QUEUED, JOINED, ANSWER)
    answer = sent[4]

    # Messenger reports the delivery by mid and the read by watermark: both name the answer.
    await svc.settle()
    [line] = [
        m for m in await svc.store.messages(cid, include_agent_only=False) if m.text == ANSWER
    ]
    watermark = int(clock.now().timestamp() * 1000)
    items = [
        messaging_item(PSID, PAGE, delivery={"mids": [answer.provider_id], "watermark": watermark}),
        messaging_item(PSID, PAGE, read={"watermark": watermark}),
    ]
    assert (await meta.post(page_envelope((PAGE, items))))[0] == 200
    found = await events_of(svc, cid, "delivery.status")
    assert [(e.data["status"], e.data["message_id"]) for e in found] == [
        ("delivered", line.id),
        ("read", line.id),
    ]

    await customer_goes_quiet_and_agent_wraps_up(svc, clock, alice, cid)
    sent = await until_sent(GREETING, HANDOFF, QUEUED, JOINED, ANSWER, REMINDER, CLOSING)
    assert len(sent) == 7
    assert all(r.json["recipient"] == {"id": PSID} and r.access_token == PAGE_TOKEN for r in sent)
    assert {r.json["messaging_type"] for r in sent} == {"RESPONSE"}  # all inside 24 h
    assert [r.status for r in graph.requests if r.status != 200] == []
