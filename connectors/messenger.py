"""The Facebook Messenger channel: Meta's signed ``object=page`` webhook in, Send API out.

One instance serves one Meta app (one app secret, one verify token) and any number of Pages,
each with its own Page access token. A conversation is (instance, page_id, PSID), so the same
person writing to two Pages has two conversations and every reply goes out with the token of
the Page the conversation runs on. After each delivery is committed, its customers are marked
seen (and, if enabled, shown typing) with sender actions, in the background. Wire facts:
``protocols/messenger.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import structlog
from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    joined,
    media_of,
    numbered,
    split_text,
    unknown_endpoint,
)
from controller.errors import ChannelSendError
from controller.models import NewEvent

log = structlog.get_logger(__name__)

CHANNEL = "messenger"
# Graph error codes (protocol sheet §5) → our failure reasons.
GRAPH_CODES = GraphCodes(
    window_closed=frozenset({(10, 2018278)}),
    invalid_recipient=frozenset({551, (100, 2018001)}),
    rate_limited=frozenset({4, 613}),
    transient=frozenset({2, 1200}),
)
STANDARD_WINDOW = timedelta(hours=24)
HUMAN_AGENT_WINDOW = timedelta(days=7)
MAX_QUICK_REPLIES = 13
MAX_QUICK_REPLY_TITLE = 20
MAX_TEXT = 2000
# Our media types → Messenger attachment types (a sticker is sent as an image).
ATTACHMENT_TYPES = {
    "image": "image",
    "audio": "audio",
    "video": "video",
    "document": "file",
    "sticker": "image",
}
WATERMARK_KINDS = {"delivery": "delivered", "read": "read"}


# settings ---------------------------------------------------------------------------------
class MessengerPage(BaseModel):
    """One Facebook Page of the instance and the Page access token that sends as it."""

    model_config = ConfigDict(extra="forbid")

    page_id: str = Field(pattern=r"^[0-9]{1,32}$")
    access_token: AccessToken
    name: str | None = None


class MessengerSettings(MetaAppSettings):
    pages: list[MessengerPage] = Field(min_length=1)
    # Outside 24 h, agents' messages go out tagged HUMAN_AGENT (needs Meta's permission).
    human_agent_tag_enabled: bool = True
    # After a delivery is committed, mark each customer's messages seen (sender action).
    mark_seen: bool = True
    # Right after it, show the typing bubble (until our next message or Messenger's timeout).
    typing_indicator: bool = False

    @model_validator(mode="after")
    def _unique_pages(self) -> MessengerSettings:
        ensure_unique((p.page_id for p in self.pages), "page_id")
        return self


# provider payloads (unknown fields are tolerated: Meta adds fields without notice) -----------
class _Party(Payload):
    id: str = Field(min_length=1, max_length=64)


class _QuickReply(Payload):
    payload: str | None = None


class _Attachment(Payload):
    type: str
    payload: dict[str, Any] | None = None


class _ReplyTo(Payload):
    mid: str | None = None


class _Message(Payload):
    mid: str = Field(min_length=1, max_length=300)
    text: str | None = None
    is_echo: bool = False
    quick_reply: _QuickReply | None = None
    attachments: list[_Attachment] = Field(default_factory=list)
    reply_to: _ReplyTo | None = None


class _Postback(Payload):
    mid: str | None = None
    title: str | None = None
    payload: str | None = None
    referral: dict[str, Any] | None = None


class _Watermark(Payload):
    watermark: int
    mids: list[str] = Field(default_factory=list)


class _Reaction(Payload):
    mid: str = Field(min_length=1, max_length=300)
    action: str = "react"
    emoji: str | None = None
    reaction: str | None = None


class _Messaging(Payload):
    sender: _Party
    recipient: _Party
    timestamp: int | None = None
    message: _Message | None = None
    postback: _Postback | None = None
    delivery: _Watermark | None = None
    read: _Watermark | None = None
    reaction: _Reaction | None = None


class _Entry(Payload):
    id: str = Field(min_length=1, max_length=64)
    time: int | None = None
    messaging: list[dict[str, Any]] = Field(default_factory=list)
    standby: list[dict[str, Any]] = Field(default_factory=list)


class _SendResponse(Payload):
    recipient_id: str | None = None
    message_id: str | None = None


@dataclass(frozen=True)
class _Item:
    """One ``messaging[]`` event of a Page, with its raw form (for unsupported kinds)."""

    page_id: str
    event: _Messaging
    raw: dict[str, Any]

    @property
    def kind(self) -> str:
        for key in ("message", "postback", "delivery", "read", "reaction"):
            if getattr(self.event, key) is not None:
                return key
        others = [k for k in self.raw if k not in ("sender", "recipient", "timestamp")]
        return others[0] if others else "unknown"


# the channel -------------------------------------------------------------------------------
class MessengerChannel(MetaChannel[_Item]):
    channel: ClassVar[str] = CHANNEL
    webhook_object: ClassVar[str] = "page"
    graph_codes: ClassVar[GraphCodes] = GRAPH_CODES
    settings_model: ClassVar[type[ConnectorSettings]] = MessengerSettings
    settings: MessengerSettings

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pages = {p.page_id: p for p in self.settings.pages}

    # inbound ---------------------------------------------------------------------------
    def _items(self, entries: list[dict[str, Any]]) -> list[_Item]:
        items: list[_Item] = []
        for entry in (_Entry.model_validate(e) for e in entries):
            # Validated even for an unknown Page: a wrong shape is a 400 whatever the Page.
            found = [_Item(entry.id, _Messaging.model_validate(r), r) for r in entry.messaging]
            if entry.id not in self._pages:
                log.warning(
                    "messenger_unknown_page_ignored",
                    instance=self.name,
                    page_id=entry.id,
                    events=len(found),
                )
                continue
            if entry.standby:  # another app owns these threads: read-only for us
                log.info("messenger_standby_ignored", instance=self.name, events=len(entry.standby))
            items.extend(found)
        return items

    async def _events(self, items: Sequence[_Item]) -> list[NewEvent]:
        events: list[NewEvent] = []
        open_conversations: dict[tuple[str, str], dict[str, Any] | None] = {}
        for item in items:
            ev, kind = item.event, item.kind
            if ev.message is not None and ev.message.is_echo:
                # Sent by the Page (us, another app or a person in the Page Inbox).
                log.info("messenger_echo_ignored", instance=self.name, page_id=item.page_id)
                continue
            if kind not in WATERMARK_KINDS:
                events.append(self._message_event(item))
                continue
            key = (item.page_id, ev.sender.id)
            if key not in open_conversations:
                open_conversations[key] = await self._open_conversation(*key)
            snapshot = open_conversations[key]
            if snapshot is None:
                log.info("messenger_status_without_open_conversation", instance=self.name)
                continue
            message_ids = await self._message_ids(item, snapshot)
            events.append(self._status_event(item, str(snapshot["conversation_id"]), message_ids))
        return events

    async def _message_ids(self, item: _Item, snapshot: dict[str, Any]) -> list[str]:
        """Our ids of the messages a delivery or read is about, oldest first.

        A delivery's ``mids`` are looked up among the ids our sends returned; a read (or a
        delivery whose mids are unknown) covers everything up to its watermark, so it names
        the newest message shown to the customer at or before it.
        """
        conversation_id = str(snapshot["conversation_id"])
        mark = item.event.delivery or item.event.read
        assert mark is not None  # a watermark kind
        found: list[str] = []
        for mid in mark.mids:
            message_id = await self._our_message_id(mid, conversation_id)
            if message_id is not None and message_id not in found:
                found.append(message_id)
        if found:
            return found
        watermark = datetime.fromtimestamp(mark.watermark / 1000, UTC)
        latest: str | None = None
        for line in snapshot.get("messages", []):
            if line.get("from") == "customer" or not line.get("id"):
                continue
            try:
                at = datetime.fromisoformat(str(line.get("at")))
            except ValueError:
                continue
            if at <= watermark:
                latest = str(line["id"])
        return [latest] if latest is not None else []

    def _message_event(self, item: _Item) -> NewEvent:
        ev, kind = item.event, item.kind
        psid = ev.sender.id
        data: dict[str, Any] = {
            "kind": kind,
            "psid": psid,
            "page_id": item.page_id,
            "sent_at": ev.timestamp,
        }
        if ev.message is not None:
            dedupe_key = ev.message.mid
            data.update(self._message_content(ev.message))
        elif ev.postback is not None:
            pb = ev.postback
            # Postbacks have a mid only sometimes; the tap's time identifies it otherwise.
            dedupe_key = pb.mid or f"postback:{item.page_id}:{psid}:{ev.timestamp}:{pb.payload}"
            data.update(
                mid=pb.mid,
                payload=pb.payload,
                reply_id=pb.payload,
                title=pb.title,
                text=pb.title,
                referral=pb.referral,
            )
        elif ev.reaction is not None:
            r = ev.reaction
            dedupe_key = f"{r.mid}:{r.action}:{r.emoji or ''}"
            data.update(reaction_to=r.mid, action=r.action, emoji=r.emoji, reaction=r.reaction)
        else:  # referral, handover, opt-in…: stored as what it is, never an error
            canonical = json.dumps(item.raw, sort_keys=True, separators=(",", ":"))
            digest = hashlib.sha256(f"{item.page_id}:{canonical}".encode()).hexdigest()[:32]
            dedupe_key = f"{kind}:{digest}"
        return self._customer_message(dedupe_key, item.page_id, psid, data)

    @staticmethod
    def _message_content(msg: _Message) -> dict[str, Any]:
        """A message's part of ``data``: text, quick reply payload, attachments by URL."""
        out: dict[str, Any] = {
            "mid": msg.mid,
            "text": msg.text,
            "reply_to": msg.reply_to.mid if msg.reply_to else None,
        }
        if msg.quick_reply is not None:
            out.update(kind="quick_reply", payload=msg.quick_reply.payload)
            out["reply_id"] = msg.quick_reply.payload
        elif msg.attachments:
            out["kind"] = msg.attachments[0].type
            out["attachments"] = [
                clean(
                    {
                        "type": a.type,
                        "url": (a.payload or {}).get("url"),
                        "title": (a.payload or {}).get("title"),
                        "sticker_id": (a.payload or {}).get("sticker_id"),
                    }
                )
                for a in msg.attachments
            ]
        elif msg.text is not None:
            out["kind"] = "text"
        return out

    def _status_event(self, item: _Item, conversation_id: str, message_ids: list[str]) -> NewEvent:
        ev, kind = item.event, item.kind
        mark = ev.delivery if kind == "delivery" else ev.read
        assert mark is not None  # kind says which one is set
        psid = ev.sender.id
        data = {
            "status": WATERMARK_KINDS[kind],
            "message_id": message_ids[-1] if message_ids else None,
            "message_ids": message_ids or None,
            "watermark": mark.watermark,
            "mids": mark.mids or None,
            "psid": psid,
            "page_id": item.page_id,
            "sent_at": ev.timestamp,
        }
        key = f"{item.page_id}:{psid}:{kind}:{mark.watermark}"
        return self._delivery_status(key, conversation_id, data)

    # after the commit: sender actions, in the background ---------------------------------
    def _after_commit(self, events: Sequence[NewEvent]) -> None:
        """Once per customer of the delivery: ``mark_seen`` (marks everything they sent read),
        then ``typing_on`` when enabled. Only for what a customer wrote or tapped (messages,
        postbacks), not for reactions, referrals or handover events."""
        actions = [
            action
            for action, on in (
                ("mark_seen", self.settings.mark_seen),
                ("typing_on", self.settings.typing_indicator),
            )
            if on
        ]
        if not actions:
            return
        customers: dict[tuple[str, str], None] = {}
        for ev in events:
            if ev.type != "customer.message" or ev.endpoint is None or ev.identity is None:
                continue
            if "mid" in ev.data or ev.data.get("kind") == "postback":
                customers[(ev.endpoint, ev.identity)] = None
        for page_id, psid in customers:
            self._spawn(self._sender_actions(page_id, psid, actions))

    async def _sender_actions(self, page_id: str, psid: str, actions: list[str]) -> None:
        """Send the sender actions in order, each alone in its body; a failure is logged and
        counted, never retried (the next delivery sends them again)."""
        page = self._pages.get(page_id)
        if page is None:  # the Page left the settings in between
            return
        url = f"{self.settings.graph_url}/me/messages"
        for action in actions:
            outcome = "seen" if action == "mark_seen" else "typing"
            body = {"recipient": {"id": psid}, "sender_action": action}
            try:
                await self._graph_call(
                    "POST", url, params={"access_token": page.access_token}, json_body=body
                )
            except ChannelSendError as exc:
                self._count(f"{outcome}_failed")
                log.warning(
                    "messenger_sender_action_failed",
                    instance=self.name,
                    page_id=page_id,
                    action=action,
                    error=str(exc)[:300],
                )
                continue
            self._count(f"{outcome}_sent")

    # outbound --------------------------------------------------------------------------
    async def send(self, message: OutboundMessage) -> str | None:
        """Send through the conversation's Page and its token; return the ``mid`` (of the last
        part, when the message goes out in several)."""
        page = self._pages.get(message.endpoint)
        if page is None:
            raise unknown_endpoint("page_id", message.endpoint)
        messaging_type = self._messaging_type(message)
        url = f"{self.settings.graph_url}/me/messages"

        async def send_one(content: dict[str, Any], key: str) -> str | None:
            body = {
                "recipient": {"id": message.identity},
                **messaging_type,
                "message": {**content, "metadata": key},
            }
            data = await self._graph_call(
                "POST", url, params={"access_token": page.access_token}, json_body=body
            )
            sent = _SendResponse.model_validate(data) if isinstance(data, dict) else None
            if sent is None or not sent.message_id:
                # Accepted (2xx) without an id: sending again would duplicate the message.
                log.warning("messenger_send_without_id", instance=self.name)
                return None
            return sent.message_id

        return await self._send_parts(message, self._contents(message), send_one)

    def _messaging_type(self, message: OutboundMessage) -> dict[str, str]:
        """RESPONSE inside 24 h of the customer's last message; HUMAN_AGENT for a person's
        message inside 7 days; otherwise a ``window_closed`` failure without a Graph call.

        With no known last message time, Graph decides (it answers 10/2018278 when closed).
        """
        last = message.customer_last_at
        age = self.context.clock.now() - last if last is not None else None
        if age is None or age <= STANDARD_WINDOW:
            return {"messaging_type": "RESPONSE"}
        human = message.message.get("from") == "agent" and self.settings.human_agent_tag_enabled
        if human and age <= HUMAN_AGENT_WINDOW:
            return {"messaging_type": "MESSAGE_TAG", "tag": "HUMAN_AGENT"}
        sender = message.message.get("from", "unknown")
        raise ChannelSendError(
            f"window_closed: the customer last wrote {age} ago; "
            f"a {sender} message cannot be sent outside the window",
            retryable=False,
        )

    @staticmethod
    def _contents(message: OutboundMessage) -> list[dict[str, Any]]:
        """The ``message`` objects that deliver one outbound message, in order.

        Text over 2000 characters is cut into several; media goes as an attachment by URL
        after the text (an attachment carries no text); buttons become quick replies on the
        last part (up to 13, titles up to 20 characters), else numbered lines of text.
        """
        text = str(message.message.get("text") or "")
        buttons = buttons_of(message.message.get("buttons"))
        media = media_of(message.message)
        fits = len(buttons) <= MAX_QUICK_REPLIES and all(
            len(title) <= MAX_QUICK_REPLY_TITLE for _, title in buttons
        )
        quick = bool(buttons) and fits and bool(text or media)
        if buttons and not quick:
            text = numbered(text, buttons)
        parts: list[dict[str, Any]] = []
        if media is None:
            parts = [{"text": part} for part in split_text(text, MAX_TEXT)]
        else:
            lead = joined(text, media.caption)
            if lead:
                parts = [{"text": part} for part in split_text(lead, MAX_TEXT)]
            parts.append({"attachment": _attachment(media)})
        if quick:
            parts[-1]["quick_replies"] = [
                {"content_type": "text", "title": title, "payload": bid} for bid, title in buttons
            ]
        return parts


def _attachment(media: OutboundMedia) -> dict[str, Any]:
    return {
        "type": ATTACHMENT_TYPES[media.type],
        "payload": {"url": media.url, "is_reusable": True},
    }
