"""Persistence: one Store interface, implemented on SQLite (and later PostgreSQL)."""

from controller.store.base import (
    Accepted,
    AgentRecord,
    Committed,
    DecisionRecord,
    Message,
    NewOutbox,
    OfferRecord,
    OutboxRow,
    RouterSnapshot,
    Store,
    TimerOp,
    TimerRow,
)

__all__ = [
    "Accepted",
    "AgentRecord",
    "Committed",
    "DecisionRecord",
    "Message",
    "NewOutbox",
    "OfferRecord",
    "OutboxRow",
    "RouterSnapshot",
    "Store",
    "TimerOp",
    "TimerRow",
]
