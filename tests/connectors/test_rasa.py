"""The Rasa bot connector against the fake Rasa server (REST and callback channels, tracker),
first asked directly, then through a real service."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from connectors.base import (
    BotButton,
    BotCallback,
    BotMessage,
    BotReply,
    BotRequest,
    ConnectorContext,
    ConnectorTypes,
    build_connector,
)
from connectors.rasa import RasaBot, RasaSettings
from controller.api.common import errors_middleware
from controller.clock import ManualClock
from controller.errors import BotError, ConfigError
from controller.settings import ConnectorInstance
from controller.testing import Service, free_port
from controller.testing_rasa import FakeRasa

CALLBACK_TOKEN = "rasa-callback-token-5f0c2a9e"
API_TOKEN = "rasa-api-token-81d3"
CID = "conv-7f3a9c"


@pytest.fixture
async def rasa() -> AsyncIterator[FakeRasa]:
    fake = await FakeRasa(api_token=API_TOKEN).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    session = aiohttp.ClientSession()
    yield session
    await session.close()


Replies = list[BotCallback]


async def _no_submit(events: Any) -> Any:
    raise AssertionError("the Rasa connector submits no events itself")


def make_bot(
    rasa: FakeRasa,
    http: aiohttp.ClientSession,
    replies: Replies | None = None,
    **settings: Any,
) -> RasaBot:
    async def bot_reply(callback: BotCallback) -> None:
        assert replies is not None
        replies.append(callback)

    context = ConnectorContext(
        submit=_no_submit,
        clock=ManualClock(),
        session_secret="test-session-secret",
        allowed_origins=[],
        http=http,
        bot_reply=bot_reply if replies is not None else None,
    )
    raw = {"base_url": rasa.base_url, "api_token": API_TOKEN, **settings}
    bot = build_connector("demo", "rasa", raw, context, ConnectorTypes())
    assert isinstance(bot, RasaBot)
    return bot


def question(text: str, *, cid: str = CID, seq: int = 1) -> BotRequest:
    return BotRequest(
        conversation_id=cid,
        text=text,
        language="en",
        mode="direct",
        reply_to_seq=seq,
        idempotency_key=f"ask-{cid}-{seq}",
        channel="webchat",
        customer_id="cust-1",
        attributes={"plan": "gold"},
    )


# REST channel -------------------------------------------------------------------------------
async def test_rest_answer_maps_every_kind_of_message(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    rasa.script(
        "hi",
        {
            "text": "Hello! Do you want to talk to an agent?",
            "buttons": [{"title": "Yes", "payload": "/affirm"}, {"title": "No"}, "junk"],
        },
        {"image": "https://example.com/agent.png"},
        {"custom": {"card": "welcome", "handoff": False}},
        {"attachment": "https://example.com/photo.JPG?size=2"},
        {"text": "Our terms:", "attachment": "https://example.com/terms.pdf"},
        {"text": "Pick one", "quick_replies": [{"title": "A", "payload": "/a"}]},
        {"elements": [{"title": "unknown kinds are ignored"}]},
    )
    bot = make_bot(rasa, http)
    reply = await bot.ask(question("hi"))
    assert reply.messages == (
        BotMessage(
            "Hello! Do you want to talk to an agent?",
            buttons=(BotButton("Yes", "/affirm"), BotButton("No", "No")),
        ),
        BotMessage(image="https://example.com/agent.png"),
        BotMessage(custom={"card": "welcome", "handoff": False}),
        BotMessage(image="https://example.com/photo.JPG?size=2"),
        BotMessage("Our terms:\nhttps://example.com/terms.pdf"),
        BotMessage("Pick one", buttons=(BotButton("A", "/a"),)),
    )
    assert not reply.handoff and not reply.pending and reply.failed is None
    assert reply.intent is None  # no tracker asked for
    [sent] = rasa.webhook_requests()
    assert sent.path == "/webhooks/rest/webhook"
    assert sent.json == {
        "sender": CID,
        "message": "hi",
        "metadata": {
            "channel": "webchat",
            "language": "en",
            "customer_id": "cust-1",
            "attributes": {"plan": "gold"},
        },
    }
    assert [r.path for r in rasa.requests] == ["/webhooks/rest/webhook"]


async def test_empty_array_is_no_reply(rasa: FakeRasa, http: aiohttp.ClientSession) -> None:
    rasa.script("silence")
    reply = await make_bot(rasa, http).ask(question("silence"))
    assert reply == BotReply()


async def test_handoff_by_custom_payload(rasa: FakeRasa, http: aiohttp.ClientSession) -> None:
    rasa.script(
        "agent",
        {"text": "Connecting you to an agent now."},
        {"custom": {"handoff": True, "queue": "billing", "reason": "user_request"}},
    )
    reply = await make_bot(rasa, http).ask(question("agent"))
    assert reply.handoff
    assert reply.handoff_data == {"queue": "billing", "reason": "user_request"}
    assert reply.messages[0] == BotMessage("Connecting you to an agent now.")
    assert reply.messages[1].custom is not None and not reply.messages[1].shown()


async def test_handoff_payload_key_is_configurable(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    rasa.script("agent", {"custom": {"escalate": "true", "queue": "vip"}, "text": "One moment"})
    reply = await make_bot(rasa, http, handoff_payload_key="escalate").ask(question("agent"))
    assert reply.handoff and reply.handoff_data == {"queue": "vip"}
    default = await make_bot(rasa, http).ask(question("agent"))
    assert not default.handoff


async def test_tracker_gives_intent_confidence_slots_and_handoff_intent(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    rasa.script(
        "I want a human",
        {"text": "Sure, let me get someone."},
        intent="request_human",
        confidence=0.97,
        entities=[{"entity": "topic", "value": "billing", "start": 0, "end": 1}],
        slots={"handoff_requested": True, "email": None},
    )
    bot = make_bot(rasa, http, fetch_tracker=True)
    reply = await bot.ask(question("I want a human", cid="conv/with space"))
    assert reply.messages == (BotMessage("Sure, let me get someone."),)
    assert reply.handoff and reply.handoff_data == {"reason": "request_human"}
    assert (reply.intent, reply.confidence) == ("request_human", 0.97)
    assert reply.slots == {"topic": "billing", "handoff_requested": True}
    assert reply.failed is None
    tracker = rasa.requests[-1]
    assert tracker.path == "/conversations/conv/with space/tracker"
    assert tracker.query == {"include_events": "NONE", "token": API_TOKEN}
    assert tracker.status == 200


async def test_handoff_intents_are_configurable(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    rasa.script("operator", {"text": "ok"}, intent="talk_to_operator")
    bot = make_bot(rasa, http, fetch_tracker=True, handoff_intents=["talk_to_operator"])
    assert (await bot.ask(question("operator"))).handoff
    default = make_bot(rasa, http, fetch_tracker=True)
    assert not (await default.ask(question("operator", cid="other"))).handoff


async def test_fallback_intent_is_a_failed_answer(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    reply = await make_bot(rasa, http, fetch_tracker=True).ask(question("blorp"))
    assert reply.messages == (BotMessage("Sorry, I did not get that."),)
    assert reply.failed == "fallback" and not reply.handoff
    assert (reply.intent, reply.confidence) == ("nlu_fallback", 0.31)


async def test_paused_tracker_is_a_handoff(rasa: FakeRasa, http: aiohttp.ClientSession) -> None:
    rasa.script("complaint", {"text": "I am passing you on."}, intent="complain", paused=True)
    reply = await make_bot(rasa, http, fetch_tracker=True).ask(question("complaint"))
    assert reply.handoff and reply.handoff_data == {"reason": "paused"}
    off = make_bot(rasa, http, fetch_tracker=True, handoff_when_paused=False)
    assert not (await off.ask(question("complaint"))).handoff


@pytest.mark.parametrize("failure", ["status_500", "bad_token"])
async def test_tracker_failure_keeps_the_reply(
    rasa: FakeRasa, http: aiohttp.ClientSession, failure: str
) -> None:
    rasa.script("I want a human", {"text": "Sure."}, intent="request_human")
    settings: dict[str, Any] = {"fetch_tracker": True}
    if failure == "status_500":
        rasa.fail_tracker(500)
    else:
        settings["api_token"] = "not-the-api-token"
    reply = await make_bot(rasa, http, **settings).ask(question("I want a human"))
    assert reply.messages == (BotMessage("Sure."),)
    assert reply.intent is None and not reply.handoff
    assert rasa.requests[-1].status == (500 if failure == "status_500" else 401)


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (404, False), (400, False)]
)
async def test_http_errors(
    rasa: FakeRasa, http: aiohttp.ClientSession, status: int, retryable: bool
) -> None:
    rasa.fail(status)
    with pytest.raises(BotError) as caught:
        await make_bot(rasa, http).ask(question("hi"))
    assert caught.value.retryable is retryable
    reason = "unavailable" if retryable else "rejected"
    assert caught.value.message.startswith(f"{reason}: rasa webhook: HTTP {status}")


async def test_connection_refused_is_retryable(rasa: FakeRasa, http: aiohttp.ClientSession) -> None:
    bot = make_bot(rasa, http, base_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(BotError) as caught:
        await bot.ask(question("hi"))
    assert caught.value.retryable
    assert API_TOKEN not in caught.value.message


async def test_timeout_is_retryable(rasa: FakeRasa, http: aiohttp.ClientSession) -> None:
    rasa.hold()
    bot = make_bot(rasa, http, timeout=0.2)
    with pytest.raises(BotError) as caught:
        await bot.ask(question("hi"))
    assert caught.value.retryable and caught.value.message.startswith(
        "timeout: rasa gave no answer"
    )
    assert len(rasa.webhook_requests()) == 1  # the request reached Rasa: no retry loop here


@pytest.mark.parametrize(
    "answer",
    [
        b"[{'text': 'single quotes'}]",
        b'{"text": "an object, not an array"}',
        b'["a string item"]',
        b'[{"text": "fine"}, 3]',
        b"null",
    ],
)
async def test_malformed_answer_is_not_retryable(
    rasa: FakeRasa, http: aiohttp.ClientSession, answer: bytes
) -> None:
    rasa.answer_raw(answer)
    with pytest.raises(BotError) as caught:
        await make_bot(rasa, http).ask(question("hi"))
    assert not caught.value.retryable
    assert caught.value.message.startswith("malformed: rasa answer")


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="callback_token"):
        RasaSettings(mode="callback")
    for token in ("change-me", "short-token", "                "):
        with pytest.raises(ValueError):
            RasaSettings(mode="callback", callback_token=token)
    with pytest.raises(ValueError, match="api_token"):
        RasaSettings(api_token="secret")
    with pytest.raises(ValueError, match="base_url"):
        RasaSettings(base_url="localhost:5005")
    with pytest.raises(ValueError, match="extra"):
        RasaSettings.model_validate({"mode": "rest", "url": "http://x"})
    settings = RasaSettings(
        base_url="http://rasa:5005/",
        mode="callback",
        callback_token=CALLBACK_TOKEN,
        api_token=API_TOKEN,
    )
    assert settings.base_url == "http://rasa:5005"
    assert CALLBACK_TOKEN not in repr(settings) and API_TOKEN not in repr(settings)


def test_a_bad_instance_is_a_config_error_that_shows_no_secret() -> None:
    context = ConnectorContext(
        submit=_no_submit, clock=ManualClock(), session_secret="s", allowed_origins=[]
    )
    with pytest.raises(ConfigError) as caught:
        build_connector(
            "demo", "rasa", {"callback_token": "short-secret-x"}, context, ConnectorTypes()
        )
    assert "short-secret-x" not in caught.value.message


# callback channel ------------------------------------------------------------------------------
@asynccontextmanager
async def serve(bot: RasaBot) -> AsyncIterator[str]:
    """The bot's routes behind the service's error middleware; yields the callback URL."""
    app = web.Application(middlewares=[errors_middleware])
    app.router.add_routes(bot.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/connectors/bots/{bot.name}/callback"
    finally:
        await runner.cleanup()


def callback_bot(rasa: FakeRasa, http: aiohttp.ClientSession, replies: Replies) -> RasaBot:
    return make_bot(rasa, http, replies, mode="callback", callback_token=CALLBACK_TOKEN)


@pytest.mark.parametrize("callbacks_first", [True, False])
async def test_callback_mode_answers_through_the_route(
    rasa: FakeRasa, http: aiohttp.ClientSession, callbacks_first: bool
) -> None:
    rasa.callbacks_first = callbacks_first
    rasa.script(
        "hi",
        {"text": "Hello!", "buttons": [{"title": "Prices", "payload": "/prices"}]},
        {"image": "https://example.com/hello.png"},
    )
    replies: Replies = []
    bot = callback_bot(rasa, http, replies)
    async with serve(bot) as url:
        rasa.callback_url = f"{url}?token={CALLBACK_TOKEN}"
        reply = await bot.ask(question("hi", seq=4))
        assert reply == BotReply(pending=True)
        posts = await rasa.wait_callbacks(2)
    assert [p.status for p in posts] == [200, 200]
    [sent] = rasa.webhook_requests()
    assert sent.path == "/webhooks/callback/webhook" and sent.json["sender"] == CID
    assert [r.reply for r in replies] == [
        BotReply(messages=(BotMessage("Hello!", buttons=(BotButton("Prices", "/prices"),)),)),
        BotReply(messages=(BotMessage(image="https://example.com/hello.png"),)),
    ]
    assert {(r.bot, r.conversation_id, r.reply_to_seq) for r in replies} == {("demo", CID, 4)}
    assert len({r.dedupe_key for r in replies}) == 2  # Rasa never redelivers: one key per POST


async def test_callback_handoff_by_custom_payload(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    rasa.script(
        "agent",
        {"text": "Connecting you."},
        {"custom": {"handoff": True, "queue": "billing"}},
    )
    replies: Replies = []
    bot = callback_bot(rasa, http, replies)
    async with serve(bot) as url:
        rasa.callback_url = url
        rasa.callback_headers = {"Authorization": f"Bearer {CALLBACK_TOKEN}"}
        await bot.ask(question("agent", seq=2))
        await rasa.wait_callbacks(2)
    assert [r.reply.handoff for r in replies] == [False, True]
    assert replies[1].reply.handoff_data == {"queue": "billing"}
    assert replies[1].reply.messages[0].custom == {"handoff": True, "queue": "billing"}


async def test_callback_reply_to_seq_is_unknown_for_an_unasked_conversation(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    replies: Replies = []
    bot = callback_bot(rasa, http, replies)
    async with (
        serve(bot) as url,
        http.post(
            url,
            json={"recipient_id": "conv-other", "text": "Are you still there?"},
            params={"token": CALLBACK_TOKEN},
        ) as resp,
    ):
        assert resp.status == 200
    [callback] = replies
    assert callback.reply_to_seq is None
    assert callback.reply.messages == (BotMessage("Are you still there?"),)


@pytest.mark.parametrize(
    ("headers", "params", "status", "code"),
    [
        ({}, {}, 401, "unauthorized"),
        ({"Authorization": "Bearer "}, {}, 401, "unauthorized"),
        ({}, {"token": "wrong-token"}, 403, "bad_token"),
        ({"Authorization": "Bearer wrong-token"}, {"token": CALLBACK_TOKEN}, 403, "bad_token"),
        ({"Authorization": f"Basic {CALLBACK_TOKEN}"}, {}, 401, "unauthorized"),
    ],
)
async def test_callback_route_refuses_without_the_token(
    rasa: FakeRasa,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    params: dict[str, str],
    status: int,
    code: str,
) -> None:
    replies: Replies = []
    bot = callback_bot(rasa, http, replies)
    async with (
        serve(bot) as url,
        http.post(
            url, json={"recipient_id": CID, "text": "forged"}, headers=headers, params=params
        ) as resp,
    ):
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    assert replies == []


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'["an array"]',
        b'{"text": "no recipient"}',
        b'{"recipient_id": 42, "text": "a number"}',
        b'{"recipient_id": "", "text": "empty"}',
    ],
)
async def test_callback_route_refuses_bad_bodies(
    rasa: FakeRasa, http: aiohttp.ClientSession, body: bytes
) -> None:
    replies: Replies = []
    bot = callback_bot(rasa, http, replies)
    async with (
        serve(bot) as url,
        http.post(
            url,
            data=body,
            headers={
                "Authorization": f"Bearer {CALLBACK_TOKEN}",
                "Content-Type": "application/json",
            },
        ) as resp,
    ):
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] in ("malformed_json", "invalid_body")
    assert replies == []


async def test_callback_route_limits_the_body(rasa: FakeRasa, http: aiohttp.ClientSession) -> None:
    replies: Replies = []
    bot = make_bot(
        rasa, http, replies, mode="callback", callback_token=CALLBACK_TOKEN, max_callback_bytes=1024
    )
    async with serve(bot) as url:
        body = json.dumps({"recipient_id": CID, "text": "x" * 2000})
        async with http.post(url, data=body, params={"token": CALLBACK_TOKEN}) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"]["code"] == "too_large"
    assert replies == []


async def test_callback_with_nothing_to_show_is_accepted_and_ignored(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    replies: Replies = []
    bot = callback_bot(rasa, http, replies)
    async with (
        serve(bot) as url,
        http.post(
            url, json={"recipient_id": CID, "elements": []}, params={"token": CALLBACK_TOKEN}
        ) as resp,
    ):
        assert resp.status == 200
        assert await resp.json() == {"ok": True, "accepted": False}
    assert replies == []


@pytest.mark.parametrize(("script", "retryable"), [("fail", True), ("not_success", False)])
async def test_callback_webhook_errors(
    rasa: FakeRasa, http: aiohttp.ClientSession, script: str, retryable: bool
) -> None:
    if script == "fail":
        rasa.fail(500)
    else:
        rasa.answer_raw("[]")
    bot = callback_bot(rasa, http, [])
    with pytest.raises(BotError) as caught:
        await bot.ask(question("hi"))
    assert caught.value.retryable is retryable


async def test_rest_mode_serves_no_callback_route(
    rasa: FakeRasa, http: aiohttp.ClientSession
) -> None:
    assert make_bot(rasa, http).routes() == []
    with_token = make_bot(rasa, http, callback_token=CALLBACK_TOKEN)
    assert [r.path for r in with_token.routes()] == ["/connectors/bots/demo/callback"]


# through the service ---------------------------------------------------------------------------
async def rasa_service(
    make_service: Callable[..., Any], rasa: FakeRasa, **settings: Any
) -> Service:
    """A service whose bot ``demo`` (the one the default rules invite) is Rasa."""
    svc: Service = await make_service(
        connectors=[
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(
                name="demo",
                type="rasa",
                settings={
                    "base_url": rasa.base_url,
                    "api_token": API_TOKEN,
                    "retry_backoff": 0.01,
                    **settings,
                },
            ),
        ]
    )
    return svc


async def events_of(svc: Service, cid: str, kind: str) -> list[Any]:
    return [ev for ev, _ in await svc.store.events(cid) if ev.type == kind]


async def test_service_rasa_answers_the_customer(
    rasa: FakeRasa, make_service: Callable[..., Any]
) -> None:
    rasa.script(
        "hi",
        {"text": "Hello from Rasa!", "buttons": [{"title": "Prices", "payload": "/prices"}]},
        {"image": "https://example.com/hello.png"},
        {"custom": {"card": "welcome"}},
        intent="greet",
        confidence=0.99,
    )
    svc = await rasa_service(make_service, rasa, fetch_tracker=True)
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    frame = await customer.wait_message("bot", "Hello from Rasa!")
    assert frame["buttons"] == [{"id": "/prices", "title": "Prices"}]
    await customer.wait_for(lambda f: f.get("image") == "https://example.com/hello.png")
    conv = await svc.until(cid, lambda c: c.state == "bot")
    assert conv.state == "bot"
    [sent] = rasa.webhook_requests()
    assert sent.sender == cid and sent.message == "hi"
    assert sent.json["metadata"]["channel"] == "webchat"
    messages = await events_of(svc, cid, "bot.message")
    assert [m.data.get("custom") for m in messages] == [None, None, {"card": "welcome"}]
    assert {(m.data["intent"], m.data["confidence"]) for m in messages} == {("greet", 0.99)}


@pytest.mark.parametrize("signal", ["custom_payload", "intent"])
async def test_service_handoff_queues_and_the_bot_is_asked_no_more(
    rasa: FakeRasa, make_service: Callable[..., Any], signal: str
) -> None:
    rasa.script("hi", {"text": "Hello from Rasa!"})
    if signal == "custom_payload":
        rasa.script(
            "agent",
            {"text": "Connecting you to an agent now."},
            {"custom": {"handoff": True, "queue": "billing", "reason": "user_request"}},
        )
    else:
        rasa.script("agent", {"text": "Connecting you to an agent now."}, intent="human_handoff")
    svc = await rasa_service(make_service, rasa, fetch_tracker=signal == "intent")
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    await customer.say("agent")
    await customer.wait_message("bot", "Connecting you to an agent now.")
    await customer.wait_message("controller", "You are in the queue")
    conv = await svc.until(cid, lambda c: c.state == "queued")
    assert conv.queue == "support"
    [handoff] = await events_of(svc, cid, "bot.handoff")
    expected = (
        {"queue": "billing", "reason": "user_request"}
        if signal == "custom_payload"
        else {"reason": "human_handoff"}
    )
    assert {k: handoff.data.get(k) for k in expected} == expected
    await customer.say("hello? anyone?")
    await svc.settle()
    assert [r.message for r in rasa.webhook_requests()] == ["hi", "agent"]
    assert customer.texts("bot") == ["Hello from Rasa!", "Connecting you to an agent now."]


@pytest.mark.parametrize("failure", ["status_500", "timeout"])
async def test_service_rasa_failure_queues_the_customer(
    rasa: FakeRasa, make_service: Callable[..., Any], failure: str
) -> None:
    if failure == "status_500":
        rasa.fail(500, times=None)
    else:
        rasa.hold()
    svc = await rasa_service(make_service, rasa, max_attempts=1, timeout=0.3)
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = str(ack["conversation_id"])
    await customer.wait_message("controller", "Our assistant is not available")
    await svc.until(cid, lambda c: c.state == "queued")
    [failed] = await events_of(svc, cid, "bot.failed")
    assert failed.data["reason"] == ("unavailable" if failure == "status_500" else "timeout")
    assert len(rasa.webhook_requests()) == 1  # max_attempts=1: asked once
    assert customer.texts("bot") == []


async def test_service_fallback_intents_in_a_row_are_a_failed_bot(
    rasa: FakeRasa, make_service: Callable[..., Any]
) -> None:
    svc = await rasa_service(make_service, rasa, fetch_tracker=True)
    customer = await svc.customer()
    cid = await customer.start_with_bot("blorp")
    await customer.wait_message("bot", "Sorry, I did not get that.")
    await svc.until(cid, lambda c: c.attributes.get("bot_fallbacks") == "1")
    assert await events_of(svc, cid, "bot.failed") == []
    await customer.say("blorp")  # the second fallback in a row (the default limit)
    await svc.until(cid, lambda c: c.state == "queued")
    [failed] = await events_of(svc, cid, "bot.failed")
    assert failed.data["reason"] == "fallback" and failed.data["intent"] == "nlu_fallback"


async def test_service_callback_mode_end_to_end(
    rasa: FakeRasa, make_service: Callable[..., Any]
) -> None:
    rasa.script(
        "hi",
        {
            "text": "Hello through the callback!",
            "buttons": [{"title": "Agent", "payload": "agent"}],
        },
    )
    rasa.script(
        "agent",
        {"text": "Connecting you."},
        {"custom": {"handoff": True, "queue": "billing"}},
    )
    svc = await rasa_service(make_service, rasa, mode="callback", callback_token=CALLBACK_TOKEN)
    rasa.callback_url = f"{svc.base_url}/connectors/bots/demo/callback?token={CALLBACK_TOKEN}"
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    frame = await customer.wait_message("bot", "Hello through the callback!")
    assert frame["buttons"] == [{"id": "agent", "title": "Agent"}]
    [asked] = await events_of(svc, cid, "customer.message")
    [answer] = await events_of(svc, cid, "bot.message")
    assert answer.data["reply_to_seq"] == asked.seq

    await customer.say("agent")
    await customer.wait_message("bot", "Connecting you.")
    await customer.wait_message("controller", "You are in the queue")
    await svc.until(cid, lambda c: c.state == "queued")
    [handoff] = await events_of(svc, cid, "bot.handoff")
    assert handoff.data["queue"] == "billing"
    assert [p.status for p in rasa.callbacks] == [200, 200, 200]


async def test_service_callback_route_refuses_forgeries_and_unknown_conversations(
    rasa: FakeRasa, make_service: Callable[..., Any]
) -> None:
    svc = await rasa_service(make_service, rasa, mode="callback", callback_token=CALLBACK_TOKEN)
    assert svc.http is not None
    url = f"{svc.base_url}/connectors/bots/demo/callback"
    body = {"recipient_id": "no-such-conversation", "text": "hello"}
    async with svc.http.post(url, json=body) as resp:
        assert resp.status == 401
    async with svc.http.post(url, json=body, params={"token": "x" * 20}) as resp:
        assert resp.status == 403
    async with svc.http.post(url, json=[body], params={"token": CALLBACK_TOKEN}) as resp:
        assert resp.status == 400
    async with svc.http.post(url, json=body, params={"token": CALLBACK_TOKEN}) as resp:
        assert resp.status == 404
        assert (await resp.json())["error"]["code"] == "unknown_conversation"
    assert await svc.store.count("events") == 0
