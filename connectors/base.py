"""The connector protocols and the registry.

Connectors know nothing of the engine: a channel turns requests into our events and our
outbound messages into provider calls; a bot answers a question. They get what they need
through a ConnectorContext (submit events, an HTTP session, a clock).
"""

from __future__ import annotations

import abc
import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from controller.clock import Clock
from controller.errors import ConfigError, RequestError
from controller.models import NewEvent
from controller.store.base import Accepted

ENTRY_POINT_GROUP = "convctl.connectors"


class ConnectorSettings(BaseModel):
    """Base of every connector's settings model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class ConnectorContext:
    """What the service hands a connector instance."""

    submit: Callable[[Sequence[NewEvent]], Awaitable[list[Accepted]]]
    clock: Clock
    session_secret: str
    allowed_origins: list[str]
    service: dict[str, Any] = field(default_factory=dict)
    http: aiohttp.ClientSession | None = None  # opened when the service starts
    data_dir: Path | None = None  # the service's data directory (files connectors keep)
    # Bots answering through a callback route hand the answer here (set by the service).
    bot_reply: Callable[[BotCallback], Awaitable[None]] | None = None


@dataclass(frozen=True)
class OutboundMessage:
    """A message for the customer, as the outbox hands it to a channel."""

    conversation_id: str
    endpoint: str
    identity: str
    message: dict[str, Any]
    idempotency_key: str
    # When the customer last wrote (None: not known), for channels with a reply window.
    customer_last_at: datetime | None = None


@dataclass(frozen=True)
class BotRequest:
    """One customer message for a bot.

    ``session_id`` is the conversation id; bots whose platform limits session ids map it
    (see ``safe_session_id``). ``attributes`` are the conversation's attributes as strings,
    for bots that keep session attributes (Lex) or parameters (Dialogflow).
    """

    conversation_id: str
    text: str
    language: str
    mode: str
    reply_to_seq: int
    idempotency_key: str
    channel: str = ""
    customer_id: str = ""
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BotButton:
    """A choice offered to the customer: ``title`` is shown, ``payload`` goes back to the bot."""

    title: str
    payload: str


@dataclass(frozen=True)
class BotMessage:
    """One message of a bot's answer. Channels that cannot show buttons or images degrade
    them to text; ``custom`` payloads are for the controller and rules, never shown."""

    text: str = ""
    buttons: tuple[BotButton, ...] = ()
    image: str | None = None
    custom: dict[str, Any] | None = None

    def shown(self) -> bool:
        """Whether a customer (or an agent) would see anything of it."""
        return bool(self.text or self.buttons or self.image)


@dataclass(frozen=True)
class BotReply:
    """What a bot answered: messages, and whether it hands over or ends.

    ``pending`` means the answer comes later, through the connector's callback route (the
    connector then hands it to ``ConnectorContext.bot_reply``). ``attributes`` are values
    the bot wants kept on the conversation (Lex session attributes, Dialogflow parameters);
    they are merged into the conversation's attributes. ``handoff_data`` carries what the
    bot said about the handoff (queue, reason) for the rules.
    """

    messages: tuple[BotMessage, ...] = ()
    handoff: bool = False
    ended: bool = False
    intent: str | None = None
    confidence: float | None = None
    slots: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)
    handoff_data: dict[str, Any] = field(default_factory=dict)
    failed: str | None = None  # the bot answered but could not help (fallback): the reason
    pending: bool = False


@dataclass(frozen=True)
class BotCallback:
    """An answer that arrived later, through a bot's callback route.

    ``dedupe_key`` must be stable for one answer (the bot's own message id where it gives
    one), so a redelivered callback makes no second event. ``reply_to_seq`` is the sequence
    number of the customer message answered, when the bot tells it (None: not known).
    """

    bot: str
    conversation_id: str
    reply: BotReply
    dedupe_key: str
    reply_to_seq: int | None = None


class Connector(abc.ABC):
    """Base of every connector type."""

    kind: ClassVar[str]  # "channel", "bot" or "app"
    settings_model: ClassVar[type[ConnectorSettings]] = ConnectorSettings

    def __init__(self, name: str, settings: ConnectorSettings, context: ConnectorContext) -> None:
        self.name = name
        self.settings = settings
        self.context = context

    def routes(self) -> list[web.RouteDef]:
        """HTTP routes the connector serves (webhooks, pages, sockets)."""
        return []

    async def start(self) -> None:
        """Called once the service runs."""

    async def stop(self) -> None:
        """Called at shutdown."""


class Channel(Connector):
    kind = "channel"
    capabilities: ClassVar[frozenset[str]] = frozenset({"text"})

    @abc.abstractmethod
    async def send(self, message: OutboundMessage) -> str | None:
        """Deliver to the customer; return the provider's message id if there is one.

        Raises ChannelSendError(retryable=...) on failure.
        """

    def status_hold(self, idempotency_key: str) -> float | None:
        """Seconds the message sent under ``idempotency_key``, whose fate is unknown (claimed
        when the process died, or a send that got no answer), waits for the provider's
        delivery status before it is sent again; None: this channel's statuses cannot name
        our messages, send it again; 0: a status already named it, ``send`` knows."""
        return None


class BotSettings(ConnectorSettings):
    """What every bot instance can tune: how long one answer may take, how often a failed
    question is asked again, and when the circuit breaker stops asking a failing bot."""

    timeout: float = Field(default=10.0, gt=0, le=300)
    max_attempts: int = Field(default=3, ge=1, le=20)
    retry_backoff: float = Field(default=0.5, gt=0, le=60)
    breaker_failures: int = Field(default=5, ge=1, le=1000)
    breaker_reset: float = Field(default=30.0, gt=0, le=3600)
    # A bot that did not understand (fallback, no match) says so to the customer; only after
    # this many in a row do the rules hear bot.failed (reason "fallback" / "no_match").
    fallbacks_before_failure: int = Field(default=2, ge=1, le=100)


class Bot(Connector):
    kind = "bot"
    settings_model: ClassVar[type[ConnectorSettings]] = BotSettings
    settings: BotSettings

    @abc.abstractmethod
    async def ask(self, request: BotRequest) -> BotReply:
        """Ask the bot; raises BotError(retryable=...) on failure."""


async def read_body(request: web.Request, limit: int) -> bytes:
    """The exact bytes received (signatures are over them), refused past ``limit`` with 413."""
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


class ConnectorTypes:
    """Connector types installed in this environment, by entry-point name.

    A type is imported only when asked for, so a connector whose extra dependencies are
    missing breaks only the instances that use it, with an error that names it.
    """

    def __init__(self, extra: dict[str, type[Connector]] | None = None) -> None:
        self._points = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        self._loaded: dict[str, type[Connector]] = dict(extra or {})

    def names(self) -> list[str]:
        return sorted({*self._points, *self._loaded})

    def __contains__(self, name: object) -> bool:
        return name in self._points or name in self._loaded

    def get(self, name: str) -> type[Connector] | None:
        if name in self._loaded:
            return self._loaded[name]
        ep = self._points.get(name)
        if ep is None:
            return None
        try:
            cls = ep.load()
        except ImportError as exc:
            raise ConfigError(f"connector type {name!r} cannot be imported: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise ConfigError(f"entry point {name!r} is not a convctl connector")
        self._loaded[name] = cls
        return cls


def connector_types() -> ConnectorTypes:
    return ConnectorTypes()


def build_connector(
    name: str,
    type_name: str,
    raw_settings: dict[str, Any],
    context: ConnectorContext,
    types: ConnectorTypes,
) -> Connector:
    cls = types.get(type_name)
    if cls is None:
        known = ", ".join(types.names()) or "none"
        raise ConfigError(f"connector {name!r}: unknown type {type_name!r} (installed: {known})")
    try:
        settings = cls.settings_model.model_validate(raw_settings)
    except ValueError as exc:
        raise ConfigError(f"connector {name!r}: invalid settings: {exc}") from exc
    return cls(name, settings, context)


_SESSION_SAFE = re.compile(r"[^0-9A-Za-z._:-]")


def safe_session_id(conversation_id: str, max_len: int = 100) -> str:
    """A session id a bot platform accepts, stable for one conversation.

    Characters outside ``[0-9A-Za-z._:-]`` become ``_``; ids longer than ``max_len`` (or
    changed by the mapping, which could collide) become a SHA-256 prefix.
    """
    cleaned = _SESSION_SAFE.sub("_", conversation_id)
    if cleaned == conversation_id and 2 <= len(cleaned) <= max_len:
        return cleaned
    return hashlib.sha256(conversation_id.encode()).hexdigest()[: min(max_len, 64)]
