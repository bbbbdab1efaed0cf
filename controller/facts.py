"""Facts: what the rules can read about one event, built from the event and the snapshot.

Pure: the clock is the event's accepted time, so deciding the same event again (explain,
backtest, recovery) sees the same facts.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from controller.models import Conversation, Event

_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def clock_facts(now: datetime, tz: ZoneInfo) -> dict[str, Any]:
    local = now.astimezone(tz)
    return {
        "local_time": local.strftime("%H:%M"),
        "weekday": _WEEKDAYS[local.weekday()],
        "hour": local.hour,
        "date": local.date().isoformat(),
    }


def build_facts(
    conv: Conversation,
    event: Event,
    tz: ZoneInfo,
    queue: dict[str, Any] | None = None,
    customer: dict[str, Any] | None = None,
    holiday: bool | None = None,
) -> dict[str, Any]:
    """``queue`` and ``customer`` are derived facts read before deciding (router, profiles);
    ``customer`` gives known, profile and, when the profile has one, language."""
    now = event.accepted_at
    idle_since = conv.last_customer_message_at or conv.created_at
    agents = [p for p in conv.participants if p.role == "agent" and p.present]
    bots = [p for p in conv.participants if p.role == "bot"]
    facts: dict[str, Any] = {
        "event": {
            **event.data,
            "type": event.type,
            "source": event.source,
            "seq": event.seq,
        },
        "conversation": {
            "id": conv.id,
            "state": conv.state,
            "channel": conv.channel,
            "instance": conv.instance,
            "queue": conv.queue,
            "priority": conv.priority,
            "language": conv.language,
            "age": (now - conv.created_at).total_seconds(),
            "idle": (now - idle_since).total_seconds(),
            "agents": len(agents),
            "bots": len(bots),
            "has_primary": conv.primary is not None,
            "labels": list(conv.labels),
            "attributes": dict(conv.attributes),
        },
        "customer": {
            "id": conv.customer_id,
            "present": conv.customer_present,
            "known": False,
            "language": conv.language,
            "profile": {},
            **(customer or {}),
        },
        "now": clock_facts(now, tz),
    }
    if event.type.startswith("bot."):
        facts["bot"] = {
            "name": event.data.get("bot"),
            "intent": event.data.get("intent"),
            "confidence": event.data.get("confidence"),
            "slots": event.data.get("slots") or {},
        }
    if holiday is not None:
        facts["now"]["holiday"] = holiday
    if queue is not None:
        facts["queue"] = queue
    return facts
