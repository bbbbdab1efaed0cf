"""Administration: agents and API tokens (the rules routes are in ``controller.api.rules``)."""

from __future__ import annotations

import secrets
from typing import Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from controller.api.common import authenticate, hash_token, read_json
from controller.errors import NotFound
from controller.keys import CLOCK, ROUTER, STORE
from controller.settings import AgentSeed
from controller.store.base import AgentRecord


class AgentBody(AgentSeed):
    """``POST /api/v1/agents``: the same fields as an agent in the settings."""


class TokenBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["admin", "agent", "app", "crm"]
    subject: str = Field(min_length=1, max_length=64)


async def ensure_agent(app: web.Application, body: AgentBody) -> None:
    """Create or update an agent (offline at first) and tell the router."""
    store, router, now = app[STORE], app[ROUTER], app[CLOCK].now()
    existing = await store.agent(body.id)
    record = AgentRecord(
        id=body.id,
        name=body.name,
        presence=existing.presence if existing else "offline",
        capacity=body.total_capacity(),
        skills=body.skill_levels(),
        idle_since=existing.idle_since if existing else now,
        channels=dict(body.channels),
        teams=tuple(body.teams),
    )
    await store.upsert_agent(record)
    router.add_agent(
        record.id,
        record.name,
        record.capacity,
        record.skills,
        record.presence,
        record.idle_since,
        channels=record.channels,
        teams=record.teams,
    )


async def put_agent(request: web.Request) -> web.Response:
    await authenticate(request, "admin")
    body = await read_json(request, AgentBody)
    await ensure_agent(request.app, body)
    return web.json_response(request.app[ROUTER].agent_view(body.id))


async def create_token(request: web.Request) -> web.Response:
    await authenticate(request, "admin")
    body = await read_json(request, TokenBody)
    if body.role == "agent" and not request.app[ROUTER].agent_known(body.subject):
        raise NotFound(f"unknown agent {body.subject!r}", code="unknown_agent")
    token = secrets.token_urlsafe(32)
    await request.app[STORE].put_token(
        hash_token(token), body.role, body.subject, request.app[CLOCK].now()
    )
    return web.json_response(
        {"token": token, "role": body.role, "subject": body.subject}, status=201
    )


def routes() -> list[web.RouteDef]:
    return [
        web.post("/api/v1/agents", put_agent),
        web.post("/api/v1/tokens", create_token),
    ]
