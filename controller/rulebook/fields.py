"""The field paths rules may test or template, with their declared types.

Rules are checked against this registry at load time, so a misspelt path or a literal of the
wrong type is reported with its line instead of silently never matching.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Literal

FieldType = Literal["str", "num", "bool", "list", "map", "any"]

ROOTS: tuple[str, ...] = ("event", "conversation", "customer", "bot", "queue", "now")

FIELDS: Mapping[str, FieldType] = {
    # the event being decided
    "event.type": "str",
    "event.id": "str",
    "event.source": "str",
    "event.text": "str",
    "event.reason": "str",
    "event.name": "str",
    "event.generation": "num",
    "event.agent_id": "str",
    "event.offer_id": "str",
    "event.bot": "str",
    "event.app": "str",
    "event.intent": "str",
    "event.confidence": "num",
    "event.status": "str",
    "event.disposition": "str",
    # the conversation it belongs to
    "conversation.id": "str",
    "conversation.state": "str",
    "conversation.channel": "str",
    "conversation.instance": "str",
    "conversation.queue": "str",
    "conversation.priority": "num",
    "conversation.language": "str",
    "conversation.age": "num",
    "conversation.idle": "num",
    "conversation.agents": "num",
    "conversation.bots": "num",
    "conversation.has_primary": "bool",
    "conversation.labels": "list",
    "conversation.attributes": "map",
    # the customer
    "customer.id": "str",
    "customer.present": "bool",
    "customer.known": "bool",
    "customer.language": "str",
    "customer.profile": "map",
    # the last bot result
    "bot.name": "str",
    "bot.intent": "str",
    "bot.confidence": "num",
    "bot.slots": "map",
    # the conversation's queue
    "queue.name": "str",
    "queue.position": "num",
    "queue.estimated_wait": "num",
    "queue.agents_available": "num",
    "queue.open": "bool",
    # the clock, in the configured timezone
    "now.local_time": "str",
    "now.weekday": "str",
    "now.hour": "num",
    "now.date": "str",
    "now.holiday": "bool",
}

# Free-form maps: any key below these prefixes is allowed and may hold any type.
OPEN_PREFIXES: tuple[str, ...] = ("conversation.attributes.", "customer.profile.", "bot.slots.")


def field_type(path: str) -> FieldType | None:
    """The declared type of ``path``, ``"any"`` below an open map, None if unknown."""
    known = FIELDS.get(path)
    if known is not None:
        return known
    for prefix in OPEN_PREFIXES:
        if path.startswith(prefix) and len(path) > len(prefix) and not path.endswith("."):
            return "any"
    return None


def suggest_field(path: str) -> str | None:
    """The nearest known path for a misspelt ``path`` (for "did you mean"), if any is close."""
    parts = path.split(".")
    if len(parts) >= 3:
        head = ".".join(parts[:2]) + "."
        rest = ".".join(parts[2:])
        near = difflib.get_close_matches(head, list(OPEN_PREFIXES), n=1, cutoff=0.8)
        if near:
            return near[0] + rest
    close = difflib.get_close_matches(path, list(FIELDS), n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_field_message(path: str) -> str:
    """The load error for a path that is not in the registry."""
    hint = suggest_field(path)
    message = f"unknown field '{path}'"
    if hint is not None:
        message += f"; did you mean '{hint}'?"
    return message
