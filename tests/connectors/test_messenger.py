"""The Messenger channel against a real service and the fake Graph API, on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any

import pytest
import structlog

from connectors.base import OutboundMessage
from connectors.messenger import MessengerChannel
from controller.clock import ManualClock
from controller.errors import ChannelSendError, ConfigError
from controller.keys import CHANNELS, CONNECTOR_CONTEXT
from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing_graph import (
    FakeGraph,
    MessengerSender,
    messaging_item,
    messenger_echo,
    messenger_text,
    page_envelope,
)

SECRET = "test-app-secret"
VERIFY = "test-verify"
PAGE_A = "108011112222333"
PAGE_B = "108011112222999"
TOKENS = {PAGE_A: "test-page-token-a", PAGE_B: "test-page-token-b"}
USER = "6543210987654321"

Setup = tuple[Service, MessengerSender, FakeGraph]


@pytest.fixture
async def graph() -> AsyncIterator[FakeGraph]:
    fake = await FakeGraph(page_tokens=dict(TOKENS)).start()
    yield fake
    await fake.stop()


def messenger_settings(graph: FakeGraph, **overrides: Any) -> dict[str, Any]:
    return {
        "graph_base_url": graph.base_url,
        "graph_api_version": graph.version,
        "app_secret": SECRET,
        "verify_token": VERIFY,
        "pages": [{"page_id": page, "access_token": token} for page, token in TOKENS.items()],
        **overrides,
    }


async def start(
    make_service: Callable[..., Any],
    graph: FakeGraph,
    settings: dict[str, Any] | None = None,
    **kw: Any,
) -> Setup:
    # The fake is set up first so it is torn down last: the service stops before it.
    svc: Service = await make_service(
        connectors=[
            ConnectorInstance(
                name="messenger", type="messenger", settings=settings or messenger_settings(graph)
            ),
            ConnectorInstance(name="demo", type="demo_bot"),
        ],
        outbox_backoff_base=0.01,
        outbox_backoff_max=0.05,
        outbox_max_attempts=3,
        **kw,
    )
    assert svc.http is not None
    sender = MessengerSender(svc.http, svc.base_url + "/webhooks/messenger", SECRET)
    return svc, sender, graph


@pytest.fixture
async def ms(graph: FakeGraph, make_service: Callable[..., Any]) -> Setup:
    return await start(make_service, graph)


async def conversation_of(svc: Service, identity: str = USER, page: str = PAGE_A) -> str:
    cid = await svc.store.latest_conversation_id("messenger", page, identity)
    assert cid is not None
    return cid


async def events_of(svc: Service, cid: str, kind: str | None = None) -> list[Any]:
    return [ev for ev, _ in await svc.store.events(cid) if kind is None or ev.type == kind]


async def wait_event(svc: Service, cid: str, kind: str, *, timeout: float = 10.0) -> list[Any]:
    """Wait until the conversation holds an event of ``kind``; return those events."""
    async with asyncio.timeout(timeout):
        while not (found := await events_of(svc, cid, kind)):
            await svc.settle()
            await asyncio.sleep(0.005)
    return found


def text_of(r: Any) -> str:
    return str(r.json["message"].get("text", ""))


async def test_verification_handshake(ms: Setup) -> None:
    _, sender, _ = ms
    assert await sender.verify("subscribe", VERIFY, "872364811") == (200, "872364811")
    code, body = await sender.verify("subscribe", "wrong", "872364811")
    assert code == 403 and "verification_failed" in body
    assert (await sender.verify("unsubscribe", VERIFY, "872364811"))[0] == 403


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, 401), ("sha256=" + "0" * 64, 403), ("sha1=abc", 403)],
)
async def test_bad_signature_stores_nothing(ms: Setup, header: str | None, expected: int) -> None:
    svc, sender, _ = ms
    payload = page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_S1")]))
    code, body = await sender.post(payload, signature_header=header)
    assert code == expected
    assert body["error"]["code"] in ("missing_signature", "bad_signature")
    assert await svc.store.count("events") == 0
    assert await svc.store.count("conversations") == 0


async def test_text_message_opens_conversation_and_bot_answers(ms: Setup) -> None:
    svc, sender, graph = ms
    payload = page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_IN1")]))
    code, body = await sender.post(payload)
    assert code == 200 and body == {"ok": True, "events": 1}
    cid = await conversation_of(svc)
    conv = await svc.store.load_conversation(cid)
    assert conv is not None
    assert (conv.channel, conv.instance, conv.endpoint, conv.identity) == (
        "messenger",
        "messenger",
        PAGE_A,
        USER,
    )
    [ev] = await events_of(svc, cid, "customer.message")
    assert ev.dedupe_key == "m_IN1"
    assert ev.data["kind"] == "text" and ev.data["text"] == "hi"
    assert ev.data["psid"] == USER and ev.data["page_id"] == PAGE_A

    [sent] = await graph.wait_sent(1)
    assert sent.path == f"/{graph.version}/me/messages"
    assert sent.access_token == TOKENS[PAGE_A] and sent.page_id == PAGE_A
    assert sent.token is None  # the Page token travels as the access_token parameter only
    assert sent.json["recipient"] == {"id": USER}
    assert sent.json["messaging_type"] == "RESPONSE" and "tag" not in sent.json
    assert text_of(sent).startswith("Hello! I am the demo bot")


async def test_redelivered_message_is_one_event(ms: Setup) -> None:
    svc, sender, graph = ms
    payload = page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_DUP")]))
    assert (await sender.post(payload))[0] == 200
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 0
    cid = await conversation_of(svc)
    await svc.settle()
    assert len(await events_of(svc, cid, "customer.message")) == 1
    assert len(graph.sent()) == 1


async def test_batch_is_processed_in_order_and_echoes_are_ignored(ms: Setup) -> None:
    svc, sender, _ = ms
    other = "6543210987650000"
    payload = page_envelope(
        (
            PAGE_A,
            [
                messenger_text(USER, PAGE_A, "one", "m_B1"),
                messenger_text(other, PAGE_A, "uno", "m_B2"),
                messenger_echo(USER, PAGE_A, "Hi, this is Maria", "m_ECHO1"),
                messenger_text(USER, PAGE_A, "two", "m_B3"),
            ],
        ),
        (PAGE_A, [messenger_text(USER, PAGE_A, "three", "m_B4")]),
    )
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 4
    cid = await conversation_of(svc)
    texts = [e.data["text"] for e in await events_of(svc, cid, "customer.message")]
    assert texts == ["one", "two", "three"]
    cid = await conversation_of(svc, other)
    assert [e.data["text"] for e in await events_of(svc, cid, "customer.message")] == ["uno"]
    assert await svc.store.latest_conversation_id("messenger", PAGE_A, PAGE_A) is None


async def test_postback_quick_reply_attachment_reaction(ms: Setup) -> None:
    svc, sender, _ = ms
    react = {"reaction": "love", "emoji": "❤", "action": "react", "mid": "m_OUT1"}
    items = [
        messaging_item(
            USER, PAGE_A, postback={"mid": "m_PB1", "title": "Track order", "payload": "TRACK"}
        ),
        messaging_item(
            USER,
            PAGE_A,
            message={"mid": "m_QR1", "text": "Talk to agent", "quick_reply": {"payload": "HAND"}},
        ),
        messaging_item(
            USER,
            PAGE_A,
            message={
                "mid": "m_IMG1",
                "attachments": [
                    {"type": "image", "payload": {"url": "https://cdn.example.net/a.jpg"}}
                ],
            },
        ),
        messaging_item(USER, PAGE_A, reaction=react),
        messaging_item(USER, PAGE_A, reaction={**react, "action": "unreact"}),
    ]
    code, body = await sender.post(page_envelope((PAGE_A, items)))
    assert code == 200 and body["events"] == 5
    # A redelivered reaction is the same (mid, action, emoji): nothing new.
    again = await sender.post(
        page_envelope((PAGE_A, [messaging_item(USER, PAGE_A, reaction=react)]))
    )
    assert again == (200, {"ok": True, "events": 0})
    cid = await conversation_of(svc)
    evs = {e.dedupe_key: e.data for e in await events_of(svc, cid, "customer.message")}
    assert evs["m_PB1"]["kind"] == "postback"
    assert evs["m_PB1"]["payload"] == "TRACK" and evs["m_PB1"]["title"] == "Track order"
    assert evs["m_QR1"]["kind"] == "quick_reply" and evs["m_QR1"]["payload"] == "HAND"
    assert evs["m_QR1"]["text"] == "Talk to agent"
    assert evs["m_IMG1"]["kind"] == "image" and "text" not in evs["m_IMG1"]
    assert evs["m_IMG1"]["attachments"] == [
        {"type": "image", "url": "https://cdn.example.net/a.jpg"}
    ]
    assert evs["m_OUT1:react:❤"]["reaction_to"] == "m_OUT1"
    assert evs["m_OUT1:unreact:❤"]["action"] == "unreact"
    await svc.settle()


async def test_delivery_and_read_become_delivery_status(ms: Setup) -> None:
    svc, sender, graph = ms
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_I")])))
    [sent] = await graph.wait_sent(1)
    items = [
        messaging_item(USER, PAGE_A, delivery={"mids": ["m_FAKE000001"], "watermark": 1000}),
        messenger_echo(USER, PAGE_A, "our own reply", "m_ECHO2"),
        messaging_item(USER, PAGE_A, read={"watermark": 1000}),
    ]
    payload = page_envelope((PAGE_A, items))
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 2
    assert (await sender.post(payload))[1]["events"] == 0  # (page, PSID, kind, watermark)
    cid = await conversation_of(svc)
    found = await events_of(svc, cid, "delivery.status")
    assert [(e.data["status"], e.data["watermark"]) for e in found] == [
        ("delivered", 1000),
        ("read", 1000),
    ]
    assert found[0].dedupe_key == f"{PAGE_A}:{USER}:delivery:1000"
    assert found[0].data["mids"] == ["m_FAKE000001"]
    assert sent.status == 200
    # Nothing of this is customer text: the bot answered once.
    await svc.settle()
    assert len(graph.sent()) == 1


async def test_status_without_open_conversation_is_ignored(ms: Setup) -> None:
    svc, sender, _ = ms
    item = messaging_item("999", PAGE_A, read={"watermark": 5})
    assert await sender.post(page_envelope((PAGE_A, [item]))) == (200, {"ok": True, "events": 0})
    assert await svc.store.count("conversations") == 0


async def test_rate_limited_and_5xx_sends_are_retried(ms: Setup) -> None:
    svc, sender, graph = ms
    graph.fail(status=400, code=613, times=1)
    graph.fail(status=500, code=2, times=1)
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_R")])))
    [sent] = await graph.wait_sent(1)
    await svc.settle()
    assert [r.status for r in graph.requests if r.is_send] == [400, 500, 200]
    assert len(graph.sent()) == 1 and sent.json["recipient"]["id"] == USER
    assert await svc.store.outbox_rows("dead") == []


@pytest.mark.parametrize(
    ("code", "subcode", "reason"),
    [
        (10, 2018278, "window_closed"),
        (551, 1545041, "invalid_recipient"),
        (190, None, "provider_error"),
    ],
)
async def test_graph_errors_become_delivery_failed(
    ms: Setup, code: int, subcode: int | None, reason: str
) -> None:
    svc, sender, graph = ms
    graph.fail(status=400, code=code, subcode=subcode, times=None, to=USER)
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_E")])))
    cid = await conversation_of(svc)
    [failed] = await wait_event(svc, cid, "delivery.failed")
    assert failed.data["reason"] == reason and failed.data["instance"] == "messenger"
    assert len([r for r in graph.requests if r.status == 400]) == 1  # never retried
    assert graph.sent() == []


async def test_outside_24h_agent_message_is_tagged_and_controller_message_fails(
    graph: FakeGraph, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc, sender, _ = await start(make_service, graph, clock=clock)
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "agent", "m_H")])))
    cid = await conversation_of(svc)
    alice = await svc.agent("alice")
    await alice.available()
    await alice.take(cid)
    await graph.wait_sent(1, lambda r: "now chatting with alice" in text_of(r))
    assert {r.json["messaging_type"] for r in graph.sent()} == {"RESPONSE"}

    clock.advance(timedelta(hours=25).total_seconds())
    ack = await alice.say(cid, "Following up on your refund request.")
    assert ack["type"] == "ack", ack
    [tagged] = await graph.wait_sent(1, lambda r: "refund" in text_of(r))
    assert tagged.json["messaging_type"] == "MESSAGE_TAG"
    assert tagged.json["tag"] == "HUMAN_AGENT"
    assert tagged.access_token == TOKENS[PAGE_A]

    # The agent's message starts the idle reminder: the controller's reminder may not go out.
    await svc.until(cid, lambda c: "idle_reminder" in c.timers)
    clock.advance(svc.settings.timeouts.idle_reminder + 1)
    [failed] = await wait_event(svc, cid, "delivery.failed")
    assert failed.data["reason"] == "window_closed"
    [dead] = await svc.store.outbox_rows("dead")
    assert "window_closed" in dead["last_error"]
    assert not graph.sent(lambda r: "still there" in text_of(r))
    assert all(r.status == 200 for r in graph.requests)  # refused before any Graph call


async def test_window_rules_of_send(ms: Setup) -> None:
    svc, _, graph = ms
    channel = svc.app[CHANNELS]["messenger"]
    assert isinstance(channel, MessengerChannel)
    now = channel.context.clock.now()

    def out(sender: str, age: timedelta | None) -> OutboundMessage:
        msg = {"id": "m1", "from": sender, "text": "hello"}
        last = now - age if age is not None else None
        return OutboundMessage("cv_1", PAGE_B, USER, msg, "k1", customer_last_at=last)

    assert (await channel.send(out("bot", timedelta(hours=23)))) is not None
    assert (await channel.send(out("bot", None))) is not None  # unknown: Graph decides
    await channel.send(out("agent", timedelta(days=6)))
    with pytest.raises(ChannelSendError, match=r"^window_closed") as exc:
        await channel.send(out("agent", timedelta(days=8)))
    assert not exc.value.retryable
    with pytest.raises(ChannelSendError, match=r"^window_closed"):
        await channel.send(out("bot", timedelta(hours=25)))
    assert [r.json.get("tag") for r in graph.sent()] == [None, None, "HUMAN_AGENT"]
    assert {r.page_id for r in graph.sent()} == {PAGE_B}


async def test_buttons_become_quick_replies(ms: Setup) -> None:
    svc, _, graph = ms
    channel = svc.app[CHANNELS]["messenger"]
    assert isinstance(channel, MessengerChannel)

    def out(buttons: list[Any]) -> OutboundMessage:
        msg = {"id": "m1", "from": "bot", "text": "Need more help?", "buttons": buttons}
        return OutboundMessage("cv_1", PAGE_A, USER, msg, "k1")

    mid = await channel.send(out([{"id": "HANDOFF", "title": "Talk to agent"}, "No thanks"]))
    assert mid is not None and mid.startswith("m_")
    [sent] = graph.sent()
    assert sent.json["message"]["quick_replies"] == [
        {"content_type": "text", "title": "Talk to agent", "payload": "HANDOFF"},
        {"content_type": "text", "title": "No thanks", "payload": "b1"},
    ]
    await channel.send(out([f"option {i}" for i in range(14)]))
    await channel.send(out(["a title that is far too long"]))
    last, too_long = graph.sent()[1:]
    assert "quick_replies" not in last.json["message"]
    assert text_of(last).endswith("13. option 12\n14. option 13")
    assert text_of(too_long) == "Need more help?\n1. a title that is far too long"


async def test_two_pages_are_two_conversations(ms: Setup) -> None:
    svc, sender, graph = ms
    payload = page_envelope(
        (PAGE_A, [messenger_text(USER, PAGE_A, "hours", "m_TA")]),
        (PAGE_B, [messenger_text(USER, PAGE_B, "prices", "m_TB")]),
    )
    assert (await sender.post(payload))[0] == 200
    a, b = await conversation_of(svc, USER, PAGE_A), await conversation_of(svc, USER, PAGE_B)
    assert a != b
    await graph.wait_sent(2)
    [via_a] = graph.sent(lambda r: "open Monday" in text_of(r))
    [via_b] = graph.sent(lambda r: "plans start" in text_of(r))
    assert (via_a.page_id, via_a.access_token) == (PAGE_A, TOKENS[PAGE_A])
    assert (via_b.page_id, via_b.access_token) == (PAGE_B, TOKENS[PAGE_B])


async def test_unknown_page_and_other_objects_are_ignored(ms: Setup) -> None:
    svc, sender, _ = ms
    payload = page_envelope(("999", [messenger_text(USER, "999", "hi", "m_U")]))
    assert await sender.post(payload) == (200, {"ok": True, "events": 0})
    other = {"object": "instagram", "entry": []}
    assert await sender.post(other) == (200, {"ok": True, "events": 0})
    assert await svc.store.count("events") == 0


async def test_unsupported_events_are_events_not_errors(ms: Setup) -> None:
    svc, sender, _ = ms
    items = [
        messaging_item(USER, PAGE_A, referral={"ref": "ad7", "source": "ADS", "type": "OPEN"}),
        messaging_item(
            USER, PAGE_A, pass_thread_control={"new_owner_app_id": "1", "metadata": "x"}
        ),
        messaging_item(USER, PAGE_A, message={"mid": "m_ODD"}),
    ]
    payload = page_envelope((PAGE_A, items))
    payload["entry"][0]["standby"] = [messenger_text(USER, PAGE_A, "read-only", "m_SB")]
    code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 3
    assert (await sender.post(payload))[1]["events"] == 0  # stable dedupe keys
    cid = await conversation_of(svc)
    kinds = [e.data["kind"] for e in await events_of(svc, cid, "customer.message")]
    assert kinds == ["referral", "pass_thread_control", "message"]
    await svc.settle()  # every event is decided without an error


@pytest.mark.parametrize(
    "payload",
    [
        b"{not json",
        b'{"object": "page"}',
        b'{"object": "page", "entry": [{"messaging": []}]}',
        b'{"object": "page", "entry": [{"id": "1", "messaging": [{"sender": {}}]}]}',
        b"[]",
    ],
)
async def test_malformed_bodies_are_400(ms: Setup, payload: bytes) -> None:
    svc, sender, _ = ms
    code, body = await sender.post(payload)
    assert code == 400, body
    assert body["error"]["code"] in ("malformed_json", "invalid_body")
    assert await svc.store.count("events") == 0


async def test_huge_body_is_413(ms: Setup) -> None:
    svc, sender, _ = ms
    big = messenger_text(USER, PAGE_A, "x" * (2 * 1024 * 1024), "m_BIG")
    code, body = await sender.post(page_envelope((PAGE_A, [big])))
    assert code == 413 and body["error"]["code"] == "too_large"
    assert await svc.store.count("events") == 0


@pytest.mark.parametrize(
    "override",
    [
        {"app_secret": "change-me"},
        {"verify_token": ""},
        {"pages": [{"page_id": PAGE_A, "access_token": "secret"}]},
        {
            "pages": [
                {"page_id": PAGE_A, "access_token": "t1"},
                {"page_id": PAGE_A, "access_token": "t2"},
            ]
        },
        {"pages": []},
        {"unknown_knob": 1},
    ],
)
async def test_placeholder_secrets_and_bad_settings_refuse_to_start(
    make_service: Callable[..., Any], graph: FakeGraph, override: dict[str, Any]
) -> None:
    inst = ConnectorInstance(
        name="messenger", type="messenger", settings=messenger_settings(graph, **override)
    )
    with pytest.raises(ConfigError, match="invalid settings"):
        await make_service(connectors=[inst], profile="prod")


# attachments, long texts -------------------------------------------------------------------------
def channel_of(svc: Service) -> MessengerChannel:
    channel = svc.app[CHANNELS]["messenger"]
    assert isinstance(channel, MessengerChannel)
    return channel


def outbound(text: str = "", key: str = "k1", **extra: Any) -> OutboundMessage:
    msg = {"id": "m1", "from": "bot", "text": text, **extra}
    return OutboundMessage("cv_1", PAGE_A, USER, msg, key)


async def test_image_goes_after_its_text_as_an_attachment(ms: Setup) -> None:
    svc, _, graph = ms
    channel = channel_of(svc)
    assert {"images", "media"} <= channel.capabilities
    url = "https://example.com/label.png"
    mid = await channel.send(outbound("Your shipping label", key="ev_1:0", image=url))
    text, image = graph.sent()
    assert text.json["message"] == {"text": "Your shipping label", "metadata": "ev_1:0:1"}
    assert image.json["message"] == {
        "attachment": {"type": "image", "payload": {"url": url, "is_reusable": True}},
        "metadata": "ev_1:0:2",
    }
    assert mid == image.provider_id  # the last part's
    assert {r.json["messaging_type"] for r in graph.sent()} == {"RESPONSE"}
    # An image alone is one attachment.
    await channel.send(outbound("", image=url))
    assert "attachment" in graph.sent()[-1].json["message"] and len(graph.sent()) == 3


@pytest.mark.parametrize(
    ("kind", "attachment_type"),
    [
        ("image", "image"),
        ("audio", "audio"),
        ("video", "video"),
        ("document", "file"),
        ("sticker", "image"),
    ],
)
async def test_media_types_become_attachment_types(
    ms: Setup, kind: str, attachment_type: str
) -> None:
    svc, _, graph = ms
    media = {"type": kind, "url": "https://e.com/f", "filename": "f.bin", "caption": "About it"}
    if kind != "document":
        media.pop("filename")
    await channel_of(svc).send(outbound("Here", media=media))
    text, attachment = graph.sent()
    assert text_of(text) == "Here\n\nAbout it"  # Messenger shows no captions: text first
    assert attachment.json["message"]["attachment"]["type"] == attachment_type
    assert attachment.json["message"]["attachment"]["payload"]["url"] == "https://e.com/f"


async def test_quick_replies_ride_on_the_last_part(ms: Setup) -> None:
    svc, _, graph = ms
    channel = channel_of(svc)
    url = "https://example.com/shoe.jpg"
    await channel.send(outbound("This one?", image=url, buttons=["Yes", "No"]))
    text, image = graph.sent()
    assert "quick_replies" not in text.json["message"]
    assert [q["title"] for q in image.json["message"]["quick_replies"]] == ["Yes", "No"]
    # No text: the quick replies still go, on the attachment.
    await channel.send(outbound("", image=url, buttons=["Yes", "No"]))
    assert len(graph.sent()) == 3 and "quick_replies" in graph.sent()[-1].json["message"]
    # A long text: only its last part has them.
    long = "A sentence of some length. " * 100  # 2700 characters
    await channel.send(outbound(long, key="k9", buttons=["More", "Done"]))
    first, last = graph.sent()[3:]
    assert "quick_replies" not in first.json["message"] and "quick_replies" in last.json["message"]
    assert all(r.status == 200 for r in graph.requests)


async def test_bad_media_is_a_final_failure(ms: Setup) -> None:
    svc, _, graph = ms
    with pytest.raises(ChannelSendError, match="invalid media") as exc:
        await channel_of(svc).send(outbound("x", media={"type": "image", "url": "ftp://x"}))
    assert not exc.value.retryable
    assert graph.requests == []


async def test_long_text_is_sent_in_parts(ms: Setup) -> None:
    svc, _, graph = ms
    sentences = [f"Sentence number {i} says something useful." for i in range(120)]
    text = " ".join(sentences)  # about 5,000 characters, no paragraphs
    mid = await channel_of(svc).send(outbound(text, key="ev_3:1"))
    sent = graph.sent()
    parts = [text_of(r) for r in sent]
    assert len(parts) == 3 and all(len(p) <= 2000 for p in parts)
    assert all(p.endswith(".") for p in parts)  # cut at sentence ends
    assert " ".join(parts) == text
    assert [r.json["message"]["metadata"] for r in sent] == ["ev_3:1:1", "ev_3:1:2", "ev_3:1:3"]
    assert mid == sent[-1].provider_id


async def test_agent_text_over_2000_characters_through_the_outbox_with_a_retry(
    ms: Setup,
) -> None:
    """An agent's long message goes in two parts; the second fails once (5xx) and the outbox
    tries the message again: the first part is not sent twice."""
    svc, sender, graph = ms
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "agent", "m_A")])))
    cid = await conversation_of(svc)
    alice = await svc.agent("alice")
    await alice.available()
    await alice.take(cid)
    await graph.wait_sent(1, lambda r: "now chatting with alice" in text_of(r))
    before = len(graph.sent())
    graph.fail(status=500, code=2, times=1, after=1)
    long = "\n\n".join(["First paragraph. " * 70, "Second paragraph. " * 70]).strip()
    assert 2000 < len(long) <= 4096
    assert (await alice.say(cid, long))["type"] == "ack"
    await graph.wait_sent(before + 2)
    await svc.settle()
    parts = graph.sent()[before:]
    assert [text_of(r)[:6] for r in parts] == ["First ", "Second"]
    assert [r.status for r in graph.requests if r.status != 200] == [500]
    assert await svc.store.outbox_rows("dead") == []


# statuses name our messages ----------------------------------------------------------------------
def link_statuses(svc: Service) -> None:
    """The service's ``provider_message`` lookup for connectors (added here when the service
    does not give it yet)."""
    svc.app[CONNECTOR_CONTEXT].service.setdefault(
        "provider_message", lambda instance, pid: svc.store.provider_message(instance, pid)
    )


async def test_delivery_and_read_carry_our_message_id(ms: Setup) -> None:
    svc, sender, graph = ms
    link_statuses(svc)
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_ST")])))
    [sent] = await graph.wait_sent(1)
    await svc.settle()
    cid = await conversation_of(svc)
    transcript = await svc.store.messages(cid, include_agent_only=False)
    [reply] = [m for m in transcript if m.sender_role == "bot"]
    assert sent.provider_id is not None
    recorded = await svc.store.provider_message("messenger", sent.provider_id)
    assert recorded is not None and recorded.message_id == reply.id

    now_ms = int(reply.created_at.timestamp() * 1000)
    items = [
        messaging_item(USER, PAGE_A, delivery={"mids": [sent.provider_id], "watermark": now_ms}),
        messaging_item(USER, PAGE_A, read={"watermark": now_ms + 1000}),
        # Before our reply, nothing of ours was read.
        messaging_item(USER, PAGE_A, read={"watermark": now_ms - 60_000}),
        # Unknown mids: the watermark decides.
        messaging_item(USER, PAGE_A, delivery={"mids": ["m_OTHER"], "watermark": now_ms + 5}),
    ]
    code, body = await sender.post(page_envelope((PAGE_A, items)))
    assert code == 200 and body["events"] == 4
    found = await events_of(svc, cid, "delivery.status")
    assert [(e.data["status"], e.data.get("message_id")) for e in found] == [
        ("delivered", reply.id),
        ("read", reply.id),
        ("read", None),
        ("delivered", reply.id),
    ]
    assert found[0].data["message_ids"] == [reply.id]


# sender actions ----------------------------------------------------------------------------------
async def test_mark_seen_once_per_customer_after_the_commit(ms: Setup) -> None:
    """Two messages of one customer in a delivery: one ``mark_seen``, sent once both are stored,
    without holding the webhook's 200."""
    svc, sender, graph = ms
    other = "6543210987650000"
    release = asyncio.Event()
    stored_when_seen: dict[str, list[str]] = {}

    async def look_then_hold(body: dict[str, Any]) -> None:
        psid = body["recipient"]["id"]
        cid = await conversation_of(svc, psid)
        stored = await events_of(svc, cid, "customer.message")
        stored_when_seen[psid] = [e.dedupe_key for e in stored]
        await release.wait()

    graph.before_sender_action = look_then_hold
    payload = page_envelope(
        (
            PAGE_A,
            [
                messenger_text(USER, PAGE_A, "one", "m_MS1"),
                messenger_text(other, PAGE_A, "uno", "m_MS2"),
                messenger_echo(USER, PAGE_A, "our reply", "m_MS_ECHO"),
                messenger_text(USER, PAGE_A, "two", "m_MS3"),
            ],
        )
    )
    async with asyncio.timeout(10):  # a webhook waiting on the sender actions would hang here
        code, body = await sender.post(payload)
    assert code == 200 and body["events"] == 3
    assert graph.sender_actions(accepted=False) == []  # still held: the 200 did not wait
    release.set()
    channel = channel_of(svc)
    await channel.idle()
    seen = graph.sender_actions()
    assert sorted(r.json["recipient"]["id"] for r in seen) == sorted([USER, other])
    assert all(
        r.json == {"recipient": r.json["recipient"], "sender_action": "mark_seen"} for r in seen
    )
    assert all(r.path == f"/{graph.version}/me/messages" for r in seen)
    assert {(r.page_id, r.access_token) for r in seen} == {(PAGE_A, TOKENS[PAGE_A])}
    assert stored_when_seen == {USER: ["m_MS1", "m_MS3"], other: ["m_MS2"]}
    assert channel.stats["seen_sent"] == 2
    # Sender actions are not sends: the bot's answers are what ``sent()`` counts.
    await graph.wait_sent(2)
    assert all("message" in r.json for r in graph.sent())
    # A redelivery is marked seen again (at least once); nothing new is stored.
    assert (await sender.post(payload))[1]["events"] == 0
    await channel.idle()
    assert len(graph.sender_actions()) == 4


async def test_only_what_the_customer_wrote_or_tapped_is_marked_seen(ms: Setup) -> None:
    svc, sender, graph = ms
    channel = channel_of(svc)
    await sender.post(page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_OS1")])))
    await channel.idle()
    assert len(graph.sender_actions()) == 1
    react = {"reaction": "like", "emoji": "👍", "action": "react", "mid": "m_FAKE000001"}
    items = [
        messaging_item(USER, PAGE_A, delivery={"watermark": 1000}),
        messaging_item(USER, PAGE_A, read={"watermark": 1000}),
        messaging_item(USER, PAGE_A, reaction=react),
        messaging_item(USER, PAGE_A, referral={"ref": "ad7", "source": "ADS", "type": "OPEN"}),
        messenger_echo(USER, PAGE_A, "our reply", "m_OS_ECHO"),
    ]
    code, body = await sender.post(page_envelope((PAGE_A, items)))
    assert code == 200 and body["events"] == 4
    await channel.idle()
    assert len(graph.sender_actions()) == 1
    tap = {"title": "Track order", "payload": "TRACK"}  # a postback without a mid
    await sender.post(page_envelope((PAGE_A, [messaging_item(USER, PAGE_A, postback=tap)])))
    await channel.idle()
    assert [r.sender_action for r in graph.sender_actions()] == ["mark_seen", "mark_seen"]


@pytest.mark.parametrize(
    ("mark_seen", "typing", "expected"),
    [
        (True, True, ["mark_seen", "typing_on"]),
        (False, True, ["typing_on"]),
        (False, False, []),
    ],
    ids=["seen_and_typing", "typing_only", "off"],
)
async def test_sender_action_settings(
    graph: FakeGraph,
    make_service: Callable[..., Any],
    mark_seen: bool,
    typing: bool,
    expected: list[str],
) -> None:
    settings = messenger_settings(graph, mark_seen=mark_seen, typing_indicator=typing)
    svc, sender, _ = await start(make_service, graph, settings)
    await sender.post(page_envelope((PAGE_B, [messenger_text(USER, PAGE_B, "hi", "m_SS")])))
    await graph.wait_sent(1)
    await channel_of(svc).idle()
    actions = graph.sender_actions(accepted=False)
    assert [r.sender_action for r in actions] == expected  # in this order, one call each
    assert all(r.json["recipient"] == {"id": USER} and r.page_id == PAGE_B for r in actions)
    assert all(r.access_token == TOKENS[PAGE_B] and r.status == 200 for r in actions)


async def test_failing_sender_action_is_logged_not_retried(
    graph: FakeGraph, make_service: Callable[..., Any]
) -> None:
    settings = messenger_settings(graph, typing_indicator=True)
    svc, sender, _ = await start(make_service, graph, settings)
    channel = channel_of(svc)
    graph.fail_sender_actions = 1
    with structlog.testing.capture_logs() as logs:
        code, body = await sender.post(
            page_envelope((PAGE_A, [messenger_text(USER, PAGE_A, "hi", "m_SF")]))
        )
        await channel.idle()
    assert code == 200 and body == {"ok": True, "events": 1}
    cid = await conversation_of(svc)
    assert [e.dedupe_key for e in await events_of(svc, cid, "customer.message")] == ["m_SF"]
    # mark_seen failed once and was not tried again; typing_on still went.
    actions = graph.sender_actions(accepted=False)
    assert [(r.sender_action, r.status) for r in actions] == [
        ("mark_seen", 500),
        ("typing_on", 200),
    ]
    [failed] = [e for e in logs if e["event"] == "messenger_sender_action_failed"]
    assert failed["action"] == "mark_seen" and failed["page_id"] == PAGE_A
    assert "provider_error" in failed["error"] and TOKENS[PAGE_A] not in failed["error"]
    assert (channel.stats["seen_failed"], channel.stats["typing_sent"]) == (1, 1)
    await graph.wait_sent(1)  # the conversation goes on
    await svc.settle()
    assert await svc.store.outbox_rows("dead") == []


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"recipient": {"id": USER}, "sender_action": "mark_seen"}, None),
        ({"recipient": {"id": USER}, "sender_action": "typing_off"}, None),
        ({"recipient": {"id": USER}, "sender_action": "dance"}, "sender_action must be"),
        ({"sender_action": "mark_seen"}, "recipient.id is required"),
        (
            {"recipient": {"id": USER}, "sender_action": "typing_on", "message": {"text": "x"}},
            "exactly one of message and sender_action",
        ),
    ],
)
async def test_fake_graph_checks_sender_actions(
    ms: Setup, body: dict[str, Any], problem: str | None
) -> None:
    svc, _, graph = ms
    assert svc.http is not None
    url = f"{graph.base_url}/{graph.version}/me/messages"
    async with svc.http.post(url, params={"access_token": TOKENS[PAGE_A]}, json=body) as resp:
        status, answer = resp.status, await resp.json()
    if problem is None:
        assert (status, answer) == (200, {"recipient_id": USER})
        assert graph.sender_actions()[-1].json == body and graph.sent() == []
    else:
        assert status == 400 and problem in answer["error"]["message"]
        assert answer["error"]["code"] == 100
