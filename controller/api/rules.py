"""The rules API (admin): the version in force, reload, stored versions, rollback."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from controller.api.common import authenticate, read_json
from controller.keys import RULES, STORE


class RollbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=64)


async def show_rules(request: web.Request) -> web.Response:
    """The current version, its files, and the last error if the newest files failed."""
    await authenticate(request, "admin")
    return web.json_response(request.app[RULES].status())


async def reload_rules(request: web.Request) -> web.Response:
    """Compile the rules folder now; a bad folder is a 422 listing every problem."""
    await authenticate(request, "admin")
    book = await request.app[RULES].reload("api")
    return web.json_response({"version": book.version, "rules": len(book.rules)})


async def list_versions(request: web.Request) -> web.Response:
    """Every version that was in force, newest first."""
    await authenticate(request, "admin")
    current = request.app[RULES].current().version
    versions = await request.app[STORE].rules_versions()
    return web.json_response(
        {
            "versions": [
                {
                    "version": v.version,
                    "loaded_at": v.loaded_at.isoformat(),
                    "source": v.source,
                    "current": v.version == current,
                }
                for v in versions
            ]
        }
    )


async def rollback(request: web.Request) -> web.Response:
    """Make a stored version current again, from its stored files (404 if unknown)."""
    await authenticate(request, "admin")
    body = await read_json(request, RollbackBody)
    book = await request.app[RULES].rollback(body.version)
    return web.json_response({"version": book.version, "rules": len(book.rules)})


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/v1/rules", show_rules),
        web.post("/api/v1/rules/reload", reload_rules),
        web.get("/api/v1/rules/versions", list_versions),
        web.post("/api/v1/rules/rollback", rollback),
    ]
