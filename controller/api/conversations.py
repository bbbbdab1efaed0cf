"""Reading conversations: snapshot, transcript, events and decisions."""

from __future__ import annotations

from aiohttp import web

from controller.api.apps import route_scope
from controller.api.common import Principal, authenticate
from controller.apps import require_scope
from controller.errors import Conflict, Forbidden, NotFound
from controller.keys import ROUTER, RULES, STORE
from controller.models import Conversation


async def _visible(request: web.Request) -> tuple[Principal, Conversation]:
    """An admin sees every conversation, an app with the route's scope (``APP_API``) too, an
    agent those it is in or is offered."""
    principal = await require_scope(request, route_scope(request), also=("agent",))
    conv = await request.app[STORE].load_conversation(request.match_info["conversation_id"])
    if conv is None:
        raise NotFound("unknown conversation", code="unknown_conversation")
    if principal.role == "agent" and conv.find("agent", principal.subject) is None:
        offered = request.app[ROUTER].agent_view(principal.subject)["offers"]
        if not any(o["conversation_id"] == conv.id for o in offered):
            raise Forbidden("you are not in this conversation", code="not_a_participant")
    return principal, conv


async def get_conversation(request: web.Request) -> web.Response:
    _, conv = await _visible(request)
    body = conv.model_dump(mode="json")
    body["queue_position"] = request.app[ROUTER].position(conv.id)
    return web.json_response(body)


async def get_messages(request: web.Request) -> web.Response:
    _, conv = await _visible(request)
    messages = await request.app[STORE].messages(conv.id, include_agent_only=True)
    return web.json_response(
        {
            "conversation_id": conv.id,
            "messages": [
                {
                    "id": m.id,
                    "from": m.sender_role,
                    "sender_id": m.sender_id,
                    "text": m.text,
                    "visibility": m.visibility,
                    "at": m.created_at.isoformat(),
                }
                for m in messages
            ],
        }
    )


async def get_events(request: web.Request) -> web.Response:
    await authenticate(request, "admin")
    store = request.app[STORE]
    conversation_id = request.match_info["conversation_id"]
    if await store.load_conversation(conversation_id) is None:
        raise NotFound("unknown conversation", code="unknown_conversation")
    events = await store.events(conversation_id)
    decisions = {d["event_id"]: d for d in await store.decisions(conversation_id)}
    return web.json_response(
        {
            "conversation_id": conversation_id,
            "events": [
                {
                    **ev.model_dump(mode="json"),
                    "status": status,
                    "decision": decisions.get(ev.id),
                }
                for ev, status in events
            ],
        }
    )


async def explain_event(request: web.Request) -> web.Response:
    """A stored event explained with its recorded facts against the current rules, next to
    the recorded decision, so a difference between the two is visible."""
    from controller.rulebook.explain import explain

    await authenticate(request, "admin")
    store = request.app[STORE]
    conversation_id = request.match_info["conversation_id"]
    event_id = request.match_info["event_id"]
    if await store.load_conversation(conversation_id) is None:
        raise NotFound("unknown conversation", code="unknown_conversation")
    event = await store.event(event_id)
    if event is None or event.conversation_id != conversation_id:
        raise NotFound("unknown event", code="unknown_event")
    decision = next(
        (d for d in await store.decisions(conversation_id) if d["event_id"] == event_id), None
    )
    if decision is None:
        raise Conflict("the event is not decided yet", code="not_decided")
    facts = decision.get("facts")
    if facts is None:
        why = (
            "no rule was consulted for this event (stale timer)"
            if decision["outcome"] == "stale"
            else "the decision was recorded before facts were stored"
        )
        raise Conflict(f"no facts to explain: {why}", code="no_facts")
    include_all = request.query.get("all", "").lower() in ("1", "true", "yes")
    with request.app[RULES].lease() as book:
        explanation = explain(book, facts, include_all=include_all)
    recorded_rules = [str(f["rule"]) for f in decision["fired"]]
    return web.json_response(
        {
            "conversation_id": conversation_id,
            "event": event.model_dump(mode="json"),
            "recorded": {
                "rules_version": decision["rules_version"],
                "matcher": decision["matcher"],
                "outcome": decision["outcome"],
                "decided_at": decision["decided_at"],
                "rules": recorded_rules,
                "fired": decision["fired"],
                "refused": decision["refused"],
            },
            "current": explanation.model_dump(mode="json"),
            "same_rules": recorded_rules == explanation.fired,
            "facts": facts,
        }
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v1/conversations/{conversation_id}", get_conversation),
        web.get("/api/v1/conversations/{conversation_id}/messages", get_messages),
        web.get("/api/v1/conversations/{conversation_id}/events", get_events),
        web.get(
            "/api/v1/conversations/{conversation_id}/events/{event_id}/explain",
            explain_event,
        ),
    ]
