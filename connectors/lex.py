"""The Amazon Lex V2 bot: ``lexv2-runtime`` RecognizeText through aiobotocore, signed with SigV4.

One Lex session per conversation (``sessionId`` is the conversation id made Lex-safe). The
conversation's attributes travel to Lex as session attributes on every turn, and what the bot
sets or changes in its session attributes comes back as ``BotReply.attributes``, so the service
keeps them on the conversation and sends them again next turn: the conversation, not Lex's idle
session store (which forgets after the bot's idle timeout), is where they live. A bot cannot
delete a conversation attribute this way, only overwrite it.
Wire facts: ``protocols/amazon-lex-v2.md``.

Handoff is not a Lex primitive; a turn hands over when any of these holds (sheet §5):
the intent is one of ``handoff_intents``, the session attribute ``handoff`` is ``"true"``, or a
``CustomPayload`` message is JSON with ``"handoff": true``. The handoff markers are never kept
on the conversation (nor sent back to Lex), so a bot invited again later does not hand over at
once because of an old turn.

Retries: botocore retries throttling, 5xx and connection errors itself (``standard`` mode,
``botocore_max_attempts`` attempts), and the service asks again through its outbox when
``ask`` raises a retryable ``BotError``; the two multiply, so botocore's share stays small.
``ask`` has its own deadline (``timeout``) and botocore's read timeout is set past it: a request
Lex received but did not answer in time is never resent by botocore (Lex takes no idempotency
key; a resend would be a second turn), only by the service's at-least-once retry.
"""

from __future__ import annotations

import asyncio
import html
import json
import re
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any, ClassVar

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    ParamValidationError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from botocore.parsers import ResponseParserError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.base import (
    Bot,
    BotButton,
    BotMessage,
    BotReply,
    BotRequest,
    BotSettings,
    ConnectorSettings,
    safe_session_id,
)
from controller.errors import BotError
from controller.settings import is_placeholder

log = structlog.get_logger(__name__)

SERVICE = "lexv2-runtime"
MAX_TEXT = 1024  # RecognizeText ``text``: 1 to 1024 characters
MAX_SESSION_ID = 100
# Error codes worth asking again (sheet §3); every other code is a configuration or input
# problem that a retry cannot fix.
RETRYABLE_CODES = frozenset(
    {
        "ThrottlingException",
        "ConflictException",
        "InternalServerException",
        "BadGatewayException",
        "DependencyFailedException",
        "ServiceUnavailableException",
        "RequestTimeout",
        "RequestTimeoutException",
    }
)
_TAG = re.compile(r"<[^>]*>")
_SPACE = re.compile(r"\s+")


# settings ---------------------------------------------------------------------------------
class LexSettings(BotSettings):
    """One Lex V2 bot alias. Without keys, botocore's default credential chain is used
    (environment, shared files, the instance or task role)."""

    region: str = Field(pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$")
    bot_id: str = Field(pattern=r"^[0-9a-zA-Z]{10}$")
    bot_alias_id: str = Field(pattern=r"^[0-9a-zA-Z]{1,100}$")
    # The customer's language (``en``, ``pt-BR``) → a locale the bot is built for; languages
    # not listed use ``locale_id``.
    locales: dict[str, str] = Field(default_factory=dict)
    locale_id: str = Field("en_US", pattern=r"^[a-z]{2,3}_[A-Z0-9]{2,3}$")
    aws_access_key_id: str | None = Field(None, repr=False)
    aws_secret_access_key: str | None = Field(None, repr=False)
    aws_session_token: str | None = Field(None, repr=False)
    endpoint_url: str | None = Field(None, pattern=r"^https?://[^\s/]+")  # None: AWS's endpoint
    handoff_intents: list[str] = Field(default_factory=lambda: ["TalkToAgent"])
    fallback_intents: list[str] = Field(default_factory=lambda: ["AMAZON.FallbackIntent"])
    # Intents whose ``Close`` ends the conversation (none by default: most intents close
    # themselves and the conversation goes on).
    end_intents: list[str] = Field(default_factory=list)
    # The session attributes a bot (or its Lambda) uses to ask for a handoff.
    handoff_attribute: str = Field("handoff", min_length=1)
    handoff_queue_attribute: str = Field("handoffQueue", min_length=1)
    handoff_reason_attribute: str = Field("handoffReason", min_length=1)
    # botocore's own attempts per ask, the first included (it retries throttling, 5xx and
    # connection errors). The service asks again up to ``max_attempts`` times on top, and the
    # two multiply, so this stays small.
    botocore_max_attempts: int = Field(2, ge=1, le=5)
    connect_timeout: float = Field(5.0, gt=0, le=60)

    @model_validator(mode="after")
    def _credentials(self) -> LexSettings:
        key, secret = self.aws_access_key_id, self.aws_secret_access_key
        if (key is None) != (secret is None):
            raise ValueError("set both aws_access_key_id and aws_secret_access_key, or neither")
        if any(v is not None and is_placeholder(v) for v in (key, secret)):
            raise ValueError("aws_access_key_id or aws_secret_access_key is a placeholder")
        if self.aws_session_token is not None and key is None:
            raise ValueError("aws_session_token needs aws_access_key_id and aws_secret_access_key")
        for locale in self.locales.values():
            if not re.fullmatch(r"[a-z]{2,3}_[A-Z0-9]{2,3}", locale):
                raise ValueError(f"locales: {locale!r} is not a Lex locale id such as en_US")
        return self

    def locale_for(self, language: str) -> str:
        """The bot locale for a customer language: exact match, then the primary subtag."""
        if not language:
            return self.locale_id
        for key in (language, language.replace("_", "-").split("-")[0]):
            found = self.locales.get(key) or self.locales.get(key.lower())
            if found:
                return found
        return self.locale_id


# Lex's answer (unknown fields are tolerated: AWS adds fields without notice) ------------------
class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Button(_Payload):
    text: str
    value: str


class _Card(_Payload):
    title: str = ""
    subtitle: str | None = None
    imageUrl: str | None = None
    buttons: list[_Button] = Field(default_factory=list)


class _Message(_Payload):
    contentType: str
    content: str | None = None
    imageResponseCard: _Card | None = None


class _Intent(_Payload):
    name: str
    state: str | None = None
    slots: dict[str, Any] | None = None


class _DialogAction(_Payload):
    type: str
    slotToElicit: str | None = None


class _SessionState(_Payload):
    dialogAction: _DialogAction | None = None
    intent: _Intent | None = None
    sessionAttributes: dict[str, str] = Field(default_factory=dict)


class _Confidence(_Payload):
    score: float


class _Interpretation(_Payload):
    intent: _Intent | None = None
    nluConfidence: _Confidence | None = None


class _Answer(_Payload):
    messages: list[_Message] | None = None
    sessionState: _SessionState  # Lex always returns the session state
    interpretations: list[_Interpretation] = Field(default_factory=list)
    sessionId: str | None = None


# the connector ------------------------------------------------------------------------------
class LexBot(Bot):
    """Asks an Amazon Lex V2 bot alias, one Lex session per conversation."""

    settings_model: ClassVar[type[ConnectorSettings]] = LexSettings
    settings: LexSettings  # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        # One turn at a time per Lex session: two at once get a ConflictException (409).
        self._locks: dict[str, asyncio.Lock] = {}
        self._waiting: dict[str, int] = {}

    async def start(self) -> None:
        """Create the one aiobotocore client every ask reuses."""
        s = self.settings
        config = AioConfig(
            # ``total_max_attempts`` counts the first try; ``max_attempts`` would count retries.
            retries={"mode": "standard", "total_max_attempts": s.botocore_max_attempts},
            connect_timeout=min(s.connect_timeout, s.timeout),
            # Past ask's own deadline, so botocore never resends a request Lex may have
            # processed (see the module docstring).
            read_timeout=s.timeout + 5.0,
        )
        credentials: dict[str, str] = {}
        if s.aws_access_key_id is not None and s.aws_secret_access_key is not None:
            credentials = {
                "aws_access_key_id": s.aws_access_key_id,
                "aws_secret_access_key": s.aws_secret_access_key,
            }
            if s.aws_session_token is not None:
                credentials["aws_session_token"] = s.aws_session_token
        stack = AsyncExitStack()
        self._client = await stack.enter_async_context(
            get_session().create_client(
                SERVICE,
                region_name=s.region,
                endpoint_url=s.endpoint_url,
                config=config,
                **credentials,
            )
        )
        self._stack = stack

    async def stop(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()

    async def ask(self, request: BotRequest) -> BotReply:
        if self._client is None:
            raise BotError(f"unavailable: lex bot {self.name!r} is not started", retryable=True)
        text = request.text.strip()
        if not text:
            # Lex refuses empty text; a message without text (an image) is not a turn.
            return BotReply()
        if len(text) > MAX_TEXT:
            log.info("lex.text_truncated", bot=self.name, length=len(text))
            text = text[:MAX_TEXT]
        session_id = safe_session_id(request.conversation_id, MAX_SESSION_ID)
        sent = self._session_attributes(request)
        async with self._session_lock(session_id):
            raw = await self._recognize(request, session_id, text, sent)
        return self._reply(raw, sent)

    # calling Lex --------------------------------------------------------------------------
    @asynccontextmanager
    async def _session_lock(self, session_id: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(session_id, asyncio.Lock())
        self._waiting[session_id] = self._waiting.get(session_id, 0) + 1
        try:
            async with lock:
                yield
        finally:
            self._waiting[session_id] -= 1
            if not self._waiting[session_id]:
                del self._waiting[session_id], self._locks[session_id]

    def _session_attributes(self, request: BotRequest) -> dict[str, str]:
        """The conversation's attributes (Lex takes strings only) plus the channel, without
        the handoff markers (an old handoff must not trigger again)."""
        s = self.settings
        markers = {s.handoff_attribute, s.handoff_queue_attribute, s.handoff_reason_attribute}
        attributes = {str(k): str(v) for k, v in request.attributes.items() if k not in markers}
        if request.channel:
            attributes.setdefault("channel", request.channel)
        return attributes

    async def _recognize(
        self, request: BotRequest, session_id: str, text: str, attributes: dict[str, str]
    ) -> Mapping[str, Any]:
        s = self.settings
        try:
            async with asyncio.timeout(s.timeout):
                answer: Mapping[str, Any] = await self._client.recognize_text(
                    botId=s.bot_id,
                    botAliasId=s.bot_alias_id,
                    localeId=s.locale_for(request.language),
                    sessionId=session_id,
                    text=text,
                    sessionState={"sessionAttributes": attributes},
                    requestAttributes={"x-convctl-mode": request.mode},
                )
        except TimeoutError as exc:
            raise BotError(
                f"timeout: lex: no answer within {s.timeout:g} s", retryable=True
            ) from exc
        except ClientError as exc:
            raise _client_error(exc) from exc
        except (HTTPClientError, BotocoreConnectionError, aiohttp.ClientError) as exc:
            raise BotError(f"unavailable: lex: connection failed: {exc}", retryable=True) from exc
        except NoCredentialsError as exc:
            raise BotError("rejected: lex: no AWS credentials found", retryable=False) from exc
        except ResponseParserError as exc:
            raise BotError(f"malformed: lex: {exc}", retryable=False) from exc
        except ParamValidationError as exc:
            raise BotError(f"rejected: lex: {exc}", retryable=False) from exc
        except BotoCoreError as exc:
            raise BotError(f"rejected: lex: {type(exc).__name__}: {exc}", retryable=False) from exc
        except (TypeError, AttributeError, ValueError, KeyError) as exc:
            # botocore's parser stumbles on bodies whose shapes are not Lex's.
            raise BotError(
                f"malformed: lex: malformed answer ({type(exc).__name__})", retryable=False
            ) from exc
        return answer

    # mapping the answer -------------------------------------------------------------------
    def _reply(self, raw: Mapping[str, Any], sent: dict[str, str]) -> BotReply:
        s = self.settings
        try:
            answer = _Answer.model_validate(dict(raw))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3]
            )
            raise BotError(
                f"malformed: lex: unexpected answer: {problems}", retryable=False
            ) from exc
        state = answer.sessionState
        intent = state.intent.name if state.intent else None
        attributes = state.sessionAttributes

        messages: list[BotMessage] = []
        handoff_data: dict[str, Any] = {}
        payload_handoff = False
        for message in answer.messages or ():
            mapped = _message(message)
            if mapped is None:
                continue
            messages.append(mapped)
            custom = mapped.custom or {}
            if custom.get("handoff") is True:
                payload_handoff = True
                handoff_data.update({k: v for k, v in custom.items() if k != "handoff"})

        attribute_handoff = attributes.get(s.handoff_attribute, "").lower() == "true"
        if attribute_handoff:
            for key, attribute in (
                ("queue", s.handoff_queue_attribute),
                ("reason", s.handoff_reason_attribute),
            ):
                if attributes.get(attribute):
                    handoff_data.setdefault(key, attributes[attribute])
        handoff = intent in s.handoff_intents or attribute_handoff or payload_handoff

        failed: str | None = None
        if not handoff and intent is not None:
            if intent in s.fallback_intents:
                failed = "fallback"
            elif state.intent is not None and state.intent.state == "Failed":
                failed = "intent_failed"
        action = state.dialogAction.type if state.dialogAction else None
        ended = not handoff and action == "Close" and intent in s.end_intents

        markers = {s.handoff_attribute, s.handoff_queue_attribute, s.handoff_reason_attribute}
        kept = {k: v for k, v in attributes.items() if k not in markers and sent.get(k) != v}
        return BotReply(
            messages=tuple(messages),
            handoff=handoff,
            ended=ended,
            intent=intent,
            confidence=_confidence(answer, intent),
            slots=_slots(state.intent.slots if state.intent else None),
            attributes=kept,
            handoff_data=handoff_data,
            failed=failed,
        )


def _client_error(exc: ClientError) -> BotError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "Unknown")
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    retryable = code in RETRYABLE_CODES or status == 429 or status >= 500
    message = str(error.get("Message") or "")
    # The reason first: the service reads it from the message (controller.bots).
    reason = "unavailable" if retryable else "rejected"
    return BotError(f"{reason}: lex: {code} ({status}): {message}"[:500], retryable=retryable)


def _message(message: _Message) -> BotMessage | None:
    kind = message.contentType
    if kind == "PlainText":
        return BotMessage(text=message.content) if message.content else None
    if kind == "SSML":
        text = _SPACE.sub(" ", html.unescape(_TAG.sub(" ", message.content or ""))).strip()
        return BotMessage(text=text) if text else None
    if kind == "ImageResponseCard":
        card = message.imageResponseCard
        if card is None:
            return None
        text = "\n".join(part for part in (card.title, card.subtitle) if part)
        buttons = tuple(BotButton(title=b.text, payload=b.value) for b in card.buttons)
        return BotMessage(text=text, buttons=buttons, image=card.imageUrl or None)
    if kind == "CustomPayload":
        raw = message.content or ""
        try:
            parsed = json.loads(raw)
        except ValueError:
            parsed = None
        custom = parsed if isinstance(parsed, dict) else {"content": raw}
        return BotMessage(custom=custom)
    log.info("lex.unknown_content_type", content_type=kind)
    return BotMessage(text=message.content) if message.content else None


def _confidence(answer: _Answer, intent: str | None) -> float | None:
    for interpretation in answer.interpretations:
        found = interpretation.intent
        if found is not None and found.name == intent and interpretation.nluConfidence:
            return interpretation.nluConfidence.score
    return None


def _slots(slots: Mapping[str, Any] | None) -> dict[str, Any]:
    """``{name: interpretedValue}``; unfilled slots are None, list slots lists, composite
    slots dicts of their sub-slots."""
    return {name: _slot_value(slot) for name, slot in (slots or {}).items()}


def _slot_value(slot: Any) -> Any:
    if not isinstance(slot, Mapping):
        return None
    value = slot.get("value")
    if slot.get("shape") == "List" and isinstance(slot.get("values"), list):
        return [_slot_value(item) for item in slot["values"]]
    if slot.get("shape") == "Composite" and isinstance(slot.get("subSlots"), Mapping):
        return _slots(slot["subSlots"])
    return value.get("interpretedValue") if isinstance(value, Mapping) else None
