"""The app registry (admin) and scope enforcement on every App API route."""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from controller.api.apps import APP_API, ScopedRoute
from controller.apps import SCOPES
from controller.clock import ManualClock
from controller.testing import Service

HOOK = "http://127.0.0.1:9/hooks/convctl"  # never called: these tests decide no events


async def call(
    svc: Service,
    method: str,
    path: str,
    token: str | None = None,
    body: Any = None,
) -> tuple[int, Any]:
    assert svc.http is not None
    headers = {"Authorization": f"Bearer {token or svc.settings.admin_token}"}
    async with svc.http.request(
        method, svc.base_url + path, json=body, headers=headers
    ) as response:
        data = await response.json() if response.content_type == "application/json" else None
        return response.status, data


async def register(
    svc: Service, scopes: list[str], *, webhook_url: str | None = HOOK, name: str | None = None
) -> dict[str, Any]:
    status, body = await call(
        svc,
        "POST",
        "/api/v1/apps",
        body={
            "name": name or f"app-{secrets.token_hex(4)}",
            "scopes": scopes,
            "webhook_url": webhook_url,
        },
    )
    assert status == 201, body
    return dict(body)


async def test_an_app_is_registered_with_a_token_and_secret_shown_once(service: Service) -> None:
    status, body = await call(
        service,
        "POST",
        "/api/v1/apps",
        body={
            "name": "Survey",
            "description": "CSAT after close",
            "scopes": ["events:subscribe", "conversations:read"],
            "webhook_url": "https://survey.example.com/hooks",
        },
    )
    assert status == 201, body
    assert body["token"].startswith("cva_") and body["webhook_secret"].startswith("cvs_")
    assert body["scopes"] == ["events:subscribe", "conversations:read"]
    assert body["status"] == "enabled" and body["subscriptions"] == []
    app_id = body["id"]

    status, shown = await call(service, "GET", f"/api/v1/apps/{app_id}")
    assert status == 200
    assert shown["name"] == "Survey" and shown["description"] == "CSAT after close"
    assert "token" not in shown and "webhook_secret" not in shown
    status, listed = await call(service, "GET", "/api/v1/apps")
    assert [a["id"] for a in listed["apps"]] == [app_id]
    assert all("webhook_secret" not in a and "token" not in a for a in listed["apps"])
    # the token is its own credential
    status, me = await call(service, "GET", "/api/v1/apps/me", body["token"])
    assert status == 200 and me["id"] == app_id and "webhook_secret" not in me
    # nowhere in the database in clear text: only its hash
    rows = await service.store.app_records()
    assert body["token"] not in repr(rows)


async def test_unknown_scopes_event_types_and_bad_urls_are_named(service: Service) -> None:
    status, body = await call(
        service, "POST", "/api/v1/apps", body={"name": "x", "scopes": ["events:subscribe", "root"]}
    )
    assert status == 422
    assert body["error"]["code"] == "unknown_scope" and body["error"]["scope"] == "root"
    assert "root" in body["error"]["message"]
    status, body = await call(
        service, "POST", "/api/v1/apps", body={"name": "x", "webhook_url": "ftp://example.com/x"}
    )
    assert status == 422 and body["error"]["code"] == "invalid_body"
    status, body = await call(service, "POST", "/api/v1/apps", body={"name": "x", "token": "t"})
    assert status == 422

    app = await register(service, ["events:subscribe"])
    status, body = await call(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        app["token"],
        {"event_types": ["conversation.closed", "conversation.exploded"]},
    )
    assert status == 422
    assert body["error"] == {
        "code": "unknown_event_type",
        "event_type": "conversation.exploded",
        "message": body["error"]["message"],
    }
    status, body = await call(
        service, "PATCH", f"/api/v1/apps/{app['id']}", body={"scopes": ["customers:delete"]}
    )
    assert status == 422 and body["error"]["scope"] == "customers:delete"


async def test_names_are_unique_among_live_apps(service: Service) -> None:
    first = await register(service, [], name="CRM")
    status, body = await call(service, "POST", "/api/v1/apps", body={"name": "CRM"})
    assert status == 409 and body["error"]["code"] == "name_taken"
    await call(service, "DELETE", f"/api/v1/apps/{first['id']}")
    await register(service, [], name="CRM")  # the name is free again


async def test_only_admins_manage_the_registry(service: Service) -> None:
    app = await register(service, list(SCOPES))
    for token in (service.settings.agent_token, app["token"]):
        status, body = await call(service, "POST", "/api/v1/apps", token, {"name": "evil"})
        assert status == 403 and body["error"]["code"] == "wrong_role"
        status, body = await call(service, "GET", f"/api/v1/apps/{app['id']}", token)
        assert status == 403
        status, body = await call(service, "POST", f"/api/v1/apps/{app['id']}/token", token)
        assert status == 403
    assert service.http is not None
    async with service.http.get(service.base_url + "/api/v1/apps") as r:
        assert r.status == 401
    # an admin has no "me"
    status, body = await call(service, "GET", "/api/v1/apps/me")
    assert status == 403 and body["error"]["code"] == "not_an_app"


async def test_rotating_the_token_revokes_the_old_one_at_once(service: Service) -> None:
    app = await register(service, ["events:subscribe"])
    status, body = await call(service, "POST", f"/api/v1/apps/{app['id']}/token")
    assert status == 200 and body["token"] != app["token"]
    status, _ = await call(service, "GET", "/api/v1/apps/me", app["token"])
    assert status == 401
    status, me = await call(service, "GET", "/api/v1/apps/me", body["token"])
    assert status == 200 and me["id"] == app["id"]
    status, again = await call(service, "POST", f"/api/v1/apps/{app['id']}/token")
    assert (await call(service, "GET", "/api/v1/apps/me", body["token"]))[0] == 401
    assert (await call(service, "GET", "/api/v1/apps/me", again["token"]))[0] == 200


async def test_rotating_the_secret_shows_the_new_one_once(service: Service) -> None:
    app = await register(service, ["events:subscribe"])
    status, body = await call(service, "POST", f"/api/v1/apps/{app['id']}/secret")
    assert status == 200
    assert body["webhook_secret"].startswith("cvs_")
    assert body["webhook_secret"] != app["webhook_secret"]
    stored = await service.store.app_record(app["id"])
    assert stored is not None and stored.webhook_secret == body["webhook_secret"]
    status, shown = await call(service, "GET", f"/api/v1/apps/{app['id']}")
    assert body["webhook_secret"] not in repr(shown)


async def test_patch_changes_scopes_webhook_and_enabled(service: Service) -> None:
    app = await register(service, ["events:subscribe"])
    token = app["token"]
    status, body = await call(
        service,
        "PATCH",
        f"/api/v1/apps/{app['id']}",
        body={"scopes": ["conversations:read"], "webhook_url": None, "name": "Renamed"},
    )
    assert status == 200, body
    assert body["scopes"] == ["conversations:read"] and body["webhook_url"] is None
    assert body["name"] == "Renamed"
    status, body = await call(service, "GET", "/api/v1/apps/me/subscriptions", token)
    assert status == 403 and body["error"]["scope"] == "events:subscribe"

    status, body = await call(
        service, "PATCH", f"/api/v1/apps/{app['id']}", body={"enabled": False}
    )
    assert status == 200 and body["status"] == "disabled"
    status, body = await call(service, "GET", "/api/v1/apps/me", token)
    assert status == 401
    await call(service, "PATCH", f"/api/v1/apps/{app['id']}", body={"enabled": True})
    assert (await call(service, "GET", "/api/v1/apps/me", token))[0] == 200
    status, body = await call(service, "PATCH", f"/api/v1/apps/{app['id']}", body={"enabled": 1})
    assert status == 422
    status, body = await call(service, "PATCH", "/api/v1/apps/ap_unknown", body={"enabled": True})
    assert status == 404 and body["error"]["code"] == "unknown_app"


async def test_deleting_an_app_revokes_it(service: Service) -> None:
    app = await register(service, ["events:subscribe"])
    status, _ = await call(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        app["token"],
        {"event_types": ["conversation.closed"]},
    )
    assert status == 201
    status, body = await call(service, "DELETE", f"/api/v1/apps/{app['id']}")
    assert status == 200 and body["status"] == "deleted"
    assert (await call(service, "GET", "/api/v1/apps/me", app["token"]))[0] == 401
    status, shown = await call(service, "GET", f"/api/v1/apps/{app['id']}")
    assert status == 200 and shown["status"] == "deleted" and shown["subscriptions"] == []
    status, body = await call(service, "PATCH", f"/api/v1/apps/{app['id']}", body={"name": "z"})
    assert status == 409 and body["error"]["code"] == "app_deleted"
    for action in ("token", "secret"):
        status, body = await call(service, "POST", f"/api/v1/apps/{app['id']}/{action}")
        assert status == 409
    assert (await call(service, "DELETE", f"/api/v1/apps/{app['id']}"))[0] == 409
    status, listed = await call(service, "GET", "/api/v1/apps")
    assert listed["apps"] == []
    status, listed = await call(service, "GET", "/api/v1/apps?include_deleted=true")
    assert [a["id"] for a in listed["apps"]] == [app["id"]]


async def test_subscriptions_are_managed_by_the_app_and_by_admins(
    service: Service, clock: ManualClock
) -> None:
    app = await register(service, ["events:subscribe"])
    other = await register(service, ["events:subscribe"])
    status, sub = await call(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        app["token"],
        {"event_types": ["customer.message", "conversation.closed", "customer.message"]},
    )
    assert status == 201
    assert sub["event_types"] == ["customer.message", "conversation.closed"]
    clock.advance(1)  # listed oldest first
    status, by_admin = await call(
        service,
        "POST",
        f"/api/v1/apps/{app['id']}/subscriptions",
        body={"event_types": ["agent.left"]},
    )
    assert status == 201 and by_admin["app_id"] == app["id"]
    status, body = await call(service, "GET", "/api/v1/apps/me/subscriptions", app["token"])
    assert [s["id"] for s in body["subscriptions"]] == [sub["id"], by_admin["id"]]
    # another app cannot touch them
    status, body = await call(
        service, "DELETE", f"/api/v1/apps/me/subscriptions/{sub['id']}", other["token"]
    )
    assert status == 404 and body["error"]["code"] == "unknown_subscription"
    status, _ = await call(
        service, "DELETE", f"/api/v1/apps/me/subscriptions/{sub['id']}", app["token"]
    )
    assert status == 204
    status, body = await call(service, "GET", f"/api/v1/apps/{app['id']}/subscriptions")
    assert [s["id"] for s in body["subscriptions"]] == [by_admin["id"]]
    # no webhook to deliver to: subscribing is refused
    hookless = await register(service, ["events:subscribe"], webhook_url=None)
    status, body = await call(
        service,
        "POST",
        "/api/v1/apps/me/subscriptions",
        hookless["token"],
        {"event_types": ["agent.left"]},
    )
    assert status == 409 and body["error"]["code"] == "no_webhook_url"


def test_every_app_api_route_is_in_the_scope_table(service: Service) -> None:
    """The table lists every ``me`` route, and only routes the service serves."""
    table = {(r.method, r.path) for r in APP_API}
    served = set()
    for route in service.app.router.routes():
        resource = route.resource
        if route.method != "HEAD" and resource is not None:
            served.add((route.method, resource.canonical))
    assert table <= served
    assert {r for r in served if r[1].startswith("/api/v1/apps/me")} == {
        r for r in table if r[1].startswith("/api/v1/apps/me")
    }
    assert {r.scope for r in APP_API} - {None} <= set(SCOPES)


def _fill(path: str, conversation_id: str) -> str:
    return path.format(
        conversation_id=conversation_id,
        subscription_id="sb_unknown",
        delivery_id="ev_unknown:0",
        campaign_id="cp_unknown",
        customer_id="cu_unknown",
    )


_BODIES = {"/api/v1/apps/me/subscriptions": {"event_types": ["conversation.closed"]}}


@pytest.mark.parametrize("route", APP_API, ids=lambda r: f"{r.method} {r.path}")
async def test_scopes_are_enforced_on_every_app_api_route(
    service: Service, route: ScopedRoute
) -> None:
    """Walk every scope on this route: an app holding only that scope is refused with a 403
    naming the route's scope exactly when it is not the one needed; with it, no 403."""
    customer = await service.customer()
    conversation_id = await customer.start_with_bot("hi")
    path = _fill(route.path, conversation_id)
    body = _BODIES.get(route.path) if route.method == "POST" else None
    for scope in [None, *SCOPES]:
        app = await register(service, [scope] if scope else [])
        status, answer = await call(service, route.method, path, app["token"], body)
        needed = route.scope
        if needed is not None and scope != needed:
            assert status == 403, (scope, answer)
            assert answer["error"]["code"] == "missing_scope"
            assert answer["error"]["scope"] == needed
        else:
            assert status != 403, (scope, answer)
            assert status < 500, answer
    # holding every other scope does not help either
    if route.scope is not None:
        others = [s for s in SCOPES if s != route.scope]
        app = await register(service, others)
        status, answer = await call(service, route.method, path, app["token"], body)
        assert status == 403 and answer["error"]["scope"] == route.scope
    # admins pass the scope check (the "me" routes then say an admin is not an app)
    status, answer = await call(service, route.method, path, None, body)
    assert status != 403 or answer["error"]["code"] == "not_an_app"


async def test_apps_read_conversations_with_the_scope(service: Service) -> None:
    customer = await service.customer()
    conversation_id = await customer.start_with_bot("hi")
    reader = await register(service, ["conversations:read"])
    status, conv = await call(
        service, "GET", f"/api/v1/conversations/{conversation_id}", reader["token"]
    )
    assert status == 200 and conv["id"] == conversation_id
    status, transcript = await call(
        service, "GET", f"/api/v1/conversations/{conversation_id}/messages", reader["token"]
    )
    assert status == 200
    assert transcript["messages"][0]["text"] == "hi"
    # the other conversation routes stay admin-only
    status, body = await call(
        service, "GET", f"/api/v1/conversations/{conversation_id}/events", reader["token"]
    )
    assert status == 403 and body["error"]["code"] == "wrong_role"
    # other roles keep their rules: a crm token reads no conversations, an agent only its own
    assert service.http is not None
    r = await service.http.post(
        service.base_url + "/api/v1/tokens",
        json={"role": "crm", "subject": "crm-1"},
        headers=service.admin_headers(),
    )
    crm = (await r.json())["token"]
    status, body = await call(service, "GET", f"/api/v1/conversations/{conversation_id}", crm)
    assert status == 403 and body["error"]["code"] == "wrong_role"
    status, body = await call(
        service, "GET", f"/api/v1/conversations/{conversation_id}", service.settings.agent_token
    )
    assert status == 403 and body["error"]["code"] == "not_a_participant"
    # an app token for an app that does not exist (made by hand) is no credential
    r = await service.http.post(
        service.base_url + "/api/v1/tokens",
        json={"role": "app", "subject": "ap_nobody"},
        headers=service.admin_headers(),
    )
    ghost = (await r.json())["token"]
    status, _ = await call(service, "GET", f"/api/v1/conversations/{conversation_id}", ghost)
    assert status == 401


async def test_apps_manage_customers_with_the_customer_scopes(service: Service) -> None:
    writer = await register(service, ["customers:write"])
    reader = await register(service, ["customers:read"])
    body = {"name": "Ada", "email": "ada@example.com", "external_id": "crm-ada"}
    status, made = await call(service, "POST", "/api/v1/customers", writer["token"], body)
    assert status == 201 and made["known"] is True
    # the writer cannot read (its scope is only customers:write), the reader can
    status, answer = await call(service, "GET", f"/api/v1/customers/{made['id']}", writer["token"])
    assert status == 403 and answer["error"]["scope"] == "customers:read"
    status, found = await call(
        service, "GET", "/api/v1/customers/lookup?identity=email:ada@example.com", reader["token"]
    )
    assert status == 200 and found["id"] == made["id"]
    # the reader cannot write, and erasure stays an admin's
    status, answer = await call(service, "POST", "/api/v1/customers", reader["token"], body)
    assert status == 403 and answer["error"]["scope"] == "customers:write"
    status, answer = await call(
        service, "DELETE", f"/api/v1/customers/{made['id']}?erase=true", writer["token"]
    )
    assert status == 403 and answer["error"]["code"] == "wrong_role"
