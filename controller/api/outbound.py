"""Outbound conversations: an agent writes first.

``POST /api/v1/conversations`` opens (or continues) a conversation with a customer on a
channel, with the agent as its primary participant, and sends the first message. The
customer's replies come back into the same conversation, as for any conversation of that
identity. On WhatsApp, a customer who has not written in the last 24 hours can only be
reached with a template: give ``template``; otherwise the send fails and the rules hear
``delivery.failed`` (reason ``window_closed``).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, model_validator

from controller.api.agents import agent_principal, http_idempotency_key
from controller.api.common import accepted_response, read_json, request_hash, submit_once
from controller.errors import Conflict, NotFound, RequestError
from controller.ids import new_id
from controller.keys import CHANNELS, STORE
from controller.models import NewEvent
from controller.models.actions import MessageTemplate
from controller.store.base import channel_identity


class _OutboundBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channel: str = Field(min_length=1, max_length=64)  # a channel instance's name
    to: str | None = Field(None, min_length=1, max_length=200)  # the channel's user id
    customer_id: str | None = Field(None, min_length=1, max_length=64)
    endpoint: str | None = Field(None, min_length=1, max_length=200)
    text: str = Field(min_length=1, max_length=4096)
    template: MessageTemplate | None = None

    @model_validator(mode="after")
    def _one_address(self) -> _OutboundBody:
        if (self.to is None) == (self.customer_id is None):
            raise ValueError("give either 'to' (the channel's user id) or 'customer_id'")
        return self


async def _address(app: web.Application, body: _OutboundBody, kind: str) -> tuple[str, str]:
    """(identity, endpoint) of the customer on the channel instance."""
    store = app[STORE]
    identity = body.to
    if identity is None:
        assert body.customer_id is not None
        customer = await store.customer(body.customer_id)
        if customer is None:
            raise NotFound(f"unknown customer {body.customer_id!r}", code="unknown_customer")
        wanted = [kind, "phone"] if kind == "whatsapp" else [kind]
        found = next((i for w in wanted for i in customer.identities if i.kind == w), None)
        if found is None:
            raise RequestError(
                f"customer {body.customer_id} has no {kind} identity",
                code="no_channel_identity",
                status=422,
            )
        # WhatsApp addresses a wa_id: the E.164 number without its "+".
        identity = found.value.removeprefix("+") if kind == "whatsapp" else found.value
    endpoint = body.endpoint
    if endpoint is None:
        previous = [
            c
            for c in await store.customer_conversations(
                body.customer_id or await _customer_of(app, kind, identity)
            )
            if c["instance"] == body.channel and c["identity"] == identity
        ]
        if not previous:
            raise RequestError(
                "give 'endpoint' (the business number or page): this customer has never "
                f"written to {body.channel}",
                code="endpoint_required",
                status=422,
            )
        endpoint = str(max(previous, key=lambda c: str(c["created_at"]))["endpoint"])
    return identity, endpoint


async def _customer_of(app: web.Application, kind: str, identity: str) -> str:
    found = await app[STORE].lookup_customer(channel_identity(kind, identity))
    return found.id if found is not None else ""


async def _starting(app: web.Application, conversation_id: str, agent_id: str) -> bool:
    """The agent's own outbound message opened the conversation and is not decided yet (the
    agent is not a participant until then): a second message continues it, not a 409."""
    return any(
        event.type == "agent.outbound" and event.data.get("agent_id") == agent_id
        for event, status in await app[STORE].events(conversation_id)
        if status == "pending"
    )


async def start_conversation(request: web.Request) -> web.Response:
    principal = await agent_principal(request)
    body = await read_json(request, _OutboundBody)
    app = request.app
    channel = app[CHANNELS].get(body.channel)
    if channel is None:
        raise NotFound(f"unknown channel {body.channel!r}", code="unknown_channel")
    kind = str(getattr(channel, "channel", body.channel))
    identity, endpoint = await _address(app, body, kind)
    store = app[STORE]
    open_id = await store.latest_conversation_id(body.channel, endpoint, identity)
    conv = await store.load_conversation(open_id) if open_id else None
    if (
        conv is not None
        and conv.state != "closed"
        and conv.find("agent", principal.subject) is None
        and not await _starting(app, conv.id, principal.subject)
    ):
        raise Conflict(
            f"the customer is in open conversation {conv.id} ({conv.state})",
            code="conversation_open",
        )
    data: dict[str, Any] = {
        "agent_id": principal.subject,
        "text": body.text,
        "request_hash": request_hash(body),
    }
    if body.template is not None:
        data["template"] = body.template.model_dump(mode="json")
    key = http_idempotency_key(request, principal)
    event = NewEvent(
        type="agent.outbound",
        source=f"agent:{principal.subject}",
        dedupe_key=key or new_id("nokey"),
        channel=kind,
        instance=body.channel,
        endpoint=endpoint,
        identity=identity,
        data=data,
    )
    return accepted_response(await submit_once(app, event))


def routes() -> list[web.RouteDef]:
    return [web.post("/api/v1/conversations", start_conversation)]
