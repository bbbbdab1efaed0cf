"""Reading conversations: snapshot, transcript, events and decisions."""

from __future__ import annotations

from aiohttp import web

from controller.api.common import Principal, authenticate
from controller.errors import Forbidden, NotFound
from controller.keys import ROUTER, STORE
from controller.models import Conversation


async def _visible(request: web.Request) -> tuple[Principal, Conversation]:
    principal = await authenticate(request, "admin", "agent")
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


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v1/conversations/{conversation_id}", get_conversation),
        web.get("/api/v1/conversations/{conversation_id}/messages", get_messages),
        web.get("/api/v1/conversations/{conversation_id}/events", get_events),
    ]
