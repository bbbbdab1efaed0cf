"""The conversation snapshot: everything the controller knows about one conversation."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ConversationState = Literal["new", "bot", "queued", "agent", "wrap_up", "closed"]
OPEN_STATES: frozenset[str] = frozenset({"new", "bot", "queued", "agent", "wrap_up"})

ParticipantRole = Literal["customer", "agent", "bot", "app", "controller"]
ParticipantMode = Literal["direct", "assist"]


class Participant(BaseModel):
    """Someone taking part: the customer, an agent, a bot, an app (the controller is implicit).

    ``primary`` marks who serves the customer now (a direct-mode bot or the primary agent);
    ``present`` is false while a participant's connection is down but they have not left.
    """

    model_config = ConfigDict(extra="forbid")

    role: ParticipantRole
    id: str
    mode: ParticipantMode | None = None
    primary: bool = False
    present: bool = True
    joined_at: datetime
    # Bots: the sequence number of the newest customer message answered, so an answer to an
    # older message that arrives late is dropped instead of delivered out of turn.
    answered_seq: int = 0


class TimerRef(BaseModel):
    """A named timer of a conversation; a newer generation replaces an older one."""

    model_config = ConfigDict(extra="forbid")

    generation: int
    due_at: datetime


class Conversation(BaseModel):
    """Snapshot of one conversation, loaded before and stored after each decision."""

    model_config = ConfigDict(extra="forbid")

    id: str
    state: ConversationState = "new"
    channel: str
    instance: str
    endpoint: str
    identity: str
    customer_id: str
    created_at: datetime
    last_customer_message_at: datetime | None = None
    last_activity_at: datetime
    participants: list[Participant] = Field(default_factory=list)
    queue: str | None = None
    priority: int = 0
    enqueued_at: datetime | None = None
    handled_by_agent: bool = False
    skills: list[str] = Field(default_factory=list)
    attributes: dict[str, Any] = Field(default_factory=dict)
    labels: list[str] = Field(default_factory=list)
    timers: dict[str, TimerRef] = Field(default_factory=dict)
    # Last generation used per timer name, kept after the timer fires so that a restarted
    # timer never reuses a (name, generation) pair and its firing is never taken for a duplicate.
    timer_generations: dict[str, int] = Field(default_factory=dict)
    customer_present: bool = True
    language: str = "en"
    close_reason: str | None = None
    previous_conversation_id: str | None = None
    version: int = 0

    def present(self, role: ParticipantRole) -> list[Participant]:
        return [p for p in self.participants if p.role == role]

    def find(self, role: ParticipantRole, participant_id: str) -> Participant | None:
        for p in self.participants:
            if p.role == role and p.id == participant_id:
                return p
        return None

    @property
    def primary(self) -> Participant | None:
        for p in self.participants:
            if p.primary and p.role in ("agent", "bot"):
                return p
        return None
