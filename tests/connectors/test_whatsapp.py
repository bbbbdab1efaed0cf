"""The WhatsApp Cloud channel against a real service and the fake Graph API, on 127.0.0.1."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import structlog

from connectors.base import OutboundMessage
from connectors.meta import split_tail, split_text
from connectors.whatsapp import WhatsAppChannel
from controller.app import _deliver_channel
from controller.clock import ManualClock
from controller.errors import ChannelSendError, ConfigError, ConnectorError
from controller.keys import CHANNELS, CONNECTOR_CONTEXT
from controller.settings import ConnectorInstance
from controller.store.base import OutboxRow
from controller.testing import RULES_DIR, Service
from controller.testing_graph import (
    FakeGraph,
    WhatsAppSender,
    change,
    envelope,
    message,
    status,
    text_message,
)

SECRET = "test-app-secret"
VERIFY = "test-verify"
NUMBER_A = "106540352242922"
NUMBER_B = "106540352242999"
TOKENS = {NUMBER_A: "test-token-a", NUMBER_B: "test-token-b"}
USER = "351910000001"


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    fake = await FakeGraph(tokens=dict(TOKENS)).start()
    yield fake
    await fake.stop()


def whatsapp_settings(graph: FakeGraph, **overrides: Any) -> dict[str, Any]:
    return {
        "graph_base_url": graph.base_url,
        "graph_api_version": graph.version,
        "app_secret": SECRET,
        "verify_token": VERIFY,
        "endpoints": [
            {"phone_number_id": number, "access_token": token} for number, token in TOKENS.items()
        ],
        **overrides,
    }


Setup = tuple[Service, WhatsAppSender, FakeGraph]


async def start(
    make_service: Callable[..., Any], graph: FakeGraph, settings: dict[str, Any], **kw: Any
) -> Setup:
    # The fake is set up first so it is torn down last: the service stops before it.
    svc: Service = await make_service(
        connectors=[
            ConnectorInstance(name="whatsapp", type="whatsapp", settings=settings),
            ConnectorInstance(name="demo", type="demo_bot"),
        ],
        outbox_backoff_base=0.01,
        outbox_backoff_max=0.05,
        outbox_max_attempts=3,
        **kw,
    )
    assert svc.http is not None
    sender = WhatsAppSender(svc.http, svc.base_url + "/webhooks/whatsapp", SECRET)
    return svc, sender, graph


@pytest.fixture
async def wa(graph: FakeGraph, make_service: Callable[..., Any]) -> Setup:
    return await start(make_service, graph, whatsapp_settings(graph))


def channel_of(svc: Service) -> WhatsAppChannel:
    channel = svc.app[CHANNELS]["whatsapp"]
    assert isinstance(channel, WhatsAppChannel)
    return channel


async def wait_event(svc: Service, cid: str, kind: str, *, timeout: float = 10.0) -> list[Any]:
    """Wait until the conversation holds an event of ``kind``; return those events."""
    async with asyncio.timeout(timeout):
        while not (found := await events_of(svc, cid, kind)):
            await svc.settle()
            await asyncio.sleep(0.005)
    return found


async def conversation_of(svc: Service, identity: str, endpoint: str = NUMBER_A) -> str:
    cid = await svc.store.latest_conversation_id("whatsapp", endpoint, identity)
    assert cid is not None
    return cid


async def events_of(svc: Service, cid: str, kind: str | None = None) -> list[Any]:
    return [ev for ev, _ in await svc.store.events(cid) if kind is None or ev.type == kind]


async def test_verification_handshake(wa: tuple[Service, WhatsAppSender, FakeGraph]) -> None:
    _, sender, _ = wa
    assert await sender.verify("subscribe", VERIFY, "1158201444") == (200, "1158201444")
    code, body = await sender.verify("subscribe", "wrong", "1158201444")
    assert code == 403 and "verification_failed" in body
    code, _ = await sender.verify("unsubscribe", VERIFY, "1158201444")
    assert code == 403


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 401), ("sha256=" + "0" * 64, 403), ("sha1=abc", 403)],
)
async def test_bad_signature_stores_nothing(
    wa: tuple[Service, WhatsAppSender, FakeGraph], header: str | None, expected: int
) -> None:
    svc, sender, _ = wa
    payload = envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.S1")])])
    code, body = await sender.post(payload, signature_header=header)
    assert code == expected
    assert body["error"]["code"] in ("missing_signature", "bad_signature")
    assert await svc.store.count("events") == 0
    assert await svc.store.count("conversations") == 0


async def test_signature_is_over_the_raw_bytes(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    """Escapes that re-serialising would change still verify: the raw body is signed."""
    svc, sender, _ = wa
    raw = (
        b'{"object":"whatsapp_business_account","entry":[{"id":"1","changes":[{"field":'
        b'"messages","value":{"metadata":{"phone_number_id":"' + NUMBER_A.encode() + b'"},'
        b'"messages":[{"from":"' + USER.encode() + b'","id":"wamid.RAW","timestamp":"1",'
        b'"type":"text","text":{"body":"caf\\u00e9"}}]}}]}]}'
    )
    code, _ = await sender.post(raw)
    assert code == 200
    cid = await conversation_of(svc, USER)
    [ev] = await events_of(svc, cid, "customer.message")
    assert ev.data["text"] == "café"


async def test_text_message_opens_conversation_and_bot_answers(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    payload = envelope(
        [change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.IN1")], names={USER: "Ana"})]
    )
    code, body = await sender.post(payload)
    assert code == 200 and body == {"ok": True, "events": 1}
    cid = await conversation_of(svc, USER)
    conv = await svc.store.load_conversation(cid)
    assert conv is not None
    assert (conv.channel, conv.instance, conv.endpoint, conv.identity) == (
        "whatsapp",
        "whatsapp",
        NUMBER_A,
        USER,
    )
    [ev] = await events_of(svc, cid, "customer.message")
    assert ev.dedupe_key == "wamid.IN1"
    assert ev.data["profile_name"] == "Ana"
    assert ev.data["wa_id"] == USER and ev.data["phone_number_id"] == NUMBER_A
    # The sender is a customer with this channel identity, anonymous, named as WhatsApp says.
    customer = await svc.store.customer(conv.customer_id)
    assert customer is not None and not customer.known
    assert customer.profile["name"] == "Ana"
    assert [(i.kind, i.value) for i in customer.identities] == [("whatsapp", "+" + USER)]

    [sent] = await graph.wait_sent(1)
    assert sent.path == f"/{graph.version}/{NUMBER_A}/messages"
    assert sent.token == TOKENS[NUMBER_A]
    assert sent.json["messaging_product"] == "whatsapp"
    assert sent.json["to"] == USER
    assert sent.json["type"] == "text"
    assert sent.json["text"]["body"].startswith("Hello! I am the demo bot")


async def test_redelivered_message_is_one_event(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    payload = envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.DUP")])])
    assert (await sender.post(payload))[0] == 200
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 0
    cid = await conversation_of(svc, USER)
    await svc.settle()
    assert len(await events_of(svc, cid, "customer.message")) == 1
    assert len(graph.sent()) == 1


async def test_batch_is_processed_in_order(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, _ = wa
    other = "351910000002"
    payload = envelope(
        [
            change(
                NUMBER_A,
                messages=[
                    text_message(USER, "one", "wamid.B1"),
                    text_message(other, "uno", "wamid.B2"),
                    text_message(USER, "two", "wamid.B3"),
                ],
            )
        ],
        [
            change(NUMBER_A, messages=[text_message(USER, "three", "wamid.B4")]),
            change(NUMBER_A, messages=[text_message(other, "dos", "wamid.B5")]),
        ],
    )
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 5
    cid = await conversation_of(svc, USER)
    texts = [e.data["text"] for e in await events_of(svc, cid, "customer.message")]
    assert texts == ["one", "two", "three"]
    cid = await conversation_of(svc, other)
    texts = [e.data["text"] for e in await events_of(svc, cid, "customer.message")]
    assert texts == ["uno", "dos"]


async def test_statuses_become_delivery_status_events(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.I")])]))
    [sent] = await graph.wait_sent(1)
    out = "wamid.OUT1"
    statuses = [
        status(out, "sent", USER),
        status(out, "read", USER),  # order is not guaranteed by Meta
        status(out, "delivered", USER),
        status("wamid.OUT2", "failed", USER, error_code=131026),
    ]
    payload = envelope([change(NUMBER_A, statuses=statuses)])
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 5  # 4 statuses + delivery.failed for 131026
    assert (await sender.post(payload))[1]["events"] == 0  # (id, status) dedupe
    cid = await conversation_of(svc, USER)
    found = await events_of(svc, cid, "delivery.status")
    assert [(e.data["wamid"], e.data["status"]) for e in found] == [
        (out, "sent"),
        (out, "read"),
        (out, "delivered"),
        ("wamid.OUT2", "failed"),
    ]
    assert found[0].dedupe_key == f"{out}:sent"
    assert found[3].data["error_code"] == 131026
    assert sent.status == 200
    [failed] = await events_of(svc, cid, "delivery.failed")
    assert failed.data["reason"] == "invalid_recipient"
    assert failed.data["wamid"] == "wamid.OUT2"


async def test_status_without_open_conversation_is_ignored(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, _ = wa
    code, body = await sender.post(
        envelope([change(NUMBER_A, statuses=[status("wamid.X", "read", "999")])])
    )
    assert code == 200 and body["events"] == 0
    assert await svc.store.count("conversations") == 0


async def test_rate_limited_send_is_retried_and_delivered_once(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    graph.fail(status=429, code=130429, times=1)
    graph.fail(status=500, code=131000, times=1)
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.R")])]))
    [sent] = await graph.wait_sent(1)
    await svc.settle()
    assert [r.status for r in graph.requests if r.is_send] == [429, 500, 200]
    assert len(graph.sent()) == 1 and sent.json["to"] == USER
    assert await svc.store.outbox_rows("dead") == []


async def test_window_closed_is_a_dead_letter_and_delivery_failed(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    graph.fail(status=400, code=131047, times=None, to=USER, message="Re-engagement message")
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.W")])]))
    cid = await conversation_of(svc, USER)
    await svc.until(cid, lambda c: True)
    [failed] = await events_of(svc, cid, "delivery.failed")
    assert failed.data["reason"] == "window_closed"
    assert failed.data["instance"] == "whatsapp"
    assert failed.dedupe_key.endswith(":failed")
    [dead] = await svc.store.outbox_rows("dead")
    assert "window_closed" in dead["last_error"]
    assert len([r for r in graph.requests if r.status == 400]) == 1  # never retried
    assert graph.sent() == []


async def test_invalid_recipient_reason(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    graph.fail(status=400, code=131026, times=None)
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.V")])]))
    cid = await conversation_of(svc, USER)
    await svc.until(cid, lambda c: True)
    [failed] = await events_of(svc, cid, "delivery.failed")
    assert failed.data["reason"] == "invalid_recipient"


async def test_two_numbers_are_two_conversations(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, graph = wa
    payload = envelope(
        [change(NUMBER_A, messages=[text_message(USER, "hours", "wamid.TA")])],
        [change(NUMBER_B, messages=[text_message(USER, "prices", "wamid.TB")])],
    )
    assert (await sender.post(payload))[0] == 200
    a, b = await conversation_of(svc, USER, NUMBER_A), await conversation_of(svc, USER, NUMBER_B)
    assert a != b
    await graph.wait_sent(
        2, lambda r: "open Monday" in r.json["text"]["body"] or "plans" in r.json["text"]["body"]
    )
    [via_a] = graph.sent(lambda r: "open Monday" in r.json["text"]["body"])
    [via_b] = graph.sent(lambda r: "plans start" in r.json["text"]["body"])
    assert (via_a.phone_number_id, via_a.token) == (NUMBER_A, TOKENS[NUMBER_A])
    assert (via_b.phone_number_id, via_b.token) == (NUMBER_B, TOKENS[NUMBER_B])
    assert [r.status for r in graph.requests if r.status != 200] == []


async def test_unknown_phone_number_is_ignored(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    svc, sender, _ = wa
    payload = envelope([change("999", messages=[text_message(USER, "hi", "wamid.U")])])
    assert await sender.post(payload) == (200, {"ok": True, "events": 0})
    assert await svc.store.count("events") == 0


async def test_message_types(wa: tuple[Service, WhatsAppSender, FakeGraph]) -> None:
    svc, sender, _ = wa
    image = {"id": "7301", "mime_type": "image/jpeg", "sha256": "x", "caption": "label"}
    items = [
        message(USER, "image", "wamid.T1", {"image": image}),
        message(
            USER,
            "audio",
            "wamid.T2",
            {"audio": {"id": "7302", "mime_type": "audio/ogg; codecs=opus", "voice": True}},
        ),
        message(
            USER,
            "document",
            "wamid.T3",
            {
                "document": {
                    "id": "7303",
                    "mime_type": "application/x-msdownload",
                    "filename": "a.exe",
                }
            },
        ),
        message(
            USER,
            "interactive",
            "wamid.T4",
            {
                "context": {"from": "15550001111", "id": "wamid.OUT1"},
                "interactive": {
                    "type": "button_reply",
                    "button_reply": {"id": "yes", "title": "Yes"},
                },
            },
        ),
        message(
            USER,
            "interactive",
            "wamid.T5",
            {
                "interactive": {
                    "type": "list_reply",
                    "list_reply": {"id": "track", "title": "Track", "description": "Where"},
                }
            },
        ),
        message(
            USER,
            "location",
            "wamid.T6",
            {"location": {"latitude": 38.72, "longitude": -9.14, "name": "Shop"}},
        ),
        message(
            USER,
            "contacts",
            "wamid.T7",
            {"contacts": [{"name": {"formatted_name": "Bo"}, "phones": [{"phone": "+1"}]}]},
        ),
        message(
            USER, "reaction", "wamid.T8", {"reaction": {"message_id": "wamid.OUT1", "emoji": "👍"}}
        ),
        message(USER, "unsupported", "wamid.T9", {"errors": [{"code": 131051, "title": "x"}]}),
        message(USER, "ephemeral_hologram", "wamid.T10", {"ephemeral_hologram": {"z": 1}}),
    ]
    code, body = await sender.post(envelope([change(NUMBER_A, messages=items)]))
    assert code == 200 and body["events"] == len(items)
    cid = await conversation_of(svc, USER)
    evs = {e.dedupe_key: e.data for e in await events_of(svc, cid, "customer.message")}
    assert evs["wamid.T1"]["media_id"] == "7301" and evs["wamid.T1"]["caption"] == "label"
    assert evs["wamid.T1"]["mime_type"] == "image/jpeg" and evs["wamid.T1"]["media_allowed"]
    assert evs["wamid.T2"]["voice"] is True
    assert evs["wamid.T3"]["media_allowed"] is False
    assert evs["wamid.T4"]["reply_id"] == "yes" and evs["wamid.T4"]["text"] == "Yes"
    assert evs["wamid.T4"]["reply_to"] == "wamid.OUT1"
    assert evs["wamid.T5"]["interactive_type"] == "list_reply"
    assert evs["wamid.T5"]["reply_description"] == "Where"
    assert evs["wamid.T6"]["latitude"] == 38.72 and evs["wamid.T6"]["location_name"] == "Shop"
    assert evs["wamid.T7"]["contacts"][0]["phones"][0]["phone"] == "+1"
    assert evs["wamid.T8"]["emoji"] == "👍" and evs["wamid.T8"]["reaction_to"] == "wamid.OUT1"
    assert evs["wamid.T9"]["kind"] == "unsupported" and evs["wamid.T9"]["error_code"] == 131051
    assert evs["wamid.T10"]["kind"] == "ephemeral_hologram" and "text" not in evs["wamid.T10"]
    await svc.settle()  # every event is decided without an error


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"object": "whatsapp_business_account"}',
        b'{"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages",'
        b' "value": {"messages": []}}]}]}',
        b'{"object": "whatsapp_business_account", "entry": [{"changes": [{"field": "messages",'
        b' "value": {"metadata": {"phone_number_id": "1"}, "messages": [{"id": "x"}]}}]}]}',
        b"[]",
    ],
)
async def test_malformed_bodies_are_400(
    wa: tuple[Service, WhatsAppSender, FakeGraph], payload: bytes
) -> None:
    svc, sender, _ = wa
    code, body = await sender.post(payload)
    assert code == 400, body
    assert body["error"]["code"] in ("malformed_json", "invalid_body")
    assert await svc.store.count("events") == 0


async def test_huge_body_is_413(wa: tuple[Service, WhatsAppSender, FakeGraph]) -> None:
    svc, sender, _ = wa
    big = text_message(USER, "x" * (2 * 1024 * 1024), "wamid.BIG")
    code, body = await sender.post(envelope([change(NUMBER_A, messages=[big])]))
    assert code == 413 and body["error"]["code"] == "too_large"
    assert await svc.store.count("events") == 0


async def test_buttons_become_reply_buttons(
    wa: tuple[Service, WhatsAppSender, FakeGraph],
) -> None:
    """Messages that carry buttons go out as interactive reply buttons (or numbered text)."""
    svc, _, graph = wa
    channel = svc.app[CHANNELS]["whatsapp"]
    assert isinstance(channel, WhatsAppChannel)

    def out(buttons: list[Any]) -> OutboundMessage:
        msg = {"id": "m1", "text": "Talk to a person?", "buttons": buttons}
        return OutboundMessage("cv_1", NUMBER_B, USER, msg, "k1")

    wamid = await channel.send(out([{"id": "yes", "title": "Yes"}, "No"]))
    assert wamid is not None and wamid.startswith("wamid.")
    [sent] = graph.sent()
    assert sent.json["type"] == "interactive"
    assert sent.json["interactive"]["action"]["buttons"][0]["reply"] == {
        "id": "yes",
        "title": "Yes",
    }
    assert sent.token == TOKENS[NUMBER_B]
    await channel.send(out([f"option {i}" for i in range(11)]))  # more than a list holds
    assert graph.sent()[-1].json["text"]["body"].endswith("10. option 9\n11. option 10")
    await channel.send(out(["a title longer than 24 chars", "b"]))
    assert graph.sent()[-1].json["text"]["body"].endswith("1. a title longer than 24 chars\n2. b")
    await channel.send(out(["Yes", "Yes"]))  # two buttons with the same id ("b0", "b1" differ)
    assert graph.sent()[-1].json["type"] == "interactive"
    await channel.send(out([{"id": "same", "title": "A"}, {"id": "same", "title": "B"}]))
    assert graph.sent()[-1].json["text"]["body"].endswith("1. A\n2. B")


async def test_media_download(wa: tuple[Service, WhatsAppSender, FakeGraph]) -> None:
    svc, _, graph = wa
    graph.media["7301"] = (b"\x89PNG...", "image/png")
    graph.media["7302"] = (b"MZ", "application/x-msdownload")
    channel = svc.app[CHANNELS]["whatsapp"]
    assert isinstance(channel, WhatsAppChannel)
    assert await channel.download_media("7301", NUMBER_A) == (b"\x89PNG...", "image/png")
    with pytest.raises(ConnectorError, match="not allowed"):
        await channel.download_media("7302", NUMBER_A)
    assert all(r.token == TOKENS[NUMBER_A] for r in graph.requests)


@pytest.mark.parametrize(
    "override",
    [
        {"app_secret": "change-me"},
        {"verify_token": ""},
        {"endpoints": [{"phone_number_id": NUMBER_A, "access_token": "secret"}]},
        {"endpoints": []},
        {"unknown_knob": 1},
    ],
)
async def test_placeholder_secrets_and_bad_settings_refuse_to_start(
    make_service: Callable[..., Any], graph: FakeGraph, override: dict[str, Any]
) -> None:
    inst = ConnectorInstance(
        name="whatsapp", type="whatsapp", settings=whatsapp_settings(graph, **override)
    )
    with pytest.raises(ConfigError, match="invalid settings"):
        await make_service(connectors=[inst], profile="prod")


# customer-service window, templates ---------------------------------------------------------
async def test_outside_24h_free_form_fails_before_graph(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc, sender, _ = await start(make_service, graph, whatsapp_settings(graph), clock=clock)
    await sender.post(
        envelope([change(NUMBER_A, messages=[text_message(USER, "agent", "wamid.H")])])
    )
    cid = await conversation_of(svc, USER)
    alice = await svc.agent("alice")
    await alice.available()
    await alice.take(cid)
    await graph.wait_sent(1, lambda r: "alice" in r.json["text"]["body"])
    sends = len(graph.requests)

    clock.advance(timedelta(hours=25).total_seconds())
    ack = await alice.say(cid, "Following up on your refund request.")
    assert ack["type"] == "ack", ack
    [failed] = await wait_event(svc, cid, "delivery.failed")
    assert failed.data["reason"] == "window_closed"
    [dead] = await svc.store.outbox_rows("dead")
    assert "window_closed" in dead["last_error"]
    assert len(graph.requests) == sends  # refused before any Graph call
    assert not graph.sent(lambda r: "refund" in str(r.json.get("text")))


async def test_window_rules_of_send(wa: Setup) -> None:
    svc, _, graph = wa
    channel = channel_of(svc)
    now = channel.context.clock.now()
    template = {"name": "order_update", "language": "en_US", "parameters": ["A-1042", 3]}

    def out(age: timedelta | None, **extra: Any) -> OutboundMessage:
        msg = {"id": "m1", "from": "bot", "text": "hello", **extra}
        last = now - age if age is not None else None
        return OutboundMessage("cv_1", NUMBER_B, USER, msg, "k1", customer_last_at=last)

    assert await channel.send(out(timedelta(hours=23))) is not None
    assert await channel.send(out(None)) is not None  # unknown: Graph decides
    with pytest.raises(ChannelSendError, match=r"^window_closed") as exc:
        await channel.send(out(timedelta(hours=25)))
    assert not exc.value.retryable
    assert await channel.send(out(timedelta(days=3), template=template)) is not None
    with pytest.raises(ChannelSendError, match="invalid template") as exc:
        await channel.send(out(timedelta(days=3), template={"name": "x"}))
    assert not exc.value.retryable
    sent = graph.sent()
    assert [r.json["type"] for r in sent] == ["text", "text", "template"]
    assert sent[2].json["template"] == {
        "name": "order_update",
        "language": {"code": "en_US"},
        "components": [
            {
                "type": "body",
                "parameters": [{"type": "text", "text": "A-1042"}, {"type": "text", "text": "3"}],
            }
        ],
    }
    assert "text" not in sent[2].json


async def test_template_through_the_outbox_outside_the_window(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    """An outbox row whose message carries ``template`` goes out as one, even after 24 h."""
    svc, _, _ = await start(make_service, graph, whatsapp_settings(graph), clock=clock)
    last = clock.now()
    clock.advance(timedelta(days=2).total_seconds())
    template = {"name": "order_update", "language": "pt_PT", "parameters": ["A-1042"]}
    payload = {
        "endpoint": NUMBER_A,
        "identity": USER,
        "customer_last_at": last.isoformat(),
        "message": {"id": "m9", "from": "controller", "text": "", "template": template},
    }
    row = OutboxRow(1, "cv_x", "ev_x", 0, "channel:whatsapp", payload, 0)
    await _deliver_channel(svc.app, row)
    [sent] = graph.sent()
    assert sent.json["type"] == "template"
    assert sent.json["template"]["language"] == {"code": "pt_PT"}
    assert sent.token == TOKENS[NUMBER_A]
    free = {**payload, "message": {"id": "m10", "from": "controller", "text": "hi"}}
    with pytest.raises(ChannelSendError, match=r"^window_closed"):
        await _deliver_channel(
            svc.app, OutboxRow(2, "cv_x", "ev_x", 1, "channel:whatsapp", free, 0)
        )
    assert len(graph.sent()) == 1


async def test_failed_status_131047_is_delivery_failed(wa: Setup) -> None:
    svc, sender, graph = wa
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.Q")])]))
    await graph.wait_sent(1)
    failed_status = status("wamid.OUT9", "failed", USER, error_code=131047)
    payload = envelope([change(NUMBER_A, statuses=[failed_status])])
    assert await sender.post(payload) == (200, {"ok": True, "events": 2})
    assert (await sender.post(payload))[1]["events"] == 0
    cid = await conversation_of(svc, USER)
    [st] = await events_of(svc, cid, "delivery.status")
    assert st.data["status"] == "failed" and st.data["error_code"] == 131047
    [failed] = await events_of(svc, cid, "delivery.failed")
    assert failed.data["reason"] == "window_closed"
    assert failed.data["wamid"] == "wamid.OUT9" and failed.data["error_code"] == 131047


# read receipts ---------------------------------------------------------------------------------
async def test_incoming_messages_are_marked_read(wa: Setup) -> None:
    svc, sender, graph = wa
    batch = [text_message(USER, "one", "wamid.R1"), text_message(USER, "two", "wamid.R2")]
    await sender.post(envelope([change(NUMBER_B, messages=batch)]))
    await channel_of(svc).idle()
    [read] = graph.reads()  # the latest message of the delivery marks the earlier ones too
    assert read.json == {
        "messaging_product": "whatsapp",
        "status": "read",
        "message_id": "wamid.R2",
    }
    assert read.phone_number_id is None and read.path == f"/{graph.version}/{NUMBER_B}/messages"
    assert read.token == TOKENS[NUMBER_B]
    assert channel_of(svc).stats["read_sent"] == 1


async def test_read_receipt_failure_is_only_logged(wa: Setup) -> None:
    svc, sender, graph = wa
    graph.fail_reads = 2
    with structlog.testing.capture_logs() as logs:
        await sender.post(
            envelope([change(NUMBER_A, messages=[text_message(USER, "x", "wamid.F")])])
        )
        await channel_of(svc).idle()
    assert [e for e in logs if e["event"] == "whatsapp_mark_read_failed"]
    assert channel_of(svc).stats["read_failed"] == 1
    assert graph.reads() == []
    await graph.wait_sent(1)  # the conversation goes on


async def test_mark_read_can_be_turned_off(
    graph: FakeGraph, make_service: Callable[..., Any]
) -> None:
    off = whatsapp_settings(graph, mark_read=False)
    svc, sender, _ = await start(make_service, graph, off)
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "x", "wamid.N")])]))
    await graph.wait_sent(1)
    await channel_of(svc).idle()
    assert graph.reads() == []


async def test_typing_indicator_rides_on_the_read_receipt(
    graph: FakeGraph, make_service: Callable[..., Any]
) -> None:
    svc, sender, _ = await start(
        make_service, graph, whatsapp_settings(graph, typing_indicator=True)
    )
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "x", "wamid.T")])]))
    await channel_of(svc).idle()
    [read] = graph.reads()
    assert read.json["message_id"] == "wamid.T"
    assert read.json["typing_indicator"] == {"type": "text"}


# media -----------------------------------------------------------------------------------------
async def test_inbound_media_is_downloaded_after_the_commit(wa: Setup) -> None:
    svc, sender, graph = wa
    content = b"\x89PNG\r\n" + bytes(range(256)) * 10
    graph.media["7301"] = (content, "image/png")
    image = {"image": {"id": "7301", "mime_type": "image/png", "sha256": "x"}}
    payload = envelope([change(NUMBER_A, messages=[message(USER, "image", "wamid.M1", image)])])
    assert (await sender.post(payload))[0] == 200
    channel = channel_of(svc)
    await channel.idle()
    path = channel.media_path("7301")
    digest = hashlib.sha256(content).hexdigest()
    assert path == svc.settings.data_dir / "media" / digest
    assert path.read_bytes() == content
    assert channel.stats["media_downloaded"] == 1
    # A redelivery does not download again.
    await sender.post(payload)
    await channel.idle()
    assert len([r for r in graph.requests if r.path == "/media-bytes/7301"]) == 1


async def test_media_download_failures_are_logged_and_counted(wa: Setup) -> None:
    svc, sender, graph = wa
    graph.media["7302"] = (b"MZ", "application/x-msdownload")
    messages = [
        message(USER, "image", "wamid.G1", {"image": {"id": "404404", "mime_type": "image/png"}}),
        message(
            USER,
            "document",
            "wamid.G2",
            {"document": {"id": "7302", "mime_type": "application/pdf"}},
        ),
        message(
            USER, "video", "wamid.G3", {"video": {"id": "7304", "mime_type": "application/zip"}}
        ),
    ]
    channel = channel_of(svc)
    with structlog.testing.capture_logs() as logs:
        code, body = await sender.post(envelope([change(NUMBER_A, messages=messages)]))
        assert code == 200 and body["events"] == 3
        await channel.idle()
    failed = [e for e in logs if e["event"] == "whatsapp_media_download_failed"]
    assert {e["media_id"] for e in failed} == {"404404", "7302"}
    assert channel.stats["media_failed"] == 1  # the 404
    assert channel.stats["media_refused"] == 2  # the Graph type and the announced type
    assert channel.media_path("404404") is None and channel.media_path("7302") is None
    cid = await conversation_of(svc, USER)
    assert len(await events_of(svc, cid, "customer.message")) == 3


async def test_rules_reengage_a_customer_outside_the_window_with_a_template(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock, tmp_path: Path
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "default.yaml").write_text((RULES_DIR / "default.yaml").read_text())
    (rules / "reengage.yaml").write_text(
        """
- name: reengage-with-a-template
  description: a message could not go out because the 24 h window closed
  when:
    event: delivery.failed
    event.reason: window_closed
    conversation.channel: whatsapp
  then:
    - send:
        text: "We have an update on your request. Reply to continue."
        template:
          name: request_update
          parameters: ["{{ conversation.attributes.ticket | none }}"]
        buttons: [{ title: Continue, payload: continue }]
"""
    )
    svc, sender, _ = await start(
        make_service, graph, whatsapp_settings(graph), clock=clock, rules_dir=rules
    )
    await sender.post(
        envelope([change(NUMBER_A, messages=[text_message(USER, "agent", "wamid.T1")])])
    )
    cid = await conversation_of(svc, USER)
    alice = await svc.agent("alice")
    await alice.available()
    await alice.take(cid)
    await graph.wait_sent(1, lambda r: "alice" in r.json["text"]["body"])

    clock.advance(timedelta(hours=25).total_seconds())
    await alice.say(cid, "Your refund was approved.")
    [sent] = await graph.wait_sent(1, lambda r: r.json["type"] == "template")
    assert sent.json["template"] == {
        "name": "request_update",
        "language": {"code": "en"},
        "components": [{"type": "body", "parameters": [{"type": "text", "text": "none"}]}],
    }
    assert sent.json["to"] == USER
    transcript = await svc.store.messages(cid, include_agent_only=False)
    line = next(m for m in transcript if m.text.startswith("We have an update"))
    assert line.content is not None and line.content["template"]["name"] == "request_update"
    assert len(await events_of(svc, cid, "delivery.failed")) == 1  # no loop


# lists, media, long texts --------------------------------------------------------------------
def outbound(text: str = "", key: str = "k1", **extra: Any) -> OutboundMessage:
    msg = {"id": "m1", "from": "bot", "text": text, **extra}
    return OutboundMessage("cv_1", NUMBER_A, USER, msg, key)


async def test_four_to_ten_buttons_become_a_list(wa: Setup) -> None:
    svc, _, graph = wa
    channel = channel_of(svc)
    choices = [{"id": f"opt{i}", "title": f"Option number {i}"} for i in range(1, 5)]
    wamid = await channel.send(outbound("Pick one", buttons=choices))
    [sent] = graph.sent()
    assert sent.provider_id == wamid
    assert sent.json["type"] == "interactive"
    assert sent.json["interactive"] == {
        "type": "list",
        "body": {"text": "Pick one"},
        "action": {
            "button": "Choose",
            "sections": [{"rows": [{"id": c["id"], "title": c["title"]} for c in choices]}],
        },
    }
    # Three buttons whose titles fit a list row (24) but not a reply button (20): a list too.
    await channel.send(outbound("Which?", buttons=["A title of 22 letters!", "B", "C"]))
    assert graph.sent()[-1].json["interactive"]["type"] == "list"
    ten = [f"Choice {i}" for i in range(10)]
    await channel.send(outbound("Ten", buttons=ten))
    rows = graph.sent()[-1].json["interactive"]["action"]["sections"][0]["rows"]
    assert [r["title"] for r in rows] == ten and [r["id"] for r in rows][:2] == ["b0", "b1"]
    assert all(r.status == 200 for r in graph.requests)


async def test_list_button_label_is_a_setting(
    graph: FakeGraph, make_service: Callable[..., Any]
) -> None:
    settings = whatsapp_settings(graph, list_button_label="Options")
    svc, _, _ = await start(make_service, graph, settings)
    await channel_of(svc).send(outbound("Pick", buttons=["a", "b", "c", "d"]))
    assert graph.sent()[-1].json["interactive"]["action"]["button"] == "Options"
    with pytest.raises(ConfigError, match="invalid settings"):
        await make_service(
            connectors=[
                ConnectorInstance(
                    name="whatsapp",
                    type="whatsapp",
                    settings=whatsapp_settings(graph, list_button_label="x" * 21),
                )
            ]
        )


async def test_image_goes_with_its_caption(wa: Setup) -> None:
    svc, _, graph = wa
    channel = channel_of(svc)
    assert {"images", "media"} <= channel.capabilities
    url = "https://example.com/label.png"
    wamid = await channel.send(outbound("Your shipping label", image=url))
    [sent] = graph.sent()
    assert sent.provider_id == wamid
    assert sent.json["type"] == "image"
    assert sent.json["image"] == {"link": url, "caption": "Your shipping label"}
    assert sent.json["biz_opaque_callback_data"] == "k1"
    # Without text: no caption.
    await channel.send(outbound("", image=url))
    assert graph.sent()[-1].json["image"] == {"link": url}


async def test_a_caption_over_1024_characters_goes_first_as_text(wa: Setup) -> None:
    svc, _, graph = wa
    long = "A long explanation. " * 60  # 1200 characters
    url = "https://example.com/label.png"
    wamid = await channel_of(svc).send(outbound(long, key="ev_1:0", image=url))
    first, second = graph.sent()
    assert first.json["type"] == "text" and first.json["text"]["body"] == long
    assert second.json["type"] == "image" and second.json["image"] == {"link": url}
    assert wamid == second.provider_id  # the last part's id
    assert [r.json["biz_opaque_callback_data"] for r in (first, second)] == ["ev_1:0:1", "ev_1:0:2"]


@pytest.mark.parametrize(
    ("media", "expected"),
    [
        (
            {"type": "document", "url": "https://e.com/i.pdf", "filename": "invoice.pdf"},
            [
                {
                    "type": "document",
                    "document": {
                        "link": "https://e.com/i.pdf",
                        "caption": "Here",
                        "filename": "invoice.pdf",
                    },
                }
            ],
        ),
        (
            {"type": "video", "url": "https://e.com/v.mp4", "caption": "How to"},
            [
                {"type": "text", "text": {"preview_url": False, "body": "Here"}},
                {"type": "video", "video": {"link": "https://e.com/v.mp4", "caption": "How to"}},
            ],
        ),
        (
            {"type": "audio", "url": "https://e.com/a.ogg"},
            [
                {"type": "text", "text": {"preview_url": False, "body": "Here"}},
                {"type": "audio", "audio": {"link": "https://e.com/a.ogg"}},
            ],
        ),
        (
            {"type": "sticker", "url": "https://e.com/s.webp", "filename": "s.webp"},
            [
                {"type": "text", "text": {"preview_url": False, "body": "Here"}},
                {"type": "sticker", "sticker": {"link": "https://e.com/s.webp"}},
            ],
        ),
    ],
)
async def test_media_types(wa: Setup, media: dict[str, Any], expected: list[Any]) -> None:
    """Captions go with images, videos and documents; audio and stickers take none (the text
    goes first); a filename only with documents; an explicit caption leaves the text apart."""
    svc, _, graph = wa
    await channel_of(svc).send(outbound("Here", media=media))
    sent = graph.sent()
    assert [{k: r.json[k] for k in ("type", r.json["type"])} for r in sent] == expected
    assert all(r.status == 200 for r in graph.requests)


async def test_media_wins_over_image_and_bad_media_is_final(wa: Setup) -> None:
    svc, _, graph = wa
    channel = channel_of(svc)
    media = {"type": "document", "url": "https://e.com/a.pdf"}
    await channel.send(outbound("Doc", media=media, image="https://e.com/x.png"))
    assert graph.sent()[-1].json["type"] == "document"
    for bad in ({"type": "pdf", "url": "https://e.com/a.pdf"}, {"type": "image", "url": "x"}):
        with pytest.raises(ChannelSendError, match="invalid media") as exc:
            await channel.send(outbound("Doc", media=bad))
        assert not exc.value.retryable
    assert len(graph.requests) == 1


async def test_buttons_with_an_image_show_it_as_header(wa: Setup) -> None:
    svc, _, graph = wa
    channel = channel_of(svc)
    url = "https://example.com/shoe.jpg"
    await channel.send(outbound("This one?", image=url, buttons=["Yes", "No"]))
    [sent] = graph.sent()
    assert sent.json["interactive"]["type"] == "button"
    assert sent.json["interactive"]["header"] == {"type": "image", "image": {"link": url}}
    assert sent.json["interactive"]["body"] == {"text": "This one?"}
    # A list cannot show media: the image goes first, then the list.
    await channel.send(outbound("Which size?", image=url, buttons=["38", "39", "40", "41"]))
    image, listing = graph.sent()[1:]
    assert image.json["image"] == {"link": url}
    assert listing.json["interactive"]["type"] == "list"
    assert listing.json["interactive"]["body"] == {"text": "Which size?"}
    # Buttons that fit neither: numbered lines, as the image's caption.
    await channel.send(outbound("Size?", image=url, buttons=[str(n) for n in range(30, 42)]))
    last = graph.sent()[-1]
    assert last.json["type"] == "image"
    assert last.json["image"]["caption"].startswith("Size?\n1. 30\n2. 31")
    assert all(r.status == 200 for r in graph.requests)


async def test_long_text_is_sent_in_parts(wa: Setup) -> None:
    svc, _, graph = wa
    paragraphs = [(f"Paragraph {i}. " + "Some words here. " * 100).strip() for i in range(6)]
    text = "\n\n".join(paragraphs)  # about 10,300 characters
    assert len(text) > 2 * 4096
    wamid = await channel_of(svc).send(outbound(text, key="ev_9:2"))
    sent = graph.sent()
    bodies = [r.json["text"]["body"] for r in sent]
    assert len(bodies) == 3 and all(len(b) <= 4096 for b in bodies)
    assert "\n\n".join(bodies) == text  # cut between paragraphs, nothing lost, in order
    assert [r.json["biz_opaque_callback_data"] for r in sent] == [
        "ev_9:2:1",
        "ev_9:2:2",
        "ev_9:2:3",
    ]
    assert wamid == sent[-1].provider_id


async def test_long_text_before_buttons_keeps_the_end_as_their_body(wa: Setup) -> None:
    svc, _, graph = wa
    text = "First sentence is here. " * 60 + "Shall we go on?"  # 1455 characters
    await channel_of(svc).send(outbound(text, buttons=["Yes", "No"]))
    lead, buttons = graph.sent()
    body = buttons.json["interactive"]["body"]["text"]
    assert len(body) <= 1024 and body.endswith("Shall we go on?")
    assert body.startswith("First sentence")  # cut at a sentence end
    assert lead.json["text"]["body"] + " " + body == text


async def test_a_failed_part_is_retried_without_sending_the_earlier_parts_again(
    wa: Setup,
) -> None:
    svc, _, graph = wa
    text = "\n\n".join(["x" * 3000, "y" * 3000])
    graph.fail(status=500, code=131000, times=1, after=1)  # the second part, once
    payload = {"endpoint": NUMBER_A, "identity": USER, "message": {"id": "m5", "text": text}}
    row = OutboxRow(7, "cv_x", "ev_long", 0, "channel:whatsapp", payload, 0)
    with pytest.raises(ChannelSendError, match="provider_error") as exc:
        await _deliver_channel(svc.app, row)
    assert exc.value.retryable
    await _deliver_channel(svc.app, row)  # what the outbox does next
    assert [r.status for r in graph.requests if r.is_send] == [200, 500, 200]
    assert [r.json["text"]["body"][0] for r in graph.sent()] == ["x", "y"]
    assert [r.json["biz_opaque_callback_data"] for r in graph.sent()] == [
        "ev_long:0:1",
        "ev_long:0:2",
    ]


async def test_an_image_through_the_outbox_is_an_image(wa: Setup) -> None:
    """WhatsApp declares ``images``: the controller hands the image on, not its address."""
    svc, _, graph = wa
    url = "https://example.com/map.png"
    message = {"id": "m6", "from": "bot", "text": "Our shop", "image": url}
    payload = {"endpoint": NUMBER_A, "identity": USER, "message": message}
    await _deliver_channel(
        svc.app, OutboxRow(8, "cv_x", "ev_img", 0, "channel:whatsapp", payload, 0)
    )
    [sent] = graph.sent()
    assert sent.json["image"] == {"link": url, "caption": "Our shop"}


# statuses name our messages ------------------------------------------------------------------
def link_statuses(svc: Service) -> None:
    """The service's ``provider_message`` lookup for connectors (added here when the service
    does not give it yet)."""
    svc.app[CONNECTOR_CONTEXT].service.setdefault(
        "provider_message", lambda instance, pid: svc.store.provider_message(instance, pid)
    )


async def test_statuses_carry_our_message_id(wa: Setup) -> None:
    svc, sender, graph = wa
    link_statuses(svc)
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.S")])]))
    [sent] = await graph.wait_sent(1)
    await svc.settle()
    cid = await conversation_of(svc, USER)
    transcript = await svc.store.messages(cid, include_agent_only=False)
    [reply] = [m for m in transcript if m.sender_role == "bot"]
    assert sent.provider_id is not None
    recorded = await svc.store.provider_message("whatsapp", sent.provider_id)
    assert recorded is not None
    assert (recorded.conversation_id, recorded.message_id) == (cid, reply.id)
    [row] = [
        r for r in await svc.store.outbox_rows("done") if r["destination"] == "channel:whatsapp"
    ]
    key = f"{row['event_id']}:{row['n']}"
    assert sent.json["biz_opaque_callback_data"] == key

    statuses = [
        status(sent.provider_id, "sent", USER, callback_data=key),
        status(sent.provider_id, "delivered", USER, callback_data=key),
        status(sent.provider_id, "failed", USER, error_code=131026),
        status("wamid.UNKNOWN", "read", USER),
    ]
    code, body = await sender.post(envelope([change(NUMBER_A, statuses=statuses)]))
    assert code == 200 and body["events"] == 5
    found = await events_of(svc, cid, "delivery.status")
    assert [(e.data["status"], e.data.get("message_id")) for e in found] == [
        ("sent", reply.id),
        ("delivered", reply.id),
        ("failed", reply.id),
        ("read", None),
    ]
    assert found[0].data["callback_data"] == key
    [failed] = await events_of(svc, cid, "delivery.failed")
    assert failed.data["message_id"] == reply.id and failed.data["reason"] == "invalid_recipient"


async def test_statuses_without_the_lookup_have_no_message_id(wa: Setup) -> None:
    svc, sender, graph = wa
    svc.app[CONNECTOR_CONTEXT].service.pop("provider_message", None)
    await sender.post(envelope([change(NUMBER_A, messages=[text_message(USER, "hi", "wamid.L")])]))
    [sent] = await graph.wait_sent(1)
    assert sent.provider_id is not None
    payload = envelope([change(NUMBER_A, statuses=[status(sent.provider_id, "read", USER)])])
    assert (await sender.post(payload))[0] == 200
    [st] = await events_of(svc, await conversation_of(svc, USER), "delivery.status")
    assert "message_id" not in st.data and st.data["wamid"] == sent.provider_id


@pytest.mark.parametrize(
    ("text", "limit", "parts"),
    [
        ("short", 10, ["short"]),
        ("", 10, [""]),
        ("x" * 25, 10, ["x" * 10, "x" * 10, "x" * 5]),  # no break at all: cut hard
        ("aaaa bbbb cccc dddd", 10, ["aaaa bbbb", "cccc dddd"]),
        ('One. Two! "Three?" Four.', 12, ["One. Two!", '"Three?"', "Four."]),
        ("para one\n\npara two is long", 20, ["para one", "para two is long"]),
        ("ab\ncdefghi jklm", 10, ["ab\ncdefghi", "jklm"]),  # a part is at least a third full
    ],
)
def test_split_text(text: str, limit: int, parts: list[str]) -> None:
    assert split_text(text, limit) == parts
    assert all(len(p) <= limit for p in parts)


def test_split_tail() -> None:
    assert split_tail("fits", 10) == ("", "fits")
    assert split_tail("First one. Second one.", 14) == ("First one.", "Second one.")
    assert split_tail("x" * 15, 10) == ("x" * 5, "x" * 10)
