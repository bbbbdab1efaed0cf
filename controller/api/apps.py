"""The app registry (admin) and the App API (apps themselves), under ``/api/v1/apps``.

An admin registers apps, changes their scopes and webhook, rotates their token and webhook
secret, and deletes (revokes) them. An app calls the ``/api/v1/apps/me/...`` routes with its
own token to manage its event subscriptions and inspect or replay its webhook deliveries;
an admin reaches the same resources of any app under ``/api/v1/apps/{app_id}/...``.

Every App API route and the scope it needs is listed once, in ``APP_API``: handlers look
their scope up there, and the scope tests walk the same table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import structlog
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool
from yarl import URL

from controller.api.common import authenticate, read_json
from controller.apps import (
    EVENTS_SCOPE,
    check_event_types,
    check_scopes,
    destination,
    require_scope,
)
from controller.errors import Conflict, Forbidden, NotFound, RequestError
from controller.keys import APPS, CLOCK, DISPATCHER, STORE
from controller.store.base import AppRecord, OutboxEntry

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ScopedRoute:
    """An App API route and the scope an app token needs for it (None: any app)."""

    method: str
    path: str
    scope: str | None


_IN = "/api/v1/apps/me/conversations/{conversation_id}"  # apps in conversations
_RUN = "campaigns:run"
_READ, _WRITE = "customers:read", "customers:write"
APP_API: tuple[ScopedRoute, ...] = (
    ScopedRoute("GET", "/api/v1/apps/me", None),
    ScopedRoute("GET", "/api/v1/apps/me/subscriptions", EVENTS_SCOPE),
    ScopedRoute("POST", "/api/v1/apps/me/subscriptions", EVENTS_SCOPE),
    ScopedRoute("DELETE", "/api/v1/apps/me/subscriptions/{subscription_id}", EVENTS_SCOPE),
    ScopedRoute("GET", "/api/v1/apps/me/deliveries", EVENTS_SCOPE),
    ScopedRoute("GET", "/api/v1/apps/me/deliveries/{delivery_id}", EVENTS_SCOPE),
    ScopedRoute("POST", "/api/v1/apps/me/deliveries/{delivery_id}/replay", EVENTS_SCOPE),
    ScopedRoute("POST", _IN + "/join", "conversations:join"),
    ScopedRoute("POST", _IN + "/leave", "conversations:join"),
    ScopedRoute("POST", _IN + "/messages", "conversations:write"),
    ScopedRoute("PUT", _IN + "/attributes", "conversations:write"),
    ScopedRoute("POST", _IN + "/events", "conversations:write"),
    ScopedRoute("GET", "/api/v1/conversations/{conversation_id}", "conversations:read"),
    ScopedRoute("GET", "/api/v1/conversations/{conversation_id}/messages", "conversations:read"),
    # outbound campaigns (controller/api/campaigns.py); an app reaches only its own campaigns
    ScopedRoute("POST", "/api/v1/campaigns", _RUN),
    ScopedRoute("GET", "/api/v1/campaigns", _RUN),
    ScopedRoute("GET", "/api/v1/campaigns/{campaign_id}", _RUN),
    ScopedRoute("GET", "/api/v1/campaigns/{campaign_id}/recipients", _RUN),
    ScopedRoute("POST", "/api/v1/campaigns/{campaign_id}/pause", _RUN),
    ScopedRoute("POST", "/api/v1/campaigns/{campaign_id}/resume", _RUN),
    ScopedRoute("POST", "/api/v1/campaigns/{campaign_id}/cancel", _RUN),
    ScopedRoute("GET", "/api/v1/campaigns/opt-outs", _RUN),
    ScopedRoute("POST", "/api/v1/campaigns/opt-outs", _RUN),
    ScopedRoute("DELETE", "/api/v1/campaigns/opt-outs/{customer_id}", _RUN),
    # the Customer API (controller/api/customers.py): an app acts as a crm token would
    ScopedRoute("POST", "/api/v1/customers", _WRITE),
    ScopedRoute("GET", "/api/v1/customers", _READ),
    ScopedRoute("GET", "/api/v1/customers/lookup", _READ),
    ScopedRoute("GET", "/api/v1/customers/export", _READ),
    ScopedRoute("GET", "/api/v1/customers/schema", _READ),
    ScopedRoute("POST", "/api/v1/customers/bulk", _WRITE),
    ScopedRoute("GET", "/api/v1/customers/{customer_id}", _READ),
    ScopedRoute("PATCH", "/api/v1/customers/{customer_id}", _WRITE),
    ScopedRoute("DELETE", "/api/v1/customers/{customer_id}", _WRITE),
    ScopedRoute("POST", "/api/v1/customers/{customer_id}/identities", _WRITE),
    ScopedRoute("POST", "/api/v1/customers/{customer_id}/merge", _WRITE),
)
_SCOPE_OF = {(r.method, r.path): r.scope for r in APP_API}


def route_scope(request: web.Request) -> str | None:
    """The scope ``APP_API`` gives the matched route (a route missing there is a bug)."""
    resource = request.match_info.route.resource
    path = resource.canonical if resource is not None else request.path
    method = "GET" if request.method == "HEAD" else request.method
    return _SCOPE_OF[(method, path)]


def _webhook_url(value: str | None) -> str | None:
    if value is None:
        return None
    url = URL(value)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("must be an absolute http or https URL")
    return value


WebhookUrl = Annotated[str, Field(min_length=1, max_length=2000), AfterValidator(_webhook_url)]


class CreateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=100)
    scopes: list[str] = Field(default_factory=list, max_length=50)
    webhook_url: WebhookUrl | None = None
    description: str | None = Field(None, max_length=1000)


class PatchBody(BaseModel):
    """Given fields replace (``webhook_url: null`` removes the webhook)."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(None, min_length=1, max_length=100)
    scopes: list[str] | None = Field(None, max_length=50)
    webhook_url: WebhookUrl | None = None
    description: str | None = Field(None, max_length=1000)
    enabled: StrictBool | None = None


class SubscribeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    event_types: list[str] = Field(min_length=1, max_length=100)


async def _app_id(request: web.Request) -> str:
    """Whose resources a route is about: ``{app_id}`` for an admin, the caller for ``me``."""
    app_id = request.match_info.get("app_id")
    if app_id is not None:
        await authenticate(request, "admin")
        return app_id
    principal = await require_scope(request, route_scope(request))
    if principal.role != "app":
        raise Forbidden(
            "the 'me' routes are for app tokens; an admin uses /api/v1/apps/{app_id}/...",
            code="not_an_app",
        )
    return principal.subject


def _app_body(app: AppRecord, **extra: Any) -> dict[str, Any]:
    return {**app.as_dict(), **extra}


# registry (admin) -----------------------------------------------------------------------------
async def create_app(request: web.Request) -> web.Response:
    await authenticate(request, "admin")
    body = await read_json(request, CreateBody)
    app, token, secret = await request.app[APPS].create(
        name=body.name.strip(),
        scopes=check_scopes(body.scopes),
        webhook_url=body.webhook_url,
        description=body.description,
    )
    response = web.json_response(
        _app_body(app, token=token, webhook_secret=secret, subscriptions=[]), status=201
    )
    response.headers["Location"] = f"/api/v1/apps/{app.id}"
    return response


async def list_apps(request: web.Request) -> web.Response:
    await authenticate(request, "admin")
    include = request.query.get("include_deleted", "false")
    if include not in ("true", "false"):
        raise RequestError(
            "include_deleted must be true or false", code="invalid_query", status=422
        )
    apps = await request.app[STORE].app_records(include_deleted=include == "true")
    return web.json_response({"apps": [a.as_dict() for a in apps]})


async def _describe(request: web.Request, app_id: str) -> web.Response:
    registry = request.app[APPS]
    app = await registry.record(app_id)
    subscriptions = await registry.subscriptions(app_id)
    return web.json_response(_app_body(app, subscriptions=[s.as_dict() for s in subscriptions]))


async def get_app(request: web.Request) -> web.Response:
    return await _describe(request, await _app_id(request))


async def patch_app(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    body = await read_json(request, PatchBody)
    changes: dict[str, Any] = {}
    for name in body.model_fields_set:
        value = getattr(body, name)
        if value is None and name not in ("webhook_url", "description"):
            raise RequestError(f"{name} cannot be null", code="invalid_body", status=422)
        changes[name] = value
    if "scopes" in changes:
        changes["scopes"] = check_scopes(changes["scopes"])
    if "name" in changes:
        changes["name"] = changes["name"].strip()
    registry = request.app[APPS]
    await registry.live(app_id)
    if changes:
        await registry.update(app_id, changes)
    return await _describe(request, app_id)


async def rotate_token(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    token = await request.app[APPS].rotate_token(app_id)
    return web.json_response({"app_id": app_id, "token": token})


async def rotate_secret(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    registry = request.app[APPS]
    await registry.live(app_id)
    secret = await registry.rotate_secret(app_id)
    return web.json_response({"app_id": app_id, "webhook_secret": secret})


async def delete_app(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    cancelled = await request.app[APPS].delete(app_id)
    return web.json_response({"id": app_id, "status": "deleted", "cancelled_deliveries": cancelled})


# subscriptions ------------------------------------------------------------------------------
async def list_subscriptions(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    registry = request.app[APPS]
    await registry.record(app_id)
    subscriptions = await registry.subscriptions(app_id)
    return web.json_response({"subscriptions": [s.as_dict() for s in subscriptions]})


async def subscribe(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    body = await read_json(request, SubscribeBody)
    subscription = await request.app[APPS].subscribe(app_id, check_event_types(body.event_types))
    response = web.json_response(subscription.as_dict(), status=201)
    base = "me" if "app_id" not in request.match_info else app_id
    response.headers["Location"] = f"/api/v1/apps/{base}/subscriptions/{subscription.id}"
    return response


async def unsubscribe(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    await request.app[APPS].unsubscribe(app_id, request.match_info["subscription_id"])
    return web.Response(status=204)


# deliveries ---------------------------------------------------------------------------------
def _delivery(entry: OutboxEntry, *, payload: bool = False) -> dict[str, Any]:
    row = entry.row
    body: dict[str, Any] = {
        "id": row.idempotency_key,
        "status": entry.status,
        "event_type": row.payload.get("type"),
        "event_id": row.event_id,
        # a profile notification's lane is its customer: it names no conversation (null)
        "conversation_id": row.payload.get("conversation_id", row.conversation_id),
        "attempts": row.attempts,
        "replays": entry.replays,
        "last_error": entry.last_error,
        "created_at": entry.created_at.isoformat(),
        "next_attempt_at": entry.next_attempt_at.isoformat() if entry.status == "pending" else None,
        "done_at": entry.done_at.isoformat() if entry.done_at else None,
    }
    if payload:
        body["payload"] = {"id": row.idempotency_key, **row.payload}
    return body


async def list_deliveries(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    await request.app[APPS].record(app_id)
    q = request.query
    status = q.get("status")
    if status is not None and status not in ("pending", "done", "dead"):
        raise RequestError("status must be pending, done or dead", code="invalid_query", status=422)
    try:
        limit = int(q.get("limit", "50"))
        before = int(q["cursor"]) if q.get("cursor") else None
    except ValueError:
        raise RequestError(
            "limit and cursor must be numbers", code="invalid_query", status=422
        ) from None
    if not 1 <= limit <= 200:
        raise RequestError("limit must be 1 to 200", code="invalid_query", status=422)
    if before is not None and not 0 <= before < 2**63:  # row ids are 64-bit in the store
        raise RequestError("cursor is out of range", code="invalid_query", status=422)
    entries = await request.app[STORE].outbox_entries(
        destination(app_id), status=status, limit=limit + 1, before_id=before
    )
    page = entries[:limit]
    more = len(entries) > limit
    return web.json_response(
        {
            "deliveries": [_delivery(e) for e in page],
            "next_cursor": str(page[-1].row.id) if more and page else None,
        }
    )


async def _entry(request: web.Request, app_id: str) -> OutboxEntry:
    raw = request.match_info["delivery_id"]
    event_id, sep, n = raw.rpartition(":")
    entry = None
    if sep and event_id and n.isascii() and n.isdigit() and len(n) <= 9:  # 32-bit in the store
        entry = await request.app[STORE].outbox_entry(destination(app_id), event_id, int(n))
    if entry is None:
        raise NotFound(f"unknown delivery {raw!r}", code="unknown_delivery")
    return entry


async def get_delivery(request: web.Request) -> web.Response:
    app_id = await _app_id(request)
    return web.json_response(_delivery(await _entry(request, app_id), payload=True))


async def replay_delivery(request: web.Request) -> web.Response:
    """Queue a dead delivery again: same body, same ``Convctl-Delivery-Id``, full retries."""
    app_id = await _app_id(request)
    app = await request.app[APPS].live(app_id)
    if not app.enabled:
        raise Conflict("the app is disabled; enable it first", code="app_disabled")
    entry = await _entry(request, app_id)
    if entry.status != "dead":
        raise Conflict(
            f"only a dead delivery can be replayed; this one is {entry.status}", code="not_dead"
        )
    store = request.app[STORE]
    if not await store.outbox_replay(entry.row.id, request.app[CLOCK].now()):
        raise Conflict("the delivery is not dead any more", code="not_dead")
    request.app[DISPATCHER].wake()
    log.info("app_delivery_replayed", app_id=app_id, delivery_id=entry.row.idempotency_key)
    replayed = await store.outbox_entry(destination(app_id), entry.row.event_id, entry.row.n)
    assert replayed is not None
    return web.json_response(_delivery(replayed), status=202)


def routes() -> list[web.RouteDef]:
    # The ``me`` routes come first: ``/api/v1/apps/me`` must not match ``{app_id}``.
    me = "/api/v1/apps/me"
    admin = "/api/v1/apps/{app_id}"
    shared = []
    for base in (me, admin):
        shared += [
            web.get(base + "/subscriptions", list_subscriptions),
            web.post(base + "/subscriptions", subscribe),
            web.delete(base + "/subscriptions/{subscription_id}", unsubscribe),
            web.get(base + "/deliveries", list_deliveries),
            web.get(base + "/deliveries/{delivery_id}", get_delivery),
            web.post(base + "/deliveries/{delivery_id}/replay", replay_delivery),
        ]
    return [
        web.get(me, get_app),
        web.post("/api/v1/apps", create_app),
        web.get("/api/v1/apps", list_apps),
        *shared,
        web.get(admin, get_app),
        web.patch(admin, patch_app),
        web.delete(admin, delete_app),
        web.post(admin + "/token", rotate_token),
        web.post(admin + "/secret", rotate_secret),
    ]
