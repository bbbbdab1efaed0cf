"""Events: everything that happens to a conversation enters the inbox as one of these."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

EventType = Literal[
    "conversation.created",
    "conversation.unattended",
    "conversation.closed",
    "customer.message",
    "customer.disconnected",
    "customer.returned",
    "customer.left",
    "customer.identified",
    "customer.updated",
    "customer.merged",
    "bot.message",
    "bot.handoff",
    "bot.failed",
    "bot.ended",
    "agent.offered",
    "agent.offer_expired",
    "agent.accepted",
    "agent.declined",
    "agent.message",
    "agent.disconnected",
    "agent.reconnected",
    "agent.left",
    "agent.presence_changed",
    "agent.transferred",
    "agent.outbound",
    "agent.invited",
    "agent.closed",
    "agent.wrap_up_done",
    "app.joined",
    "app.event",
    "app.left",
    "delivery.status",
    "delivery.failed",
    "campaign.message",
    "timer.fired",
]

EVENT_TYPES: tuple[str, ...] = get_args(EventType)


class NewEvent(BaseModel):
    """An event as a source hands it to the inbox, before it has an id and a sequence number.

    ``source`` and ``dedupe_key`` together identify it: the inbox stores one event per pair,
    so a redelivered webhook or a retried frame changes nothing.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: EventType
    source: str = Field(min_length=1, max_length=200)
    dedupe_key: str = Field(min_length=1, max_length=400)
    data: dict[str, Any] = Field(default_factory=dict)
    conversation_id: str | None = None
    # How to find or open the conversation when no id is known (a customer writing in).
    channel: str | None = None
    instance: str | None = None
    endpoint: str | None = None
    identity: str | None = None

    @field_validator("data")
    @classmethod
    def _flat_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if "." in key:
                raise ValueError(f"event data keys may not contain '.': {key!r}")
        return value


class Event(BaseModel):
    """An event accepted into the inbox: it has an id, a conversation and its place in it."""

    model_config = ConfigDict(frozen=True)

    id: str
    type: EventType
    conversation_id: str
    seq: int
    source: str
    dedupe_key: str
    accepted_at: datetime
    data: dict[str, Any] = Field(default_factory=dict)
