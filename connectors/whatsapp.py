"""The WhatsApp Cloud API channel: Meta's signed webhook in, Graph API ``/messages`` out.

One instance serves one Meta app (one app secret, one verify token) and any number of business
phone numbers, each with its own access token. A conversation is (instance, phone_number_id,
wa_id), so the same person writing to two numbers has two conversations and every reply goes
out through the number (and token) the conversation runs on. Wire facts:
``protocols/whatsapp-cloud.md``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence
from typing import Any, ClassVar

import aiohttp
import structlog
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from connectors.base import Channel, ConnectorSettings, OutboundMessage
from controller.errors import (
    ChannelSendError,
    Conflict,
    ConnectorError,
    Forbidden,
    RequestError,
    WebhookAuthError,
)
from controller.models import NewEvent
from controller.settings import is_placeholder

log = structlog.get_logger(__name__)

CHANNEL = "whatsapp"
MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
# Graph error codes (protocol sheet §5) → our failure reasons.
WINDOW_CLOSED = frozenset({131047})
INVALID_RECIPIENT = frozenset({131026, 131030, 131021})
RATE_LIMITED = frozenset({4, 80007, 130429, 131056, 131048})
TRANSIENT = frozenset({1, 2, 131000, 131016, 131049, 131052, 131053, 131057})
MAX_BUTTONS = 3
MAX_BUTTON_TITLE = 20


# settings ---------------------------------------------------------------------------------
class WhatsAppEndpoint(BaseModel):
    """One business phone number of the instance and the token that sends as it."""

    model_config = ConfigDict(extra="forbid")

    phone_number_id: str = Field(pattern=r"^[0-9]{1,32}$")
    access_token: str = Field(repr=False)
    display_phone_number: str | None = None

    @field_validator("access_token")
    @classmethod
    def _real_token(cls, value: str) -> str:
        if is_placeholder(value):
            raise ValueError("access_token is missing or a placeholder")
        return value


class WhatsAppSettings(ConnectorSettings):
    graph_base_url: str = Field("https://graph.facebook.com", pattern=r"^https?://[^\s/]+")
    graph_api_version: str = Field("v21.0", pattern=r"^v[0-9]+\.[0-9]+$")
    app_secret: str = Field(repr=False)
    verify_token: str = Field(repr=False)
    waba_id: str | None = None
    endpoints: list[WhatsAppEndpoint] = Field(min_length=1)
    max_body_bytes: int = Field(1024 * 1024, ge=1024)
    media_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # Inbound media whose MIME type matches none of these prefixes is flagged, not downloaded.
    media_allowed_types: list[str] = Field(
        default_factory=lambda: ["image/", "audio/", "video/", "application/pdf", "text/plain"]
    )
    http_timeout_s: float = Field(10.0, gt=0)

    @field_validator("graph_base_url")
    @classmethod
    def _no_trailing_slash(cls, value: str) -> str:
        return value.rstrip("/")

    @model_validator(mode="after")
    def _secrets_and_endpoints(self) -> WhatsAppSettings:
        # Refused in every profile: a guessable app secret lets anyone forge customer messages.
        bad = [f for f in ("app_secret", "verify_token") if is_placeholder(getattr(self, f))]
        if bad:
            raise ValueError(f"missing or placeholder secrets: {', '.join(bad)}")
        ids = [e.phone_number_id for e in self.endpoints]
        if len(ids) != len(set(ids)):
            raise ValueError("a phone_number_id is listed twice")
        return self


# provider payloads (unknown fields are tolerated: Meta adds fields without notice) -----------
class _Payload(BaseModel):
    model_config = ConfigDict(extra="ignore", coerce_numbers_to_str=True)


class _Text(_Payload):
    body: str


class _Media(_Payload):
    id: str
    mime_type: str | None = None
    sha256: str | None = None
    caption: str | None = None
    filename: str | None = None
    voice: bool | None = None
    animated: bool | None = None


class _Location(_Payload):
    latitude: float
    longitude: float
    name: str | None = None
    address: str | None = None


class _Reply(_Payload):
    id: str
    title: str | None = None
    description: str | None = None


class _Interactive(_Payload):
    type: str
    button_reply: _Reply | None = None
    list_reply: _Reply | None = None


class _TemplateButton(_Payload):
    text: str | None = None
    payload: str | None = None


class _Reaction(_Payload):
    message_id: str
    emoji: str | None = None


class _Context(_Payload):
    id: str | None = None


class _Error(_Payload):
    code: int
    title: str | None = None
    message: str | None = None
    error_data: dict[str, Any] | None = None

    @property
    def details(self) -> str | None:
        found = (self.error_data or {}).get("details")
        return str(found) if found is not None else None


class _Message(_Payload):
    id: str = Field(min_length=1, max_length=300)
    sender: str = Field(alias="from", min_length=1, max_length=64)
    timestamp: str | None = None
    type: str = Field(min_length=1, max_length=64)
    context: _Context | None = None
    text: _Text | None = None
    image: _Media | None = None
    audio: _Media | None = None
    video: _Media | None = None
    document: _Media | None = None
    sticker: _Media | None = None
    location: _Location | None = None
    contacts: list[dict[str, Any]] | None = None
    interactive: _Interactive | None = None
    button: _TemplateButton | None = None
    reaction: _Reaction | None = None
    errors: list[_Error] = Field(default_factory=list)


class _Status(_Payload):
    id: str = Field(min_length=1, max_length=300)
    status: str = Field(min_length=1, max_length=64)
    recipient_id: str = Field(min_length=1, max_length=64)
    timestamp: str | None = None
    errors: list[_Error] = Field(default_factory=list)
    pricing: dict[str, Any] | None = None


class _Profile(_Payload):
    name: str | None = None


class _Contact(_Payload):
    wa_id: str
    profile: _Profile | None = None


class _Metadata(_Payload):
    phone_number_id: str
    display_phone_number: str | None = None


class _Value(_Payload):
    metadata: _Metadata
    contacts: list[_Contact] = Field(default_factory=list)
    messages: list[_Message] = Field(default_factory=list)
    statuses: list[_Status] = Field(default_factory=list)
    errors: list[_Error] = Field(default_factory=list)


class _Change(_Payload):
    field: str
    value: dict[str, Any]


class _Entry(_Payload):
    id: str | None = None
    changes: list[_Change] = Field(default_factory=list)


class _Envelope(_Payload):
    object: str
    entry: list[_Entry]


class _SentMessage(_Payload):
    id: str


class _SendResponse(_Payload):
    messages: list[_SentMessage] = Field(default_factory=list)


class _GraphError(_Payload):
    code: int | None = None
    message: str | None = None
    error_data: dict[str, Any] | None = None


class _GraphErrorBody(_Payload):
    error: _GraphError


class _MediaInfo(_Payload):
    url: str
    mime_type: str | None = None
    file_size: int | None = None


def _clean(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if v is not None}


# the channel -------------------------------------------------------------------------------
class WhatsAppChannel(Channel):
    capabilities: ClassVar[frozenset[str]] = frozenset({"text", "buttons"})
    settings_model: ClassVar[type[ConnectorSettings]] = WhatsAppSettings
    settings: WhatsAppSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._endpoints = {e.phone_number_id: e for e in self.settings.endpoints}
        self._source = f"{CHANNEL}:{self.name}"

    def routes(self) -> list[web.RouteDef]:
        path = f"/webhooks/{self.name}"
        return [web.get(path, self._verify_handler), web.post(path, self._webhook_handler)]

    # inbound ---------------------------------------------------------------------------
    async def _verify_handler(self, request: web.Request) -> web.Response:
        """Meta's subscription handshake: echo ``hub.challenge`` if the verify token matches."""
        q = request.query
        token = q.get("hub.verify_token", "")
        challenge = q.get("hub.challenge", "")
        ok = hmac.compare_digest(token.encode(), self.settings.verify_token.encode())
        if q.get("hub.mode") != "subscribe" or not ok or not challenge or len(challenge) > 256:
            log.warning("whatsapp_verify_refused", instance=self.name)
            raise Forbidden("webhook verification failed", code="verification_failed")
        return web.Response(text=challenge, content_type="text/plain")

    async def _webhook_handler(self, request: web.Request) -> web.Response:
        """Verify the signature over the raw body, map every item, store all in one submit.

        The 200 goes out only after the commit, so an answered delivery is never lost; a
        redelivery is deduplicated by message id (and status id + status).
        """
        raw = await self._read_body(request)
        self._check_signature(request, raw)
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"malformed JSON: {exc}", code="malformed_json") from exc
        try:
            envelope = _Envelope.model_validate(data)
            if envelope.object != "whatsapp_business_account":
                log.info(
                    "whatsapp_other_object_ignored", instance=self.name, object=envelope.object
                )
                return web.json_response({"ok": True, "events": 0})
            values = [
                _Value.model_validate(change.value)
                for entry in envelope.entry
                for change in entry.changes
                if change.field == "messages"
            ]
        except ValidationError as exc:
            details = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}"
                for e in exc.errors()[:5]
            )
            raise RequestError(f"invalid webhook body: {details}", code="invalid_body") from exc
        stored = await self._store(values)
        return web.json_response({"ok": True, "events": stored})

    async def _read_body(self, request: web.Request) -> bytes:
        """The exact bytes received, refused past the instance's size limit (413)."""
        limit = self.settings.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise RequestError("request body too large", code="too_large", status=413)
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > limit:
                raise RequestError("request body too large", code="too_large", status=413)
            chunks.append(chunk)
        return b"".join(chunks)

    def _check_signature(self, request: web.Request, raw: bytes) -> None:
        header = request.headers.get("X-Hub-Signature-256", "")
        if not header:
            log.warning("whatsapp_signature_missing", instance=self.name, remote=request.remote)
            raise WebhookAuthError("missing X-Hub-Signature-256", code="missing_signature")
        expected = hmac.new(self.settings.app_secret.encode(), raw, hashlib.sha256).hexdigest()
        scheme, _, given = header.partition("=")
        if scheme != "sha256" or not hmac.compare_digest(given.encode(), expected.encode()):
            log.warning("whatsapp_signature_invalid", instance=self.name, remote=request.remote)
            raise Forbidden("invalid X-Hub-Signature-256", code="bad_signature")

    async def _store(self, values: Sequence[_Value]) -> int:
        """Submit every message and status of the delivery, in order, as one inbox submit.

        A status attaches to the identity's open conversation, found before the submit; if
        that conversation closes in between, the submit is refused and tried again (every
        item is deduplicated, so trying again adds nothing twice).
        """
        for attempt in range(3):
            events = await self._events(values)
            if not events:
                return 0
            try:
                accepted = await self.context.submit(events)
            except Conflict as exc:
                if exc.code != "conversation_closed" or attempt == 2:
                    raise
                log.info("whatsapp_status_conversation_closed_retry", instance=self.name)
                continue
            return sum(1 for a in accepted if not a.duplicate)
        return 0  # pragma: no cover - the loop returns or raises

    async def _events(self, values: Sequence[_Value]) -> list[NewEvent]:
        events: list[NewEvent] = []
        open_conversations: dict[tuple[str, str], str | None] = {}
        for value in values:
            endpoint = value.metadata.phone_number_id
            if endpoint not in self._endpoints:
                log.warning(
                    "whatsapp_unknown_phone_number_ignored",
                    instance=self.name,
                    phone_number_id=endpoint,
                    messages=len(value.messages),
                    statuses=len(value.statuses),
                )
                continue
            for error in value.errors:
                log.warning(
                    "whatsapp_async_error",
                    instance=self.name,
                    phone_number_id=endpoint,
                    code=error.code,
                    title=error.title,
                    details=error.details,
                )
            names = {c.wa_id: c.profile.name for c in value.contacts if c.profile}
            for msg in value.messages:
                events.append(self._message_event(endpoint, value.metadata, msg, names))
            for status in value.statuses:
                key = (endpoint, status.recipient_id)
                if key not in open_conversations:
                    open_conversations[key] = await self._open_conversation(*key)
                conversation_id = open_conversations[key]
                if conversation_id is None:
                    log.info(
                        "whatsapp_status_without_open_conversation",
                        instance=self.name,
                        status=status.status,
                    )
                    continue
                events.append(self._status_event(endpoint, conversation_id, status))
        return events

    async def _open_conversation(self, endpoint: str, identity: str) -> str | None:
        snapshot = await self.context.service["history"](self.name, endpoint, identity)
        return str(snapshot["conversation_id"]) if snapshot.get("open") else None

    def _message_event(
        self, endpoint: str, meta: _Metadata, msg: _Message, names: dict[str, str | None]
    ) -> NewEvent:
        data: dict[str, Any] = {
            "kind": msg.type,
            "wamid": msg.id,
            "wa_id": msg.sender,
            "profile_name": names.get(msg.sender),
            "phone_number_id": endpoint,
            "display_phone_number": meta.display_phone_number,
            "sent_at": msg.timestamp,
            "reply_to": msg.context.id if msg.context else None,
        }
        data.update(self._content(msg))
        return NewEvent(
            type="customer.message",
            source=self._source,
            dedupe_key=msg.id,
            channel=CHANNEL,
            instance=self.name,
            endpoint=endpoint,
            identity=msg.sender,
            data=_clean(data),
        )

    def _content(self, msg: _Message) -> dict[str, Any]:
        """The type-specific part of a message; unknown or empty types carry no text."""
        kind = msg.type
        if kind == "text" and msg.text is not None:
            return {"text": msg.text.body}
        if kind in MEDIA_TYPES:
            media: _Media | None = getattr(msg, kind)
            if media is None:
                return {}
            mime = media.mime_type or ""
            allowed = any(mime.startswith(p) for p in self.settings.media_allowed_types)
            return {
                "media_id": media.id,
                "mime_type": media.mime_type,
                "sha256": media.sha256,
                "caption": media.caption,
                "filename": media.filename,
                "voice": media.voice,
                "animated": media.animated,
                "media_allowed": allowed,
            }
        if kind == "interactive" and msg.interactive is not None:
            reply = msg.interactive.button_reply or msg.interactive.list_reply
            out: dict[str, Any] = {"interactive_type": msg.interactive.type}
            if reply is not None:
                out.update(
                    reply_id=reply.id,
                    reply_title=reply.title,
                    reply_description=reply.description,
                    text=reply.title,
                )
            return out
        if kind == "button" and msg.button is not None:
            return {"reply_id": msg.button.payload, "text": msg.button.text}
        if kind == "location" and msg.location is not None:
            loc = msg.location
            return {
                "latitude": loc.latitude,
                "longitude": loc.longitude,
                "location_name": loc.name,
                "address": loc.address,
            }
        if kind == "contacts" and msg.contacts is not None:
            return {"contacts": msg.contacts}
        if kind == "reaction" and msg.reaction is not None:
            # An empty emoji means the customer removed their reaction.
            return {"reaction_to": msg.reaction.message_id, "emoji": msg.reaction.emoji or ""}
        if msg.errors:
            return {"error_code": msg.errors[0].code, "error_title": msg.errors[0].title}
        return {}

    def _status_event(self, endpoint: str, conversation_id: str, status: _Status) -> NewEvent:
        error = status.errors[0] if status.errors else None
        data = {
            "status": status.status,
            "wamid": status.id,
            "recipient_id": status.recipient_id,
            "phone_number_id": endpoint,
            "sent_at": status.timestamp,
            "pricing_category": (status.pricing or {}).get("category"),
            "error_code": error.code if error else None,
            "error_title": error.title if error else None,
            "error_details": error.details if error else None,
        }
        return NewEvent(
            type="delivery.status",
            source=self._source,
            dedupe_key=f"{status.id}:{status.status}",
            conversation_id=conversation_id,
            data=_clean(data),
        )

    # outbound --------------------------------------------------------------------------
    async def send(self, message: OutboundMessage) -> str | None:
        """Send through the conversation's own number and token; return the ``wamid``."""
        endpoint = self._endpoints.get(message.endpoint)
        if endpoint is None:
            raise ChannelSendError(
                f"provider_error: unknown phone_number_id {message.endpoint!r}", retryable=False
            )
        body = self._send_body(message)
        s = self.settings
        url = f"{s.graph_base_url}/{s.graph_api_version}/{endpoint.phone_number_id}/messages"
        data = await self._graph("POST", url, endpoint, json_body=body)
        sent = _SendResponse.model_validate(data) if isinstance(data, dict) else None
        if sent is None or not sent.messages:
            # Accepted (2xx) without an id: sending again would duplicate the message.
            log.warning("whatsapp_send_without_id", instance=self.name)
            return None
        return sent.messages[0].id

    def _send_body(self, message: OutboundMessage) -> dict[str, Any]:
        text = str(message.message.get("text", ""))
        common = {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.identity,
        }
        buttons = _buttons(message.message.get("buttons"))
        fits = len(buttons) <= MAX_BUTTONS and all(
            len(title) <= MAX_BUTTON_TITLE for _, title in buttons
        )
        if buttons and text and fits:
            return {
                **common,
                "type": "interactive",
                "interactive": {
                    "type": "button",
                    "body": {"text": text},
                    "action": {
                        "buttons": [
                            {"type": "reply", "reply": {"id": bid, "title": title}}
                            for bid, title in buttons
                        ]
                    },
                },
            }
        if buttons:  # degrade: too many or too long for reply buttons → numbered text
            lines = [f"{i}. {title}" for i, (_, title) in enumerate(buttons, 1)]
            text = "\n".join([text, *lines]) if text else "\n".join(lines)
        return {**common, "type": "text", "text": {"preview_url": False, "body": text}}

    async def _graph(
        self,
        method: str,
        url: str,
        endpoint: WhatsAppEndpoint,
        *,
        json_body: dict[str, Any] | None = None,
    ) -> Any:
        """One Graph API call with the endpoint's token; errors mapped to ChannelSendError."""
        http = self.context.http
        if http is None or http.closed:  # not started yet, or shutting down: try later
            raise ChannelSendError("provider_error: the service is not running", retryable=True)
        headers = {"Authorization": f"Bearer {endpoint.access_token}"}
        timeout = aiohttp.ClientTimeout(total=self.settings.http_timeout_s)
        try:
            async with http.request(
                method, url, json=json_body, headers=headers, timeout=timeout
            ) as resp:
                status, raw = resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ChannelSendError(
                f"provider_error: {type(exc).__name__}: {exc}", retryable=True
            ) from exc
        try:
            data = json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if 200 <= status < 300:
            return data
        raise _send_error(status, data)

    async def download_media(self, media_id: str, endpoint: str) -> tuple[bytes, str | None]:
        """Fetch an inbound media file (two steps: its URL, then its bytes, same token).

        Refuses types outside ``media_allowed_types`` and files over ``media_max_bytes``.
        Not called by the event flow yet: events carry the media id by reference.
        """
        ep = self._endpoints.get(endpoint)
        if ep is None:
            raise ConnectorError(f"unknown phone_number_id {endpoint!r}")
        s = self.settings
        info_url = f"{s.graph_base_url}/{s.graph_api_version}/{media_id}"
        try:
            info = _MediaInfo.model_validate(await self._graph("GET", info_url, ep))
        except ValidationError as exc:
            raise ConnectorError(f"unexpected media answer: {exc.error_count()} errors") from exc
        mime = info.mime_type or ""
        if not any(mime.startswith(p) for p in s.media_allowed_types):
            raise ConnectorError(f"media type {mime!r} is not allowed", code="media_refused")
        if info.file_size is not None and info.file_size > s.media_max_bytes:
            raise ConnectorError("media file too large", code="media_refused")
        http = self.context.http
        assert http is not None  # _graph checked it
        headers = {"Authorization": f"Bearer {ep.access_token}"}
        timeout = aiohttp.ClientTimeout(total=s.http_timeout_s)
        try:
            async with http.get(info.url, headers=headers, timeout=timeout) as resp:
                if resp.status != 200:
                    raise ConnectorError(f"media download answered {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(64 * 1024):
                    body.extend(chunk)
                    if len(body) > s.media_max_bytes:
                        raise ConnectorError("media file too large", code="media_refused")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise ConnectorError(f"media download failed: {type(exc).__name__}") from exc
        return bytes(body), info.mime_type


def _buttons(raw: Any) -> list[tuple[str, str]]:
    """Buttons an outbound message carries: ``["Yes", …]`` or ``[{"id", "title"}, …]``."""
    if not isinstance(raw, list):
        return []
    out: list[tuple[str, str]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            out.append((f"b{i}", item))
        elif isinstance(item, dict) and item.get("title"):
            out.append((str(item.get("id") or f"b{i}"), str(item["title"])))
    return out


def _send_error(status: int, data: Any) -> ChannelSendError:
    """Map a Graph error answer: the error code is authoritative, the HTTP status a hint."""
    error: _GraphError | None = None
    if isinstance(data, dict):
        try:
            error = _GraphErrorBody.model_validate(data).error
        except ValidationError:
            error = None
    code = error.code if error else None
    details = (error.error_data or {}).get("details") if error and error.error_data else None
    text = (error.message or "") if error else ""
    if code is not None and not text.startswith(f"(#{code})"):
        text = f"(#{code}) {text}".strip()
    described = f"HTTP {status} {text}" + (f" [{details}]" if details else "")
    if code in WINDOW_CLOSED:
        return ChannelSendError(f"window_closed: {described}", retryable=False)
    if code in INVALID_RECIPIENT:
        return ChannelSendError(f"invalid_recipient: {described}", retryable=False)
    if status == 429 or code in RATE_LIMITED:
        return ChannelSendError(f"rate_limited: {described}", retryable=True)
    if status >= 500 or code in TRANSIENT:
        return ChannelSendError(f"provider_error: {described}", retryable=True)
    return ChannelSendError(f"provider_error: {described}", retryable=False)
