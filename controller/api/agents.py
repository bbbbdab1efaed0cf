"""The agent API: presence, offers, messages, leave and wrap-up, over HTTP and a WebSocket.

HTTP writes take an ``Idempotency-Key`` header (scoped by agent and route); WebSocket
commands carry a ``client_id`` made by the desk and resent unchanged on retry. Either becomes
the inbox dedupe key, so a retried command changes nothing twice. The same key with a
different body is refused (422).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from functools import cache
from importlib import resources
from typing import Annotated, Any, Literal

import structlog
from aiohttp import WSMsgType, web
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from controller.api.common import Principal, authenticate, read_json, request_hash, submit_once
from controller.errors import Conflict, ConvctlError, Forbidden, NotFound, RequestError
from controller.ids import new_id
from controller.keys import DESK, INBOX, METRICS, ROUTER, STORE
from controller.models import NewEvent
from controller.store.base import Accepted

log = structlog.get_logger(__name__)

_CLIENT_ID = Field(None, min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
_CONNECTION = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


class _Cmd(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client_id: str | None = _CLIENT_ID


class Presence(_Cmd):
    type: Literal["presence"] = "presence"
    presence: Literal["available", "busy", "away", "offline"]


class Accept(_Cmd):
    type: Literal["accept"] = "accept"
    offer_id: str = Field(min_length=1, max_length=100)


class Decline(_Cmd):
    type: Literal["decline"] = "decline"
    offer_id: str = Field(min_length=1, max_length=100)


class SendMessage(_Cmd):
    """A message to the customer, or (``to: agents``) a whisper the customer never sees."""

    type: Literal["message"] = "message"
    conversation_id: str = Field(min_length=1, max_length=100)
    text: str = Field(min_length=1, max_length=4096)
    to: Literal["customer", "agents"] = "customer"


class Leave(_Cmd):
    type: Literal["leave"] = "leave"
    conversation_id: str = Field(min_length=1, max_length=100)
    reason: str = Field("left", max_length=100)


class WrapUp(_Cmd):
    type: Literal["wrap_up"] = "wrap_up"
    conversation_id: str = Field(min_length=1, max_length=100)
    disposition: str = Field(min_length=1, max_length=100)


class Transfer(_Cmd):
    """Hand the conversation to a queue or straight to another agent; the sender leaves it."""

    type: Literal["transfer"] = "transfer"
    conversation_id: str = Field(min_length=1, max_length=100)
    queue: str | None = Field(None, min_length=1, max_length=100)
    agent: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")

    @model_validator(mode="after")
    def _one_target(self) -> Transfer:
        if (self.queue is None) == (self.agent is None):
            raise ValueError("give exactly one of queue or agent")
        return self


class Close(_Cmd):
    """The agent ends the conversation with the customer; the agent goes on to wrap-up."""

    type: Literal["close"] = "close"
    conversation_id: str = Field(min_length=1, max_length=100)
    reason: str = Field("agent_closed", min_length=1, max_length=100)


class Invite(_Cmd):
    """Conference: another agent joins the conversation beside the sender (who stays)."""

    type: Literal["invite"] = "invite"
    conversation_id: str = Field(min_length=1, max_length=100)
    agent: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


Command = Annotated[
    Presence | Accept | Decline | SendMessage | Leave | WrapUp | Transfer | Invite | Close,
    Field(discriminator="type"),
]
_COMMAND = TypeAdapter(Command)


async def run_command(
    app: web.Application, agent_id: str, cmd: Command, key: str | None
) -> dict[str, Any]:
    """Carry out one agent command; ``key`` is its dedupe key (None: no dedupe possible)."""
    router = app[ROUTER]
    if isinstance(cmd, Presence):
        await router.set_presence(agent_id, cmd.presence)
        return {"presence": cmd.presence}
    if isinstance(cmd, Accept):
        return _accepted(await router.accept(agent_id, cmd.offer_id))
    if isinstance(cmd, Decline):
        return _accepted(await router.decline(agent_id, cmd.offer_id))
    conv = await app[STORE].load_conversation(cmd.conversation_id)
    if conv is None:
        raise NotFound(f"unknown conversation {cmd.conversation_id!r}", code="unknown_conversation")
    if conv.find("agent", agent_id) is None:
        raise Forbidden("you are not in this conversation", code="not_a_participant")
    data: dict[str, Any] = {"agent_id": agent_id, "request_hash": request_hash(cmd)}
    if isinstance(cmd, SendMessage):
        kind, data["text"] = "agent.message", cmd.text
        if cmd.to == "agents":
            data["to"] = "agents"
    elif isinstance(cmd, Close):
        kind, data["reason"] = "agent.closed", cmd.reason
    elif isinstance(cmd, Invite):
        if not app[ROUTER].agent_known(cmd.agent):
            raise NotFound(f"unknown agent {cmd.agent!r}", code="unknown_agent")
        if conv.find("agent", cmd.agent) is not None:
            raise Conflict(f"agent {cmd.agent} is already in the conversation", code="already_in")
        kind, data["to_agent"] = "agent.invited", cmd.agent
    elif isinstance(cmd, Leave):
        kind, data["reason"] = "agent.left", cmd.reason
    elif isinstance(cmd, Transfer):
        if cmd.agent is not None and not app[ROUTER].agent_known(cmd.agent):
            raise NotFound(f"unknown agent {cmd.agent!r}", code="unknown_agent")
        kind = "agent.transferred"
        data.update({"to_queue": cmd.queue, "to_agent": cmd.agent})
    else:
        kind, data["disposition"] = "agent.wrap_up_done", cmd.disposition
    event = NewEvent(
        type=kind,  # type: ignore[arg-type]
        source=f"agent:{agent_id}",
        dedupe_key=key or new_id("nokey"),
        conversation_id=conv.id,
        data=data,
    )
    return _accepted(await submit_once(app, event))


def _accepted(a: Accepted) -> dict[str, Any]:
    return {
        "event_id": a.event_id,
        "conversation_id": a.conversation_id,
        "seq": a.seq,
        "duplicate": a.duplicate,
    }


def http_idempotency_key(request: web.Request, principal: Principal) -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not 1 <= len(key) <= 200:
        raise RequestError(
            "Idempotency-Key must be 1 to 200 characters", code="bad_idempotency_key"
        )
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else ""
    return f"{route}:{key}"


def _path_id(request: web.Request, name: str) -> str:
    """An id from the path. One longer than the commands take names nothing: a 404, where
    the command's validation would fail the request."""
    value = request.match_info[name]
    if len(value) > 100:  # the bound of the commands' id fields
        kind = name.removesuffix("_id")
        raise NotFound(f"unknown {kind} {value[:40]!r}...", code=f"unknown_{kind}")
    return value


async def agent_principal(request: web.Request) -> Principal:
    principal = await authenticate(request, "agent")
    if not request.app[ROUTER].agent_known(principal.subject):
        raise Forbidden("the token's agent does not exist", code="unknown_agent")
    return principal


async def me(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    return web.json_response(request.app[ROUTER].agent_view(principal.subject))


async def presence(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, Presence)
    return web.json_response(await run_command(request.app, principal.subject, body, None))


async def accept(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    cmd = Accept(offer_id=_path_id(request, "offer_id"))
    return web.json_response(await run_command(request.app, principal.subject, cmd, None))


async def decline(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    cmd = Decline(offer_id=_path_id(request, "offer_id"))
    return web.json_response(await run_command(request.app, principal.subject, cmd, None))


class _MessageBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1, max_length=4096)
    to: Literal["customer", "agents"] = "customer"


class _CloseBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("agent_closed", min_length=1, max_length=100)


async def close(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _CloseBody) if request.can_read_body else _CloseBody()
    cmd = Close(conversation_id=_path_id(request, "conversation_id"), reason=body.reason)
    key = http_idempotency_key(request, principal)
    result = await run_command(request.app, principal.subject, cmd, key)
    return web.json_response(result, status=200 if result["duplicate"] else 202)


class _InviteBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    agent: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")


async def invite(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _InviteBody)
    cmd = Invite(conversation_id=_path_id(request, "conversation_id"), agent=body.agent)
    key = http_idempotency_key(request, principal)
    result = await run_command(request.app, principal.subject, cmd, key)
    return web.json_response(result, status=200 if result["duplicate"] else 202)


class _LeaveBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field("left", max_length=100)


class _WrapUpBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    disposition: str = Field(min_length=1, max_length=100)


async def post_message(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _MessageBody)
    cmd = SendMessage(
        conversation_id=_path_id(request, "conversation_id"), text=body.text, to=body.to
    )
    result = await run_command(
        request.app, principal.subject, cmd, http_idempotency_key(request, principal)
    )
    return web.json_response(result, status=200 if result["duplicate"] else 202)


async def leave(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _LeaveBody) if request.can_read_body else _LeaveBody()
    cmd = Leave(conversation_id=_path_id(request, "conversation_id"), reason=body.reason)
    result = await run_command(
        request.app, principal.subject, cmd, http_idempotency_key(request, principal)
    )
    return web.json_response(result, status=200 if result["duplicate"] else 202)


async def wrap_up(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _WrapUpBody)
    cmd = WrapUp(conversation_id=_path_id(request, "conversation_id"), disposition=body.disposition)
    result = await run_command(
        request.app, principal.subject, cmd, http_idempotency_key(request, principal)
    )
    return web.json_response(result, status=200 if result["duplicate"] else 202)


class _TransferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    queue: str | None = Field(None, min_length=1, max_length=100)
    agent: str | None = Field(None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")


async def transfer(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _TransferBody)
    try:
        cmd = Transfer(
            conversation_id=_path_id(request, "conversation_id"),
            queue=body.queue,
            agent=body.agent,
        )
    except ValidationError as exc:
        raise RequestError(
            "give exactly one of queue or agent", code="invalid_body", status=422
        ) from exc
    result = await run_command(
        request.app, principal.subject, cmd, http_idempotency_key(request, principal)
    )
    return web.json_response(result, status=200 if result["duplicate"] else 202)


async def desk_socket(request: web.Request) -> web.WebSocketResponse:
    """The desk's WebSocket: pushes offers and messages, takes commands with client ids.

    ``?connection=`` is an id the desk makes per connection (else a random one); it makes
    the dedupe keys of the ``agent.disconnected`` / ``agent.reconnected`` events this socket
    causes, so a replayed close or open of the same connection changes nothing twice.
    """
    principal = await authenticate(request, "agent", token=request.query.get("token", ""))
    agent_id = principal.subject
    router = request.app[ROUTER]
    if not router.agent_known(agent_id):
        raise Forbidden("the token's agent does not exist", code="unknown_agent")
    connection = request.query.get("connection") or secrets.token_hex(8)
    if not _CONNECTION.match(connection):
        raise RequestError(
            "connection must be 1 to 100 letters, digits or _.:-", code="bad_connection"
        )
    hub = request.app[DESK]
    metrics = request.app[METRICS]
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=64 * 1024)
    await ws.prepare(request)
    hub.add(agent_id, ws)
    metrics.websockets.labels("desk").inc()
    try:
        await _desk_connected(request.app, agent_id, connection)
        await ws.send_json({"type": "hello", "agent": router.agent_view(agent_id)})
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            await _on_command(request.app, ws, agent_id, msg.data)
    finally:
        last = hub.remove(agent_id, ws)
        metrics.websockets.labels("desk").dec()
        if last:
            # Shielded: the handler may be cancelled while the socket goes away.
            await asyncio.shield(_desk_disconnected(request.app, agent_id, connection))
    return ws


async def _desk_connected(app: web.Application, agent_id: str, connection: str) -> None:
    """Submit ``agent.reconnected`` where the agent was disconnected: for every conversation
    if this process submitted its disconnects, else where the snapshot says not present
    (a disconnect stored before a restart)."""
    hub = app[DESK]
    async with hub.presence_lock(agent_id):
        gone = hub.take_gone(agent_id)
        targets: list[str] = []
        for cid in app[ROUTER].conversations_of(agent_id):
            conv = await app[STORE].load_conversation(cid)
            if conv is None or conv.state == "closed":
                continue
            me = conv.find("agent", agent_id)
            if gone or (me is not None and not me.present):
                targets.append(cid)
        await _submit_presence(app, agent_id, connection, "agent.reconnected", targets)


async def _desk_disconnected(app: web.Application, agent_id: str, connection: str) -> None:
    """The agent's last desk socket closed: ``agent.disconnected`` for each open conversation
    the agent is in; the rules decide when that becomes ``agent.left``."""
    hub = app[DESK]
    async with hub.presence_lock(agent_id):
        if hub.connected(agent_id):
            return  # another socket opened meanwhile
        targets = app[ROUTER].conversations_of(agent_id)
        if targets:
            hub.mark_gone(agent_id)
        await _submit_presence(app, agent_id, connection, "agent.disconnected", targets)


async def _submit_presence(
    app: web.Application, agent_id: str, connection: str, kind: str, conversation_ids: list[str]
) -> None:
    if not conversation_ids:
        return
    events = [
        NewEvent(
            type=kind,  # type: ignore[arg-type]
            source=f"agent:{agent_id}",
            dedupe_key=f"desk:{connection}:{cid}:{kind}",
            conversation_id=cid,
            data={"agent_id": agent_id, "connection": connection},
        )
        for cid in conversation_ids
    ]
    try:
        await app[INBOX].submit(events)
    except Exception as exc:  # e.g. the store closing at shutdown: nothing to decide then
        log.warning("desk_presence_not_stored", kind=kind, agent_id=agent_id, error=repr(exc))


async def _on_command(
    app: web.Application, ws: web.WebSocketResponse, agent_id: str, data: str
) -> None:
    client_id = None
    try:
        raw = json.loads(data)
        if isinstance(raw, dict) and isinstance(raw.get("client_id"), str):
            client_id = raw["client_id"]
        cmd = _COMMAND.validate_python(raw)
        key = f"ws:{cmd.client_id}" if cmd.client_id else None
        result = await run_command(app, agent_id, cmd, key)
        await ws.send_json({"type": "ack", "client_id": client_id, **result})
    except (json.JSONDecodeError, ValidationError) as exc:
        log.info("desk_bad_frame", error=str(exc)[:200])
        await ws.send_json(
            {
                "type": "error",
                "client_id": client_id,
                "code": "bad_frame",
                "message": str(exc)[:500],
            }
        )
    except ConvctlError as exc:
        log.info("desk_command_refused", code=exc.code, reason=exc.message)
        await ws.send_json(
            {"type": "error", "client_id": client_id, "code": exc.code, "message": exc.message}
        )


@cache
def _desk_html() -> str:
    return resources.files("controller").joinpath("web/desk.html").read_text("utf-8")


async def desk_page(request: web.Request) -> web.Response:
    """The agent desk page (it signs in with an agent token itself)."""
    return web.Response(
        text=_desk_html(),
        content_type="text/html",
        headers={"Cache-Control": "no-cache", "X-Frame-Options": "DENY"},
    )


def routes() -> list[web.RouteDef]:
    return [
        web.get("/desk", desk_page),
        web.get("/api/v1/agents/me", me),
        web.put("/api/v1/agents/me/presence", presence),
        web.get("/api/v1/agents/ws", desk_socket),
        web.post("/api/v1/offers/{offer_id}/accept", accept),
        web.post("/api/v1/offers/{offer_id}/decline", decline),
        web.post("/api/v1/conversations/{conversation_id}/messages", post_message),
        web.post("/api/v1/conversations/{conversation_id}/leave", leave),
        web.post("/api/v1/conversations/{conversation_id}/wrap-up", wrap_up),
        web.post("/api/v1/conversations/{conversation_id}/transfer", transfer),
        web.post("/api/v1/conversations/{conversation_id}/invite", invite),
        web.post("/api/v1/conversations/{conversation_id}/close", close),
    ]
