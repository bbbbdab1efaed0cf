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
    "event.queue": "str",
    "event.reply_id": "str",
    "event.action": "str",
    "event.direction": "str",
    "event.status": "str",
    "event.disposition": "str",
    "event.campaign_id": "str",
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
    "queue.waiting": "num",
    "queue.open": "bool",
    # the clock, in the configured timezone
    "now.local_time": "str",
    "now.weekday": "str",
    "now.hour": "num",
    "now.date": "str",
    "now.holiday": "bool",
}

# Free-form maps: any key below these prefixes is allowed and may hold any type.
OPEN_PREFIXES: tuple[str, ...] = (
    "conversation.attributes.",
    "customer.profile.",
    "bot.slots.",
    "event.custom.",
)


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


# One line per field for the generated reference (rules/README.md) and the JSON Schema help;
# a test checks that every path in FIELDS and OPEN_PREFIXES has one.
FIELD_DESCRIPTIONS: Mapping[str, str] = {
    "event.type": "the event's type, e.g. `customer.message`",
    "event.id": "the event's id",
    "event.source": "where the event came from (a connector name, `router`, `timer`...)",
    "event.text": "the message text (customer, agent and bot messages)",
    "event.reason": "why: `agent.left`, `conversation.closed`, `delivery.failed`",
    "event.name": "`timer.fired`: the timer's name; `app.event` (custom): the event's name",
    "event.generation": "`timer.fired`: the timer's generation",
    "event.agent_id": "agent and router events: the agent",
    "event.offer_id": "router events: the offer",
    "event.bot": "bot events: the bot",
    "event.app": "app events: the app",
    "event.intent": "bot events: the intent the bot recognised",
    "event.confidence": "bot events: the bot's confidence, 0 to 1",
    "event.queue": "`bot.handoff`: the queue the bot asked for, when it named one",
    "event.reply_id": "`customer.message`: the payload of the button the customer tapped",
    "event.action": "`app.event`: what the app did: `message`, `set` (attributes) or `custom`"
    " (then `event.name` is its name)",
    "event.direction": "`conversation.created`: `inbound` (the customer wrote first) or "
    "`outbound` (an agent or a campaign did)",
    "event.status": "`delivery.status`: the delivery status",
    "event.disposition": "`agent.wrap_up_done`: the agent's disposition",
    "event.campaign_id": "`campaign.message`: the campaign",
    "conversation.id": "the conversation's id",
    "conversation.state": "`new`, `bot`, `queued`, `agent`, `wrap_up` or `closed`",
    "conversation.channel": "the channel type, e.g. `webchat`",
    "conversation.instance": "the configured channel instance",
    "conversation.queue": "the queue it waits in or was routed to",
    "conversation.priority": "0 normal, 10 high, 20 urgent, -10 low",
    "conversation.language": "the conversation's language",
    "conversation.age": "seconds since it started",
    "conversation.idle": "seconds since the customer last wrote",
    "conversation.agents": "connected agents",
    "conversation.bots": "bots taking part",
    "conversation.has_primary": "someone (a direct bot or an agent) serves the customer",
    "conversation.labels": "the labels set with `label:`",
    "conversation.attributes": "all attributes (test `conversation.attributes.NAME` instead)",
    "customer.id": "the customer's id",
    "customer.present": "the customer's page or app is connected",
    "customer.known": "linked to a profile by the Customer API (created or identified there)",
    "customer.language": "the customer's language",
    "customer.profile": "the whole profile (test `customer.profile.NAME` instead)",
    "bot.name": "on bot events: the bot",
    "bot.intent": "on bot events: the last intent",
    "bot.confidence": "on bot events: the last confidence, 0 to 1",
    "bot.slots": "on bot events: all slots (test `bot.slots.NAME` instead)",
    "queue.name": "the conversation's queue (missing until it is routed)",
    "queue.position": "its place in the queue, 1 first (missing unless it waits there now)",
    "queue.estimated_wait": (
        "estimated wait in seconds: position times the queue's average handle time over its "
        "last 20 handled conversations (times the offer timeout before any)"
    ),
    "queue.agents_available": (
        "agents who could be offered the conversation now: available, room on its channel and"
        " in total, its skills at their levels, in one of the queue's teams (if it names any)"
    ),
    "queue.waiting": "conversations waiting in the queue now (offered ones included)",
    "queue.open": "the queue is open now (always `true`: business hours are not built yet)",
    "now.local_time": 'the time in the `timezone` setting, e.g. `"14:05"`',
    "now.weekday": "`mon` … `sun`, in the `timezone` setting",
    "now.hour": "the hour, 0 to 23, in the `timezone` setting",
    "now.date": 'the date, e.g. `"2026-11-25"`, in the `timezone` setting',
    "now.holiday": "today is a holiday in the calendar",
}

OPEN_PREFIX_DESCRIPTIONS: Mapping[str, str] = {
    "conversation.attributes.": "a conversation attribute, set with `set:`",
    "customer.profile.": "a Customer API profile field (`name`, `email`, `phone`, custom fields)",
    "bot.slots.": "on bot events: a slot the bot filled",
    "event.custom.": "`bot.message`: a key of the bot's custom payload (never shown to anyone)",
}

# One line per event type, for the generated reference and the JSON Schema help.
EVENT_DESCRIPTIONS: Mapping[str, str] = {
    "conversation.created": "a new conversation started (the customer wrote first)",
    "conversation.unattended": "a bot or agent conversation lost everyone serving it",
    "conversation.closed": "the conversation was closed (`reason`, `state`)",
    "customer.message": "the customer wrote (`text`)",
    "customer.disconnected": "the customer's page or app lost its connection",
    "customer.returned": "the customer is connected again",
    "customer.left": "the customer left for good (no connector emits it yet)",
    "customer.identified": "the Customer API identified the customer (`customer_id`)",
    "customer.updated": "the Customer API changed the customer's profile (`customer_id`)",
    "customer.merged": "a customer (`merged_from`) was merged into this one (`customer_id`)",
    "bot.message": "the bot answered (`text`)",
    "bot.handoff": "the bot asks for a person",
    "bot.failed": "the bot is down or too slow",
    "bot.ended": "the bot finished the conversation",
    "agent.offered": "the router offered the conversation to an agent (`agent_id`, `offer_id`)",
    "agent.offer_expired": "the offered agent did not answer in time",
    "agent.accepted": "an agent accepted the offer (`agent_id`)",
    "agent.declined": "an agent declined the offer (`agent_id`)",
    "agent.message": "an agent wrote (`text`)",
    "agent.disconnected": (
        "the agent's last desk socket closed (`agent_id`), once per open conversation of the agent"
    ),
    "agent.reconnected": "the agent's desk is connected again after `agent.disconnected`",
    "agent.left": "an agent left the conversation (`agent_id`, `reason`)",
    "agent.presence_changed": "an agent's presence changed (no connector emits it yet)",
    "agent.transferred": "an agent handed the conversation to a queue or another agent",
    "agent.closed": "the agent ended the conversation (`reason`); it goes on to wrap-up",
    "agent.invited": "an agent asked another agent (`to_agent`) to join: a conference",
    "agent.outbound": "an agent wrote first (an outbound conversation; `text`, `agent_id`)",
    "agent.wrap_up_done": "the agent finished wrap-up (`disposition`)",
    "app.joined": "an app joined the conversation (`app`; `by`: `rules` or `app`)",
    "app.event": "an app did something in the conversation (`app`, `action`)",
    "app.left": "an app left the conversation (`app`)",
    "delivery.status": "a channel reports a message sent, delivered, read or failed (`status`)",
    "delivery.failed": (
        "a message could not be delivered (`reason`: window_closed, invalid_recipient, "
        "rate_limited, provider_error)"
    ),
    "campaign.message": (
        "an outbound campaign sent the customer its template (`campaign_id`, `text`); the "
        "conversation's attribute `campaign` holds the campaign's id from then on"
    ),
    "timer.fired": "a timer ran out (`name`, `generation`)",
}
