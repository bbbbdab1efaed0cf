"""The Rasa bot connector: the REST channel (answers in the response) or the callback channel
(Rasa POSTs each answer to ``/connectors/bots/{name}/callback``).

Wire facts: ``protocols/rasa.md``. Rasa's channel webhooks take no idempotency key and have
no authentication of their own; the HTTP API (read here only for the tracker: intent,
confidence, slots, paused) takes ``?token=``. Rasa has no handoff signal on the wire, so a
handoff is read from a ``custom`` payload (``{"handoff": true, "queue": …, "reason": …}``)
or, when the tracker is fetched, from a configured intent or a paused conversation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal
from urllib.parse import quote, urlsplit

import aiohttp
import structlog
from aiohttp import web
from pydantic import AfterValidator, ConfigDict, Field, field_validator, model_validator
from yarl import URL

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
from controller.errors import BotError, Forbidden, RequestError, Unauthorized
from controller.settings import is_placeholder

log = structlog.get_logger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".webp", ".bmp", ".svg")
# How many conversations' last question the callback route remembers (reply_to_seq).
REMEMBERED_QUESTIONS = 10_000
# With ``fetch_tracker``, the webhook call may use this share of the timeout; the tracker
# gets what is left up to TRACKER_UNTIL, so the service's own timeout never cuts a reply.
WEBHOOK_SHARE = 0.8
TRACKER_UNTIL = 0.95
# Rasa's own slot holding the session-start metadata: our metadata echoed back, not a result.
INTERNAL_SLOTS = frozenset({"session_started_metadata"})


# settings ---------------------------------------------------------------------------------
def _real_secret(value: str | None) -> str | None:
    if value is not None and is_placeholder(value):
        raise ValueError("missing or a placeholder")
    return value


Secret = Annotated[str | None, Field(repr=False), AfterValidator(_real_secret)]


class RasaSettings(BotSettings):
    """One Rasa server and how its answers are read."""

    # Errors never echo what was given: it may be a secret.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    base_url: str = Field("http://localhost:5005", pattern=r"^https?://[^\s/]+")
    # rest: the answer comes in the response; callback: Rasa POSTs it to our callback route.
    mode: Literal["rest", "callback"] = "rest"
    # Required by the callback route (``?token=`` or ``Authorization: Bearer``); put it in
    # the ``url`` of Rasa's ``callback:`` credentials. Needed in callback mode.
    callback_token: Secret = Field(None, min_length=16)
    # Rasa's ``--auth-token`` for the HTTP API (the tracker), sent as ``?token=``.
    api_token: Secret = None
    # After a REST answer, read the tracker for intent, confidence, entities and slots.
    fetch_tracker: bool = False
    handoff_intents: list[str] = Field(default_factory=lambda: ["human_handoff", "request_human"])
    # A ``custom`` item with this key true is a handoff; its other keys are the handoff data.
    handoff_payload_key: str = Field("handoff", min_length=1)
    # A tracker paused by the bot (``ConversationPaused``) is a handoff too.
    handoff_when_paused: bool = True
    fallback_intents: list[str] = Field(default_factory=lambda: ["nlu_fallback"])
    max_callback_bytes: int = Field(256 * 1024, ge=1024)

    @field_validator("base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _callback_needs_token(self) -> RasaSettings:
        if self.mode == "callback" and self.callback_token is None:
            raise ValueError("mode 'callback' needs a callback_token")
        return self


# answers ----------------------------------------------------------------------------------
def _obj(value: Any) -> dict[str, Any]:
    """``value`` if it is a JSON object, else an empty one."""
    return value if isinstance(value, dict) else {}


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _looks_like_image(url: str) -> bool:
    parts = urlsplit(url)
    return parts.scheme in ("http", "https") and parts.path.lower().endswith(IMAGE_SUFFIXES)


def _attachment_url(raw: Any) -> tuple[str | None, bool]:
    """(URL, is an image) of an ``attachment``: a URL string, or an object such as
    ``{"type": "image", "payload": {"src": …}}`` that custom actions send."""
    if isinstance(raw, str):
        return (raw, _looks_like_image(raw)) if raw.strip() else (None, False)
    if isinstance(raw, dict):
        payload = _obj(raw.get("payload"))
        for url in (raw.get("url"), payload.get("src"), payload.get("url")):
            if isinstance(url, str) and url.strip():
                return url, raw.get("type") == "image" or _looks_like_image(url)
    return None, False


def _buttons(raw: Any) -> tuple[BotButton, ...]:
    if not isinstance(raw, list):
        return ()
    out: list[BotButton] = []
    for button in raw:
        if not isinstance(button, dict) or not isinstance(button.get("title"), str):
            continue
        title, payload = button["title"], button.get("payload")
        out.append(BotButton(title, payload if isinstance(payload, str) else title))
    return tuple(out)


@dataclass(frozen=True)
class _Mapped:
    """One Rasa message item in our terms: the message (None: nothing to show or keep) and
    the handoff its custom payload asks for."""

    message: BotMessage | None
    handoff: bool = False
    handoff_data: dict[str, Any] = field(default_factory=dict)


def map_item(item: dict[str, Any], handoff_key: str) -> _Mapped:
    """A Rasa message (``text``, ``buttons``/``quick_replies``, ``image``, ``attachment``,
    ``custom``) as a BotMessage, plus the handoff its custom payload asks for. Unknown keys
    and known keys of the wrong type are ignored."""
    text = item.get("text") if isinstance(item.get("text"), str) else ""
    buttons = _buttons(item.get("buttons")) or _buttons(item.get("quick_replies"))
    image = item.get("image") if isinstance(item.get("image"), str) and item["image"] else None
    url, is_image = _attachment_url(item.get("attachment"))
    if url is not None:
        if is_image and image is None:
            image = url
        elif url != image:
            text = f"{text}\n{url}" if text else url
    custom: dict[str, Any] | None = None
    handoff, handoff_data = False, {}
    if "custom" in item and item["custom"] is not None:
        raw = item["custom"]
        custom = raw if isinstance(raw, dict) else {"value": raw}
        if isinstance(raw, dict) and _is_true(raw.get(handoff_key)):
            handoff = True
            handoff_data = {k: v for k, v in raw.items() if k != handoff_key}
    message = BotMessage(text=text or "", buttons=buttons, image=image, custom=custom)
    if not (message.shown() or custom is not None):
        return _Mapped(None, handoff, handoff_data)
    return _Mapped(message, handoff, handoff_data)


# A BotError's message starts with the reason the service reports in ``bot.failed``
# (controller.bots.FAILURE_REASONS): timeout, unavailable, rejected, malformed.
def malformed(what: str) -> BotError:
    return BotError(f"malformed: rasa answer: {what}", retryable=False)


def _http_error(status: int, raw: bytes, what: str) -> BotError:
    """A non-2xx answer: 408/429/5xx may pass, anything else is a configuration problem."""
    detail = raw[:300].decode("utf-8", "replace").strip()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        body = None
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        detail = f"{body.get('reason', '')}: {body['message']}".strip(": ")
    retryable = status in (408, 429) or status >= 500
    reason = "unavailable" if retryable else "rejected"
    return BotError(f"{reason}: rasa {what}: HTTP {status} {detail}".strip(), retryable=retryable)


class _Tracker:
    """What a tracker says about the latest turn."""

    def __init__(self, data: dict[str, Any]) -> None:
        latest = _obj(data.get("latest_message"))
        intent = _obj(latest.get("intent"))
        name = intent.get("name")
        self.intent = name if isinstance(name, str) and name else None
        confidence = intent.get("confidence")
        self.confidence = (
            float(confidence)
            if isinstance(confidence, int | float) and not isinstance(confidence, bool)
            else None
        )
        slots: dict[str, Any] = {}
        entities = latest.get("entities")
        for entity in entities if isinstance(entities, list) else []:
            if isinstance(entity, dict) and isinstance(entity.get("entity"), str):
                slots[entity["entity"]] = entity.get("value")
        raw_slots = data.get("slots")
        if isinstance(raw_slots, dict):
            slots.update(
                {k: v for k, v in raw_slots.items() if v is not None and k not in INTERNAL_SLOTS}
            )
        self.slots = slots
        self.paused = data.get("paused") is True


# the connector ----------------------------------------------------------------------------
class RasaBot(Bot):
    """Asks a Rasa server through its REST or callback channel."""

    settings_model: ClassVar[type[ConnectorSettings]] = RasaSettings
    settings: RasaSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # conversation id → the reply_to_seq of the last question asked in callback mode.
        self._asked: OrderedDict[str, int] = OrderedDict()

    def routes(self) -> list[web.RouteDef]:
        if self.settings.callback_token is None:
            return []
        return [web.post(f"/connectors/bots/{self.name}/callback", self._callback_handler)]

    # asking --------------------------------------------------------------------------------
    async def ask(self, request: BotRequest) -> BotReply:
        body = {
            "sender": request.conversation_id,
            "message": request.text,
            "metadata": {
                "channel": request.channel,
                "language": request.language,
                "customer_id": request.customer_id,
                "attributes": dict(request.attributes),
            },
        }
        if self.settings.mode == "callback":
            return await self._ask_callback(request, body)
        return await self._ask_rest(request, body)

    async def _ask_rest(self, request: BotRequest, body: dict[str, Any]) -> BotReply:
        loop = asyncio.get_running_loop()
        started = loop.time()
        budget = self.settings.timeout
        share = WEBHOOK_SHARE if self.settings.fetch_tracker else 1.0
        status, raw = await self._call(
            "POST",
            f"{self.settings.base_url}/webhooks/rest/webhook",
            budget * share,
            json_body=body,
        )
        if not 200 <= status < 300:
            raise _http_error(status, raw, "webhook")
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise malformed(f"not JSON ({exc})") from exc
        if not isinstance(data, list):
            raise malformed(f"expected an array, got {type(data).__name__}")
        if any(not isinstance(item, dict) for item in data):
            raise malformed("an item of the array is not an object")
        reply = self._reply(data)
        if self.settings.fetch_tracker:
            left = started + budget * TRACKER_UNTIL - loop.time()
            tracker = await self._tracker(request.conversation_id, left)
            if tracker is not None:
                reply = self._with_tracker(reply, tracker)
        return reply

    def _reply(self, items: list[dict[str, Any]]) -> BotReply:
        messages: list[BotMessage] = []
        handoff, handoff_data = False, {}
        for item in items:
            mapped = map_item(item, self.settings.handoff_payload_key)
            if mapped.message is not None:
                messages.append(mapped.message)
            if mapped.handoff:
                handoff = True
                handoff_data.update(mapped.handoff_data)
        return BotReply(messages=tuple(messages), handoff=handoff, handoff_data=handoff_data)

    def _with_tracker(self, reply: BotReply, tracker: _Tracker) -> BotReply:
        s = self.settings
        handoff, handoff_data = reply.handoff, dict(reply.handoff_data)
        if tracker.intent in s.handoff_intents:
            handoff = True
            handoff_data.setdefault("reason", tracker.intent)
        elif tracker.paused and s.handoff_when_paused and not handoff:
            handoff = True
            handoff_data.setdefault("reason", "paused")
        failed = "fallback" if not handoff and tracker.intent in s.fallback_intents else None
        return BotReply(
            messages=reply.messages,
            handoff=handoff,
            handoff_data=handoff_data,
            intent=tracker.intent,
            confidence=tracker.confidence,
            slots=tracker.slots,
            failed=failed,
        )

    async def _tracker(self, conversation_id: str, timeout: float) -> _Tracker | None:
        """The conversation's tracker; None (logged) when it cannot be read: the reply
        already in hand must not be lost to a failing HTTP API."""
        if timeout <= 0:
            log.warning("rasa_tracker_skipped", bot=self.name, reason="no time left")
            return None
        params = {"include_events": "NONE"}
        if self.settings.api_token:
            params["token"] = self.settings.api_token
        path = f"/conversations/{quote(conversation_id, safe='')}/tracker"
        try:
            status, raw = await self._call(
                "GET", self.settings.base_url + path, timeout, params=params
            )
            if not 200 <= status < 300:
                raise _http_error(status, raw, "tracker")
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise malformed("the tracker is not an object")
        except (BotError, ValueError, UnicodeDecodeError) as exc:
            log.warning("rasa_tracker_failed", bot=self.name, error=str(exc)[:300])
            return None
        return _Tracker(data)

    async def _ask_callback(self, request: BotRequest, body: dict[str, Any]) -> BotReply:
        # Remembered before the POST: Rasa POSTs its answers while it still processes it.
        self._remember(request.conversation_id, request.reply_to_seq)
        status, raw = await self._call(
            "POST",
            f"{self.settings.base_url}/webhooks/callback/webhook",
            self.settings.timeout,
            json_body=body,
        )
        if not 200 <= status < 300:
            raise _http_error(status, raw, "callback webhook")
        if raw.strip() != b"success":
            raise malformed(f"expected 'success', got {raw[:100]!r}")
        return BotReply(pending=True)

    def _remember(self, conversation_id: str, reply_to_seq: int) -> None:
        self._asked[conversation_id] = reply_to_seq
        self._asked.move_to_end(conversation_id)
        while len(self._asked) > REMEMBERED_QUESTIONS:
            self._asked.popitem(last=False)

    async def _call(
        self,
        method: str,
        url: str,
        timeout: float,
        *,
        json_body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        """One request to Rasa: (status, body). Connection errors and timeouts are
        retryable BotErrors (the API token is never part of the message)."""
        http = self.context.http
        if http is None or http.closed:
            raise BotError("unavailable: the service is not running", retryable=True)
        try:
            async with http.request(
                method,
                URL(url, encoded=True),
                json=json_body,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                return resp.status, await resp.read()
        except TimeoutError as exc:
            raise BotError(
                f"timeout: rasa gave no answer within {timeout:.3g} s", retryable=True
            ) from exc
        except aiohttp.ClientError as exc:
            text = f"unavailable: rasa: {type(exc).__name__}: {exc}"
            if self.settings.api_token:
                text = text.replace(self.settings.api_token, "[redacted]")
            raise BotError(text, retryable=True) from exc

    # the callback route --------------------------------------------------------------------
    async def _callback_handler(self, request: web.Request) -> web.Response:
        """One bot message from Rasa's callback channel (one POST per message, never
        redelivered: each gets a fresh dedupe key). Answered after the service took it."""
        self._authenticate(request)
        raw = await self._read_body(request)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
        if not isinstance(data, dict):
            raise RequestError("the body must be a JSON object", code="invalid_body")
        recipient = data.get("recipient_id")
        if not isinstance(recipient, str) or not 1 <= len(recipient) <= 200:
            raise RequestError("recipient_id must be a conversation id", code="invalid_body")
        mapped = map_item(data, self.settings.handoff_payload_key)
        if mapped.message is None and not mapped.handoff:
            return web.json_response({"ok": True, "accepted": False})
        if self.context.bot_reply is None:
            raise RequestError(
                "this service takes no bot callbacks", code="callbacks_unavailable", status=503
            )
        reply = BotReply(
            messages=(mapped.message,) if mapped.message is not None else (),
            handoff=mapped.handoff,
            handoff_data=mapped.handoff_data,
        )
        await self.context.bot_reply(
            BotCallback(
                bot=self.name,
                conversation_id=recipient,
                reply=reply,
                dedupe_key=uuid.uuid4().hex,
                reply_to_seq=self._asked.get(recipient),
            )
        )
        return web.json_response({"ok": True, "accepted": True})

    def _authenticate(self, request: web.Request) -> None:
        expected = self.settings.callback_token or ""
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given:
            given = request.query.get("token", "")
        if not given:
            log.warning("rasa_callback_token_missing", bot=self.name, remote=request.remote)
            raise Unauthorized("missing callback token")
        if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("rasa_callback_token_invalid", bot=self.name, remote=request.remote)
            raise Forbidden("invalid callback token", code="bad_token")

    async def _read_body(self, request: web.Request) -> bytes:
        limit = self.settings.max_callback_bytes
        return await read_body(request, limit)
