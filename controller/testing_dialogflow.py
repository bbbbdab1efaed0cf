"""A fake Google Dialogflow (ES v2 and CX v3) with its OAuth2 token endpoint, for tests.

``FakeDialogflow`` is a real aiohttp server on 127.0.0.1 (ephemeral port). It plays:
- Google's token endpoint (``POST /token``, the JWT-bearer grant): it verifies the
  assertion's RS256 signature with the service account's public key and its ``iss``,
  ``aud``, ``scope``, ``iat``/``exp`` claims, as Google does, and issues opaque tokens with
  ``expires_in``; ``service_account_file`` writes a key file (fresh RSA key) whose
  ``token_uri`` points here.
- ``detectIntent`` of ES (``/v2/projects/{p}[/locations/{l}]/agent[/environments/{e}/users/-]
  /sessions/{s}:detectIntent``) and CX (``/v3/projects/{p}/locations/{l}/agents/{a}
  [/environments/{e}]/sessions/{s}:detectIntent``): Bearer token checked (401
  UNAUTHENTICATED otherwise), session ids over 36 characters and unknown request fields
  refused (400 INVALID_ARGUMENT), answers scripted by input text (``es_answers`` /
  ``cx_answers``, see the defaults below), CX session parameters kept per session.
Knobs: ``fail`` (N answers with 429/500/503/…), ``hold`` (answers, or token answers,
wait on an event),
``malformed`` (a broken 200 answer), ``expire_tokens``. Every request is recorded;
waits are on conditions, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from aiohttp import web
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from controller.testing import serve_on_loopback

JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"  # what google-auth puts in aud
ACCEPTED_SCOPES = frozenset(
    {
        "https://www.googleapis.com/auth/cloud-platform",
        "https://www.googleapis.com/auth/dialogflow",
    }
)
SESSION_ID_MAX = 36
TEXT_MAX = 256

STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}

# Fields each request object may carry (proto JSON: anything else is a 400).
ES_QUERY_INPUT = frozenset({"text", "event", "audioConfig"})
ES_TEXT = frozenset({"text", "languageCode"})
ES_QUERY_PARAMS = frozenset(
    {
        "timeZone",
        "geoLocation",
        "contexts",
        "resetContexts",
        "sessionEntityTypes",
        "payload",
        "sentimentAnalysisRequestConfig",
        "webhookHeaders",
        "platform",
    }
)
CX_QUERY_INPUT = frozenset({"text", "intent", "audio", "event", "dtmf", "languageCode"})
CX_TEXT = frozenset({"text"})
CX_QUERY_PARAMS = frozenset(
    {
        "timeZone",
        "geoLocation",
        "sessionEntityTypes",
        "payload",
        "parameters",
        "currentPage",
        "disableWebhook",
        "analyzeQueryTextSentiment",
        "webhookHeaders",
        "flowVersions",
        "channel",
        "sessionTtl",
        "endUserMetadata",
    }
)


def google_error(status: int, message: str) -> dict[str, Any]:
    """Google's JSON error body."""
    return {
        "error": {
            "code": status,
            "message": message,
            "status": STATUS_NAMES.get(status, "UNKNOWN"),
        }
    }


def _b64url_decode(part: str) -> bytes:
    return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))


# scripted answers ---------------------------------------------------------------------------
def es_result(
    display_name: str,
    *texts: str,
    confidence: float | None = 1.0,
    action: str | None = None,
    parameters: dict[str, Any] | None = None,
    messages: list[dict[str, Any]] | None = None,
    live_agent_handoff: bool = False,
    end_interaction: bool = False,
    is_fallback: bool = False,
) -> dict[str, Any]:
    """An ES ``queryResult`` (without the query echo, which the fake adds)."""
    fulfillment = [{"text": {"text": [t]}} for t in texts] + list(messages or [])
    intent: dict[str, Any] = {
        "name": "projects/fake/agent/intents/" + hashlib.sha1(display_name.encode()).hexdigest(),
        "displayName": display_name,
    }
    # proto3 JSON leaves false booleans out, so the connector must not expect them.
    if live_agent_handoff:
        intent["liveAgentHandoff"] = True
    if end_interaction:
        intent["endInteraction"] = True
    if is_fallback:
        intent["isFallback"] = True
    result: dict[str, Any] = {
        "allRequiredParamsPresent": True,
        "fulfillmentText": " ".join(texts),
        "fulfillmentMessages": fulfillment,
        "intent": intent,
    }
    if action:
        result["action"] = action
    if parameters:
        result["parameters"] = parameters
    if confidence is not None:
        result["intentDetectionConfidence"] = confidence
    return result


def cx_result(
    display_name: str | None,
    *texts: str,
    match_type: str = "INTENT",
    confidence: float | None = 1.0,
    messages: list[dict[str, Any]] | None = None,
    parameters: dict[str, Any] | None = None,
    page: str = "Start Page",
) -> dict[str, Any]:
    """A CX ``queryResult``; ``parameters`` are set in the session (None values clear)."""
    match: dict[str, Any] = {"matchType": match_type}
    if display_name is not None:
        match["intent"] = {
            "name": f"projects/fake/locations/global/agents/fake/intents/{display_name}",
            "displayName": display_name,
        }
    if confidence is not None:
        match["confidence"] = confidence
    result: dict[str, Any] = {
        "responseMessages": [{"text": {"text": [t]}} for t in texts] + list(messages or []),
        "match": match,
        "currentPage": {"name": f"projects/fake/pages/{page}", "displayName": page},
    }
    if parameters:
        result["parameters"] = parameters
    if confidence is not None and display_name is not None:
        result["intentDetectionConfidence"] = confidence
    return result


def default_es_answers() -> dict[str, dict[str, Any]]:
    """Input text (lower case) → ES answer. Anything else gets the fallback intent."""
    return {
        "hi": es_result(
            "Default Welcome Intent",
            "Hello! How can I help?",
            action="input.welcome",
            messages=[{"quickReplies": {"title": "Pick one", "quickReplies": ["Hours", "Agent"]}}],
        ),
        "agent": es_result(
            "human.handoff",
            "Connecting you to a person now.",
            action="handoff.request",
            parameters={"department": "billing"},
            confidence=0.91,
            live_agent_handoff=True,
        ),
        "billing": es_result(
            "billing.question",
            "Let me get someone from billing.",
            messages=[{"payload": {"handoff": True, "queue": "billing"}}],
            confidence=0.8,
        ),
        "card": es_result(
            "show.card",
            confidence=0.7,
            messages=[
                {
                    "card": {
                        "title": "Plan A",
                        "subtitle": "10 EUR a month",
                        "imageUri": "https://example.com/a.png",
                        "buttons": [{"text": "Buy", "postback": "buy-a"}],
                    }
                },
                {"image": {"imageUri": "https://example.com/b.png", "accessibilityText": "B"}},
                {"text": {"text": ["Only on Facebook"]}, "platform": "FACEBOOK"},
            ],
        ),
        "bye": es_result("goodbye", "Goodbye!", end_interaction=True),
    }


def default_es_fallback() -> dict[str, Any]:
    return es_result(
        "Default Fallback Intent",
        "Sorry, could you say that again?",
        action="input.unknown",
        confidence=0.3,
        is_fallback=True,
    )


def default_cx_answers() -> dict[str, dict[str, Any]]:
    """Input text (lower case) → CX answer. Anything else gets NO_MATCH."""
    return {
        "hi": cx_result("greeting", "Hello from CX! How can I help?", confidence=0.97),
        "agent": cx_result(
            "agent.request",
            "Okay, transferring you to an agent.",
            confidence=0.88,
            messages=[
                {"payload": {"queue": "billing"}},
                {"liveAgentHandoff": {"metadata": {"queue": "billing", "reason": "user_request"}}},
                {"endInteraction": {}},
            ],
            page="End Session",
        ),
        "bye": cx_result(
            "goodbye", "Goodbye!", messages=[{"endInteraction": {}}], page="End Session"
        ),
        "order": cx_result(
            "order.status",
            "Order A-1 ships tomorrow.",
            parameters={"order_id": "A-1"},
            messages=[{"payload": {"richContent": [[{"type": "chips"}]]}}],
            confidence=0.75,
        ),
    }


def default_cx_fallback() -> dict[str, Any]:
    return cx_result(None, "Sorry, I didn't get that.", match_type="NO_MATCH", confidence=0.2)


# records and knobs --------------------------------------------------------------------------
@dataclass(frozen=True)
class DialogflowRequest:
    """One request the fake received. ``kind``: token, es or cx."""

    kind: str
    path: str
    headers: dict[str, str]
    json: Any
    status: int
    session: str | None = None
    project: str | None = None
    location: str | None = None
    environment: str | None = None

    @property
    def token(self) -> str | None:
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        return token if scheme == "Bearer" else None

    @property
    def text(self) -> str | None:
        try:
            return str(self.json["queryInput"]["text"]["text"])
        except (KeyError, TypeError):
            return None


@dataclass
class Failure:
    """``times`` detectIntent answers (None = always) with ``status`` and Google's body."""

    status: int
    times: int | None = 1
    message: str = "scripted failure"


@dataclass
class _Account:
    key_id: str
    public_key: rsa.RSAPublicKey


@dataclass
class FakeDialogflow:
    """The fake. ``project_id``/``agent_id``/``location`` name the only agent it serves
    (ES paths without ``locations/`` are ``global``)."""

    project_id: str = "acme-bot"
    agent_id: str = "6b1c7e6e-0000-4000-8000-00000000cafe"
    location: str = "global"
    token_lifetime: int = 3599
    static_tokens: set[str] = field(default_factory=set)  # always accepted Bearer tokens
    es_answers: dict[str, dict[str, Any]] = field(default_factory=default_es_answers)
    es_fallback: dict[str, Any] = field(default_factory=default_es_fallback)
    cx_answers: dict[str, dict[str, Any]] = field(default_factory=default_cx_answers)
    cx_fallback: dict[str, Any] = field(default_factory=default_cx_fallback)
    requests: list[DialogflowRequest] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    base_url: str = ""
    tokens_issued: int = 0
    # CX session parameters, per session id.
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._accounts: dict[str, _Account] = {}
        self._tokens: dict[str, float] = {}  # token → expires at (time.time())
        self._malformed: list[str] = []
        self._hold: asyncio.Event | None = None
        self._hold_tokens: asyncio.Event | None = None
        self.held = 0
        self._ids = itertools.count(1)
        self._changed = asyncio.Condition()
        app = web.Application()
        app.router.add_post("/token", self._token)
        v2 = "/v2/projects/{project}"
        for agent in (f"{v2}/agent", f"{v2}/locations/{{location}}/agent"):
            for sessions in ("", "/environments/{environment}/users/{user}"):
                path = f"{agent}{sessions}/sessions/{{session}}:detectIntent"
                app.router.add_post(path, self._es)
        cx = "/v3/projects/{project}/locations/{location}/agents/{agent}"
        app.router.add_post(cx + "/sessions/{session}:detectIntent", self._cx)
        app.router.add_post(
            cx + "/environments/{environment}/sessions/{session}:detectIntent", self._cx
        )
        self._runner = web.AppRunner(app, access_log=None)

    async def start(self) -> FakeDialogflow:
        self.base_url = await serve_on_loopback(self._runner)
        return self

    async def stop(self) -> None:
        self.release()
        await self._runner.cleanup()

    @property
    def token_uri(self) -> str:
        return f"{self.base_url}/token"

    # scripting ---------------------------------------------------------------------------
    def service_account_file(
        self, directory: Path, *, email: str | None = None, register: bool = True
    ) -> Path:
        """Write a service-account JSON key (a fresh 2048-bit RSA key) into ``directory``.

        ``register``: the fake learns the public key (False: a key Google never issued, so
        its assertions fail the signature check).
        """
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key_id = secrets.token_hex(20)
        email = (
            email or f"convctl-bot-{secrets.token_hex(3)}@{self.project_id}.iam.gserviceaccount.com"
        )
        if register:
            self._accounts[email] = _Account(key_id, key.public_key())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        info = {
            "type": "service_account",
            "project_id": self.project_id,
            "private_key_id": key_id,
            "private_key": pem,
            "client_email": email,
            "client_id": str(100000000000000000000 + next(self._ids)),
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
            "universe_domain": "googleapis.com",
        }
        path = directory / f"service-account-{key_id[:8]}.json"
        path.write_text(json.dumps(info, indent=2))
        path.chmod(0o600)
        return path

    def fail(self, status: int, times: int | None = 1, message: str = "scripted failure") -> None:
        self.failures.append(Failure(status, times, message))

    def malformed(self, kind: str = "not_json", times: int = 1) -> None:
        """The next ``times`` answers are 200s that are not detectIntent answers:
        ``not_json`` (an HTML page), ``no_query_result``, ``wrong_types``."""
        self._malformed.extend([kind] * times)

    def hold(self, *, tokens: bool = False) -> asyncio.Event:
        """detectIntent answers (``tokens``: token answers) wait until the returned event
        is set (``release``). ``held`` counts the answers that started waiting."""
        event = asyncio.Event()
        if tokens:
            self._hold_tokens = event
        else:
            self._hold = event
        return event

    def release(self) -> None:
        for event in (self._hold, self._hold_tokens):
            if event is not None:
                event.set()
        self._hold = self._hold_tokens = None

    async def wait_held(self, count: int = 1, timeout: float = 10.0) -> None:
        """Wait until ``count`` answers are waiting (or have waited) on a hold."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: self.held >= count)

    async def _wait_hold(self, event: asyncio.Event | None) -> None:
        if event is None:
            return
        async with self._changed:
            self.held += 1
            self._changed.notify_all()
        await event.wait()

    def expire_tokens(self) -> None:
        """Every issued token stops working now (as if revoked or expired early)."""
        self._tokens.clear()

    def detect_requests(self, kind: str | None = None) -> list[DialogflowRequest]:
        """detectIntent requests received, in order (``kind``: es or cx)."""
        return [r for r in self.requests if r.kind != "token" and kind in (None, r.kind)]

    async def wait_requests(
        self, count: int, kind: str | None = None, timeout: float = 10.0
    ) -> list[DialogflowRequest]:
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: len(self.detect_requests(kind)) >= count)
        return self.detect_requests(kind)

    # handlers ----------------------------------------------------------------------------
    async def _record(self, record: DialogflowRequest) -> None:
        async with self._changed:
            self.requests.append(record)
            self._changed.notify_all()

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        await self._wait_hold(self._hold_tokens)
        fields = {k: str(v) for k, v in form.items()}
        status, body = self._grant(request, fields)
        record = DialogflowRequest("token", request.path, dict(request.headers), fields, status)
        await self._record(record)
        return web.json_response(body, status=status)

    def _grant(self, request: web.Request, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        if request.content_type != "application/x-www-form-urlencoded":
            return 400, {"error": "invalid_request", "error_description": "form body expected"}
        if form.get("grant_type") != JWT_GRANT:
            return 400, {
                "error": "unsupported_grant_type",
                "error_description": f"Invalid grant_type: {form.get('grant_type', '')}",
            }
        problem = self._check_assertion(form.get("assertion", ""))
        if problem is not None:
            return 400, {"error": problem[0], "error_description": problem[1]}
        token = f"ya29.FAKE-{next(self._ids)}-{secrets.token_urlsafe(24)}"
        self._tokens[token] = time.time() + self.token_lifetime
        self.tokens_issued += 1
        return 200, {
            "access_token": token,
            "expires_in": self.token_lifetime,
            "token_type": "Bearer",
        }

    def _check_assertion(self, assertion: str) -> tuple[str, str] | None:
        """What Google's token endpoint would refuse in a JWT-bearer assertion, or None."""
        parts = assertion.split(".")
        if len(parts) != 3:
            return "invalid_grant", "Invalid JWT: malformed assertion"
        try:
            header = json.loads(_b64url_decode(parts[0]))
            claims = json.loads(_b64url_decode(parts[1]))
            signature = _b64url_decode(parts[2])
        except (ValueError, UnicodeDecodeError):
            return "invalid_grant", "Invalid JWT: malformed assertion"
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return "invalid_grant", "Invalid JWT: malformed assertion"
        if header.get("alg") != "RS256":
            return "invalid_grant", "Invalid JWT: alg must be RS256"
        account = self._accounts.get(str(claims.get("iss")))
        if account is None:
            return "invalid_grant", "Invalid grant: account not found"
        if header.get("kid") not in (None, account.key_id):
            return "invalid_grant", "Invalid JWT Signature."
        try:
            account.public_key.verify(
                signature,
                f"{parts[0]}.{parts[1]}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except InvalidSignature:
            return "invalid_grant", "Invalid JWT Signature."
        if claims.get("aud") not in (GOOGLE_TOKEN_AUDIENCE, self.token_uri):
            return "invalid_grant", "Invalid JWT: audience mismatch"
        now = time.time()
        iat, exp = claims.get("iat"), claims.get("exp")
        if (
            not isinstance(iat, int)
            or not isinstance(exp, int)
            or iat > now + 300
            or exp < now
            or exp - iat > 3600
        ):
            return "invalid_grant", (
                "Invalid JWT: Token must be a short-lived token (60 minutes) and in a "
                "reasonable timeframe. Check your iat and exp values in the JWT claim."
            )
        scopes = set(str(claims.get("scope", "")).split())
        if not scopes & ACCEPTED_SCOPES:
            return "invalid_scope", "No Dialogflow scope in the assertion"
        return None

    def _auth_ok(self, request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer" or not token:
            return False
        if token in self.static_tokens:
            return True
        expires = self._tokens.get(token)
        return expires is not None and expires > time.time()

    async def _detect(
        self, request: web.Request, kind: str
    ) -> tuple[int, dict[str, Any] | str, str | None]:
        """(status, answer, session) of one detectIntent call."""
        info = request.match_info
        session = info["session"]
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        if not self._auth_ok(request):
            message = (
                "Request had invalid authentication credentials. Expected OAuth 2 access "
                "token, login cookie or other valid authentication credential."
            )
            return 401, google_error(401, message), session
        location = info.get("location", "global")
        if info["project"] != self.project_id or location != self.location:
            return (
                404,
                google_error(404, f"No agent found for project {info['project']!r}."),
                session,
            )
        if kind == "cx" and info["agent"] != self.agent_id:
            return 404, google_error(404, f"Agent {info['agent']!r} not found."), session
        if "user" in info and info["user"] != "-":
            return 400, google_error(400, "Only the user '-' is supported."), session
        if len(session.encode()) > SESSION_ID_MAX:
            message = f"Session id {session!r} exceeds the maximum of {SESSION_ID_MAX} characters."
            return 400, google_error(400, message), session
        problem = _invalid_es(body) if kind == "es" else _invalid_cx(body)
        if problem is not None:
            return 400, google_error(400, f"Invalid JSON payload received. {problem}"), session
        await self._wait_hold(self._hold)
        for failure in self.failures:
            if failure.times is None or failure.times > 0:
                if failure.times is not None:
                    failure.times -= 1
                return failure.status, google_error(failure.status, failure.message), session
        if self._malformed:
            return 200, _malformed_answer(self._malformed.pop(0)), session
        assert isinstance(body, dict)
        return 200, self._answer(kind, session, body), session

    def _answer(self, kind: str, session: str, body: dict[str, Any]) -> dict[str, Any]:
        query_input = body["queryInput"]
        text = str(query_input["text"]["text"])
        key = text.strip().lower()
        response_id = f"{secrets.token_hex(4)}-0000-4000-8000-{next(self._ids):012d}"
        if kind == "es":
            result = copy.deepcopy(self.es_answers.get(key, self.es_fallback))
            result["queryText"] = text
            result["languageCode"] = query_input["text"]["languageCode"]
            return {"responseId": response_id, "queryResult": result}
        result = copy.deepcopy(self.cx_answers.get(key, self.cx_fallback))
        params = self.sessions.setdefault(session, {})
        params.update(body.get("queryParams", {}).get("parameters", {}))
        params.update(result.pop("parameters", {}))
        for name in [k for k, v in params.items() if v is None]:
            del params[name]
        if params:
            result["parameters"] = dict(params)
        result["text"] = text
        result["languageCode"] = query_input["languageCode"]
        return {"responseId": response_id, "queryResult": result}

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        status, answer, session = await self._detect(request, kind)
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            body = None
        info = request.match_info
        await self._record(
            DialogflowRequest(
                kind,
                request.path,
                dict(request.headers),
                body,
                status,
                session=session,
                project=info.get("project"),
                location=info.get("location", "global"),
                environment=info.get("environment"),
            )
        )
        if isinstance(answer, str):
            return web.Response(status=status, text=answer, content_type="text/html")
        return web.json_response(answer, status=status)

    async def _es(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "es")

    async def _cx(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, "cx")


def _malformed_answer(kind: str) -> dict[str, Any] | str:
    if kind == "not_json":
        return "<html><body>502 Bad Gateway</body></html>"
    if kind == "no_query_result":
        return {"responseId": "no-query-result"}
    return {"queryResult": {"fulfillmentMessages": "oops", "responseMessages": "oops"}}


def _unknown(obj: dict[str, Any], known: frozenset[str], where: str) -> str | None:
    for name in obj:
        if name not in known:
            return f"Unknown name {name!r} at {where!r}: Cannot find field."
    return None


def _valid_zone(params: dict[str, Any]) -> bool:
    zone = params.get("timeZone")
    if zone is None:
        return True
    try:
        ZoneInfo(str(zone))
    except (ZoneInfoNotFoundError, ValueError):
        return False
    return True


def _text_problem(text: Any) -> str | None:
    if not isinstance(text, str) or not text.strip():
        return "query_input.text.text must be a non-empty string."
    if len(text) > TEXT_MAX:
        return f"Input text exceeds {TEXT_MAX} characters."
    return None


def _invalid_es(body: Any) -> str | None:
    """What ES would refuse in a detectIntent body (text input only), or None."""
    if not isinstance(body, dict) or not isinstance(body.get("queryInput"), dict):
        return "query_input is required."
    query_input = body["queryInput"]
    params = body.get("queryParams", {})
    if not isinstance(params, dict):
        return "query_params must be an object."
    problem = _unknown(query_input, ES_QUERY_INPUT, "query_input") or _unknown(
        params, ES_QUERY_PARAMS, "query_params"
    )
    if problem:
        return problem
    text = query_input.get("text")
    if not isinstance(text, dict):
        return "query_input.text is required (the fake answers text only)."
    if problem := _unknown(text, ES_TEXT, "query_input.text"):
        return problem
    if not isinstance(text.get("languageCode"), str) or not text["languageCode"]:
        return "query_input.text.language_code is required."
    if not _valid_zone(params):
        return "Invalid time zone."
    if "payload" in params and not isinstance(params["payload"], dict):
        return "query_params.payload must be an object."
    return _text_problem(text.get("text"))


def _invalid_cx(body: Any) -> str | None:
    """What CX would refuse in a detectIntent body (text input only), or None."""
    if not isinstance(body, dict) or not isinstance(body.get("queryInput"), dict):
        return "query_input is required."
    query_input = body["queryInput"]
    params = body.get("queryParams", {})
    if not isinstance(params, dict):
        return "query_params must be an object."
    problem = _unknown(query_input, CX_QUERY_INPUT, "query_input") or _unknown(
        params, CX_QUERY_PARAMS, "query_params"
    )
    if problem:
        return problem
    text = query_input.get("text")
    if not isinstance(text, dict):
        return "query_input.text is required (the fake answers text only)."
    if problem := _unknown(text, CX_TEXT, "query_input.text"):
        return problem
    if not isinstance(query_input.get("languageCode"), str) or not query_input["languageCode"]:
        return "query_input.language_code is required."
    if not _valid_zone(params):
        return "Invalid time zone."
    for name in ("parameters", "payload"):
        if name in params and not isinstance(params[name], dict):
            return f"query_params.{name} must be an object."
    return _text_problem(text.get("text"))
