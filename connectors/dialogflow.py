"""Google Dialogflow ES (v2) and CX (v3) bots: ``detectIntent`` over REST.

Both editions share the auth (a service-account key turned into OAuth2 access tokens by
google-auth, cached and refreshed before they expire, or a static token for local tests),
the regional endpoints, the session id rule (at most 36 characters) and the Google error
mapping. They differ in the request shape and in how an answer says "hand over" or "done":
ES marks the matched intent (``liveAgentHandoff``, ``endInteraction``), CX sends
``liveAgentHandoff`` and ``endInteraction`` response messages. The connector only reports
what Dialogflow said (intent, confidence, handoff, end); the rules decide what follows.
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import aiohttp
import google.auth.exceptions
import requests
import structlog
from google.auth.transport.requests import Request as GoogleRequest
from google.oauth2 import service_account
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from connectors.base import (
    Bot,
    BotButton,
    BotMessage,
    BotReply,
    BotRequest,
    BotSettings,
    ConnectorContext,
    ConnectorSettings,
    safe_session_id,
)
from controller.clock import Clock
from controller.errors import BotError, ConfigError
from controller.settings import is_placeholder

log = structlog.get_logger(__name__)

SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
SESSION_ID_MAX = 36
# A token is renewed when it has less than this left, so a call never carries one that
# expires on the way.
REFRESH_MARGIN = timedelta(minutes=5)
# Failures that happen before Dialogflow processed the query, or that Google says to retry.
RETRYABLE_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


# settings ---------------------------------------------------------------------------------
class DialogflowSettings(BotSettings):
    """What both editions need: where the agent lives and how to authenticate."""

    project_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9.:_-]*$", max_length=100)
    location: str = Field("global", pattern=r"^[a-z0-9-]+$")
    environment: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]+$")
    # A service-account JSON key; or ``access_token``, a fixed token for tests and local runs.
    credentials_file: Path | None = None
    access_token: str | None = Field(None, repr=False)
    # None: https://dialogflow.googleapis.com for "global", else the regional host.
    base_url: str | None = Field(None, pattern=r"^https?://[^\s/]+(/[^\s]*)?$")
    language_codes: dict[str, str] = Field(default_factory=dict)  # our language → Dialogflow's
    default_language: str = Field("en", min_length=2)
    time_zone: str | None = None
    quota_project: str | None = None  # sent as x-goog-user-project (the billed project)

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                ZoneInfo(value)
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _one_credential(self) -> DialogflowSettings:
        if (self.credentials_file is None) == (self.access_token is None):
            raise ValueError("set exactly one of credentials_file and access_token")
        if self.access_token is not None and is_placeholder(self.access_token):
            raise ValueError("access_token is missing or a placeholder")
        return self

    def api_base(self) -> str:
        """The API host: the override, the global host, or the location's regional host."""
        if self.base_url:
            return self.base_url
        if self.location == "global":
            return "https://dialogflow.googleapis.com"
        return f"https://{self.location}-dialogflow.googleapis.com"

    def language_code(self, language: str) -> str:
        """Dialogflow's languageCode for one of ours (mapped, else passed through)."""
        lang = language or self.default_language
        return self.language_codes.get(lang) or self.language_codes.get(lang.split("-")[0]) or lang


class DialogflowESSettings(DialogflowSettings):
    handoff_intents: list[str] = Field(default_factory=list)  # display names meaning "a person"
    handoff_actions: list[str] = Field(default_factory=list)  # actions meaning "a person"


class DialogflowCXSettings(DialogflowSettings):
    agent_id: str = Field(pattern=r"^[A-Za-z0-9-]+$")
    # endInteraction means "hand over" rather than "done" (default: done, bot.ended).
    end_is_handoff: bool = False


# access tokens ----------------------------------------------------------------------------
class _TimedRequest(GoogleRequest):
    """google-auth's requests transport with our timeout instead of its 120 s default."""

    def __init__(self, session: requests.Session, timeout: float) -> None:
        super().__init__(session=session)
        self._timeout = timeout

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["timeout"] = self._timeout
        return super().__call__(*args, **kwargs)  # type: ignore[no-untyped-call]


class AccessTokens:
    """OAuth2 access tokens of a service account, cached until they are about to expire.

    google-auth's refresh is blocking, so it runs in a thread; one refresh at a time (a lock,
    and a shared future so a caller cancelled by its timeout does not start a second one).
    Expiry is kept on the service clock: google-auth reports it on the wall clock, so the
    remaining lifetime is measured right after the refresh and added to ``clock.now()``.
    """

    def __init__(self, path: Path, clock: Clock, timeout: float) -> None:
        try:
            creds = service_account.Credentials.from_service_account_file  # untyped
            self._creds = creds(str(path), scopes=list(SCOPES))  # type: ignore[no-untyped-call]
        except (OSError, ValueError, KeyError) as exc:
            raise ConfigError(f"cannot read service-account key {path}: {exc}") from exc
        self.email: str = self._creds.service_account_email
        self._clock = clock
        self._session = requests.Session()
        self._request = _TimedRequest(self._session, timeout)
        self._lock = asyncio.Lock()
        self._refresh: asyncio.Future[tuple[str, timedelta | None]] | None = None
        self._token: str | None = None
        self._expires_at: datetime | None = None

    def _fresh(self) -> bool:
        if self._token is None:
            return False
        return self._expires_at is None or self._clock.now() < self._expires_at - REFRESH_MARGIN

    async def token(self, *, stale: str | None = None) -> str:
        """A valid token. ``stale``: a token the API refused; replaced unless already done."""
        async with self._lock:
            if self._fresh() and (stale is None or self._token != stale):
                assert self._token is not None
                return self._token
            if self._refresh is None or self._refresh.done():
                self._refresh = asyncio.ensure_future(asyncio.to_thread(self._fetch))
                self._refresh.add_done_callback(self._refreshed)
            try:
                token, _ = await asyncio.shield(self._refresh)
            except google.auth.exceptions.TransportError as exc:
                raise BotError(f"unavailable: token request failed: {exc}") from exc
            except google.auth.exceptions.RefreshError as exc:
                retryable = bool(getattr(exc, "retryable", False))
                reason = "unavailable" if retryable else "rejected"
                raise BotError(f"{reason}: token refused: {exc}", retryable=retryable) from exc
            return token

    def _refreshed(self, done: asyncio.Future[tuple[str, timedelta | None]]) -> None:
        """Keep a new token, even when the caller who asked for it was cancelled meanwhile
        (the exception of a failed refresh is read here, so it is never "unretrieved")."""
        if done.cancelled() or done.exception() is not None:
            return
        token, lifetime = done.result()
        self._token = token
        self._expires_at = None if lifetime is None else self._clock.now() + lifetime
        log.info("dialogflow_token_refreshed", account=self.email)

    def _fetch(self) -> tuple[str, timedelta | None]:
        """Runs in a thread: one token request to the key's token_uri."""
        self._creds.refresh(self._request)
        expiry = self._creds.expiry  # naive UTC, on the wall clock
        lifetime = None
        if expiry is not None:
            lifetime = expiry - datetime.now(UTC).replace(tzinfo=None)
        return str(self._creds.token), lifetime

    def close(self) -> None:
        self._session.close()


# answers (proto3 JSON: lowerCamelCase, omitted fields absent) -----------------------------
class _Wire(BaseModel):
    model_config = ConfigDict(extra="ignore", alias_generator=to_camel, populate_by_name=True)


class _ESIntent(_Wire):
    display_name: str | None = None
    is_fallback: bool = False
    live_agent_handoff: bool = False
    end_interaction: bool = False


class _ESResult(_Wire):
    action: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    fulfillment_text: str | None = None
    fulfillment_messages: list[dict[str, Any]] = Field(default_factory=list)
    intent: _ESIntent | None = None
    intent_detection_confidence: float | None = None
    webhook_status: dict[str, Any] | None = None


class _ESResponse(_Wire):
    response_id: str | None = None
    query_result: _ESResult


class _CXIntent(_Wire):
    display_name: str | None = None


class _CXMatch(_Wire):
    intent: _CXIntent | None = None
    match_type: str | None = None
    confidence: float | None = None


class _CXResult(_Wire):
    parameters: dict[str, Any] = Field(default_factory=dict)
    response_messages: list[dict[str, Any]] = Field(default_factory=list)
    match: _CXMatch | None = None
    intent_detection_confidence: float | None = None


class _CXResponse(_Wire):
    response_id: str | None = None
    query_result: _CXResult


AnswerT = TypeVar("AnswerT", bound=_Wire)


class _GoogleError(_Wire):
    code: int | None = None
    message: str = ""
    status: str = ""


class _GoogleErrorBody(_Wire):
    error: _GoogleError


def _text_of(item: Any) -> str:
    """``{"text": ["a", "b"]}`` → "a\\nb"."""
    lines = item.get("text") if isinstance(item, dict) else None
    if not isinstance(lines, list):
        return ""
    return "\n".join(str(line) for line in lines if isinstance(line, str) and line)


def _handoff_payload(payload: dict[str, Any]) -> dict[str, Any] | None:
    """A custom payload that asks for a person (``{"handoff": true, …}``): its other keys."""
    if payload.get("handoff") is True:
        return {k: v for k, v in payload.items() if k != "handoff"}
    return None


def error_of(status: int, raw: bytes) -> BotError:
    """A Google error answer as a BotError: 429 and 5xx retryable, the rest not."""
    detail = ""
    try:
        error = _GoogleErrorBody.model_validate_json(raw).error
        detail = f" {error.status}: {error.message}".rstrip(": ")
    except ValidationError:
        detail = ""
    retryable = status in RETRYABLE_STATUSES or status >= 500
    reason = "unavailable" if retryable else "rejected"
    return BotError(f"{reason}: dialogflow HTTP {status}{detail}"[:500], retryable=retryable)


def session_id(conversation_id: str) -> str:
    """The Dialogflow session id of a conversation: at most 36 characters, no ``:``.

    A ``:`` would read as the start of the ``:detectIntent`` suffix, so such ids are hashed.
    """
    sid = safe_session_id(conversation_id, SESSION_ID_MAX)
    if ":" in sid or len(sid) > SESSION_ID_MAX:
        sid = hashlib.sha256(conversation_id.encode()).hexdigest()[:SESSION_ID_MAX]
    return sid


# the connectors ---------------------------------------------------------------------------
class DialogflowBot(Bot):
    """What ES and CX share: tokens, the call, the error mapping."""

    settings: DialogflowSettings  # type: ignore[assignment]

    def __init__(self, name: str, settings: ConnectorSettings, context: ConnectorContext) -> None:
        super().__init__(name, settings, context)
        s = self.settings
        self._tokens: AccessTokens | None = None
        if s.credentials_file is not None:
            self._tokens = AccessTokens(s.credentials_file, context.clock, s.timeout)

    async def stop(self) -> None:
        if self._tokens is not None:
            self._tokens.close()

    @abc.abstractmethod
    def detect_intent_url(self, session: str) -> str:
        """The detectIntent URL of a session (regional host and path agree)."""

    @abc.abstractmethod
    def _body(self, request: BotRequest) -> dict[str, Any]:
        """The detectIntent request body."""

    @abc.abstractmethod
    def _reply(self, raw: bytes) -> BotReply:
        """The answer as a BotReply; raises BotError("malformed: …") for a broken one."""

    async def ask(self, request: BotRequest) -> BotReply:
        url = self.detect_intent_url(session_id(request.conversation_id))
        raw = await self._detect_intent(url, self._body(request))
        return self._reply(raw)

    async def _token(self, stale: str | None = None) -> str:
        if self._tokens is None:
            assert self.settings.access_token is not None
            return self.settings.access_token
        return await self._tokens.token(stale=stale)

    async def _detect_intent(self, url: str, body: dict[str, Any]) -> bytes:
        token = await self._token()
        status, raw = await self._post(url, body, token)
        if status == 401 and self._tokens is not None:
            # The token was revoked or expired early: renew it once and ask again (a 401
            # means the query was not processed, so the retry cannot double a turn).
            token = await self._token(stale=token)
            status, raw = await self._post(url, body, token)
        if 200 <= status < 300:
            return raw
        raise error_of(status, raw)

    async def _post(self, url: str, body: dict[str, Any], token: str) -> tuple[int, bytes]:
        http = self.context.http
        if http is None or http.closed:  # not started yet, or shutting down: try later
            raise BotError("unavailable: the service is not running", retryable=True)
        headers = {"Authorization": f"Bearer {token}"}
        if self.settings.quota_project:
            headers["x-goog-user-project"] = self.settings.quota_project
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout)
        try:
            async with http.post(url, json=body, headers=headers, timeout=timeout) as resp:
                return resp.status, await resp.read()
        except TimeoutError as exc:
            # detectIntent is not idempotent (it advances the session), and after a read
            # timeout Dialogflow may have processed the turn. We still let the outbox ask
            # again: a repeated turn is a smaller harm than a customer left without answer.
            raise BotError(
                f"timeout: dialogflow did not answer within {self.settings.timeout:g} s"
            ) from exc
        except aiohttp.ClientError as exc:
            raise BotError(f"unavailable: {type(exc).__name__}: {exc}") from exc

    def _query_params(self, request: BotRequest) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.settings.time_zone:
            params["timeZone"] = self.settings.time_zone
        payload = {"channel": request.channel, "customer_id": request.customer_id}
        if payload := {k: v for k, v in payload.items() if v}:
            params["payload"] = payload
        return params


def _malformed(what: str, exc: Exception) -> BotError:
    problem = f"{exc.error_count()} invalid fields" if isinstance(exc, ValidationError) else exc
    return BotError(f"malformed: dialogflow {what} answer: {problem}", retryable=False)


def _parse(model: type[AnswerT], raw: bytes, what: str) -> AnswerT:
    """The answer body as ``model``; anything else is malformed (not retryable)."""
    try:
        return model.model_validate(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:  # ValidationError is a ValueError
        raise _malformed(what, exc) from exc


class DialogflowESBot(DialogflowBot):
    """A Dialogflow ES (v2) agent."""

    settings_model: ClassVar[type[ConnectorSettings]] = DialogflowESSettings
    settings: DialogflowESSettings  # type: ignore[assignment]

    def detect_intent_url(self, session: str) -> str:
        s = self.settings
        agent = f"projects/{s.project_id}"
        if s.location != "global":
            agent += f"/locations/{s.location}"
        agent += "/agent"
        if s.environment:
            agent += f"/environments/{s.environment}/users/-"
        return f"{s.api_base()}/v2/{agent}/sessions/{session}:detectIntent"

    def _body(self, request: BotRequest) -> dict[str, Any]:
        language = self.settings.language_code(request.language)
        return {
            "queryInput": {"text": {"text": request.text, "languageCode": language}},
            "queryParams": self._query_params(request),
        }

    def _reply(self, raw: bytes) -> BotReply:
        result = _parse(_ESResponse, raw, "ES").query_result
        s = self.settings
        status = result.webhook_status or {}
        if status.get("code"):
            log.warning("dialogflow_webhook_failed", bot=self.name, status=status)
        messages, handoff_data = _es_messages(result.fulfillment_messages)
        if not messages and result.fulfillment_text:
            messages.append(BotMessage(result.fulfillment_text))
        intent = result.intent or _ESIntent()
        handoff = (
            intent.live_agent_handoff
            or handoff_data is not None
            or (intent.display_name is not None and intent.display_name in s.handoff_intents)
            or (result.action is not None and result.action in s.handoff_actions)
        )
        fallback = intent.is_fallback or result.action == "input.unknown"
        return BotReply(
            messages=tuple(messages),
            handoff=handoff,
            # A handoff ends the bot's part by itself; "ended" alone means "done".
            ended=intent.end_interaction and not handoff,
            intent=intent.display_name,
            confidence=result.intent_detection_confidence,
            slots=dict(result.parameters),
            handoff_data=handoff_data or {},
            failed="fallback" if fallback and not handoff else None,
        )


def _es_messages(items: Iterable[dict[str, Any]]) -> tuple[list[BotMessage], dict[str, Any] | None]:
    """The default platform's fulfillment messages, and the handoff payload if one asks."""
    messages: list[BotMessage] = []
    handoff: dict[str, Any] | None = None
    for item in items:
        if item.get("platform") not in (None, "PLATFORM_UNSPECIFIED"):
            continue  # written for another integration (Facebook, Slack…)
        if "text" in item:
            if text := _text_of(item["text"]):
                messages.append(BotMessage(text))
        elif isinstance(quick := item.get("quickReplies"), dict):
            replies = [r for r in quick.get("quickReplies", []) if isinstance(r, str) and r]
            buttons = tuple(BotButton(r, r) for r in replies)
            messages.append(BotMessage(str(quick.get("title") or ""), buttons=buttons))
        elif isinstance(image := item.get("image"), dict) and image.get("imageUri"):
            messages.append(BotMessage(image=str(image["imageUri"])))
        elif isinstance(card := item.get("card"), dict):
            text = "\n".join(str(card[k]) for k in ("title", "subtitle") if card.get(k))
            buttons = tuple(
                BotButton(str(b["text"]), str(b.get("postback") or b["text"]))
                for b in card.get("buttons", [])
                if isinstance(b, dict) and b.get("text")
            )
            messages.append(BotMessage(text, buttons=buttons, image=card.get("imageUri") or None))
        elif isinstance(payload := item.get("payload"), dict):
            messages.append(BotMessage(custom=payload))
            if (asked := _handoff_payload(payload)) is not None:
                handoff = {**(handoff or {}), **asked}
    return messages, handoff


class DialogflowCXBot(DialogflowBot):
    """A Dialogflow CX (v3) agent. Session parameters travel both ways: the conversation's
    attributes go in as ``queryParams.parameters``, the answer's parameters come back as
    attributes to keep."""

    settings_model: ClassVar[type[ConnectorSettings]] = DialogflowCXSettings
    settings: DialogflowCXSettings  # type: ignore[assignment]

    def detect_intent_url(self, session: str) -> str:
        s = self.settings
        agent = f"projects/{s.project_id}/locations/{s.location}/agents/{s.agent_id}"
        if s.environment:
            agent += f"/environments/{s.environment}"
        return f"{s.api_base()}/v3/{agent}/sessions/{session}:detectIntent"

    def _body(self, request: BotRequest) -> dict[str, Any]:
        params = self._query_params(request)
        if request.attributes:
            params["parameters"] = dict(request.attributes)
        return {
            "queryInput": {
                "text": {"text": request.text},
                "languageCode": self.settings.language_code(request.language),
            },
            "queryParams": params,
        }

    def _reply(self, raw: bytes) -> BotReply:
        result = _parse(_CXResponse, raw, "CX").query_result
        messages: list[BotMessage] = []
        handoff_data: dict[str, Any] = {}
        handoff = ended = False
        for item in result.response_messages:
            if "text" in item:
                if text := _text_of(item["text"]):
                    messages.append(BotMessage(text))
            elif isinstance(payload := item.get("payload"), dict):
                messages.append(BotMessage(custom=payload))
                if (asked := _handoff_payload(payload)) is not None:
                    handoff = True
                    handoff_data.update(asked)
            elif isinstance(live := item.get("liveAgentHandoff"), dict):
                handoff = True
                metadata = live.get("metadata")
                if isinstance(metadata, dict):
                    handoff_data.update(metadata)
            elif "endInteraction" in item:
                ended = True
        if ended and self.settings.end_is_handoff:
            handoff = True
        match = result.match or _CXMatch()
        failed = None
        if match.match_type in ("NO_MATCH", "NO_INPUT") and not handoff:
            failed = match.match_type.lower()
        parameters = dict(result.parameters)
        return BotReply(
            messages=tuple(messages),
            handoff=handoff,
            # The session reaches End Session after a handoff too: that end is the handoff's.
            ended=ended and not handoff,
            intent=match.intent.display_name if match.intent else None,
            confidence=(
                match.confidence
                if match.confidence is not None
                else result.intent_detection_confidence
            ),
            slots=parameters,
            attributes={k: v for k, v in parameters.items() if v is not None},
            handoff_data=handoff_data,
            failed=failed,
        )
