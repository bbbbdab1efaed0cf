"""The Amazon Lex V2 bot against the fake Lex runtime (SigV4 checked), on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
from botocore.retries.standard import ExponentialBackoff

from connectors.base import (
    BotButton,
    BotMessage,
    BotRequest,
    ConnectorContext,
    ConnectorTypes,
    build_connector,
    safe_session_id,
)
from connectors.lex import LexBot, LexSettings
from controller.clock import ManualClock
from controller.errors import BotError, ConfigError
from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing_lex import (
    TEST_ACCESS_KEY,
    TEST_ALIAS_ID,
    TEST_BOT_ID,
    TEST_REGION,
    TEST_SECRET_KEY,
    FakeLex,
    LexSession,
    lex_answer,
    plain,
)

CONVERSATION = "cv_0193abc"


@pytest.fixture
async def fake() -> AsyncIterator[FakeLex]:
    server = await FakeLex().start()
    yield server
    await server.stop()


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """botocore's retries without their jittered sleeps (up to seconds for throttling)."""
    monkeypatch.setattr(ExponentialBackoff, "delay_amount", lambda self, context: 0)


def lex_settings(fake: FakeLex, **overrides: Any) -> dict[str, Any]:
    return {
        "region": TEST_REGION,
        "bot_id": TEST_BOT_ID,
        "bot_alias_id": TEST_ALIAS_ID,
        "aws_access_key_id": TEST_ACCESS_KEY,
        "aws_secret_access_key": TEST_SECRET_KEY,
        "endpoint_url": fake.base_url,
        "locales": {"en": "en_US", "pt": "pt_PT"},
        **overrides,
    }


async def _no_submit(events: Any) -> list[Any]:
    raise AssertionError("the lex bot submits nothing")


def context() -> ConnectorContext:
    return ConnectorContext(
        submit=_no_submit, clock=ManualClock(), session_secret="s", allowed_origins=[]
    )


MakeBot = Callable[..., Any]


@pytest.fixture
async def make_bot(fake: FakeLex) -> AsyncIterator[MakeBot]:
    started: list[LexBot] = []

    async def make(**overrides: Any) -> LexBot:
        bot = build_connector(
            "demo", "lex", lex_settings(fake, **overrides), context(), ConnectorTypes()
        )
        assert isinstance(bot, LexBot)
        await bot.start()
        started.append(bot)
        return bot

    yield make
    for bot in started:
        await bot.stop()


def ask(text: str, conversation: str = CONVERSATION, **kw: Any) -> BotRequest:
    values: dict[str, Any] = {
        "language": "en",
        "mode": "direct",
        "reply_to_seq": 1,
        "idempotency_key": "k1",
        "channel": "webchat",
        **kw,
    }
    return BotRequest(conversation_id=conversation, text=text, **values)


# the happy path -------------------------------------------------------------------------------
async def test_answer_with_card_becomes_text_buttons_and_image(
    fake: FakeLex, make_bot: MakeBot
) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("hi there", attributes={"tier": "gold"}))
    assert reply.messages == (
        BotMessage(text="Hello! I am the Lex bot."),
        BotMessage(
            text="How can I help?\nPick one",
            buttons=(
                BotButton(title="Track order", payload="track my order"),
                BotButton(title="Talk to a person", payload="agent"),
            ),
            image="https://example.com/help.png",
        ),
    )
    assert (reply.intent, reply.confidence) == ("Greeting", 0.97)
    assert not reply.handoff and not reply.ended and reply.failed is None
    assert reply.attributes == {"greeted": "true"}

    [request] = fake.answered()
    assert request.path == (
        f"/bots/{TEST_BOT_ID}/botAliases/{TEST_ALIAS_ID}/botLocales/en_US/sessions/{CONVERSATION}/text"
    )
    assert request.text == "hi there"
    assert request.session_attributes == {"tier": "gold", "channel": "webchat"}
    assert request.json["requestAttributes"] == {"x-convctl-mode": "direct"}


async def test_request_is_sigv4_signed_and_verified(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    await bot.ask(ask("hi"))
    [request] = fake.requests
    assert request.status == 200  # the fake recomputed the signature and it matched
    date = request.headers["X-Amz-Date"]
    assert re.fullmatch(r"\d{8}T\d{6}Z", date)
    credential = f"Credential={TEST_ACCESS_KEY}/{date[:8]}/{TEST_REGION}/lex/aws4_request"
    assert request.authorization.startswith(f"AWS4-HMAC-SHA256 {credential}, SignedHeaders=")
    assert "host" in request.authorization.split("SignedHeaders=")[1].split(",")[0].split(";")


async def test_fake_refuses_a_tampered_request(fake: FakeLex, make_bot: MakeBot) -> None:
    """The signature check is real: the same signed headers over another body are refused."""
    bot = await make_bot()
    await bot.ask(ask("hi"))
    [signed] = fake.requests
    keep = ("Authorization", "X-Amz-Date", "Content-Type")
    headers = {k: signed.headers[k] for k in keep}
    url = fake.base_url + signed.path
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=b'{"text": "agent"}', headers=headers) as resp,
    ):
        assert resp.status == 403
        assert resp.headers["x-amzn-ErrorType"] == "InvalidSignatureException"
        assert "signature" in (await resp.json())["message"]


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"aws_secret_access_key": "not-the-test-secret"}, "InvalidSignatureException"),
        ({"aws_access_key_id": "AKIAUNKNOWN000000000"}, "UnrecognizedClientException"),
        ({"region": "us-east-1"}, "InvalidSignatureException"),
    ],
)
async def test_bad_credentials_are_not_retryable(
    fake: FakeLex, make_bot: MakeBot, overrides: dict[str, Any], code: str
) -> None:
    bot = await make_bot(**overrides)
    with pytest.raises(BotError) as caught:
        await bot.ask(ask("hi"))
    assert not caught.value.retryable
    assert code in caught.value.message
    assert [(r.status, r.error) for r in fake.requests] == [(403, code)]  # asked once


async def test_unsafe_conversation_id_is_mapped_to_a_lex_session_id(
    fake: FakeLex, make_bot: MakeBot
) -> None:
    bot = await make_bot()
    conversation = "wa+351910000001@business/x"
    await bot.ask(ask("hi", conversation=conversation))
    [request] = fake.answered()
    assert request.session_id == safe_session_id(conversation, 100)
    assert re.fullmatch(r"[0-9a-zA-Z._:-]{2,100}", request.session_id)
    # Characters Lex allows but URLs encode (``:``) are signed and verified as well.
    await bot.ask(ask("hi", conversation="wa:351.91-0"))
    assert fake.requests[-1].status == 200 and fake.requests[-1].session_id == "wa:351.91-0"


async def test_language_picks_the_locale(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    await bot.ask(ask("hi", language="pt-BR"))
    await bot.ask(ask("hi", language="de"))
    assert [r.locale_id for r in fake.answered()] == ["pt_PT", "en_US"]


# handoff, fallback, end -----------------------------------------------------------------------
async def test_handoff_intent_with_attributes(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("I want an agent please", attributes={"tier": "gold"}))
    assert reply.handoff and reply.failed is None and not reply.ended
    assert reply.messages == (BotMessage(text="Sure, connecting you to an agent."),)
    assert (reply.intent, reply.confidence) == ("TalkToAgent", 0.93)
    assert reply.handoff_data == {"queue": "support", "reason": "customer asked"}
    # The handoff markers are not kept on the conversation, nor sent to Lex next turn.
    assert reply.attributes == {}
    await bot.ask(ask("hi", attributes={"tier": "gold", "handoff": "true"}))
    assert fake.requests[-1].session_attributes == {"tier": "gold", "channel": "webchat"}
    session = fake.session(CONVERSATION)
    assert session is not None and "handoff" not in session.attributes


async def test_handoff_by_session_attribute_alone(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot(handoff_intents=[])
    reply = await bot.ask(ask("agent"))
    assert reply.handoff and reply.handoff_data["queue"] == "support"


async def test_handoff_by_custom_payload(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("transfer me"))
    assert reply.handoff and reply.intent == "BillingQuestion"
    assert reply.handoff_data == {"queue": "billing", "reason": "billing question"}
    assert reply.messages[0] == BotMessage(text="Let me transfer you to billing.")
    assert reply.messages[1].custom == {
        "handoff": True,
        "queue": "billing",
        "reason": "billing question",
    }
    assert not reply.messages[1].shown()


async def test_custom_payload_and_ssml(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("survey"))
    assert reply.messages == (BotMessage(custom={"survey": "nps", "scale": 10}),)
    assert not reply.handoff
    reply = await bot.ask(ask("speak"))
    assert reply.messages == (BotMessage(text="Fish & chips today"),)

    def not_json(session: LexSession, text: str) -> dict[str, Any]:
        return lex_answer("Raw", messages=[{"contentType": "CustomPayload", "content": "a|b"}])

    fake.answer_with(not_json)
    reply = await bot.ask(ask("anything"))
    assert reply.messages == (BotMessage(custom={"content": "a|b"}),)


async def test_fallback_is_failed(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("blorp"))
    assert reply.failed == "fallback" and not reply.handoff
    assert (reply.intent, reply.confidence) == ("AMAZON.FallbackIntent", None)
    assert reply.messages == (BotMessage(text="Sorry, I did not understand."),)
    assert reply.attributes == {"fallbackCount": "1"}


async def test_failed_intent_is_failed(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("this is broken"))
    assert reply.failed == "intent_failed" and reply.intent == "OrderRefund"


async def test_slots_and_slot_elicitation(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("track my order"))
    assert reply.slots == {"OrderNumber": None} and reply.intent == "TrackOrder"
    reply = await bot.ask(ask("order 42"))
    assert reply.slots == {"OrderNumber": "42"}
    assert reply.messages == (BotMessage(text="Order 42 is on its way."),)


async def test_close_of_an_end_intent_ends(fake: FakeLex, make_bot: MakeBot) -> None:
    default = await make_bot()
    assert not (await default.ask(ask("bye"))).ended
    ending = await make_bot(end_intents=["Goodbye"])
    reply = await ending.ask(ask("bye", conversation="cv_other"))
    assert reply.ended and reply.messages == (BotMessage(text="Goodbye!"),)


async def test_answer_without_messages(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    fake.answer_with(lambda session, text: lex_answer("Silent", action="Delegate"))
    reply = await bot.ask(ask("hi"))
    assert reply.messages == () and reply.intent == "Silent"


# session attributes ---------------------------------------------------------------------------
async def test_session_attributes_round_trip_over_two_turns(
    fake: FakeLex, make_bot: MakeBot
) -> None:
    bot = await make_bot()
    conversation_attributes = {"tier": "gold"}
    first = await bot.ask(ask("hello", attributes=conversation_attributes))
    assert first.attributes == {"greeted": "true"}
    conversation_attributes |= first.attributes  # what the service does with them
    second = await bot.ask(ask("track order 77", attributes=conversation_attributes))
    assert fake.requests[-1].session_attributes == {
        "tier": "gold",
        "greeted": "true",
        "channel": "webchat",
    }
    assert second.attributes == {"lastOrder": "77"}
    session = fake.session(CONVERSATION)
    assert session is not None
    assert session.attributes == {
        "tier": "gold",
        "greeted": "true",
        "channel": "webchat",
        "lastOrder": "77",
    }


async def test_attribute_changed_by_the_bot_comes_back(fake: FakeLex, make_bot: MakeBot) -> None:
    def upgrade(session: LexSession, text: str) -> dict[str, Any]:
        session.attributes["tier"] = "platinum"
        return lex_answer("Upgrade", messages=[plain("Done.")])

    fake.answer_with(upgrade)
    bot = await make_bot()
    reply = await bot.ask(ask("upgrade me", attributes={"tier": "gold", "city": "Porto"}))
    assert reply.attributes == {"tier": "platinum"}


# failures -------------------------------------------------------------------------------------
async def test_throttled_twice_then_answered_by_botocore_retries(
    fake: FakeLex, make_bot: MakeBot, no_backoff: None
) -> None:
    bot = await make_bot(botocore_max_attempts=3)
    fake.throttle(times=2)
    reply = await bot.ask(ask("hi"))
    assert reply.intent == "Greeting"
    assert [(r.status, r.error) for r in fake.requests] == [
        (429, "ThrottlingException"),
        (429, "ThrottlingException"),
        (200, None),
    ]
    assert "attempt=3; max=3" in fake.requests[2].headers["amz-sdk-request"]


async def test_throttled_beyond_botocore_attempts_is_retryable(
    fake: FakeLex, make_bot: MakeBot, no_backoff: None
) -> None:
    bot = await make_bot()  # botocore_max_attempts defaults to 2
    fake.throttle(times=None)
    with pytest.raises(BotError) as caught:
        await bot.ask(ask("hi"))
    assert caught.value.retryable and "ThrottlingException" in caught.value.message
    assert [r.status for r in fake.requests] == [429, 429]


@pytest.mark.parametrize(
    ("status", "code", "retryable", "attempts"),
    [
        (500, "InternalServerException", True, 2),
        (502, "BadGatewayException", True, 2),
        (409, "ConflictException", True, 1),
        (424, "DependencyFailedException", True, 1),
        (400, "ValidationException", False, 1),
        (403, "AccessDeniedException", False, 1),
        (404, "ResourceNotFoundException", False, 1),
    ],
)
async def test_lex_errors(
    fake: FakeLex,
    make_bot: MakeBot,
    no_backoff: None,
    status: int,
    code: str,
    retryable: bool,
    attempts: int,
) -> None:
    bot = await make_bot()
    fake.fail(status=status, code=code, times=None)
    with pytest.raises(BotError) as caught:
        await bot.ask(ask("hi"))
    assert caught.value.retryable is retryable
    assert code in caught.value.message
    assert len(fake.requests) == attempts  # botocore retries only 5xx and throttling


async def test_locale_not_built_is_not_retryable(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot(locales={"fr": "fr_FR"})
    with pytest.raises(BotError) as caught:
        await bot.ask(ask("bonjour", language="fr"))
    assert not caught.value.retryable and "ResourceNotFoundException" in caught.value.message


async def test_timeout_is_retryable_and_not_resent(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot(timeout=1.0)
    fake.hold()
    asking = asyncio.create_task(bot.ask(ask("hi")))
    await fake.wait_for(lambda f: f.held == 1)
    with pytest.raises(BotError) as caught:
        await asking
    assert caught.value.retryable and caught.value.message.startswith("timeout: ")
    assert fake.held == 1  # Lex got the turn once; botocore did not send it again
    fake.release()
    await fake.wait_for(lambda f: len(f.requests) == 1 and f.held == 0)
    assert fake.max_held == 1


async def test_connection_refused_is_retryable(
    fake: FakeLex, make_bot: MakeBot, no_backoff: None
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    bot = await make_bot(endpoint_url=f"http://127.0.0.1:{port}")
    with pytest.raises(BotError) as caught:
        await bot.ask(ask("hi"))
    assert caught.value.retryable


@pytest.mark.parametrize(
    "body",
    [
        b"<html>upstream proxy error</html>",
        b'{"messages": "oops", "sessionState": {}}',
        b'{"sessionState": {"intent": {"state": "Fulfilled"}}}',
        b'{"messages": [{"content": "no content type"}], "sessionState": {}}',
        b'{"messages": []}',
    ],
)
async def test_malformed_answer_is_not_retryable(
    fake: FakeLex, make_bot: MakeBot, body: bytes
) -> None:
    bot = await make_bot()
    fake.malformed, fake.malformed_body = 1, body
    with pytest.raises(BotError) as caught:
        await bot.ask(ask("hi"))
    assert not caught.value.retryable and "malformed" in caught.value.message
    assert len(fake.requests) == 1


# the connector itself -------------------------------------------------------------------------
async def test_one_turn_at_a_time_per_session(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    fake.hold()
    first = asyncio.create_task(bot.ask(ask("hi")))
    second = asyncio.create_task(bot.ask(ask("track order 1")))
    other = asyncio.create_task(bot.ask(ask("hi", conversation="cv_other")))
    await fake.wait_for(lambda f: f.held == 2)  # one per conversation
    session = safe_session_id(CONVERSATION, 100)
    assert bot._waiting[session] == 2  # the second turn waits for the first
    fake.release()
    replies = await asyncio.gather(first, second, other)
    assert [r.intent for r in replies] == ["Greeting", "TrackOrder", "Greeting"]
    assert fake.max_held == 2 and bot._locks == {}


async def test_blank_text_asks_nothing(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    reply = await bot.ask(ask("   "))
    assert reply.messages == () and fake.requests == []


async def test_long_text_is_cut_to_lex_limit(fake: FakeLex, make_bot: MakeBot) -> None:
    bot = await make_bot()
    await bot.ask(ask("x" * 2000))
    [request] = fake.answered()
    assert request.text == "x" * 1024


async def test_ask_before_start(fake: FakeLex) -> None:
    settings = LexSettings.model_validate(lex_settings(fake))
    bot = LexBot("demo", settings, context())
    with pytest.raises(BotError):
        await bot.ask(ask("hi"))


@pytest.mark.parametrize(
    "overrides",
    [
        {"bot_id": "SHORT"},
        {"bot_id": "ABCDE-1234"},
        {"aws_secret_access_key": "change-me"},
        {"aws_secret_access_key": None},
        {"locale_id": "english"},
        {"locales": {"en": "English"}},
        {"unknown": 1},
    ],
)
def test_bad_settings_are_refused(fake: FakeLex, overrides: dict[str, Any]) -> None:
    raw = lex_settings(fake, **overrides)
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError):
        build_connector("demo", "lex", raw, context(), ConnectorTypes())


def test_default_credential_chain_and_secrets_hidden(fake: FakeLex) -> None:
    raw = lex_settings(fake)
    del raw["aws_access_key_id"], raw["aws_secret_access_key"]
    settings = LexSettings.model_validate(raw)
    assert settings.aws_access_key_id is None
    shown = repr(LexSettings.model_validate(lex_settings(fake)))
    assert TEST_SECRET_KEY not in shown and TEST_ACCESS_KEY not in shown


# end to end: the web chat, the service and its default rules, and Lex ---------------------------
async def lex_service(
    make_service: Callable[..., Any], clock: ManualClock, fake: FakeLex, **overrides: Any
) -> Service:
    # The fake is set up first so it is torn down last: the service stops before it.
    svc: Service = await make_service(
        clock=clock,
        connectors=[
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(name="demo", type="lex", settings=lex_settings(fake, **overrides)),
        ],
    )
    return svc


async def events_of(svc: Service, cid: str, kind: str) -> list[Any]:
    return [ev for ev, _ in await svc.store.events(cid) if ev.type == kind]


async def test_web_chat_customer_talks_to_lex(
    fake: FakeLex, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc = await lex_service(make_service, clock, fake)
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    card = await customer.wait_message("bot", "How can I help?")
    assert card["buttons"] == [
        {"id": "track my order", "title": "Track order"},
        {"id": "agent", "title": "Talk to a person"},
    ]
    assert card["image"] == "https://example.com/help.png"
    assert customer.texts("bot")[0] == "Hello! I am the Lex bot."
    # Lex's session attribute is kept on the conversation...
    conv = await svc.until(cid, lambda c: c.attributes.get("greeted") == "true")
    assert conv.state == "bot"
    [first] = fake.answered()
    assert first.session_id == safe_session_id(cid, 100)
    assert first.session_attributes is not None
    assert first.session_attributes["channel"] == "webchat"
    [message] = (await events_of(svc, cid, "bot.message"))[:1]
    assert (message.data["intent"], message.data["confidence"]) == ("Greeting", 0.97)

    # ... and sent back with the next turn, here a tapped button (its value goes to Lex).
    await customer.say("Track order", payload="track my order")
    await customer.wait_message("bot", "What is your order number?")
    second = fake.answered()[1]
    assert second.text == "track my order"
    assert second.session_attributes is not None
    assert second.session_attributes["greeted"] == "true"
    await customer.say("it is 42")
    await customer.wait_message("bot", "Order 42 is on its way.")
    await svc.until(cid, lambda c: c.attributes.get("lastOrder") == "42")
    slots = [e.data["slots"] for e in await events_of(svc, cid, "bot.message")]
    assert slots[-1] == {"OrderNumber": "42"}


async def test_agent_request_hands_over_to_the_queue(
    fake: FakeLex, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc = await lex_service(make_service, clock, fake)
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    await customer.say("I want an agent")
    await customer.wait_message("bot", "connecting you to an agent")
    conv = await svc.until(cid, lambda c: c.state == "queued")
    assert conv.queue == "support"
    [handoff] = await events_of(svc, cid, "bot.handoff")
    assert handoff.data["queue"] == "support" and handoff.data["reason"] == "customer asked"
    assert handoff.data["intent"] == "TalkToAgent"
    assert "handoff" not in conv.attributes  # a later bot must not hand over at once
    await customer.wait_message("controller", "You are in the queue")
    # The bot left: the customer's next message is not asked of Lex.
    asked = len(fake.requests)
    await customer.say("hello?")
    await svc.settle()
    assert len(fake.requests) == asked
    assert customer.texts("bot") == [
        "Hello! I am the Lex bot.",
        "How can I help?\nPick one",
        "Sure, connecting you to an agent.",
    ]


async def test_fallbacks_in_a_row_fail_to_a_person(
    fake: FakeLex, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc = await lex_service(make_service, clock, fake)  # fallbacks_before_failure: 2
    customer = await svc.customer()
    cid = await customer.start_with_bot("blorp")
    assert customer.texts("bot") == ["Sorry, I did not understand."]
    conv = await svc.until(cid, lambda c: c.attributes.get("fallbackCount") == "1")
    assert conv.state == "bot" and not await events_of(svc, cid, "bot.failed")
    await customer.say("blorp again")
    conv = await svc.until(cid, lambda c: c.state == "queued")
    [failed] = await events_of(svc, cid, "bot.failed")
    assert failed.data["reason"] == "fallback" and failed.data["intent"] == "AMAZON.FallbackIntent"
    assert conv.attributes.get("fallbackCount") == "2"


async def test_lex_refusing_the_question_fails_to_a_person(
    fake: FakeLex, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc = await lex_service(make_service, clock, fake, aws_secret_access_key="wrong-secret-key")
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = str(ack["conversation_id"])
    await svc.until(cid, lambda c: c.state == "queued")
    [failed] = await events_of(svc, cid, "bot.failed")
    assert failed.data["reason"] == "rejected"
    assert "InvalidSignatureException" in failed.data["error"]
    assert [r.status for r in fake.requests] == [403]  # not retryable: asked once
    assert not customer.texts("bot")


@pytest.mark.parametrize("trouble", ["timeout", "malformed"])
async def test_slow_or_garbled_lex_fails_to_a_person(
    fake: FakeLex, make_service: Callable[..., Any], clock: ManualClock, trouble: str
) -> None:
    svc = await lex_service(make_service, clock, fake, timeout=0.2, max_attempts=1)
    if trouble == "timeout":
        fake.hold()
    else:
        fake.malformed = 1
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = str(ack["conversation_id"])
    conv = await svc.until(cid, lambda c: c.state == "queued")
    assert conv.queue == "support"
    [failed] = await events_of(svc, cid, "bot.failed")
    assert failed.data["reason"] == trouble
    fake.release()
    assert not customer.texts("bot")


async def test_goodbye_of_an_end_intent_closes(
    fake: FakeLex, make_service: Callable[..., Any], clock: ManualClock
) -> None:
    svc = await lex_service(make_service, clock, fake, end_intents=["Goodbye"])
    customer = await svc.customer()
    cid = await customer.start_with_bot("hi")
    await customer.say("bye")
    await customer.wait_message("bot", "Goodbye!")
    conv = await svc.until(cid, lambda c: c.state == "closed")
    assert conv.close_reason == "bot_ended"
