"""The WhatsApp Cloud API channel: Meta's signed webhook in, Graph API ``/messages`` out.

One instance serves one Meta app (one app secret, one verify token) and any number of business
phone numbers, each with its own access token. A conversation is (instance, phone_number_id,
wa_id), so the same person writing to two numbers has two conversations and every reply goes
out through the number (and token) the conversation runs on. Wire facts:
``protocols/whatsapp-cloud.md``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from connectors.base import ConnectorSettings, OutboundMessage
from connectors.meta import (
    AccessToken,
    GraphCodes,
    MetaAppSettings,
    MetaChannel,
    OutboundMedia,
    Payload,
    buttons_of,
    clean,
    ensure_unique,
    final_failure,
    joined,
    media_of,
    numbered,
    split_tail,
    split_text,
    unknown_endpoint,
)
from controller.errors import ChannelSendError, ConnectorError
from controller.models import NewEvent

log = structlog.get_logger(__name__)

CHANNEL = "whatsapp"
MEDIA_TYPES = frozenset({"image", "audio", "video", "document", "sticker"})
# Graph error codes (protocol sheet §5) → our failure reasons.
GRAPH_CODES = GraphCodes(
    window_closed=frozenset({131047}),
    invalid_recipient=frozenset({131026, 131030, 131021}),
    rate_limited=frozenset({4, 80007, 130429, 131056, 131048}),
    transient=frozenset({1, 2, 131000, 131016, 131049, 131052, 131053, 131057}),
)
MAX_BUTTONS = 3
MAX_BUTTON_TITLE = 20
MAX_BUTTON_ID = 256
MAX_LIST_ROWS = 10
MAX_LIST_TITLE = 24
MAX_LIST_ROW_ID = 200
# Characters: a text body, a media caption, the body of reply buttons / of a list.
MAX_TEXT = 4096
MAX_CAPTION = 1024
MAX_BUTTONS_BODY = 1024
MAX_LIST_BODY = 4096
CAPTIONED = frozenset({"image", "video", "document"})  # audio and stickers take no caption
HEADER_MEDIA = frozenset({"image", "video", "document"})  # media an interactive header shows
# Free-form messages only within 24 h of the customer's last message (sheet §4).
SERVICE_WINDOW = timedelta(hours=24)
MEDIA_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
MEDIA_DOWNLOADS_AT_ONCE = 4


# settings ---------------------------------------------------------------------------------
class WhatsAppEndpoint(BaseModel):
    """One business phone number of the instance and the token that sends as it."""

    model_config = ConfigDict(extra="forbid")

    phone_number_id: str = Field(pattern=r"^[0-9]{1,32}$")
    access_token: AccessToken
    display_phone_number: str | None = None


class WhatsAppSettings(MetaAppSettings):
    waba_id: str | None = None
    endpoints: list[WhatsAppEndpoint] = Field(min_length=1)
    media_max_bytes: int = Field(16 * 1024 * 1024, ge=1)
    # Inbound media whose MIME type matches none of these prefixes is flagged, not downloaded.
    media_allowed_types: list[str] = Field(
        default_factory=lambda: ["image/", "audio/", "video/", "application/pdf", "text/plain"]
    )
    # Download inbound media into <data_dir>/media after the commit (in the background).
    media_download: bool = True
    # Send a read receipt for each delivery's latest message per customer, after the commit.
    mark_read: bool = True
    # With the read receipt, show a typing indicator (the sheet marks it unverified).
    typing_indicator: bool = False
    # The label of the button that opens a list message (4 to 10 choices).
    list_button_label: str = Field("Choose", min_length=1, max_length=20)
    # A message whose fate is unknown (claimed when the process died, or a send that got no
    # answer) waits this long for a delivery status naming it (biz_opaque_callback_data)
    # before it is sent again; 0 sends it again at once (at least once, maybe twice).
    resend_unconfirmed_after: float = Field(300.0, ge=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _unique_endpoints(self) -> WhatsAppSettings:
        ensure_unique((e.phone_number_id for e in self.endpoints), "phone_number_id")
        return self


# provider payloads (unknown fields are tolerated: Meta adds fields without notice) -----------
_Payload = Payload


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
    biz_opaque_callback_data: str | None = None


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


class _SentMessage(_Payload):
    id: str


class _SendResponse(_Payload):
    messages: list[_SentMessage] = Field(default_factory=list)


class OutboundTemplate(BaseModel):
    """``message["template"]`` of an outbound message: a pre-approved WhatsApp template."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=512)
    language: str = Field(min_length=2, max_length=15)
    # Body parameters, in order ({{1}}, {{2}}, …), sent as text parameters.
    parameters: list[str | int | float] = Field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "language": {"code": self.language}}
        if self.parameters:
            params = [{"type": "text", "text": str(p)} for p in self.parameters]
            out["components"] = [{"type": "body", "parameters": params}]
        return out


class _MediaInfo(_Payload):
    url: str
    mime_type: str | None = None
    file_size: int | None = None


# the channel -------------------------------------------------------------------------------
class WhatsAppChannel(MetaChannel[_Value]):
    channel: ClassVar[str] = CHANNEL
    webhook_object: ClassVar[str] = "whatsapp_business_account"
    graph_codes: ClassVar[GraphCodes] = GRAPH_CODES
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {"text", "buttons", "lists", "images", "media", "templates"}
    )
    settings_model: ClassVar[type[ConnectorSettings]] = WhatsAppSettings
    settings: WhatsAppSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._endpoints = {e.phone_number_id: e for e in self.settings.endpoints}
        self._media_slots = asyncio.Semaphore(MEDIA_DOWNLOADS_AT_ONCE)

    # inbound ---------------------------------------------------------------------------
    def _items(self, entries: list[dict[str, Any]]) -> list[_Value]:
        return [
            _Value.model_validate(change.value)
            for entry in (_Entry.model_validate(e) for e in entries)
            for change in entry.changes
            if change.field == "messages"
        ]

    async def _events(self, values: Sequence[_Value]) -> list[NewEvent]:
        events: list[NewEvent] = []
        open_conversations: dict[tuple[str, str], str | None] = {}
        message_ids: dict[tuple[str, str], str | None] = {}
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
                confirmed = await self._confirmed(status)
                key = (endpoint, status.recipient_id)
                if key not in open_conversations:
                    snapshot = await self._open_conversation(*key)
                    open_conversations[key] = snapshot["conversation_id"] if snapshot else None
                conversation_id = open_conversations[key]
                if conversation_id is None:
                    log.info(
                        "whatsapp_status_without_open_conversation",
                        instance=self.name,
                        status=status.status,
                    )
                    continue
                if (status.id, conversation_id) not in message_ids:
                    message_ids[(status.id, conversation_id)] = (
                        await self._our_message_id(status.id, conversation_id) or confirmed
                    )
                message_id = message_ids[(status.id, conversation_id)]
                if message_id is None and status.biz_opaque_callback_data:
                    # Graph has a send whose answer we may not have yet (it is late, or will
                    # never come): remember it, so sending it again skips it.
                    self._remember_sent(status.biz_opaque_callback_data, status.id)
                events.extend(self._status_events(endpoint, conversation_id, status, message_id))
        return events

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
        return self._customer_message(msg.id, endpoint, msg.sender, data)

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

    def _status_events(
        self, endpoint: str, conversation_id: str, status: _Status, message_id: str | None
    ) -> list[NewEvent]:
        """The ``delivery.status``, and a ``delivery.failed`` when a ``failed`` status says
        the window was closed or the recipient is invalid (Graph reports them late, too).
        ``message_id`` is our id of the message the status is about, when known."""
        events = [self._status_event(endpoint, conversation_id, status, message_id)]
        error = status.errors[0] if status.errors else None
        reason = final_failure(self.graph_codes, error.code) if error else None
        if status.status == "failed" and error is not None and reason is not None:
            events.append(
                NewEvent(
                    type="delivery.failed",
                    source=self._source,
                    dedupe_key=f"{status.id}:delivery_failed",
                    conversation_id=conversation_id,
                    data=clean(
                        {
                            "reason": reason,
                            "instance": self.name,
                            "message_id": message_id,
                            "wamid": status.id,
                            "error_code": error.code,
                            "error": f"(#{error.code}) {error.title or ''}".strip()[:500],
                        }
                    ),
                )
            )
        return events

    def _status_event(
        self, endpoint: str, conversation_id: str, status: _Status, message_id: str | None
    ) -> NewEvent:
        error = status.errors[0] if status.errors else None
        data = {
            "status": status.status,
            "message_id": message_id,
            "wamid": status.id,
            "callback_data": status.biz_opaque_callback_data,
            "recipient_id": status.recipient_id,
            "phone_number_id": endpoint,
            "sent_at": status.timestamp,
            "pricing_category": (status.pricing or {}).get("category"),
            "error_code": error.code if error else None,
            "error_title": error.title if error else None,
            "error_details": error.details if error else None,
        }
        return self._delivery_status(f"{status.id}:{status.status}", conversation_id, data)

    async def _confirmed(self, status: _Status) -> str | None:
        """A status naming (by ``biz_opaque_callback_data``) a send held because its answer
        never reached us (the process died, or the request got no answer): Graph has it, so
        it is not sent again — the part is remembered, and a held message is done. Our
        message id, when the status confirmed a whole message."""
        key = status.biz_opaque_callback_data
        confirm = self.context.service.get("confirm_delivery")
        if not key or confirm is None:
            return None
        held, message_id = await confirm(self.name, key, status.id)
        if held:
            self._remember_sent(key, status.id)
        return str(message_id) if message_id else None

    def status_hold(self, idempotency_key: str) -> float | None:
        if idempotency_key in self._sent_parts:
            return 0.0
        return self.settings.resend_unconfirmed_after or None

    # outbound --------------------------------------------------------------------------
    async def send(self, message: OutboundMessage) -> str | None:
        """Send through the conversation's own number and token; return the ``wamid`` (of the
        last part, when the message goes out in several)."""
        endpoint = self._endpoints.get(message.endpoint)
        if endpoint is None:
            raise unknown_endpoint("phone_number_id", message.endpoint)
        template = self._template(message)
        if template is None:
            self._check_window(message)
        url = f"{self.settings.graph_url}/{endpoint.phone_number_id}/messages"

        async def send_one(body: dict[str, Any], key: str) -> str | None:
            full = {**self._common(message), **body, "biz_opaque_callback_data": key}
            data = await self._graph("POST", url, endpoint, json_body=full)
            sent = _SendResponse.model_validate(data) if isinstance(data, dict) else None
            if sent is None or not sent.messages:
                # Accepted (2xx) without an id: sending again would duplicate the message.
                log.warning("whatsapp_send_without_id", instance=self.name)
                return None
            return sent.messages[0].id

        return await self._send_parts(message, self._bodies(message, template), send_one)

    @staticmethod
    def _template(message: OutboundMessage) -> OutboundTemplate | None:
        raw = message.message.get("template")
        if raw is None:
            return None
        try:
            return OutboundTemplate.model_validate(raw)
        except ValidationError as exc:
            raise ChannelSendError(
                f"provider_error: invalid template: {exc.error_count()} errors", retryable=False
            ) from exc

    def _check_window(self, message: OutboundMessage) -> None:
        """Free form only within 24 h of the customer's last message: otherwise a
        ``window_closed`` failure without a Graph call. Unknown last time: Graph decides."""
        last = message.customer_last_at
        if last is None:
            return
        age = self.context.clock.now() - last
        if age > SERVICE_WINDOW:
            raise ChannelSendError(
                f"window_closed: the customer last wrote {age} ago; "
                "outside the 24 h window only templates can be sent",
                retryable=False,
            )

    @staticmethod
    def _common(message: OutboundMessage) -> dict[str, Any]:
        return {
            "messaging_product": "whatsapp",
            "recipient_type": "individual",
            "to": message.identity,
        }

    def _bodies(
        self, message: OutboundMessage, template: OutboundTemplate | None = None
    ) -> list[dict[str, Any]]:
        """The parts (``type`` and its object) that deliver one outbound message, in order.

        A template is one part. Otherwise: text over 4096 characters is cut into several
        text parts; buttons become reply buttons (1-3, titles up to 20 characters) or a list
        (up to 10, titles up to 24), else numbered lines of text; media goes with the text
        as its caption when it fits (1024), else after the text; reply buttons show an
        image, video or document as their header.
        """
        if template is not None:
            return [{"type": "template", "template": template.wire()}]
        text = str(message.message.get("text") or "")
        buttons = buttons_of(message.message.get("buttons"))
        media = media_of(message.message)
        style = _button_style(text, buttons)
        if style is None and buttons:
            text = numbered(text, buttons)
        if style is None:
            if media is None:
                return [_text(part) for part in split_text(text, MAX_TEXT)]
            lead, caption = (text, media.caption) if media.caption is not None else ("", text)
            if media.type not in CAPTIONED or len(caption) > MAX_CAPTION:
                lead, caption = joined(lead, caption), ""
            texts = [_text(part) for part in split_text(lead, MAX_TEXT)] if lead else []
            return [*texts, _media(media, caption)]
        parts: list[dict[str, Any]] = []
        header: dict[str, Any] | None = None
        if media is not None and style == "button" and media.type in HEADER_MEDIA:
            header = _header(media)
            text = joined(media.caption, text)
        elif media is not None:
            # A list shows no media, nor do buttons audio or a sticker: the media goes first.
            caption = media.caption or ""
            if media.type not in CAPTIONED or len(caption) > MAX_CAPTION:
                text, caption = joined(caption, text), ""
            parts.append(_media(media, caption))
        head, body = split_tail(text, MAX_BUTTONS_BODY if style == "button" else MAX_LIST_BODY)
        if head:
            parts.extend(_text(part) for part in split_text(head, MAX_TEXT))
        interactive: dict[str, Any]
        if style == "button":
            interactive = {
                "type": "button",
                "body": {"text": body},
                "action": {
                    "buttons": [
                        {"type": "reply", "reply": {"id": bid, "title": title}}
                        for bid, title in buttons
                    ]
                },
            }
            if header is not None:
                interactive = {"type": "button", "header": header, **interactive}
        else:
            interactive = {
                "type": "list",
                "body": {"text": body},
                "action": {
                    "button": self.settings.list_button_label,
                    "sections": [{"rows": [{"id": bid, "title": title} for bid, title in buttons]}],
                },
            }
        parts.append({"type": "interactive", "interactive": interactive})
        return parts

    async def _graph(
        self,
        method: str,
        url: str,
        endpoint: WhatsAppEndpoint,
        *,
        json_body: dict[str, Any] | None = None,
    ) -> Any:
        """One Graph API call with the endpoint's Bearer token."""
        headers = {"Authorization": f"Bearer {endpoint.access_token}"}
        return await self._graph_call(method, url, headers=headers, json_body=json_body)

    async def download_media(self, media_id: str, endpoint: str) -> tuple[bytes, str | None]:
        """Fetch an inbound media file (two steps: its URL, then its bytes, same token).

        Refuses types outside ``media_allowed_types`` and files over ``media_max_bytes``.
        """
        ep = self._endpoints.get(endpoint)
        if ep is None:
            raise ConnectorError(f"unknown phone_number_id {endpoint!r}")
        s = self.settings
        info_url = f"{s.graph_url}/{media_id}"
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

    # after the commit: read receipts and media, in the background --------------------------
    def _after_commit(self, events: Sequence[NewEvent]) -> None:
        latest: dict[tuple[str, str], str] = {}
        for ev in events:
            if ev.type != "customer.message" or ev.endpoint is None or ev.identity is None:
                continue
            latest[(ev.endpoint, ev.identity)] = str(ev.data["wamid"])
            media_id = ev.data.get("media_id")
            if self.settings.media_download and isinstance(media_id, str):
                allowed = bool(ev.data.get("media_allowed"))
                self._spawn(self._fetch_media(ev.endpoint, media_id, allowed))
        if self.settings.mark_read:
            for (endpoint, _), wamid in latest.items():
                self._spawn(self._mark_read(endpoint, wamid))

    async def _mark_read(self, endpoint: str, wamid: str) -> None:
        """Mark ``wamid`` (and so every earlier message) read; one retry, failures logged."""
        ep = self._endpoints[endpoint]
        body: dict[str, Any] = {
            "messaging_product": "whatsapp",
            "status": "read",
            "message_id": wamid,
        }
        if self.settings.typing_indicator:
            body["typing_indicator"] = {"type": "text"}
        url = f"{self.settings.graph_url}/{endpoint}/messages"
        for attempt in (1, 2):
            try:
                await self._graph("POST", url, ep, json_body=body)
            except ChannelSendError as exc:
                if exc.retryable and attempt == 1:
                    await asyncio.sleep(0.5)
                    continue
                self._count("read_failed")
                log.warning(
                    "whatsapp_mark_read_failed", instance=self.name, wamid=wamid, error=str(exc)
                )
                return
            self._count("read_sent")
            return

    def media_path(self, media_id: str) -> Path | None:
        """Where a downloaded inbound media file is (None: not downloaded)."""
        root = self._media_root()
        if root is None or not MEDIA_ID.match(media_id):
            return None
        try:
            record = json.loads((root / "index" / f"{media_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return root / str(record["sha256"])

    def _media_root(self) -> Path | None:
        data_dir = self.context.data_dir
        return data_dir / "media" if data_dir is not None else None

    async def _fetch_media(self, endpoint: str, media_id: str, allowed: bool) -> None:
        """Download one inbound media file into ``<data_dir>/media/<sha256>`` and index it
        by media id. Failures are logged and counted, never the conversation's problem."""
        root = self._media_root()
        if root is None or not MEDIA_ID.match(media_id):
            self._count("media_refused")
            log.warning("whatsapp_media_not_stored", instance=self.name, media_id=media_id[:64])
            return
        if not allowed:
            self._count("media_refused")
            log.warning("whatsapp_media_type_refused", instance=self.name, media_id=media_id)
            return
        if self.media_path(media_id) is not None:
            return  # a redelivery: already stored
        async with self._media_slots:
            try:
                content, mime = await self.download_media(media_id, endpoint)
                digest = hashlib.sha256(content).hexdigest()
                record = {
                    "media_id": media_id,
                    "sha256": digest,
                    "mime_type": mime,
                    "size": len(content),
                    "phone_number_id": endpoint,
                }
                await asyncio.to_thread(_write_media, root, digest, content, media_id, record)
            except (ConnectorError, OSError) as exc:
                refused = getattr(exc, "code", None) == "media_refused"
                self._count("media_refused" if refused else "media_failed")
                log.warning(
                    "whatsapp_media_download_failed",
                    instance=self.name,
                    media_id=media_id,
                    error=str(exc)[:300],
                )
                return
        self._count("media_downloaded")
        log.info("whatsapp_media_stored", instance=self.name, media_id=media_id, sha256=digest)


def _button_style(text: str, buttons: list[tuple[str, str]]) -> str | None:
    """``button`` (reply buttons), ``list`` or None (numbered text) for a message's buttons.

    Both need a body text and distinct ids."""
    if not buttons or not text.strip() or len({bid for bid, _ in buttons}) < len(buttons):
        return None
    if len(buttons) <= MAX_BUTTONS and all(
        len(title) <= MAX_BUTTON_TITLE and len(bid) <= MAX_BUTTON_ID for bid, title in buttons
    ):
        return "button"
    if len(buttons) <= MAX_LIST_ROWS and all(
        len(title) <= MAX_LIST_TITLE and len(bid) <= MAX_LIST_ROW_ID for bid, title in buttons
    ):
        return "list"
    return None


def _text(body: str) -> dict[str, Any]:
    return {"type": "text", "text": {"preview_url": False, "body": body}}


def _media(media: OutboundMedia, caption: str) -> dict[str, Any]:
    """A media part by link; ``filename`` for documents, the caption where one is shown."""
    obj: dict[str, Any] = {"link": media.url}
    if caption and media.type in CAPTIONED:
        obj["caption"] = caption
    if media.filename and media.type == "document":
        obj["filename"] = media.filename
    return {"type": media.type, media.type: obj}


def _header(media: OutboundMedia) -> dict[str, Any]:
    obj: dict[str, Any] = {"link": media.url}
    if media.filename and media.type == "document":
        obj["filename"] = media.filename
    return {"type": media.type, media.type: obj}


def _write_media(
    root: Path, digest: str, content: bytes, media_id: str, record: dict[str, Any]
) -> None:
    """Write the file (content-addressed) and its index entry, each atomically."""
    (root / "index").mkdir(parents=True, exist_ok=True)
    target = root / digest
    if not target.exists():
        tmp = root / f".{digest}.{os.getpid()}.tmp"
        tmp.write_bytes(content)
        os.replace(tmp, target)
    entry = root / "index" / f"{media_id}.json"
    tmp = root / "index" / f".{media_id}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, entry)
