"""The WhatsApp Cloud channel against a real service and the fake Graph API, on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from connectors.base import OutboundMessage
from connectors.whatsapp import WhatsAppChannel
from controller.errors import ConfigError, ConnectorError
from controller.keys import CHANNELS
from controller.settings import ConnectorInstance
from controller.testing import Service
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


@pytest.fixture
async def wa(
    graph: FakeGraph, make_service: Callable[..., Any]
) -> tuple[Service, WhatsAppSender, FakeGraph]:
    # The fake is set up first so it is torn down last: the service stops before it.
    svc: Service = await make_service(
        connectors=[
            ConnectorInstance(name="whatsapp", type="whatsapp", settings=whatsapp_settings(graph)),
            ConnectorInstance(name="demo", type="demo_bot"),
        ],
        outbox_backoff_base=0.01,
        outbox_backoff_max=0.05,
        outbox_max_attempts=3,
    )
    assert svc.http is not None
    sender = WhatsAppSender(svc.http, svc.base_url + "/webhooks/whatsapp", SECRET)
    return svc, sender, graph


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
    assert code == 200 and body["events"] == 4
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
    assert [r.status for r in graph.requests] == [429, 500, 200]
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
    await channel.send(out(["a", "b", "c", "d"]))
    assert graph.sent()[-1].json["text"]["body"].endswith("3. c\n4. d")


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
