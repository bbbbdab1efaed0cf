"""The custom bot connector: its signed HTTP contract, against the example bot run as a real
separate process, against an in-test fake for the failures, its callback route, the contract
documents, and end to end through the service."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]
from pydantic import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from connectors.base import (
    BotButton,
    BotCallback,
    BotMessage,
    BotReply,
    BotRequest,
    ConnectorContext,
    build_connector,
    connector_types,
)
from connectors.custom_bot import AnswerBody, CallbackBody, CustomBot, CustomBotSettings
from controller.api.common import errors_middleware
from controller.clock import Clock, ManualClock, SystemClock
from controller.errors import BotError, NotFound
from controller.settings import ConnectorInstance
from controller.signing import SignatureError, sign, verify
from controller.testing import ExampleProcess, Service, free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "custom_bot" / "bot.py"
OPENAPI = ROOT / "docs" / "custom-bot.openapi.yaml"
GUIDE = ROOT / "docs" / "custom-bot.md"
SECRET = "test-custom-bot-secret-0001"
OTHER_SECRET = "another-secret-of-some-length"


# helpers ------------------------------------------------------------------------------------
async def _no_submit(events: Any) -> list[Any]:
    raise AssertionError("a bot connector submits nothing itself")


def make_bot(
    url: str,
    http: aiohttp.ClientSession | None,
    *,
    clock: Clock | None = None,
    bot_reply: Callable[[BotCallback], Any] | None = None,
    name: str = "demo",
    **settings: Any,
) -> CustomBot:
    context = ConnectorContext(
        submit=_no_submit,
        clock=clock or SystemClock(),
        session_secret="test-session-secret",
        allowed_origins=[],
        http=http,
        bot_reply=bot_reply,
    )
    raw = {"url": url, "secret": SECRET, **settings}
    bot = build_connector(name, "custom_bot", raw, context, connector_types())
    assert isinstance(bot, CustomBot)
    return bot


def question(text: str, *, key: str | None = None, seq: int = 1) -> BotRequest:
    """A customer message; each gets its own delivery id unless ``key`` is given."""
    return BotRequest(
        conversation_id="c_1",
        text=text,
        language="en",
        mode="direct",
        reply_to_seq=seq,
        idempotency_key=key or f"ev_{secrets.token_hex(6)}:0",
        channel="webchat",
        customer_id="cus_1",
        attributes={"tier": "gold"},
    )


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


# the example bot, a separate process ----------------------------------------------------------
class ExampleBotProcess(ExampleProcess):
    """``examples/custom_bot/bot.py`` in a subprocess on a free 127.0.0.1 port."""

    def __init__(self, log_path: Path, *args: str) -> None:
        super().__init__(EXAMPLE, log_path, "--secret", SECRET, *args)
        self.url = self.base_url + "/messages"


@pytest.fixture(scope="module")
def example_bot(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExampleBotProcess]:
    bot = ExampleBotProcess(tmp_path_factory.mktemp("example-bot") / "bot.log").start()
    try:
        bot.wait_ready()
        yield bot
    finally:
        bot.stop()


async def test_entry_point_names_the_connector() -> None:
    assert connector_types().get("custom_bot") is CustomBot


@pytest.mark.parametrize(
    "changes",
    [
        {"secret": "change-me"},
        {"secret": ""},
        {"secret": "short-secret"},
        {"previous_secrets": ["secret"]},
        {"url": "bot.example.com/messages"},
        {"callback_base_url": "not a url"},
        {"unknown": 1},
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any]) -> None:
    raw = {"url": "https://bot.example.com/messages", "secret": SECRET, **changes}
    with pytest.raises(ValidationError):
        CustomBotSettings.model_validate(raw)


def test_secret_is_never_shown() -> None:
    settings = CustomBotSettings.model_validate(
        {
            "url": "https://bot.example.com/messages",
            "secret": SECRET,
            "previous_secrets": [OTHER_SECRET],
            "callback_base_url": "https://convctl.example.com/",
        }
    )
    assert SECRET not in repr(settings) and OTHER_SECRET not in repr(settings)
    assert settings.callback_base_url == "https://convctl.example.com"


# asking the example bot ----------------------------------------------------------------------
async def test_example_bot_greets_with_buttons(
    example_bot: ExampleBotProcess, http: aiohttp.ClientSession
) -> None:
    bot = make_bot(example_bot.url, http)
    reply = await bot.ask(question("hi there"))
    assert not (reply.pending or reply.handoff or reply.ended or reply.failed)
    [message] = reply.messages
    assert message.text.startswith("Hello! I am the example bot")
    assert message.buttons == (BotButton("Opening hours", "hours"), BotButton("Prices", "prices"))
    assert (reply.intent, reply.confidence) == ("greet", 1.0)

    prices = await bot.ask(question("prices", key="ev_2:0", seq=3))
    assert prices.messages == (
        BotMessage("Our plans start at 10 EUR a month.", image="https://example.com/plans.png"),
    )


async def test_example_bot_hands_over(
    example_bot: ExampleBotProcess, http: aiohttp.ClientSession
) -> None:
    reply = await make_bot(example_bot.url, http).ask(question("I want an agent please"))
    assert reply.handoff and not reply.ended
    assert reply.handoff_data == {"queue": "support", "reason": "customer_request"}
    assert [m.text for m in reply.messages] == ["Let me connect you to an agent."]


async def test_example_bot_ends(
    example_bot: ExampleBotProcess, http: aiohttp.ClientSession
) -> None:
    reply = await make_bot(example_bot.url, http).ask(question("ok bye"))
    assert reply.ended and not reply.handoff
    assert [m.text for m in reply.messages] == ["Goodbye!"]


async def test_example_bot_answers_a_redelivery_the_same(
    example_bot: ExampleBotProcess, http: aiohttp.ClientSession
) -> None:
    bot = make_bot(example_bot.url, http)
    first = await bot.ask(question("hours", key="ev_9:0"))
    # The same delivery id with another text: the bot recognises the redelivery.
    again = await bot.ask(question("agent", key="ev_9:0"))
    assert again == first and not again.handoff


@pytest.mark.parametrize(
    ("settings", "clock", "code"),
    [
        ({"secret": OTHER_SECRET}, None, "bad_signature"),
        ({}, ManualClock(datetime(2020, 1, 1, tzinfo=UTC)), "stale_signature"),
    ],
)
async def test_example_bot_refuses_what_we_did_not_sign(
    example_bot: ExampleBotProcess,
    http: aiohttp.ClientSession,
    settings: dict[str, Any],
    clock: Clock | None,
    code: str,
) -> None:
    bot = make_bot(example_bot.url, http, clock=clock, **settings)
    with pytest.raises(BotError) as caught:
        await bot.ask(question("hi"))
    assert not caught.value.retryable
    assert caught.value.message.startswith("rejected: HTTP 401") and code in caught.value.message
    async with http.post(example_bot.url, json={"conversation_id": "c"}) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "missing_signature"


# an in-test fake bot for failures -------------------------------------------------------------
@dataclass
class FakeBot:
    """A bot endpoint on 127.0.0.1 that checks our signature and answers as scripted."""

    status: int = 200
    body: bytes = b"{}"
    headers: dict[str, str] = field(default_factory=dict)
    hold: asyncio.Event | None = None  # answer only once it is set
    requests: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    received: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def __post_init__(self) -> None:
        app = web.Application()
        app.router.add_post("/messages", self._handle)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)

    async def start(self) -> FakeBot:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/messages"
        return self

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        await self._runner.cleanup()

    def answer(self, status: int, body: Any = b"", **headers: str) -> None:
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.headers = headers

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        self.requests.append((dict(request.headers), raw))
        self.received.set()
        try:
            verify(SECRET, raw, request.headers, now=time.time())
        except SignatureError as exc:
            self.refused.append(exc.code)
            return web.json_response({"error": {"code": exc.code, "message": str(exc)}}, status=401)
        if self.hold is not None:
            await self.hold.wait()
        return web.Response(
            status=self.status,
            body=self.body,
            headers={"Content-Type": "application/json", **self.headers},
        )


@pytest.fixture
async def fake() -> AsyncIterator[FakeBot]:
    bot = await FakeBot().start()
    yield bot
    await bot.stop()


def _openapi() -> dict[str, Any]:
    loaded = yaml.safe_load(OPENAPI.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def schema_validator(name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/<name>`` of the OpenAPI document."""
    uri = "urn:convctl:custom-bot-openapi"
    resource = Resource.from_contents(_openapi(), default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(uri, resource)
    return Draft202012Validator({"$ref": f"{uri}#/components/schemas/{name}"}, registry=registry)


async def test_request_is_signed_and_shaped_as_documented(
    fake: FakeBot, http: aiohttp.ClientSession
) -> None:
    fake.answer(200, {"replies": [{"text": "ok"}]})
    bot = make_bot(fake.url, http, callback_base_url="https://convctl.example.com/")
    reply = await bot.ask(question("héllo", key="ev_7:2", seq=4))
    assert reply.messages == (BotMessage("ok"),)
    [(headers, raw)] = fake.requests
    assert fake.refused == []
    assert headers["Convctl-Delivery-Id"] == "ev_7:2"
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "convctl-custom-bot/1"
    body = json.loads(raw)
    assert body == {
        "version": 1,
        "conversation_id": "c_1",
        "message": {"seq": 4, "text": "héllo", "language": "en"},
        "customer": {"id": "cus_1"},
        "channel": "webchat",
        "mode": "direct",
        "attributes": {"tier": "gold"},
        "callback_url": "https://convctl.example.com/connectors/bots/demo/callback",
    }
    schema_validator("BotRequest").validate(body)

    # Without a public URL there is no callback_url; unknown customer and channel are null.
    bare = make_bot(fake.url, http)
    request = BotRequest("c_2", "hi", "de", "assist", 1, "ev_8:0")
    await bare.ask(request)
    body = json.loads(fake.requests[-1][1])
    assert "callback_url" not in body
    assert (body["customer"], body["channel"], body["mode"]) == ({"id": None}, None, "assist")
    schema_validator("BotRequest").validate(body)


async def test_answer_fields_map_to_the_reply(fake: FakeBot, http: aiohttp.ClientSession) -> None:
    fake.answer(
        200,
        {
            "replies": [
                {"text": "Pick one", "buttons": [{"title": "A", "payload": "/a"}]},
                {"image": "https://example.com/a.png"},
                {"custom": {"card": "plans"}},
            ],
            "failed": "out_of_scope",
            "intent": "fallback",
            "confidence": 0,
            "slots": {"product": ["a", "b"]},
            "attributes": {"topic": "plans", "count": 2, "vip": True},
        },
    )
    reply = await make_bot(fake.url, http).ask(question("?"))
    assert reply == BotReply(
        messages=(
            BotMessage("Pick one", buttons=(BotButton("A", "/a"),)),
            BotMessage(image="https://example.com/a.png"),
            BotMessage(custom={"card": "plans"}),
        ),
        failed="out_of_scope",
        intent="fallback",
        confidence=0.0,
        slots={"product": ["a", "b"]},
        attributes={"topic": "plans", "count": 2, "vip": True},
    )


@pytest.mark.parametrize(
    ("status", "expected"),
    [(202, BotReply(pending=True)), (204, BotReply())],
)
async def test_accepted_and_no_content(
    fake: FakeBot, http: aiohttp.ClientSession, status: int, expected: BotReply
) -> None:
    fake.answer(status, {"accepted": True} if status == 202 else b"")
    assert await make_bot(fake.url, http).ask(question("hi")) == expected


@pytest.mark.parametrize(
    ("status", "retryable", "prefix"),
    [
        (500, True, "unavailable: HTTP 500"),
        (503, True, "unavailable: HTTP 503"),
        (429, True, "unavailable: HTTP 429"),
        (408, True, "unavailable: HTTP 408"),
        (400, False, "rejected: HTTP 400"),
        (401, False, "rejected: HTTP 401"),
        (404, False, "rejected: HTTP 404"),
        (302, False, "rejected: HTTP 302 redirect to https://elsewhere.example.com/"),
    ],
)
async def test_error_statuses(
    fake: FakeBot, http: aiohttp.ClientSession, status: int, retryable: bool, prefix: str
) -> None:
    fake.answer(
        status,
        {"error": {"code": "boom", "message": "the bot broke"}},
        Location="https://elsewhere.example.com/",
    )
    with pytest.raises(BotError) as caught:
        await make_bot(fake.url, http).ask(question("hi"))
    assert caught.value.retryable is retryable
    assert caught.value.message.startswith(prefix), caught.value.message
    if status != 302:
        assert caught.value.message.endswith(": the bot broke")
    assert len(fake.requests) == 1  # the service retries, never the connector


async def test_timeout_is_retryable(fake: FakeBot, http: aiohttp.ClientSession) -> None:
    fake.hold = asyncio.Event()  # never set before the connector gives up
    with pytest.raises(BotError) as caught:
        await make_bot(fake.url, http, timeout=0.2).ask(question("hi"))
    assert caught.value.retryable
    assert caught.value.message.startswith("timeout:")
    assert len(fake.requests) == 1


async def test_connection_refused_is_retryable(http: aiohttp.ClientSession) -> None:
    bot = make_bot(f"http://127.0.0.1:{free_port()}/messages", http)
    with pytest.raises(BotError) as caught:
        await bot.ask(question("hi"))
    assert caught.value.retryable and caught.value.message.startswith("unavailable:")


async def test_not_started_is_retryable() -> None:
    with pytest.raises(BotError) as caught:
        await make_bot("http://127.0.0.1:9/messages", None).ask(question("hi"))
    assert caught.value.retryable


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        (b"Hello there", "not JSON"),
        (b"[]", "body"),
        (b'{"replies": "hello"}', "replies"),
        (b'{"reply": [{"text": "a typo"}]}', "reply"),
        (b'{"replies": [{}]}', "replies.0"),
        (b'{"replies": [{"text": 5}]}', "replies.0.text"),
        (b'{"replies": [{"buttons": [{"title": "A"}]}]}', "payload"),
        (b'{"handoff": {"queue": "q"}, "end": true}', "exclude each other"),
        (b'{"end": "yes"}', "end"),
        (b'{"confidence": 2}', "confidence"),
        (b'{"replies": [{"image": "javascript:alert(1)"}]}', "image"),
    ],
)
async def test_malformed_answer_is_not_retryable(
    fake: FakeBot, http: aiohttp.ClientSession, body: bytes, mentions: str
) -> None:
    fake.answer(200, body)
    with pytest.raises(BotError) as caught:
        await make_bot(fake.url, http).ask(question("hi"))
    assert not caught.value.retryable
    assert caught.value.message.startswith("malformed answer: ")
    assert mentions in caught.value.message, caught.value.message


async def test_oversized_answer_is_malformed(fake: FakeBot, http: aiohttp.ClientSession) -> None:
    fake.answer(200, {"replies": [{"text": "x" * 3000}]})
    with pytest.raises(BotError) as caught:
        await make_bot(fake.url, http, max_answer_bytes=1024).ask(question("hi"))
    assert not caught.value.retryable and "larger than 1024 bytes" in caught.value.message


# the callback route -------------------------------------------------------------------------
@dataclass
class CallbackSetup:
    url: str
    clock: ManualClock
    http: aiohttp.ClientSession
    delivered: list[BotCallback]
    bot: CustomBot

    async def post(
        self,
        body: Any,
        *,
        secret: str = SECRET,
        age: float = 0,
        headers: dict[str, str] | None = None,
        signed: bool = True,
    ) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        sent = {"Content-Type": "application/json"}
        if signed:
            now = self.clock.now().timestamp() - age
            sent.update(sign(secret, raw, now=now, delivery_id="cb-1"))
        sent.update(headers or {})
        async with self.http.post(self.url, data=raw, headers=sent) as r:
            return r.status, await r.json()


@pytest.fixture
async def callbacks(
    http: aiohttp.ClientSession, clock: ManualClock
) -> AsyncIterator[CallbackSetup]:
    delivered: list[BotCallback] = []

    async def record(answer: BotCallback) -> None:
        if answer.conversation_id == "c_unknown":
            raise NotFound("unknown conversation", code="unknown_conversation")
        delivered.append(answer)

    bot = make_bot(
        "http://127.0.0.1:9/messages",
        http,
        clock=clock,
        bot_reply=record,
        previous_secrets=[OTHER_SECRET],
        max_callback_bytes=2048,
    )
    app = web.Application(middlewares=[errors_middleware])
    app.router.add_routes(bot.routes())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    yield CallbackSetup(base + bot.callback_path, clock, http, delivered, bot)
    await runner.cleanup()


GOOD_CALLBACK = {
    "conversation_id": "c_1",
    "reply_to": 3,
    "reply_id": "r-42",
    "replies": [{"text": "Shipped", "buttons": [{"title": "Track", "payload": "track"}]}],
    "handoff": {"queue": "billing", "reason": "asked", "priority": "high"},
    "intent": "order",
}


async def test_callback_hands_the_answer_over(callbacks: CallbackSetup) -> None:
    assert callbacks.url.endswith("/connectors/bots/demo/callback")
    status, body = await callbacks.post(GOOD_CALLBACK)
    assert (status, body) == (202, {"accepted": True})
    assert callbacks.delivered == [
        BotCallback(
            bot="demo",
            conversation_id="c_1",
            reply=BotReply(
                messages=(BotMessage("Shipped", buttons=(BotButton("Track", "track"),)),),
                handoff=True,
                handoff_data={"queue": "billing", "reason": "asked", "priority": "high"},
                intent="order",
            ),
            dedupe_key="demo:r-42",
            reply_to_seq=3,
        )
    ]
    # A redelivery carries the same dedupe key; a secret being rotated out still works.
    status, _ = await callbacks.post(GOOD_CALLBACK, secret=OTHER_SECRET, age=299)
    assert status == 202
    assert [d.dedupe_key for d in callbacks.delivered] == ["demo:r-42", "demo:r-42"]


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"signed": False}, 401, "missing_signature"),
        ({"signed": False, "headers": {"Convctl-Timestamp": "1"}}, 401, "missing_signature"),
        ({"secret": "a-wrong-but-long-secret"}, 403, "bad_signature"),
        ({"headers": {"Convctl-Signature": "v1=" + "0" * 64}}, 403, "bad_signature"),
        ({"headers": {"Convctl-Timestamp": "yesterday"}}, 403, "bad_signature"),
        ({"age": 301}, 401, "stale_signature"),
        ({"age": -301}, 401, "stale_signature"),
    ],
)
async def test_callback_refuses_bad_signatures(
    callbacks: CallbackSetup, kwargs: dict[str, Any], status: int, code: str
) -> None:
    got, body = await callbacks.post(GOOD_CALLBACK, **kwargs)
    assert (got, body["error"]["code"]) == (status, code)
    assert callbacks.delivered == []


async def test_callback_signature_covers_the_raw_body(callbacks: CallbackSetup) -> None:
    raw = json.dumps(GOOD_CALLBACK).encode()
    headers = sign(SECRET, raw, now=callbacks.clock.now().timestamp(), delivery_id="x")
    tampered = raw.replace(b"Shipped", b"Shipper")
    async with callbacks.http.post(callbacks.url, data=tampered, headers=headers) as r:
        assert r.status == 403
    assert callbacks.delivered == []


async def test_callback_stale_after_the_clock_moves(callbacks: CallbackSetup) -> None:
    raw = json.dumps(GOOD_CALLBACK).encode()
    headers = sign(SECRET, raw, now=callbacks.clock.now().timestamp(), delivery_id="x")
    callbacks.clock.advance(301)
    async with callbacks.http.post(callbacks.url, data=raw, headers=headers) as r:
        assert r.status == 401 and (await r.json())["error"]["code"] == "stale_signature"
    assert callbacks.delivered == []


@pytest.mark.parametrize(
    ("body", "status", "code", "mentions"),
    [
        (b"{not json", 400, "malformed_json", "malformed JSON"),
        ({**GOOD_CALLBACK, "reply_id": None}, 400, "invalid_body", "reply_id"),
        (
            {k: v for k, v in GOOD_CALLBACK.items() if k != "reply_id"},
            400,
            "invalid_body",
            "reply_id",
        ),
        ({**GOOD_CALLBACK, "reply_id": "has space"}, 400, "invalid_body", "reply_id"),
        ({**GOOD_CALLBACK, "conversation_id": 7}, 400, "invalid_body", "conversation_id"),
        ({**GOOD_CALLBACK, "end": True}, 400, "invalid_body", "exclude each other"),
        ({**GOOD_CALLBACK, "replies": [{"text": ""}]}, 400, "invalid_body", "replies.0"),
        ({**GOOD_CALLBACK, "replies": [{"text": "x" * 3000}]}, 413, "too_large", "too large"),
        ({**GOOD_CALLBACK, "conversation_id": "c_unknown"}, 404, "unknown_conversation", ""),
    ],
)
async def test_callback_refuses_bad_bodies(
    callbacks: CallbackSetup, body: Any, status: int, code: str, mentions: str
) -> None:
    got, answer = await callbacks.post(body)
    assert (got, answer["error"]["code"]) == (status, code)
    assert mentions in answer["error"]["message"]
    assert callbacks.delivered == []


async def test_callback_before_the_service_is_ready(callbacks: CallbackSetup) -> None:
    callbacks.bot.context.bot_reply = None
    status, body = await callbacks.post(GOOD_CALLBACK)
    assert (status, body["error"]["code"]) == (503, "unavailable")


# the contract documents ---------------------------------------------------------------------
def _media_examples(doc: dict[str, Any]) -> Iterator[tuple[str, str, Any]]:
    """(where, schema name, example value) for every example of every JSON media object."""

    def walk(node: Any, where: str) -> Iterator[tuple[str, str, Any]]:
        if isinstance(node, dict):
            schema = node.get("schema")
            if isinstance(schema, dict) and "$ref" in schema and "examples" in node:
                name = schema["$ref"].rsplit("/", 1)[-1]
                for key, example in node["examples"].items():
                    yield f"{where}/{key}", name, example["value"]
            for key, value in node.items():
                yield from walk(value, f"{where}/{key}")
        elif isinstance(node, list):
            for i, value in enumerate(node):
                yield from walk(value, f"{where}/{i}")

    yield from walk(doc, "")


def test_openapi_document_is_well_formed() -> None:
    doc = _openapi()
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"] == "1"
    callback = doc["paths"]["/connectors/bots/{name}/callback"]["post"]
    ask = doc["webhooks"]["botMessage"]["post"]
    for operation in (callback, ask):
        assert operation["operationId"] and operation["responses"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert {"202", "400", "401", "403"} <= set(callback["responses"])
    assert {"200", "202", "429", "5XX"} <= set(ask["responses"])
    # Every schema is a valid JSON Schema 2020-12, every $ref resolves.
    for schema in doc["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)
    text = OPENAPI.read_text(encoding="utf-8")
    for ref in set(re.findall(r'\$ref: "(#/[^"]+)"', text)):
        node: Any = doc
        for part in ref[2:].split("/"):
            node = node[part]
        assert isinstance(node, dict), ref


def test_openapi_examples_validate_against_their_schemas() -> None:
    examples = list(_media_examples(_openapi()))
    assert len(examples) >= 12
    for where, name, value in examples:
        errors = [e.message for e in schema_validator(name).iter_errors(value)]
        assert errors == [], f"{where}: {errors}"
        if name == "Answer":
            AnswerBody.model_validate(value)
        elif name == "Callback":
            CallbackBody.model_validate(value)


@pytest.mark.parametrize(
    ("body", "valid"),
    [
        ({}, True),
        ({"replies": [{"text": "a"}], "handoff": None, "end": False, "failed": None}, True),
        ({"handoff": {}, "end": False}, True),
        ({"handoff": {"queue": "q", "skills": ["de"]}}, True),
        ({"replies": [{"custom": {}}]}, True),
        ({"replies": [{"text": "", "buttons": [{"title": "A", "payload": "a"}]}]}, True),
        ({"attributes": {"a": "x", "b": 1, "c": 1.5, "d": False}}, True),
        ({"version": 1, "confidence": 1}, True),
        ({"version": 2}, False),
        ({"replies": [{}]}, False),
        ({"replies": [{"text": ""}]}, False),
        ({"replies": [{"text": "a", "colour": "red"}]}, False),
        ({"handoff": {}, "end": True}, False),
        ({"end": True, "failed": "x"}, False),
        ({"handoff": {"queue": "q"}, "failed": "x"}, False),
        ({"failed": ""}, False),
        ({"attributes": {"a": None}}, False),
        ({"attributes": {"a": [1]}}, False),
        ({"replies": [{"buttons": [{"title": "", "payload": "a"}]}]}, False),
        ({"unknown": 1}, False),
        ({"confidence": -0.1}, False),
    ],
)
def test_schema_and_connector_agree_on_answers(body: dict[str, Any], valid: bool) -> None:
    schema_ok = schema_validator("Answer").is_valid(body)
    try:
        AnswerBody.model_validate(body)
        model_ok = True
    except ValidationError:
        model_ok = False
    assert (schema_ok, model_ok) == (valid, valid)


def _guide_blocks(language: str) -> list[str]:
    text = GUIDE.read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.DOTALL)


def test_guide_json_examples_follow_the_schemas() -> None:
    blocks = [json.loads(block) for block in _guide_blocks("json")]
    assert len(blocks) >= 6
    request, *answers = blocks
    schema_validator("BotRequest").validate(request)
    for body in answers:
        if "reply_id" in body:
            schema_validator("Callback").validate(body)
            CallbackBody.model_validate(body)
        else:
            schema_validator("Answer").validate(body)
            AnswerBody.model_validate(body)


def test_guide_verification_recipe_accepts_our_signature() -> None:
    [recipe] = _guide_blocks("python")
    namespace: dict[str, Any] = {}
    exec(compile(recipe, str(GUIDE), "exec"), namespace)
    check = namespace["verify_convctl_request"]
    raw = b'{"version":1,"message":{"text":"caf\\u00e9"}}'
    headers = sign(SECRET, raw, now=time.time(), delivery_id="ev_1:0")
    check(SECRET, headers, raw)  # no error
    for secret, body, now in [
        (OTHER_SECRET, raw, None),
        (SECRET, raw + b" ", None),
        (SECRET, raw, time.time() + 301),
    ]:
        with pytest.raises(ValueError):
            check(secret, headers, body, now=now)
    with pytest.raises(ValueError):
        check(SECRET, {}, raw)


# end to end through the service ------------------------------------------------------------
async def _custom_service(make_service: Callable[..., Any], url: str, **settings: Any) -> Service:
    svc: Service = await make_service(
        connectors=[
            ConnectorInstance(name="webchat", type="webchat"),
            ConnectorInstance(
                name="demo",
                type="custom_bot",
                settings={"url": url, "secret": SECRET, "timeout": 5, **settings},
            ),
        ],
    )
    return svc


async def test_service_web_chat_with_the_example_bot(
    make_service: Callable[..., Any], example_bot: ExampleBotProcess
) -> None:
    svc = await _custom_service(make_service, example_bot.url)
    customer = await svc.customer()
    ack = await customer.say("hi")
    assert ack["type"] == "ack", ack
    greeting = await customer.wait_message("bot", "Hello! I am the example bot")
    assert [b["title"] for b in greeting.get("buttons", [])] == ["Opening hours", "Prices"]

    await customer.say("hours")
    await customer.wait_message("bot", "We are open Monday to Friday")

    await customer.say("agent")
    await customer.wait_message("bot", "Let me connect you to an agent.")
    conv = await svc.until(str(ack["conversation_id"]), lambda c: c.state == "queued")
    assert conv.queue == "support"


async def test_service_takes_the_answer_by_callback(
    make_service: Callable[..., Any], tmp_path: Path
) -> None:
    # The bot's port is chosen first, the bot started once the service's URL is known.
    bot = ExampleBotProcess(tmp_path / "async-bot.log", "--async")
    svc = await _custom_service(make_service, bot.url)
    bot.args = (
        "--secret",
        SECRET,
        "--async",
        "--callback-url",
        svc.base_url + "/connectors/bots/demo/callback",
    )
    bot.start()
    try:
        await asyncio.to_thread(bot.wait_ready)
        customer = await svc.customer()
        ack = await customer.say("hi")
        assert ack["type"] == "ack", ack
        await customer.wait_message("bot", "Hello! I am the example bot")
        cid = str(ack["conversation_id"])
        events = [ev for ev, _ in await svc.store.events(cid) if ev.type == "bot.message"]
        assert [ev.dedupe_key.split(":")[0] for ev in events] == ["demo"]  # via the callback

        await customer.say("bye")
        await customer.wait_message("bot", "Goodbye!")
        await svc.until(cid, lambda c: c.state == "closed")
    finally:
        bot.stop()


async def test_service_takes_a_redelivered_callback_once(
    make_service: Callable[..., Any], fake: FakeBot
) -> None:
    """A bot answers 202, then posts its signed answer twice: the customer sees it once."""
    svc = await _custom_service(make_service, fake.url)
    fake.answer(202, {"accepted": True})
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = str(ack["conversation_id"])
    async with asyncio.timeout(10):
        await fake.received.wait()
    sent = json.loads(fake.requests[0][1])
    assert sent["conversation_id"] == cid and sent["message"]["text"] == "hi"
    answer = {
        "conversation_id": cid,
        "reply_to": sent["message"]["seq"],
        "reply_id": "late-1",
        "replies": [{"text": "Sorry for the wait!"}],
    }
    raw = json.dumps(answer).encode()
    url = svc.base_url + "/connectors/bots/demo/callback"
    assert svc.http is not None
    for _ in range(2):  # the second is a redelivery
        headers = sign(SECRET, raw, now=time.time(), delivery_id="late-1")
        async with svc.http.post(url, data=raw, headers=headers) as r:
            assert r.status == 202, await r.text()
    await customer.wait_message("bot", "Sorry for the wait!")
    await svc.settle()
    assert customer.texts("bot") == ["Sorry for the wait!"]


@pytest.mark.parametrize(
    ("status", "body", "asked", "reason"),
    [
        (500, {"error": {"code": "down", "message": "database down"}}, 2, "unavailable"),
        (200, {"replies": "not a list"}, 1, "malformed"),
    ],
)
async def test_service_routes_to_a_person_when_the_bot_fails(
    make_service: Callable[..., Any],
    fake: FakeBot,
    status: int,
    body: Any,
    asked: int,
    reason: str,
) -> None:
    """A failing bot is asked again only when that can help; then the rules take over."""
    svc = await _custom_service(make_service, fake.url, max_attempts=2, retry_backoff=0.01)
    fake.answer(status, body)
    customer = await svc.customer()
    ack = await customer.say("hi")
    cid = str(ack["conversation_id"])
    conv = await svc.until(cid, lambda c: c.state == "queued")
    assert conv.queue == "support"
    await customer.wait_for(lambda f: f["type"] == "message" and "not available" in f["text"])
    assert customer.texts("bot") == []
    [failed] = [ev for ev, _ in await svc.store.events(cid) if ev.type == "bot.failed"]
    assert failed.data["reason"] == reason
    assert len(fake.requests) == asked
    assert len({headers["Convctl-Delivery-Id"] for headers, _ in fake.requests}) == 1
    assert fake.refused == []
