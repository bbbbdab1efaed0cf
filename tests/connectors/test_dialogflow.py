"""Dialogflow ES and CX bots against the fake Dialogflow (and its token endpoint) on 127.0.0.1.

The service-account key is made in each test (a fresh RSA key); the token comes from the
fake's ``/token``, which verifies the JWT assertion the way Google does.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from connectors.base import (
    BotButton,
    BotMessage,
    BotRequest,
    ConnectorContext,
    ConnectorTypes,
    build_connector,
)
from connectors.dialogflow import DialogflowBot, session_id
from controller.clock import ManualClock
from controller.errors import BotError, ConfigError
from controller.settings import ConnectorInstance
from controller.testing import Service
from controller.testing_dialogflow import FakeDialogflow, cx_result, es_result

CID = "cv_0193aaaabbbbccccdddd0011"


@pytest.fixture
async def fake() -> AsyncIterator[FakeDialogflow]:
    server = await FakeDialogflow().start()
    yield server
    await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def key_file(fake: FakeDialogflow, tmp_path: Path) -> Path:
    return fake.service_account_file(tmp_path)


Make = Callable[..., DialogflowBot]


@pytest.fixture
async def make_bot(
    fake: FakeDialogflow, http: aiohttp.ClientSession, key_file: Path, clock: ManualClock
) -> AsyncIterator[Make]:
    """Build bots through the entry points, as the service does; stop them afterwards."""
    built: list[DialogflowBot] = []

    def make(type_name: str = "dialogflow_es", **kw: Any) -> DialogflowBot:
        settings: dict[str, Any] = {
            "project_id": fake.project_id,
            "base_url": fake.base_url,
            "credentials_file": str(key_file),
        }
        if type_name == "dialogflow_cx":
            settings["agent_id"] = fake.agent_id
        settings.update(kw)
        context = ConnectorContext(
            submit=_no_submit,
            clock=clock,
            session_secret="test-session-secret",
            allowed_origins=[],
            http=http,
        )
        raw = {k: v for k, v in settings.items() if v is not None}
        bot = build_connector("demo", type_name, raw, context, ConnectorTypes())
        assert isinstance(bot, DialogflowBot)
        built.append(bot)
        return bot

    yield make
    for bot in built:
        await bot.stop()


async def _no_submit(events: Any) -> list[Any]:
    raise AssertionError("a bot submits nothing")


def ask(
    text: str, *, cid: str = CID, language: str = "en", attributes: dict[str, str] | None = None
) -> BotRequest:
    return BotRequest(
        conversation_id=cid,
        text=text,
        language=language,
        mode="direct",
        reply_to_seq=1,
        idempotency_key=f"{cid}:1",
        channel="webchat",
        customer_id="cu_1",
        attributes=attributes or {},
    )


# tokens ---------------------------------------------------------------------------------------
async def test_token_from_the_service_account_is_verified_and_cached(
    fake: FakeDialogflow, make_bot: Make
) -> None:
    bot = make_bot()
    await bot.ask(ask("hi"))
    await bot.ask(ask("hours"))
    assert fake.tokens_issued == 1
    [grant] = [r for r in fake.requests if r.kind == "token"]
    assert grant.status == 200
    assert grant.json["grant_type"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert grant.json["assertion"].count(".") == 2  # a signed JWT, checked by the fake
    first, second = fake.detect_requests()
    assert first.status == second.status == 200
    assert first.token == second.token and first.token and first.token.startswith("ya29.")


async def test_token_is_renewed_when_the_clock_nears_its_expiry(
    fake: FakeDialogflow, make_bot: Make, clock: ManualClock
) -> None:
    bot = make_bot()
    await bot.ask(ask("hi"))
    clock.advance(fake.token_lifetime - 400)  # more than 5 minutes left: kept
    await bot.ask(ask("hi"))
    assert fake.tokens_issued == 1
    clock.advance(200)  # less than 5 minutes left: renewed before it can expire on the way
    await bot.ask(ask("hi"))
    assert fake.tokens_issued == 2
    tokens = [r.token for r in fake.detect_requests()]
    assert tokens[0] == tokens[1] != tokens[2]


async def test_a_401_renews_the_token_once_and_asks_again(
    fake: FakeDialogflow, make_bot: Make
) -> None:
    bot = make_bot()
    await bot.ask(ask("hi"))
    fake.expire_tokens()
    reply = await bot.ask(ask("hi"))
    assert reply.intent == "Default Welcome Intent"
    assert fake.tokens_issued == 2
    assert [r.status for r in fake.detect_requests()] == [200, 401, 200]


async def test_a_second_401_is_not_retried(fake: FakeDialogflow, make_bot: Make) -> None:
    fake.token_lifetime = 0  # every token is dead on arrival
    bot = make_bot()
    with pytest.raises(BotError) as err:
        await bot.ask(ask("hi"))
    assert not err.value.retryable
    assert err.value.message.startswith("rejected: dialogflow HTTP 401 UNAUTHENTICATED")
    assert fake.tokens_issued == 2
    assert [r.status for r in fake.detect_requests()] == [401, 401]


async def test_concurrent_questions_share_one_token_request(
    fake: FakeDialogflow, make_bot: Make
) -> None:
    bot = make_bot()
    replies = await asyncio.gather(*(bot.ask(ask("hi", cid=f"cv_{i:04d}")) for i in range(5)))
    assert all(r.intent == "Default Welcome Intent" for r in replies)
    assert fake.tokens_issued == 1
    assert len([r for r in fake.requests if r.kind == "token"]) == 1


async def test_a_refresh_outlives_a_cancelled_question(
    fake: FakeDialogflow, make_bot: Make
) -> None:
    """A question cancelled (its timeout) while the token is fetched wastes no token."""
    bot = make_bot()
    fake.hold(tokens=True)
    question = asyncio.create_task(bot.ask(ask("hi")))
    await fake.wait_held()
    question.cancel()
    with pytest.raises(asyncio.CancelledError):
        await question
    fake.release()
    assert (await bot.ask(ask("hi"))).intent == "Default Welcome Intent"
    assert fake.tokens_issued == 1
    assert len([r for r in fake.requests if r.kind == "token"]) == 1


@pytest.mark.parametrize("forged", [False, True], ids=["unknown-account", "wrong-key"])
async def test_a_key_google_does_not_know_is_refused(
    fake: FakeDialogflow, make_bot: Make, tmp_path: Path, forged: bool
) -> None:
    if forged:  # the account exists, but the file's private key is not its key
        (tmp_path / "real").mkdir()
        real = fake.service_account_file(tmp_path / "real")
        email = json.loads(real.read_text())["client_email"]
        bad = fake.service_account_file(tmp_path, email=email, register=False)
    else:
        bad = fake.service_account_file(tmp_path, register=False)
    bot = make_bot(credentials_file=str(bad))
    with pytest.raises(BotError) as err:
        await bot.ask(ask("hi"))
    assert not err.value.retryable
    assert err.value.message.startswith("rejected: token refused")
    [grant] = [r for r in fake.requests if r.kind == "token"]
    assert grant.status == 400
    assert fake.tokens_issued == 0 and fake.detect_requests() == []


async def test_a_static_access_token_is_used_as_is(fake: FakeDialogflow, make_bot: Make) -> None:
    fake.static_tokens.add("local-test-token")
    bot = make_bot(credentials_file=None, access_token="local-test-token")
    await bot.ask(ask("hi"))
    [req] = fake.detect_requests()
    assert req.token == "local-test-token"
    assert fake.tokens_issued == 0
    fake.static_tokens.clear()
    with pytest.raises(BotError) as err:  # nothing to renew: a config error
        await bot.ask(ask("hi"))
    assert not err.value.retryable
    assert len(fake.detect_requests()) == 2


# settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        {},  # no credentials
        {"access_token": "t0k", "credentials_file": "/x.json"},  # both
        {"access_token": "change-me"},  # a placeholder
        {"access_token": "t0k", "time_zone": "Europe/Atlantis"},
        {"access_token": "t0k", "location": "Europe West"},
        {"access_token": "t0k", "surprise": 1},
        {"credentials_file": "/nonexistent/key.json"},
    ],
)
def test_bad_settings_refuse_to_start(settings: dict[str, Any]) -> None:
    context = ConnectorContext(
        submit=_no_submit, clock=ManualClock(), session_secret="s", allowed_origins=[]
    )
    with pytest.raises(ConfigError):
        build_connector(
            "demo",
            "dialogflow_es",
            {"project_id": "acme-bot", **settings},
            context,
            ConnectorTypes(),
        )


@pytest.mark.parametrize(
    ("type_name", "extra", "url"),
    [
        (
            "dialogflow_es",
            {},
            "https://dialogflow.googleapis.com/v2/projects/acme-bot/agent/sessions/s1:detectIntent",
        ),
        (
            "dialogflow_es",
            {"location": "europe-west2"},
            "https://europe-west2-dialogflow.googleapis.com/v2/projects/acme-bot/locations/"
            "europe-west2/agent/sessions/s1:detectIntent",
        ),
        (
            "dialogflow_es",
            {"environment": "prod"},
            "https://dialogflow.googleapis.com/v2/projects/acme-bot/agent/environments/prod/"
            "users/-/sessions/s1:detectIntent",
        ),
        (
            "dialogflow_cx",
            {"agent_id": "a-1"},
            "https://dialogflow.googleapis.com/v3/projects/acme-bot/locations/global/agents/a-1/"
            "sessions/s1:detectIntent",
        ),
        (
            "dialogflow_cx",
            {"agent_id": "a-1", "location": "europe-west1", "environment": "live"},
            "https://europe-west1-dialogflow.googleapis.com/v3/projects/acme-bot/locations/"
            "europe-west1/agents/a-1/environments/live/sessions/s1:detectIntent",
        ),
    ],
)
def test_the_endpoint_follows_the_location(type_name: str, extra: dict[str, Any], url: str) -> None:
    context = ConnectorContext(
        submit=_no_submit, clock=ManualClock(), session_secret="s", allowed_origins=[]
    )
    settings = {"project_id": "acme-bot", "access_token": "t0k", **extra}
    bot = build_connector("demo", type_name, settings, context, ConnectorTypes())
    assert isinstance(bot, DialogflowBot)
    assert bot.detect_intent_url("s1") == url


def test_session_ids_fit_in_36_characters() -> None:
    assert session_id(CID) == CID
    long = "cv_" + "x" * 60
    assert len(session_id(long)) <= 36 and session_id(long) == session_id(long)
    assert ":" not in session_id("cv:with:colons") and len(session_id("cv:with:colons")) <= 36
    assert session_id(long) != session_id(long + "y")


# ES -------------------------------------------------------------------------------------------
async def test_es_happy_conversation(fake: FakeDialogflow, make_bot: Make) -> None:
    bot = make_bot(
        language_codes={"en": "en-US"}, time_zone="Europe/Lisbon", quota_project="acme-billing"
    )
    reply = await bot.ask(ask("hi"))
    assert reply.messages == (
        BotMessage("Hello! How can I help?"),
        BotMessage("Pick one", buttons=(BotButton("Hours", "Hours"), BotButton("Agent", "Agent"))),
    )
    assert (reply.intent, reply.confidence) == ("Default Welcome Intent", 1.0)
    assert not (reply.handoff or reply.ended or reply.failed)
    [req] = fake.detect_requests("es")
    assert req.path == f"/v2/projects/{fake.project_id}/agent/sessions/{CID}:detectIntent"
    assert req.json == {
        "queryInput": {"text": {"text": "hi", "languageCode": "en-US"}},
        "queryParams": {
            "timeZone": "Europe/Lisbon",
            "payload": {"channel": "webchat", "customer_id": "cu_1"},
        },
    }
    assert req.headers["x-goog-user-project"] == "acme-billing"


async def test_es_live_agent_handoff(make_bot: Make) -> None:
    reply = await make_bot().ask(ask("agent"))
    assert reply.handoff and not reply.ended and reply.failed is None
    assert reply.messages == (BotMessage("Connecting you to a person now."),)
    assert (reply.intent, reply.confidence) == ("human.handoff", 0.91)
    assert reply.slots == {"department": "billing"}


async def test_es_handoff_by_payload_intent_or_action(fake: FakeDialogflow, make_bot: Make) -> None:
    bot = make_bot(handoff_intents=["talk.person"], handoff_actions=["escalate"])
    reply = await bot.ask(ask("billing"))
    assert reply.handoff and reply.handoff_data == {"queue": "billing"}
    assert reply.messages[-1] == BotMessage(custom={"handoff": True, "queue": "billing"})
    fake.es_answers["talk"] = es_result("talk.person", "One moment.")
    fake.es_answers["escalate"] = es_result("other", "One moment.", action="escalate")
    assert (await bot.ask(ask("talk"))).handoff
    assert (await bot.ask(ask("escalate"))).handoff
    assert not (await bot.ask(ask("hi"))).handoff


async def test_es_fallback_fails_with_a_reason(make_bot: Make) -> None:
    reply = await make_bot().ask(ask("qwerty"))
    assert reply.failed == "fallback"
    assert reply.intent == "Default Fallback Intent" and reply.confidence == 0.3
    assert reply.messages == (BotMessage("Sorry, could you say that again?"),)
    assert not reply.handoff


async def test_es_rich_messages_of_the_default_platform_only(make_bot: Make) -> None:
    reply = await make_bot().ask(ask("card"))
    assert reply.messages == (
        BotMessage(
            "Plan A\n10 EUR a month",
            buttons=(BotButton("Buy", "buy-a"),),
            image="https://example.com/a.png",
        ),
        BotMessage(image="https://example.com/b.png"),
    )
    assert reply.slots == {}  # absent parameters are no slots


async def test_es_end_interaction_ends(make_bot: Make) -> None:
    reply = await make_bot().ask(ask("bye"))
    assert reply.ended and not reply.handoff and reply.failed is None


async def test_es_regional_environment_session(fake: FakeDialogflow, make_bot: Make) -> None:
    fake.location = "europe-west2"
    bot = make_bot(location="europe-west2", environment="prod")
    assert (await bot.ask(ask("hi"))).intent == "Default Welcome Intent"
    [req] = fake.detect_requests()
    assert req.status == 200 and (req.location, req.environment) == ("europe-west2", "prod")


# CX -------------------------------------------------------------------------------------------
async def test_cx_happy_conversation_with_parameters_both_ways(
    fake: FakeDialogflow, make_bot: Make
) -> None:
    bot = make_bot("dialogflow_cx", time_zone="Europe/Lisbon")
    reply = await bot.ask(ask("hi", attributes={"tier": "gold"}))
    assert reply.messages == (BotMessage("Hello from CX! How can I help?"),)
    assert (reply.intent, reply.confidence) == ("greeting", 0.97)
    assert not (reply.handoff or reply.ended or reply.failed)
    assert reply.attributes == {"tier": "gold"}
    [req] = fake.detect_requests("cx")
    assert req.path == (
        f"/v3/projects/{fake.project_id}/locations/global/agents/{fake.agent_id}"
        f"/sessions/{CID}:detectIntent"
    )
    assert req.json == {
        "queryInput": {"text": {"text": "hi"}, "languageCode": "en"},
        "queryParams": {
            "timeZone": "Europe/Lisbon",
            "payload": {"channel": "webchat", "customer_id": "cu_1"},
            "parameters": {"tier": "gold"},
        },
    }
    reply = await bot.ask(ask("order", attributes={"tier": "gold"}))
    assert reply.attributes == reply.slots == {"tier": "gold", "order_id": "A-1"}
    assert reply.messages[-1].custom == {"richContent": [[{"type": "chips"}]]}


async def test_cx_live_agent_handoff_carries_its_metadata(make_bot: Make) -> None:
    reply = await make_bot("dialogflow_cx").ask(ask("agent"))
    assert reply.handoff
    assert reply.handoff_data == {"queue": "billing", "reason": "user_request"}
    assert not reply.ended  # the session's end is the handoff's, not a separate close
    assert (reply.intent, reply.confidence) == ("agent.request", 0.88)
    assert reply.messages == (
        BotMessage("Okay, transferring you to an agent."),
        BotMessage(custom={"queue": "billing"}),
    )


async def test_cx_end_interaction_ends_unless_configured_as_handoff(make_bot: Make) -> None:
    reply = await make_bot("dialogflow_cx").ask(ask("bye"))
    assert reply.ended and not reply.handoff
    reply = await make_bot("dialogflow_cx", end_is_handoff=True).ask(ask("bye"))
    assert reply.handoff and not reply.ended


async def test_cx_no_match_fails(make_bot: Make) -> None:
    reply = await make_bot("dialogflow_cx").ask(ask("qwerty"))
    assert reply.failed == "no_match"
    assert reply.intent is None and reply.confidence == 0.2
    assert reply.messages == (BotMessage("Sorry, I didn't get that."),)


async def test_cx_payload_handoff(fake: FakeDialogflow, make_bot: Make) -> None:
    fake.cx_answers["human"] = cx_result(
        "human", messages=[{"payload": {"handoff": True, "queue": "vip"}}]
    )
    reply = await make_bot("dialogflow_cx").ask(ask("human"))
    assert reply.handoff and reply.handoff_data == {"queue": "vip"}


# failures -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("status", "name", "retryable"),
    [
        (429, "RESOURCE_EXHAUSTED", True),
        (500, "INTERNAL", True),
        (503, "UNAVAILABLE", True),
        (504, "DEADLINE_EXCEEDED", True),
        (400, "INVALID_ARGUMENT", False),
        (403, "PERMISSION_DENIED", False),
        (404, "NOT_FOUND", False),
    ],
)
@pytest.mark.parametrize("type_name", ["dialogflow_es", "dialogflow_cx"])
async def test_google_errors_map_to_retryable_or_not(
    fake: FakeDialogflow, make_bot: Make, type_name: str, status: int, name: str, retryable: bool
) -> None:
    fake.fail(status, message="scripted")
    with pytest.raises(BotError) as err:
        await make_bot(type_name).ask(ask("hi"))
    assert err.value.retryable is retryable
    reason = "unavailable" if retryable else "rejected"
    assert err.value.message == f"{reason}: dialogflow HTTP {status} {name}: scripted"


async def test_quota_exceeded_twice_then_answered(fake: FakeDialogflow, make_bot: Make) -> None:
    """The outbox retries; the connector itself asks once per call."""
    fake.fail(429, times=2)
    bot = make_bot("dialogflow_cx")
    for _ in range(2):
        with pytest.raises(BotError) as err:
            await bot.ask(ask("hi"))
        assert err.value.retryable
    assert (await bot.ask(ask("hi"))).intent == "greeting"
    assert [r.status for r in fake.detect_requests()] == [429, 429, 200]


@pytest.mark.parametrize("type_name", ["dialogflow_es", "dialogflow_cx"])
async def test_a_timeout_is_retryable(fake: FakeDialogflow, make_bot: Make, type_name: str) -> None:
    bot = make_bot(type_name, timeout=0.2)
    await bot.ask(ask("hi"))  # the token is fetched outside the held answer
    fake.hold()
    with pytest.raises(BotError) as err:
        await bot.ask(ask("hi"))
    assert err.value.retryable and err.value.message.startswith("timeout:")
    fake.release()


async def test_connection_refused_is_retryable(make_bot: Make) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bot = make_bot(credentials_file=None, access_token="t0k", base_url=f"http://127.0.0.1:{port}")
    with pytest.raises(BotError) as err:
        await bot.ask(ask("hi"))
    assert err.value.retryable and err.value.message.startswith("unavailable:")


@pytest.mark.parametrize("kind", ["not_json", "no_query_result", "wrong_types"])
@pytest.mark.parametrize("type_name", ["dialogflow_es", "dialogflow_cx"])
async def test_a_malformed_answer_is_not_retryable(
    fake: FakeDialogflow, make_bot: Make, type_name: str, kind: str
) -> None:
    fake.malformed(kind)
    with pytest.raises(BotError) as err:
        await make_bot(type_name).ask(ask("hi"))
    assert not err.value.retryable and err.value.message.startswith("malformed:")


@pytest.mark.parametrize("type_name", ["dialogflow_es", "dialogflow_cx"])
async def test_a_long_conversation_id_never_reaches_dialogflow(
    fake: FakeDialogflow, make_bot: Make, http: aiohttp.ClientSession, type_name: str
) -> None:
    long_cid = "cv_" + "0123456789" * 6
    bot = make_bot(type_name)
    await bot.ask(ask("hi", cid=long_cid))
    await bot.ask(ask("hi", cid=long_cid))
    first, second = fake.detect_requests()
    assert first.status == second.status == 200
    assert first.session == second.session and len(first.session or "") <= 36
    # The fake refuses what Dialogflow refuses: the long id itself.
    url = bot.detect_intent_url(long_cid)
    headers = {"Authorization": f"Bearer {first.token}"}
    async with http.post(url, json=first.json, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["status"] == "INVALID_ARGUMENT"


async def test_the_fake_refuses_cx_language_inside_text(
    fake: FakeDialogflow, make_bot: Make, http: aiohttp.ClientSession
) -> None:
    """Sanity of the fake: an ES-shaped text input is not a CX one."""
    bot = make_bot("dialogflow_cx")
    await bot.ask(ask("hi"))
    [ok] = fake.detect_requests()
    body = {"queryInput": {"text": {"text": "hi", "languageCode": "en"}, "languageCode": "en"}}
    headers = {"Authorization": f"Bearer {ok.token}"}
    async with http.post(bot.detect_intent_url(CID), json=body, headers=headers) as resp:
        assert resp.status == 400
        assert "Unknown name 'languageCode'" in (await resp.json())["error"]["message"]


# end to end through the service --------------------------------------------------------------
async def test_web_chat_with_a_cx_bot_then_handoff_to_the_queue(
    fake: FakeDialogflow, make_service: Callable[..., Any], key_file: Path
) -> None:
    svc: Service = await make_service(
        connectors=[
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(
                name="demo",
                type="dialogflow_cx",
                settings={
                    "project_id": fake.project_id,
                    "agent_id": fake.agent_id,
                    "base_url": fake.base_url,
                    "credentials_file": str(key_file),
                },
            ),
        ]
    )
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = ack["conversation_id"]
    await customer.wait_message("bot", "Hello from CX")
    [event] = [ev for ev, _ in await svc.store.events(cid) if ev.type == "bot.message"]
    assert (event.data["intent"], event.data["confidence"]) == ("greeting", 0.97)

    await customer.say("agent")
    await customer.wait_message("bot", "transferring you")
    await customer.wait_message("controller", "queue")
    conv = await svc.until(cid, lambda c: c.state == "queued")
    assert conv.state == "queued"
    types = [ev.type for ev, _ in await svc.store.events(cid)]
    assert "bot.handoff" in types and "bot.ended" not in types
    handoff = next(ev for ev, _ in await svc.store.events(cid) if ev.type == "bot.handoff")
    assert handoff.data["queue"] == "billing" and handoff.data["reason"] == "user_request"
    assert fake.tokens_issued == 1
    assert all(len(r.session or "") <= 36 for r in fake.detect_requests())
    await customer.close()
