"""The connector protocols and the registry.

Connectors know nothing of the engine: a channel turns requests into our events and our
outbound messages into provider calls; a bot answers a question. They get what they need
through a ConnectorContext (submit events, an HTTP session, a clock).
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
from aiohttp import web
from pydantic import BaseModel, ConfigDict

from controller.clock import Clock
from controller.errors import ConfigError
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
    conversation_id: str
    text: str
    language: str
    mode: str
    reply_to_seq: int
    idempotency_key: str


@dataclass(frozen=True)
class BotReply:
    """What a bot answered: messages, and whether it hands over or ends."""

    messages: tuple[str, ...] = ()
    handoff: bool = False
    ended: bool = False
    intent: str | None = None
    confidence: float | None = None
    slots: dict[str, Any] = field(default_factory=dict)


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


class Bot(Connector):
    kind = "bot"

    @abc.abstractmethod
    async def ask(self, request: BotRequest) -> BotReply:
        """Ask the bot; raises BotError(retryable=...) on failure."""


def connector_types() -> dict[str, type[Connector]]:
    """Connector types installed in this environment, by entry-point name."""
    found: dict[str, type[Connector]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Connector)):
            raise ConfigError(f"entry point {ep.name!r} is not a convctl connector")
        found[ep.name] = cls
    return found


def build_connector(
    name: str,
    type_name: str,
    raw_settings: dict[str, Any],
    context: ConnectorContext,
    types: dict[str, type[Connector]],
) -> Connector:
    cls = types.get(type_name)
    if cls is None:
        known = ", ".join(sorted(types)) or "none"
        raise ConfigError(f"connector {name!r}: unknown type {type_name!r} (installed: {known})")
    try:
        settings = cls.settings_model.model_validate(raw_settings)
    except ValueError as exc:
        raise ConfigError(f"connector {name!r}: invalid settings: {exc}") from exc
    return cls(name, settings, context)
