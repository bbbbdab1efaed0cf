"""Apps in conversations: join, post messages, set attributes, report events, leave.

An app takes part as itself (its registered name is its participant id), invited by the
rules (``invite_app``) or joining on its own with ``conversations:join``. What it does
enters the inbox as events (``app.joined``, ``app.event``, ``app.left``), so the rules see
it and every effect is decided and recorded like anyone else's. Writes take an
``Idempotency-Key`` header: a retried call changes nothing twice.
"""

from __future__ import annotations

from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from controller.api.apps import route_scope
from controller.api.common import accepted_response, read_json, request_hash, submit_once
from controller.apps import require_scope
from controller.errors import Conflict, Forbidden, NotFound, RequestError
from controller.ids import new_id
from controller.keys import APPS, STORE
from controller.models import Conversation, NewEvent

BASE = "/api/v1/apps/me/conversations/{conversation_id}"


class _Button(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1, max_length=256)
    payload: str = Field(min_length=1, max_length=1024)


class _MessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=4096)
    to: Literal["customer", "agents"] = "customer"
    buttons: list[_Button] = Field(default_factory=list, max_length=10)


class _AttributesBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    attributes: dict[str, Any] = Field(min_length=1, max_length=100)


class _EventBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100, pattern=r"^[a-z][a-z0-9_.-]*$")
    data: dict[str, Any] = Field(default_factory=dict)


async def _caller(request: web.Request) -> tuple[str, str, Conversation]:
    """(app id, app name, conversation) of an app calling about a conversation."""
    principal = await require_scope(request, route_scope(request))
    if principal.role != "app":
        raise Forbidden("these routes are for app tokens", code="not_an_app")
    app = request.app[APPS].get(principal.subject)
    assert app is not None  # require_scope refused deleted and disabled apps
    conversation_id = request.match_info["conversation_id"]
    conv = await request.app[STORE].load_conversation(conversation_id)
    if conv is None:
        raise NotFound("unknown conversation", code="unknown_conversation")
    if conv.state == "closed":
        raise Conflict(f"conversation {conv.id!r} is closed", code="conversation_closed")
    return principal.subject, app.name, conv


def _in(conv: Conversation, name: str) -> None:
    if conv.find("app", name) is None:
        raise Conflict(
            f"app {name!r} is not in this conversation (invited by the rules, or join it)",
            code="not_a_participant",
        )


async def _submit(
    request: web.Request, app_id: str, conv: Conversation, kind: str, data: dict[str, Any]
) -> web.Response:
    key = request.headers.get("Idempotency-Key")
    if key is not None and not 1 <= len(key) <= 200:
        raise RequestError("Idempotency-Key must be 1 to 200 characters", code="bad_key")
    route = request.match_info.route.resource
    scope = route.canonical if route is not None else request.path
    data = {**data, "request_hash": request_hash(_Hashable(kind=kind, data=data))}
    event = NewEvent(
        type=kind,  # type: ignore[arg-type]
        source=f"app:{app_id}",
        dedupe_key=f"{scope}:{conv.id}:{key}" if key else new_id("nokey"),
        conversation_id=conv.id,
        data=data,
    )
    return accepted_response(await submit_once(request.app, event))


class _Hashable(BaseModel):
    kind: str
    data: dict[str, Any]


async def join(request: web.Request) -> web.Response:
    app_id, name, conv = await _caller(request)
    if conv.find("app", name) is not None:
        raise Conflict(f"app {name!r} is already in this conversation", code="already_in")
    return await _submit(request, app_id, conv, "app.joined", {"app": name, "by": "app"})


async def leave(request: web.Request) -> web.Response:
    app_id, name, conv = await _caller(request)
    _in(conv, name)
    return await _submit(request, app_id, conv, "app.left", {"app": name})


async def post_message(request: web.Request) -> web.Response:
    app_id, name, conv = await _caller(request)
    body = await read_json(request, _MessageBody)
    _in(conv, name)
    data: dict[str, Any] = {"app": name, "action": "message", "text": body.text, "to": body.to}
    if body.buttons:
        data["buttons"] = [b.model_dump() for b in body.buttons]
    return await _submit(request, app_id, conv, "app.event", data)


async def set_attributes(request: web.Request) -> web.Response:
    app_id, name, conv = await _caller(request)
    body = await read_json(request, _AttributesBody)
    _in(conv, name)
    if any("." in key for key in body.attributes):
        raise RequestError("attribute names may not contain '.'", code="invalid_body", status=422)
    data = {"app": name, "action": "set", "attributes": body.attributes}
    return await _submit(request, app_id, conv, "app.event", data)


async def report_event(request: web.Request) -> web.Response:
    app_id, name, conv = await _caller(request)
    body = await read_json(request, _EventBody)
    _in(conv, name)
    data = {"app": name, "action": "custom", "name": body.name, "details": body.data}
    return await _submit(request, app_id, conv, "app.event", data)


def routes() -> list[web.RouteDef]:
    return [
        web.post(BASE + "/join", join),
        web.post(BASE + "/leave", leave),
        web.post(BASE + "/messages", post_message),
        web.put(BASE + "/attributes", set_attributes),
        web.post(BASE + "/events", report_event),
    ]
