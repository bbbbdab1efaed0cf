"""The custom bot connector: any bot that speaks convctl's documented, signed HTTP contract.

We POST each customer message to the bot's ``url``, signed with the instance's ``secret``
(``controller.signing``: ``Convctl-Timestamp``, ``Convctl-Signature``, ``Convctl-Delivery-Id``).
The bot answers at once (``200`` with an answer body) or later (``202``, then a signed POST to
``/connectors/bots/{name}/callback``). The contract for bot developers is
``docs/custom-bot.md`` and ``docs/custom-bot.openapi.yaml``; ``examples/custom_bot/bot.py``
implements it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote

import aiohttp
import structlog
from aiohttp import web
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from connectors.base import (
    Bot,
    BotButton,
    BotCallback,
    BotMessage,
    BotReply,
    BotRequest,
    BotSettings,
    ConnectorSettings,
    read_body,
)
from controller.errors import BotError, Forbidden, RequestError, WebhookAuthError
from controller.settings import is_placeholder
from controller.signing import DEFAULT_TOLERANCE, SignatureError, sign, verify

log = structlog.get_logger(__name__)

CONTRACT_VERSION = 1
USER_AGENT = f"convctl-custom-bot/{CONTRACT_VERSION}"
MIN_SECRET_LENGTH = 16
# Statuses after which asking again may succeed (the bot was busy or down).
_RETRYABLE_STATUSES = frozenset({408, 425, 429})


# settings ---------------------------------------------------------------------------------
def _real_secret(value: str) -> str:
    if is_placeholder(value) or len(value.strip()) < MIN_SECRET_LENGTH:
        raise ValueError(
            f"secret is missing, a placeholder or shorter than {MIN_SECRET_LENGTH} characters"
        )
    return value


Secret = Annotated[str, AfterValidator(_real_secret)]
_BASE_URL = r"^https?://[^\s/]+(/\S*)?$"


class CustomBotSettings(BotSettings):
    """One custom bot: where it listens, the shared secret, and where it calls us back."""

    url: str = Field(pattern=_BASE_URL)  # the bot's endpoint we POST messages to
    secret: Secret = Field(repr=False)  # signs what we send and what the bot calls back with
    # Also accepted on callbacks while a secret is being rotated out (we sign with ``secret``).
    previous_secrets: list[Secret] = Field(default_factory=list, repr=False)
    # Our public base URL as the bot reaches it; without it no ``callback_url`` is sent and an
    # asynchronous bot must be configured with the callback URL itself.
    callback_base_url: str | None = Field(default=None, pattern=_BASE_URL)
    callback_tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=1, le=3600)
    max_answer_bytes: int = Field(default=1024 * 1024, ge=1024)
    max_callback_bytes: int = Field(default=256 * 1024, ge=1024)

    @field_validator("callback_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        return value.rstrip("/") if value else value


# the answer, as the bot sends it ----------------------------------------------------------
class _Wire(BaseModel):
    # Strict and closed: a misspelt field or a number where text belongs is an error the bot
    # developer sees, not an answer silently lost.
    model_config = ConfigDict(extra="forbid", strict=True)


class ButtonBody(_Wire):
    title: str = Field(min_length=1, max_length=256)
    payload: str = Field(min_length=1, max_length=1024)


class ReplyBody(_Wire):
    text: str = Field(default="", max_length=10_000)
    buttons: list[ButtonBody] = Field(default_factory=list, max_length=20)
    image: str | None = Field(default=None, pattern=r"^https?://\S+$", max_length=2048)
    custom: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _not_empty(self) -> ReplyBody:
        if not (self.text or self.buttons or self.image or self.custom is not None):
            raise ValueError("a reply needs text, buttons, image or custom")
        return self


class HandoffBody(BaseModel):
    """Where the bot wants the customer to go; extra keys are passed to the rules as they are."""

    model_config = ConfigDict(extra="allow", strict=True)

    queue: str | None = Field(default=None, min_length=1, max_length=200)
    reason: str | None = Field(default=None, max_length=500)


class AnswerBody(_Wire):
    """A bot's answer to one customer message (synchronous 200 body, or inside a callback)."""

    version: Literal[1] | None = None
    replies: list[ReplyBody] = Field(default_factory=list, max_length=25)
    handoff: HandoffBody | None = None
    end: bool = False
    failed: str | None = Field(default=None, min_length=1, max_length=200)
    intent: str | None = Field(default=None, max_length=200)
    confidence: float | None = Field(default=None, ge=0, le=1)
    slots: dict[str, Any] = Field(default_factory=dict)
    attributes: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_outcome(self) -> AnswerBody:
        outcomes = [
            name
            for name, given in (
                ("handoff", self.handoff is not None),
                ("end", self.end),
                ("failed", self.failed is not None),
            )
            if given
        ]
        if len(outcomes) > 1:
            raise ValueError(f"{' and '.join(outcomes)} exclude each other: give at most one")
        return self

    def to_reply(self) -> BotReply:
        return BotReply(
            messages=tuple(
                BotMessage(
                    text=r.text,
                    buttons=tuple(BotButton(b.title, b.payload) for b in r.buttons),
                    image=r.image,
                    custom=r.custom,
                )
                for r in self.replies
            ),
            handoff=self.handoff is not None,
            handoff_data=self.handoff.model_dump(exclude_none=True) if self.handoff else {},
            ended=self.end,
            failed=self.failed,
            intent=self.intent,
            confidence=self.confidence,
            slots=dict(self.slots),
            attributes=dict(self.attributes),
        )


class CallbackBody(AnswerBody):
    """An answer the bot posts later: the answer plus what it answers and its own id."""

    conversation_id: str = Field(min_length=1, max_length=200)
    reply_to: int | None = Field(default=None, ge=0)
    reply_id: str = Field(min_length=1, max_length=200, pattern=r"^[\x21-\x7e]+$")


def _field_errors(exc: ValidationError, limit: int = 5) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:limit]
    )


# the connector ----------------------------------------------------------------------------
class CustomBot(Bot):
    """Asks a bot over the signed HTTP contract; takes late answers on its callback route."""

    settings_model: ClassVar[type[ConnectorSettings]] = CustomBotSettings
    settings: CustomBotSettings  # type: ignore[assignment]

    @property
    def callback_path(self) -> str:
        return f"/connectors/bots/{quote(self.name, safe='')}/callback"

    def routes(self) -> list[web.RouteDef]:
        return [web.post(self.callback_path, self._callback_handler)]

    # asking ----------------------------------------------------------------------------
    def request_body(self, request: BotRequest) -> dict[str, Any]:
        """What the bot receives for one customer message (see docs/custom-bot.md)."""
        body: dict[str, Any] = {
            "version": CONTRACT_VERSION,
            "conversation_id": request.conversation_id,
            "message": {
                "seq": request.reply_to_seq,
                "text": request.text,
                "language": request.language,
            },
            "customer": {"id": request.customer_id or None},
            "channel": request.channel or None,
            "mode": request.mode,
            "attributes": dict(request.attributes),
        }
        if self.settings.callback_base_url:
            body["callback_url"] = self.settings.callback_base_url + self.callback_path
        return body

    async def ask(self, request: BotRequest) -> BotReply:
        s = self.settings
        http = self.context.http
        if http is None or http.closed:  # not started yet, or shutting down: try later
            raise BotError("unavailable: the service is not running", retryable=True)
        raw_body = json.dumps(
            self.request_body(request), ensure_ascii=False, separators=(",", ":")
        ).encode()
        headers = {
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
            **sign(
                s.secret,
                raw_body,
                now=self.context.clock.now().timestamp(),
                delivery_id=request.idempotency_key,
            ),
        }
        timeout = aiohttp.ClientTimeout(total=s.timeout)
        try:
            async with http.post(
                s.url, data=raw_body, headers=headers, timeout=timeout, allow_redirects=False
            ) as resp:
                status = resp.status
                location = resp.headers.get("Location", "")
                raw = await self._read_answer(resp)
        except TimeoutError as exc:
            raise BotError(f"timeout: no answer within {s.timeout:g} s", retryable=True) from exc
        except aiohttp.ClientError as exc:
            raise BotError(f"unavailable: {type(exc).__name__}: {exc}", retryable=True) from exc
        return self._answer(status, raw, location)

    async def _read_answer(self, resp: aiohttp.ClientResponse) -> bytes | None:
        """The answer's bytes; None when it is larger than ``max_answer_bytes``."""
        limit = self.settings.max_answer_bytes
        if resp.content_length is not None and resp.content_length > limit:
            return None
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
        return b"".join(chunks)

    def _answer(self, status: int, raw: bytes | None, location: str) -> BotReply:
        """Map the bot's HTTP answer to a reply or a BotError (see the status table)."""
        if raw is None:
            raise BotError(
                f"malformed answer: larger than {self.settings.max_answer_bytes} bytes",
                retryable=False,
            )
        if status in (200, 201):
            return self._parse_answer(raw)
        if status == 202:
            return BotReply(pending=True)
        if status == 204:
            return BotReply()
        detail = _detail(raw)
        if status in _RETRYABLE_STATUSES or status >= 500:
            raise BotError(f"unavailable: HTTP {status}{detail}", retryable=True)
        if 300 <= status < 400:
            raise BotError(
                f"rejected: HTTP {status} redirect to {location or '?'}; configure the final URL",
                retryable=False,
            )
        if 400 <= status < 500:
            raise BotError(f"rejected: HTTP {status}{detail}", retryable=False)
        raise BotError(f"malformed answer: unexpected HTTP {status}", retryable=False)

    def _parse_answer(self, raw: bytes) -> BotReply:
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise BotError(f"malformed answer: not JSON ({exc})", retryable=False) from None
        try:
            answer = AnswerBody.model_validate(data)
        except ValidationError as exc:
            raise BotError(f"malformed answer: {_field_errors(exc)}", retryable=False) from None
        return answer.to_reply()

    # callbacks -------------------------------------------------------------------------
    async def _callback_handler(self, request: web.Request) -> web.Response:
        """A late answer: verify the signature over the raw body, validate, hand it over.

        Nothing is handed over unless the signature is valid and fresh and the body valid;
        a redelivered callback carries the same ``reply_id``, hence the same dedupe key.
        """
        raw = await self._read_callback(request)
        self._check_signature(request, raw)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
        try:
            body = CallbackBody.model_validate(data)
        except ValidationError as exc:
            raise RequestError(
                f"invalid callback body: {_field_errors(exc)}", code="invalid_body"
            ) from exc
        deliver = self.context.bot_reply
        if deliver is None:
            raise RequestError(
                "the service is not ready for callbacks", code="unavailable", status=503
            )
        await deliver(
            BotCallback(
                bot=self.name,
                conversation_id=body.conversation_id,
                reply=body.to_reply(),
                dedupe_key=f"{self.name}:{body.reply_id}",
                reply_to_seq=body.reply_to,
            )
        )
        log.info(
            "custom_bot_callback_accepted",
            bot=self.name,
            conversation_id=body.conversation_id,
            reply_id=body.reply_id,
        )
        return web.json_response({"accepted": True}, status=202)

    async def _read_callback(self, request: web.Request) -> bytes:
        limit = self.settings.max_callback_bytes
        return await read_body(request, limit)

    def _check_signature(self, request: web.Request, raw: bytes) -> None:
        s = self.settings
        try:
            verify(
                [s.secret, *s.previous_secrets],
                raw,
                request.headers,
                now=self.context.clock.now().timestamp(),
                tolerance=s.callback_tolerance,
            )
        except SignatureError as exc:
            log.warning(
                "custom_bot_callback_refused", bot=self.name, code=exc.code, remote=request.remote
            )
            if exc.code == "bad_signature":
                raise Forbidden(str(exc), code="bad_signature") from None
            raise WebhookAuthError(str(exc), code=exc.code) from None


def _detail(raw: bytes) -> str:
    """A short description of an error answer: its ``error`` message if JSON, else its text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict) and "error" in data:
        error = data["error"]
        if isinstance(error, dict):
            error = error.get("message") or error.get("code") or error
        text = str(error)
    text = " ".join(text.split())[:200]
    return f": {text}" if text else ""
