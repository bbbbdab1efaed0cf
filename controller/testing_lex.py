"""A fake Amazon Lex V2 runtime (``RecognizeText``), for tests.

``FakeLex`` is a real aiohttp server on 127.0.0.1 (ephemeral port) that speaks Lex's rest-json:
``POST /bots/{botId}/botAliases/{botAliasId}/botLocales/{localeId}/sessions/{sessionId}/text``.
It checks what Lex checks: a valid **SigV4** signature (recomputed here from the received
request with the known test secret; an unknown key is ``UnrecognizedClientException``, a wrong
signature ``InvalidSignatureException``, both 403), the path parameters (``ValidationException``
400 for a bad bot id or session id, ``ResourceNotFoundException`` 404 for another bot, alias or
locale) and the body. It keeps each session's attributes in memory, answers from a small
script (see ``FakeLex._converse``), records every request and can be told to fail: N throttles
(429 ``ThrottlingException``), any scripted error, a malformed body, or to hold answers until
released (for timeouts). Error answers carry the error name in ``x-amzn-ErrorType`` and a
``{"message": ...}`` body. Everything waits on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, quote

from aiohttp import web

from controller.testing import serve_on_loopback

TEST_ACCESS_KEY = "AKIAFAKELEXTEST00001"
TEST_SECRET_KEY = "fake-lex-test-secret-key-0000000000000000"
TEST_REGION = "eu-west-1"
TEST_BOT_ID = "ABCDE12345"
TEST_ALIAS_ID = "TSTALIASID"
SIGNING_NAME = "lex"
MAX_SKEW_S = 300  # AWS refuses signatures more than 5 minutes off

_SESSION_ID = re.compile(r"^[0-9a-zA-Z._:-]{2,100}$")
_BOT_ID = re.compile(r"^[0-9a-zA-Z]{10}$")
_AUTH = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=(?P<key>[^/]+)/(?P<date>\d{8})/(?P<region>[^/]+)/"
    r"(?P<service>[^/]+)/aws4_request, ?SignedHeaders=(?P<headers>[a-z0-9;-]+), ?"
    r"Signature=(?P<signature>[0-9a-f]{64})$"
)
_WORDS = re.compile(r"[a-z0-9']+")

# A script turns (session, text) into an answer body; see FakeLex.answer_with.
Script = Callable[["LexSession", str], dict[str, Any]]


@dataclass(frozen=True)
class LexRequest:
    """One request the fake received, and what it answered."""

    method: str
    path: str
    headers: dict[str, str]
    json: Any
    status: int
    error: str | None = None  # the x-amzn-ErrorType answered, if any
    bot_id: str = ""
    bot_alias_id: str = ""
    locale_id: str = ""
    session_id: str = ""

    @property
    def authorization(self) -> str:
        return self.headers.get("Authorization", "")

    @property
    def text(self) -> str | None:
        found = self.json.get("text") if isinstance(self.json, dict) else None
        return found if isinstance(found, str) else None

    @property
    def session_attributes(self) -> dict[str, Any] | None:
        if not isinstance(self.json, dict):
            return None
        state = self.json.get("sessionState")
        found = state.get("sessionAttributes") if isinstance(state, dict) else None
        return found if isinstance(found, dict) else None


@dataclass
class LexSession:
    """What the fake keeps per (bot, alias, locale, session id)."""

    session_id: str
    attributes: dict[str, str] = field(default_factory=dict)
    fallbacks: int = 0
    turns: int = 0
    eliciting: str | None = None  # the intent waiting for a slot value, if any


@dataclass
class LexFailure:
    """A scripted error answer for the next ``times`` requests (None: all of them)."""

    status: int
    code: str
    message: str = "scripted failure"
    times: int | None = 1


@dataclass
class FakeLex:
    """The fake Lex V2 runtime for one bot alias and its locales."""

    access_key: str = TEST_ACCESS_KEY
    secret_key: str = TEST_SECRET_KEY
    region: str = TEST_REGION
    bot_id: str = TEST_BOT_ID
    bot_alias_id: str = TEST_ALIAS_ID
    locales: frozenset[str] = frozenset({"en_US", "pt_PT"})
    requests: list[LexRequest] = field(default_factory=list)
    sessions: dict[str, LexSession] = field(default_factory=dict)
    failures: list[LexFailure] = field(default_factory=list)
    base_url: str = ""
    # Answer the next ``malformed`` requests with ``malformed_body`` and status 200.
    malformed: int = 0
    malformed_body: bytes = b"<html>upstream proxy error</html>"
    script: Script | None = None

    def __post_init__(self) -> None:
        self._changed = asyncio.Condition()
        self._gate: asyncio.Event | None = None
        self.held = 0  # requests waiting at the gate now
        self.max_held = 0  # the most that ever waited at once
        app = web.Application()
        app.router.add_post(
            "/bots/{bot_id}/botAliases/{alias_id}/botLocales/{locale_id}/sessions/{session_id}/text",
            self._recognize_text,
        )
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> FakeLex:
        self.base_url = await serve_on_loopback(self._runner)
        return self

    async def stop(self) -> None:
        self.release()
        await self._runner.cleanup()

    # scripting ---------------------------------------------------------------------------
    def fail(
        self, *, status: int, code: str, times: int | None = 1, message: str = "scripted failure"
    ) -> LexFailure:
        """Answer the next ``times`` requests (None: all) with a Lex error."""
        failure = LexFailure(status, code, message, times)
        self.failures.append(failure)
        return failure

    def throttle(self, times: int | None = 1) -> LexFailure:
        """Answer the next ``times`` requests with 429 ``ThrottlingException``."""
        return self.fail(
            status=429, code="ThrottlingException", times=times, message="Rate exceeded"
        )

    def hold(self) -> None:
        """Hold every answer from now on until ``release``."""
        if self._gate is None or self._gate.is_set():
            self._gate = asyncio.Event()

    def release(self) -> None:
        if self._gate is not None:
            self._gate.set()

    def answer_with(self, script: Script | None) -> None:
        """Answer successful turns with ``script(session, text)`` (a RecognizeText body
        without ``sessionId``) instead of the built-in script; None restores it."""
        self.script = script

    def session(self, session_id: str) -> LexSession | None:
        return self.sessions.get(self._session_key(self.bot_id, self.bot_alias_id, session_id))

    # assertions --------------------------------------------------------------------------
    def answered(self) -> list[LexRequest]:
        """Turns the fake answered with 200, in order."""
        return [r for r in self.requests if r.status == 200]

    async def wait_for(
        self, predicate: Callable[[FakeLex], bool], *, timeout: float = 10.0
    ) -> None:
        """Wait until ``predicate(self)`` holds."""
        async with asyncio.timeout(timeout), self._changed:
            while not predicate(self):
                await self._changed.wait()

    # the route -----------------------------------------------------------------------------
    async def _recognize_text(self, request: web.Request) -> web.Response:
        raw = await request.read()
        info = request.match_info
        params = {
            "bot_id": info["bot_id"],
            "bot_alias_id": info["alias_id"],
            "locale_id": info["locale_id"],
            "session_id": info["session_id"],
        }
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        if (problem := self._auth_problem(request, raw)) is not None:
            return await self._error(request, body, params, 403, *problem)
        if (refused := self._path_problem(params)) is not None:
            return await self._error(request, body, params, *refused)
        if (failure := self._scripted()) is not None:
            return await self._error(
                request, body, params, failure.status, failure.code, failure.message
            )
        if (message := _body_problem(raw, body)) is not None:
            return await self._error(request, body, params, 400, "ValidationException", message)
        if self._gate is not None and not self._gate.is_set():
            await self._wait_at_gate(self._gate)
        if self.malformed > 0:
            self.malformed -= 1
            await self._record(request, body, params, 200)
            return web.Response(
                body=self.malformed_body, status=200, content_type="application/json"
            )
        key = self._session_key(params["bot_id"], params["bot_alias_id"], params["session_id"])
        session = self.sessions.setdefault(key, LexSession(params["session_id"]))
        state = body.get("sessionState")
        if isinstance(state, dict) and "sessionAttributes" in state:
            # Sent attributes replace the stored map (the client sends the full map).
            session.attributes = dict(state["sessionAttributes"])
        session.turns += 1
        script = self.script or _converse
        answer = {"sessionId": params["session_id"], **script(session, body["text"])}
        answer.setdefault("sessionState", {})["sessionAttributes"] = dict(session.attributes)
        answer["sessionState"].setdefault("originatingRequestId", f"fake-{len(self.requests)}")
        if "requestAttributes" in body:
            answer["requestAttributes"] = body["requestAttributes"]
        await self._record(request, body, params, 200)
        return web.json_response(answer, headers={"x-amzn-RequestId": "fake-request"})

    async def _wait_at_gate(self, gate: asyncio.Event) -> None:
        async with self._changed:
            self.held += 1
            self.max_held = max(self.max_held, self.held)
            self._changed.notify_all()
        try:
            await gate.wait()
        finally:
            async with self._changed:
                self.held -= 1
                self._changed.notify_all()

    def _session_key(self, bot_id: str, alias_id: str, session_id: str) -> str:
        return f"{bot_id}/{alias_id}/{session_id}"

    def _scripted(self) -> LexFailure | None:
        for failure in self.failures:
            if failure.times is None or failure.times > 0:
                if failure.times is not None:
                    failure.times -= 1
                return failure
        return None

    def _path_problem(self, params: dict[str, str]) -> tuple[int, str, str] | None:
        if not _BOT_ID.match(params["bot_id"]):
            return 400, "ValidationException", "1 validation error detected: botId"
        if not _SESSION_ID.match(params["session_id"]):
            return (
                400,
                "ValidationException",
                "1 validation error detected: Value at 'sessionId' failed to satisfy "
                "constraint: Member must satisfy regular expression pattern: [0-9a-zA-Z._:-]+",
            )
        if params["bot_id"] != self.bot_id or params["bot_alias_id"] != self.bot_alias_id:
            return 404, "ResourceNotFoundException", "Could not find the bot or the alias"
        if params["locale_id"] not in self.locales:
            return 404, "ResourceNotFoundException", "The locale is not built for this bot"
        return None

    def _auth_problem(self, request: web.Request, raw: bytes) -> tuple[str, str] | None:
        """Verify SigV4 like AWS: (error type, message) when the request is refused."""
        header = request.headers.get("Authorization", "")
        if not header:
            return "MissingAuthenticationTokenException", "Missing Authentication Token"
        match = _AUTH.match(header)
        amz_date = request.headers.get("X-Amz-Date", "")
        if match is None or not re.fullmatch(r"\d{8}T\d{6}Z", amz_date):
            return "IncompleteSignatureException", "Authorization header or X-Amz-Date malformed"
        if match["key"] != self.access_key:
            return (
                "UnrecognizedClientException",
                "The security token included in the request is invalid.",
            )
        signed = match["headers"].split(";")
        if match["date"] != amz_date[:8] or "host" not in signed:
            return "InvalidSignatureException", "Credential date or signed headers are wrong"
        if match["region"] != self.region or match["service"] != SIGNING_NAME:
            return (
                "InvalidSignatureException",
                f"Credential should be scoped to a valid region and to service '{SIGNING_NAME}'.",
            )
        stamp = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC).timestamp()
        if abs(time.time() - stamp) > MAX_SKEW_S:
            return "InvalidSignatureException", "Signature expired"
        expected = sigv4_signature(
            self.secret_key,
            method=request.method,
            raw_path=request.raw_path,
            headers=[(name, request.headers.getall(name, [])) for name in signed],
            body=raw,
            amz_date=amz_date,
            region=match["region"],
            service=match["service"],
        )
        if not hmac.compare_digest(expected, match["signature"]):
            return (
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you "
                "provided. Check your AWS Secret Access Key and signing method.",
            )
        return None

    async def _record(
        self,
        request: web.Request,
        body: Any,
        params: dict[str, str],
        status: int,
        error: str | None = None,
    ) -> None:
        async with self._changed:
            self.requests.append(
                LexRequest(
                    request.method,
                    request.path,
                    dict(request.headers),
                    body,
                    status,
                    error,
                    **params,
                )
            )
            self._changed.notify_all()

    async def _error(
        self,
        request: web.Request,
        body: Any,
        params: dict[str, str],
        status: int,
        code: str,
        message: str,
    ) -> web.Response:
        await self._record(request, body, params, status, code)
        return web.json_response(
            {"message": message},
            status=status,
            headers={"x-amzn-ErrorType": code, "x-amzn-RequestId": "fake-request"},
        )


def sigv4_signature(
    secret_key: str,
    *,
    method: str,
    raw_path: str,
    headers: list[tuple[str, list[str]]],
    body: bytes,
    amz_date: str,
    region: str,
    service: str,
) -> str:
    """The SigV4 signature of a request, computed from the AWS specification.

    ``raw_path`` is the path (and query) as sent, percent-encoded once; services other than S3
    sign it encoded once more. ``headers`` are the signed headers, in the signed order.
    """
    path, _, query = raw_path.partition("?")
    canonical_query = "&".join(
        f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}"
        for k, v in sorted(parse_qsl(query, keep_blank_values=True))
    )
    canonical_headers = "".join(
        f"{name.lower()}:{','.join(' '.join(v.split()) for v in values)}\n"
        for name, values in headers
    )
    canonical_request = "\n".join(
        [
            method,
            quote(path or "/", safe="/~"),
            canonical_query,
            canonical_headers,
            ";".join(name.lower() for name, _ in headers),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        [
            "AWS4-HMAC-SHA256",
            amz_date,
            scope,
            hashlib.sha256(canonical_request.encode()).hexdigest(),
        ]
    )
    key = f"AWS4{secret_key}".encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def _body_problem(raw: bytes, body: Any) -> str | None:
    """What RecognizeText would reject in a body, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object" if raw else "text is required"
    text = body.get("text")
    if not isinstance(text, str) or not 1 <= len(text) <= 1024:
        return (
            "1 validation error detected: Value at 'text' failed to satisfy constraint: "
            "Member must have length between 1 and 1024"
        )
    state = body.get("sessionState", {})
    if not isinstance(state, dict):
        return "sessionState must be an object"
    attributes = state.get("sessionAttributes", {})
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and k and isinstance(v, str) for k, v in attributes.items()
    ):
        return "sessionAttributes: keys must be non-empty strings and values strings"
    request_attributes = body.get("requestAttributes", {})
    if not isinstance(request_attributes, dict) or any(
        not isinstance(v, str) or str(k).startswith("x-amz-lex:")
        for k, v in request_attributes.items()
    ):
        return "requestAttributes: string values only, and the x-amz-lex: prefix is reserved"
    return None


# the built-in script ------------------------------------------------------------------------
def lex_answer(
    intent: str,
    *,
    state: str = "Fulfilled",
    action: str = "Close",
    messages: list[dict[str, Any]] | None = None,
    slots: dict[str, Any] | None = None,
    score: float | None = 0.9,
    slot_to_elicit: str | None = None,
) -> dict[str, Any]:
    """A RecognizeText answer body (without ``sessionId`` and the session attributes, which
    the fake adds) for ``intent``; the fallback intent is the second interpretation."""
    dialog: dict[str, Any] = {"type": action}
    if slot_to_elicit is not None:
        dialog["slotToElicit"] = slot_to_elicit
    top: dict[str, Any] = {
        "intent": {"name": intent, "state": state, "slots": slots or {}},
        "interpretationSource": "Lex",
    }
    if score is not None:
        top["nluConfidence"] = {"score": score}
    interpretations = [top]
    if intent != "AMAZON.FallbackIntent":
        interpretations.append({"intent": {"name": "AMAZON.FallbackIntent", "slots": {}}})
    answer: dict[str, Any] = {
        "sessionState": {
            "dialogAction": dialog,
            "intent": {
                "name": intent,
                "state": state,
                "confirmationState": "None",
                "slots": slots or {},
            },
        },
        "interpretations": interpretations,
    }
    if messages is not None:
        answer["messages"] = messages
    return answer


def plain(text: str) -> dict[str, Any]:
    return {"contentType": "PlainText", "content": text}


def slot(value: str, original: str | None = None) -> dict[str, Any]:
    return {
        "value": {
            "originalValue": original or value,
            "interpretedValue": value,
            "resolvedValues": [value],
        },
        "shape": "Scalar",
    }


HELP_CARD: dict[str, Any] = {
    "contentType": "ImageResponseCard",
    "imageResponseCard": {
        "title": "How can I help?",
        "subtitle": "Pick one",
        "imageUrl": "https://example.com/help.png",
        "buttons": [
            {"text": "Track order", "value": "track my order"},
            {"text": "Talk to a person", "value": "agent"},
        ],
    },
}


def _converse(session: LexSession, text: str) -> dict[str, Any]:
    """The fake bot: greeting (text + card), order tracking (a slot, elicited when missing),
    agent (handoff by intent and session attribute), transfer (handoff by custom payload),
    survey (a custom payload), speak (SSML), broken (a failed intent), bye (Close), anything
    else the fallback intent."""
    words = _WORDS.findall(text.lower())
    attrs = session.attributes
    eliciting, session.eliciting = session.eliciting, None
    if "agent" in words or "human" in words:
        attrs.update(handoff="true", handoffQueue="support", handoffReason="customer asked")
        return lex_answer(
            "TalkToAgent", messages=[plain("Sure, connecting you to an agent.")], score=0.93
        )
    if "transfer" in words:
        payload = {"handoff": True, "queue": "billing", "reason": "billing question"}
        return lex_answer(
            "BillingQuestion",
            messages=[
                plain("Let me transfer you to billing."),
                {"contentType": "CustomPayload", "content": json.dumps(payload)},
            ],
            score=0.81,
        )
    if "hi" in words or "hello" in words:
        attrs["greeted"] = "true"
        return lex_answer(
            "Greeting",
            action="ElicitIntent",
            messages=[plain("Hello! I am the Lex bot."), HELP_CARD],
            score=0.97,
        )
    number = next((w for w in words if w.isdigit()), None)
    if "track" in words or "order" in words or (eliciting == "TrackOrder" and number):
        if number is None:
            session.eliciting = "TrackOrder"
            return lex_answer(
                "TrackOrder",
                state="InProgress",
                action="ElicitSlot",
                slot_to_elicit="OrderNumber",
                messages=[plain("What is your order number?")],
                slots={"OrderNumber": None},
                score=0.88,
            )
        attrs["lastOrder"] = number
        return lex_answer(
            "TrackOrder",
            messages=[plain(f"Order {number} is on its way.")],
            slots={"OrderNumber": slot(number)},
            score=0.95,
        )
    if "survey" in words:
        return lex_answer(
            "Survey",
            messages=[
                {"contentType": "CustomPayload", "content": '{"survey": "nps", "scale": 10}'}
            ],
            score=0.9,
        )
    if "speak" in words:
        return lex_answer(
            "Speak",
            messages=[
                {"contentType": "SSML", "content": "<speak>Fish &amp; chips <break/>today</speak>"}
            ],
        )
    if "broken" in words:
        return lex_answer(
            "OrderRefund", state="Failed", messages=[plain("Sorry, I could not do that.")]
        )
    if "bye" in words:
        return lex_answer("Goodbye", messages=[plain("Goodbye!")])
    session.fallbacks += 1
    attrs["fallbackCount"] = str(session.fallbacks)
    return lex_answer(
        "AMAZON.FallbackIntent",
        state="InProgress",
        action="ElicitIntent",
        messages=[plain("Sorry, I did not understand.")],
        score=None,
    )
