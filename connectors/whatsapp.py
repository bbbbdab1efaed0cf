"""The WhatsApp Cloud API channel: Meta's signed webhook in, Graph API ``/messages`` out.

One instance serves one Meta app (one app secret, one verify token) and any number of business
phone numbers, each with its own access token. A conversation is (instance, phone_number_id,
wa_id), so the same person writing to two numbers has two conversations and every reply goes
out through the number (and token) the conversation runs on. Wire facts:
``protocols/whatsapp-cloud.md``.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    Payload,
    buttons_of,
    ensure_unique,
    fit_buttons,
    unknown_endpoint,
)
from controller.errors import ConnectorError
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


class _MediaInfo(_Payload):
    url: str
    mime_type: str | None = None
    file_size: int | None = None


# the channel -------------------------------------------------------------------------------
class WhatsAppChannel(MetaChannel[_Value]):
    channel: ClassVar[str] = CHANNEL
    webhook_object: ClassVar[str] = "whatsapp_business_account"
    graph_codes: ClassVar[GraphCodes] = GRAPH_CODES
    settings_model: ClassVar[type[ConnectorSettings]] = WhatsAppSettings
    settings: WhatsAppSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._endpoints = {e.phone_number_id: e for e in self.settings.endpoints}

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
        return self._delivery_status(f"{status.id}:{status.status}", conversation_id, data)

    # outbound --------------------------------------------------------------------------
    async def send(self, message: OutboundMessage) -> str | None:
        """Send through the conversation's own number and token; return the ``wamid``."""
        endpoint = self._endpoints.get(message.endpoint)
        if endpoint is None:
            raise unknown_endpoint("phone_number_id", message.endpoint)
        body = self._send_body(message)
        url = f"{self.settings.graph_url}/{endpoint.phone_number_id}/messages"
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
        buttons = buttons_of(message.message.get("buttons"))
        # Too many or too long for reply buttons → numbered text.
        text, use_buttons = fit_buttons(text, buttons, MAX_BUTTONS, MAX_BUTTON_TITLE)
        if use_buttons:
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
        return {**common, "type": "text", "text": {"preview_url": False, "body": text}}

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
        Not called by the event flow yet: events carry the media id by reference.
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
